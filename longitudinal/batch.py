"""Every follow-up of every patient in a studies folder, one report folder per pair, and a summary on top.

`OUT/<patient>/<follow-up visit>/` holds what `report.write_outputs` writes; `OUT/summary.csv` and
`OUT/summary.html` list every pair, worst first, with failures and their reasons. Re-running skips pairs whose
folder is complete and whose inputs (file sizes and modification times), pipeline settings and package version
are unchanged, so an interrupted cohort run resumes where it stopped; the summary it writes is the one a fresh
run would write, but for the `computed_at` column.

Nothing about one patient stops the others: a folder that cannot be listed, an input that cannot be
fingerprinted or loaded, a comparison that fails or outputs that cannot be written become that pair's (or that
patient's) failed row, and the summary is always written (or the run says it could not).

De-identified runs use a keyed pseudonym for patients (folder names too). The key is kept in `OUT/.deid_key`
so pseudonyms stay stable when a run resumes; delete or move that file before sharing the folder if recipients
must not be able to test guessed patient IDs against the pseudonyms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import __version__, interop, report
from .compare import Comparison
from .errors import InputError
from .io import Image, atomic_write_text, clean_stale_temp
from .pipeline import Pipeline
from .report.summary import PairResult, counts, summary_csv, summary_html
from .timeline import Pair, Patient, TimelineSettings, discover, pairs

log = logging.getLogger(__name__)

DEID_KEY_FILE = ".deid_key"
SUMMARY_CSV = "summary.csv"
SUMMARY_HTML = "summary.html"
_RESERVED = {SUMMARY_CSV, SUMMARY_HTML, DEID_KEY_FILE}

CompareFn = Callable[[Image, Image, Pipeline], Comparison]

__all__ = ["BatchSummary", "PairResult", "pipeline_hash", "run_batch"]


@dataclass(frozen=True)
class BatchSummary:
    out_dir: Path
    results: tuple[PairResult, ...]  # discovery order
    summary_csv: Path | None  # None when it could not be written (summary_error says why)
    summary_html: Path | None
    summary_error: str | None = None

    def count(self, verdict: str) -> int:
        """Pairs with this verdict ("progression", "no progression", "not comparable") or "failed"."""
        return counts(self.results)[verdict]

    @property
    def not_comparable(self) -> int:
        return self.count("not comparable")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def ok(self) -> int:
        """Pairs compared in this run (with any verdict)."""
        return sum(r.status == "ok" and not r.reused for r in self.results)

    @property
    def skipped(self) -> int:
        """Pairs whose earlier result was still current."""
        return sum(r.reused for r in self.results)


@dataclass(frozen=True)
class _Task:
    """Everything a worker needs for one pair; picklable (spawned workers get it by value)."""

    index: int
    total: int
    pair: Pair
    out_dir: Path
    folder: str
    patient: str  # as shown: the pseudonym when de-identified
    pipeline: Pipeline | None
    stamp: dict
    context: report.OutputContext
    compare_fn: CompareFn | None
    threads: int = 0  # threads for every library in a worker; 0: leave the process's setting alone
    interop: interop.PairPlan | None = None  # BIDS files, DICOM SEG/SR, findings record (interop.py)

    @property
    def identity(self) -> dict:
        """The row fields every outcome of this pair shares."""
        p = self.pair
        return dict(index=self.index, patient=self.patient, baseline=_visit_name(p.baseline.id, self),
                    followup=_visit_name(p.followup.id, self), baseline_date=_date(p.baseline.date),
                    followup_date=_date(p.followup.date), interval_days=p.interval_days, folder=self.folder)

    @property
    def cost(self) -> int:
        """Voxels to compare: long pairs go first, so parallel workers finish together."""
        n = 1
        for v in (self.pair.baseline, self.pair.followup):
            for s in v.size:
                n *= max(int(s), 1)
        return n


# --------------------------------------------------------------------------- fingerprints


def _stat(path: Path, name: str) -> list:
    """[name, size, mtime] of a file, or [name, why it cannot be read] (a broken link, a loop): the stamp
    stays stable, and the loader, not the fingerprint, decides whether the visit is usable."""
    try:
        st = path.stat()
    except OSError as exc:
        return [name, f"unreadable: {exc.strerror or type(exc).__name__}"]
    return [name, st.st_size, st.st_mtime_ns]


def _fingerprint(path: Path) -> list:
    """Sizes and modification times of an input file or of every file of an input folder (DICOM series).
    Raises OSError only when `path` itself cannot be read."""
    path = Path(path)
    if not path.is_dir():
        path.stat()  # the input itself must exist
        return [_stat(path, path.name)]
    out = []
    for root, dirs, files in os.walk(path, onerror=_raise):
        dirs.sort()
        for name in sorted(files):
            f = Path(root, name)
            out.append(_stat(f, str(f.relative_to(path))))
    return out


def _raise(exc: OSError) -> None:
    raise exc


def pipeline_hash(pipeline: Pipeline | None) -> str:
    """Content hash of a pipeline's effective settings and of any file they point to (label maps, models)."""
    stages = getattr(pipeline, "stages", {}) or {}
    files = []
    for settings in stages.values():
        if dataclasses.is_dataclass(settings):
            for f in dataclasses.fields(settings):
                value = getattr(settings, f.name)
                if isinstance(value, Path) and value.exists():
                    files.append([f.name, _fingerprint(value)])
    doc = {"name": getattr(pipeline, "name", None), "version": getattr(pipeline, "version", None),
           "stages": report.jsonable(stages), "files": files}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _stamp(pair: Pair, pipe_hash: str, against: str, deidentify: bool) -> dict:
    """What a finished folder must match to be skipped. Hashed, because input paths may name the patient."""
    doc = {
        "baseline": [str(pair.baseline.path), pair.baseline.series_uid, _fingerprint(pair.baseline.path)],
        "followup": [str(pair.followup.path), pair.followup.series_uid, _fingerprint(pair.followup.path)],
        "pipeline": pipe_hash,
        "against": against,
        "deidentify": deidentify,
        "longitudinal": __version__,
    }
    return {"inputs_sha256": hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()}


# --------------------------------------------------------------------------- names


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._") or "unnamed"


def _short_hash(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]


def unique_names(names: Mapping[str, str], tag: Callable[[str], str] = _short_hash) -> dict[str, str]:
    """Folder names for distinct ids (keys), made from how they are shown (values). A name the filesystem would
    change (separators, '..', unicode, leading dots) always gets a suffix, `tag(id)` (a short hash), and so
    does one of the summary's own file names; a name kept as it is gets one only when another kept name equals
    it but for case (case-insensitive filesystems)."""
    first = {i: _safe(n) for i, n in names.items()}
    kept = Counter(s.lower() for i, s in first.items() if s == names[i])
    out = {}
    for i, s in first.items():
        if s != names[i] or kept[s.lower()] > 1 or s.lower() in _RESERVED:
            s = f"{s}-{tag(i)}"
        out[i] = s
    if len({s.lower() for s in out.values()}) != len(out):  # a hash clash: never two ids in one folder
        raise ValueError("two ids map to one folder name")
    return out


def _deid_key(out_dir: Path) -> bytes:
    path = out_dir / DEID_KEY_FILE
    if path.is_file():
        return bytes.fromhex(path.read_text().strip())
    key = os.urandom(32)
    atomic_write_text(path, key.hex() + "\n", mode=0o600)  # readable by its owner only
    return key


def _secrets(patient: Patient) -> tuple[str, ...]:
    found = {patient.id}
    for v in patient.visits:
        found.update(s for s in (v.patient_id, v.header_patient_id) if s)
    return tuple(sorted(found, key=lambda s: (-len(s), s)))


def _date(d) -> str | None:
    return d.isoformat() if d is not None else None


def _visit_name(visit_id: str, task: _Task) -> str:
    if not task.context.deidentify:
        return visit_id
    return report.scrub(visit_id, task.context.secrets, task.patient) or ""


# --------------------------------------------------------------------------- one pair (runs in workers)


def init_worker() -> None:
    """One thread per worker for every library, so `jobs` workers use `jobs` cores (batch and evaluate)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = "1"  # torch reads OMP_NUM_THREADS when it is first imported
    _set_threads(1)


def _set_threads(n: int) -> None:
    """Threads of ITK and torch in this worker, for the pair it runs next (torch not yet imported reads them
    from the environment)."""
    import SimpleITK as sitk

    os.environ["OMP_NUM_THREADS"] = str(n)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _error_text(exc: BaseException, task: _Task) -> str:
    text = str(exc) if isinstance(exc, (InputError, report.OutputError)) else f"{type(exc).__name__}: {exc}"
    if task.context.deidentify:
        text = report.scrub(text, task.context.secrets, task.patient) or ""
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _read_result(task: _Task, reused: bool) -> PairResult:
    """The pair's row, from the result.json in its folder: the one place a row with a verdict is built."""
    doc = json.loads((task.out_dir / task.folder / report.OUTPUT_FILES["result"]).read_text(encoding="utf-8"))
    return PairResult.from_result(task.identity, doc, reused=reused)


def _run_pair(task: _Task) -> PairResult:
    try:
        compare_fn = task.compare_fn
        if compare_fn is None:
            from .compare import compare as compare_fn
        if task.threads:
            _set_threads(task.threads)  # after the import: torch is loaded by then
        limits = task.pipeline.input if task.pipeline is not None else None
        baseline = task.pair.baseline.load(settings=limits)
        followup = task.pair.followup.load(settings=limits)
        comparison = compare_fn(baseline, followup, task.pipeline)
        if task.interop is not None:  # before the report, whose `.complete` marks the folder finished
            (task.out_dir / task.folder / report.COMPLETE).unlink(missing_ok=True)
            interop.write_pair(task.interop, comparison, task.out_dir)
        report.write_outputs(comparison, task.out_dir / task.folder, task.context, stamp=task.stamp)
        return _read_result(task, reused=False)
    except Exception as exc:  # one bad pair must not stop a cohort run; the summary carries the reason
        log.warning("pair %d/%d failed (%s); see %s", task.index, task.total, type(exc).__name__, SUMMARY_CSV)
        log.debug("pair %d/%d traceback", task.index, task.total, exc_info=not task.context.deidentify)
        return PairResult.failure(task.identity, _error_text(exc, task))


# --------------------------------------------------------------------------- the run


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="pair", desc="comparing", file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def _plan(found: list[Patient], out: Path, pipeline: Pipeline | None, against: str, deidentify: bool,
          key: bytes | None, pipe_hash: str, report_settings: report.ReportSettings,
          compare_fn: CompareFn | None, studies: Path, layout: interop.Layout, dicom_out: bool | None,
          ) -> tuple[list[_Task], list[PairResult], dict[str, Patient]]:
    """Tasks for every pair, and failed rows for pairs whose inputs cannot even be fingerprinted."""
    patients = [p for p in found if p.problem is None]
    shown = {p.id: (report.pseudonym(p.id, key) if key is not None else p.id) for p in patients}
    # de-identified: a suffix must not be an unkeyed hash of an id (anyone could test guesses against it)
    tag = _short_hash if key is None else (lambda i: report.pseudonym(i, key)[-8:])
    patient_dirs = unique_names(shown, tag)
    all_pairs = [(p, pr) for p in patients for pr in pairs(p, against)]
    visit_dirs: dict[str, dict[str, str]] = {}
    for p in patients:
        secrets = _secrets(p) if deidentify else ()
        visit_dirs[p.id] = unique_names(
            {v.id: (report.scrub(v.id, secrets, shown[p.id]) or "") if deidentify else v.id for v in p.visits}, tag)
    tasks, failed = [], []
    for n, (patient, pair) in enumerate(all_pairs, start=1):
        name = shown[patient.id]
        folder = f"{patient_dirs[patient.id]}/{visit_dirs[patient.id][pair.followup.id]}"
        if layout == "bids":
            folder = f"{interop.BIDS_REPORTS}/{folder}"
        context = report.OutputContext(
            deidentify=deidentify, pseudonym=name if deidentify else None,
            secrets=_secrets(patient) if deidentify else (), key=key, patient_id=patient.id,
            summary_href=os.path.relpath(out / SUMMARY_HTML, out / folder).replace(os.sep, "/"),
            settings=report_settings)
        shown_visit = {v.id: (report.scrub(v.id, context.secrets, name) or "") if deidentify else v.id
                       for v in (pair.baseline, pair.followup)}
        plan = interop.plan_pair(patient.visits, pair, name, shown_visit[pair.baseline.id],
                                 shown_visit[pair.followup.id], folder, studies=studies, layout=layout,
                                 dicom_out=dicom_out, deidentify=deidentify, deid_key=key)
        task = _Task(index=n, total=len(all_pairs), pair=pair, out_dir=out, folder=folder, patient=name,
                     pipeline=pipeline, stamp={}, context=context, compare_fn=compare_fn, interop=plan)
        try:
            tasks.append(dataclasses.replace(task, stamp=_stamp(pair, pipe_hash, against, deidentify)))
        except OSError as exc:  # an input vanished or its folder cannot be listed: this pair only
            failed.append(PairResult.failure(task.identity, _error_text(
                InputError(exc.filename or pair.followup.path, exc.strerror or str(exc)), task)))
    return tasks, failed, {shown[p.id]: p for p in patients}


def run_batch(
    studies_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    pipeline: Pipeline | str | os.PathLike | None,
    jobs: int = 1,
    against: Literal["baseline", "previous"] = "baseline",
    deidentify: bool = False,
    progress: bool = True,
    compare_fn: CompareFn | None = None,
    timeline: TimelineSettings = TimelineSettings(),
    report_settings: report.ReportSettings = report.ReportSettings(),
    output_layout: interop.Layout = "default",
    dicom_out: bool | None = None,
) -> BatchSummary:
    """Compare every follow-up with the baseline (or the previous visit) for every patient under studies_dir.

    pipeline: a `pipeline.Pipeline`, a shipped pipeline name / TOML path, or None (chosen per pair from its
    images). compare_fn defaults to `compare.compare`; with jobs > 1 it must be importable by name (spawned
    workers unpickle it). Raises InputError when the studies folder cannot be read at all; a pair that fails is
    recorded and the run goes on (`BatchSummary.failed`); a summary that cannot be written is reported in
    `BatchSummary.summary_error`. output_layout "bids": a BIDS-derivatives dataset (`bids_out`), the per-pair
    report folders under `OUT/reports/`. dicom_out: DICOM SEG/SR per pair (None: when the follow-up is DICOM).
    Findings are tracked across each patient's visits (`tracking`: lesions.tsv and a plot per patient).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, not {jobs}")
    if against not in ("baseline", "previous"):
        raise ValueError(f"against must be 'baseline' or 'previous', not {against!r}")
    if isinstance(pipeline, (str, os.PathLike)):
        from .pipeline import load

        pipeline = load(pipeline)
    out = Path(out_dir)
    found = discover(studies_dir, timeline, strict=False)
    try:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_temp(out, recursive=True)  # temp files of writers killed in an earlier run
        key = _deid_key(out) if deidentify else None
    except OSError as exc:
        raise report.OutputError(f"{out}: cannot write there ({exc.strerror or exc})") from exc
    pipe_hash = pipeline_hash(pipeline) + ":" + hashlib.sha256(repr(report_settings).encode()).hexdigest()[:16]
    tasks, unfingerprinted, patients = _plan(found, out, pipeline, against, deidentify, key, pipe_hash,
                                             report_settings, compare_fn, Path(studies_dir), output_layout, dicom_out)
    total = len(tasks) + len(unfingerprinted)
    log.info("%d patient(s), %d pair(s) against the %s visit, %d job(s)", len(patients), total, against, jobs)

    results: dict[int, PairResult] = {r.index: r for r in unfingerprinted}
    todo: list[_Task] = []
    for task in tasks:
        if report.is_complete(out / task.folder, task.stamp):
            try:
                results[task.index] = _read_result(task, reused=True)
                continue
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable result.json: recompute
        todo.append(task)
    reused = sum(r.reused for r in results.values())
    if reused:
        log.info("%d pair(s) up to date, skipped", reused)

    bar = _progress_bar(total, progress)
    bar.update(len(results))
    with contextlib.ExitStack() as stack:
        if not bar.disable:  # log lines go above the bar instead of through it
            from tqdm.contrib.logging import logging_redirect_tqdm

            stack.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger("longitudinal")]))
        stack.callback(bar.close)
        _run_all(todo, jobs, results, bar)

    unreadable = tuple(_unreadable(p, total + i + 1, key)
                       for i, p in enumerate(q for q in found if q.problem is not None))
    ordered = tuple(results[i] for i in sorted(results)) + unreadable
    lesion_plots = interop.finish_batch(out, [t.interop for t in tasks if t.interop is not None
                                              and results[t.index].status != "failed"],
                                        studies=studies_dir, layout=output_layout, deidentify=deidentify)
    return _write_summary(out, ordered, patients, against, deidentify,
                          {patient: out / rel for patient, rel in lesion_plots.items()})


def _write_summary(out: Path, results: tuple[PairResult, ...], patients: dict[str, Patient], against: str,
                   deidentify: bool, lesion_plots: Mapping[str, Path]) -> BatchSummary:
    first_dates = {name: _date(p.visits[0].date) for name, p in patients.items()}
    n_visits = {name: len(p.visits) for name, p in patients.items()}
    try:
        csv_path = atomic_write_text(out / SUMMARY_CSV, summary_csv(results))
        html_path = atomic_write_text(out / SUMMARY_HTML, summary_html(results, first_dates, n_visits, against,
                                                                      deidentify, lesion_plots))
    except OSError as exc:
        error = f"{out}: cannot write the summary ({exc.strerror or exc})"
        log.error("%s", error)
        return BatchSummary(out, results, None, None, error)
    summary = BatchSummary(out, results, csv_path, html_path)
    c = counts(results)
    log.info("batch done: %d progression, %d no progression, %d not comparable, %d failed (%d up to date)",
             c["progression"], c["no progression"], c["not comparable"], c["failed"], summary.skipped)
    return summary


def _run_all(todo: list[_Task], jobs: int, results: dict[int, PairResult], bar) -> None:
    todo = sorted(todo, key=lambda t: -t.cost)  # largest first: the small ones fill the gaps at the end
    if jobs == 1 or len(todo) <= 1:
        for task in todo:
            results[task.index] = _run_pair(task)
            _tick(bar, results)
        return
    context = multiprocessing.get_context("spawn")  # no fork: torch and ITK thread pools do not survive it
    queue = deque(todo)
    running: dict[Future, _Task] = {}
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context, initializer=init_worker) as pool:
        while queue or running:
            while queue and len(running) < jobs:
                task = queue.popleft()
                # the last `jobs` pairs: a worker that runs out of pairs leaves its core idle while the others
                # finish, so each of these runs with `jobs` threads and takes the idle cores over
                task = dataclasses.replace(task, threads=jobs if len(queue) < jobs else 1)
                try:
                    running[pool.submit(_run_pair, task)] = task
                except BrokenProcessPool as exc:
                    results[task.index] = PairResult.failure(task.identity, f"worker process died ({exc})")
                    _tick(bar, results)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                try:
                    results[task.index] = future.result()
                except BrokenProcessPool as exc:  # a worker died (out of memory, segfault): that pair failed
                    results[task.index] = PairResult.failure(task.identity, f"worker process died ({exc})")
                except Exception as exc:  # e.g. an unpicklable result
                    results[task.index] = PairResult.failure(task.identity, _error_text(exc, task))
                _tick(bar, results)


def _unreadable(patient: Patient, index: int, key: bytes | None) -> PairResult:
    """A summary row for a patient whose visits could not be read: listed as failed, the batch goes on."""
    name = report.pseudonym(patient.id, key) if key is not None else patient.id
    error = report.scrub(patient.problem or "", _secrets(patient), name) if key is not None else patient.problem
    return PairResult.failure(dict(index=index, patient=name, baseline="-", followup="-", baseline_date=None,
                                   followup_date=None, interval_days=None, folder=""), error or "unreadable")


def _tick(bar, results: dict[int, PairResult]) -> None:
    failed = sum(r.status == "failed" for r in results.values())
    if failed:
        bar.set_postfix(failed=failed, refresh=False)
    bar.update(1)
