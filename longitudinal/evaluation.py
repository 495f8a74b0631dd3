"""Evaluation against ground truth: is what we flag what really changed, and is it better than the baselines?

Every follow-up of every patient in a folder of studies is compared with the patient's first visit. Truth is
read from `<studies>/derivatives/changes/<patient>/<visit>/changemask.(nii.gz|png)` (+ `changes.json` for lesion
sizes and volumes, + `brainmask.nii.gz` where the true brain is known), on the follow-up's own grid, which is
also where our flagged mask and change map are measured. A `cohort.json` next to the patients (written by
`benchmarks/cohort.py`) tags each visit (whole head, voxel size, cut field of view, ...) for subgroup tables.
One registration per pair is shared by all methods:

- "ours": the pipeline as configured (pretrained encoder + intensity change maps);
- "subtraction": |F - B| after the same harmonisation as the detector's only feature (same regions, detector,
  calibration and threshold), i.e. plain subtraction given every other advantage;
- "random-encoder": the pipeline with the encoder's weights replaced by a random initialisation.

Metrics (per pair and pooled per method and subgroup): lesion-wise sensitivity (a truth lesion is a group of
changed voxels, pieces within 2 voxels merged; it is found when a flagged voxel overlaps it), false-positive
findings (flagged findings that touch no truth voxel) per pair and per stable pair, lesion-wise F1, the
reported volume of each found lesion against its true changed volume, findings outside the true brain, voxel
AUROC and average precision of the change map, pair-level AUROC (progression score vs any truth change), brain
extraction Dice, registration QC pass rate, and pairs called "not comparable".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError
from .io import atomic_write_text
from .report import jsonable

if TYPE_CHECKING:
    import SimpleITK as sitk

    from .encoding import EncoderSettings
    from .pipeline import Pipeline
    from .scoring import ScoringSettings
    from .timeline import Pair

log = logging.getLogger(__name__)

METHODS = ("ours", "subtraction", "random-encoder")
MODEL_PREFIX = "model:"  # a method "model:PATH": a detector trained by `longitudinal train`
OPERATING_THRESHOLDS = (3.0, 4.0, 5.0, 6.0, 8.0, 10.0)  # -log10 p, i.e. false-alarm rates 1e-3 ... 1e-10
FINDING_MERGE_VOXELS = 1  # flagged pieces up to 2 voxels apart are one finding, as truth lesions are counted
VOLUME_MIN_DIAMETER_MM = 5.0  # found lesions at least this large have their reported volume checked
VOLUME_TOLERANCE = 0.3  # ... within +-30 % of the true changed volume


# --------------------------------------------------------------------------- metrics on masks


def truth_lesions(truth: np.ndarray, merge_voxels: int = 1) -> tuple[np.ndarray, int]:
    """Label the truth mask's lesions: 26-connected components, fragments within `merge_voxels` merged."""
    from .regions import nearby_components

    return nearby_components(truth, merge_voxels)


def lesion_metrics(truth: np.ndarray, flagged: np.ndarray, merge_voxels: int = FINDING_MERGE_VOXELS) -> dict[str, Any]:
    """Lesions found, flagged findings, false-positive findings of one pair (arrays on the same grid).

    Flagged pieces up to 2 x `merge_voxels` apart form one finding, as truth lesions are counted."""
    from .regions import nearby_components

    truth, flagged = truth.astype(bool), flagged.astype(bool)
    lesions, n = truth_lesions(truth)
    found = sorted(int(v) for v in np.unique(lesions[flagged]) if v > 0)
    comps, n_flagged = nearby_components(flagged, merge_voxels)
    hits = np.unique(comps[truth & flagged])
    true_findings = int((hits > 0).sum())
    return {
        "truth_lesions": n,
        "found_lesions": len(found),
        "found_ids": found,
        "flagged_findings": int(n_flagged),
        "false_positive_findings": int(n_flagged - true_findings),
        "true_findings": true_findings,
    }


def f1(sensitivity: float, precision: float) -> float:
    return 0.0 if sensitivity + precision == 0 else 2 * sensitivity * precision / (sensitivity + precision)


def voxel_metrics(truth: np.ndarray, score: np.ndarray, foreground: np.ndarray) -> dict[str, float]:
    """AUROC and average precision of a voxel score for the truth mask, foreground voxels only (nan if no change)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    inside = foreground.astype(bool)
    t = truth.astype(bool)[inside]
    s = np.asarray(score, np.float64)[inside]
    if not t.any() or t.all():
        return {"voxel_auroc": float("nan"), "voxel_ap": float("nan")}
    return {"voxel_auroc": float(roc_auc_score(t, s)), "voxel_ap": float(average_precision_score(t, s))}


def pair_auroc(scores, changed) -> float:
    from sklearn.metrics import roc_auc_score

    scores = np.asarray([(-math.inf if s is None else s) for s in scores], np.float64)
    changed = np.asarray(changed, bool)
    if changed.all() or not changed.any():
        return float("nan")
    return float(roc_auc_score(changed, np.nan_to_num(scores, neginf=-1e9)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / total) if total else float("nan")


# --------------------------------------------------------------------------- truth


@dataclass(frozen=True, eq=False)
class Truth:
    """What really changed at one follow-up, on its own grid."""

    mask: np.ndarray  # bool, numpy order
    lesions: np.ndarray  # int labels of truth lesions (see `truth_lesions`)
    sizes: dict[int, dict]  # per lesion: voxels, id, type, diameter_mm, volume_mm3 (changes.json)
    brain: np.ndarray | None  # the true brain on this grid, where known
    spacing: tuple[float, ...]


def _read_image(path: Path, what: str) -> sitk.Image:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"cannot read the {what}: {str(exc).strip().splitlines()[-1]}") from None
    return sitk.VectorIndexSelectionCast(image, 0) if image.GetNumberOfComponentsPerPixel() > 1 else image


def truth_folder(studies: Path, patient: str, visit: str) -> Path:
    return Path(studies) / "derivatives" / "changes" / patient / visit


def read_truth(studies: Path, patient: str, visit: str) -> tuple[sitk.Image, dict]:
    """(changemask as sitk.Image on the visit's grid, changes.json dict) of one follow-up."""
    folder = truth_folder(studies, patient, visit)
    for name in ("changemask.nii.gz", "changemask.png"):
        path = folder / name
        if path.is_file():
            mask = _read_image(path, "truth mask")
            doc_path = folder / "changes.json"
            try:
                doc = json.loads(doc_path.read_text(encoding="utf-8")) if doc_path.is_file() else {}
            except json.JSONDecodeError as exc:
                raise InputError(doc_path, f"not valid JSON: {exc}") from None
            return mask, doc
    raise InputError(folder, "no changemask.nii.gz or changemask.png: no ground truth for this follow-up")


def brain_truth(studies: Path, patient: str, visit: str) -> sitk.Image | None:
    path = truth_folder(studies, patient, visit) / "brainmask.nii.gz"
    return _read_image(path, "true brain mask") if path.is_file() else None


def _lesion_sizes(lesions: np.ndarray, n: int, doc: dict) -> dict[int, dict]:
    """Match each truth lesion to the nearest change of changes.json (by its centre voxel) for its size/type."""
    out: dict[int, dict] = {}
    changes = doc.get("changes") or []
    for k in range(1, n + 1):
        where = np.argwhere(lesions == k)
        centre = where.mean(0)[::-1]  # numpy order -> (x, y[, z]) index
        best, best_d = None, math.inf
        for c in changes:
            cv = c.get("centre_voxel")
            if cv is None or len(cv) != len(centre):
                continue
            d = float(np.linalg.norm(np.asarray(cv, float) - centre))
            if d < best_d:
                best, best_d = c, d
        out[k] = {"voxels": int(len(where)),
                  "id": best.get("id") if best else None, "type": best.get("type") if best else None,
                  "diameter_mm": best.get("diameter_mm", best.get("diameter_px")) if best else None,  # 2D: pixels
                  "volume_mm3": best.get("volume_mm3") if best else None}
    return out


def load_truth(studies: Path, patient: str, visit: str, grid: sitk.Image) -> Truth:
    import SimpleITK as sitk

    mask_itk, doc = read_truth(studies, patient, visit)
    if tuple(mask_itk.GetSize()) != tuple(grid.GetSize()):
        raise InputError(truth_folder(studies, patient, visit), f"truth mask size {mask_itk.GetSize()} differs from "
                                                                 f"the follow-up's {grid.GetSize()}")
    mask = sitk.GetArrayFromImage(mask_itk) > 0
    lesions, n = truth_lesions(mask)
    brain = brain_truth(studies, patient, visit)
    return Truth(mask, lesions, _lesion_sizes(lesions, n, doc),
                 None if brain is None else sitk.GetArrayFromImage(brain) > 0, tuple(grid.GetSpacing()))


def cohort_tags(studies: Path) -> dict[tuple[str, str], dict]:
    """Tags of every visit from `cohort.json` (benchmarks/cohort.py), by (patient, visit); {} without one."""
    path = Path(studies) / "cohort.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON: {exc}") from None
    out: dict[tuple[str, str], dict] = {}
    for entry in doc.get("patients", []):
        for visit in entry.get("visits", []):
            tags = dict(visit.get("tags") or {})
            tags.setdefault("whole_head", entry.get("whole_head"))
            out[(str(entry.get("patient")), str(visit.get("visit", visit.get("id", ""))))] = tags
    return out


# --------------------------------------------------------------------------- one pair


def method_settings(pipeline: Pipeline, method: str):
    """(encoder settings, scoring settings, trained model or None) of an evaluated method, from the pipeline.
    "model:PATH" is a detector trained by `longitudinal train` (SVM, random forest or Siamese), scored like ours."""
    from .encoding import EncoderSettings

    scoring = pipeline.scoring
    if method.startswith(MODEL_PREFIX):
        from .learned import load_model

        path = Path(method[len(MODEL_PREFIX):])
        trained = load_model(path, pipeline)
        kind = getattr(getattr(trained, "settings", None), "kind", "siamese")
        return pipeline.encoding, dataclasses.replace(scoring, detector=kind, model=path, normative_model=None), trained
    if method == "ours":
        return pipeline.encoding, scoring, None
    if method == "subtraction":
        return pipeline.encoding, dataclasses.replace(scoring, maps=("subtraction",), normative_model=None), None
    if method == "random-encoder":
        enc = pipeline.encoding
        fields = {f.name: getattr(enc, f.name) for f in dataclasses.fields(EncoderSettings)}
        fields.update(name="random", weights=None)
        # a normative model fitted on pretrained features says nothing about random ones: fit within the pair
        return EncoderSettings(**fields), dataclasses.replace(scoring, normative_model=None), None
    raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)}, {MODEL_PREFIX}PATH)")


@dataclass(frozen=True)
class PairJob:
    """One pair to evaluate; picklable (spawned workers get it by value)."""

    studies: Path
    pair: Pair
    pipeline: Pipeline | None  # None: the shipped pipeline that fits the images
    methods: tuple[str, ...]
    tags: dict = field(default_factory=dict)  # the follow-up's cohort tags
    baseline_tags: dict = field(default_factory=dict)


def _found_volumes(truth: Truth, finding_labels: np.ndarray, reported: dict[int, float]) -> list[dict]:
    """For each found truth lesion: the reported volume of the findings that overlap it, against its true volume
    (changes.json; when one finding covers several lesions, their volumes add up)."""
    out = []
    for k, les in truth.sizes.items():
        ids = [int(i) for i in np.unique(finding_labels[truth.lesions == k]) if i > 0]
        if not ids or les.get("volume_mm3") is None:
            continue
        covered = [j for j, other in truth.sizes.items()
                   if np.isin(finding_labels[truth.lesions == j], ids).any()]
        true_mm3 = sum(float(truth.sizes[j]["volume_mm3"] or 0.0) for j in covered)
        got = sum(reported.get(i, 0.0) for i in ids)
        out.append({"lesion": k, "diameter_mm": les.get("diameter_mm"), "true_mm3": true_mm3, "reported_mm3": got,
                    "ratio": got / true_mm3 if true_mm3 > 0 else math.nan})
    return out


def _outside_brain(finding_labels: np.ndarray, brain: np.ndarray | None) -> int | None:
    """Findings with most of their voxels outside the true brain (grown by 2 voxels), or None where unknown."""
    if brain is None:
        return None
    from scipy import ndimage

    grown = ndimage.binary_dilation(brain, iterations=2)
    ids = [int(i) for i in np.unique(finding_labels) if i > 0]
    return sum(1 for i in ids if grown[finding_labels == i].mean() < 0.5)


def evaluate_pair(job: PairJob) -> dict[str, Any]:
    """Every method on one pair: per-method metrics against the truth (one registration shared)."""
    import SimpleITK as sitk

    from .compare import encode_prepared, prepare, score_prepared
    from .masks import foreground_mask, mask_array
    from .pipeline import for_image

    pair = job.pair
    baseline, followup = pair.baseline.load(), pair.followup.load()
    pipeline = job.pipeline or for_image(baseline)
    truth = load_truth(job.studies, pair.patient_id, pair.followup.id, followup.itk)
    foreground = mask_array(foreground_mask(followup.itk, pipeline.masks)) | truth.mask
    clock = time.perf_counter()
    prepared = prepare(baseline, followup, pipeline)
    t_prepare = time.perf_counter() - clock
    row: dict[str, Any] = {
        "patient": pair.patient_id, "visit": pair.followup.id, "changed": bool(truth.mask.any()),
        "truth_voxels": int(truth.mask.sum()), "lesions": list(truth.sizes.values()), "tags": job.tags,
        "baseline_tags": job.baseline_tags, "registration_suspect": bool(prepared.registration.qc.suspect),
        "not_comparable": prepared.reason, "prepare_s": round(t_prepare, 2), "methods": {},
    }
    base_brain = brain_truth(job.studies, pair.patient_id, pair.baseline.id)
    if base_brain is not None and pipeline.masks.brain and prepared.registration.roi is not None:
        row["brain_dice"] = dice(sitk.GetArrayFromImage(prepared.registration.roi) > 0,
                                 sitk.GetArrayFromImage(base_brain) > 0)
    # encoder settings -> (both visits' features, seconds): methods with the same encoder share one encoding,
    # and each is timed as if it had encoded alone
    features: dict = {}
    for method in job.methods:
        encoder_settings, scoring_settings, trained = method_settings(pipeline, method)
        shared, encode_s = None, 0.0
        if "encoder" in scoring_settings.maps and prepared.reason is None and not prepared.identical:
            if encoder_settings not in features:
                clock = time.perf_counter()
                features[encoder_settings] = (encode_prepared(prepared, encoder_settings),
                                              time.perf_counter() - clock)
            shared, encode_s = features[encoder_settings]
        clock = time.perf_counter()
        comparison = score_prepared(prepared, None, encoder_settings, scoring_settings, shared, trained=trained)
        seconds = time.perf_counter() - clock + encode_s
        labels = sitk.GetArrayFromImage(comparison.finding_labels.itk)
        flagged = labels > 0
        change = sitk.GetArrayFromImage(comparison.change_map.itk)
        m = lesion_metrics(truth.mask, flagged)
        m.update(voxel_metrics(truth.mask, change, foreground))
        m["found_diameters_mm"] = [truth.sizes[k]["diameter_mm"] for k in m["found_ids"]]
        m["volumes"] = _found_volumes(truth, labels, {r.id: r.volume_mm3 for r in comparison.findings})
        m["findings_outside_brain"] = _outside_brain(labels, truth.brain)
        m["operating_points"] = {}  # the change map above other thresholds, on the follow-up grid
        for t in OPERATING_THRESHOLDS:
            op = lesion_metrics(truth.mask, (change > t) & foreground)
            m["operating_points"][f"{t:g}"] = {k: op[k] for k in ("found_lesions", "false_positive_findings",
                                                                   "flagged_findings", "true_findings")}
        m.update(progression_score=comparison.progression_score, strongest_change=comparison.strongest_change,
                 progression=bool(comparison.progression),
                 verdict=comparison.verdict, threshold=float(comparison.threshold),
                 false_alarm_rate=float(comparison.false_alarm_rate), seconds=round(seconds + t_prepare, 2),
                 timings_s=comparison.timings_s)
        row["methods"][method] = m
        log.info("%s %s %s: %d/%d lesions, %d false findings, %s", pair.patient_id, pair.followup.id, method,
                 m["found_lesions"], m["truth_lesions"], m["false_positive_findings"], comparison.verdict)
    return row


# --------------------------------------------------------------------------- a set


Select = Callable[[dict], bool]


def _tag(row: dict, key: str, default=None):
    return row.get("tags", {}).get(key, default)


def _spacing_bin(row: dict) -> str | None:
    """The baseline's voxel size (geometric mean), which sets the region grid a pair is scored on."""
    size = row.get("baseline_tags", {}).get("voxel_size_mm")
    if not size:
        return None
    mean = float(np.prod(size)) ** (1.0 / len(size)) if isinstance(size, (list, tuple)) else float(size)
    return "<= 1.15 mm" if mean <= 1.15 else ">= 1.35 mm" if mean >= 1.35 else None


def _cut(row: dict) -> bool:
    return bool((_tag(row, "fov_cut_mm") or 0) > 0 or (row.get("baseline_tags", {}).get("fov_cut_mm") or 0) > 0)


SUBGROUPS: dict[str, Select] = {
    "whole head": lambda r: _tag(r, "whole_head") is True,
    "skull-stripped": lambda r: _tag(r, "whole_head") is False,
    "thick-slice follow-up": lambda r: _tag(r, "thick_slices") is True,
    "cut field of view": _cut,
    "baseline voxels <= 1.15 mm": lambda r: _spacing_bin(r) == "<= 1.15 mm",
    "baseline voxels >= 1.35 mm": lambda r: _spacing_bin(r) == ">= 1.35 mm",
}


def summarise(rows: list[dict], methods: tuple[str, ...]) -> dict[str, dict]:
    out = {}
    for method in methods:
        ms = [(r, r["methods"][method]) for r in rows if method in r["methods"]]
        if not ms:
            continue
        n_truth = sum(m["truth_lesions"] for _, m in ms)
        n_found = sum(m["found_lesions"] for _, m in ms)
        flagged = sum(m["flagged_findings"] for _, m in ms)
        true_f = sum(m["true_findings"] for _, m in ms)
        fp = [m["false_positive_findings"] for _, m in ms]
        fp_stable = [m["false_positive_findings"] for r, m in ms if not r["changed"]]
        sens = n_found / n_truth if n_truth else float("nan")
        precision = true_f / flagged if flagged else (1.0 if n_truth == 0 else 0.0)
        lesions = [(les["diameter_mm"], k + 1 in m["found_ids"]) for r, m in ms for k, les in enumerate(r["lesions"])]
        found_d = [d for d, f in lesions if f and d is not None]
        all_found_from = None  # smallest d with every lesion >= d found
        for d in sorted({d for d, _ in lesions if d is not None}, reverse=True):
            if all(f for dd, f in lesions if dd is not None and dd >= d):
                all_found_from = d
            else:
                break
        aurocs = [m["voxel_auroc"] for _, m in ms if not _nan(m["voxel_auroc"])]
        aps = [m["voxel_ap"] for _, m in ms if not _nan(m["voxel_ap"])]
        ratios = [v["ratio"] for _, m in ms for v in m.get("volumes", [])
                  if (v["diameter_mm"] or 0) >= VOLUME_MIN_DIAMETER_MM and not _nan(v["ratio"])]
        outside = [m["findings_outside_brain"] for _, m in ms if m.get("findings_outside_brain") is not None]
        called = np.array([bool(m["progression"]) for _, m in ms])  # "not comparable" is not a call
        changed = np.array([bool(r["changed"]) for r, _ in ms])
        pair_precision = float((called & changed).sum() / called.sum()) if called.any() else float("nan")
        pair_recall = float((called & changed).sum() / changed.sum()) if changed.any() else float("nan")
        out[method] = {
            "pairs": len(ms),
            "stable_pairs": len(fp_stable),
            "truth_lesions": n_truth,
            "found_lesions": n_found,
            "lesion_sensitivity": sens,
            "lesion_precision": precision,
            "lesion_f1": f1(sens if n_truth else 0.0, precision),
            "false_positives_per_pair": float(np.mean(fp)),
            "false_positives_per_stable_pair": float(np.mean(fp_stable)) if fp_stable else float("nan"),
            "voxel_auroc_mean": float(np.mean(aurocs)) if aurocs else float("nan"),
            "voxel_ap_mean": float(np.mean(aps)) if aps else float("nan"),
            "pair_auroc": pair_auroc([m["progression_score"] for _, m in ms], [r["changed"] for r, _ in ms]),
            "pair_auroc_strongest_change": pair_auroc([m.get("strongest_change") for _, m in ms],
                                                      [r["changed"] for r, _ in ms]),
            "pairs_called_progression": int(called.sum()),
            "pair_accuracy": float((called == changed).mean()),
            "pair_recall": pair_recall,
            "pair_precision": pair_precision,
            "pair_f1": f1(0.0 if math.isnan(pair_recall) else pair_recall,
                          0.0 if math.isnan(pair_precision) else pair_precision),
            "pairs_not_comparable": int(sum(m.get("verdict") == "not comparable" for _, m in ms)),
            "volume_checked": len(ratios),
            "volume_within_tolerance": float(np.mean([abs(q - 1) <= VOLUME_TOLERANCE for q in ratios]))
            if ratios else float("nan"),
            "volume_ratio_median": float(np.median(ratios)) if ratios else float("nan"),
            "findings_outside_brain": int(sum(outside)) if outside else None,
            "smallest_found_diameter_mm": min(found_d) if found_d else None,
            "all_found_from_diameter_mm": all_found_from,
            "seconds_per_pair_mean": float(np.mean([m["seconds"] for _, m in ms])),
            "operating_points": _operating_summary(rows, method),
        }
    return out


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _operating_summary(rows: list[dict], method: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    ms = [(r, r["methods"][method]) for r in rows if "operating_points" in r["methods"].get(method, {})]
    for t in OPERATING_THRESHOLDS:
        key = f"{t:g}"
        ops = [(r, m["operating_points"][key]) for r, m in ms if key in m["operating_points"]]
        if not ops:
            continue
        n_truth = sum(m["truth_lesions"] for _, m in ms)
        found = sum(o["found_lesions"] for _, o in ops)
        fp = [o["false_positive_findings"] for _, o in ops]
        fp_stable = [o["false_positive_findings"] for r, o in ops if not r["changed"]]
        out[key] = {"lesion_sensitivity": found / n_truth if n_truth else float("nan"),
                    "false_positives_per_pair": float(np.mean(fp)),
                    "false_positives_per_stable_pair": float(np.mean(fp_stable)) if fp_stable else float("nan")}
    return out


def calibration_table(rows: list[dict], method: str = "ours") -> list[dict]:
    """False findings on stable pairs by voxel size and field of view, with the setting they should match."""
    out = []
    stable = [r for r in rows if not r["changed"] and method in r["methods"]]
    for size in ("<= 1.15 mm", ">= 1.35 mm", None):
        for cut in (False, True, None):
            group = [r for r in stable if (size is None or _spacing_bin(r) == size) and (cut is None or _cut(r) == cut)]
            if not group:
                continue
            fp = [r["methods"][method]["false_positive_findings"] for r in group]
            out.append({"voxels": size or "all", "cut_fov": "all" if cut is None else ("yes" if cut else "no"),
                        "stable_pairs": len(group), "false_findings_per_pair": float(np.mean(fp))})
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def _summary_table(title: str, s: dict[str, dict]) -> list[str]:
    lines = [f"### {title}", "",
             "| method | pairs (stable) | lesions found | sensitivity | precision | FP / pair | FP / stable pair | "
             "lesion F1 | pair accuracy / recall / precision / F1 | pair AUROC | pair AUROC, strongest change | "
             "volume within 30 % | outside brain | not comparable | voxel AUROC | s / pair |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, m in s.items():
        lines.append(
            f"| {method} | {m['pairs']} ({m['stable_pairs']}) | {m['found_lesions']}/{m['truth_lesions']} | "
            f"{_fmt(m['lesion_sensitivity'])} | {_fmt(m['lesion_precision'])} | {_fmt(m['false_positives_per_pair'])} | "
            f"{_fmt(m['false_positives_per_stable_pair'])} | {_fmt(m['lesion_f1'])} | "
            f"{' / '.join(_fmt(m[k]) for k in ('pair_accuracy', 'pair_recall', 'pair_precision', 'pair_f1'))} | "
            f"{_fmt(m['pair_auroc'])} | {_fmt(m.get('pair_auroc_strongest_change', math.nan))} | "
            f"{_fmt(m['volume_within_tolerance'])} (n={m['volume_checked']}) | {_fmt(m['findings_outside_brain'])} | "
            f"{m['pairs_not_comparable']} | {_fmt(m['voxel_auroc_mean'])} | {_fmt(m['seconds_per_pair_mean'])} |")
    return lines + [""]


def summary_markdown(doc: dict) -> str:
    s = doc["summary"]
    lines = [f"# Evaluation of {doc['studies']}", "",
             f"pipeline `{doc['pipeline']}`, {doc['pairs']} pairs ({doc['stable_pairs']} stable)"
             + (f", brain extraction Dice {_fmt(doc['brain_dice_mean'])} (min {_fmt(doc['brain_dice_min'])})"
                if doc.get("brain_dice_mean") is not None else "")
             + f", registration QC passed on {doc['registration_ok']}/{doc['pairs']}", ""]
    lines += _summary_table("All pairs", s)
    for name, sub in doc.get("subgroups", {}).items():
        lines += _summary_table(name, sub)
    lines += ["## Calibration on stable pairs (method ours)", "",
              "| voxels | cut field of view | stable pairs | false findings per pair |", "|---|---|---|---|"]
    lines += [f"| {c['voxels']} | {c['cut_fov']} | {c['stable_pairs']} | {_fmt(c['false_findings_per_pair'])} |"
              for c in doc.get("calibration", [])]
    lines += ["", "## Operating points (change map above -log10 p = t; sensitivity / FP per pair / FP per stable pair)",
              "", "| method | " + " | ".join(f"t = {t:g}" for t in OPERATING_THRESHOLDS) + " |",
              "|---|" + "---|" * len(OPERATING_THRESHOLDS)]
    for method, m in s.items():
        ops = m.get("operating_points") or {}
        cells = []
        for t in OPERATING_THRESHOLDS:
            o = ops.get(f"{t:g}")
            cells.append("-" if o is None else f"{_fmt(o['lesion_sensitivity'])} / {_fmt(o['false_positives_per_pair'])}"
                                               f" / {_fmt(o['false_positives_per_stable_pair'])}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "## Pairs", "", "| patient | visit | truth lesions (diameter mm) | method | found | FP | score | "
              "verdict | voxel AUROC |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        diam = ", ".join(_fmt(les["diameter_mm"]) for les in r["lesions"]) or "none"
        for method, m in r["methods"].items():
            lines.append(f"| {r['patient']} | {r['visit']} | {len(r['lesions'])} ({diam}) | {method} | "
                         f"{m['found_lesions']} | {m['false_positive_findings']} | {_fmt(m['progression_score'])} | "
                         f"{m.get('verdict', '-')} | {_fmt(m['voxel_auroc'])} |")
    return "\n".join(lines) + "\n"


def evaluate(studies: str | os.PathLike, out: str | os.PathLike, pipeline: str | None = None, jobs: int = 1,
             methods: tuple[str, ...] = METHODS, patients: tuple[str, ...] | None = None) -> dict:
    """Evaluate every follow-up-vs-first-visit pair under `studies`; writes OUT/metrics.json and OUT/summary.md."""
    from .pipeline import load
    from .timeline import discover, pairs

    studies, out = Path(studies), Path(out)
    for m in methods:
        if m not in METHODS and not (m.startswith(MODEL_PREFIX) and Path(m[len(MODEL_PREFIX):]).is_file()):
            raise InputError(None, f"unknown method {m!r} (known: {', '.join(METHODS)}, or {MODEL_PREFIX}PATH of a "
                                   "model file)")
    pipe = load(pipeline) if pipeline else None
    tags = cohort_tags(studies)
    todo = []
    for patient in discover(studies):
        if patients and patient.id not in patients:
            continue
        for pair in pairs(patient):
            todo.append(PairJob(studies, pair, pipe, tuple(methods), tags.get((patient.id, pair.followup.id), {}),
                                tags.get((patient.id, pair.baseline.id), {})))
    if not todo:
        raise InputError(studies, "no follow-up visits to evaluate")
    out.mkdir(parents=True, exist_ok=True)
    if jobs > 1:
        from .batch import init_worker

        context = multiprocessing.get_context("spawn")  # no fork: torch and ITK thread pools do not survive it
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=init_worker) as pool:
            rows = list(pool.map(evaluate_pair, todo))
    else:
        rows = [evaluate_pair(j) for j in todo]
    summary = summarise(rows, tuple(methods))
    subgroups = {}
    for name, select in SUBGROUPS.items():
        chosen = [r for r in rows if select(r)]
        if chosen and len(chosen) < len(rows):
            subgroups[name] = summarise(chosen, tuple(methods))
    brain = [r["brain_dice"] for r in rows if r.get("brain_dice") is not None]
    doc = {"studies": str(studies), "pipeline": pipeline or "auto", "pairs": len(rows),
           "stable_pairs": sum(not r["changed"] for r in rows),
           "registration_ok": sum(not r["registration_suspect"] for r in rows),
           "brain_dice_mean": float(np.mean(brain)) if brain else None,
           "brain_dice_min": float(np.min(brain)) if brain else None,
           "methods": list(methods), "summary": summary, "subgroups": subgroups,
           "calibration": calibration_table(rows) if "ours" in methods else [], "rows": rows}
    doc = jsonable(doc)
    atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(out / "summary.md", summary_markdown(_restore_nan(doc)))
    return doc


def _restore_nan(doc):
    if isinstance(doc, dict):
        return {k: _restore_nan(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_restore_nan(v) for v in doc]
    return doc


# --------------------------------------------------------------------------- normative model


def fit_normative(studies: str | os.PathLike, out: str | os.PathLike, pipeline: str | None = None,
                  patients: tuple[str, ...] | None = None):
    """Fit a ChangeDetector on the region features of every pair under `studies` (all declared stable)."""
    from .compare import encode_prepared, prepare, region_features_prepared
    from .pipeline import for_image, load
    from .scoring import ChangeDetector
    from .timeline import discover, pairs

    rows, names, settings = [], None, None
    chosen = load(pipeline) if pipeline else None
    for patient in discover(studies):
        if patients and patient.id not in patients:
            continue
        for pair in pairs(patient):
            baseline, followup = pair.baseline.load(), pair.followup.load()
            pl = chosen or for_image(baseline)
            settings = dataclasses.replace(pl.scoring, normative_model=None)
            prepared = prepare(baseline, followup, pl)
            if prepared.reason is not None:
                log.warning("normative: a pair is not comparable (%s); left out", prepared.reason)
                continue
            fb = ff = None
            if "encoder" in settings.maps:
                fb, ff, _ = encode_prepared(prepared)
            X, names, _, _, _ = region_features_prepared(prepared, settings, fb, ff)
            rows.append(X)
            log.info("normative: %d regions from one pair", len(X))
    if not rows:
        raise InputError(Path(studies), "no pairs to fit a normative model on")
    detector = ChangeDetector(settings).fit(np.concatenate(rows), names)
    detector.save(out)
    return detector


# --------------------------------------------------------------------------- command line


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("studies", metavar="STUDIES", type=Path, help="folder of studies with derivatives/changes truth")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (metrics.json, summary.md)")
    p.add_argument("--pipeline", help="pipeline name or file (default: chosen from the images)")
    p.add_argument("--jobs", type=int, default=1, help="pairs evaluated in parallel (default 1)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}, and model:PATH for a model trained by "
                        "`longitudinal train`")
    p.add_argument("--patients", help="comma-separated patient ids (default: all)")


def evaluate_command(args: argparse.Namespace) -> int:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    patients = tuple(args.patients.split(",")) if args.patients else None
    doc = evaluate(args.studies, args.out, args.pipeline, max(1, args.jobs), methods, patients)
    print(summary_markdown(_restore_nan(doc)), end="")
    return 0


def fit_normative_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("studies", metavar="STUDIES", type=Path, help="folder of studies whose pairs are all stable")
    p.add_argument("-o", "--out", type=Path, required=True,
                   help="model file to write (e.g. model.npz; arrays and JSON, never a pickle)")
    p.add_argument("--pipeline", help="pipeline name or file (default: chosen from the images)")
    p.add_argument("--patients", help="comma-separated patient ids (default: all)")


def fit_normative_command(args: argparse.Namespace) -> int:
    patients = tuple(args.patients.split(",")) if args.patients else None
    detector = fit_normative(args.studies, args.out, args.pipeline, patients)
    print(f"normative model fitted on {detector.n_fit_} regions: {args.out}")
    return 0
