"""The size limit on a 10000x10000 RGB pair: `longitudinal compare` refusing it (the default) and comparing a
downsampled copy (`[input] too_large = "downsample"`), with wall time and peak memory from /usr/bin/time -v.

    python benchmarks/large_input.py                 # writes the pair to a temp folder (about 20 s), then runs both
    python benchmarks/large_input.py --size 6000 --keep /tmp/big

The pair is the sample fundus photograph (two visits) resampled to size x size pixels, so the downsampled
compare works on a real picture. Needs /usr/bin/time (apt-get install -y time).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
VISITS = ("2020-01-10", "2020-08-05")


def make_pair(folder: Path, size: int) -> list[Path]:
    paths = []
    for visit in VISITS:
        path = folder / f"{visit}.png"
        if not path.exists():
            small = sitk.ReadImage(str(ROOT / "sample_studies" / "fundus" / "F001" / visit / "fundus.png"))
            step = small.GetSize()[0] / size
            big = sitk.Resample(small, [size, size], sitk.Transform(), sitk.sitkLinear, (0.0, 0.0), (step, step),
                                (1.0, 0.0, 0.0, 1.0))
            sitk.WriteImage(big, str(path))
        paths.append(path)
    return paths


def measure(args: list[str]) -> tuple[int, float, float, str]:
    """(exit status, wall seconds, peak resident MB, last stderr/stdout line) of one command under time -v."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    said = [line for line in (done.stdout + done.stderr).splitlines()
            if line.startswith(("longitudinal:", "PROGRESSION", "no progression"))]
    return done.returncode, wall, int(peak.group(1)) / 1024 if peak else float("nan"), (said or [""])[-1][:160]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10000)
    parser.add_argument("--keep", type=Path, help="folder for the pair (kept); default: a temp folder")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="longitudinal-large-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        clock = time.perf_counter()
        a, b = make_pair(folder, args.size)
        print(f"pair: {args.size}x{args.size} RGB PNG, {a.stat().st_size / 1e6:.0f} + {b.stat().st_size / 1e6:.0f} MB "
              f"on disk (written in {time.perf_counter() - clock:.0f} s)")
        pipeline = folder / "downsample.toml"
        shipped = (ROOT / "pipelines" / "generic-2d.toml").read_text()  # the pipeline a picture gets, plus [input]
        pipeline.write_text(shipped.replace('name = "generic-2d"', 'name = "generic-2d-downsample"')
                            + '\n[input]\ntoo_large = "downsample"\n')
        base = [sys.executable, "-m", "longitudinal.cli", "compare", str(a), str(b)]
        for name, extra in (("refuse (default)", ["-o", str(folder / "out-refuse")]),
                            ("downsample", ["-o", str(folder / "out-down"), "--pipeline", str(pipeline)])):
            status, wall, peak, said = measure(base + extra)
            print(f"{name:18s} exit {status}  {wall:6.1f} s  peak {peak:7.0f} MB  {said}")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
