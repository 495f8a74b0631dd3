"""Same input, same output: `batch` run twice over the sample studies, once with --jobs 1 and once with --jobs 2,
each in a fresh process and a fresh output folder, then every output file compared.

    python benchmarks/determinism.py [--sets easy hard dicom fundus] [--out /tmp/determinism]

result.json is compared with its run-dependent fields left out (`created`, `timings_s`, the software block's
timings); every other file (NIfTI maps, CSV, DICOM SEG/SR are left out: they carry fresh UIDs by design) byte
for byte. Prints, per set, how many files were identical and names every one that was not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_DEPENDENT = {"created", "timings_s", "seconds", "elapsed_s", "wall_s"}
SKIPPED_SUFFIXES = (".dcm", ".html", ".log")  # fresh UIDs / timestamps by design; the page embeds the created time


def _strip(doc):
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if k not in RUN_DEPENDENT}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


def digest(path: Path) -> str:
    if path.name.endswith(".json"):
        return json.dumps(_strip(json.loads(path.read_text())), sort_keys=True)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_of(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(SKIPPED_SUFFIXES)
            and p.name not in ("summary.csv", "summary.json", "summary.md")}


def run(studies: Path, out: Path, jobs: int) -> float:
    """One batch in a fresh process and an emptied folder (batch resumes from complete folders: a leftover of an
    earlier run would be compared instead); its wall time. A batch that fails is reported, not compared."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "longitudinal"), "batch", str(studies), "-o", str(out),
                           "--jobs", str(jobs), "--no-dicom-out"], capture_output=True, text=True)
    if done.returncode not in (0, 4):  # 4: some pair was not comparable (`longitudinal batch --help`)
        raise SystemExit(f"batch {studies} --jobs {jobs} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["easy", "hard", "dicom", "fundus"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/determinism"))
    args = ap.parse_args()
    differing = 0
    for name in args.sets:
        studies = ROOT / "sample_studies" / name
        first, second = args.out / name / "jobs1", args.out / name / "jobs2"
        t1, t2 = run(studies, first, 1), run(studies, second, 2)
        a, b = files_of(first), files_of(second)
        same = [k for k in a if b.get(k) == a[k]]
        other = sorted(set(a) ^ set(b)) + [k for k in a if k in b and b[k] != a[k]]
        differing += len(other)
        print(f"{name}: {len(same)}/{len(set(a) | set(b))} files identical (--jobs 1: {t1:.0f} s, --jobs 2: {t2:.0f} s)")
        for k in other:
            print(f"  differs: {k}")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
