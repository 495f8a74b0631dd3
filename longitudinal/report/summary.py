"""A batch's `summary.csv` and `summary.html`: one row per pair, worst first, coloured by verdict.

Rows are built only from what each pair's result.json says (and the timeline's dates), so a resumed run, which
reads earlier results back, writes the same summary as a fresh run; only `computed_at` tells them apart.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .. import __version__
from . import wording as w
from .figures import figure_data_uri, new_figure
from .page import render
from .result import FILES

Status = Literal["ok", "failed"]


@dataclass(frozen=True)
class PairResult:
    """One row of the summary; `patient` is the pseudonym in de-identified runs."""

    index: int  # 1-based position in discovery order
    patient: str
    baseline: str  # visit ids
    followup: str
    baseline_date: str | None  # ISO dates from the timeline
    followup_date: str | None
    interval_days: int | None
    folder: str  # relative to the batch output folder ("" when nothing was written)
    status: Status  # failed: no verdict (unreadable input, a crash, outputs that could not be written)
    verdict: str | None = None  # "progression" | "no progression" | "not comparable"
    progression_score: float | None = None
    strongest_change: float | None = None  # ranks pairs within a verdict (result.json's; None in older results)
    threshold: float | None = None
    n_findings: int | None = None
    registration_suspect: bool | None = None
    reason: str | None = None  # why not comparable
    identical_inputs: bool | None = None
    error: str | None = None
    computed_at: str | None = None  # when the result was computed (result.json's `created`)
    reused: bool = False  # read back from an earlier run; not shown, so a resumed summary reads like a fresh one

    @property
    def progression(self) -> bool:
        return self.verdict == "progression"

    @classmethod
    def from_result(cls, identity: Mapping, doc: Mapping, reused: bool = False) -> PairResult:
        """The row of a pair whose outputs were written: everything from its result.json document."""
        score, strongest = doc.get("progression_score"), doc.get("strongest_change")
        return cls(**identity, status="ok", verdict=doc.get("verdict"),
                   progression_score=None if score is None else float(score),
                   strongest_change=None if strongest is None else float(strongest),
                   threshold=None if doc.get("threshold") is None else float(doc["threshold"]),
                   n_findings=None if doc.get("verdict") == "not comparable" else int(doc.get("n_flagged") or 0),
                   registration_suspect=bool((doc.get("registration") or {}).get("suspect")),
                   reason=doc.get("reason"), identical_inputs=bool(doc.get("identical_inputs")),
                   computed_at=doc.get("created"), reused=reused)

    @classmethod
    def failure(cls, identity: Mapping, error: str) -> PairResult:
        return cls(**identity, status="failed", error=error)


_VERDICT_ORDER = {"progression": 0, "no progression": 1, "not comparable": 2}
VERDICT_CSS = {"progression": "pos", "no progression": "neg", "not comparable": "nc"}


def worst_first(results: Sequence[PairResult]) -> list[PairResult]:
    """Progression, then no progression, not comparable, failed; within each, the strongest change first (the
    number comparable between pairs; results without it after, by highest score)."""
    def key(r: PairResult):
        strongest, score = w.finite(r.strongest_change), w.finite(r.progression_score)
        order = 3 if r.status == "failed" else _VERDICT_ORDER.get(r.verdict or "", 3)
        return (order, -strongest if strongest is not None else math.inf,
                -score if score is not None else math.inf, r.index)

    return sorted(results, key=key)


CSV_FIELDS = ("rank", "patient", "baseline_visit", "followup_visit", "baseline_date", "followup_date",
              "interval_days", "status", "verdict", "progression_score", "strongest_change", "threshold",
              "n_findings", "registration_suspect", "identical_inputs", "reason", "report", "error", "computed_at")


def summary_csv(results: Sequence[PairResult]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()

    def cell(v: object) -> object:
        return "" if v is None else f"{v:.6g}" if isinstance(v, float) else v

    for rank, r in enumerate(worst_first(results), start=1):
        writer.writerow({k: cell(v) for k, v in {
            "rank": rank, "patient": r.patient, "baseline_visit": r.baseline, "followup_visit": r.followup,
            "baseline_date": r.baseline_date, "followup_date": r.followup_date, "interval_days": r.interval_days,
            "status": r.status, "verdict": r.verdict, "progression_score": r.progression_score,
            "strongest_change": r.strongest_change, "threshold": r.threshold, "n_findings": r.n_findings,
            "registration_suspect": r.registration_suspect,
            "identical_inputs": r.identical_inputs, "reason": r.reason,
            "report": f"{r.folder}/{FILES['report']}" if r.status == "ok" else None, "error": r.error,
            "computed_at": r.computed_at}.items()})
    return buf.getvalue()


def timeline_plot(patient: str, rows: Sequence[PairResult], first_date: str | None, against: str) -> str:
    """Highest score against follow-up date (or visit order when dates are missing), coloured by verdict."""
    fig = new_figure(figsize=(5.2, 2.6), layout="constrained")
    ax = fig.add_subplot()
    rows = sorted(rows, key=lambda r: (r.followup_date or "", r.index))
    dated = all(r.followup_date for r in rows)
    xs = [dt.date.fromisoformat(r.followup_date) for r in rows] if dated else list(range(1, len(rows) + 1))
    ys = [r.progression_score for r in rows]
    ax.plot(xs, ys, color="#2f3a4f", linewidth=1.2, zorder=1)
    colours = ["#b3261e" if r.progression else "#1e7b45" for r in rows]
    ax.scatter(xs, ys, c=colours, s=36, zorder=2, edgecolors="white")
    threshold = next((r.threshold for r in rows if r.threshold is not None), None)
    if threshold is not None:
        ax.axhline(threshold, color="#e0a100", linestyle="--", linewidth=1, label=f"threshold {threshold:.2f}")
        ax.legend(fontsize=7, loc="best", frameon=False)
    if dated and first_date:
        ax.axvline(dt.date.fromisoformat(first_date), color="#8a93a3", linewidth=0.8, linestyle=":")
    ax.set_ylabel("highest score", fontsize=8)
    ax.set_xlabel("follow-up date" if dated else "follow-up number", fontsize=8)
    ax.set_title(f"{patient}: score vs {'baseline' if against == 'baseline' else 'previous visit'}", fontsize=9)
    ax.tick_params(labelsize=7)
    if dated:
        fig.autofmt_xdate()
    return figure_data_uri(fig, 90)


@dataclass(frozen=True)
class Row:
    """A summary row as the page shows it."""

    css: str
    rank: int
    patient: str
    baseline: str
    baseline_date: str
    followup: str
    followup_date: str
    interval: str
    verdict: str
    verdict_css: str
    score: str
    strongest: str
    findings: str
    alignment: str
    report: str | None
    problem: str
    computed_at: str


def _row(rank: int, r: PairResult) -> Row:
    if r.status == "failed":
        verdict, css = "failed", "failed"
    else:
        verdict, css = (r.verdict or "–"), VERDICT_CSS.get(r.verdict or "", "failed")
    alignment = "" if r.registration_suspect is None else ("suspect" if r.registration_suspect else "passed")
    problem = r.error or r.reason or ("inputs are identical" if r.identical_inputs else "")
    return Row(css=css, rank=rank, patient=r.patient, baseline=r.baseline,
               baseline_date="" if r.baseline_date in (None, r.baseline) else r.baseline_date,
               followup=r.followup, followup_date="" if r.followup_date in (None, r.followup) else r.followup_date,
               interval="" if r.interval_days is None else w.interval_text(r.interval_days),
               verdict=verdict, verdict_css=css, score=w.number(r.progression_score, ".2f"),
               strongest=w.number(r.strongest_change, ".1f"),
               findings="" if r.n_findings is None else str(r.n_findings), alignment=alignment,
               report=f"{r.folder}/{FILES['report']}" if r.status == "ok" else None, problem=problem,
               computed_at=_when(r.computed_at))


def _when(iso: str | None) -> str:
    """'2026-11-30T16:19:38+00:00' as '2026-11-30 16:19 UTC' (the CSV keeps the full time stamp)."""
    try:
        t = dt.datetime.fromisoformat(iso or "")
    except ValueError:
        return iso or ""
    if t.utcoffset() is not None:
        t = t.astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M") + (" UTC" if t.tzinfo else "")


def counts(results: Sequence[PairResult]) -> dict[str, int]:
    out = {"progression": 0, "no progression": 0, "not comparable": 0, "failed": 0}
    for r in results:
        out["failed" if r.status == "failed" else (r.verdict or "failed")] += 1
    return out


def _embedded(png: Path) -> str:
    """A PNG as a data URI: the summary stays one self-contained page."""
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def summary_html(results: Sequence[PairResult], first_dates: Mapping[str, str | None], n_visits: Mapping[str, int],
                 against: str, deidentify: bool, lesion_plots: Mapping[str, Path] | None = None) -> str:
    """The page: counts per verdict, the table worst first, score timelines of patients with 3+ visits, and each
    tracked lesion's volume over the visits (`lesion_plots`: patient -> PNG file, embedded)."""
    by_patient: dict[str, list[PairResult]] = {}
    for r in results:
        if r.status == "ok" and r.progression_score is not None:
            by_patient.setdefault(r.patient, []).append(r)
    plots = [timeline_plot(p, rows, first_dates.get(p), against) for p, rows in sorted(by_patient.items())
             if n_visits.get(p, 0) >= 3 and len(rows) >= 2]
    return render("summary.html.j2", rows=[_row(k, r) for k, r in enumerate(worst_first(results), start=1)],
                  counts=counts(results), total=len(results), plots=plots, deidentify=deidentify,
                  lesion_plots=[(patient, _embedded(path)) for patient, path in sorted((lesion_plots or {}).items())],
                  against="baseline" if against == "baseline" else "previous visit", version=__version__,
                  columns=[(w.column_label(c), c) for c in (
                      "rank", "patient", "baseline_visit", "followup_visit", "interval_days", "verdict",
                      "progression_score", "strongest_change", "n_findings", "registration_suspect", "report", "error",
                      "computed_at")])
