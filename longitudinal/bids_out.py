"""Batch results as a BIDS-derivatives dataset (`batch ... --output-layout bids`), for labs running BIDS pipelines.

Per compared pair, in `sub-<patient>/ses-<follow-up>/anat/` (all on the follow-up's own grid, so no `space-`):

- `..._desc-change_probseg.nii.gz`: the change score on a probability scale, 1 - 10^-score (the score is
  -log10 of the chance that unchanged tissue scores this high; probseg values must lie in 0..1).
- `..._desc-flagged_mask.nii.gz`: the changed tissue of every finding.
- `..._desc-findings_dseg.nii.gz` with `..._desc-findings_dseg.tsv`: each finding's label and its measures
  (BIDS has no generic table suffix in derivatives; a segmentation's label table is the valid place).
- `..._from-<follow-up>_to-<baseline>_mode-image_xfm.txt` and, when the transform is invertible, the reverse:
  ITK transforms named as fMRIPrep names them (`from-A_to-B`: resamples A onto B's grid). BIDS 1.11 has no
  `from`/`to`/`mode` entities or `xfm` suffix, so `.bidsignore` lists them.
- JSON sidecars with `Sources` and `SpatialReference` (BIDS URIs into the input dataset, `bids:raw:`).

Once per dataset (`write_bids_dataset`): `dataset_description.json` (DatasetType derivative, GeneratedBy,
SourceDatasets), `.bidsignore`, and `changes.tsv` (+ `.json`), one row per pair, gathered from the pairs'
sidecars so a resumed batch lists pairs done by an earlier run. De-identified runs name subjects by the
pseudonym and leave input paths out (no `Sources`, `SpatialReference` or dataset links).
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from .compare import Comparison
from .errors import InputError
from .io import atomic_write, atomic_write_text

CODE_URL = "https://github.com/longitudinal-imaging/longitudinal"
BIDS_VERSION = "1.11.0"
# Files of this derivative that BIDS 1.11 has no name for: transforms (fMRIPrep's convention), per-patient
# lesion tables, the cohort table, and the tool's own per-pair report folders and summary.
# (bids-validator-deno 3 matches a folder by its bare name: "reports", not "reports/".)
BIDSIGNORE = ("*_xfm.txt", "changes.tsv", "changes.json", "sub-*/sub-*_lesions.*", "reports", "summary.html",
              "summary.csv")
_LABEL = re.compile(r"[^A-Za-z0-9]")


def bids_label(text: str, entity: str) -> str:
    """A BIDS label (letters and digits) for a patient or visit id: `sub-01` -> `01`, `2021-06-10` -> `20210610`."""
    text = re.sub(rf"^{entity}-", "", text)
    label = _LABEL.sub("", text)
    if not label:
        raise InputError(None, f"{text!r} gives no BIDS {entity} label (letters or digits needed)")
    return label


@dataclass(frozen=True)
class BidsPair:
    """Where one compared pair goes in the derivative dataset, and what it came from."""

    subject: str  # BIDS label (bids_label of the patient id, or of the pseudonym when de-identified)
    session: str  # the follow-up's label
    baseline_session: str
    source: str | None = None  # the follow-up image, relative to the input dataset's root (None: de-identified)

    @property
    def folder(self) -> Path:
        return Path(f"sub-{self.subject}") / f"ses-{self.session}" / "anat"

    @property
    def stem(self) -> str:
        return f"sub-{self.subject}_ses-{self.session}"

    def names(self) -> dict[str, Path]:
        base = self.folder
        return {
            "probseg": base / f"{self.stem}_desc-change_probseg.nii.gz",
            "mask": base / f"{self.stem}_desc-flagged_mask.nii.gz",
            "dseg": base / f"{self.stem}_desc-findings_dseg.nii.gz",
            "dseg_tsv": base / f"{self.stem}_desc-findings_dseg.tsv",
            "xfm": base / f"sub-{self.subject}_from-{self.session}_to-{self.baseline_session}_mode-image_xfm.txt",
            "xfm_inverse": (base / f"sub-{self.subject}_from-{self.baseline_session}_to-{self.session}"
                                   "_mode-image_xfm.txt"),
        }


def _nifti(path: Path, itk: sitk.Image, pixel: int) -> Path:
    image = sitk.Cast(itk if itk.GetDimension() == 3 else sitk.JoinSeries(itk), pixel)
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, True))


def _json(path: Path, doc: dict) -> Path:
    return atomic_write_text(path.with_name(path.name.split(".")[0] + ".json"), json.dumps(doc, indent=1) + "\n")


def _fmt(value: object) -> object:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return value


def write_bids_pair(comparison: Comparison, root: str | os.PathLike, pair: BidsPair) -> dict[str, Path]:
    """Per-pair hook of a `--output-layout bids` batch: the pair's files under `root` (the batch's output
    folder), each written atomically. Returns every path written, by kind."""
    root = Path(root)
    names = pair.names()
    (root / pair.folder).mkdir(parents=True, exist_ok=True)
    provenance: dict[str, object] = {}
    if pair.source is not None:
        uri = f"bids:raw:{pair.source}"
        provenance = {"Sources": [uri], "SpatialReference": uri}
    written: dict[str, Path] = {}

    score = sitk.GetArrayFromImage(comparison.change_map.itk).astype(np.float64)
    probability = 1.0 - np.power(10.0, -np.clip(score, 0.0, None))
    change = sitk.GetImageFromArray(probability.astype(np.float32))
    change.CopyInformation(comparison.change_map.itk)
    written["probseg"] = _nifti(root / names["probseg"], change, sitk.sitkFloat32)
    written["probseg_json"] = _json(root / names["probseg"], {
        **provenance,
        "Description": "Change of the follow-up against the baseline, per voxel, on a probability scale: "
                       "1 - p, where p = 10^-score is the chance that unchanged tissue scores this high (calibrated "
                       "per region; not a posterior probability of change). score = -log10(1 - value).",
        "Threshold": 1.0 - 10.0 ** -float(comparison.threshold),
        "ScoreThreshold": float(comparison.threshold)})
    written["mask"] = _nifti(root / names["mask"], comparison.flagged_mask.itk, sitk.sitkUInt8)
    written["mask_json"] = _json(root / names["mask"], {
        **provenance, "Type": "Lesion", "Description": "Changed tissue of every flagged finding (follow-up grid)."})
    written["dseg"] = _nifti(root / names["dseg"], comparison.finding_labels.itk, sitk.sitkUInt16)
    written["dseg_tsv"] = atomic_write_text(root / names["dseg_tsv"], _findings_tsv(comparison))
    written["dseg_json"] = _json(root / names["dseg"], {
        **provenance,
        "Description": "Findings of the follow-up against the baseline: voxel value = finding index; the .tsv "
                       "gives each finding's measures.",
        "Pair": {"baseline_session": f"ses-{pair.baseline_session}",
                 "baseline_date": _iso(comparison.baseline.meta.study_date),
                 "followup_date": _iso(comparison.followup.meta.study_date), "verdict": comparison.verdict,
                 "progression_score": comparison.progression_score, "threshold": float(comparison.threshold),
                 "pipeline": f"{comparison.pipeline.name} {comparison.pipeline.version}"},
        **{k: v for k, v in _FINDING_COLUMNS.items() if k not in ("index", "name")}})  # BIDS defines those two
    transform = comparison.registration.transform
    written["xfm"] = atomic_write(root / names["xfm"], lambda tmp: sitk.WriteTransform(transform, tmp))
    try:
        inverse = transform.GetInverse()
    except RuntimeError:  # a B-spline stage has no closed-form inverse
        (root / names["xfm_inverse"]).unlink(missing_ok=True)
    else:
        written["xfm_inverse"] = atomic_write(root / names["xfm_inverse"],
                                              lambda tmp: sitk.WriteTransform(inverse, tmp))
    return written


_FINDING_COLUMNS = {
    "index": {"Description": "finding number, the voxel value in the dseg image"},
    "name": {"Description": "finding name"},
    "volume_mm3": {"Description": "volume of the changed tissue (2D: area in mm2)", "Units": "mm3"},
    "diameter_mm": {"Description": "largest extent of the changed tissue", "Units": "mm"},
    "mean_change_pct": {"Description": "mean intensity change of the changed tissue, % of the baseline "
                                       "(+: brighter at follow-up)", "Units": "%"},
    "score": {"Description": "calibrated change score: -log10 of the chance that an unchanged region scores this "
                             "high"},
    "centre_x_mm": {"Description": "centre, LPS x (patient right to left), baseline space", "Units": "mm"},
    "centre_y_mm": {"Description": "centre, LPS y (anterior to posterior), baseline space", "Units": "mm"},
    "centre_z_mm": {"Description": "centre, LPS z (inferior to superior), baseline space", "Units": "mm"},
}


def _findings_tsv(comparison: Comparison) -> str:
    buf = _io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(list(_FINDING_COLUMNS))
    for f in comparison.findings:
        centre = list(f.centre_mm) + [None] * (3 - len(f.centre_mm))
        writer.writerow([_fmt(v) for v in (f.id, f"finding{f.id}", f.volume_mm3, f.diameter_mm, f.mean_change_pct,
                                           f.score, *centre)])
    return buf.getvalue()


def _iso(d: str | None) -> str | None:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if d and len(d) >= 8 and d[:8].isdigit() else None


_COHORT_COLUMNS = {
    "participant_id": {"Description": "subject (sub-<label>)"},
    "session_id": {"Description": "the follow-up session"},
    "baseline_session_id": {"Description": "the session it was compared with"},
    "baseline_date": {"Description": "study date of that session (ISO 8601)"},
    "followup_date": {"Description": "study date of the follow-up (ISO 8601)"},
    "verdict": {"Description": "progression, no progression, or not comparable"},
    "progression_score": {"Description": "highest region score of the pair (calibrated, -log10 p)"},
    "threshold": {"Description": "score above which a region is flagged"},
    "n_findings": {"Description": "number of flagged findings"},
    "changed_volume_mm3": {"Description": "total volume of the findings' changed tissue", "Units": "mm3"},
    "findings": {"Description": "the pair's findings table, relative to this dataset's root"},
}


def _cohort_rows(root: Path) -> list[dict[str, object]]:
    rows = []
    for sidecar in sorted(root.glob("sub-*/ses-*/anat/sub-*_ses-*_desc-findings_dseg.json")):
        doc = json.loads(sidecar.read_text(encoding="utf-8"))
        info = doc.get("Pair", {})
        subject, session = sidecar.parts[-4], sidecar.parts[-3]
        table = sidecar.with_suffix(".tsv")
        with open(table, encoding="utf-8", newline="") as fh:
            findings = list(csv.DictReader(fh, delimiter="\t"))
        volumes = [float(f["volume_mm3"]) for f in findings if f["volume_mm3"] != "n/a"]
        rows.append({"participant_id": subject, "session_id": session,
                     "baseline_session_id": info.get("baseline_session"), "baseline_date": info.get("baseline_date"),
                     "followup_date": info.get("followup_date"), "verdict": info.get("verdict"),
                     "progression_score": info.get("progression_score"), "threshold": info.get("threshold"),
                     "n_findings": len(findings), "changed_volume_mm3": round(sum(volumes), 2),
                     "findings": table.relative_to(root).as_posix()})
    return rows


_README = """Change detection between visits by longitudinal (BIDS derivative).

Per follow-up session, in sub-<label>/ses-<label>/anat/, on the follow-up image's own grid:
  *_desc-change_probseg.nii.gz   change per voxel on a probability scale (1 - 10^-score; see its .json)
  *_desc-flagged_mask.nii.gz     changed tissue of every flagged finding
  *_desc-findings_dseg.nii.gz    finding index per voxel; *_desc-findings_dseg.tsv: each finding's measures
  *_from-A_to-B_mode-image_xfm.txt  ITK transform resampling session A onto session B (fMRIPrep's naming)
changes.tsv lists every compared pair; sub-<label>/sub-<label>_lesions.tsv tracks each lesion across sessions.
Files BIDS 1.11 has no name for are listed in .bidsignore.
"""


def write_bids_dataset(root: str | os.PathLike, *, source: str | os.PathLike | None,
                       name: str = "longitudinal change detection") -> dict[str, Path]:
    """Once per batch, after the pairs (also a resumed one): dataset_description.json, .bidsignore and the
    cohort table changes.tsv (+ .json) of every pair under `root`. source: the input dataset's folder, linked as
    `raw` (None when de-identified: no input path is written)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    description: dict[str, object] = {
        "Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "longitudinal", "Version": __version__, "CodeURL": CODE_URL,
                         "Description": "baseline/follow-up change detection"}],
    }
    if source is not None:
        uri = Path(source).resolve().as_uri()
        description["SourceDatasets"] = [{"URL": uri}]
        description["DatasetLinks"] = {"raw": uri}
    else:
        description["SourceDatasets"] = [{"URL": "de-identified: not recorded"}]
    rows = _cohort_rows(root)
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(_COHORT_COLUMNS), delimiter="\t", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    return {
        "description": atomic_write_text(root / "dataset_description.json", json.dumps(description, indent=1) + "\n"),
        "readme": atomic_write_text(root / "README", _README),
        "bidsignore": atomic_write_text(root / ".bidsignore", "\n".join(BIDSIGNORE) + "\n"),
        "changes": atomic_write_text(root / "changes.tsv", buf.getvalue()),
        "changes_json": atomic_write_text(root / "changes.json", json.dumps(_COHORT_COLUMNS, indent=1) + "\n"),
    }


def pair_for(patient: str, followup_visit: str, baseline_visit: str, followup_path: str | os.PathLike | None,
             studies_root: str | os.PathLike | None) -> BidsPair:
    """The BidsPair of a batch pair: labels from the (shown) patient and visit ids; `source` the follow-up path
    relative to the studies folder (pass None for either path when de-identified)."""
    source = None
    if followup_path is not None and studies_root is not None:
        try:
            source = Path(followup_path).resolve().relative_to(Path(studies_root).resolve()).as_posix()
        except ValueError:
            source = None
    return BidsPair(subject=bids_label(patient, "sub"), session=bids_label(followup_visit, "ses"),
                    baseline_session=bids_label(baseline_visit, "ses"), source=source)

