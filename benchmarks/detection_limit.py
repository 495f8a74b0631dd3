"""How detectable is each ground-truth change at all? An ideal-observer bound on the sample studies.

    python benchmarks/detection_limit.py [--sets hard easy] [--pipeline P] [--raw]

For every follow-up with truth: register and harmonise as `compare` does (`--raw`: registration only, no
harmonisation), take the difference D = follow-up - baseline on the baseline grid, and correlate it with each
true change's own mask (an oracle matched filter: it knows the change's exact shape and place, which no
detector does). Across the brain that filter gives a null distribution; the change's z against it, and the
number of unchanged positions that reach the same |z|, say how many false alarms even this oracle must accept
to find the change. Positions are counted per voxel (neighbours overlap), next to the count a Gaussian null of
the same spread would give: where the measured count is far above it, nuisance (not noise) is the limit.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import ndimage

from sample_pairs import prepared_pairs


def oracle(diff: np.ndarray, inner: np.ndarray, component: np.ndarray, changed: np.ndarray
           ) -> tuple[float, float, int, float]:
    """(z of the change, max |z| of unchanged positions, positions at least as extreme, Gaussian expectation).

    Unchanged positions are those at least 3 voxels from every true change of the pair."""
    box = ndimage.find_objects(component.astype(np.int8))[0]
    template = component[box].astype(np.float32)
    response = ndimage.correlate(diff, template / template.sum(), mode="constant")
    null = response[inner & ~ndimage.binary_dilation(changed, iterations=3)]
    centre = float(np.median(null))
    spread = 1.4826 * float(np.median(np.abs(null - centre)))
    near = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    local = response[near]
    z = (float(local.flat[np.argmax(np.abs(local - centre))]) - centre) / spread
    zs = np.abs(null - centre) / spread
    return z, float(zs.max()), int((zs >= abs(z)).sum()), float(zs.size * math.erfc(abs(z) / math.sqrt(2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["hard", "easy"])
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--raw", action="store_true", help="registered intensities, no harmonisation")
    args = parser.parse_args()
    print(f"{'set':6} {'patient':8} {'follow-up':12} {'change':7} {'mm':>5} {'voxels':>6} {'z':>6} "
          f"{'null max':>8} {'as extreme':>10} {'Gaussian':>9}")
    for name in args.sets:
        for patient_id, visit, prepared, truth, doc in prepared_pairs(name, args.pipeline):
            if not truth.any():
                continue
            baseline = prepared.baseline
            if args.raw:
                b = baseline.array.astype(np.float32)
                f = prepared.registration.registered.array.astype(np.float32)
                f = f * float(np.median(b[prepared.mask]) / max(np.median(f[prepared.mask]), 1e-6))
            else:
                b = prepared.baseline_harmonised.array.astype(np.float32)
                f = prepared.followup_harmonised.array.astype(np.float32)
            diff = np.where(prepared.mask, f - b, 0.0).astype(np.float32)
            inner = ndimage.binary_erosion(prepared.mask, iterations=4)
            changes = {c["id"]: c for c in doc.get("changes", [])}
            components, n = ndimage.label(truth)
            for k in range(1, n + 1):
                component = components == k
                if component.sum() < 3:
                    continue
                z, zmax, count, gauss = oracle(diff, inner, component, truth)
                ident = _change_at(changes, component, prepared, baseline)
                diameter = changes.get(ident, {}).get("diameter_mm", float("nan"))
                print(f"{name:6} {patient_id:8} {visit:12} {ident:7} {diameter:5.1f} "
                      f"{int(component.sum()):6d} {z:+6.1f} {zmax:8.1f} {count:10d} {gauss:9.1f}", flush=True)


def _change_at(changes: dict, component: np.ndarray, prepared, baseline) -> str:
    """The id of the truth change whose centre lies nearest this component (changes.json, follow-up space)."""
    if not changes:
        return "?"
    centre = np.argwhere(component).mean(0)[::-1]
    point = np.array(baseline.itk.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre]))
    point = np.array(prepared.registration.transform.TransformPoint(point.tolist()))  # into the follow-up's space
    return min(changes, key=lambda i: np.linalg.norm(np.subtract(changes[i]["centre_mm"], point)))


if __name__ == "__main__":
    main()
