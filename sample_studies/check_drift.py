"""How hard is each sample set for plain subtraction, given PERFECT registration?

The baseline of each patient is resampled onto a follow-up's grid through the known transforms (each visit's
``to_anatomy.tfm`` maps its scanner space to the patient's anatomy), so whatever remains in
|follow-up - baseline| is change, scanner drift (gain, intensity curve, bias field, distortion, slice thickness)
and noise. On the easy set the lesions stand out; on the hard set drift must drown them (that is the point of
the hard set: a method has to beat subtraction there).

Run: ``python sample_studies/check_drift.py [set ...]``; prints one line per follow-up and a summary per set.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ROOT = Path(__file__).resolve().parent


def read_visit_image(set_dir: Path, doc: dict) -> sitk.Image:
    path = set_dir / doc["image"]
    if path.is_dir():  # a DICOM series folder
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return sitk.Cast(reader.Execute(), sitk.sitkFloat32)
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


def _flat(tx: sitk.Transform) -> list[sitk.Transform]:
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        return [t for i in range(comp.GetNumberOfTransforms()) for t in _flat(comp.GetNthTransform(i))]
    return [tx]


def followup_to_baseline(truth_dir: Path, baseline: str, visit: str) -> sitk.Transform:
    """Maps a follow-up point to the baseline point showing the same tissue (baseline pose is rigid)."""
    t_f = sitk.ReadTransform(str(truth_dir / visit / "to_anatomy.tfm"))
    t_b = _flat(sitk.ReadTransform(str(truth_dir / baseline / "to_anatomy.tfm")))
    if len(t_b) != 1:
        raise ValueError("baseline transforms must be rigid to be inverted exactly")
    return sitk.CompositeTransform([t_b[0].GetInverse(), *_flat(t_f)])  # applied right to left


NORMALISATIONS = ("none", "linear", "histogram")


@dataclass(frozen=True)
class SubtractionFigures:
    patient: str
    visit: str
    normalisation: str  # none | linear (baseline scaled to the follow-up's brain median) | histogram matched
    truth_voxels: int
    auroc: float  # |F - B| as a voxel score for the changemask, brain voxels only (nan when no change)
    lesion_median: float  # median |F - B| inside the changemask
    background_p99: float  # 99th percentile of |F - B| over unchanged brain voxels
    false_per_true: float  # unchanged brain voxels scoring >= lesion_median, per changed voxel
    unchanged: np.ndarray  # |F - B| of the unchanged brain voxels (for set-level thresholds)


def _normalise(b: np.ndarray, f: np.ndarray, brain: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return b
    if how == "linear":
        return b * (np.median(f[brain]) / np.median(b[brain]))
    if how == "histogram":  # removes any monotone intensity curve (gain, gamma), not the bias field
        matched = sitk.HistogramMatching(sitk.GetImageFromArray(b * brain), sitk.GetImageFromArray(f * brain),
                                         numberOfHistogramLevels=256, numberOfMatchPoints=32,
                                         thresholdAtMeanIntensity=True)
        return sitk.GetArrayFromImage(matched)
    raise ValueError(how)


def pooled_log_ratio(f: np.ndarray, b: np.ndarray, brain: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """A minimal sensible detector, to show the hard changes ARE detectable: the log ratio cancels gain and
    bias, an 8 mm high-pass removes what bias is left, a 1.2 mm Gaussian pools a lesion's voxels."""
    r = np.where(brain, np.log(np.maximum(f, 1)) - np.log(np.maximum(b, 1)), 0.0)
    w = ndimage.gaussian_filter(brain.astype(float), 8 / spacing_zyx)
    hp = r - ndimage.gaussian_filter(r, 8 / spacing_zyx) / np.maximum(w, 1e-3)
    return np.abs(ndimage.gaussian_filter(hp, 1.2 / spacing_zyx))


@dataclass(frozen=True)
class AlignedPair:
    """A follow-up, its baseline resampled onto it through the known transforms, the truth, the brain."""

    followup: np.ndarray
    baseline: np.ndarray
    truth: np.ndarray
    brain: np.ndarray
    spacing_zyx: np.ndarray


def aligned_pair(set_name: str, patient: str, visit: str, normalisation: str = "linear",
                 root: Path = ROOT) -> AlignedPair:
    set_dir = root / set_name
    truth_dir = set_dir / "derivatives" / "changes" / patient
    doc = json.loads((truth_dir / visit / "changes.json").read_text())
    base_doc = json.loads((truth_dir / doc["baseline"] / "changes.json").read_text())
    fol = read_visit_image(set_dir, doc)
    base = read_visit_image(set_dir, base_doc)
    reg = sitk.Resample(base, fol, followup_to_baseline(truth_dir, doc["baseline"], visit), sitk.sitkLinear, 0.0)
    f, b = sitk.GetArrayFromImage(fol), sitk.GetArrayFromImage(reg)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_dir / visit / "changemask.nii.gz"))) > 0
    brain = ndimage.binary_erosion((f > 0) & (b > 0), iterations=2)
    return AlignedPair(f, _normalise(b, f, brain, normalisation), truth, brain, np.array(fol.GetSpacing())[::-1])


def figures(pair: AlignedPair, patient: str, visit: str, normalisation: str, pooled: bool = False
            ) -> SubtractionFigures:
    """Score the pair with |F - B| (or :func:`pooled_log_ratio`) against the truth."""
    from sklearn.metrics import roc_auc_score

    f, b, brain = pair.followup, pair.baseline, pair.brain
    d = (pooled_log_ratio(f, b, brain, pair.spacing_zyx) if pooled else np.abs(f - b))[brain]
    t = pair.truth[brain]
    if t.sum() == 0:
        return SubtractionFigures(patient, visit, normalisation, 0, float("nan"), float("nan"),
                                  float(np.percentile(d, 99)), float("nan"), d)
    med = float(np.median(d[t]))
    return SubtractionFigures(patient, visit, normalisation, int(t.sum()), float(roc_auc_score(t, d)), med,
                              float(np.percentile(d[~t], 99)), float((d[~t] >= med).sum() / t.sum()), d[~t])


def subtraction(set_name: str, patient: str, visit: str, normalisation: str = "linear",
                root: Path = ROOT, pooled: bool = False) -> SubtractionFigures:
    """Plain subtraction of the perfectly registered baseline (or the pooled score), against the truth."""
    return figures(aligned_pair(set_name, patient, visit, normalisation, root), patient, visit, normalisation,
                   pooled)


def followups(set_name: str, root: Path = ROOT, changed_only: bool = False) -> list[tuple[str, str]]:
    out = []
    for js in sorted((root / set_name / "derivatives" / "changes").glob("*/*/changes.json")):
        doc = json.loads(js.read_text())
        if not doc["is_baseline"] and (doc["changes"] or not changed_only):
            out.append((js.parent.parent.name, js.parent.name))
    return out


def main(argv: list[str]) -> None:
    for set_name in argv or ["easy", "hard", "dicom"]:
        for how, pooled in [(h, False) for h in NORMALISATIONS] + [("histogram", True)]:
            rows = [subtraction(set_name, p, v, how, pooled=pooled) for p, v in followups(set_name)]
            changed = [r for r in rows if r.truth_voxels]
            # A set-level threshold: the median |d| of changed voxels; stable visits show what it costs.
            thr = float(np.median([r.lesion_median for r in changed])) if changed else float("nan")
            score = "pooled log ratio (a minimal detector)" if pooled else "|F - B|"
            print(f"== {set_name}, score {score}, intensity normalisation: {how}; "
                  f"threshold = median lesion score = {thr:.3g}")
            print(f"{'patient':8} {'visit':11} {'truth':>6} {'AUROC':>6} {'lesion|d|':>9} {'p99|d|unch':>10} "
                  f"{'false/true':>10} {'unch>=thr':>9}")
            for r in rows:
                print(f"{r.patient:8} {r.visit:11} {r.truth_voxels:6d} {r.auroc:6.3f} {r.lesion_median:9.3g} "
                      f"{r.background_p99:10.3g} {r.false_per_true:10.1f} {int((r.unchanged >= thr).sum()):9d}")
            if changed:
                print(f"   mean AUROC {np.mean([r.auroc for r in changed]):.3f}; median false/true "
                      f"{np.median([r.false_per_true for r in changed]):.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
