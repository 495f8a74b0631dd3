"""How far do the true changes stand above each pair's own false findings, and how is the score calibrated?

    python benchmarks/margins.py [--sets hard easy] [--pipeline P]

For every follow-up with truth, the pipeline's own scores on the baseline grid (as `compare` makes them):
- the best score inside each true change, and the best scores of findings that touch no true change;
- the within-pair calibration: the generalized Pareto shape of the null tail (capped at scoring.MAX_SHAPE).
At the end, per set, the best any single threshold can do within a false-finding budget per pair. That is the
ceiling a choice of `false_alarm_rate` can reach with these scores; it is chosen on the very pairs it is
measured on, so it is an upper bound, not a result.
"""

from __future__ import annotations

import argparse
import numpy as np

from longitudinal.compare import encode_prepared, region_features_prepared
from longitudinal.regions import nearby_components
from longitudinal.scoring import MAX_SHAPE, ChangeDetector, score_regions
from sample_pairs import prepared_pairs
FINDING_LEVEL = 2.5  # findings are pieces of the score map above this (-log10 p)


def pair_margins(prepared, truth: np.ndarray) -> tuple[list[float], list[float], float]:
    """(best score of each true change, scores of false findings best first, tail shape)."""
    scoring = prepared.pipeline.scoring
    features_b = features_f = None
    if "encoder" in scoring.maps:
        features_b, features_f, _ = encode_prepared(prepared)
    X, names, regions, labels, _ = region_features_prepared(prepared, scoring, features_b, features_f)
    spacing_zyx = tuple(reversed(prepared.baseline.spacing))
    scores = score_regions(X, names, regions, prepared.mask, labels, spacing_zyx, scoring)
    shape = ChangeDetector(scoring).fit(X, names).calibration_.shape
    voxel = scores.voxel_map
    lesions, n = nearby_components(truth, 1)
    changes = [float(voxel[lesions == k].max()) for k in range(1, n + 1)]
    findings, m = nearby_components(voxel > FINDING_LEVEL, 1)
    hit = set(np.unique(findings[truth])) - {0}
    false = sorted((float(voxel[findings == k].max()) for k in range(1, m + 1) if k not in hit), reverse=True)
    return changes, false, float(shape)


def best_threshold(rows: list[tuple[list[float], list[float]]], budget_per_pair: float) -> tuple[int, float]:
    """(changes found, threshold) of the best single threshold with at most the budget of false findings."""
    changes = [s for c, _ in rows for s in c]
    false = [s for _, f in rows for s in f]
    best = (0, float("inf"))
    for t in sorted(set(changes + false)):
        if sum(s > t for s in false) <= budget_per_pair * len(rows):
            found = sum(s > t for s in changes)
            if found > best[0]:
                best = (found, t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["hard", "easy"])
    parser.add_argument("--pipeline", default=None)
    args = parser.parse_args()
    for name in args.sets:
        rows = []
        print(f"{name}: {'patient':8} {'follow-up':12} {'tail shape':>10}  true changes (best score) | false findings")
        for patient_id, visit, prepared, truth, _ in prepared_pairs(name, args.pipeline):
            changes, false, shape = pair_margins(prepared, truth)
            rows.append((changes, false))
            cap = " (cap)" if shape >= MAX_SHAPE else ""
            print(f"{name}: {patient_id:8} {visit:12} {shape:10.2f}{cap:6} "
                  f"{' '.join(f'{s:.2f}' for s in sorted(changes, reverse=True)) or '-'} | "
                  f"{' '.join(f'{s:.2f}' for s in false[:5]) or '-'}", flush=True)
        n = sum(len(c) for c, _ in rows)
        for budget in (0.0, 0.5, 1.0):
            found, t = best_threshold(rows, budget)
            print(f"{name}: at most {budget:g} false findings per pair: {found}/{n} true changes above "
                  f"{'-' if found == 0 else f'{t:.2f}'}")


if __name__ == "__main__":
    main()
