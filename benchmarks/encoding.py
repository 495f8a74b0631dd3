"""Wall time and peak memory of encoding a 1 mm brain volume (nilearn's MNI152 T1, 197x233x189).

Usage: python benchmarks/encoding.py [--names efficientnet-lite0 efficientnet-lite2] [--modes 2d 2.5d]
       [--stages 1] [--threads 2] [--batch 8] [--stride 2]
Each configuration runs in a fresh subprocess so ru_maxrss is that run's own peak. Goal: lite0 2d < 20 s.
The defaults are the brain-mri pipeline's encoder (stage 1, grid stride 2); `--stages 1 2 4` adds the deeper
stages (the network then runs that far).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MNI = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _mni_path() -> Path:
    import nilearn

    return Path(nilearn.__file__).parent.parent / MNI


def run_one(name: str, mode: str, threads: int, batch: int, stages: tuple[int, ...], stride: int) -> dict:
    import nibabel as nib
    import numpy as np

    from longitudinal.encoding import Encoder, EncoderSettings, intensity_window

    t0 = time.perf_counter()
    vol = np.asarray(nib.load(_mni_path()).dataobj, dtype=np.float32)
    vol = np.ascontiguousarray(np.transpose(vol, (2, 1, 0)))  # nibabel (x, y, z) -> (z, y, x)
    window = intensity_window(vol, vol > 0)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t1 = time.perf_counter()
    encoder = Encoder(EncoderSettings(name=name, mode=mode, threads=threads, batch_size=batch, stages=stages,
                                      grid_stride=stride))
    t2 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF)
    fmap = encoder.encode(vol, window)
    after = resource.getrusage(resource.RUSAGE_SELF)
    t3 = time.perf_counter()
    return {
        "name": name, "mode": mode, "threads": threads, "stages": list(stages), "shape": list(vol.shape),
        "features": list(fmap.data.shape), "feature_MB": round(fmap.data.nbytes / 2**20, 1),
        "build_s": round(t2 - t1, 2), "encode_s": round(t3 - t2, 2), "load_s": round(t1 - t0, 2),
        # CPU seconds of the encode: what the wall time would be on one idle core
        "encode_cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
        "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_load_MB": round(rss_loaded, 1), "load_avg_1min": round(os.getloadavg()[0], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", nargs="+", default=["efficientnet-lite0", "efficientnet-lite2"])
    p.add_argument("--modes", nargs="+", default=["2d", "2.5d"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--stages", type=int, nargs="+", default=[1])
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--one", nargs=2, metavar=("NAME", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.threads, args.batch, tuple(args.stages), args.stride)))
        return
    print(f"{'encoder':20s} {'mode':5s} {'encode s':>9s} {'cpu s':>7s} {'build s':>8s} {'peak RSS MB':>12s} {'features':>22s} {'MB':>6s} {'load':>5s}")
    print(f"(stages {args.stages}, grid stride {args.stride}, threads {args.threads}, batch {args.batch}; "
          "'load' = 1-min load average of this machine after the run)")
    for name in args.names:
        for mode in args.modes:
            out = subprocess.run(
                [sys.executable, __file__, "--one", name, mode, "--threads", str(args.threads), "--batch", str(args.batch),
                 "--stride", str(args.stride), "--stages", *map(str, args.stages)],
                check=True, capture_output=True, text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{name:20s} {mode:5s} {r['encode_s']:9.2f} {r['encode_cpu_s']:7.2f} {r['build_s']:8.2f} {r['peak_rss_MB']:12.1f} "
                  f"{'x'.join(map(str, r['features'])):>22s} {r['feature_MB']:6.1f} {r['load_avg_1min']:5.1f}", flush=True)


if __name__ == "__main__":
    main()
