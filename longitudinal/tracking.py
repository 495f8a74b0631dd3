"""Lesions tracked across visits: one ID per lesion, however many follow-ups found it.

Each compared pair leaves a findings record in its folder (`FindingsRecord.save`): the findings with their
measures, and their labels on both visits' grids. `track` links the findings of successive follow-ups of one
patient: two findings are the same lesion when their changed tissue overlaps, or comes within
`max_distance_mm`, on a grid both pairs share (the baseline's grid when every follow-up is compared with the
baseline; the visit in between when each is compared with the one before). Links are one-to-one, most overlap
first, then nearest (Hungarian assignment). With `--against baseline` a lesion missed at one follow-up is
found again at a later one (every pair shares the baseline grid); with `--against previous` only consecutive
pairs share a grid, so a lesion that stops changing and changes again later gets a new ID.

Each lesion keeps one ID (`L1`, `L2`, ... in order of first appearance) and one DICOM Tracking UID, derived from
the patient, the visit it was first seen at and its finding number there, so a rerun gives the same UIDs.
`lesion_table` writes `lesions.tsv` (+ `lesions.json`, the column descriptions): each lesion's volume at
every visit and, like FreeSurfer's `long_stats_slopes`, the temporal average (`avg`, the linear fit at the
middle of the visits), the rate (`rate`, the slope per year), the percent change per year relative to the
first visit's value (`pc1`) and relative to the average (`spc`), over the visits where the lesion was found.
The volume is what the pair measured: the finding's changed tissue against its reference visit (the baseline,
or the visit before), not a lesion segmentation.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import io as _io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .errors import InputError
from .io import atomic_write, atomic_write_text

RECORD_FILES = {"record": "findings.json", "labels": "finding_labels.nii.gz",
                "labels_baseline": "finding_labels_baseline.nii.gz"}
LESION_FILES = {"table": "lesions.tsv", "sidecar": "lesions.json", "plot": "lesions.png"}
_DAYS_PER_YEAR = 365.25


@dataclass(frozen=True)
class TrackingSettings:
    max_distance_mm: float = 5.0  # findings of two visits this close (or overlapping) may be one lesion


@dataclass(frozen=True)
class FindingMeasures:
    id: int
    volume_mm3: float  # changed tissue (2D: mm2)
    diameter_mm: float | None
    mean_change_pct: float | None
    score: float
    centre_mm: tuple[float, ...]


@dataclass(frozen=True, eq=False)
class FindingsRecord:
    """What a pair found, kept so lesions can be tracked and DICOM objects rebuilt after the pair is done."""

    baseline_visit: str
    followup_visit: str
    baseline_date: str | None  # YYYYMMDD
    followup_date: str | None
    findings: tuple[FindingMeasures, ...]
    labels: sitk.Image  # uint16 finding id per voxel, follow-up grid
    labels_baseline: sitk.Image  # the same on the baseline grid
    verdict: str
    progression_score: float | None  # the highest region score of the pair (None: not comparable)
    threshold: float
    modality: str | None
    pipeline: tuple[str, str]  # name, version
    encoder: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_comparison(cls, comparison, baseline_visit: str | None = None,
                        followup_visit: str | None = None) -> FindingsRecord:
        """The record of a `compare.Comparison`; visits are named by the caller (a batch's visit ids) or by date."""
        base, follow = comparison.baseline.meta, comparison.followup.meta
        findings = tuple(FindingMeasures(
            id=f.id, volume_mm3=float(f.volume_mm3), diameter_mm=f.diameter_mm, mean_change_pct=f.mean_change_pct,
            score=float(f.score), centre_mm=tuple(float(c) for c in f.centre_mm)) for f in comparison.findings)
        return cls(baseline_visit=baseline_visit or base.study_date or "baseline",
                   followup_visit=followup_visit or follow.study_date or "follow-up",
                   baseline_date=base.study_date, followup_date=follow.study_date, findings=findings,
                   labels=comparison.finding_labels.itk, labels_baseline=comparison.finding_labels_baseline.itk,
                   verdict=comparison.verdict,
                   progression_score=(None if comparison.progression_score is None
                                      else float(comparison.progression_score)),
                   threshold=float(comparison.threshold), modality=follow.modality,
                   pipeline=(comparison.pipeline.name, comparison.pipeline.version),
                   encoder={k: str(v) for k, v in dict(comparison.encoder or {}).items() if k in ("name", "sha256",
                                                                                                    "weights_sha256")})

    @property
    def planar(self) -> bool:
        return self.labels.GetDimension() == 2

    def save(self, folder: str | os.PathLike) -> list[Path]:
        """findings.json and the two label images (2D labels written as single-slice volumes)."""
        folder = Path(folder)
        doc = {"baseline_visit": self.baseline_visit, "followup_visit": self.followup_visit,
               "baseline_date": self.baseline_date, "followup_date": self.followup_date, "verdict": self.verdict,
               "progression_score": self.progression_score, "threshold": self.threshold, "modality": self.modality,
               "pipeline": list(self.pipeline), "encoder": self.encoder, "dim": self.labels.GetDimension(),
               "findings": [{"id": f.id, "volume_mm3": f.volume_mm3, "diameter_mm": f.diameter_mm,
                             "mean_change_pct": f.mean_change_pct, "score": f.score, "centre_mm": list(f.centre_mm)}
                            for f in self.findings]}
        written = [_save_labels(self.labels, folder / RECORD_FILES["labels"]),
                   _save_labels(self.labels_baseline, folder / RECORD_FILES["labels_baseline"])]
        written.append(atomic_write_text(folder / RECORD_FILES["record"], json.dumps(doc, indent=1) + "\n"))
        return written

    @classmethod
    def load(cls, folder: str | os.PathLike) -> FindingsRecord:
        folder = Path(folder)
        path = folder / RECORD_FILES["record"]
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            labels = sitk.ReadImage(str(folder / RECORD_FILES["labels"]))
            labels_baseline = sitk.ReadImage(str(folder / RECORD_FILES["labels_baseline"]))
        except (OSError, ValueError, RuntimeError) as exc:
            raise InputError(path, f"no readable findings record in this pair folder ({exc})") from exc
        if doc["dim"] == 2:
            labels, labels_baseline = labels[:, :, 0], labels_baseline[:, :, 0]
        return cls(baseline_visit=doc["baseline_visit"], followup_visit=doc["followup_visit"],
                   baseline_date=doc["baseline_date"], followup_date=doc["followup_date"],
                   findings=tuple(FindingMeasures(id=f["id"], volume_mm3=f["volume_mm3"],
                                                  diameter_mm=f["diameter_mm"], mean_change_pct=f["mean_change_pct"],
                                                  score=f["score"], centre_mm=tuple(f["centre_mm"]))
                                  for f in doc["findings"]),
                   labels=labels, labels_baseline=labels_baseline, verdict=doc["verdict"],
                   progression_score=doc["progression_score"], threshold=doc["threshold"], modality=doc["modality"],
                   pipeline=tuple(doc["pipeline"]), encoder=dict(doc["encoder"]))


def _save_labels(itk: sitk.Image, path: Path) -> Path:
    volume = sitk.JoinSeries(itk) if itk.GetDimension() == 2 else sitk.Image(itk)
    volume = sitk.Cast(volume, sitk.sitkUInt16)
    return atomic_write(path, lambda tmp: sitk.WriteImage(volume, tmp, True))


def write_findings_record(comparison, folder: str | os.PathLike, *, baseline_visit: str | None = None,
                          followup_visit: str | None = None) -> list[Path]:
    """Per-pair output writer: the record `track` and the DICOM rebuild read back (`FindingsRecord.save`)."""
    return FindingsRecord.from_comparison(comparison, baseline_visit, followup_visit).save(folder)


# --------------------------------------------------------------------------- tracking


@dataclass(frozen=True)
class Lesion:
    id: str  # L1, L2, ... in order of first appearance
    tracking_uid: str
    seen: tuple[tuple[int, int], ...]  # (record index, finding id), in visit order

    @property
    def first_seen(self) -> int:
        return self.seen[0][0]


@dataclass(frozen=True)
class Tracking:
    """The lesions of one patient over its compared follow-ups (records in follow-up order)."""

    patient: str
    records: tuple[FindingsRecord, ...]
    lesions: tuple[Lesion, ...]
    folders: tuple[Path, ...] = ()  # the pair folder of each record, when read from folders

    def for_record(self, index: int) -> dict[int, tuple[str, str]]:
        """Finding id -> (Tracking ID, Tracking UID) for one pair: what its DICOM SEG and SR carry."""
        return {fid: (lesion.id, lesion.tracking_uid) for lesion in self.lesions
                for k, fid in lesion.seen if k == index}

    def for_folder(self, folder: str | os.PathLike) -> dict[int, tuple[str, str]]:
        """`for_record` of the pair written to `folder` (empty when it has no record)."""
        wanted = Path(folder).resolve()
        for k, f in enumerate(self.folders):
            if f.resolve() == wanted:
                return self.for_record(k)
        return {}


def first_seen_tracking(patient: str, visit: str, finding_ids: Sequence[int]) -> dict[int, tuple[str, str]]:
    """The tracking `track` gives the findings of a patient's first compared follow-up (L1, L2, ... by finding
    number): what a pair's DICOM can carry before the patient's other pairs are done."""
    return {fid: (f"L{n}", tracking_uid(patient, visit, fid)) for n, fid in enumerate(finding_ids, start=1)}


def tracking_uid(patient: str, visit: str, finding_id: int) -> str:
    """A lesion's DICOM Tracking UID: a hash of where it was first seen (same inputs, same UID; no identity in it
    beyond what `patient` holds: pass the pseudonym when de-identifying)."""
    digest = hashlib.sha256("\0".join(["longitudinal lesion", patient, visit, str(finding_id)]).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _shared_grid(a: FindingsRecord, b: FindingsRecord) -> tuple[sitk.Image, sitk.Image] | None:
    """Labels of a (earlier) and b (later) on one grid both pairs share, or None."""
    if a.baseline_visit == b.baseline_visit:
        return a.labels_baseline, b.labels_baseline
    if a.followup_visit == b.baseline_visit:
        return a.labels, b.labels_baseline
    return None


def _same_grid(x: sitk.Image, y: sitk.Image) -> bool:
    return (x.GetSize() == y.GetSize() and np.allclose(x.GetSpacing(), y.GetSpacing())
            and np.allclose(x.GetOrigin(), y.GetOrigin(), atol=1e-3)
            and np.allclose(x.GetDirection(), y.GetDirection(), atol=1e-5))


def _link_costs(first: np.ndarray, second: np.ndarray, ids_a: Sequence[int], ids_b: Sequence[int],
                spacing_zyx: np.ndarray, max_distance_mm: float) -> np.ndarray:
    """Cost of linking finding a (in `first`) with finding b (in `second`): -Dice when they overlap, else the
    smallest distance between them in mm; inf beyond max_distance_mm."""
    cost = np.full((len(ids_a), len(ids_b)), np.inf)
    margin = np.ceil(max_distance_mm / spacing_zyx).astype(int) + 1
    boxes_a = ndimage.find_objects(first)
    boxes_b = ndimage.find_objects(second)
    for i, a in enumerate(ids_a):
        box_a = boxes_a[a - 1] if a - 1 < len(boxes_a) else None
        if box_a is None:
            continue
        for j, b in enumerate(ids_b):
            box_b = boxes_b[b - 1] if b - 1 < len(boxes_b) else None
            if box_b is None:
                continue
            lo = np.maximum([min(p.start, q.start) for p, q in zip(box_a, box_b)] - margin, 0)
            hi = np.minimum([max(p.stop, q.stop) for p, q in zip(box_a, box_b)] + margin, first.shape)
            crop = tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))
            in_a, in_b = first[crop] == a, second[crop] == b
            overlap = int(np.count_nonzero(in_a & in_b))
            if overlap:
                cost[i, j] = -2.0 * overlap / (np.count_nonzero(in_a) + np.count_nonzero(in_b))
                continue
            distance = ndimage.distance_transform_edt(~in_a, sampling=spacing_zyx)[in_b].min()
            if distance <= max_distance_mm:
                cost[i, j] = float(distance)
    return cost


def track(records: Sequence[FindingsRecord], patient: str, settings: TrackingSettings = TrackingSettings(),
          uid: Callable[[str, str, int], str] = tracking_uid) -> Tracking:
    """Link the findings of one patient's compared follow-ups (`records` in follow-up order) into lesions."""
    records = tuple(records)
    seen: list[list[tuple[int, int]]] = []  # per lesion
    for k, record in enumerate(records):
        ids = [f.id for f in record.findings]
        if not ids:
            continue
        # each lesion is compared where it was seen last on a grid shared with this record
        cost = np.full((len(seen), len(ids)), np.inf)
        for n, appearances in enumerate(seen):
            for index, fid in reversed(appearances):
                grids = _shared_grid(records[index], record)
                if grids is None:
                    continue
                first, second = grids
                if not _same_grid(first, second):
                    raise InputError(None, f"pairs {records[index].followup_visit} and {record.followup_visit}: "
                                           "their shared visit's label grids differ; cannot track lesions")
                spacing = np.asarray(first.GetSpacing()[::-1], float)
                cost[n] = _link_costs(sitk.GetArrayViewFromImage(first), sitk.GetArrayViewFromImage(second),
                                      [fid], ids, spacing, settings.max_distance_mm)[0]
                break
        linked: set[int] = set()
        if seen and np.isfinite(cost).any():
            rows, cols = linear_sum_assignment(np.where(np.isfinite(cost), cost, 1e9))
            for n, j in zip(rows, cols):
                if np.isfinite(cost[n, j]):
                    seen[n].append((k, ids[j]))
                    linked.add(ids[j])
        for fid in ids:
            if fid not in linked:
                seen.append([(k, fid)])
    lesions = tuple(Lesion(id=f"L{n}", tracking_uid=uid(patient, records[s[0][0]].followup_visit, s[0][1]),
                           seen=tuple(s)) for n, s in enumerate(seen, start=1))
    return Tracking(patient=patient, records=records, lesions=lesions)


def track_folders(folders: Sequence[str | os.PathLike], patient: str,
                  settings: TrackingSettings = TrackingSettings()) -> Tracking:
    """`track` on the findings records of a patient's pair folders, ordered by follow-up date (then as given);
    folders without a record (a pair that failed) are left out."""
    records = []
    for order, folder in enumerate(folders):
        if (Path(folder) / RECORD_FILES["record"]).is_file():
            records.append((order, FindingsRecord.load(folder)))
    records.sort(key=lambda r: (r[1].followup_date or "", r[0]))
    tracking = track([r for _, r in records], patient, settings)
    return dataclasses.replace(tracking, folders=tuple(Path(folders[order]) for order, _ in records))


# --------------------------------------------------------------------------- the table and the plot


def _day(d: str | None) -> dt.date | None:
    try:
        return dt.date(int(d[:4]), int(d[4:6]), int(d[6:8])) if d else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Slopes:
    """FreeSurfer long_stats_slopes measures of one series: linear fit against time in years."""

    avg: float  # the fit at the middle of the visits (temporal average)
    rate: float  # slope per year
    pc1: float  # rate in % of the value measured at the first visit, per year
    spc: float  # rate in % of avg, per year (symmetrized percent change)


def slopes(years: Sequence[float], values: Sequence[float]) -> Slopes | None:
    """None with fewer than two time points (no rate from one)."""
    t, y = np.asarray(years, float), np.asarray(values, float)
    if len(t) < 2 or np.ptp(t) == 0:
        return None
    centre = t.mean()
    rate, avg = np.polyfit(t - centre, y, 1)
    first = y[np.argmin(t)]
    pc1 = 100.0 * rate / first if first else math.nan
    spc = 100.0 * rate / avg if avg else math.nan
    return Slopes(avg=float(avg), rate=float(rate), pc1=float(pc1), spc=float(spc))


def _visits(tracking: Tracking) -> list[tuple[str, str | None]]:
    """Every visit of the patient that a record names, in date order: (visit id, YYYYMMDD)."""
    found: dict[str, str | None] = {}
    for r in tracking.records:
        found.setdefault(r.baseline_visit, r.baseline_date)
        found.setdefault(r.followup_visit, r.followup_date)
    return sorted(found.items(), key=lambda v: v[1] or "")


def lesion_rows(tracking: Tracking) -> tuple[list[str], list[dict[str, object]]]:
    """(columns, one row per lesion) of lesions.tsv."""
    visits = _visits(tracking)
    first_day = _day(visits[0][1]) if visits else None
    columns = ["lesion", "tracking_uid", "first_seen", "first_seen_date", "n_seen",
               *[f"volume_mm3_{v}" for v, _ in visits],
               "volume_mm3_avg", "volume_mm3_rate", "volume_mm3_pc1", "volume_mm3_spc", "last_diameter_mm",
               "last_mean_change_pct"]
    rows = []
    for lesion in tracking.lesions:
        by_visit = {}
        for k, fid in lesion.seen:
            record = tracking.records[k]
            by_visit[record.followup_visit] = (record, next(f for f in record.findings if f.id == fid))
        first_record = tracking.records[lesion.first_seen]
        row: dict[str, object] = {"lesion": lesion.id, "tracking_uid": lesion.tracking_uid,
                                  "first_seen": first_record.followup_visit,
                                  "first_seen_date": _iso(first_record.followup_date), "n_seen": len(lesion.seen)}
        times, values = [], []
        for visit, date in visits:
            hit = by_visit.get(visit)
            row[f"volume_mm3_{visit}"] = round(hit[1].volume_mm3, 2) if hit else None
            day = _day(date)
            if hit and day is not None and first_day is not None:
                times.append((day - first_day).days / _DAYS_PER_YEAR)
                values.append(hit[1].volume_mm3)
        fit = slopes(times, values) if len(times) == len(lesion.seen) else None
        for name in ("avg", "rate", "pc1", "spc"):
            row[f"volume_mm3_{name}"] = None if fit is None else round(getattr(fit, name), 3)
        last = by_visit[tracking.records[lesion.seen[-1][0]].followup_visit][1]
        row["last_diameter_mm"] = last.diameter_mm
        row["last_mean_change_pct"] = last.mean_change_pct
        rows.append(row)
    return columns, rows


def _iso(d: str | None) -> str | None:
    day = _day(d)
    return day.isoformat() if day else None


def lesion_table(tracking: Tracking, folder: str | os.PathLike, prefix: str = "") -> dict[str, Path]:
    """lesions.tsv (n/a for a visit where the lesion was not found) and lesions.json (what each column is);
    prefix: put before both names (a BIDS layout writes `sub-<label>_lesions.tsv`)."""
    columns, rows = lesion_rows(tracking)
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v
                         for k, v in row.items()})
    folder = Path(folder)
    return {"table": atomic_write_text(folder / (prefix + LESION_FILES["table"]), buf.getvalue()),
            "sidecar": atomic_write_text(folder / (prefix + LESION_FILES["sidecar"]),
                                         json.dumps(_sidecar(columns), indent=1) + "\n")}


def _sidecar(columns: list[str]) -> dict[str, dict[str, str]]:
    fixed = {
        "lesion": {"Description": "lesion ID, the same at every visit (L1, L2, ... in order of first appearance); "
                                  "the DICOM SEG/SR Tracking ID"},
        "tracking_uid": {"Description": "DICOM Tracking UID of the lesion in every SEG and SR"},
        "first_seen": {"Description": "first follow-up at which the lesion was found"},
        "first_seen_date": {"Description": "study date of that follow-up (ISO 8601)"},
        "n_seen": {"Description": "number of follow-ups at which the lesion was found"},
        "volume_mm3_avg": {"Description": "temporal average: linear fit of the volume against time at the middle "
                                          "of the visits where it was found (FreeSurfer long_stats_slopes avg)",
                           "Units": "mm3"},
        "volume_mm3_rate": {"Description": "slope of that fit (FreeSurfer rate); n/a when found at one visit",
                            "Units": "mm3/year"},
        "volume_mm3_pc1": {"Description": "rate in percent of the volume at the first visit where it was found "
                                          "(FreeSurfer pc1)", "Units": "%/year"},
        "volume_mm3_spc": {"Description": "rate in percent of the temporal average (FreeSurfer spc, symmetrized "
                                          "percent change)", "Units": "%/year"},
        "last_diameter_mm": {"Description": "largest extent of the changed tissue at the last visit where found",
                             "Units": "mm"},
        "last_mean_change_pct": {"Description": "mean intensity change of the changed tissue at that visit, % of "
                                                "its reference visit (+: brighter)", "Units": "%"},
    }
    out = {}
    for c in columns:
        out[c] = fixed.get(c) or {
            "Description": f"volume of the lesion's changed tissue at visit {c.removeprefix('volume_mm3_')}, as "
                           "measured against that pair's reference visit (the baseline or the visit before); "
                           "n/a: not found there", "Units": "mm3"}
    return out


def plot_lesions(tracking: Tracking, path: str | os.PathLike, dpi: int = 90) -> Path | None:
    """Each lesion's volume over time (PNG), for the patient's part of the batch summary; None without lesions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not tracking.lesions:
        return None
    columns, rows = lesion_rows(tracking)
    visits = _visits(tracking)
    dated = all(_day(d) for _, d in visits)
    xs = [_day(d) for _, d in visits] if dated else list(range(1, len(visits) + 1))
    fig = Figure(figsize=(5.2, 2.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row in rows:
        points = [(x, row[f"volume_mm3_{v}"]) for x, (v, _) in zip(xs, visits) if row[f"volume_mm3_{v}"] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4, linewidth=1.2,
                label=str(row["lesion"]))
    ax.set_xlabel("visit date" if dated else "visit number", fontsize=8)
    ax.set_ylabel("changed tissue (mm³)", fontsize=8)
    ax.set_title(f"{tracking.patient}: lesions over time", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False, ncols=min(4, len(rows)))
    if dated:
        fig.autofmt_xdate()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = buf.getvalue()
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def finish_patient(folders: Sequence[str | os.PathLike], patient_folder: str | os.PathLike, patient: str,
                   settings: TrackingSettings = TrackingSettings(),
                   prefix: str = "") -> tuple[Tracking, dict[str, Path]]:
    """Batch hook, once per patient after its pairs: track, then lesions.tsv, lesions.json and lesions.png in
    the patient's folder (names after `prefix`). Returns the tracking (`for_folder` gives a pair's DICOM
    tracking) and the paths written."""
    tracking = track_folders(folders, patient, settings)
    paths = lesion_table(tracking, patient_folder, prefix)
    plot = plot_lesions(tracking, Path(patient_folder) / (prefix + LESION_FILES["plot"]))
    if plot is not None:
        paths["plot"] = plot
    return tracking, paths

