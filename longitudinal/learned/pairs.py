"""Labelled pairs for training: registered, harmonised, on the baseline grid, cached on disk as npz.

Each pair is prepared by the same stages as `compare` (`compare.prepare`), and its truth (the changemask on
the follow-up's grid, `derivatives/changes/<patient>/<visit>/`) is brought to the baseline grid with the
registration (nearest neighbour). Registration takes seconds per pair; the cache keeps epochs from redoing it.
The cache holds arrays only (numpy npz read with allow_pickle=False) and is keyed by the input files (path,
size, modification time) and the pipeline's settings, so a changed input or pipeline is prepared again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..timeline import Pair

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True, eq=False)
class PairArrays:
    """One prepared pair as arrays on the baseline grid (numpy order: (z, y, x) or (y, x)[, rgb])."""

    key: str  # "<studies folder name>/<patient>/<visit>": names the pair in cards and curves
    patient: str  # patient id (held-back splits are by patient)
    baseline: np.ndarray  # float32, harmonised
    followup: np.ndarray  # float32, harmonised, registered
    mask: np.ndarray  # bool, the baseline's body mask
    truth: np.ndarray  # bool, what changed (on the baseline grid)
    spacing: tuple[float, ...]  # mm per voxel, numpy order (z, y, x) or (y, x)
    rgb: bool

    @property
    def changed(self) -> bool:
        return bool(self.truth.any())

    def digest(self) -> str:
        """sha256 of the voxels: the card's training-data hash does not depend on paths or dates."""
        h = hashlib.sha256()
        for a in (self.baseline, self.followup, self.mask, self.truth):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class PairSource:
    """Where a labelled pair comes from: the timeline's pair, whose visits load as `batch` and `evaluate` load
    them (the series the timeline chose, the modality)."""

    studies: Path
    pair: Pair

    @property
    def patient(self) -> str:
        return self.pair.patient_id

    @property
    def visit(self) -> str:
        return self.pair.followup.id

    @property
    def baseline(self) -> Path:
        return Path(self.pair.baseline.path)

    @property
    def followup(self) -> Path:
        return Path(self.pair.followup.path)

    @property
    def key(self) -> str:
        return f"{self.studies.name}/{self.patient}/{self.visit}"


def labelled_pairs(folders: list[Path]) -> list[PairSource]:
    """Every follow-up (against the patient's first visit) under `folders` that has a truth changemask.

    Follow-ups without truth are skipped and logged: an unlabelled pair is not known to be stable."""
    from ..timeline import discover, pairs

    found = []
    for studies in folders:
        studies = Path(studies)
        if not studies.is_dir():
            raise InputError(studies, "not a folder of studies")
        for patient in discover(studies):
            for pair in pairs(patient):
                truth_dir = studies / "derivatives" / "changes" / patient.id / pair.followup.id
                if not any((truth_dir / n).is_file() for n in ("changemask.nii.gz", "changemask.png")):
                    log.warning("training: %s has no changemask, skipped", truth_dir)
                    continue
                found.append(PairSource(studies, pair))
    if not found:
        raise InputError(folders[0] if folders else None,
                         "no follow-up with a derivatives/changes/<patient>/<visit>/changemask to train on")
    return found


def _stamp(path: Path) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _jsonable(value):
    if is_dataclass(value):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def pipeline_digest(pipeline) -> str:
    """sha256 of a pipeline's name, version and every stage setting."""
    doc = {"name": pipeline.name, "version": pipeline.version, "stages": _jsonable(pipeline.stages)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def cache_key(source: PairSource, pipeline) -> str:
    truth_dir = source.studies / "derivatives" / "changes" / source.patient / source.visit
    doc = [CACHE_VERSION, pipeline_digest(pipeline), _stamp(source.baseline), _stamp(source.followup),
           _stamp(truth_dir)]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:24]


def prepare_pair(source: PairSource, pipeline):
    """(PairArrays, compare.Prepared) of one labelled pair."""
    import SimpleITK as sitk

    from ..compare import prepare
    from ..evaluation import read_truth

    baseline, followup = source.pair.baseline.load(), source.pair.followup.load()
    truth_itk, _ = read_truth(source.studies, source.patient, source.visit)
    if tuple(truth_itk.GetSize()) != followup.size:
        raise InputError(source.followup, f"truth mask size {truth_itk.GetSize()} differs from the follow-up's "
                                          f"{followup.size}")
    truth_itk.CopyInformation(followup.itk)
    prepared = prepare(baseline, followup, pipeline)
    truth = sitk.GetArrayFromImage(prepared.registration.to_fixed(truth_itk, sitk.sitkNearestNeighbor)) > 0
    arrays = PairArrays(
        key=source.key, patient=f"{source.studies.name}/{source.patient}",
        baseline=prepared.baseline_harmonised.array.astype(np.float32),
        followup=prepared.followup_harmonised.array.astype(np.float32),
        mask=np.asarray(prepared.mask, bool), truth=truth,
        spacing=tuple(reversed(prepared.baseline.spacing)), rgb=prepared.baseline_harmonised.is_rgb,
    )
    return arrays, prepared


def save_pair(path: Path, pair: PairArrays) -> None:
    from ..io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, baseline=pair.baseline, followup=pair.followup, mask=pair.mask, truth=pair.truth,
                     spacing=np.asarray(pair.spacing, np.float64), rgb=np.asarray(pair.rgb),
                     key=np.asarray(pair.key), patient=np.asarray(pair.patient))

    atomic_write(path, write)


def load_pair(path: Path) -> PairArrays:
    with np.load(path, allow_pickle=False) as z:
        return PairArrays(key=str(z["key"]), patient=str(z["patient"]), baseline=z["baseline"],
                          followup=z["followup"], mask=z["mask"].astype(bool), truth=z["truth"].astype(bool),
                          spacing=tuple(float(v) for v in z["spacing"]), rgb=bool(z["rgb"]))


def cached_pairs(sources: list[PairSource], pipeline, cache_dir: Path) -> list[PairArrays]:
    """Every source as PairArrays: from the cache when its key matches, else prepared and cached."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for source in sources:
        path = cache_dir / f"{cache_key(source, pipeline)}.npz"
        if path.is_file():
            try:
                out.append(load_pair(path))
                continue
            except (OSError, ValueError, KeyError) as exc:  # a damaged cache file is prepared again
                log.warning("training: cache file %s unreadable (%s), preparing again", path.name, exc)
        pair, _ = prepare_pair(source, pipeline)
        save_pair(path, pair)
        log.info("training: prepared %s (%d truth voxels)", source.key, int(pair.truth.sum()))
        out.append(pair)
    return out


def pipeline_for(sources: list[PairSource], pipeline_name: str | None):
    """The named pipeline, or the one `compare` would choose for the first baseline."""
    from ..pipeline import for_image, load

    return load(pipeline_name) if pipeline_name else for_image(sources[0].pair.baseline.load())
