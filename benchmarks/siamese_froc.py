"""Free-response operating curve of a Siamese change detector's own voxel probability.

    python benchmarks/siamese_froc.py COHORT MODEL -o OUT.json [--extent E] [--patients P1,P2] [--jobs N]
        [--pipeline NAME]

For every follow-up-vs-first-visit pair of COHORT (found as `longitudinal evaluate` finds them: timeline
`discover` + `pairs`, `Visit.load()`), the pair is prepared once (`compare.prepare`, pipeline `brain-mri` by
default, the model set on its scoring settings as `evaluation.method_settings(pipeline, "model:MODEL")` does)
and the Siamese probability map is computed once (`learned.change_probability`, baseline grid). Then, for each
threshold t:

- pieces = 26-connected components of (probability >= t) inside `compare.scored_mask(prepared.mask, spacing,
  scoring.edge_margin_mm)`, on the baseline grid; pieces smaller than `scoring.min_volume_mm3` (baseline voxel
  volume) are dropped (as `findings.outline` does with its evidence pieces);
- the kept pieces are carried to the follow-up's own grid with the registration's inverse and nearest neighbour
  (as `compare.score_prepared` carries finding labels there) and compared with the truth there, as `longitudinal
  evaluate` does. Truth lesions are `evaluation.load_truth`'s labels (26-connected, pieces within 2 voxels
  merged, the labelling `evaluate` uses);
- found: truth lesions with any voxel of a kept piece; false findings: kept pieces with no voxel on a truth
  voxel. Also given, as `evaluate` would count a flagged mask made of the same voxels
  (`evaluation.lesion_metrics`: flagged pieces within 2 voxels merged into one finding): `fp_merged`.
  Per lesion and threshold, `largest_piece_mm3`: the largest piece >= t touching it before the volume floor
  (0: none), which says why a lesion whose max probability passes t is still not found.
- `--extent E` (what `findings.outline` does with `evidence_extent`): a piece is then the component of
  (probability >= E) whose peak reaches t, so a piece can reach into a lesion whose own maximum is under t.

Per truth lesion: the maximum probability inside it (on the follow-up grid, the probability carried there by
nearest neighbour), anywhere and inside the scored mask only. Per pair: the maximum probability inside the
scored mask, outside every truth lesion dilated by 2 voxels (26-neighbourhood).

Pairs that cannot be compared (`prepared.reason`) are listed and left out of every total; so are pairs that
failed with an error (listed with the error; the exit status is then 1). Nothing is written but OUT.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999)
OUTSIDE_DILATION_VOXELS = 2

log = logging.getLogger("siamese_froc")


@dataclasses.dataclass(frozen=True)
class Job:
    studies: Path
    pair: object  # timeline.Pair
    model: Path
    pipeline: str
    extent: float | None = None


_MODELS: dict = {}  # per process, in memory only: (pipeline name, model path) -> (pipeline, scoring, model)


def _setup(pipeline_name: str, model_path: Path):
    key = (pipeline_name, str(model_path))
    if key not in _MODELS:
        from longitudinal.evaluation import MODEL_PREFIX, method_settings
        from longitudinal.pipeline import load

        pipeline = load(pipeline_name)
        _, scoring, trained = method_settings(pipeline, MODEL_PREFIX + str(model_path))
        if scoring.detector != "siamese":
            raise SystemExit(f"{model_path}: a {scoring.detector} model, not a Siamese one")
        _MODELS[key] = (pipeline, scoring, trained)
    return _MODELS[key]


def _source_index(prepared) -> np.ndarray:
    """For every follow-up voxel (numpy order): the flat index of the baseline voxel nearest neighbour resampling
    with the registration's inverse takes it from, -1 outside the baseline grid. Indexing a baseline array with
    it is `registration.to_moving(array, followup, sitkNearestNeighbor, 0)`, for any number of arrays at once."""
    import SimpleITK as sitk

    base = prepared.baseline.itk
    n = int(np.prod(base.GetSize()))
    if n >= 2**31 - 1:
        raise ValueError("baseline grid too large for an int32 index")
    idx = sitk.GetImageFromArray(np.arange(n, dtype=np.int32).reshape(tuple(reversed(base.GetSize()))))
    idx.CopyInformation(base)
    out = prepared.registration.to_moving(idx, prepared.followup.itk, sitk.sitkNearestNeighbor, -1)
    return sitk.GetArrayFromImage(out).astype(np.int64)


def _carry(array: np.ndarray, src: np.ndarray, fill=0):
    flat = array.ravel()
    return np.where(src >= 0, flat[np.maximum(src, 0)], fill)


def run_pair(job: Job) -> dict:
    from scipy import ndimage

    from longitudinal.compare import prepare, scored_mask
    from longitudinal.evaluation import FINDING_MERGE_VOXELS, load_truth
    from longitudinal.regions import nearby_components
    from longitudinal.learned import change_probability

    pair = job.pair
    row: dict = {"patient": pair.patient_id, "baseline": pair.baseline.id, "visit": pair.followup.id}
    try:
        pipeline, scoring, model = _setup(job.pipeline, job.model)
        clock = time.perf_counter()
        baseline, followup = pair.baseline.load(), pair.followup.load()
        truth = load_truth(job.studies, pair.patient_id, pair.followup.id, followup.itk)
        n_lesions = int(truth.lesions.max(initial=0))
        row.update(changed=bool(truth.mask.any()), truth_lesions=n_lesions, truth_voxels=int(truth.mask.sum()))
        prepared = prepare(baseline, followup, pipeline)
        row["prepare_s"] = round(time.perf_counter() - clock, 2)
        if prepared.reason is not None:
            row["skipped"] = f"not comparable: {prepared.reason}"
            return row
        spacing_zyx = tuple(reversed(prepared.baseline.spacing))
        voxel_mm3 = float(np.prod(spacing_zyx))
        scored = scored_mask(np.asarray(prepared.mask, bool), spacing_zyx, scoring.edge_margin_mm)
        clock = time.perf_counter()
        if prepared.identical:  # evaluate flags nothing on a scan given twice
            prob = np.zeros(scored.shape, np.float32)
            row["identical"] = True
        else:
            prob = change_probability(model, prepared).probability
        row["probability_s"] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

        src = _source_index(prepared)  # follow-up grid -> baseline voxel
        prob_f = _carry(prob, src, 0.0).astype(np.float32)
        scored_f = _carry(scored, src, False).astype(bool)
        lesions = truth.lesions
        structure = np.ones((3,) * scored.ndim, bool)

        grown = ndimage.binary_dilation(truth.mask, structure, iterations=OUTSIDE_DILATION_VOXELS) \
            if truth.mask.any() else truth.mask
        outside = scored_f & ~grown
        row["max_prob_outside_lesions"] = float(prob_f[outside].max()) if outside.any() else None
        row["max_prob_scored_baseline_grid"] = float(prob[scored].max()) if scored.any() else None
        row["scored_voxels"] = int(scored.sum())

        per_lesion = []
        for k in range(1, n_lesions + 1):
            inside = lesions == k
            info = truth.sizes.get(k, {})
            in_scored = inside & scored_f
            per_lesion.append({
                "lesion": k, "id": info.get("id"), "type": info.get("type"),
                "diameter_mm": info.get("diameter_mm"), "volume_mm3": info.get("volume_mm3"),
                "voxels": int(inside.sum()), "voxels_in_scored_mask": int(in_scored.sum()),
                "max_prob": float(prob_f[inside].max()),
                "max_prob_in_scored_mask": float(prob_f[in_scored].max()) if in_scored.any() else None,
                "found_at": [], "largest_piece_mm3": {},
            })

        ops = {}
        if job.extent is not None:  # hysteresis: pieces at the extent level whose peak reaches t
            low, n_low = ndimage.label((prob >= job.extent) & scored, structure)
            peaks = np.concatenate([[0.0], ndimage.maximum(prob, low, np.arange(1, n_low + 1))]) if n_low else np.zeros(1)
        for t in THRESHOLDS:
            if job.extent is not None:
                pieces, n = ndimage.label(np.isin(low, np.flatnonzero(peaks >= t)) & (low > 0), structure)
            else:
                above = (prob >= t) & scored
                pieces, n = ndimage.label(above, structure)
            sizes = np.concatenate([[0.0], np.bincount(pieces.ravel(), minlength=n + 1)[1:] * voxel_mm3])
            keep = np.zeros(n + 1, np.int32)
            kept = np.flatnonzero(sizes[1:] >= scoring.min_volume_mm3)
            keep[kept + 1] = np.arange(1, len(kept) + 1)
            n_kept = len(kept)
            pieces_f = _carry(pieces, src, 0)  # every piece, before the volume floor, on the follow-up grid
            labels_f = keep[pieces_f]
            flagged = labels_f > 0
            found = sorted(int(v) for v in np.unique(lesions[flagged]) if v > 0)
            touching = int(np.count_nonzero(np.unique(labels_f[truth.mask]) > 0))
            present = int(np.count_nonzero(np.unique(labels_f) > 0))
            # as evaluation.lesion_metrics counts a flagged mask: pieces within 2 voxels are one finding
            comps, n_merged = nearby_components(flagged, FINDING_MERGE_VOXELS)
            hits = int(np.count_nonzero(np.unique(comps[truth.mask & flagged]) > 0))
            ops[f"{t:g}"] = {
                "components": int(n), "kept": n_kept, "found": len(found), "found_ids": found,
                "true_components": touching, "false_findings": n_kept - touching,
                "kept_absent_on_followup_grid": n_kept - present,
                "fp_merged": int(n_merged) - hits,
            }
            for k in found:
                per_lesion[k - 1]["found_at"].append(t)
            for k, les in enumerate(per_lesion, start=1):  # the largest piece >= t touching it, before the floor
                ids = np.unique(pieces_f[lesions == k])
                les["largest_piece_mm3"][f"{t:g}"] = round(float(sizes[ids].max()), 2)
        for les in per_lesion:  # found at t needs a voxel >= t of the scored mask inside it (without --extent)
            m = les["max_prob_in_scored_mask"]
            les["inconsistent"] = job.extent is None and any(m is None or m < t for t in les["found_at"])
            les["above_but_not_found"] = [t for t in THRESHOLDS if m is not None and m >= t and t not in les["found_at"]]
        row.update(lesions=per_lesion, operating_points=ops, count_s=round(time.perf_counter() - clock, 2))
    except Exception as exc:  # one bad pair is listed, not fatal
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()
    return row


def _init_worker() -> None:
    from longitudinal.batch import init_worker

    init_worker()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def summarise(rows: list[dict]) -> dict:
    used = [r for r in rows if "operating_points" in r]
    stable = [r for r in used if not r["changed"]]
    n_truth = sum(r["truth_lesions"] for r in used)
    out = {}
    for t in THRESHOLDS:
        key = f"{t:g}"
        ops = [r["operating_points"][key] for r in used]
        fp = [o["false_findings"] for o in ops]
        fps = [r["operating_points"][key]["false_findings"] for r in stable]
        fpm = [o["fp_merged"] for o in ops]
        found = sum(o["found"] for o in ops)
        out[key] = {
            "threshold": t, "found": found, "truth_lesions": n_truth,
            "lesion_sensitivity": found / n_truth if n_truth else None,
            "false_findings": int(sum(fp)),
            "false_findings_per_pair": float(np.mean(fp)) if fp else None,
            "false_findings_per_stable_pair": float(np.mean(fps)) if fps else None,
            "fp_merged_per_pair": float(np.mean(fpm)) if fpm else None,
            "kept_absent_on_followup_grid": int(sum(o["kept_absent_on_followup_grid"] for o in ops)),
        }
    return {"pairs": len(used), "stable_pairs": len(stable), "truth_lesions": n_truth, "by_threshold": out}


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def report(doc: dict) -> str:
    s = doc["summary"]
    lines = [f"Siamese FROC: {doc['cohort']}  model {doc['model']}  pipeline {doc['pipeline']}",
             f"{s['pairs']} pairs used ({s['stable_pairs']} stable), {s['truth_lesions']} truth lesions; "
             f"min volume {doc['min_volume_mm3']} mm3, edge margin {doc['edge_margin_mm']} mm", ""]
    lines.append(f"{'threshold':>9}  {'found/total':>11}  {'sensitivity':>11}  {'FP/pair':>8}  {'FP/stable':>9}"
                 f"  {'FP/pair merged':>14}")
    for o in s["by_threshold"].values():
        lines.append(f"{o['threshold']:>9g}  {str(o['found']) + '/' + str(o['truth_lesions']):>11}  "
                     f"{_f(o['lesion_sensitivity']):>11}  {_f(o['false_findings_per_pair']):>8}  "
                     f"{_f(o['false_findings_per_stable_pair']):>9}  {_f(o['fp_merged_per_pair']):>14}")
    les = [(r, x) for r in doc["rows"] for x in r.get("lesions", [])]
    les.sort(key=lambda rx: rx[1]["max_prob"])
    lines += ["", "Per truth lesion, by max probability (ascending):",
              f"{'patient':>8} {'visit':>10} {'#':>2} {'id':>4} {'type':>14} {'diam mm':>7} {'voxels':>6} "
              f"{'max p':>7} {'max p scored':>12}  found at"]
    for r, x in les:
        lines.append(f"{r['patient']:>8} {r['visit']:>10} {x['lesion']:>2} {str(x['id']):>4} {str(x['type']):>14} "
                     f"{_f(x['diameter_mm'], '{:.2f}'):>7} {x['voxels']:>6} {x['max_prob']:>7.4f} "
                     f"{_f(x['max_prob_in_scored_mask'], '{:.4f}'):>12}  "
                     f"{','.join(f'{t:g}' for t in x['found_at']) or 'never'}"
                     + (f"  (max passes t but piece < min volume: "
                        + ", ".join(f"t={t:g}: {x['largest_piece_mm3'][f'{t:g}']:g} mm3"
                                    for t in x["above_but_not_found"]) + ")" if x.get("above_but_not_found") else "")
                     + ("  INCONSISTENT" if x.get("inconsistent") else ""))
    lines += ["", "Per pair: max probability in the scored mask outside the lesions (dilated 2 voxels):"]
    for r in doc["rows"]:
        if "operating_points" in r:
            lines.append(f"  {r['patient']} {r['visit']}: {_f(r['max_prob_outside_lesions'], '{:.4f}')}"
                         f"  ({r['truth_lesions']} lesions; prepare {r['prepare_s']} s, probability "
                         f"{r['probability_s']} s, counting {r['count_s']} s)")
    bad = [r for r in doc["rows"] if "skipped" in r or "error" in r]
    if bad:
        lines += ["", "Skipped pairs (left out of every total):"]
        lines += [f"  {r['patient']} {r['visit']}: {r.get('skipped') or r.get('error')}"
                  f" ({r.get('truth_lesions', '?')} truth lesions)" for r in bad]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cohort", type=Path, help="folder of studies with derivatives/changes truth")
    p.add_argument("model", type=Path, help="Siamese model file (longitudinal train)")
    p.add_argument("-o", "--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--patients", help="comma-separated patient ids (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="pairs in parallel (spawned workers, 1 thread each)")
    p.add_argument("--extent", type=float, default=None, help="hysteresis: pieces at this level whose peak reaches t")
    p.add_argument("--pipeline", default="brain-mri", help="pipeline name or file (default brain-mri)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from longitudinal.io import atomic_write_text
    from longitudinal.report import jsonable
    from longitudinal.timeline import discover, pairs

    model = args.model.resolve()
    _, scoring, _ = _setup(args.pipeline, model)  # refuses a model that does not fit the pipeline, before any work
    wanted = set(args.patients.split(",")) if args.patients else None
    jobs = [Job(args.cohort, pair, model, args.pipeline, args.extent)
            for patient in discover(args.cohort) if wanted is None or patient.id in wanted
            for pair in pairs(patient)]
    if not jobs:
        print(f"no follow-up visits under {args.cohort}" + (f" for {args.patients}" if wanted else ""), file=sys.stderr)
        return 2
    clock = time.perf_counter()
    if args.jobs > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context, initializer=_init_worker) as pool:
            rows = list(pool.map(run_pair, jobs))
    else:
        rows = []
        for job in jobs:
            rows.append(run_pair(job))
            r = rows[-1]
            print(f"{r['patient']} {r['visit']}: " + (r.get("skipped") or r.get("error") or "done"), file=sys.stderr)
    doc = {"cohort": str(args.cohort), "model": str(model), "pipeline": args.pipeline,
           "thresholds": list(THRESHOLDS), "min_volume_mm3": scoring.min_volume_mm3,
           "edge_margin_mm": scoring.edge_margin_mm, "outside_dilation_voxels": OUTSIDE_DILATION_VOXELS,
           "seconds": round(time.perf_counter() - clock, 1),
           "skipped": [{"patient": r["patient"], "visit": r["visit"], "reason": r.get("skipped") or r.get("error")}
                       for r in rows if "skipped" in r or "error" in r],
           "summary": summarise(rows), "rows": rows}
    doc = jsonable(doc)
    atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
    print(report(doc), end="")
    print(f"total {doc['seconds']} s; written {args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
