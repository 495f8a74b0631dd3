"""Which patients are there, and which visits each one had, in time order.

Three layouts are recognised (`TimelineSettings.layout = "auto"` picks one):

- BIDS: ``sub-<p>/ses-<v>/anat/*.nii[.gz]``. Sessions are ordered by date when every session
  has one (the image's JSON sidecar AcquisitionDateTime, else ``acq_time`` in
  ``sub-<p>/sub-<p>_sessions.tsv``, else a date in the session name), else by session name.
  When an anat folder holds several images the suffix preference `bids_suffixes` (T1w
  first) decides; two images with the same best suffix (e.g. two runs) are refused, because
  silently picking one would compare different runs.
- Plain: ``<patient>/<visit>/<image file or DICOM series folder>`` or
  ``<patient>/<visit>.nii.gz``. A visit name must say when it happened: an ISO date
  (2021-03-04, 20210304, optionally with a suffix) or an ordinal name (baseline, bl,
  screening, visit1, v2, tp3, month06, m12, week4, day30, year1, fu1, ses-2, study1).
  The root itself may be a single patient folder.
- DICOM tree in any nesting: grouped by PatientID, then by StudyDate; one visit per
  patient and day (same-day studies are one visit). A file that should be DICOM but
  cannot be read, in a folder holding no series, is listed as an unusable entry of its own.

When a visit holds several DICOM series the visit uses one, by this rule (`choose_series`):
valid geometry; SeriesDescription matching `series_description` (a regex) if set; when the
visit has a date of its own (its name), series of that StudyDate; never a series dated on
another visit's day or also found in another visit's folder (unless nothing else is left);
then the 3D series with the most slices (ties: latest StudyTime, then UID). The choice is
logged and recorded in `Visit.series_choice` and, on loading, `Meta.series_choice`. Two
visits that would use the same series are refused. ``derivatives``, ``sourcedata``,
``code`` and hidden folders are never patients or visits.

A follow-up whose DICOM PatientID differs from its baseline's, and a series whose slices
carry different PatientIDs, are refused (the error names files, never the IDs) unless
``allow_mixed_patients=True``. `load_pair` applies the same rules to the two inputs of
`longitudinal compare`, and `check_same_patient` to any two loaded images.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import InputError
from .settings import SettingError, check
from .io import ITK_EXTS, NIFTI_EXTS, PICTURE_EXTS, Image, ImageInfo, InputSettings, SeriesInfo, describe, load_image
from .io.dicom import Scan, scan
from .io.image import _ext
from .io.provenance import context, date_in, parse_date, stem

log = logging.getLogger(__name__)

IGNORED_DIRS = frozenset({"derivatives", "sourcedata", "code", "__pycache__"})
_IMAGE_FILE_EXTS = NIFTI_EXTS + PICTURE_EXTS + ITK_EXTS

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

    def __post_init__(self) -> None:
        check(self)
        if self.series_description is not None:
            try:
                re.compile(self.series_description)
            except re.error as exc:
                raise SettingError("series_description", f"not a regular expression: {exc}") from None


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
    date_source: str | None = None  # where `date` came from (see io.Meta.study_date_source)
    series_choice: str | None = None  # how the series was chosen when the visit held several (io.Meta)
    # Two files of the visit's series whose PatientIDs differ (never the IDs).
    mixed_patient_files: tuple[Path, Path] | None = field(default=None, repr=False, compare=False)

    def load(self, allow_mixed_patients: bool = False, settings: InputSettings | None = None) -> Image:
        """The visit's image; what the timeline knows (date, modality, series choice) fills what the header lacks."""
        image = load_image(self.path, self.series_uid, allow_mixed_patients=allow_mixed_patients,
                           settings=settings)
        meta = image.meta
        known: dict[str, str | None] = {"study_time": meta.study_time or self.time,
                                        "modality": meta.modality or self.modality,
                                        "series_choice": meta.series_choice or self.series_choice}
        if not meta.study_date and self.date:
            known.update(study_date=self.date.strftime("%Y%m%d"), study_date_source=self.date_source)
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


def _visit_like(name: str) -> bool:
    return (date_in(name) is not None or bool(_ORDINAL_RE.match(name))
            or name.lower() in _FIRST_WORDS)


def _name_key(name: str) -> tuple:
    first = 0 if name.lower() in _FIRST_WORDS else 1
    return (first, [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name) if t])


def _order(visits: list[Visit], where: Path) -> tuple[Visit, ...]:
    if visits and all(v.date is not None for v in visits):
        by_date = tuple(sorted(visits, key=lambda v: (v.date, v.time or "", _name_key(v.id))))
        by_name = tuple(sorted(visits, key=lambda v: _name_key(v.id)))
        if by_date != by_name and any(date_in(v.id) is None for v in visits):
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


@dataclass(frozen=True)
class OtherVisit:
    """What choosing a visit's series must keep clear of: another visit's date and the series in its folder."""

    date: dt.date | None
    series_uids: frozenset[str]


def choose_series(series: Sequence[SeriesInfo], settings: TimelineSettings, where: Path, *,
                  date: dt.date | None = None, others: Sequence[OtherVisit] = ()) -> tuple[SeriesInfo, str | None]:
    """The series that represents a visit, and a one-line note of how it was chosen (None: it was the only one).

    `date`: the visit's own date (from its name), if it has one; `others`: the patient's other visits.
    The rule is in the module docstring; each step applies only if it leaves some series.
    """
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
    steps = [f"valid geometry{f', description /{settings.series_description}/' if settings.series_description else ''}"]

    def narrow(keep: list[SeriesInfo], what: str) -> None:
        nonlocal usable
        if keep and len(keep) < len(usable):
            steps.append(f"{what} ({len(usable) - len(keep)} left out)")
            usable = keep

    if date is not None:
        narrow([s for s in usable if parse_date(s.study_date) == date], f"dated {date.isoformat()} like the visit")
    other_dates = {o.date for o in others if o.date is not None} - {date}
    narrow([s for s in usable if parse_date(s.study_date) not in other_dates], "not dated on another visit's day")
    other_uids = frozenset().union(*(o.series_uids for o in others)) if others else frozenset()
    narrow([s for s in usable if s.uid not in other_uids], "not also in another visit's folder")
    best = max(usable, key=lambda s: (len(s.size), s.n_slices, s.study_time or "", s.uid))
    folders = {f.parent for f in best.files}
    for s in series:  # a corrupt file may have split off the chosen series (a damaged SeriesInstanceUID)
        if s.corrupt and s.problem_path is not None and (s.problem_path.parent in folders
                                                         or any(f.parent in folders for f in s.files)):
            raise InputError(s.problem_path, f"{s.problem}; it sits with the series this visit would use")
    if len(series) == 1:
        return best, None
    steps.append("then the 3D series with the most slices")
    note = (f"series {best.uid} '{best.description or ''}' ({best.modality or '?'}, {best.n_slices} slice(s)) "
            f"chosen from {len(series)} series in this visit: {'; '.join(steps)}")
    log.info("%s: %s", where, note)
    return best, note


def _visit_from_series(vid: str, date: dt.date | None, patient: str, s: SeriesInfo, note: str | None,
                       date_source: str | None) -> Visit:
    header_date = parse_date(s.study_date)
    if date is not None and header_date is not None and header_date != date:
        log.warning("%s: visit name says %s but the DICOM StudyDate is %s; the name orders the visits", s.folder,
                    date.isoformat(), header_date.isoformat())
    return Visit(id=vid, date=date or header_date, path=s.folder, patient_id=patient, modality=s.modality,
                 size=s.size, spacing=s.spacing, kind="dicom", series_uid=s.uid, description=s.description,
                 time=s.study_time, header_patient_id=s.patient_id,
                 date_source=date_source if date else ("DICOM StudyDate" if header_date else None),
                 series_choice=note, mixed_patient_files=s.mixed_patient_files)


def _visit_from_info(vid: str, date: dt.date | None, patient: str, info: ImageInfo,
                     date_source: str | None = None) -> Visit:
    """A visit of one image file; `date`: from the visit's name. A JSON sidecar's date beats the name's."""
    found = context(info.path) if info.kind != "dicom" else None
    time = info.study_time
    if found is not None and found.date is not None and (found.date_source or "").startswith("BIDS sidecar"):
        if date is not None and found.date != date:
            log.warning("%s: its %s says %s, the visit name %s; using the sidecar", info.path, found.date_source,
                        found.date.isoformat(), date.isoformat())
        date, date_source, time = found.date, found.date_source, found.time
    elif date is None:
        date = parse_date(info.study_date)
        date_source = ("DICOM StudyDate" if info.kind == "dicom" else found.date_source if found else None) \
            if date else None
    return Visit(id=vid, date=date, path=info.path, patient_id=patient,
                 modality=info.modality, size=info.size, spacing=info.spacing, kind=info.kind,
                 series_uid=info.series_uid, description=info.description, time=time,
                 header_patient_id=info.patient_id, date_source=date_source)


def _suffix_rank(path: Path, settings: TimelineSettings) -> int:
    suffix = stem(path).rsplit("_", 1)[-1]
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


@dataclass(frozen=True)
class _Pending:
    """A plain-layout visit before its series is chosen (choosing needs the patient's other visits)."""

    id: str
    path: Path
    date: dt.date | None  # from the visit's name
    found: Scan | None  # the DICOM scan of a folder visit; None for an image file
    file: Path | None = None  # the image file of a file visit

    @property
    def name_source(self) -> str:
        return "file name" if self.path.is_file() else "folder name"


def _pending(path: Path, vid: str, date: dt.date | None, settings: TimelineSettings) -> _Pending:
    """The visit stored at `path`: an image file, a folder with image files, or DICOM."""
    if path.is_file():
        return _Pending(vid, path, date, None, path)
    files = [p for p in _children(path) if p.is_file() and _ext(p) in _IMAGE_FILE_EXTS]
    if files:
        return _Pending(vid, path, date, None, _pick_file(files, settings, path))
    found = scan(path)
    orphans = found.orphans()
    if orphans:
        raise InputError(orphans[0].path, orphans[0].reason)
    if not found.series:
        what = f" ({len(found.skipped)} non-image file(s))" if found.skipped else ""
        raise InputError(path, f"no image found for this visit{what}")
    return _Pending(vid, path, date, found)


def _resolve(pending: list[_Pending], patient: str, settings: TimelineSettings) -> list[Visit]:
    """Visits from pending ones: each DICOM visit's series chosen clear of the other visits."""
    visits = []
    for p in pending:
        if p.found is None:
            visits.append(_visit_from_info(p.id, p.date, patient, describe(p.file), p.name_source))
            continue
        others = [OtherVisit(q.date, frozenset(s.uid for s in q.found.series) if q.found else frozenset())
                  for q in pending if q is not p]
        chosen, note = choose_series(p.found.series, settings, p.path, date=p.date, others=others)
        visits.append(_visit_from_series(p.id, p.date, patient, chosen, note, p.name_source))
    return visits


# ----------------------------------------------------------------------------- layouts


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
        found = context(image)  # sidecar, sessions.tsv, session name
        visit = Visit(id=ses.name, date=found.date, path=image, patient_id=subject.name,
                      modality=info.modality or "MR", size=info.size, spacing=info.spacing, kind=info.kind,
                      description=info.description, time=found.time, date_source=found.date_source)
        visits.append(visit)  # BIDS anat images are MR unless the sidecar says otherwise
    return visits


def _plain_patient(folder: Path, pid: str, settings: TimelineSettings) -> list[Visit]:
    pending = []
    for child in _children(folder):
        if child.is_file() and _ext(child) not in _IMAGE_FILE_EXTS + (".dcm",):
            continue  # notes, spreadsheets next to the visits
        name = stem(child) if child.is_file() else child.name
        if not _visit_like(name):
            raise InputError(child, "cannot tell when this visit happened from its name; name visits by date "
                                    "(2021-03-04 or 20210304) or in order (baseline, visit1, visit2, ...)")
        pending.append(_pending(child, name, date_in(name), settings))
    return _resolve(pending, pid, settings)


def _is_plain_patient(folder: Path) -> bool:
    """Some child is named like a visit (the others get a clear error later)."""
    kids = [c for c in _children(folder) if c.is_dir() or _ext(c) in _IMAGE_FILE_EXTS + (".dcm",)]
    return any(_visit_like(stem(c) if c.is_file() else c.name) for c in kids)


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
    found = scan(root)

    def kept(path: Path) -> bool:
        return not any(_hidden_or_ignored(Path(part)) for part in path.relative_to(root).parts[:-1])

    series = [s for s in found.series if kept(s.files[0])]
    # Unreadable files nothing else accounts for: each is listed as an unusable entry (no patient is known).
    broken = [(u.path, f"unreadable file {u.path.name}", InputError(u.path, u.reason))
              for u in found.orphans() if kept(u.path)]
    if not series and not broken:
        raise InputError(root, "no patients found: expected BIDS (sub-*/ses-*/anat), <patient>/<visit>/<image>, "
                               "or a folder of DICOM files")
    by_patient: dict[str, dict[str, list[SeriesInfo]]] = {}
    for s in series:
        if not s.patient_id:
            raise InputError(s.files[0], "DICOM series without PatientID; cannot tell whose scan it is")
        if not parse_date(s.study_date):
            raise InputError(s.files[0], "DICOM series without a valid StudyDate; cannot place it in time")
        by_patient.setdefault(s.patient_id, {}).setdefault(s.study_date, []).append(s)  # type: ignore[arg-type]

    def patient_visits(pid: str, days: dict[str, list[SeriesInfo]]) -> list[Visit]:
        visits = []
        for day, group in days.items():
            where = Path(os.path.commonpath([str(s.folder) for s in group]))
            chosen, note = choose_series(group, settings, where)
            visits.append(_visit_from_series(day, parse_date(day), pid, chosen, note, "DICOM StudyDate"))
        return visits

    return [(root, pid, _collect(patient_visits, pid, days)) for pid, days in by_patient.items()] + broken


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
            _check_distinct_series(ordered)
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


_MIXED_HINT = "(pass allow_mixed_patients=True, CLI --allow-mixed-patients, if the ID changed legitimately)"


def _check_same_patient(visits: tuple[Visit, ...]) -> None:
    base = visits[0]
    for v in visits:
        if v.mixed_patient_files:
            a, b = v.mixed_patient_files
            raise InputError(b, f"PatientID differs from that of {a} in the same series; refusing a series that "
                                f"mixes two people {_MIXED_HINT}")
    for v in visits[1:]:
        if base.header_patient_id and v.header_patient_id and v.header_patient_id != base.header_patient_id:
            raise InputError(v.path, f"PatientID differs from the baseline's ({base.path}); refusing to compare "
                                     f"scans of two people {_MIXED_HINT}")


def _check_distinct_series(visits: tuple[Visit, ...]) -> None:
    seen: dict[str, Visit] = {}
    for v in visits:
        if v.series_uid and v.series_uid in seen:
            raise InputError(v.path, f"visits {seen[v.series_uid].id} and {v.id} would both use series {v.series_uid}; "
                                     "each visit folder must hold its own series")
        if v.series_uid:
            seen[v.series_uid] = v


# ----------------------------------------------------------------------------- one pair, as `compare` loads it


def check_same_patient(baseline: Image, followup: Image) -> None:
    """Refuse two images whose DICOM PatientIDs differ; the error names a file of each, never the IDs.

    Images without a PatientID (NIfTI, pictures) pass: there is nothing to compare. Series that mix
    patients within themselves are refused by `load_image` unless it was told to allow them.
    """
    a, b = baseline.meta.patient_id, followup.meta.patient_id
    if a and b and a != b:
        raise InputError(_where(followup), f"PatientID differs from the baseline's ({_where(baseline)}); refusing to "
                                           f"compare scans of two people {_MIXED_HINT}")


def _where(image: Image) -> str:
    sources = image.meta.sources
    if len(sources) > 1:
        return os.path.commonpath(sources)
    return sources[0] if sources else "(image in memory)"


def load_pair(baseline: str | os.PathLike, followup: str | os.PathLike, *,
              series_uids: tuple[str | None, str | None] = (None, None),
              dates: tuple[dt.date | None, dt.date | None] = (None, None), allow_mixed_patients: bool = False,
              settings: InputSettings | None = None,
              timeline: TimelineSettings = TimelineSettings()) -> tuple[Image, Image]:
    """The baseline and follow-up images of one comparison, loaded as `longitudinal compare` does.

    A folder holding several DICOM series has one chosen by `choose_series` (never the other input's
    series; `series_uids` overrides); the choice is in `Meta.series_choice`. `dates` (e.g. from
    --baseline-date) set `Meta.study_date`, overriding the header with a warning when they differ; without
    them the date comes from the header or the image's surroundings. Both must be the same patient unless
    `allow_mixed_patients`.
    """
    paths = [Path(baseline), Path(followup)]
    scans: list[Scan | None] = [None, None]
    for k, path in enumerate(paths):
        if series_uids[k] is None and path.is_dir():
            scans[k] = scan(path)
    chosen: list[tuple[str | None, str | None]] = []
    for k, path in enumerate(paths):
        found, uid, note = scans[k], series_uids[k], None
        if found is not None and len(found.series) > 1 and not found.orphans():
            other = scans[1 - k]
            own_date = dates[k] or context(path).date
            others = [OtherVisit(dates[1 - k] or context(paths[1 - k]).date,
                                 frozenset(s.uid for s in other.series) if other else frozenset())]
            best, note = choose_series(found.series, timeline, path, date=own_date, others=others)
            uid = best.uid
        chosen.append((uid, note))
    if chosen[0][0] is not None and chosen[0][0] == chosen[1][0]:
        raise InputError(paths[1], f"baseline and follow-up would both use series {chosen[0][0]}")
    images = []
    for k, (path, (uid, note), label) in enumerate(zip(paths, chosen, ("--baseline-date", "--followup-date"))):
        image = load_image(path, uid, allow_mixed_patients=allow_mixed_patients, settings=settings)
        meta = dataclasses.replace(image.meta, series_choice=note) if note else image.meta
        if dates[k] is not None:
            given = dates[k].strftime("%Y%m%d")
            if meta.study_date and meta.study_date != given:
                log.warning("%s: %s %s overrides the date %s from %s", path, label, dates[k].isoformat(),
                            meta.study_date, meta.study_date_source or "the header")
            meta = dataclasses.replace(meta, study_date=given, study_date_source=label)
        images.append(dataclasses.replace(image, meta=meta))
    if not allow_mixed_patients:
        check_same_patient(images[0], images[1])
    return images[0], images[1]
