"""DICOM: header scan into series, slice geometry, pixel decoding.

- A DICOM series is ordered by ImagePositionPatient projected on the slice normal
  (cross product of the ImageOrientationPatient rows), never by file name or
  InstanceNumber. Missing slices, uneven spacing, duplicated positions, mixed
  orientations and sheared stacks (gantry tilt) are refused rather than resampled
  silently: a wrong geometry would show up later as a fake "change".
- A folder holding several image series is refused unless `series_uid=` picks one;
  the error lists the series. Guessing would silently compare different sequences.
- An image with one frame (a single DICOM slice, PNG, JPEG) is 2D; its position in
  the patient is dropped because 2D registration works in the image plane.
- Multi-frame DICOM becomes a 3D volume when every frame has a position (enhanced
  multi-frame, RT dose grids); cine/time-series multi-frame files are refused.
- 4D NIfTI is refused (the error says how many volumes it holds) rather than
  silently taking the first volume. NIfTI-2 is refused: SimpleITK cannot read it.
- Pixels are decoded by SimpleITK (GDCM handles JPEG, JPEG-LS, JPEG 2000, RLE and
  applies rescale slope/intercept); pydicom (pixel_array + modality LUT) is the
  fallback for the few files GDCM rejects. Non-integral rescale gives float32.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from ..errors import InputError
from .image import ITK_EXTS, NIFTI_EXTS, PICTURE_EXTS, Image, Meta, _ext, _exists, _str

log = logging.getLogger(__name__)

# Files that commonly sit next to DICOM series and are never images.
_NEVER_IMAGE_EXTS = (".txt", ".json", ".tsv", ".csv", ".md", ".xml", ".html", ".pdf", ".zip", ".gz", ".py",
                     ".dump", ".icc", ".ini", ".log", ".bval", ".bvec")

# Relative tolerance on slice steps: scanners write positions with ~1e-4 mm jitter.
_STEP_RTOL = 0.01
_STEP_ATOL = 1e-3  # mm


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

    @property
    def folder(self) -> Path:
        return Path(os.path.commonpath([str(f.parent) for f in self.files])) if self.files else Path(".")

    @property
    def n_slices(self) -> int:
        return self.size[2] if len(self.size) == 3 else 1

    def meta(self) -> Meta:
        return Meta(patient_id=self.patient_id, patient_name=self.patient_name, study_date=self.study_date,
                    study_time=self.study_time, modality=self.modality, series_description=self.description,
                    series_uid=self.uid, sources=tuple(str(f) for f in self.files))

    def label(self) -> str:
        """One line naming the series for error messages and logs (no patient data)."""
        what = f"{self.n_slices} slices" if len(self.size) == 3 else "1 image"
        return f"{self.uid} '{self.description or ''}' {self.modality or '?'} {what}"


def _floats(value, n: int | None = None) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if n is not None and len(out) != n:
        return None
    return out


def _integral(x: float) -> bool:
    return float(x).is_integer()


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _read_header(path: Path, *, strict: bool) -> pydicom.Dataset | None:
    """The DICOM header of `path`, or None when it is not DICOM.

    Files without the 128-byte preamble are read with force=True and accepted only if
    they carry a SOP Class UID, so a random binary file is not taken for DICOM.
    With `strict`, a file with the DICOM preamble whose header cannot be parsed raises.
    """
    magic = _has_dicom_magic(path)
    if not magic and _ext(path) in _NEVER_IMAGE_EXTS + NIFTI_EXTS + PICTURE_EXTS + ITK_EXTS:
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not magic)
    except InvalidDicomError:
        return None
    except Exception as exc:  # pydicom raises many types on truncated or corrupt headers
        if magic and strict:
            raise InputError(path, f"DICOM header is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
        if magic:
            log.warning("skipping %s: corrupt DICOM header (%s)", path, type(exc).__name__)
        return None
    if not magic and "SOPClassUID" not in ds:
        return None
    return ds


def _sop_name(ds: pydicom.Dataset) -> str:
    uid = ds.get("SOPClassUID")
    try:
        return uid.name if uid is not None else "unknown SOP class"
    except Exception:
        return str(uid)


def _is_image(ds: pydicom.Dataset) -> bool:
    return "Rows" in ds and "Columns" in ds and ds.get("Rows") and ds.get("Columns")


def _not_an_image(path: Path, ds: pydicom.Dataset) -> InputError:
    if "Image Storage" in _sop_name(ds):
        # An image SOP class without Rows/Columns: pydicom stops quietly at the end of a cut file.
        return InputError(path, f"DICOM {_sop_name(ds)} header has no Rows/Columns: file truncated or corrupt")
    return InputError(path, f"not an image: DICOM {_sop_name(ds)} (Modality {ds.get('Modality', '?')}) "
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


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    for key in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        ps = _floats(ds.get(key), 2)
        if ps and all(v > 0 for v in ps):
            return ps
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        try:
            return _floats(shared[0].PixelMeasuresSequence[0].PixelSpacing, 2)
        except (AttributeError, IndexError):
            pass
    return None


def _rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None:
        shared = ds.get("SharedFunctionalGroupsSequence")
        try:
            pvt = shared[0].PixelValueTransformationSequence[0]
            slope, intercept = pvt.RescaleSlope, pvt.RescaleIntercept
        except (AttributeError, IndexError, TypeError):
            pass
    try:
        return float(slope if slope is not None else 1.0), float(intercept if intercept is not None else 0.0)
    except (TypeError, ValueError):
        return 1.0, 0.0


def _slices_of(path: Path, ds: pydicom.Dataset) -> list[_Slice]:
    """One entry per frame, with the frame's position when the header gives it."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    comps = int(ds.get("SamplesPerPixel", 1) or 1)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        comps = 3
    slope, intercept = _rescale(ds)
    ps = _pixel_spacing(ds)
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n_frames = 1
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    base = dict(path=path, rows=rows, cols=cols, components=comps, slope=slope, intercept=intercept)
    if n_frames == 1:
        return [_Slice(frame=None, ipp=ipp, iop=iop, pixel_spacing=ps, **base)]
    # Enhanced multi-frame: positions per frame in functional groups.
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if per_frame and len(per_frame) == n_frames:
        out = []
        for k, item in enumerate(per_frame):
            try:
                f_ipp = _floats(item.PlanePositionSequence[0].ImagePositionPatient, 3)
            except (AttributeError, IndexError):
                f_ipp = None
            f_iop = None
            for group in (item, shared[0] if shared else None):
                if f_iop is None and group is not None:
                    try:
                        f_iop = _floats(group.PlaneOrientationSequence[0].ImageOrientationPatient, 6)
                    except (AttributeError, IndexError):
                        pass
            out.append(_Slice(frame=k, ipp=f_ipp, iop=f_iop or iop, pixel_spacing=ps, **base))
        return out
    # RT dose / NM style: one position plus offsets along the normal.
    offsets = _floats(ds.get("GridFrameOffsetVector"))
    if offsets and len(offsets) == n_frames and ipp and iop:
        n = np.cross(iop[:3], iop[3:])
        start = np.asarray(ipp) if offsets[0] == 0 else np.asarray(ipp) - np.dot(ipp, n) * n
        return [_Slice(frame=k, ipp=tuple(start + off * n), iop=iop, pixel_spacing=ps, **base)
                for k, off in enumerate(offsets)]
    return [_Slice(frame=k, ipp=None, iop=None, pixel_spacing=ps, **base) for k in range(n_frames)]


def _geometry(slices: list[_Slice]) -> tuple[list[_Slice], tuple, tuple, tuple, tuple, str | None, Path | None]:
    """Order slices along the normal and check the stack is a regular grid.

    Returns (ordered slices, size, spacing, origin, direction, problem, problem_path).
    """
    first = slices[0]
    comps = first.components
    ps = first.pixel_spacing or (1.0, 1.0)
    spacing2 = (ps[1], ps[0])
    if len(slices) == 1:
        return slices, (first.cols, first.rows), spacing2, (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), None, None

    def fail(problem: str, path: Path | None = None):
        return slices, (first.cols, first.rows, len(slices)), spacing2 + (1.0,), (0.0, 0.0, 0.0), \
            tuple(np.eye(3).ravel()), problem, path or first.path

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
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        return fail(f"ImageOrientationPatient {tuple(iop0)} is not two orthogonal unit vectors")
    order = sorted(range(len(slices)), key=lambda i: float(np.dot(slices[i].ipp, normal)))
    slices = [slices[i] for i in order]
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
        return fail(f"{kind} of {steps[i]:.3f} mm between slice {i} (z={pos[i]:.3f}, {slices[i].path.name}) and "
                    f"slice {i + 1} (z={pos[i + 1]:.3f}, {slices[i + 1].path.name}), expected {expected:.3f} mm",
                    slices[i + 1].path)
    ipp0 = np.asarray(slices[0].ipp)
    for s, d in zip(slices, pos):
        offset = np.asarray(s.ipp) - ipp0
        in_plane = offset - np.dot(offset, normal) * normal
        if np.linalg.norm(in_plane) > max(0.01 * expected, _STEP_ATOL) + 1e-3:
            return fail(f"slices are sheared ({np.linalg.norm(in_plane):.2f} mm in-plane shift at {s.path.name}); "
                        "gantry tilt is not supported, resample the series first", s.path)
    direction = np.column_stack([row, col, normal])
    return (slices, (first.cols, first.rows, len(slices)), spacing2 + (expected,), tuple(float(v) for v in ipp0),
            tuple(float(v) for v in direction.ravel()), None, None)


def _series_from(uid: str, entries: list[tuple[Path, pydicom.Dataset]]) -> SeriesInfo:
    entries = sorted(entries, key=lambda e: str(e[0]))
    slices: list[_Slice] = []
    for path, ds in entries:
        slices.extend(_slices_of(path, ds))
    problem, problem_path = None, None
    multi = [p for p, ds in entries if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi and len(entries) > 1:
        problem, problem_path = (f"series mixes {len(multi)} multi-frame file(s) with other files; "
                                 "load one file at a time"), multi[0]
    ordered, size, spacing, origin, direction, geo_problem, geo_path = _geometry(slices)
    problem, problem_path = problem or geo_problem, problem_path or geo_path
    ds0 = entries[0][1]
    files = tuple(dict.fromkeys(s.path for s in ordered))
    return SeriesInfo(
        uid=uid, files=files, size=tuple(int(v) for v in size), spacing=tuple(float(v) for v in spacing),
        origin=tuple(origin), direction=tuple(direction), components=slices[0].components,
        modality=_str(ds0.get("Modality")), description=_str(ds0.get("SeriesDescription")),
        patient_id=_str(ds0.get("PatientID")), patient_name=_str(ds0.get("PatientName")),
        study_date=_str(ds0.get("StudyDate")), study_time=_str(ds0.get("StudyTime")),
        study_uid=_str(ds0.get("StudyInstanceUID")),
        rescale_float=any(not (_integral(s.slope) and _integral(s.intercept)) for s in slices)
        or len({(s.slope, s.intercept) for s in slices}) > 1,
        problem=problem, problem_path=problem_path)


def _scan(folder: Path) -> tuple[list[SeriesInfo], list[tuple[Path, str]]]:
    """Header-only scan: image series found under `folder`, and files skipped with why."""
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    skipped: list[tuple[Path, str]] = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        ds = _read_header(path, strict=True)
        if ds is None:
            skipped.append((path, "not DICOM"))
            continue
        if not _is_image(ds):
            if "Image Storage" in _sop_name(ds):
                raise _not_an_image(path, ds)  # an image file cut short: do not drop a slice silently
            skipped.append((path, f"DICOM {_sop_name(ds)} without pixels"))
            continue
        uid = _str(ds.get("SeriesInstanceUID")) or f"(no SeriesInstanceUID: {path.name})"
        groups.setdefault(uid, []).append((path, ds))
    series = [_series_from(uid, entries) for uid, entries in groups.items()]
    series.sort(key=lambda s: (s.study_date or "", s.study_time or "", s.uid))
    return series, skipped


def scan_dicom(folder: str | os.PathLike) -> list[SeriesInfo]:
    """All DICOM image series under `folder` (recursive), from headers only.

    Series whose geometry is unusable are returned with `problem` set, so a caller can
    list them or skip them; non-DICOM files and DICOM objects without pixels are skipped.
    """
    folder = _exists(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    return _scan(folder)[0]


def _pick_series(folder: Path, series: list[SeriesInfo], skipped: list[tuple[Path, str]],
                 series_uid: str | None) -> SeriesInfo:
    if not series:
        if skipped:
            kinds = sorted({why for _, why in skipped})
            raise InputError(folder, f"no DICOM image found among {len(skipped)} file(s) ({'; '.join(kinds)})")
        raise InputError(folder, "folder is empty")
    if series_uid is not None:
        match = [s for s in series if s.uid == series_uid]
        if not match:
            raise InputError(folder, f"no series with SeriesInstanceUID {series_uid}; found: "
                                     + "; ".join(s.label() for s in series))
        return match[0]
    if len(series) > 1:
        raise InputError(folder, f"{len(series)} image series in this folder, choose one with series_uid=: " + "; ".join(s.label() for s in series))
    return series[0]


# ----------------------------------------------------------------------------- DICOM pixels


def _decode_file(path: Path) -> np.ndarray:
    """Real-valued pixels of one DICOM file as (frames, rows, cols[, channels])."""
    try:
        img = sitk.ReadImage(str(path), imageIO="GDCMImageIO")
        arr = sitk.GetArrayFromImage(img)
        if img.GetDimension() == 2:
            arr = arr[None]
    except RuntimeError:
        try:
            ds = pydicom.dcmread(path, force=True)
            raw = ds.pixel_array
            from pydicom.pixels import apply_color_lut, apply_modality_lut
            if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
                arr = apply_color_lut(raw, ds)
            else:
                arr = apply_modality_lut(raw, ds)
            n_frames = int(ds.get("NumberOfFrames", 1) or 1)
            if n_frames == 1:
                arr = arr[None]
        except Exception as exc:
            if not _has_pixel_data(path):
                raise InputError(path, "DICOM file has image attributes but no pixel data") from exc
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
            raise InputError(path, f"pixel data is truncated or cannot be decoded ({_transfer_syntax(path)}): "
                                   f"{reason[:200]}") from exc
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return np.ascontiguousarray(arr)


def _has_pixel_data(path: Path) -> bool:
    try:
        ds = pydicom.dcmread(path, force=True, specific_tags=["PixelData", "FloatPixelData", "DoubleFloatPixelData"])
    except Exception:
        return True  # unreadable: report it as a decoding failure
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _transfer_syntax(path: Path) -> str:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID.name
    except Exception:
        return "unknown transfer syntax"


def _load_series(info: SeriesInfo) -> Image:
    if info.problem:
        raise InputError(info.problem_path or info.folder, info.problem)
    if len(info.size) == 3 and len(info.files) == info.size[2]:
        # One file per slice: ITK's series reader decodes in the order we give it.
        arr = None
        try:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([str(f) for f in info.files])
            reader.SetImageIO("GDCMImageIO")
            if info.rescale_float:
                reader.SetOutputPixelType(sitk.sitkVectorFloat32 if info.components > 1 else sitk.sitkFloat32)
            arr = sitk.GetArrayFromImage(reader.Execute())
        except RuntimeError:
            log.debug("ITK series reader failed on %s; decoding file by file", info.folder)
        if arr is None:
            arr = np.concatenate([_decode_file(f) for f in info.files], axis=0)
            if info.rescale_float:
                arr = arr.astype(np.float32)
    else:
        # A single file: one image, or a multi-frame stack that needs its frames reordered.
        (path,) = info.files
        arr = _decode_file(path)
        if len(info.size) == 3:
            ds = _read_header(path, strict=True)
            frames = _slices_of(path, ds)
            normal = np.asarray(info.direction).reshape(3, 3)[:, 2]
            order = np.argsort([np.dot(s.ipp, normal) for s in frames], kind="stable")
            arr = arr[order]
        else:
            arr = arr[0]
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    img = sitk.GetImageFromArray(arr, isVector=info.components > 1)
    img.SetSpacing(info.spacing)
    img.SetOrigin(info.origin)
    img.SetDirection(info.direction)
    return Image(img, info.meta())


def _load_dicom_file(path: Path) -> Image:
    ds = _read_header(path, strict=True)
    if ds is None:
        raise InputError(path, "not a DICOM file (and no known image extension)")
    if not _is_image(ds):
        raise _not_an_image(path, ds)
    uid = _str(ds.get("SeriesInstanceUID")) or path.name
    return _load_series(_series_from(uid, [(path, ds)]))


# ----------------------------------------------------------------------------- public API

