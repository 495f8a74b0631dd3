"""DICOM headers: a folder scanned into series, strict header values, slice geometry (pixels: `dicom_pixels`).

- A DICOM series is ordered by ImagePositionPatient projected on the slice normal
  (cross product of the ImageOrientationPatient rows), never by file name or
  InstanceNumber. Missing slices, uneven spacing, duplicated positions, mixed
  orientations and sheared stacks (gantry tilt) are refused rather than resampled
  silently: a wrong geometry would show up later as a fake "change".
- Every number geometry or pixel values depend on (ImagePositionPatient,
  ImageOrientationPatient, PixelSpacing, SliceThickness, RescaleSlope/Intercept,
  NumberOfFrames, Rows/Columns, BitsAllocated/Stored, ...) is parsed strictly from the
  file's own bytes: a malformed value is an error naming the file and the tag, never a
  default (GDCM reads an unparsable RescaleIntercept as 0 without a word).
- Values that no well-formed image has are errors too: malformed UIDs, dates and transfer
  syntax, missing Image Pixel attributes, HighBit other than BitsStored - 1, CT/MR/PET without
  PixelSpacing, an enhanced header without its functional groups.
- Every file of a series folder is accounted for: a file there that should be DICOM
  (DICOM preamble, or a DICOM-like name: no extension, .dcm, .dicom, .ima) but cannot be
  read makes the series in that folder unusable, with the file named; a gap in the
  stack names the files on both sides and any unreadable file next to them. Plain text
  files and known non-image extensions (.json, .txt, ...) are skipped.
- A folder holding several image series is refused unless `series_uid=` (CLI
  `--series-uid`) picks one; the error lists the series.
- A series whose slices carry different PatientIDs is refused unless the caller allows it.
- An image with one frame (a single DICOM slice) is 2D; its position in the patient is
  dropped because 2D registration works in the image plane.
- Multi-frame DICOM becomes a 3D volume when every frame has a position (enhanced
  multi-frame, RT dose grids); cine/time-series multi-frame files are refused.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from ..errors import InputError
from .image import DICOM_EXTS, ITK_EXTS, NIFTI_EXTS, PICTURE_EXTS, Meta, _ext, _str
from .native import library_messages

log = logging.getLogger(__name__)

# Files that commonly sit next to DICOM series and are never images.
NEVER_IMAGE_EXTS = (".txt", ".json", ".tsv", ".csv", ".md", ".xml", ".html", ".htm", ".pdf", ".zip", ".gz", ".py",
                    ".dump", ".icc", ".ini", ".log", ".bval", ".bvec", ".db", ".bak", ".sh", ".bat", ".exe",
                    ".inf", ".nfo", ".cfg", ".yaml", ".yml", ".toml", ".rtf", ".doc", ".docx", ".xls", ".xlsx")

# Relative tolerance on slice steps: scanners write positions with ~1e-4 mm jitter.
_STEP_RTOL = 0.01
_STEP_ATOL = 1e-3  # mm
_UNIT_ATOL = 1e-3  # ImageOrientationPatient rows: unit length and orthogonal within this

_MAX_FRAMES = 65536
# The Image Pixel module's attributes every DICOM 3 image has (type 1), and those with a value that matters.
_REQUIRED = ("SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
             "PixelRepresentation")
# Images whose pixel spacing is required (CT, MR, PET): without it, 1 mm pixels would be made up.
_SPACING_REQUIRED = ("CT", "MR", "PT", "RTDOSE")
# PhotometricInterpretation values and the SamplesPerPixel each needs.
_PHOTOMETRIC = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3,
                "YBR_PARTIAL_422": 3, "YBR_PARTIAL_420": 3, "YBR_ICT": 3, "YBR_RCT": 3, "HSV": 3, "ARGB": 4,
                "CMYK": 4}  # more frames than this in one file is a corrupt header, not a scan
_DS = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")  # DICOM decimal string
_IS = re.compile(r"[+-]?\d+")  # DICOM integer string
_UID = re.compile(r"\d+(\.\d+)*")
_DA = re.compile(r"\d{8}|\d{4}\.\d{2}\.\d{2}")  # YYYYMMDD (or the old YYYY.MM.DD)
_TM = re.compile(r"\d{2}(:?\d{2}(:?\d{2}(\.\d{1,6})?)?)?")  # HHMMSS.FFFFFF (or the old HH:MM:SS)


@dataclass(frozen=True)
class PixelLayout:
    """How a file's pixel data is laid out, and which real values its stored pixels may map to."""

    rows: int
    cols: int
    samples: int
    frames: int
    bits_allocated: int | None
    bits_stored: int | None
    signed: bool
    value_range: tuple[float, float] | None  # after rescale; None: not checkable (float data, palette, LUT)

    subsampled: bool = False  # YBR_FULL_422: two samples' worth of data per pixel
    rle: bool = False  # RLE Lossless transfer syntax
    big_endian: bool = False  # Explicit VR Big Endian (retired)

    @property
    def native_bytes(self) -> int | None:
        """Bytes of uncompressed pixel data the header describes."""
        if not self.bits_allocated:
            return None
        samples = 2 if self.subsampled and self.samples == 3 else self.samples
        return math.ceil(self.rows * self.cols * samples * self.frames * self.bits_allocated / 8)


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM image series found by a header-only scan, slices already in spatial order."""

    uid: str
    files: tuple[Path, ...]  # one per slice in spatial order (a multi-frame series has one file)
    size: tuple[int, ...]  # SimpleITK order (x, y[, z])
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int = 1
    modality: str | None = None
    description: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_uid: str | None = None
    rescale_float: bool = False  # some slice has a non-integral slope/intercept
    problem: str | None = None  # why the series cannot be loaded, found from headers alone
    problem_path: Path | None = None  # the file the problem is about
    corrupt: bool = False  # the problem is a file that cannot be read or a malformed header, not the geometry
    # Two files of the series whose PatientIDs differ (the IDs themselves are never printed).
    mixed_patient_files: tuple[Path, Path] | None = field(default=None, repr=False)
    # Per file (in `files` order): its pixel data layout, checked against the file before decoding.
    pixel_layouts: tuple[PixelLayout, ...] = field(default=(), repr=False, compare=False)

    @property
    def folder(self) -> Path:
        return Path(os.path.commonpath([str(f.parent) for f in self.files])) if self.files else Path(".")

    @property
    def n_slices(self) -> int:
        return self.size[2] if len(self.size) == 3 else 1

    def meta(self) -> Meta:
        return Meta(patient_id=self.patient_id, patient_name=self.patient_name, study_date=self.study_date,
                    study_time=self.study_time, modality=self.modality, series_description=self.description,
                    series_uid=self.uid, sources=tuple(str(f) for f in self.files),
                    study_date_source="DICOM StudyDate" if self.study_date else None)

    def label(self) -> str:
        """One line naming the series for error messages and logs (no patient data)."""
        what = f"{self.n_slices} slices" if len(self.size) == 3 else "1 image"
        return f"{self.uid} '{self.description or ''}' {self.modality or '?'} {what}"


@dataclass(frozen=True)
class Unreadable:
    """A file that should be DICOM (preamble or DICOM-like name) but cannot be read."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Scan:
    """What a header-only scan of a folder found."""

    series: list[SeriesInfo]
    skipped: list[tuple[Path, str]]  # plainly not DICOM images (text, known extensions, DICOM without pixels)
    unreadable: list[Unreadable]  # every one also makes the series of its folder unusable, if there is one

    def orphans(self) -> list[Unreadable]:
        """Unreadable files in folders that hold no image series (nothing else names them)."""
        folders = {f.parent for s in self.series for f in s.files}
        return [u for u in self.unreadable if u.path.parent not in folders]


# ----------------------------------------------------------------------------- strict header values


def _tag_name(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return f"{keyword} {Tag(tag)}" if tag is not None else keyword


def _raw_value(path: Path, ds: pydicom.Dataset, keyword: str) -> object:
    """The stored value of an element (bytes until pydicom converts it); None when absent."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    try:
        return ds.get_item(tag).value
    except Exception as exc:  # pydicom converts some raw elements here, and can fail (an unknown VR)
        raise InputError(path, f"malformed {_tag_name(keyword)}: {type(exc).__name__}") from exc


def _raw_text(path: Path, ds: pydicom.Dataset, keyword: str) -> str | None:
    """The text of a DS/IS element as stored in the file (before pydicom converts it); None: absent or empty."""
    value = _raw_value(path, ds, keyword)
    if value is None:
        return None
    if isinstance(value, bytes):
        text = value.decode("latin-1")
    elif isinstance(value, (list, tuple, MultiValue)):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.strip(" \0")
    return text or None


def _present(path: Path, ds: pydicom.Dataset, keyword: str) -> bool:
    """Whether an element is there with a value (binary values by their length, text by what is not padding)."""
    value = _raw_value(path, ds, keyword)
    if isinstance(value, bytes) and dictionary_VR(tag_for_keyword(keyword)) in ("US", "SS", "UL", "SL", "FL", "FD",
                                                                                   "OB", "OW"):
        return len(value) > 0
    return value is not None and _raw_text(path, ds, keyword) is not None


def _numbers(path: Path, ds: pydicom.Dataset, keyword: str, count: int | None = None,
             integer: bool = False) -> tuple[float, ...] | None:
    """The values of a decimal (DS) or integer (IS) string element, strictly parsed; None when absent."""
    text = _raw_text(path, ds, keyword)
    if text is None:
        return None
    parts = [p.strip(" \0") for p in text.split("\\")]
    pattern = _IS if integer else _DS
    if not all(pattern.fullmatch(p) for p in parts):
        kind = "an integer string (IS)" if integer else "a decimal string (DS)"
        raise InputError(path, f"malformed {_tag_name(keyword)}: {text[:64]!r} is not {kind}")
    values = tuple(float(p) for p in parts)
    if not all(math.isfinite(v) for v in values):
        raise InputError(path, f"malformed {_tag_name(keyword)}: {text[:64]!r} is not finite")
    if count is not None and len(values) != count:
        raise InputError(path, f"malformed {_tag_name(keyword)}: {len(values)} value(s), expected {count}")
    return values


def _unsigned(path: Path, ds: pydicom.Dataset, keyword: str) -> int | None:
    """An unsigned short (US) element such as Rows or BitsStored; None when absent or empty."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    try:
        value = ds[tag].value
    except Exception as exc:  # pydicom raises several types on a value of the wrong length
        raise InputError(path, f"malformed {_tag_name(keyword)}: {type(exc).__name__}") from exc
    if isinstance(value, (list, MultiValue)) and len(value) == 1:
        value = value[0]
    if value is None or value == b"" or value == "":
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(path, f"malformed {_tag_name(keyword)}: {str(value)[:64]!r} is not an unsigned number")
    return int(value)


def _item(path: Path, ds: pydicom.Dataset | None, keyword: str) -> pydicom.Dataset | None:
    """The first item of a sequence element, or None; a sequence that cannot be parsed is an error."""
    if ds is None or keyword not in ds:
        return None
    try:
        seq = ds[keyword].value
        return seq[0] if seq else None
    except Exception as exc:
        raise InputError(path, f"malformed {_tag_name(keyword)}: {type(exc).__name__}") from exc


def _sequence(path: Path, ds: pydicom.Dataset, keyword: str) -> list[pydicom.Dataset]:
    if keyword not in ds:
        return []
    try:
        return list(ds[keyword].value or [])
    except Exception as exc:
        raise InputError(path, f"malformed {_tag_name(keyword)}: {type(exc).__name__}") from exc


# ----------------------------------------------------------------------------- reading headers


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _looks_like_text(path: Path) -> bool:
    """A README or notes file without an extension: no NUL byte and valid UTF-8 at the start."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start > len(head) - 4  # a multi-byte character cut at the end of the sample
    return True


def _read_header(path: Path) -> pydicom.Dataset | None:
    """The DICOM header of `path`; None when the file is plainly not DICOM.

    Plainly not DICOM: a known non-DICOM extension, or a text file, without the 128-byte preamble.
    A file with the preamble, or with a DICOM-like name (no extension, .dcm, .dicom, .ima, a UID), that cannot
    be parsed raises InputError: inside a series folder it may be a slice, and dropping it would go unnoticed.
    Files without the preamble are accepted only if they carry a SOP Class UID or Rows and Columns; other
    files (an unknown extension) that are not DICOM are plainly not DICOM.
    """
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except PermissionError as exc:
        raise InputError(path, "permission denied: the file cannot be read") from exc
    except OSError as exc:
        raise InputError(path, f"cannot read the file: {exc.strerror or exc}") from exc
    magic = _has_dicom_magic(path)
    ext = _ext(path)
    if not magic and (ext in NEVER_IMAGE_EXTS + NIFTI_EXTS + PICTURE_EXTS + ITK_EXTS or _looks_like_text(path)):
        return None
    dicom_like = magic or ext in DICOM_EXTS or ext[1:].isdigit()  # UID-named files end in ".<digits>"
    try:
        with library_messages(f"reading {path}"):
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=not magic)
    except Exception as exc:  # pydicom raises many types on truncated or corrupt headers
        if not dicom_like:
            return None
        what = "DICOM header is truncated or corrupt" if magic else "not a DICOM file, or its header is corrupt"
        if isinstance(exc, InvalidDicomError):
            what = "not a DICOM file"
        raise InputError(path, f"{what} ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if not magic and "SOPClassUID" not in ds and not ("Rows" in ds and "Columns" in ds):
        if not dicom_like:
            return None
        raise InputError(path, "not a DICOM file")
    with library_messages(f"reading {path}"):  # pydicom warns as it converts values it finds invalid
        _convert(path, ds)
    return ds


# Parsed strictly from their raw bytes (`_numbers`, `_unsigned`): left unconverted by `_convert`.
_STRICT = frozenset(tag_for_keyword(k) for k in (
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "ImagerPixelSpacing",
    "NominalScannedPixelSpacing", "SliceThickness", "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept",
    "NumberOfFrames", "GridFrameOffsetVector", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "SamplesPerPixel"))


def _convert(path: Path, ds: pydicom.Dataset) -> None:
    """Convert every other top-level value now, so a value pydicom cannot read is an error naming its tag here
    rather than an exception wherever it is first used; and check the transfer syntax is one."""
    meta = getattr(ds, "file_meta", None)
    for tag in list(meta.keys()) if meta is not None else []:
        try:
            meta[tag]
        except Exception as exc:  # pydicom raises many types on values it cannot read
            raise InputError(path, f"malformed file meta element {Tag(tag)} ({type(exc).__name__}: "
                                   f"{str(exc)[:80]})") from exc
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and not (isinstance(syntax, pydicom.uid.UID) and syntax.is_transfer_syntax):
        raise InputError(path, f"TransferSyntaxUID {str(syntax)[:64]!r} is not a transfer syntax: header corrupt")
    for tag in list(ds.keys()):
        if tag in _STRICT:
            continue
        try:
            ds[tag]
        except Exception as exc:  # pydicom raises many types on values it cannot read
            raise InputError(path, f"malformed element {Tag(tag)} ({type(exc).__name__}: {str(exc)[:80]})") from exc


def _sop_name(ds: pydicom.Dataset) -> str:
    """The SOP class's name, from the dataset or else the file meta ("unknown SOP class" if neither says)."""
    try:
        uid = ds.get("SOPClassUID")
        if uid is None and getattr(ds, "file_meta", None) is not None:
            uid = ds.file_meta.get("MediaStorageSOPClassUID")
        return uid.name if uid is not None else "unknown SOP class"
    except Exception:  # a value pydicom cannot read: nothing can be said of the class
        return "unknown SOP class"


def _is_image(ds: pydicom.Dataset) -> bool:
    try:
        return bool("Rows" in ds and "Columns" in ds and ds.get("Rows") and ds.get("Columns"))
    except Exception:  # a Rows value pydicom cannot convert: the strict reader names it later
        return True


def _not_an_image(path: Path, ds: pydicom.Dataset) -> InputError:
    if "Image Storage" in _sop_name(ds):
        # An image SOP class without Rows/Columns: pydicom stops quietly at the end of a cut file.
        return InputError(path, f"DICOM {_sop_name(ds)} header has no Rows/Columns: file truncated or corrupt")
    if _sop_name(ds) == "unknown SOP class":
        return InputError(path, "DICOM header has neither a SOP class nor Rows/Columns: file truncated or corrupt")
    return InputError(path, f"not an image: DICOM {_sop_name(ds)} (Modality {_str(ds.get('Modality')) or '?'}) "
                            "holds no pixel data")


# ----------------------------------------------------------------------------- DICOM geometry


@dataclass(frozen=True)
class _Slice:
    path: Path
    frame: int | None  # frame index inside a multi-frame file
    ipp: tuple[float, float, float] | None
    iop: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None  # (row step, column step) as in DICOM
    rows: int
    cols: int
    components: int
    slope: float
    intercept: float
    layout: PixelLayout  # how the file's pixel data is laid out (one per file)


def _spacing_values(path: Path, ds: pydicom.Dataset, key: str) -> tuple[float, float] | None:
    ps = _numbers(path, ds, key, count=2)
    if ps is not None and not all(v > 0 for v in ps):
        raise InputError(path, f"{_tag_name(key)} must be positive, got {ps[0]:g}\\{ps[1]:g}")
    return ps  # type: ignore[return-value]


def _pixel_spacing(path: Path, ds: pydicom.Dataset) -> tuple[float, float] | None:
    """PixelSpacing (or the imager's), else the functional groups' (shared, then the first frame's).

    An enhanced multi-frame header (functional groups) must say: losing its PixelMeasuresSequence to a
    corrupt byte would otherwise give 1 mm pixels without a word. Other images without any spacing are
    pictures (secondary captures): 1 mm a pixel, as for PNG.
    """
    for key in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        ps = _spacing_values(path, ds, key)
        if ps is not None:
            return ps
    per_frame = _sequence(path, ds, "PerFrameFunctionalGroupsSequence")
    groups = [_item(path, ds, "SharedFunctionalGroupsSequence"), per_frame[0] if per_frame else None]
    for group in groups:
        measures = _item(path, group, "PixelMeasuresSequence")
        ps = _spacing_values(path, measures, "PixelSpacing") if measures is not None else None
        if ps is not None:
            return ps
    if per_frame:
        raise InputError(path, "enhanced multi-frame header without PixelSpacing in its functional groups "
                               "(PixelMeasuresSequence): header corrupt")
    modality = (_str(ds.get("Modality")) or "").upper()
    if modality in _SPACING_REQUIRED:
        raise InputError(path, f"{modality} image without PixelSpacing: header corrupt (its pixels have a size)")
    return None


def _rescale(path: Path, ds: pydicom.Dataset) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept (from the functional groups in an enhanced header); a CT image has them:
    without them Hounsfield units would silently shift."""
    source = ds
    if _raw_text(path, ds, "RescaleSlope") is None and _raw_text(path, ds, "RescaleIntercept") is None:
        shared = _item(path, ds, "SharedFunctionalGroupsSequence")
        source = _item(path, shared, "PixelValueTransformationSequence") or ds
    slope = _numbers(path, source, "RescaleSlope", count=1)
    intercept = _numbers(path, source, "RescaleIntercept", count=1)
    if (_str(ds.get("Modality")) or "").upper() == "CT" and (slope is None or intercept is None):
        raise InputError(path, "CT image without RescaleSlope and RescaleIntercept: header corrupt")
    if slope is not None and slope[0] == 0:
        raise InputError(path, f"{_tag_name('RescaleSlope')} is 0: every pixel would have the same value")
    return (slope[0] if slope else 1.0), (intercept[0] if intercept else 0.0)


def _layout(path: Path, ds: pydicom.Dataset, slope: float, intercept: float, frames: int) -> PixelLayout:
    """The pixel data layout the header describes, checked for values that cannot be right."""
    rows, cols = _unsigned(path, ds, "Rows"), _unsigned(path, ds, "Columns")
    if not rows or not cols:
        raise InputError(path, f"{_tag_name('Rows')}/{_tag_name('Columns')} must be at least 1, got {rows}x{cols}")
    samples = _unsigned(path, ds, "SamplesPerPixel")
    if samples is not None and samples not in (1, 3, 4):
        raise InputError(path, f"{_tag_name('SamplesPerPixel')} is {samples}; expected 1 or 3")
    allocated, stored = _unsigned(path, ds, "BitsAllocated"), _unsigned(path, ds, "BitsStored")
    high, representation = _unsigned(path, ds, "HighBit"), _unsigned(path, ds, "PixelRepresentation")
    if allocated is not None and allocated not in (1, 8, 16, 32, 64):
        raise InputError(path, f"{_tag_name('BitsAllocated')} is {allocated}; expected 1, 8, 16, 32 or 64")
    if stored is not None and not 1 <= stored <= (allocated or 64):
        raise InputError(path, f"{_tag_name('BitsStored')} is {stored}; expected 1 to BitsAllocated ({allocated})")
    if high is not None and allocated is not None and high >= allocated:
        raise InputError(path, f"{_tag_name('HighBit')} is {high}; expected below BitsAllocated ({allocated})")
    if high is not None and stored is not None and high != stored - 1:
        raise InputError(path, f"{_tag_name('HighBit')} is {high} but BitsStored is {stored}: HighBit must be "
                               "BitsStored - 1")
    if representation is not None and representation not in (0, 1):
        raise InputError(path, f"{_tag_name('PixelRepresentation')} is {representation}; expected 0 or 1")
    photometric = (_str(ds.get("PhotometricInterpretation")) or "").upper()
    wanted = _PHOTOMETRIC.get(photometric)
    if photometric and wanted is None:
        raise InputError(path, f"{_tag_name('PhotometricInterpretation')} {photometric[:32]!r} is not a known value")
    if wanted is not None and (samples or 1) != wanted:
        raise InputError(path, f"{_tag_name('PhotometricInterpretation')} {photometric} needs {wanted} sample(s) per "
                               f"pixel, but SamplesPerPixel is {samples or 1}")
    if (samples or 1) > 1:  # colour: unsigned samples, and how they are interleaved must be said
        if representation == 1:
            raise InputError(path, f"{_tag_name('PixelRepresentation')} is 1 (signed) for {photometric or 'colour'} "
                                   "data, which is unsigned: header corrupt")
        if _unsigned(path, ds, "PlanarConfiguration") is None and "SOPClassUID" in ds:
            raise InputError(path, f"colour image header lacks {_tag_name('PlanarConfiguration')}: header corrupt")
    value_range = None
    # Not checkable: no BitsStored (float data), bits unpacked to 0/255 by GDCM, an index into a table.
    if stored is not None and allocated != 1 and photometric != "PALETTE COLOR" and "ModalityLUTSequence" not in ds:
        lo, hi = (-(2 ** (stored - 1)), 2 ** (stored - 1) - 1) if representation == 1 else (0, 2 ** stored - 1)
        a, b = slope * lo + intercept, slope * hi + intercept
        value_range = (min(a, b), max(a, b))
    try:
        syntax = ds.file_meta.get("TransferSyntaxUID")
    except AttributeError:
        syntax = None
    return PixelLayout(rows, cols, samples or 1, frames, allocated, stored, representation == 1, value_range,
                       photometric == "YBR_FULL_422", syntax == pydicom.uid.RLELossless,
                       syntax == pydicom.uid.ExplicitVRBigEndian)


def _check_identity(path: Path, ds: pydicom.Dataset) -> None:
    """The values that group files into series and place them in time must be well formed: a corrupt UID
    can swallow the elements after it, a corrupt date misplaces a visit."""
    for key in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = _str(ds.get(key))
        if value is not None and (len(value) > 64 or not _UID.fullmatch(value)):
            raise InputError(path, f"malformed {_tag_name(key)}: {value[:64]!r} is not a UID")
    for key, pattern in (("StudyDate", _DA), ("StudyTime", _TM)):
        value = _str(ds.get(key))
        if value is not None and not pattern.fullmatch(value):
            raise InputError(path, f"malformed {_tag_name(key)}: {value[:32]!r}")
    if "SOPClassUID" in ds:  # a DICOM 3 image: the Image Pixel module's required attributes
        missing = [k for k in _REQUIRED if not _present(path, ds, k)]
        if missing:
            raise InputError(path, f"image header lacks {', '.join(missing)}: header corrupt")


def _slices_of(path: Path, ds: pydicom.Dataset) -> list[_Slice]:
    """One entry per frame, with the frame's position when the header gives it."""
    _check_identity(path, ds)
    slope, intercept = _rescale(path, ds)
    rows, cols = _unsigned(path, ds, "Rows") or 0, _unsigned(path, ds, "Columns") or 0
    comps = _unsigned(path, ds, "SamplesPerPixel") or 1
    if (_str(ds.get("PhotometricInterpretation")) or "").upper() == "PALETTE COLOR":
        comps = 3
    ps = _pixel_spacing(path, ds)
    for key in ("SliceThickness", "SpacingBetweenSlices"):
        _numbers(path, ds, key, count=1)  # unused for geometry (positions decide), but a corrupt value is a sign
    frames = _numbers(path, ds, "NumberOfFrames", count=1, integer=True)
    n_frames = int(frames[0]) if frames else 1
    if not 1 <= n_frames <= _MAX_FRAMES:
        raise InputError(path, f"{_tag_name('NumberOfFrames')} is {n_frames:g}; expected 1 to {_MAX_FRAMES}")
    layout = _layout(path, ds, slope, intercept, n_frames)
    iop = _numbers(path, ds, "ImageOrientationPatient", count=6)
    ipp = _numbers(path, ds, "ImagePositionPatient", count=3)
    base = dict(path=path, rows=rows, cols=cols, components=comps, slope=slope, intercept=intercept, layout=layout)
    # Enhanced multi-frame: positions per frame in functional groups (parsed even for one frame: a corrupt
    # value there is a corrupt file, and decoders that read it fail or differ).
    per_frame = _sequence(path, ds, "PerFrameFunctionalGroupsSequence")
    shared = _item(path, ds, "SharedFunctionalGroupsSequence")
    if per_frame and shared is None:
        raise InputError(path, "enhanced multi-frame header without SharedFunctionalGroupsSequence: header corrupt")
    if per_frame and len(per_frame) < n_frames:
        raise InputError(path, f"{len(per_frame)} per-frame functional group item(s) for {n_frames} frame(s): "
                               "header corrupt")
    per_frame = per_frame[:n_frames]  # (pydicom's one-frame test files keep their source's extra items)
    if n_frames == 1 and not per_frame:
        return [_Slice(frame=None, ipp=ipp, iop=iop, pixel_spacing=ps, **base)]  # type: ignore[arg-type]
    if per_frame:
        out = []
        shared_iop = _numbers(path, _item(path, shared, "PlaneOrientationSequence") or pydicom.Dataset(),
                              "ImageOrientationPatient", count=6)
        for k, item in enumerate(per_frame):
            plane = _item(path, item, "PlanePositionSequence")
            f_ipp = _numbers(path, plane, "ImagePositionPatient", count=3) if plane is not None else None
            orient = _item(path, item, "PlaneOrientationSequence")
            f_iop = _numbers(path, orient, "ImageOrientationPatient", count=6) if orient is not None else None
            out.append(_Slice(frame=k if n_frames > 1 else None, ipp=f_ipp,  # type: ignore[arg-type]
                              iop=f_iop or shared_iop or iop, pixel_spacing=ps, **base))
        return out
    # RT dose / NM style: one position plus offsets along the normal.
    offsets = _numbers(path, ds, "GridFrameOffsetVector")
    if offsets and len(offsets) == n_frames and ipp and iop:
        n = np.cross(iop[:3], iop[3:])
        start = np.asarray(ipp) if offsets[0] == 0 else np.asarray(ipp) - np.dot(ipp, n) * n
        return [_Slice(frame=k, ipp=tuple(start + off * n), iop=iop, pixel_spacing=ps, **base)  # type: ignore
                for k, off in enumerate(offsets)]
    return [_Slice(frame=k, ipp=None, iop=None, pixel_spacing=ps, **base) for k in range(n_frames)]  # type: ignore


@dataclass(frozen=True)
class _Grid:
    """Slices in spatial order and the regular grid they make, or why they make none."""

    slices: list[_Slice]
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    problem: str | None = None
    problem_path: Path | None = None
    gap: bool = False  # the problem is a gap in the stack (a whole number of slices missing)


def _geometry(slices: list[_Slice]) -> _Grid:
    """Order slices along the normal and check the stack is a regular grid."""
    first = slices[0]
    comps = first.components
    ps = first.pixel_spacing or (1.0, 1.0)
    spacing2 = (ps[1], ps[0])
    if len(slices) == 1:
        return _Grid(slices, (first.cols, first.rows), spacing2, (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))

    def fail(problem: str, path: Path | None = None, gap: bool = False) -> _Grid:
        return _Grid(slices, (first.cols, first.rows, len(slices)), spacing2 + (1.0,), (0.0, 0.0, 0.0),
                     tuple(np.eye(3).ravel()), problem, path or first.path, gap)

    for s in slices:
        if (s.rows, s.cols, s.components) != (first.rows, first.cols, comps):
            return fail(f"slices differ in size: {first.cols}x{first.rows} in {first.path.name} but "
                        f"{s.cols}x{s.rows} in {s.path.name}", s.path)
    if any(s.ipp is None or s.iop is None for s in slices):
        bad = next(s for s in slices if s.ipp is None or s.iop is None)
        if bad.frame is not None:
            return fail(f"multi-frame image with {len(slices)} frames but no per-frame positions "
                        "(a cine or time series?); only spatial stacks are supported", bad.path)
        return fail("slice without ImagePositionPatient/ImageOrientationPatient; cannot build a volume", bad.path)
    iop0 = np.asarray(first.iop)
    for s in slices:
        if not np.allclose(s.iop, iop0, atol=1e-4):
            return fail(f"slices have different orientations ({first.path.name} vs {s.path.name}); "
                        "a localizer or a mix of series?", s.path)
        if s.pixel_spacing and first.pixel_spacing and not np.allclose(s.pixel_spacing, first.pixel_spacing,
                                                                         rtol=1e-4):
            return fail(f"slices differ in pixel spacing ({first.path.name} vs {s.path.name})", s.path)
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    if not (abs(np.linalg.norm(row) - 1) < _UNIT_ATOL and abs(np.linalg.norm(col) - 1) < _UNIT_ATOL
            and abs(np.dot(row, col)) < _UNIT_ATOL):
        return fail(f"ImageOrientationPatient {tuple(float(v) for v in iop0)} is not two orthogonal unit vectors")
    normal = normal / np.linalg.norm(normal)
    order = sorted(range(len(slices)), key=lambda i: float(np.dot(slices[i].ipp, normal)))
    slices = [slices[i] for i in order]
    paths = {s.path for s in slices}
    folder = next(iter(paths)) if len(paths) == 1 else Path(os.path.commonpath([str(p.parent) for p in paths]))
    pos = np.array([np.dot(s.ipp, normal) for s in slices])
    steps = np.diff(pos)
    dup = np.flatnonzero(steps < _STEP_ATOL)
    if dup.size:
        a, b = slices[dup[0]], slices[dup[0] + 1]
        where = f"{a.path.name} and {b.path.name}" if a.path != b.path else f"frames {a.frame} and {b.frame}"
        return fail(f"duplicated slice position {pos[dup[0]]:.3f} mm along the normal in {where} "
                    "(two series mixed, or a repeated acquisition?)", b.path)
    expected = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - expected) > max(_STEP_RTOL * expected, _STEP_ATOL))
    if bad.size:
        i = int(bad[0])
        ratio = steps[i] / expected
        missing = ratio > 1.5 and abs(ratio - round(ratio)) < 0.1  # a whole number of slices is absent
        kind = f"{round(ratio) - 1} missing slice(s)? gap" if missing else "uneven slice spacing: step"
        # The files on both sides are healthy: the message names them, the error names the folder.
        return fail(f"{kind} of {steps[i]:.3f} mm between slice {i} (z={pos[i]:.3f}, {slices[i].path.name}) and "
                    f"slice {i + 1} (z={pos[i + 1]:.3f}, {slices[i + 1].path.name}), expected {expected:.3f} mm",
                    folder, gap=missing)
    ipp0 = np.asarray(slices[0].ipp)
    for s in slices:
        offset = np.asarray(s.ipp) - ipp0
        in_plane = offset - np.dot(offset, normal) * normal
        if np.linalg.norm(in_plane) > max(0.01 * expected, _STEP_ATOL) + 1e-3:
            return fail(f"slices are sheared ({np.linalg.norm(in_plane):.2f} mm in-plane shift at {s.path.name}); "
                        "gantry tilt is not supported, resample the series first", s.path)
    direction = np.column_stack([row, col, normal])
    return _Grid(slices, (first.cols, first.rows, len(slices)), spacing2 + (expected,),
                 tuple(float(v) for v in ipp0), tuple(float(v) for v in direction.ravel()))


def _series_from(uid: str, entries: list[tuple[Path, pydicom.Dataset]],
                 unreadable: Sequence[Unreadable] = ()) -> SeriesInfo:
    """The series made of `entries`; `unreadable`: files of its folder that could not be read."""
    entries = sorted(entries, key=lambda e: str(e[0]))
    slices: list[_Slice] = []
    problem: str | None = None
    problem_path: Path | None = None
    for path, ds in entries:
        try:
            slices.extend(_slices_of(path, ds))
        except InputError as exc:
            if problem is None:
                problem, problem_path = exc.problem, path
    if problem is not None:
        slices = [s for s in slices if s.path != problem_path] or slices
    multi = [p for p, ds in entries if len([s for s in slices if s.path == p]) > 1]
    if problem is None and multi and len(entries) > 1:
        problem, problem_path = (f"series mixes {len(multi)} multi-frame file(s) with other files; "
                                 "load one file at a time"), multi[0]
    if slices:
        grid = _geometry(slices)
    else:  # every file had a malformed header
        grid = _Grid([], (1, 1), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    corrupt = problem is not None or bool(unreadable)
    if problem is None and unreadable:  # a malformed header first, then an unreadable file, then geometry
        u = unreadable[0]
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        if grid.gap:
            problem = (f"{grid.problem}; {len(unreadable)} file(s) in this folder could not be read and may be the "
                       f"missing slice(s): {u.path.name} ({u.reason}){more}")
        else:
            problem = (f"{u.reason}; it sits in the folder of series {uid} ({len(entries)} readable file(s)), "
                       f"which cannot be used without it{more}")
        problem_path = u.path
    elif problem is None:
        problem, problem_path = grid.problem, grid.problem_path
    ds0 = entries[0][1]
    ids: dict[str, Path] = {}
    for path, ds in entries:
        ids.setdefault(_str(ds.get("PatientID")) or "", path)
    mixed = tuple(ids.values())[:2] if len(ids) > 1 else None
    files = tuple(dict.fromkeys(s.path for s in grid.slices)) or tuple(p for p, _ in entries)
    layouts = {s.path: s.layout for s in grid.slices}
    return SeriesInfo(
        uid=uid, files=files, size=tuple(int(v) for v in grid.size), spacing=tuple(float(v) for v in grid.spacing),
        origin=tuple(grid.origin), direction=tuple(grid.direction),
        components=slices[0].components if slices else 1,
        modality=_str(ds0.get("Modality")), description=_str(ds0.get("SeriesDescription")),
        patient_id=_str(ds0.get("PatientID")), patient_name=_str(ds0.get("PatientName")),
        study_date=_str(ds0.get("StudyDate")), study_time=_str(ds0.get("StudyTime")),
        study_uid=_str(ds0.get("StudyInstanceUID")),
        rescale_float=any(not (float(s.slope).is_integer() and float(s.intercept).is_integer()) for s in slices)
        or len({(s.slope, s.intercept) for s in slices}) > 1,
        problem=problem, problem_path=problem_path, corrupt=corrupt,
        mixed_patient_files=mixed,  # type: ignore[arg-type]
        pixel_layouts=tuple(layouts[f] for f in files if f in layouts))


# ----------------------------------------------------------------------------- scanning folders


def _walk(folder: Path, unreadable: list[Unreadable]) -> list[Path]:
    """Every non-hidden file under `folder`, in sorted order; folders that cannot be listed go to `unreadable`."""
    files: list[Path] = []
    seen: set[str] = set()

    def failed(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else folder
        unreadable.append(Unreadable(where, f"folder cannot be listed: {exc.strerror or exc}"))

    for root, dirs, names in os.walk(folder, onerror=failed, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symbolic link loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root) / n for n in names if not n.startswith("."))
    return sorted(p for p in files if p.is_file() or not p.exists())


def scan(folder: Path) -> Scan:
    """Header-only scan: the image series under `folder`, files skipped with why, and unreadable files."""
    with library_messages(f"scanning {folder}"):  # pydicom warns as it converts the values read
        return _scan(folder)


def _scan(folder: Path) -> Scan:
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    skipped: list[tuple[Path, str]] = []
    unreadable: list[Unreadable] = []
    for path in _walk(folder, unreadable):
        try:
            ds = _read_header(path)
        except InputError as exc:
            unreadable.append(Unreadable(path, exc.problem))
            continue
        if ds is None:
            skipped.append((path, "not DICOM"))
            continue
        if not _is_image(ds):
            sop = _sop_name(ds)
            if "Image Storage" in sop or sop == "unknown SOP class":  # cut short or corrupt: never drop a slice
                unreadable.append(Unreadable(path, _not_an_image(path, ds).problem))
            else:
                skipped.append((path, f"DICOM {_sop_name(ds)} without pixels"))
            continue
        try:
            uid = _str(ds.get("SeriesInstanceUID"))
        except Exception:
            uid = None
        groups.setdefault(uid or f"(no SeriesInstanceUID: {path.name})", []).append((path, ds))
    series = []
    for uid, entries in groups.items():
        folders = {p.parent for p, _ in entries}
        series.append(_series_from(uid, entries, [u for u in unreadable if u.path.parent in folders]))
    series.sort(key=lambda s: (s.study_date or "", s.study_time or "", s.uid))
    return Scan(series, skipped, unreadable)


def scan_dicom(folder: str | os.PathLike) -> list[SeriesInfo]:
    """All DICOM image series under `folder` (recursive), from headers only.

    Series whose geometry is unusable, or whose folder holds a file that cannot be read, are returned with
    `problem` set, so a caller can list them or skip them; non-DICOM files and DICOM objects without pixels
    are skipped.
    """
    from .files import existing

    folder = existing(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    return scan(folder).series


def pick_series(folder: Path, found: Scan, series_uid: str | None) -> SeriesInfo:
    """The series `series_uid` names, or the only one; refuses unreadable files nothing else accounts for."""
    orphans = found.orphans()
    if orphans:
        u = orphans[0]
        more = f" ({len(orphans) - 1} more unreadable file(s) under {folder})" if len(orphans) > 1 else ""
        raise InputError(u.path, f"{u.reason}{more}")
    corrupt = [s for s in found.series if s.corrupt and s.uid != series_uid]
    if corrupt and (series_uid is None or len(found.series) > 1):
        # A corrupt file may have split off its series (a damaged SeriesInstanceUID): never pass over it.
        raise InputError(corrupt[0].problem_path or folder, corrupt[0].problem or "corrupt")
    if not found.series:
        if found.skipped:
            kinds = sorted({why for _, why in found.skipped})
            raise InputError(folder, f"no DICOM image found among {len(found.skipped)} file(s) ({'; '.join(kinds)})")
        raise InputError(folder, "folder is empty")
    if series_uid is not None:
        match = [s for s in found.series if s.uid == series_uid]
        if not match:
            raise InputError(folder, f"no series with SeriesInstanceUID {series_uid}; found: "
                                     + "; ".join(s.label() for s in found.series))
        return match[0]
    if len(found.series) > 1:
        raise InputError(folder, f"{len(found.series)} image series in this folder, choose one with --series-uid "
                                 "(Python: series_uid=): " + "; ".join(s.label() for s in found.series))
    return found.series[0]


def file_series(path: Path) -> SeriesInfo:
    """A single DICOM file as a (one-file) series, from its header."""
    with library_messages(f"reading {path}"):  # pydicom warns as it converts the values read
        return _file_series(path)


def _file_series(path: Path) -> SeriesInfo:
    ds = _read_header(path)
    if ds is None:
        raise InputError(path, "not a DICOM file (and no known image extension)")
    if not _is_image(ds):
        raise _not_an_image(path, ds)
    return _series_from(_str(ds.get("SeriesInstanceUID")) or path.name, [(path, ds)])
