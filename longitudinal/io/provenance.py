"""When an image was taken, and what kind it is, from what sits around it.

NIfTI files and pictures carry no date, and a DICOM header may lack one. `context(path)` reads,
first found wins:

1. a BIDS JSON sidecar next to the image (same name, .json): `AcquisitionDateTime`, else
   `AcquisitionDate` (+ `AcquisitionTime`); its `Modality`;
2. for an image in a BIDS session (`sub-X/ses-Y/<datatype>/`): `acq_time` of the session in
   `sub-X/sub-X_sessions.tsv`, else a date in the session name (`ses-20210304`);
3. a date in the file's own name (`P001/20210304.nii.gz`), else in its folder's name
   (`P001/2021-03-04/t1.nii.gz`). Folders further up are never read: one dated export folder
   above the visits would date them all alike.

A sidecar or sessions.tsv whose date cannot be read is an error naming that file: it would
otherwise be ignored and the image dated from somewhere else.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .image import _ext

_DATE_RE = re.compile(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})(?!\d)")
BIDS_DATATYPES = frozenset({"anat", "func", "dwi", "fmap", "perf", "pet", "meg", "eeg", "ieeg", "beh", "micr",
                            "nirs", "motion"})


@dataclass(frozen=True)
class Context:
    """What an image's surroundings say about it; every field None when nothing does."""

    date: dt.date | None = None
    time: str | None = None  # HHMMSS
    date_source: str | None = None  # e.g. "BIDS sidecar AcquisitionDateTime", "folder name"
    modality: str | None = None
    modality_source: str | None = None


def date_in(name: str) -> dt.date | None:
    """The first valid date written in `name` as YYYY-MM-DD or YYYYMMDD (not inside a longer number)."""
    for m in _DATE_RE.finditer(name):
        try:
            return dt.date(int(m[1]), int(m[2]), int(m[3]))
        except ValueError:
            continue
    return None


def parse_date(text: str | None) -> dt.date | None:
    """A date from DICOM (YYYYMMDD) or ISO text (2021-03-04, 2021-03-04T10:00:00)."""
    if not text:
        return None
    return date_in(text.strip()[:10])


def stem(path: Path) -> str:
    ext = _ext(path)
    return path.name[: -len(ext)] if ext else path.name


def sidecar(path: Path) -> Path | None:
    """The BIDS JSON sidecar of an image file, if there is one."""
    if path.is_dir():
        return None
    candidate = path.with_name(stem(path) + ".json")
    return candidate if candidate.is_file() else None


def read_sidecar(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, f"JSON sidecar cannot be read ({type(exc).__name__}: {str(exc)[:100]})") from exc
    if not isinstance(doc, dict):
        raise InputError(path, "JSON sidecar is not an object")
    return doc


def _iso(where: Path, key: str, text: object) -> tuple[dt.date, str | None]:
    """(date, HHMMSS or None) from an ISO date or date-time string; an error naming the file otherwise."""
    if not isinstance(text, str):
        raise InputError(where, f"{key} is {text!r}, not an ISO date string")
    value = text.strip()
    try:
        if "T" in value or len(value) > 10:
            stamp = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            return stamp.date(), stamp.strftime("%H%M%S")
        return dt.date.fromisoformat(value), None
    except ValueError:
        raise InputError(where, f"{key} {value[:40]!r} is not a valid ISO date") from None


def session_dates(subject: Path) -> dict[str, tuple[dt.date | None, str | None]]:
    """acq_time of each session in `sub-X/sub-X_sessions.tsv`: {"ses-01": (date, HHMMSS)}; {} without the file."""
    tsv = subject / f"{subject.name}_sessions.tsv"
    if not tsv.is_file():
        return {}
    try:
        with open(tsv, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(tsv, f"sessions table cannot be read ({type(exc).__name__})") from exc
    out: dict[str, tuple[dt.date | None, str | None]] = {}
    for row in rows:
        sid, acq = (row.get("session_id") or "").strip(), (row.get("acq_time") or "").strip()
        if not sid:
            continue
        sid = sid if sid.startswith("ses-") else f"ses-{sid}"
        out[sid] = _iso(tsv, f"acq_time of {sid}", acq) if acq and acq.lower() != "n/a" else (None, None)
    return out


def bids_session(path: Path) -> tuple[Path, Path] | None:
    """(subject folder, session folder) when `path` sits in `sub-X/ses-Y/<datatype>/`."""
    datatype = path.parent
    session = datatype.parent
    subject = session.parent
    if datatype.name in BIDS_DATATYPES and session.name.startswith("ses-") and subject.name.startswith("sub-"):
        return subject, session
    return None


def context(path: Path) -> Context:
    """Date and modality of the image at `path` from its sidecar, BIDS session, or names (see the module)."""
    date, time, source, modality, modality_source = None, None, None, None, None
    side = sidecar(path)
    if side is not None:
        doc = read_sidecar(side)
        for key in ("AcquisitionDateTime", "AcquisitionDate"):
            if doc.get(key) not in (None, ""):
                date, time = _iso(side, key, doc[key])
                if key == "AcquisitionDate" and isinstance(doc.get("AcquisitionTime"), str):
                    time = re.sub(r"\D", "", doc["AcquisitionTime"])[:6] or None
                source = f"BIDS sidecar {key}"
                break
        if isinstance(doc.get("Modality"), str) and doc["Modality"].strip():
            modality, modality_source = doc["Modality"].strip(), "BIDS sidecar Modality"
    bids = bids_session(path)
    if date is None and bids is not None:
        subject, session = bids
        date, time = session_dates(subject).get(session.name, (None, None))
        source = "BIDS sessions.tsv acq_time" if date else None
        if date is None and (date := date_in(session.name[4:])) is not None:
            source = "BIDS session name"
    if date is None and bids is None:
        for name, what in ((stem(path) if path.is_file() else path.name, "file name" if path.is_file() else
                            "folder name"), (path.parent.name, "folder name")):
            if (date := date_in(name)) is not None:
                source = what
                break
    return Context(date, time if date else None, source, modality, modality_source)
