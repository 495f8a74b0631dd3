"""Registration accuracy and speed: longitudinal (SimpleITK) vs ANTsPy on pairs with a known transform.

Pairs are built from real anatomy (nilearn's MNI152 T1, 1 mm, 197x233x189): the follow-up is the
baseline resampled through a known rigid motion (rotations up to 10 degrees, translations up to
15 mm) onto its own, slightly shifted and cropped grid, with a gain change, a smooth multiplicative
bias field and noise. Target registration error (TRE) = distance between the true and the estimated
follow-up position of every brain voxel's physical point (fixed -> moving mapping), in mm.

ANTsPy runs with its defaults (Rigid, Affine) on the first --ants-pairs pairs; ANTs SyN (slow at 1 mm)
runs on the first pair with both images resampled to 2 mm (TRE still on the 1 mm brain points).
Ratios compare each method with ANTs Affine on the pairs both ran.

Run:  /work/venv/bin/python benchmarks/registration.py [--pairs 3] [--ants-pairs 1] [--no-syn] [--no-ants]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")  # ANTs: same 2 cores as SimpleITK

import numpy as np
import SimpleITK as sitk

from longitudinal.io import Image, Meta
from longitudinal.registration import RegistrationSettings, register

MNI = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def mni_path() -> Path:
    import nilearn

    return Path(nilearn.__file__).parent.parent / MNI


def make_pair(base: sitk.Image, seed: int) -> tuple[sitk.Image, sitk.Image, sitk.Transform]:
    """(fixed, moving, true fixed->moving transform)."""
    rng = np.random.default_rng(seed)
    centre = base.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in base.GetSize()])
    angles = rng.uniform(-10, 10, 3)
    shift = rng.uniform(-15, 15, 3)
    # G maps follow-up (moving) points to baseline points; the true fixed->moving mapping is G^-1
    g = sitk.Euler3DTransform(centre, *[math.radians(a) for a in angles], tuple(shift))
    # follow-up grid: shifted origin (a few mm, not a whole voxel) and 6 voxels cropped per axis
    size = [s - 6 for s in base.GetSize()]
    origin = np.array(base.GetOrigin()) + np.array(base.GetDirection()).reshape(3, 3) @ (
        np.array(base.GetSpacing()) * (3 + rng.uniform(-0.5, 0.5, 3))
    )
    moving = sitk.Resample(base, size, g, sitk.sitkBSpline, tuple(origin), base.GetSpacing(), base.GetDirection(), 0.0)
    arr = sitk.GetArrayFromImage(moving).astype(np.float64)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in arr.shape], indexing="ij")
    cz, cy, cx = rng.uniform(-0.3, 0.3, 3)
    bias = np.exp(0.15 * ((xx - cx) * rng.choice([-1, 1]) + 0.5 * (yy - cy) ** 2 - 0.5 * (zz - cz) ** 2))
    gain = rng.uniform(0.8, 1.2)
    arr = np.clip(arr * gain * bias + rng.normal(0, 0.02 * arr.max(), arr.shape), 0, None)
    mov = sitk.GetImageFromArray(arr.astype(np.float32))
    mov.CopyInformation(moving)
    fixed_arr = sitk.GetArrayFromImage(base).astype(np.float64)
    fixed_arr = np.clip(fixed_arr + rng.normal(0, 0.02 * fixed_arr.max(), fixed_arr.shape), 0, None)
    fixed = sitk.GetImageFromArray(fixed_arr.astype(np.float32))
    fixed.CopyInformation(base)
    return fixed, mov, g.GetInverse()


def to_2mm(img: sitk.Image) -> sitk.Image:
    size = [int(math.ceil(s * sp / 2.0)) for s, sp in zip(img.GetSize(), img.GetSpacing())]
    smooth = sitk.SmoothingRecursiveGaussian(img, 0.85)
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), (2.0, 2.0, 2.0), img.GetDirection())


def brain_points(base: sitk.Image) -> np.ndarray:
    """Physical (LPS) points of every brain voxel, shape (n, 3)."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(base) > 0)[:, ::-1].astype(np.float64)  # (x, y, z) indices
    d = np.array(base.GetDirection()).reshape(3, 3)
    return np.array(base.GetOrigin()) + (idx * np.array(base.GetSpacing())) @ d.T


def map_points(tx: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    """Apply any SimpleITK transform to many points via a displacement field (handles composites)."""
    lo = pts.min(axis=0) - 1
    hi = pts.max(axis=0) + 1
    size = [int(math.ceil(h - l)) + 1 for l, h in zip(lo, hi)]
    field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, size, tuple(lo), (1.0, 1.0, 1.0))
    arr = sitk.GetArrayFromImage(field)  # (z, y, x, 3)
    ijk = np.rint(pts - lo).astype(int)  # points lie on integer mm offsets from lo for a 1 mm axis-aligned grid
    if not np.allclose(pts - lo, ijk, atol=1e-6):
        return np.array([tx.TransformPoint(tuple(p)) for p in pts])
    return pts + arr[ijk[:, 2], ijk[:, 1], ijk[:, 0]]


def tre(estimated: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    e = np.linalg.norm(estimated - true, axis=1)
    return float(e.mean()), float(np.percentile(e, 95))


def run_ours(fixed, moving, stages, pts, true_pts):
    t = time.perf_counter()
    r = register(Image(fixed, Meta(sources=("baseline",))), Image(moving, Meta(sources=("followup",))),
                 RegistrationSettings(stages=stages))
    sec = time.perf_counter() - t
    return (*tre(map_points(r.transform, pts), true_pts), sec, r.qc)


def run_ants(ants, fixed_path, moving_path, kind, pts, true_pts):
    import pandas as pd

    f = ants.image_read(str(fixed_path))
    m = ants.image_read(str(moving_path))
    t = time.perf_counter()
    out = ants.registration(f, m, type_of_transform=kind, random_seed=1)
    sec = time.perf_counter() - t
    # ANTs point mapping runs opposite to image warping: the transforms that warp the moving image
    # onto the fixed grid (fwdtransforms) take fixed-space points to moving space, i.e. the same
    # fixed -> moving mapping SimpleITK's registration transform gives.
    df = pd.DataFrame(pts, columns=["x", "y", "z"])
    mapped = ants.apply_transforms_to_points(3, df, out["fwdtransforms"])[["x", "y", "z"]].to_numpy()
    return (*tre(mapped, true_pts), sec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--ants-pairs", type=int, default=1, help="ANTs Rigid/Affine run on this many pairs (about 1-2 min each)")
    ap.add_argument("--no-syn", action="store_true", help="skip ANTs SyN and our B-spline stage (first pair)")
    ap.add_argument("--no-ants", action="store_true")
    args = ap.parse_args(argv)

    base = sitk.Cast(sitk.ReadImage(str(mni_path())), sitk.sitkFloat32)
    pts = brain_points(base)
    ants = None
    if not args.no_ants:
        try:
            import ants  # noqa: F811
        except ImportError:
            print("antspyx not installed: ANTs rows skipped", file=sys.stderr)
    rows: dict[str, dict[int, tuple[float, float, float]]] = {}

    def add(name, k, mean, p95, sec):
        rows.setdefault(name, {})[k] = (mean, p95, sec)
        print(f"  {name:28s} TRE mean {mean:6.3f} mm  p95 {p95:6.3f} mm  {sec:6.1f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.pairs):
            fixed, moving, true_tx = make_pair(base, seed=100 + k)
            true_pts = map_points(true_tx, pts)
            start = tre(pts, true_pts)
            print(f"pair {k}: before registration TRE mean {start[0]:.2f} mm p95 {start[1]:.2f} mm", flush=True)
            for name, stages in (("ours rigid", ("rigid",)), ("ours rigid+affine", ("rigid", "affine"))):
                mean, p95, sec, qc = run_ours(fixed, moving, stages, pts, true_pts)
                add(name, k, mean, p95, sec)
                if qc.suspect:
                    print(f"    (suspect: {'; '.join(qc.reasons)})")
            if k == 0 and not args.no_syn:
                mean, p95, sec, _ = run_ours(fixed, moving, ("rigid", "affine", "bspline"), pts, true_pts)
                add("ours rigid+affine+bspline", k, mean, p95, sec)
            if ants is not None and k < args.ants_pairs:
                fp, mp = Path(tmp) / f"f{k}.nii.gz", Path(tmp) / f"m{k}.nii.gz"
                sitk.WriteImage(fixed, str(fp))
                sitk.WriteImage(moving, str(mp))
                for kind in ("Rigid", "Affine"):
                    add(f"ANTsPy {kind}", k, *run_ants(ants, fp, mp, kind, pts, true_pts))
                if k == 0 and not args.no_syn:
                    f2, m2 = Path(tmp) / "f2mm.nii.gz", Path(tmp) / "m2mm.nii.gz"
                    sitk.WriteImage(to_2mm(fixed), str(f2))
                    sitk.WriteImage(to_2mm(moving), str(m2))
                    add("ANTsPy SyN (2 mm)", k, *run_ants(ants, f2, m2, "SyN", pts, true_pts))

    print()
    ref = rows.get("ANTsPy Affine", {})
    print(f"{'method':28s} {'pairs':>5s} {'TRE mean':>9s} {'TRE p95':>8s} {'seconds':>8s} {'TRE/ANTsAff':>11s} {'time/ANTsAff':>12s}")
    for name, per_pair in rows.items():
        a = np.array(list(per_pair.values()))
        mean, p95, sec = a[:, 0].mean(), a[:, 1].mean(), a[:, 2].mean()
        common = [k for k in per_pair if k in ref]
        if common:
            r1 = np.mean([per_pair[k][0] for k in common]) / np.mean([ref[k][0] for k in common])
            r2 = np.mean([per_pair[k][2] for k in common]) / np.mean([ref[k][2] for k in common])
            ratios = f"{r1:11.2f} {r2:12.2f}"
        else:
            ratios = f"{'-':>11s} {'-':>12s}"
        print(f"{name:28s} {len(per_pair):5d} {mean:9.3f} {p95:8.3f} {sec:8.1f} {ratios}")
    print("(TRE in mm over all brain voxels; mean/p95/seconds averaged over the pairs each method ran;")
    print(" ratios use only the pairs ANTs Affine also ran; wall time of the registration call; 2 threads;")
    print(f" load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
