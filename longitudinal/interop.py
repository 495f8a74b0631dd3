"""What a batch adds to its pairs' own outputs: BIDS derivatives, DICOM SEG/SR, and lesions tracked across visits.

Three calls, independent of how the batch runs its pairs:

- `plan_pair` when the batch plans its pairs (picklable: it travels to the workers);
- `write_pair` in the worker, right after `compare` and before the report's `.complete` is written, so an
  output that fails leaves the pair unfinished (recomputed on resume): the findings record (`tracking`),
  the pair's BIDS files, and its DICOM SEG/SR carrying the tracking a first follow-up gets;
- `finish_batch` once every pair is done (also on a resumed run): per patient, lesions tracked over its pairs
  (`lesions.tsv`, `.json`, `.png` in its folder), each pair's SEG/SR rebuilt where tracking gave its lesions
  other IDs, and the BIDS dataset files. It returns the lesion plots for the summary page.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .bids_out import BidsPair, pair_for, write_bids_dataset, write_bids_pair
from .dicom_out import DICOM_FILES, dicom_sources, wants_dicom_outputs, write_dicom_outputs, write_dicom_record
from .tracking import FindingsRecord, finish_patient, first_seen_tracking, write_findings_record

log = logging.getLogger(__name__)

Layout = Literal["default", "bids"]
BIDS_REPORTS = "reports"  # bids layout: the per-pair report folders, OUT/reports/<patient>/<visit>/ (.bidsignore)


@dataclass(frozen=True)
class PairPlan:
    """One pair as the interop outputs see it (ids as shown: pseudonym and scrubbed visit ids when
    de-identified)."""

    patient: str
    baseline_visit: str
    followup_visit: str
    visit_order: int  # the follow-up's position among the patient's visits, baseline 1 (SR Time Point Order)
    folder: str  # the pair's report folder, relative to the batch output
    followup_path: Path  # to find the follow-up's DICOM files again after tracking
    followup_series_uid: str | None
    layout: Layout = "default"
    dicom_out: bool | None = None  # None: when the follow-up is DICOM (`dicom_out.wants_dicom_outputs`)
    deidentify: bool = False
    deid_key: bytes | None = None
    bids: BidsPair | None = None


def report_folder(patient: str, visit: str, layout: Layout, safe: Callable[[str], str]) -> str:
    """Where a pair's report folder goes: `<patient>/<visit>`, under `reports/` in the bids layout."""
    folder = f"{safe(patient)}/{safe(visit)}"
    return f"{BIDS_REPORTS}/{folder}" if layout == "bids" else folder


def plan_pair(patient_visits: Sequence, pair, patient: str, baseline_visit: str, followup_visit: str, folder: str,
              *, studies: str | os.PathLike, layout: Layout = "default", dicom_out: bool | None = None,
              deidentify: bool = False, deid_key: bytes | None = None) -> PairPlan:
    """The plan of a `timeline.Pair` of a patient whose visits are `patient_visits` (in order)."""
    order = next(i for i, v in enumerate(patient_visits, start=1) if v is pair.followup)
    bids = None
    if layout == "bids":
        bids = pair_for(patient, followup_visit, baseline_visit, None if deidentify else pair.followup.path,
                        None if deidentify else studies)
    return PairPlan(patient=patient, baseline_visit=baseline_visit, followup_visit=followup_visit,
                    visit_order=order, folder=folder, followup_path=Path(pair.followup.path),
                    followup_series_uid=pair.followup.series_uid, layout=layout, dicom_out=dicom_out,
                    deidentify=deidentify, deid_key=deid_key, bids=bids)


def write_pair(plan: PairPlan, comparison, out_dir: str | os.PathLike) -> list[Path]:
    """In the worker, before the report: the findings record, BIDS files, DICOM SEG/SR. Returns the paths."""
    out = Path(out_dir)
    folder = out / plan.folder
    if comparison.finding_labels is None or comparison.finding_labels_baseline is None:
        log.debug("no finding labels: no findings record, BIDS files or DICOM objects")
        return []
    written = write_findings_record(comparison, folder, baseline_visit=plan.baseline_visit,
                                    followup_visit=plan.followup_visit)
    if plan.bids is not None:
        written += list(write_bids_pair(comparison, out, plan.bids).values())
    if wants_dicom_outputs(comparison, plan.dicom_out):
        tracking = first_seen_tracking(plan.patient, plan.followup_visit, [f.id for f in comparison.findings])
        written += list(write_dicom_outputs(comparison, folder, deidentify=plan.deidentify, pseudonym=plan.patient,
                                            uid_key=plan.deid_key, tracking=tracking,
                                            visit_order=plan.visit_order).values())
    return written


def finish_batch(out_dir: str | os.PathLike, plans: Sequence[PairPlan], *, studies: str | os.PathLike,
                 layout: Layout = "default", deidentify: bool = False) -> dict[str, str]:
    """Once per run, after the pairs; `plans`: the pairs that did not fail. Returns patient -> lesion plot
    (relative to out_dir) for the summary page."""
    out = Path(out_dir)
    plots: dict[str, str] = {}
    by_patient: dict[str, list[PairPlan]] = {}
    for plan in plans:
        by_patient.setdefault(plan.patient, []).append(plan)
    for patient, mine in by_patient.items():
        if layout == "bids":
            subject = mine[0].bids.subject
            folder, prefix = out / f"sub-{subject}", f"sub-{subject}_"
        else:
            folder, prefix = out / Path(mine[0].folder).parent, ""
        try:
            tracking, paths = finish_patient([out / p.folder for p in mine], folder, patient, prefix=prefix)
        except Exception as exc:  # tracking is an extra: the pairs' results stand
            log.warning("lesion tracking failed for a patient (%s)", type(exc).__name__)
            continue
        if "plot" in paths:
            plots[patient] = paths["plot"].relative_to(out).as_posix()
        for plan in mine:
            _retrack_dicom(plan, out / plan.folder, tracking.for_folder(out / plan.folder))
    if layout == "bids":
        write_bids_dataset(out, source=None if deidentify else studies)
    return plots


def _retrack_dicom(plan: PairPlan, folder: Path, wanted: dict[int, tuple[str, str]]) -> None:
    """Rebuild a pair's SEG/SR when its segments do not carry the tracked IDs and UIDs."""
    import pydicom

    seg = folder / DICOM_FILES["seg"]
    if not seg.is_file():
        return
    held = {(str(s.TrackingID), str(s.TrackingUID))
            for s in pydicom.dcmread(seg, stop_before_pixels=True).SegmentSequence}
    if held <= set(wanted.values()):
        return
    try:
        write_dicom_record(FindingsRecord.load(folder), dicom_sources(plan.followup_path, plan.followup_series_uid),
                           folder, deidentify=plan.deidentify, pseudonym=plan.patient, uid_key=plan.deid_key,
                           tracking=wanted, visit_order=plan.visit_order)
    except Exception as exc:
        log.warning("DICOM SEG/SR of a pair not updated with its tracked lesion IDs (%s)", type(exc).__name__)
