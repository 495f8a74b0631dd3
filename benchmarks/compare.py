"""Wall time and peak memory of `compare` on a 1 mm brain pair, and of `batch` over the sample studies.

    python benchmarks/compare.py [--skip-batch] [--sets easy hard] [--jobs 1 2]

The 1 mm pair is nilearn's MNI152 T1 (197x233x189): the follow-up is moved (3 degrees, 4 mm), rescaled in
gain, has its own noise and a new 6 mm lesion. Each measurement runs in a fresh process, so its peak RSS
(ru_maxrss of that child) is the memory a user would see. Goals: compare under 60 s and 4 GB on 2 cores;
batch --jobs 2 uses both cores (CPU seconds / wall seconds close to 2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LESION_MM = (-26.0, 20.0, 24.0)  # centre of the follow-up's new lesion, baseline physical space

PAIR_SCRIPT = r"""
import json, sys, time
from longitudinal.io import load_image
from longitudinal.compare import compare
from longitudinal.report import write_outputs
t = time.perf_counter()
c = compare(load_image(sys.argv[1]), load_image(sys.argv[2]))
t_compare = time.perf_counter() - t
write_outputs(c, sys.argv[3])
flagged = [r for r in c.regions if r.flagged]
distances = [sum((a - b) ** 2 for a, b in zip(r.centre_mm, LESION_MM)) ** 0.5 for r in flagged]
print(json.dumps({"compare_s": t_compare, "total_s": time.perf_counter() - t, "stages_s": c.timings_s,
                  "progression": c.progression, "flagged": len(flagged),
                  "lesion_found": any(d <= 6.0 for d in distances),
                  "other_findings": sum(d > 6.0 for d in distances)}))
""".replace("LESION_MM", repr(LESION_MM))


def make_pair(folder: Path) -> tuple[Path, Path]:
    import numpy as np
    import SimpleITK as sitk
    import nilearn

    t1 = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    base = sitk.Cast(sitk.ReadImage(str(t1)), sitk.sitkFloat32)
    rng = np.random.default_rng(0)
    arr = sitk.GetArrayFromImage(base)
    # a 6 mm lesion, -40 % in white matter, then a rigid move of the whole head
    idx = np.indices(arr.shape).astype(np.float32)
    centre = base.TransformPhysicalPointToIndex(LESION_MM)[::-1]
    r2 = sum((idx[i] - centre[i]) ** 2 for i in range(3))
    lesion = np.exp(-r2 / (2 * 2.0 ** 2)).astype(np.float32)
    follow = sitk.GetImageFromArray(arr * (1 - 0.4 * lesion))
    follow.CopyInformation(base)
    move = sitk.Euler3DTransform((0.0, -18.0, 18.0), np.deg2rad(3.0), 0.0, np.deg2rad(-2.0), (4.0, -2.0, 1.0))
    follow = sitk.Resample(follow, base, move, sitk.sitkLinear, 0.0) * 1.1
    paths = []
    for name, img in (("baseline", base), ("followup", follow)):
        a = sitk.GetArrayFromImage(img)
        noisy = sitk.GetImageFromArray((a + rng.normal(0, 0.01 * a.max(), a.shape)).clip(0).astype(np.float32))
        noisy.CopyInformation(base)
        paths.append(folder / f"{name}.nii.gz")
        sitk.WriteImage(noisy, str(paths[-1]), True)
    return paths[0], paths[1]


# Runs a command and prints the largest peak RSS of it and its workers: getrusage(RUSAGE_CHILDREN) in the
# benchmark itself would keep the maximum of every earlier child too.
MEASURE = r"""
import json, resource, subprocess, sys
out = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(out.stdout)
sys.stderr.write(out.stderr[-3000:])
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
sys.exit(out.returncode)
"""


def run_child(args: list[str]) -> tuple[float, float, float, str]:
    """(wall s, CPU s of the command and its workers, peak RSS MB of its largest process, its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed: {' '.join(args[:2])}...\n{out.stderr[-3000:]}")
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = out.stdout.strip().splitlines()
    return wall, cpu, json.loads(lines[-1])["peak_rss_mb"], "\n".join(lines[:-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--sets", nargs="+", default=["easy", "hard", "dicom", "fundus"])
    ap.add_argument("--jobs", nargs="+", type=int, default=[1, 2])
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline, followup = make_pair(tmp)
        wall, cpu, rss, out = run_child([sys.executable, "-c", PAIR_SCRIPT, str(baseline), str(followup), str(tmp / "out")])
        result = json.loads(out.strip().splitlines()[-1])
        print("\ncompare, 1 mm brain pair (197x233x189), fresh process:")
        print(f"  wall {wall:.1f} s (compare {result['compare_s']:.1f} s + report), CPU {cpu:.1f} s, peak RSS {rss:.0f} MB")
        print("  stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["stages_s"].items()))
        print(f"  verdict: progression={result['progression']}, {result['flagged']} flagged findings; the new 6 mm "
              f"lesion {'found' if result['lesion_found'] else 'MISSED'}, {result['other_findings']} other findings")
        if args.skip_batch:
            return
        print("\nbatch over sample_studies/ (" + ", ".join(args.sets) + "):")
        for jobs in args.jobs:
            out_dir = tmp / f"batch{jobs}"
            walls, cpus, rsss = 0.0, 0.0, 0.0
            for s in args.sets:
                w, c, r, _ = run_child([sys.executable, "-m", "longitudinal.cli", "batch", str(ROOT / "sample_studies" / s),
                                        "-o", str(out_dir / s), "--jobs", str(jobs), "--no-progress"])
                walls, cpus, rsss = walls + w, cpus + c, max(rsss, r)
            pairs = sum(1 for _ in out_dir.rglob("result.json"))
            print(f"  --jobs {jobs}: {pairs} pairs in {walls:.1f} s wall, {cpus:.1f} CPU s "
                  f"(cores used {cpus / walls:.2f}), peak RSS of the largest process {rsss:.0f} MB")
            shutil.rmtree(out_dir)


if __name__ == "__main__":
    main()
