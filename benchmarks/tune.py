"""Tune the scoring and findings settings on a dev cohort, fast: every pair prepared once, re-scored per variant.

    python benchmarks/tune.py /work/cohorts/dev/visible /work/cohorts/dev/subtle --cache /work/tune-cache \\
        [--jobs 2] [--pipeline NAME|FILE] [--variants base shape0.2 ...] [--json OUT.json]

Step 1 (cached per pair, npz): `compare.prepare`, the encoder, the change maps and region features exactly as
`compare` makes them, cropped to the compared region, with the truth on the baseline grid. Step 2: for every
variant (a set of `ScoringSettings` overrides, below), `scoring.score_regions` and `compare.findings_of` on
every cached pair, and per set: lesion sensitivity, false findings per pair and per stable pair, pair AUROC,
and how many found lesions of 5 mm and more have a reported volume within 30 % of the truth.

Only for a dev split: paths with "validation" in them are refused, because a setting chosen there would make
the validation figures meaningless. `--prepare-only` writes the cache and scores no variant; it may be run on
a validation split, for measurements that choose nothing (`map_froc.py --oracle`: what the images hold).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy.stats import median_abs_deviation

from longitudinal.batch import init_worker

VARIANTS: dict[str, dict] = {
    "base": {},
    "shape0.1": {"tail_shape": 0.1},
    "shape0.2": {"tail_shape": 0.2},
    "shape0.3": {"tail_shape": 0.3},
}


def cache_pair(args: tuple[Path, str, str, str, Path, str | None]) -> str:
    """Prepare, encode and measure one pair; write its npz (skipped when present)."""
    studies, patient_id, baseline_id, followup_id, path, pipeline_name = args
    if path.is_file():
        return f"{path.name}: cached"
    import SimpleITK as sitk

    from longitudinal.compare import encode_prepared, prepare, region_features_prepared
    from longitudinal.masks import gray_array
    from longitudinal.evaluation import load_truth
    from longitudinal.pipeline import for_image, load
    from longitudinal.timeline import discover, pairs

    t0 = time.perf_counter()
    patient = next(p for p in discover(studies) if p.id == patient_id)
    pair = next(p for p in pairs(patient) if p.followup.id == followup_id)
    baseline, followup = pair.baseline.load(), pair.followup.load()
    pipeline = load(pipeline_name) if pipeline_name else for_image(baseline)
    truth = load_truth(studies, patient_id, followup_id, followup.itk)
    prepared = prepare(baseline, followup, pipeline)
    from longitudinal.evaluation import brain_truth, dice

    brain = brain_truth(studies, patient_id, baseline_id)
    roi = prepared.registration.roi
    doc = {"patient": patient_id, "visit": followup_id, "changed": bool(truth.mask.any()),
           "brain_dice": None if brain is None or roi is None or not pipeline.masks.brain
           else dice(sitk.GetArrayFromImage(roi) > 0, sitk.GetArrayFromImage(brain) > 0),
           "qc": prepared.registration.qc.to_dict(),
           "sizes": {str(k): v for k, v in truth.sizes.items()}, "reason": prepared.reason,
           "baseline": baseline_id, "signed_units": "noise", "spacing_zyx": list(reversed(baseline.spacing)),
           "pipeline": pipeline_name or pipeline.name}  # re-scored with the pipeline it was prepared with
    arrays: dict[str, np.ndarray] = {}
    if prepared.reason is None:
        scoring = pipeline.scoring
        fb = ff = None
        if "encoder" in scoring.maps:
            fb, ff, _ = encode_prepared(prepared)
        X, names, regions, labels, maps = region_features_prepared(prepared, scoring, fb, ff)
        lesions_itk = sitk.GetImageFromArray(truth.lesions.astype(np.int32))
        lesions_itk.CopyInformation(followup.itk)
        lesions_b = sitk.GetArrayFromImage(prepared.registration.to_fixed(lesions_itk, sitk.sitkNearestNeighbor))
        where = np.argwhere(prepared.mask)
        boxes_lo = np.array([r.bbox[0][::-1] for r in regions])  # numpy order
        boxes_hi = np.array([r.bbox[1][::-1] for r in regions])
        lo = np.minimum(where.min(0), boxes_lo.min(0))
        hi = np.maximum(where.max(0) + 1, boxes_hi.max(0))
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        doc["names"] = list(names)
        arrays = {"X": X, "lo": np.array([r.bbox[0] for r in regions]) - lo[::-1],
                  "hi": np.array([r.bbox[1] for r in regions]) - lo[::-1],
                  "volumes": np.array([r.volume_mm3 for r in regions]), "mask": prepared.mask[crop],
                  "signed": maps.signed[crop], "fine": maps.fine[crop], "lesions": lesions_b[crop].astype(np.int32),
                  "b": gray_array(prepared.baseline_harmonised.array)[crop].astype(np.float32),
                  "f": gray_array(prepared.followup_harmonised.array)[crop].astype(np.float32)}
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, meta=np.array(json.dumps(doc)), **arrays)
    os.replace(tmp, path)
    return f"{path.name}: {doc['seconds']} s"


def score_cached(path: Path, overrides: dict, tags: dict) -> dict:
    """One cached pair under one variant: what was found, against the truth on the baseline grid."""
    from longitudinal.compare import findings_of
    from longitudinal.pipeline import load
    from longitudinal.regions import Region, nearby_components
    from longitudinal.compare import scored_mask
    from longitudinal.scoring import ChangeMaps, change_maps, feature_names, region_features, score_regions

    with np.load(path, allow_pickle=False) as z:
        doc = json.loads(str(z["meta"]))
        arrays = {k: z[k] for k in z.files if k != "meta"}
    out = {"patient": doc["patient"], "visit": doc["visit"], "changed": doc["changed"],
           "tags": tags.get((doc["patient"], doc["visit"]), {}), "baseline_tags": tags.get((doc["patient"],
                                                                                            doc["baseline"]), {}),
           "not_comparable": doc["reason"], "brain_dice": doc["brain_dice"],
           "qc_ok": not doc["qc"]["suspect"]}
    sizes = {int(k): v for k, v in doc["sizes"].items()}
    out["truth_lesions"] = len(sizes)
    if doc["reason"] is not None:
        out.update(found=0, false_findings=0, score=-math.inf, volumes=[])
        return out
    pipeline = load(doc.get("pipeline", "brain-mri"))  # caches made before it was recorded: brain sets only
    scoring = dataclasses.replace(pipeline.scoring, **overrides)
    mask = arrays["mask"]
    regions = [Region(i + 1, "grid", (tuple(int(v) for v in a), tuple(int(v) for v in b)), None, (0.0,) * 3,
                      float(vol)) for i, (a, b, vol) in enumerate(zip(arrays["lo"], arrays["hi"], arrays["volumes"]))]
    spacing = tuple(doc["spacing_zyx"])
    if MAP_KEYS & set(overrides):  # the maps themselves change: recompute them from the cached visits
        mask = scored_mask(mask, spacing, scoring.edge_margin_mm)
        fb, ff = _features(path, arrays, pipeline) if "encoder" in scoring.maps else (None, None)
        maps = change_maps(arrays["b"], arrays["f"], fb, ff, mask, spacing, scoring)
        X, names = region_features(maps.maps, regions, mask, None), feature_names(maps.maps)
    else:
        X, names = arrays["X"], tuple(doc["names"])
        signed = arrays["signed"]
        if doc.get("signed_units") != "noise":  # caches made before the pooled change was standardised
            signed = signed / max(float(median_abs_deviation(signed[mask], scale="normal")), 1e-12)
        maps = ChangeMaps({}, signed, arrays["fine"], mask)
    scores = score_regions(X, names, regions, mask, None, spacing, scoring)
    found, pair_score = findings_of(scores, regions, None, mask, maps, arrays["b"], arrays["f"], spacing, scoring)
    flagged = np.zeros(mask.shape, np.int32)
    for k, f in enumerate(found, start=1):
        flagged[tuple(f.voxels.T)] = k
    lesions = arrays["lesions"]
    hit = sorted(int(v) for v in np.unique(lesions[flagged > 0]) if v > 0)
    comps, n = nearby_components(flagged > 0, 1)
    true_comps = {int(c) for c in np.unique(comps[(lesions > 0) & (flagged > 0)]) if c > 0}
    voxel_mm3 = float(np.prod(spacing))
    volumes = []
    for k in hit:
        ids = [int(i) for i in np.unique(flagged[lesions == k]) if i > 0]
        covered = [j for j in sizes if np.isin(flagged[lesions == j], ids).any()]
        true_mm3 = sum(float(sizes[j].get("volume_mm3") or 0) for j in covered)
        got = sum(len(found[i - 1].voxels) * voxel_mm3 for i in ids)
        if true_mm3 > 0:
            volumes.append({"diameter_mm": sizes[k].get("diameter_mm"), "ratio": got / true_mm3})
    out.update(found=len(hit), false_findings=n - len(true_comps), score=pair_score, volumes=volumes,
               threshold=scores.threshold)
    return out


MAP_KEYS = {"maps", "smoothing_mm", "pool_mm", "surround_mm", "misalignment_mm", "edge_margin_mm"}


def _features(path: Path, arrays: dict, pipeline):
    """Encoder features of a cached pair's visits (cached beside it on first use)."""
    from longitudinal.encoding import Encoder, FeatureMap

    cache = path.with_suffix(".features.npz")
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return tuple(FeatureMap(z[k], tuple(meta["stride"]), tuple(meta["shape"]), tuple(meta["stages"]))
                         for k in ("b", "f"))
    fb, ff, _ = Encoder(pipeline.encoding).encode_pair(arrays["b"], arrays["f"], arrays["mask"])
    meta = {"stride": list(fb.stride), "shape": list(fb.input_shape), "stages": list(fb.stage_channels)}
    np.savez(cache, meta=np.array(json.dumps(meta)), b=fb.data, f=ff.data)
    return fb, ff


def summarise(rows: list[dict]) -> dict:
    from longitudinal.evaluation import f1, pair_auroc

    n_truth = sum(r["truth_lesions"] for r in rows)
    found = sum(r["found"] for r in rows)
    fp = [r["false_findings"] for r in rows]
    stable = [r["false_findings"] for r in rows if not r["changed"]]
    ratios = [v["ratio"] for r in rows for v in r["volumes"] if (v["diameter_mm"] or 0) >= 5]
    sens = found / n_truth if n_truth else math.nan
    true_findings = sum(r["found"] > 0 for r in rows)
    precision = found / max(1, found + sum(fp)) if (found + sum(fp)) else 1.0
    return {"pairs": len(rows), "stable": len(stable), "lesions": n_truth, "sensitivity": sens,
            "fp_per_pair": float(np.mean(fp)), "fp_per_stable": float(np.mean(stable)) if stable else math.nan,
            "f1": f1(sens, precision), "pair_auroc": pair_auroc([r["score"] for r in rows], [r["changed"] for r in rows]),
            "volume_within_30": float(np.mean([abs(q - 1) <= 0.3 for q in ratios])) if ratios else math.nan,
            "volume_median_ratio": float(np.median(ratios)) if ratios else math.nan, "n_volumes": len(ratios),
            "not_comparable": sum(r["not_comparable"] is not None for r in rows), "changed_pairs": true_findings,
            "qc_ok": sum(r["qc_ok"] for r in rows),
            "brain_dice_min": min((r["brain_dice"] for r in rows if r["brain_dice"] is not None), default=math.nan),
            "brain_dice_mean": float(np.mean([r["brain_dice"] for r in rows if r["brain_dice"] is not None]))
            if any(r["brain_dice"] is not None for r in rows) else math.nan}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sets", nargs="+", type=Path, help="dev cohort set folders")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--pipeline", help="pipeline name or TOML file to prepare and score with (default: the one "
                    "each study's modality selects); use its own --cache folder")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"names of {', '.join(VARIANTS)}, "
                    "or JSON objects of ScoringSettings overrides")
    ap.add_argument("--json", type=Path, help="write every row and summary here")
    ap.add_argument("--prepare-only", action="store_true", help="write the cache, score nothing (any split)")
    args = ap.parse_args(argv)
    for s in args.sets:
        if "validation" in str(s.resolve()) and not args.prepare_only:
            sys.exit(f"{s}: refusing to tune on a validation split (tune on dev, report on validation)")
    from longitudinal.evaluation import cohort_tags
    from longitudinal.timeline import discover, pairs

    todo = []
    for s in args.sets:
        for patient in discover(s):
            for pair in pairs(patient):
                todo.append((s, patient.id, pair.baseline.id, pair.followup.id,
                             args.cache / s.name / f"{patient.id}_{pair.followup.id}.npz", args.pipeline))
    t0 = time.perf_counter()
    if args.jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=init_worker) as pool:
            for line in pool.map(cache_pair, todo):
                print(line, flush=True)
    else:
        for t in todo:
            print(cache_pair(t), flush=True)
    print(f"cache ready in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.prepare_only:
        return
    report = {}
    for name in args.variants:
        overrides = VARIANTS[name] if name in VARIANTS else json.loads(name)
        by_set = {}
        for s in args.sets:
            tags = cohort_tags(s)
            rows = [score_cached(t[4], overrides, tags) for t in todo if t[0] == s]
            by_set[s.name] = {"summary": summarise(rows), "rows": rows}
            m = by_set[s.name]["summary"]
            print(f"{name:28s} {s.name:8s} sens {m['sensitivity']:.3f} ({m['lesions']}) FP/pair {m['fp_per_pair']:.2f} "
                  f"FP/stable {m['fp_per_stable']:.2f} F1 {m['f1']:.3f} pairAUROC {m['pair_auroc']:.3f} "
                  f"vol30 {m['volume_within_30']:.2f} (n={m['n_volumes']}, median x{m['volume_median_ratio']:.2f}) "
                  f"NC {m['not_comparable']} QC {m['qc_ok']}/{m['pairs']} brain Dice {m['brain_dice_mean']:.3f} "
                  f"(min {m['brain_dice_min']:.3f})", flush=True)
        report[name] = {"overrides": overrides, "sets": by_set}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
