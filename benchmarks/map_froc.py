"""How far the change maps themselves separate lesions from unchanged tissue, before regions and findings.

    python benchmarks/map_froc.py /work/tune-cache/subtle [--pipeline brain-mri] [--fp 0.2 0.5 1 2] [--peaks 2]

Reads the per-pair cache `tune.py` writes (harmonised visits, compared region, truth on the baseline grid) and
recomputes the pipeline's intensity maps with `scoring.intensity_change` inside the scored region (the compared
region less `edge_margin_mm`), as `compare` does. For each map (the detector's |pooled
change less its surround|, the pooled signed change, the fine change), every local maximum (5-voxel window)
more than 3 voxels from any lesion is a null peak; each lesion's peak is its map maximum. Printed: the share of
lesions above the level that lets through 0.2, 0.5, 1, 2 null peaks per pair, all pairs pooled. A null peak is
not a false finding (findings merge neighbours and need a volume), so this is an upper bound on what any
threshold on that map could reach. `--peaks N` lists the N strongest null peaks of each pair: value, distance
to the compared region's outline, baseline intensity, and gradient against the region's median (edge or flat).

`--oracle` adds an ideal observer no detector can be: the harmonised difference correlated with each lesion's
own truth mask, signed by its known contrast (it knows the lesion's shape, size and sign). For each lesion it
prints how many null peaks of that same filter in its own pair reach the lesion's response, and how many voxel
positions do against what a Gaussian null of the same spread would give (far above it: nuisance, not noise, is
the limit). The share of lesions with at most k such peaks is what knowing the lesion's shape could reach. The
last line asks the same of a world without nuisance: the Gaussian positions turned into peaks at the filter's
own measured positions per peak (k = 0: fewer than 0.5 expected); a lesion that fails there is lost in
noise, which no registration or harmonisation can remove.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.stats import median_abs_deviation


def peaks(values: np.ndarray, inside: np.ndarray, away: np.ndarray) -> np.ndarray:
    """Indices of local maxima of `values` inside the region and away from every lesion."""
    top = ndimage.maximum_filter(values, size=5)
    return np.argwhere((values == top) & inside & away & (values > 0))


def oracle(b: np.ndarray, f: np.ndarray, mask: np.ndarray, lesions: np.ndarray, away: np.ndarray
           ) -> list[tuple[int, int, float, int, int, float]]:
    """Per lesion: (label, voxels, z, null peaks at least as strong, voxel positions, Gaussian expectation).

    The filter is the lesion's own mask, normalised, with the sign of the lesion's mean difference."""
    from scipy.signal import fftconvolve

    diff = np.where(mask, f.astype(np.float32) - b.astype(np.float32), 0.0).astype(np.float32)
    null_region = mask & away
    rows = []
    for k, box in enumerate(ndimage.find_objects(lesions), start=1):
        if box is None:
            continue
        member = lesions == k
        template = (lesions[box] == k).astype(np.float32)
        template /= template.sum()
        # correlation = convolution with the flipped template; "same" keeps the grid, centred like ndimage
        response = fftconvolve(diff, np.flip(template), mode="same").astype(np.float32)
        near = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        response *= 1.0 if float(diff[member].mean()) >= 0 else -1.0
        null = response[null_region]
        centre = float(np.median(null))
        spread = float(median_abs_deviation(null, scale="normal"))
        value = float(response[near].max())
        z = (value - centre) / spread
        at = peaks(response - centre, mask, away)
        n_peaks = int((response[tuple(at.T)] >= value).sum())
        n_pos = int((null >= value).sum())
        gauss = float(null.size * 0.5 * math.erfc(z / math.sqrt(2)))
        rows.append((k, int(member.sum()), z, n_peaks, n_pos, gauss))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache", type=Path, help="a set's folder of tune.py's cache")
    ap.add_argument("--pipeline", default="brain-mri", help="whose scoring settings make the maps")
    ap.add_argument("--fp", type=float, nargs="+", default=[0.2, 0.5, 1.0, 2.0], help="null peaks per pair")
    ap.add_argument("--peaks", type=int, default=0, help="list this many strongest null peaks per pair")
    ap.add_argument("--override", default="{}", help="JSON of ScoringSettings overrides")
    ap.add_argument("--oracle", action="store_true", help="add the matched filter that knows each lesion")
    args = ap.parse_args(argv)

    from longitudinal.compare import scored_mask
    from longitudinal.pipeline import load
    from longitudinal.scoring import intensity_change

    scoring = dataclasses.replace(load(args.pipeline).scoring, **json.loads(args.override))
    names = ("detector |band|", "pooled signed", "fine")
    lesion_peaks: dict[str, list[float]] = {n: [] for n in names}
    null_peaks: dict[str, list[float]] = {n: [] for n in names}
    oracle_rows: list[tuple[str, int, float, int, int, float]] = []
    pairs = 0
    for path in sorted(args.cache.glob("*[0-9].npz")):
        with np.load(path, allow_pickle=False) as z:
            doc = json.loads(str(z["meta"]))
            if doc["reason"] is not None:
                continue
            b, f, mask, lesions = z["b"], z["f"], z["mask"].astype(bool), z["lesions"]
        pairs += 1
        spacing = tuple(doc["spacing_zyx"])
        mask = scored_mask(mask, spacing, scoring.edge_margin_mm)  # as compare scores it: the outline left out
        away = ~ndimage.binary_dilation(lesions > 0, iterations=3)
        maps = [np.abs(m) for m in intensity_change(b, f, mask, spacing, scoring)]
        for name, values in zip(names, maps):
            where = peaks(values, mask, away)
            null_peaks[name].extend(np.sort(values[tuple(where.T)])[-200:].tolist())
            lesion_peaks[name].extend(float(values[lesions == k].max()) for k in np.unique(lesions) if k)
        if args.oracle:
            oracle_rows.extend((path.stem, *row) for row in oracle(b, f, mask, lesions, away))
        if args.peaks:
            band = maps[0]
            where = peaks(band, mask, away)
            order = np.argsort(-band[tuple(where.T)])[:args.peaks]
            depth = ndimage.distance_transform_edt(mask, sampling=spacing)
            grad = ndimage.gaussian_gradient_magnitude(b.astype(np.float32), 1.0)
            median_grad, median_b = float(np.median(grad[mask])), float(np.median(b[mask]))
            for i in order:
                at = tuple(where[i])
                print(f"{path.stem}: null peak {band[at]:.1f} at {depth[at]:.0f} mm inside, baseline "
                      f"{b[at]:.0f} (region median {median_b:.0f}), gradient x{grad[at] / median_grad:.2f}")
    for name in names:
        lesions_arr = np.array(lesion_peaks[name])
        nulls = np.sort(np.array(null_peaks[name]))[::-1]
        cells = []
        for fp in args.fp:
            k = int(fp * pairs)
            level = nulls[k] if k < len(nulls) else 0.0
            cells.append(f"{fp:g}: {(lesions_arr > level).mean():.2f}")
        print(f"{name:16s} {pairs} pairs, {len(lesions_arr)} lesions; found at null peaks per pair "
              + "  ".join(cells))
    if oracle_rows:
        print(f"{'pair':22s} {'lesion':>6s} {'voxels':>6s} {'z':>6s} {'null peaks >=':>13s} "
              f"{'positions >=':>12s} {'Gaussian':>9s} {'Gaussian peaks':>14s}")
        gauss_peaks = []
        for stem, k, voxels, z, n_peaks, n_pos, gauss in oracle_rows:
            gauss_peaks.append(gauss * n_peaks / n_pos if n_pos else gauss)
            print(f"{stem:22s} {k:6d} {voxels:6d} {z:6.1f} {n_peaks:13d} {n_pos:12d} {gauss:9.1f} "
                  f"{gauss_peaks[-1]:14.2f}")
        counts, noise_only = np.array([r[4] for r in oracle_rows]), np.array(gauss_peaks)
        budgets = (0, 1, 2, 5)
        print(f"{'oracle':16s} {pairs} pairs, {len(counts)} lesions; found with at most k null peaks in its pair "
              + "  ".join(f"{k}: {(counts <= k).mean():.2f}" for k in budgets))
        print(f"{'oracle, no nuisance':16s} {pairs} pairs, {len(counts)} lesions; found with at most k Gaussian "
              "peaks in its pair " + "  ".join(f"{k}: {(noise_only <= max(k, 0.5)).mean():.2f}" for k in budgets))


if __name__ == "__main__":
    main()
