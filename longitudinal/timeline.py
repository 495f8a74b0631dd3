"""Which patients are there, and which visits each one had, in time order.

Three layouts are recognised (`TimelineSettings.layout = "auto"` picks one):

- BIDS: ``sub-<p>/ses-<v>/anat/*.nii[.gz]``. Sessions are ordered by ``acq_time`` in
  ``sub-<p>/sub-<p>_sessions.tsv`` when every session has one, else by session name
  (a date in the name counts). When an anat folder holds several images the suffix
  preference `bids_suffixes` (T1w first) decides; two images with the same best suffix
  (e.g. two runs) are refused, because silently picking one would compare different runs.
- Plain: ``<patient>/<visit>/<image file or DICOM series folder>`` or
  ``<patient>/<visit>.nii.gz``. A visit name must say when it happened: an ISO date
  (2021-03-04, 20210304, optionally with a suffix) or an ordinal name (baseline, bl,
  screening, visit1, v2, tp3, month06, m12, week4, day30, year1, fu1, ses-2, study1).
  The root itself may be a single patient folder.
- DICOM tree in any nesting: grouped by PatientID, then by StudyDate; one visit per
  patient and day (same-day studies are one visit).

When a visit holds several DICOM series the visit uses one: the 3D series with the most
slices whose geometry is valid (a regex on SeriesDescription, `series_description`,
narrows the choice first); the choice is logged. ``derivatives``, ``sourcedata``,
``code`` and hidden folders are never patients or visits.

A follow-up whose DICOM PatientID differs from its baseline's is refused (the error names
both files, never the IDs) unless ``allow_mixed_patients=True``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import InputError
from .io import ITK_EXTS, NIFTI_EXTS, PICTURE_EXTS, Image, ImageInfo, SeriesInfo, describe, load_image
from .io.dicom import _scan
from .io.image import _ext

log = logging.getLogger(__name__)

IGNORED_DIRS = frozenset({"derivatives", "sourcedata", "code", "__pycache__"})
_IMAGE_FILE_EXTS = NIFTI_EXTS + PICTURE_EXTS + ITK_EXTS

_DATE_RE = re.compile(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})(?!\d)")
_ORDINAL_RE = re.compile(
    r"^(?:ses|session|visit|v|tp|timepoint|time|scan|study|exam|month|mo|m|week|wk|w|day|d|year|yr|y|"
    r"fu|followup|follow-up|follow_up)[-_ ]?\d+([-_].*)?$", re.IGNORECASE)
_FIRST_WORDS = ("baseline", "bl", "screening", "base")


@dataclass(frozen=True)
class TimelineSettings:
    """How visits are found; a `[timeline]` table in pipelines/*.toml sets these by name."""

    layout: Literal["auto", "bids", "plain", "dicom"] = "auto"
    bids_suffixes: tuple[str, ...] = ("T1w", "T2w", "FLAIR", "T2starw", "PDw", "T1map", "T2map")
    series_description: str | None = None  # regex (case-insensitive) picking a DICOM series per visit


@dataclass(frozen=True)
class Visit:
    """One imaging visit of one patient: which image represents it, and its header facts."""

    id: str
    date: dt.date | None
    path: Path
    patient_id: str
    modality: str | None
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    kind: str  # "dicom", "nifti", "picture", "itk"
    series_uid: str | None = None  # the DICOM series used when `path` is a folder
    description: str | None = None
    time: str | None = None  # HHMMSS from DICOM StudyTime / acq_time, when known
    # PatientID found in the image header; only compared, never printed.
    header_patient_id: str | None = field(default=None, repr=False, compare=False)

    def load(self) -> Image:
        """The visit's image; what the timeline knows (date, modality) fills what the file's header lacks."""
        image = load_image(self.path, self.series_uid)
        meta = image.meta
        known = {
            "study_date": meta.study_date or (self.date.strftime("%Y%m%d") if self.date else None),
            "study_time": meta.study_time or self.time,
            "modality": meta.modality or self.modality,
        }
        return dataclasses.replace(image, meta=dataclasses.replace(meta, **known))


@dataclass(frozen=True)
class Patient:
    id: str
    visits: tuple[Visit, ...]  # in time order; visits[0] is the baseline
    problem: str | None = None  # why this patient's visits could not be used (discover(strict=False))

    @property
    def baseline(self) -> Visit:
        return self.visits[0]


@dataclass(frozen=True)
class Pair:
    """Two visits of one patient to compare: changes are found in `followup` relative to `baseline`."""

    patient_id: str
    baseline: Visit
    followup: Visit

    @property
    def interval_days(self) -> int | None:
        if self.baseline.date and self.followup.date:
            return (self.followup.date - self.baseline.date).days
        return None


def pairs(patient: Patient, against: Literal["baseline", "previous"] = "baseline") -> list[Pair]:
    """Follow-ups paired with the baseline (trial end points) or with the visit before (monitoring)."""
    v = patient.visits
    if against == "baseline":
        return [Pair(patient.id, v[0], f) for f in v[1:]]
    if against == "previous":
        return [Pair(patient.id, a, b) for a, b in zip(v, v[1:])]
    raise ValueError(f"against must be 'baseline' or 'previous', not {against!r}")


# ----------------------------------------------------------------------------- names and dates


def _date_in(name: str) -> dt.date | None:
    for m in _DATE_RE.finditer(name):
        try:
            return dt.date(int(m[1]), int(m[2]), int(m[3]))
        except ValueError:
            continue
    return None


def _parse_date(text: str | None) -> dt.date | None:
    """A date from DICOM (YYYYMMDD) or ISO text (2021-03-04, 2021-03-04T10:00:00)."""
    if not text:
        return None
    return _date_in(text.strip()[:10])


def _stem(path: Path) -> str:
    ext = _ext(path)
    return path.name[: -len(ext)] if ext else path.name


def _visit_like(name: str) -> bool:
    return (_date_in(name) is not None or bool(_ORDINAL_RE.match(name))
            or name.lower() in _FIRST_WORDS)


def _name_key(name: str) -> tuple:
    first = 0 if name.lower() in _FIRST_WORDS else 1
    return (first, [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name) if t])


def _order(visits: list[Visit], where: Path) -> tuple[Visit, ...]:
    if visits and all(v.date is not None for v in visits):
        by_date = tuple(sorted(visits, key=lambda v: (v.date, v.time or "", _name_key(v.id))))
        by_name = tuple(sorted(visits, key=lambda v: _name_key(v.id)))
        if by_date != by_name and any(_date_in(v.id) is None for v in visits):
            log.warning("%s: visit names and acquisition dates disagree on the order; using the dates", where)
        return by_date
    if any(v.date is not None for v in visits):
        log.warning("%s: some visits have no date; ordering all visits by name", where)
    return tuple(sorted(visits, key=lambda v: _name_key(v.id)))


def _hidden_or_ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in IGNORED_DIRS


def _children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not _hidden_or_ignored(p))


# ----------------------------------------------------------------------------- choosing a DICOM series


def _choose_series(series: list[SeriesInfo], settings: TimelineSettings, where: Path) -> SeriesInfo:
    if not series:
        raise InputError(where, "no DICOM image series found")
    usable = [s for s in series if s.problem is None]
    if settings.series_description:
        pattern = re.compile(settings.series_description, re.IGNORECASE)
        usable = [s for s in usable if pattern.search(s.description or "")]
    if not usable:
        why = "; ".join(f"{s.label()}: {s.problem}" for s in series if s.problem)
        if settings.series_description:
            why = f"no valid series matches description /{settings.series_description}/" + (f"; {why}" if why else "")
        raise InputError(where, f"no usable image series ({why})")
    best = max(usable, key=lambda s: (len(s.size), s.n_slices, s.study_time or "", s.uid))
    if len(series) > 1:
        log.info("%s: using series '%s' (%s, %d slice(s)) out of %d series", where, best.description or "",
                 best.modality or "?", best.n_slices, len(series))
    return best


def _visit_from_series(vid: str, date: dt.date | None, patient: str, s: SeriesInfo) -> Visit:
    return Visit(id=vid, date=date, path=s.folder, patient_id=patient, modality=s.modality, size=s.size,
                 spacing=s.spacing, kind="dicom", series_uid=s.uid, description=s.description,
                 time=s.study_time, header_patient_id=s.patient_id)


def _visit_from_info(vid: str, date: dt.date | None, patient: str, info: ImageInfo) -> Visit:
    return Visit(id=vid, date=date or _parse_date(info.study_date), path=info.path, patient_id=patient,
                 modality=info.modality, size=info.size, spacing=info.spacing, kind=info.kind,
                 series_uid=info.series_uid, description=info.description, time=info.study_time,
                 header_patient_id=info.patient_id)


def _suffix_rank(path: Path, settings: TimelineSettings) -> int:
    suffix = _stem(path).rsplit("_", 1)[-1]
    prefs = [s.lower() for s in settings.bids_suffixes]
    return prefs.index(suffix.lower()) if suffix.lower() in prefs else len(prefs)


def _pick_file(files: list[Path], settings: TimelineSettings, where: Path) -> Path:
    if len(files) == 1:
        return files[0]
    ranked = sorted(files, key=lambda f: (_suffix_rank(f, settings), f.name))
    best = _suffix_rank(ranked[0], settings)
    tied = [f for f in ranked if _suffix_rank(f, settings) == best]
    if len(tied) > 1:
        raise InputError(where, f"{len(tied)} candidate images ({', '.join(f.name for f in tied)}); keep one per "
                                f"visit, or name them by suffix (preference: {', '.join(settings.bids_suffixes)})")
    log.info("%s: using %s out of %d images (suffix preference)", where, ranked[0].name, len(files))
    return ranked[0]


def _visit_in(path: Path, vid: str, date: dt.date | None, patient: str, settings: TimelineSettings) -> Visit:
    """The visit stored at `path`: an image file, a folder with image files, or DICOM."""
    if path.is_file():
        return _visit_from_info(vid, date, patient, describe(path))
    files = [p for p in _children(path) if p.is_file() and _ext(p) in _IMAGE_FILE_EXTS]
    if files:
        return _visit_from_info(vid, date, patient, describe(_pick_file(files, settings, path)))
    series, skipped = _scan(path)
    if not series:
        what = f" ({len(skipped)} non-image file(s))" if skipped else ""
        raise InputError(path, f"no image found for this visit{what}")
    s = _choose_series(series, settings, path)
    return _visit_from_series(vid, date or _parse_date(s.study_date), patient, s)


# ----------------------------------------------------------------------------- layouts


def _bids_session_dates(subject: Path) -> dict[str, tuple[dt.date | None, str | None]]:
    tsv = subject / f"{subject.name}_sessions.tsv"
    if not tsv.is_file():
        return {}
    out = {}
    with open(tsv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    for row in rows:
        sid, acq = (row.get("session_id") or "").strip(), (row.get("acq_time") or "").strip()
        if not sid:
            continue
        sid = sid if sid.startswith("ses-") else f"ses-{sid}"
        date = _parse_date(acq) if acq and acq.lower() != "n/a" else None
        time = (re.sub(r"\D", "", acq[11:19]) or None) if date and len(acq) > 11 else None
        out[sid] = (date, time)
    return out


def _bids_modality(image: Path) -> str:
    """The sidecar's Modality when given; BIDS anat images are MR otherwise."""
    sidecar = image.with_name(_stem(image) + ".json")
    try:
        value = json.loads(sidecar.read_text(encoding="utf-8")).get("Modality") if sidecar.is_file() else None
    except (OSError, ValueError, AttributeError):
        value = None
    return value if isinstance(value, str) and value else "MR"


def _bids(root: Path, settings: TimelineSettings) -> list[tuple[Path, str, list[Visit] | InputError]]:
    out = []
    for subject in _children(root):
        if not (subject.is_dir() and subject.name.startswith("sub-")):
            continue
        sessions = [p for p in _children(subject) if p.is_dir() and p.name.startswith("ses-")]
        if not sessions:
            log.warning("a BIDS subject folder has no ses-* folders; skipped (one visit cannot be compared)")
            continue
        out.append((subject, subject.name, _collect(_bids_subject, subject, sessions, settings)))
    return out


def _collect(read, *args) -> list[Visit] | InputError:
    """One patient's visits, or the error that stopped reading them (so other patients can go on)."""
    try:
        return read(*args)
    except InputError as exc:
        return exc


def _bids_subject(subject: Path, sessions: list[Path], settings: TimelineSettings) -> list[Visit]:
    dates = _bids_session_dates(subject)
    visits = []
    for ses in sessions:
        anat = ses / "anat"
        if not anat.is_dir():
            raise InputError(ses, "BIDS session without an anat/ folder")
        files = [p for p in _children(anat) if p.is_file() and _ext(p) in NIFTI_EXTS]
        if not files:
            raise InputError(anat, "no NIfTI image in this BIDS anat folder")
        image = _pick_file(files, settings, anat)
        info = describe(image)
        date, time = dates.get(ses.name, (None, None))
        visit = _visit_from_info(ses.name, date or _date_in(ses.name[4:]), subject.name, info)
        visits.append(dataclasses.replace(visit, time=time or visit.time, modality=_bids_modality(image)))
    return visits


def _plain_patient(folder: Path, pid: str, settings: TimelineSettings) -> list[Visit]:
    visits = []
    for child in _children(folder):
        if child.is_file() and _ext(child) not in _IMAGE_FILE_EXTS + (".dcm",):
            continue  # notes, spreadsheets next to the visits
        name = _stem(child) if child.is_file() else child.name
        if not _visit_like(name):
            raise InputError(child, "cannot tell when this visit happened from its name; name visits by date "
                                    "(2021-03-04 or 20210304) or in order (baseline, visit1, visit2, ...)")
        visits.append(_visit_in(child, name, _date_in(name), pid, settings))
    return visits


def _is_plain_patient(folder: Path) -> bool:
    """Some child is named like a visit (the others get a clear error later)."""
    kids = [c for c in _children(folder) if c.is_dir() or _ext(c) in _IMAGE_FILE_EXTS + (".dcm",)]
    return any(_visit_like(_stem(c) if c.is_file() else c.name) for c in kids)


def _has_picture_or_nifti(folder: Path, depth: int) -> bool:
    for c in _children(folder):
        if c.is_file() and _ext(c) in _IMAGE_FILE_EXTS:
            return True
        if depth > 0 and c.is_dir() and _has_picture_or_nifti(c, depth - 1):
            return True
    return False


def _plain(root: Path, settings: TimelineSettings) -> list[tuple[Path, str, list[Visit] | InputError]]:
    if _is_plain_patient(root) and not any(_is_plain_patient(c) for c in _children(root) if c.is_dir()):
        return [(root, root.name, _collect(_plain_patient, root, root.name, settings))]
    return [(p, p.name, _collect(_plain_patient, p, p.name, settings)) for p in _children(root) if p.is_dir()]


def _dicom_tree(root: Path, settings: TimelineSettings) -> list[tuple[Path, str, list[Visit] | InputError]]:
    series, _ = _scan(root)
    series = [s for s in series if not any(_hidden_or_ignored(Path(part))
                                           for part in s.folder.relative_to(root).parts)]
    if not series:
        raise InputError(root, "no patients found: expected BIDS (sub-*/ses-*/anat), <patient>/<visit>/<image>, "
                               "or a folder of DICOM files")
    by_patient: dict[str, dict[str, list[SeriesInfo]]] = {}
    for s in series:
        if not s.patient_id:
            raise InputError(s.files[0], "DICOM series without PatientID; cannot tell whose scan it is")
        if not _parse_date(s.study_date):
            raise InputError(s.files[0], "DICOM series without a valid StudyDate; cannot place it in time")
        by_patient.setdefault(s.patient_id, {}).setdefault(s.study_date, []).append(s)
    def patient_visits(pid: str, days: dict[str, list[SeriesInfo]]) -> list[Visit]:
        visits = []
        for day, group in days.items():
            where = Path(os.path.commonpath([str(s.folder) for s in group]))
            chosen = _choose_series(group, settings, where)
            visits.append(_visit_from_series(day, _parse_date(day), pid, chosen))
        return visits

    return [(root, pid, _collect(patient_visits, pid, days)) for pid, days in by_patient.items()]


def _detect(root: Path) -> str:
    kids = [c for c in _children(root) if c.is_dir()]
    if any(c.name.startswith("sub-") for c in kids):
        return "bids"
    if _is_plain_patient(root) or any(_is_plain_patient(c) for c in kids) or _has_picture_or_nifti(root, 2):
        return "plain"
    return "dicom"


def discover(root: str | os.PathLike, settings: TimelineSettings = TimelineSettings(), *,
             allow_mixed_patients: bool = False, strict: bool = True) -> list[Patient]:
    """Patients under `root` with their visits in time order (headers only, no voxels read).

    strict=False keeps going past a patient whose visits cannot be used (unreadable file, PatientID
    mismatch, ...): that patient comes back with no visits and `problem` set, so a batch can list it as
    failed and compare everyone else.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(root, "no such folder")
    if not root.is_dir():
        raise InputError(root, "expected a folder of studies, got a file")
    layout = settings.layout if settings.layout != "auto" else _detect(root)
    found = {"bids": _bids, "plain": _plain, "dicom": _dicom_tree}[layout](root, settings)
    log.info("%s: %s layout, %d patient(s)", root, layout, len(found))
    patients = []
    for where, pid, visits in found:
        try:
            if isinstance(visits, InputError):
                raise visits
            if not visits:
                continue
            ordered = _order(visits, where)
            if not allow_mixed_patients:
                _check_same_patient(ordered)
        except InputError as exc:
            if strict:
                raise
            patients.append(Patient(pid, (), problem=str(exc)))
            continue
        kinds = {(v.modality, len(v.size)) for v in ordered}
        if len(kinds) > 1:
            log.warning("%s: a patient's visits mix modalities or dimensions (%s); comparisons across them "
                        "will fail", where, ", ".join(f"{m or '?'} {d}D" for m, d in sorted(kinds, key=str)))
        patients.append(Patient(pid, ordered))
    if not patients:
        raise InputError(root, f"no visits found ({layout} layout)")
    return sorted(patients, key=lambda p: _name_key(p.id))


def _check_same_patient(visits: tuple[Visit, ...]) -> None:
    base = visits[0]
    for v in visits[1:]:
        if base.header_patient_id and v.header_patient_id and v.header_patient_id != base.header_patient_id:
            raise InputError(v.path, f"PatientID differs from the baseline's ({base.path}); refusing to compare "
                                     "scans of two people (pass allow_mixed_patients=True, CLI "
                                     "--allow-mixed-patients, if the ID changed legitimately)")
