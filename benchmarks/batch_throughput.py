"""Batch throughput: pairs per minute with --jobs 1 and --jobs N, time spent writing reports, resume cost.

Builds a small cohort from the real MNI152 T1 shipped with nilearn (a growing painted lesion per patient,
3 visits each, noise per visit) in a temporary folder and runs `batch.run_batch` on it.

    python benchmarks/batch_throughput.py [--patients 4] [--spacing 3] [--jobs 2] [--compare scaffold|real]

`--compare real` uses `longitudinal.compare.compare` with `--pipeline`; `scaffold` (default while compare() is
being written) uses the tests' stand-in (real registration and harmonisation, |difference| as the score), so
the figures then measure the batch runner and the report stage, not the encoder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def build_cohort(root: Path, patients: int, spacing: float) -> int:
    from test_report import mni, with_lesion

    base = mni(spacing)
    rng = np.random.default_rng(0)
    n = 0
    for p in range(patients):
        centre = (float(rng.uniform(-30, 30)), float(rng.uniform(-30, 20)), float(rng.uniform(0, 30)))
        for v, (date, radius) in enumerate((("2020-01-01", 0.0), ("2020-07-01", 6.0), ("2021-01-01", 10.0))):
            img = with_lesion(base, centre, radius, 60.0) if radius else base
            arr = sitk.GetArrayFromImage(img) + rng.normal(0, 1.0, img.GetSize()[::-1]).astype(np.float32)
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(img)
            path = root / f"P{p:03d}" / f"{date}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(out, str(path), True)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--spacing", type=float, default=3.0, help="mm; the MNI template is resampled to this")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--compare", choices=("scaffold", "real"), default="scaffold")
    ap.add_argument("--pipeline", default=None, help="pipeline name or TOML (for --compare real)")
    args = ap.parse_args()

    from longitudinal import batch, report

    if args.compare == "real":
        from longitudinal.compare import compare as compare_fn
        from longitudinal.pipeline import load

        pipeline = load(args.pipeline or "default")
    else:
        from test_report import TEST_PIPELINE as pipeline
        from test_report import make_comparison as compare_fn

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = build_cohort(tmp / "studies", args.patients, args.spacing)
        pairs = args.patients * 2
        print(f"cohort: {args.patients} patients, {images} images at {args.spacing:g} mm, {pairs} pairs; "
              f"compare = {args.compare}")
        runs = {}
        for jobs in sorted({1, args.jobs}):
            out = tmp / f"out{jobs}"
            t0 = time.perf_counter()
            s = batch.run_batch(tmp / "studies", out, pipeline=pipeline, jobs=jobs, compare_fn=compare_fn,
                                progress=False)
            wall = time.perf_counter() - t0
            runs[jobs] = wall
            report_s = []
            for r in s.results:
                import json

                doc = json.loads((out / r.folder / report.OUTPUT_FILES["result"]).read_text())
                report_s.append(doc["timings_s"]["report"])
            print(f"jobs={jobs}: {wall:.1f} s wall, {60 * pairs / wall:.1f} pairs/min, ok={s.ok} failed={s.failed}; "
                  f"report writing {np.mean(report_s):.2f} s/pair (min {min(report_s):.2f}, max {max(report_s):.2f})")
            t0 = time.perf_counter()
            again = batch.run_batch(tmp / "studies", out, pipeline=pipeline, jobs=jobs, compare_fn=compare_fn,
                                    progress=False)
            print(f"  resume with nothing to do: {time.perf_counter() - t0:.2f} s, skipped={again.skipped}")
        if args.jobs > 1:
            print(f"speed-up jobs={args.jobs} vs 1: {runs[1] / runs[args.jobs]:.2f}x")


if __name__ == "__main__":
    main()
