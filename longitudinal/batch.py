"""Every follow-up of every patient in a studies folder, one report folder per pair, and a summary on top.

`OUT/<patient>/<follow-up visit>/` holds what `report.write_outputs` writes; `OUT/summary.csv` and
`OUT/summary.html` list every pair, worst first, with failures and their reasons. Re-running skips pairs whose
folder is complete and whose inputs (file sizes and modification times), pipeline settings and package version
are unchanged, so an interrupted cohort run resumes where it stopped.

De-identified runs use a keyed pseudonym for patients (folder names too). The key is kept in `OUT/.deid_key`
so pseudonyms stay stable when a run resumes; delete or move that file before sharing the folder if recipients
must not be able to test guessed patient IDs against the pseudonyms.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import html
import io as _io
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import __version__, interop, report
from .errors import InputError
from .io import atomic_write_text
from .timeline import Pair, Patient, TimelineSettings, discover, pairs

log = logging.getLogger(__name__)

DEID_KEY_FILE = ".deid_key"
SUMMARY_CSV = "summary.csv"
SUMMARY_HTML = "summary.html"

CompareFn = Callable[[Any, Any, Any], Any]  # (baseline Image, follow-up Image, pipeline) -> Comparison


@dataclass(frozen=True)
class PairResult:
    """One row of the summary; `patient` is the pseudonym in de-identified runs."""

    index: int  # 1-based position in discovery order
    patient: str
    baseline: str  # visit ids
    followup: str
    baseline_date: str | None
    followup_date: str | None
    interval_days: int | None
    status: Literal["ok", "skipped", "failed"]  # skipped: up to date from an earlier run
    folder: str  # relative to the batch output folder
    progression_score: float | None = None
    progression: bool | None = None
    registration_suspect: bool | None = None
    n_flagged: int | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class BatchSummary:
    out_dir: Path
    results: tuple[PairResult, ...]  # discovery order
    summary_csv: Path
    summary_html: Path

    @property
    def ok(self) -> int:
        return sum(r.status == "ok" for r in self.results)

    @property
    def skipped(self) -> int:
        return sum(r.status == "skipped" for r in self.results)

    @property
    def failed(self) -> int:
        return sum(r.status == "failed" for r in self.results)

    @property
    def exit_code(self) -> int:
        """What the CLI returns: 1 when any pair failed."""
        return 1 if self.failed else 0


@dataclass(frozen=True)
class _Task:
    """Everything a worker needs for one pair; picklable (spawned workers get it by value)."""

    index: int
    total: int
    pair: Pair
    out_dir: Path
    folder: str
    patient: str  # as shown: the pseudonym when de-identified
    patient_id: str
    pipeline: Any
    stamp: dict
    deidentify: bool
    deid_key: bytes | None
    secrets: tuple[str, ...]
    report_settings: report.ReportSettings
    compare_fn: CompareFn | None
    interop: interop.PairPlan | None = None  # BIDS files, DICOM SEG/SR, findings record (interop.py)


# --------------------------------------------------------------------------- fingerprints


def _fingerprint(path: Path) -> list:
    """Sizes and modification times of an input file or every file of an input folder (DICOM series)."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            f = Path(root, name)
            st = f.stat()
            out.append([str(f.relative_to(path)), st.st_size, st.st_mtime_ns])
    return out


def pipeline_hash(pipeline: Any) -> str:
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
        for s in (v.patient_id, v.header_patient_id):
            if s:
                found.add(s)
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def _date(d: Any) -> str | None:
    return d.isoformat() if d is not None else None


# --------------------------------------------------------------------------- one pair (runs in workers)


def _init_worker() -> None:
    """One thread per worker for every library, so `jobs` workers use `jobs` cores."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = "1"  # torch reads OMP_NUM_THREADS when it is first imported
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _limit_torch_threads() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _error_text(exc: BaseException, task: _Task) -> str:
    text = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
    if task.deidentify:
        text = report.scrub(text, list(task.secrets), task.patient)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _run_pair(task: _Task) -> PairResult:
    t0 = time.perf_counter()
    pair = task.pair
    base = dict(index=task.index, patient=task.patient, baseline=_visit_name(pair.baseline.id, task),
                followup=_visit_name(pair.followup.id, task), baseline_date=_date(pair.baseline.date),
                followup_date=_date(pair.followup.date), interval_days=pair.interval_days, folder=task.folder)
    try:
        if os.environ.get("OMP_NUM_THREADS") == "1":
            _limit_torch_threads()
        compare_fn = task.compare_fn
        if compare_fn is None:
            from .compare import compare as compare_fn  # type: ignore[attr-defined]  # provided by the compare stage
        baseline = pair.baseline.load()
        followup = pair.followup.load()
        comparison = compare_fn(baseline, followup, task.pipeline)
        if task.interop is not None:  # before the report, whose `.complete` marks the folder finished
            (task.out_dir / task.folder / report.COMPLETE).unlink(missing_ok=True)
            interop.write_pair(task.interop, comparison, task.out_dir)
        report.write_outputs(comparison, task.out_dir / task.folder, deidentify=task.deidentify,
                             deid_key=task.deid_key, secrets=task.secrets, patient_id=task.patient_id,
                             stamp=task.stamp, settings=task.report_settings)
        return PairResult(**base, status="ok", **_figures(comparison), seconds=time.perf_counter() - t0)
    except Exception as exc:  # one bad pair must not stop a cohort run; the summary carries the reason
        log.warning("pair %d/%d failed (%s); see %s", task.index, task.total, type(exc).__name__, SUMMARY_CSV)
        log.debug("pair %d/%d traceback", task.index, task.total, exc_info=not task.deidentify)
        return PairResult(**base, status="failed", error=_error_text(exc, task), seconds=time.perf_counter() - t0)


def _visit_name(visit_id: str, task: _Task) -> str:
    return report.scrub(visit_id, list(task.secrets), task.patient) if task.deidentify else visit_id


def _figures(comparison: Any) -> dict:
    qc = getattr(comparison.registration, "qc", None)
    return {
        "progression_score": None if comparison.progression_score is None else float(comparison.progression_score),
        "progression": bool(comparison.progression),
        "registration_suspect": bool(getattr(qc, "suspect", False)),
        "n_flagged": sum(1 for r in comparison.regions if r.flagged),
    }


def _from_previous_run(task: _Task) -> PairResult:
    """A row for a skipped pair, read back from its result.json."""
    pair = task.pair
    r = json.loads((task.out_dir / task.folder / report.OUTPUT_FILES["result"]).read_text(encoding="utf-8"))
    return PairResult(index=task.index, patient=task.patient, baseline=_visit_name(pair.baseline.id, task),
                      followup=_visit_name(pair.followup.id, task), baseline_date=_date(pair.baseline.date),
                      followup_date=_date(pair.followup.date), interval_days=pair.interval_days, folder=task.folder,
                      status="skipped", progression_score=r.get("progression_score"), progression=r.get("progression"),
                      registration_suspect=(r.get("registration") or {}).get("suspect"), n_flagged=r.get("n_flagged"))


# --------------------------------------------------------------------------- the run


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="pair", desc="comparing", file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def run_batch(
    studies_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    pipeline: Any,
    jobs: int = 1,
    against: Literal["baseline", "previous"] = "baseline",
    deidentify: bool = False,
    progress: bool = True,
    compare_fn: CompareFn | None = None,
    timeline: TimelineSettings = TimelineSettings(),
    report_settings: report.ReportSettings = report.ReportSettings(),
    output_layout: Literal["default", "bids"] = "default",
    dicom_out: bool | None = None,
) -> BatchSummary:
    """Compare every follow-up with the baseline (or the previous visit) for every patient under studies_dir.

    pipeline: a `pipeline.Pipeline`, or a shipped pipeline name / TOML path. compare_fn defaults to
    `compare.compare`; with jobs > 1 it must be importable by name (spawned workers unpickle it).
    Raises InputError when the studies folder cannot be read at all; a pair that fails is recorded and the
    run goes on (`BatchSummary.failed`, `exit_code`).
    output_layout "bids": a BIDS-derivatives dataset (`bids_out`), the per-pair report folders under
    `OUT/reports/`. dicom_out: DICOM SEG/SR per pair (None: when the follow-up is DICOM; `dicom_out`).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, not {jobs}")
    if against not in ("baseline", "previous"):
        raise ValueError(f"against must be 'baseline' or 'previous', not {against!r}")
    if isinstance(pipeline, (str, os.PathLike)):
        from .pipeline import load

        pipeline = load(pipeline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    found = discover(studies_dir, timeline, strict=False)
    patients = [p for p in found if p.problem is None]
    key = _deid_key(out) if deidentify else None
    pipe_hash = pipeline_hash(pipeline) + ":" + hashlib.sha256(repr(report_settings).encode()).hexdigest()[:16]

    tasks: list[_Task] = []
    visits_of: dict[str, list] = {}
    all_pairs = [(p, pr) for p in patients for pr in pairs(p, against)]
    for patient, pair in all_pairs:
        name = report.pseudonym(patient.id, key) if deidentify else patient.id
        secrets = _secrets(patient) if deidentify else ()
        visit = report.scrub(pair.followup.id, list(secrets), name) if deidentify else pair.followup.id
        base_visit = report.scrub(pair.baseline.id, list(secrets), name) if deidentify else pair.baseline.id
        folder = interop.report_folder(name, visit, output_layout, _safe)
        tasks.append(_Task(index=len(tasks) + 1, total=len(all_pairs), pair=pair, out_dir=out, folder=folder,
                           patient=name, patient_id=patient.id, pipeline=pipeline, stamp=_stamp(pair, pipe_hash, against, deidentify),
                           deidentify=deidentify, deid_key=key, secrets=secrets,
                           report_settings=report_settings, compare_fn=compare_fn,
                           interop=interop.plan_pair(patient.visits, pair, name, base_visit, visit, folder,
                                                     studies=studies_dir, layout=output_layout, dicom_out=dicom_out,
                                                     deidentify=deidentify, deid_key=key)))
        visits_of[name] = list(patient.visits)
    log.info("%d patient(s), %d pair(s) against the %s visit, %d job(s)", len(patients), len(tasks), against, jobs)

    results: dict[int, PairResult] = {}
    todo: list[_Task] = []
    for task in tasks:
        if report.is_complete(out / task.folder, task.stamp):
            try:
                results[task.index] = _from_previous_run(task)
                continue
            except (OSError, ValueError):
                pass  # unreadable result.json: recompute
        todo.append(task)
    if results:
        log.info("%d pair(s) up to date, skipped", len(results))

    bar = _progress_bar(len(tasks), progress)
    bar.update(len(results))
    failures: list[int] = []
    with contextlib.ExitStack() as stack:
        if not bar.disable:  # log lines go above the bar instead of through it
            from tqdm.contrib.logging import logging_redirect_tqdm

            stack.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger("longitudinal")]))
        stack.callback(bar.close)
        _run_all(todo, jobs, results, bar, failures)

    unreadable = tuple(_unreadable(p, len(tasks) + i + 1, key if deidentify else None)
                       for i, p in enumerate(q for q in found if q.problem is not None))
    ordered = tuple(results[t.index] for t in tasks) + unreadable
    lesion_plots = interop.finish_batch(out, [t.interop for t in tasks if results[t.index].status != "failed"],
                                        studies=studies_dir, layout=output_layout, deidentify=deidentify)
    summary_csv = atomic_write_text(out / SUMMARY_CSV, _summary_csv(ordered))
    summary_html = atomic_write_text(
        out / SUMMARY_HTML, _summary_html(ordered, visits_of, against, deidentify, tasks, lesion_plots))
    summary = BatchSummary(out, ordered, summary_csv, summary_html)
    log.info("batch done: %d ok, %d skipped, %d failed", summary.ok, summary.skipped, summary.failed)
    return summary


def _run_all(todo: list[_Task], jobs: int, results: dict[int, PairResult], bar, failures: list[int]) -> None:
    if jobs == 1 or len(todo) <= 1:
        for task in todo:
            results[task.index] = _run_pair(task)
            _tick(bar, results[task.index], failures)
        return
    context = multiprocessing.get_context("spawn")  # no fork: torch and ITK thread pools do not survive it
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context, initializer=_init_worker) as pool:
        futures = {pool.submit(_run_pair, task): task for task in todo}
        for future in as_completed(futures):
            task = futures[future]
            try:
                results[task.index] = future.result()
            except BrokenProcessPool as exc:  # a worker died (out of memory, segfault): that pair failed
                results[task.index] = _crashed(task, f"worker process died ({exc})")
            except Exception as exc:  # e.g. an unpicklable result
                results[task.index] = _crashed(task, _error_text(exc, task))
            _tick(bar, results[task.index], failures)


def _unreadable(patient: Patient, index: int, key: bytes | None) -> PairResult:
    """A summary row for a patient whose visits could not be read: listed as failed, the batch goes on."""
    name = report.pseudonym(patient.id, key) if key is not None else patient.id
    error = report.scrub(patient.problem or "", list(_secrets(patient)), name) if key is not None else patient.problem
    return PairResult(index=index, patient=name, baseline="-", followup="-", baseline_date=None, followup_date=None,
                      interval_days=None, status="failed", folder="", error=error)


def _crashed(task: _Task, message: str) -> PairResult:
    pair = task.pair
    return PairResult(index=task.index, patient=task.patient, baseline=_visit_name(pair.baseline.id, task),
                      followup=_visit_name(pair.followup.id, task), baseline_date=_date(pair.baseline.date),
                      followup_date=_date(pair.followup.date), interval_days=pair.interval_days, folder=task.folder,
                      status="failed", error=message)


def _tick(bar, result: PairResult, failures: list[int]) -> None:
    if result.status == "failed":
        failures.append(result.index)
        bar.set_postfix(failed=len(failures), refresh=False)
    bar.update(1)


# --------------------------------------------------------------------------- summary


def _worst_first(results: tuple[PairResult, ...]) -> list[PairResult]:
    def key(r: PairResult):
        score = r.progression_score
        return (r.status == "failed", -(score if score is not None and math.isfinite(score) else -math.inf), r.index)

    return sorted(results, key=key)


_SUMMARY_FIELDS = ("rank", "patient", "baseline_visit", "followup_visit", "baseline_date", "followup_date",
                   "interval_days", "status", "progression_score", "progression", "registration_suspect", "n_flagged",
                   "report", "error")


def _summary_csv(results: tuple[PairResult, ...]) -> str:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for rank, r in enumerate(_worst_first(results), start=1):
        writer.writerow({
            "rank": rank, "patient": r.patient, "baseline_visit": r.baseline, "followup_visit": r.followup,
            "baseline_date": r.baseline_date or "", "followup_date": r.followup_date or "",
            "interval_days": "" if r.interval_days is None else r.interval_days, "status": r.status,
            "progression_score": "" if r.progression_score is None else f"{r.progression_score:.6g}",
            "progression": "" if r.progression is None else r.progression,
            "registration_suspect": "" if r.registration_suspect is None else r.registration_suspect,
            "n_flagged": "" if r.n_flagged is None else r.n_flagged,
            "report": "" if r.status == "failed" else f"{r.folder}/{report.OUTPUT_FILES['report']}",
            "error": r.error or "",
        })
    return buf.getvalue()


def _timeline_plot(patient: str, rows: list[PairResult], visits: list, against: str, threshold: float | None) -> str:
    """Progression score against follow-up date (or visit order when dates are missing)."""
    import datetime as dt

    fig = report.new_figure(figsize=(5.2, 2.6), layout="constrained")
    ax = fig.add_subplot()
    rows = sorted(rows, key=lambda r: (r.followup_date or "", r.index))
    dated = all(r.followup_date for r in rows)
    xs = [dt.date.fromisoformat(r.followup_date) for r in rows] if dated else list(range(1, len(rows) + 1))
    ys = [r.progression_score for r in rows]
    ax.plot(xs, ys, color="#2f3a4f", linewidth=1.2, zorder=1)
    colours = ["#b3261e" if r.progression else "#1e7b45" for r in rows]
    ax.scatter(xs, ys, c=colours, s=36, zorder=2, edgecolors="white")
    if threshold is not None:
        ax.axhline(threshold, color="#e0a100", linestyle="--", linewidth=1, label=f"threshold {threshold:.2f}")
        ax.legend(fontsize=7, loc="best", frameon=False)
    if dated and visits and visits[0].date is not None:
        ax.axvline(visits[0].date, color="#8a93a3", linewidth=0.8, linestyle=":")
    ax.set_ylabel("progression score", fontsize=8)
    ax.set_xlabel("follow-up date" if dated else "follow-up number", fontsize=8)
    ax.set_title(f"{patient}: score vs {'baseline' if against == 'baseline' else 'previous visit'}", fontsize=9)
    ax.tick_params(labelsize=7)
    if dated:
        fig.autofmt_xdate()
    return report.figure_data_uri(fig, 90)


def _summary_html(results: tuple[PairResult, ...], visits_of: dict[str, list], against: str, deidentify: bool,
                  tasks: list[_Task], lesion_plots: dict[str, str] | None = None) -> str:
    e = html.escape
    n_ok = sum(r.status != "failed" for r in results)
    n_failed = sum(r.status == "failed" for r in results)
    n_prog = sum(bool(r.progression) for r in results)
    rows = []
    for rank, r in enumerate(_worst_first(results), start=1):
        if r.status == "failed":
            verdict = "<span class='tag f'>failed</span>"
            link = "–"
        else:
            verdict = f"<span class='tag {'y' if r.progression else 'n'}'>{'progression' if r.progression else 'stable'}</span>"
            link = f"<a href='{e(r.folder)}/{report.OUTPUT_FILES['report']}'>report</a>"
        score = "–" if r.progression_score is None else f"{r.progression_score:.2f}"
        suspect = "" if r.registration_suspect is None else ("<span class='tag w'>suspect</span>" if r.registration_suspect else "ok")
        rows.append(
            f"<tr class='{r.status}'><td class='num'>{rank}</td><td>{e(r.patient)}</td><td>{e(r.baseline)}"
            f"<div class='d'>{e(r.baseline_date or '')}</div></td><td>{e(r.followup)}<div class='d'>{e(r.followup_date or '')}"
            f"</div></td><td class='num'>{score}</td><td>{verdict}</td><td>{suspect}</td>"
            f"<td class='num'>{'' if r.n_flagged is None else r.n_flagged}</td><td>{link}"
            f"{'' if r.status != 'skipped' else ' <span class=d>(earlier run)</span>'}</td>"
            f"<td class='err'>{e(r.error or '')}</td></tr>")
    threshold = _threshold(results, tasks)
    plots = []
    by_patient: dict[str, list[PairResult]] = {}
    for r in results:
        if r.status != "failed" and r.progression_score is not None:
            by_patient.setdefault(r.patient, []).append(r)
    for patient, prs in sorted(by_patient.items()):
        if len(visits_of.get(patient, [])) >= 3 and len(prs) >= 2:
            plots.append(f"<figure><img alt='timeline' src='{_timeline_plot(patient, prs, visits_of[patient], against, threshold)}'></figure>")
        if patient in (lesion_plots or {}):  # each tracked lesion's volume over time (tracking.plot_lesions)
            plots.append(f"<figure><img alt='lesions of {e(patient)}' src='{e(lesion_plots[patient])}'></figure>")
    css = report._CSS + """
table.sum{border-collapse:collapse;background:#fff;font-size:13px;width:100%}
table.sum th{background:#2f3a4f;color:#fff;text-align:left;padding:6px 8px;white-space:nowrap}
table.sum td{padding:5px 8px;border-bottom:1px solid #e6e9ef;vertical-align:top}
table.sum tr.failed td{background:#fff4d6} .d{color:#5b6475;font-size:11px} .err{color:#8a1c12;font-size:12px}
.tag.f{background:#8a1c12;color:#fff} .tag.w{background:#e0a100;color:#fff}
.plots{display:flex;flex-wrap:wrap;gap:10px} .plots figure{flex:0 0 auto;margin:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
"""
    head = ("rank", "patient", "baseline", "follow-up", "score", "verdict", "registration", "flagged regions",
            "report", "error")
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Batch summary</title><style>{css}</style>"
        f"</head><body><main><h1>Batch summary</h1><div class='sub'>{len(results)} pair(s) compared against the "
        f"{'baseline' if against == 'baseline' else 'previous visit'}: {n_ok} done, {n_failed} failed, "
        f"{n_prog} with progression{' · de-identified' if deidentify else ''} · longitudinal {e(__version__)}</div>"
        + ("<div class='warn'><b>⚠ Some pairs failed</b> — listed at the end of the table with the reason.</div>" if n_failed else "")
        + "<h2>Pairs, worst first</h2><table class='sum'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        + (("<h2>Timelines (patients with 3 or more visits)</h2><div class='plots'>" + "".join(plots) + "</div>") if plots else "")
        + "<footer>Scores are calibrated change scores; see each report for the threshold and its false-alarm rate. "
          "Not a diagnosis.</footer></main></body></html>"
    )


def _threshold(results: tuple[PairResult, ...], tasks: list[_Task]) -> float | None:
    """The flagging threshold, read from any finished pair (one pipeline per run, so one threshold)."""
    by_index = {t.index: t for t in tasks}
    for r in results:
        if r.status != "failed":
            try:
                doc = json.loads((by_index[r.index].out_dir / r.folder / report.OUTPUT_FILES["result"]).read_text())
                return float(doc["threshold"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return None
