"""Batch throughput and how many cores a batch keeps busy: wall time, CPU time (user + sys of this process and
every worker) over wall time, per run with --jobs 1 and --jobs N, and the cost of a resume with nothing to do.

    python benchmarks/batch_throughput.py --studies sample_studies/easy --jobs 2        # the real compare
    python benchmarks/batch_throughput.py [--patients 4] [--spacing 3] [--jobs 2]      # a synthetic cohort

On a machine other programs share, CPU over wall also drops when the batch waits for a core it asked for. So
two more figures: "cores asked for", each process's threads' time on a CPU plus time waiting in the run queue
(/proc/<pid>/task/*/schedstat) over wall (above the core count when threads outnumber cores), and "workers
busy", the time workers spent inside a pair (its stage timings plus writing its outputs) over wall, which
contention slows but does not hide. The load average at the start is printed with the figures.

With no --studies, a cohort is built from the real MNI152 T1 shipped with nilearn (a growing painted lesion per
patient, 3 visits each) and compared with the tests' stand-in for compare (real registration and
harmonisation, |difference| as the score): the figures then measure the batch runner and the report stage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
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
        for date, radius in (("2020-01-01", 0.0), ("2020-07-01", 6.0), ("2021-01-01", 10.0)):
            img = with_lesion(base, centre, radius, 60.0) if radius else base
            arr = sitk.GetArrayFromImage(img) + rng.normal(0, 1.0, img.GetSize()[::-1]).astype(np.float32)
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(img)
            path = root / f"P{p:03d}" / f"{date}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(out, str(path), True)
            n += 1
    return n


class RunnableTime:
    """Sums, over this process and its descendants' threads, the time on a CPU plus the time waiting for one
    (/proc/<pid>/task/<tid>/schedstat), sampled every `period` s so threads that exit are still counted."""

    def __init__(self, period: float = 0.25):
        self.period, self.last, self._stop = period, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pids(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        out, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def _sample(self) -> None:
        for pid in self._pids():
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tasks:
                try:
                    on_cpu, waiting = (int(v) for v in Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[:2])
                except (OSError, ValueError):
                    continue
                self.last[(pid, int(tid))] = (on_cpu, waiting)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> RunnableTime:
        self._sample()
        self.start = dict(self.last)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def seconds(self) -> tuple[float, float]:
        """(on a CPU, waiting for one) since entering, in seconds."""
        cpu = wait = 0
        for key, (c, w) in self.last.items():
            c0, w0 = self.start.get(key, (0, 0))
            cpu, wait = cpu + c - c0, wait + w - w0
        return cpu / 1e9, wait / 1e9


def _pair_seconds(folder: Path) -> float:
    """How long a worker spent on a pair: its stages' timings plus writing its outputs."""
    result = json.loads((folder / "result.json").read_text())
    written = json.loads((folder / ".complete").read_text())["seconds"]
    return sum(result["timings_s"].values()) + sum(written.values())


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=Path, help="a studies folder (real compare); default: a synthetic cohort")
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--spacing", type=float, default=3.0, help="mm; the MNI template is resampled to this")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only-jobs", action="store_true", help="skip the --jobs 1 run")
    ap.add_argument("--pipeline", default=None, help="pipeline name or TOML (default: by image kind)")
    args = ap.parse_args()

    from longitudinal import batch

    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.studies:
            studies, compare_fn, pipeline = args.studies, None, args.pipeline
            print(f"studies: {studies}; compare = longitudinal.compare.compare")
        else:
            from test_report import TEST_PIPELINE, make_comparison

            studies, compare_fn, pipeline = tmp / "studies", make_comparison, TEST_PIPELINE
            images = build_cohort(studies, args.patients, args.spacing)
            print(f"cohort: {args.patients} patients, {images} images at {args.spacing:g} mm; compare = test scaffold")
        runs = {}
        for jobs in ([args.jobs] if args.only_jobs else sorted({1, args.jobs})):
            out = tmp / f"out{jobs}"
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            with RunnableTime() as rt:
                s = batch.run_batch(studies, out, pipeline=pipeline, jobs=jobs, compare_fn=compare_fn,
                                    progress=False)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            on_cpu, waiting = rt.seconds()
            runs[jobs] = wall
            n = len(s.results)
            stamps = [json.loads((out / r.folder / ".complete").read_text()) for r in s.results if r.status == "ok"]
            report_s = [c["seconds"].get("report", 0.0) for c in stamps]
            busy = sum(_pair_seconds(out / r.folder) for r in s.results if r.status == "ok")
            print(f"jobs={jobs}: {n} pairs in {wall:.1f} s wall, {60 * n / wall:.1f} pairs/min, "
                  f"failed={s.failed}; CPU (user+sys) {cpu:.1f} s = {cpu / wall:.2f} cores used; "
                  f"runnable {on_cpu + waiting:.1f} s (on CPU {on_cpu:.1f} + waiting {waiting:.1f}) = "
                  f"{(on_cpu + waiting) / wall:.2f} cores asked for; workers inside a pair {busy:.1f} s = "
                  f"{busy / wall:.2f} of {jobs} workers busy; report.html {np.mean(report_s):.2f} s/pair")
            t0 = time.perf_counter()
            again = batch.run_batch(studies, out, pipeline=pipeline, jobs=jobs, compare_fn=compare_fn,
                                    progress=False)
            print(f"  resume with nothing to do: {time.perf_counter() - t0:.2f} s, reused={again.skipped}")
        if len(runs) > 1:
            print(f"speed-up jobs={args.jobs} vs 1: {runs[1] / runs[args.jobs]:.2f}x")


if __name__ == "__main__":
    main()
