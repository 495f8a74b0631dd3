"""Evaluation against ground truth: is what we flag what really changed, and is it better than the baselines?

Every follow-up of every patient in a folder of studies is compared with the patient's first visit. Truth is
read from `<studies>/derivatives/changes/<patient>/<visit>/changemask.(nii.gz|png)` (+ `changes.json` for lesion
sizes), on the follow-up's own grid, which is also where our flagged mask and change map are measured. One
registration per pair is shared by all methods:

- "ours": the pipeline as configured (pretrained encoder + intensity change maps);
- "subtraction": |F - B| after the same harmonisation as the detector's only feature (same regions, detector,
  calibration and threshold), i.e. plain subtraction given every other advantage;
- "random-encoder": the pipeline with the encoder's weights replaced by a random initialisation.

Metrics (per pair and pooled per method): lesion-wise sensitivity (a truth component is found when a flagged
voxel overlaps it; fragments within 1 voxel are one lesion), false-positive findings (connected components of
the flagged mask that touch no truth voxel) per pair and per stable pair, lesion-wise F1, voxel AUROC and
average precision of the change map inside the follow-up's foreground, pair-level AUROC (progression score vs
any truth change), smallest truth change found.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .io import atomic_write_text
from .report import jsonable

log = logging.getLogger(__name__)

METHODS = ("ours", "subtraction", "random-encoder")
OPERATING_THRESHOLDS = (3.0, 4.0, 5.0, 6.0, 8.0, 10.0)  # -log10 p, i.e. false-alarm rates 1e-3 ... 1e-10
FINDING_MERGE_VOXELS = 1  # flagged pieces up to 2 voxels apart are one finding (compare.FINDING_MERGE_MM at 1.5 mm)


# --------------------------------------------------------------------------- metrics on masks


def truth_lesions(truth: np.ndarray, merge_voxels: int = 1) -> tuple[np.ndarray, int]:
    """Label the truth mask's lesions: 26-connected components, fragments within `merge_voxels` merged."""
    from .regions import nearby_components

    return nearby_components(truth, merge_voxels)


def lesion_metrics(truth: np.ndarray, flagged: np.ndarray, merge_voxels: int = FINDING_MERGE_VOXELS) -> dict[str, Any]:
    """Lesions found, flagged findings, false-positive findings of one pair (arrays on the same grid).

    Flagged pieces up to 2 x `merge_voxels` apart form one finding, as `compare` reports them
    (a flagged cube's tissue is often cut in two by a sulcus; those pieces are one finding, not two)."""
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

    changed = np.asarray(changed, bool)
    if changed.all() or not changed.any():
        return float("nan")
    return float(roc_auc_score(changed, np.asarray(scores, np.float64)))


# --------------------------------------------------------------------------- truth


def read_truth(studies: Path, patient: str, visit: str):
    """(changemask as sitk.Image on the visit's grid, changes.json dict) of one follow-up."""
    import SimpleITK as sitk

    folder = Path(studies) / "derivatives" / "changes" / patient / visit
    for name in ("changemask.nii.gz", "changemask.png"):
        path = folder / name
        if path.is_file():
            try:
                mask = sitk.ReadImage(str(path))
            except RuntimeError as exc:
                raise InputError(path, f"cannot read the truth mask: {exc}") from None
            if mask.GetNumberOfComponentsPerPixel() > 1:
                mask = sitk.VectorIndexSelectionCast(mask, 0)
            doc_path = folder / "changes.json"
            try:
                doc = json.loads(doc_path.read_text(encoding="utf-8")) if doc_path.is_file() else {}
            except json.JSONDecodeError as exc:
                raise InputError(doc_path, f"not valid JSON: {exc}") from None
            return mask, doc
    raise InputError(folder, "no changemask.nii.gz or changemask.png: no ground truth for this follow-up")


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
                  "diameter_mm": best.get("diameter_mm", best.get("diameter_px")) if best else None}  # 2D: pixels
    return out


# --------------------------------------------------------------------------- one pair


def method_settings(pipeline, method: str):
    """(encoder settings, scoring settings) of an evaluated method, derived from the pipeline."""
    from .encoding import EncoderSettings

    scoring = pipeline.scoring
    if method == "ours":
        return pipeline.encoding, scoring
    if method == "subtraction":
        return pipeline.encoding, dataclasses.replace(scoring, maps=("subtraction",), normative_model=None)
    if method == "random-encoder":
        enc = pipeline.encoding
        fields = {f.name: getattr(enc, f.name) for f in dataclasses.fields(EncoderSettings)}
        fields.update(name="random", weights=None)
        # a normative model fitted on pretrained features says nothing about random ones: fit within the pair
        return EncoderSettings(**fields), dataclasses.replace(scoring, normative_model=None)
    raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")


def evaluate_pair(studies: Path, patient: str, baseline_path: Path, followup_path: Path, visit: str,
                  pipeline_name: str | None, methods: tuple[str, ...]) -> dict[str, Any]:
    """Every method on one pair: per-method metrics against the truth (one registration shared)."""
    import SimpleITK as sitk

    from .compare import prepare, score_prepared
    from .io import load_image
    from .pipeline import for_image, load
    from .masks import foreground_mask, mask_array

    truth_itk, doc = read_truth(studies, patient, visit)
    baseline, followup = load_image(baseline_path), load_image(followup_path)
    pipeline = load(pipeline_name) if pipeline_name else for_image(baseline)
    if tuple(truth_itk.GetSize()) != tuple(followup.itk.GetSize()):
        raise InputError(followup_path, f"truth mask size {truth_itk.GetSize()} differs from the follow-up's "
                                        f"{followup.itk.GetSize()}")
    truth = sitk.GetArrayFromImage(truth_itk) > 0
    lesions, n = truth_lesions(truth)
    sizes = _lesion_sizes(lesions, n, doc)
    foreground = mask_array(foreground_mask(followup.itk, pipeline.masks)) | truth
    clock = time.perf_counter()
    prepared = prepare(baseline, followup, pipeline)
    t_prepare = time.perf_counter() - clock
    row: dict[str, Any] = {"patient": patient, "visit": visit, "changed": bool(truth.any()),
                           "truth_voxels": int(truth.sum()), "lesions": list(sizes.values()),
                           "registration_suspect": bool(prepared.registration.qc.suspect),
                           "prepare_s": round(t_prepare, 2), "methods": {}}
    for method in methods:
        encoder_settings, scoring_settings = method_settings(pipeline, method)
        clock = time.perf_counter()
        comparison = score_prepared(prepared, None, encoder_settings, scoring_settings)
        seconds = time.perf_counter() - clock
        flagged = sitk.GetArrayFromImage(comparison.flagged_mask.itk) > 0
        change = sitk.GetArrayFromImage(comparison.change_map.itk)
        m = lesion_metrics(truth, flagged)
        m.update(voxel_metrics(truth, change, foreground))
        m["found_diameters_mm"] = [sizes[k]["diameter_mm"] for k in m["found_ids"]]
        # the same pair at other thresholds (change map > t on the follow-up grid: an operating curve)
        m["operating_points"] = {}
        for t in OPERATING_THRESHOLDS:
            op = lesion_metrics(truth, (change > t) & foreground)
            m["operating_points"][f"{t:g}"] = {k: op[k] for k in ("found_lesions", "false_positive_findings",
                                                                   "flagged_findings", "true_findings")}
        m["progression_score"] = float(comparison.progression_score)
        m["progression"] = bool(comparison.progression)
        m["threshold"] = float(comparison.threshold)
        m["seconds"] = round(seconds + t_prepare, 2)
        m["timings_s"] = comparison.timings_s
        row["methods"][method] = m
        log.info("%s %s %s: %d/%d lesions, %d false findings, score %.2f", patient, visit, method,
                 m["found_lesions"], m["truth_lesions"], m["false_positive_findings"], m["progression_score"])
    return row


# --------------------------------------------------------------------------- a set


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
        aurocs = [m["voxel_auroc"] for _, m in ms if not math.isnan(m["voxel_auroc"])]
        aps = [m["voxel_ap"] for _, m in ms if not math.isnan(m["voxel_ap"])]
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
            "pairs_called_progression": int(sum(m["progression"] for _, m in ms)),
            "smallest_found_diameter_mm": min(found_d) if found_d else None,
            "all_found_from_diameter_mm": all_found_from,
            "seconds_per_pair_mean": float(np.mean([m["seconds"] for _, m in ms])),
            "operating_points": _operating_summary(rows, method),
        }
    return out


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


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def summary_markdown(doc: dict) -> str:
    s = doc["summary"]
    lines = [f"# Evaluation of {doc['studies']}", "",
             f"pipeline `{doc['pipeline']}`, {doc['pairs']} pairs ({doc['stable_pairs']} stable), "
             f"threshold -log10(false-alarm rate) = {_fmt(doc['threshold'])}", "",
             "| method | lesions found | sensitivity | FP / pair | FP / stable pair | lesion F1 | voxel AUROC | voxel AP "
             "| pair AUROC | smallest found (mm) | all found from (mm) | s / pair |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, m in s.items():
        lines.append(f"| {method} | {m['found_lesions']}/{m['truth_lesions']} | {_fmt(m['lesion_sensitivity'])} | "
                     f"{_fmt(m['false_positives_per_pair'])} | {_fmt(m['false_positives_per_stable_pair'])} | "
                     f"{_fmt(m['lesion_f1'])} | {_fmt(m['voxel_auroc_mean'])} | {_fmt(m['voxel_ap_mean'])} | "
                     f"{_fmt(m['pair_auroc'])} | {_fmt(m['smallest_found_diameter_mm'])} | "
                     f"{_fmt(m['all_found_from_diameter_mm'])} | {_fmt(m['seconds_per_pair_mean'])} |")
    lines += ["", "## Operating points (change map above -log10 p = t; sensitivity / FP per pair / FP per stable pair)", "",
              "| method | " + " | ".join(f"t = {t:g}" for t in OPERATING_THRESHOLDS) + " |",
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
              "flagged | voxel AUROC |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        diam = ", ".join(_fmt(les["diameter_mm"]) for les in r["lesions"]) or "none"
        for method, m in r["methods"].items():
            lines.append(f"| {r['patient']} | {r['visit']} | {len(r['lesions'])} ({diam}) | {method} | "
                         f"{m['found_lesions']} | {m['false_positive_findings']} | {_fmt(m['progression_score'])} | "
                         f"{'yes' if m['progression'] else 'no'} | {_fmt(m['voxel_auroc'])} |")
    return "\n".join(lines) + "\n"


def evaluate(studies: str | os.PathLike, out: str | os.PathLike, pipeline: str | None = None, jobs: int = 1,
             methods: tuple[str, ...] = METHODS, patients: tuple[str, ...] | None = None) -> dict:
    """Evaluate every follow-up-vs-first-visit pair under `studies`; writes OUT/metrics.json and OUT/summary.md."""
    from .timeline import discover, pairs

    studies, out = Path(studies), Path(out)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    jobs_list = []
    for patient in discover(studies):
        if patients and patient.id not in patients:
            continue
        for pair in pairs(patient):
            jobs_list.append((studies, patient.id, pair.baseline.path, pair.followup.path, pair.followup.id,
                              pipeline, tuple(methods)))
    if not jobs_list:
        raise InputError(studies, "no follow-up visits to evaluate")
    out.mkdir(parents=True, exist_ok=True)
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            rows = list(pool.map(_evaluate_job, jobs_list))
    else:
        rows = [_evaluate_job(j) for j in jobs_list]
    summary = summarise(rows, tuple(methods))
    threshold = next((m["threshold"] for r in rows for m in r["methods"].values()), float("nan"))
    doc = {"studies": str(studies), "pipeline": pipeline or "auto", "pairs": len(rows),
           "stable_pairs": sum(not r["changed"] for r in rows), "threshold": threshold,
           "methods": list(methods), "summary": summary, "rows": rows}
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


def _evaluate_job(args) -> dict:
    return evaluate_pair(*args)


# --------------------------------------------------------------------------- normative model


def fit_normative(studies: str | os.PathLike, out: str | os.PathLike, pipeline: str | None = None,
                  patients: tuple[str, ...] | None = None):
    """Fit a ChangeDetector on the region features of every pair under `studies` (all declared stable)."""
    from .compare import encode_prepared, prepare, region_features_prepared
    from .io import load_image
    from .pipeline import for_image, load
    from .scoring import ChangeDetector
    from .timeline import discover, pairs

    rows, names, settings = [], None, None
    for patient in discover(studies):
        if patients and patient.id not in patients:
            continue
        for pair in pairs(patient):
            baseline, followup = load_image(pair.baseline.path), load_image(pair.followup.path)
            pl = load(pipeline) if pipeline else for_image(baseline)
            settings = dataclasses.replace(pl.scoring, normative_model=None)
            prepared = prepare(baseline, followup, pl)
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
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--patients", help="comma-separated patient ids (default: all)")


def evaluate_command(args: argparse.Namespace) -> int:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    patients = tuple(args.patients.split(",")) if args.patients else None
    doc = evaluate(args.studies, args.out, args.pipeline, max(1, args.jobs), methods, patients)
    print(summary_markdown(_restore_nan(doc)), end="")
    return 0


def fit_normative_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("studies", metavar="STUDIES", type=Path, help="folder of studies whose pairs are all stable")
    p.add_argument("-o", "--out", type=Path, required=True, help="model file to write (e.g. model.npz; arrays and JSON, never a pickle)")
    p.add_argument("--pipeline", help="pipeline name or file (default: chosen from the images)")
    p.add_argument("--patients", help="comma-separated patient ids (default: all)")


def fit_normative_command(args: argparse.Namespace) -> int:
    patients = tuple(args.patients.split(",")) if args.patients else None
    detector = fit_normative(args.studies, args.out, args.pipeline, patients)
    print(f"normative model fitted on {detector.n_fit_} regions: {args.out}")
    return 0
