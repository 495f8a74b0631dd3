"""NIfTI checks SimpleITK does not make, on nibabel's reading of the header.

SimpleITK reads a NIfTI whatever its header says: spacing NaN or 0 becomes 1.0, a negative
spacing stays negative, a qform and an sform that place the image differently are resolved
silently (by code, not by agreement), missing voxels are zero-filled and NaN voxels read as 0.
Each of those is a silently wrong answer later, so each is an error naming the file:

- nibabel's own header checks (magic, datatype, vox_offset, qform/sform codes);
- voxel spacing (pixdim, in mm after xyzt_units) NaN, 0, negative or over `MAX_SPACING_MM`;
- qform and sform both set but placing the image's corners over half a voxel apart;
- SimpleITK's geometry differing from nibabel's (same corner test), when the header has a qform or sform;
- voxel data shorter or longer than the header says, and float voxels that are NaN or infinite;
- NIfTI-2 (SimpleITK reads NIfTI-1 only).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nibabel.openers
import numpy as np

from ..errors import InputError
from .native import library_messages

MAX_SPACING_MM = 50.0  # no scanner makes voxels this large: such a pixdim is corrupt
# nibabel findings that do not change what the image means (or that the spacing check below states better).
_HARMLESS = ("not divisible by 16", "bitpix does not match", "qfac", "pixdim[1,2,3]")
_MAX_OFFSET = 1 << 30  # header and extensions: a larger vox_offset is a corrupt header
_CHUNK = 1 << 24  # bytes read at a time when checking voxels: a multiple of every item size


class UnitError(ValueError):
    """xyzt_units holds a spatial unit code NIfTI does not define."""


@dataclass(frozen=True)
class Header:
    """A NIfTI-1 header as stored in the file (nibabel's reader, without its automatic fixes)."""

    raw: nib.Nifti1Header

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.raw.get_data_shape())

    @property
    def dtype(self) -> np.dtype:
        return self.raw.get_data_dtype()

    @property
    def offset(self) -> int:
        return int(self.raw["vox_offset"])  # check_header has made sure it is a whole number, 352 or more

    @property
    def affine(self) -> np.ndarray:
        return self.raw.get_best_affine()


def load_header(path: Path) -> Header:
    """The header of a single-file NIfTI-1 (the voxels stay on disk); NIfTI-2 and unreadable headers refused.

    Read with check=False: nibabel's loader would quietly "fix" what the checks below must see (a zero
    pixdim becomes 1) and print its findings on stderr.
    """
    try:
        with nib.openers.ImageOpener(str(path)) as fh, library_messages(f"reading {path}"):
            head = fh.read(4)
            if len(head) == 4 and 540 in (int.from_bytes(head, "little"), int.from_bytes(head, "big")):
                raise InputError(path, "NIfTI-2 files are not supported (SimpleITK reads NIfTI-1); convert with "
                                       "nibabel: nib.Nifti1Image(img.dataobj, img.affine)")
            fh.seek(0)
            raw = nib.Nifti1Header.from_fileobj(fh, check=False)
    except InputError:
        raise
    except Exception as exc:  # nibabel and gzip raise several types on corrupt headers
        raise InputError(path, f"NIfTI header cannot be read ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if raw["magic"].item() == b"ni1":
        raise InputError(path, "NIfTI header says its voxels are in a separate .img file; convert it to a single .nii")
    return Header(raw)


def spacing_mm(header: Header) -> tuple[float, ...]:
    """The voxel spacing of the spatial axes as SimpleITK will read it (pixdim times the unit)."""
    hdr = header.raw
    n = int(min(max(int(hdr["dim"][0]), 1), 3))
    code = int(hdr["xyzt_units"]) & 0x07  # the spatial unit: the low three bits
    unit = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 0.001}.get(code)  # unknown, meter, mm, micron: as ITK converts
    if unit is None:
        raise UnitError(code)
    return tuple(float(v) * unit for v in hdr["pixdim"][1:1 + n])


def check_header(path: Path, header: Header) -> None:
    """Refuse headers whose geometry or layout cannot be trusted (see the module docstring)."""
    hdr = header.raw
    offset = float(hdr["vox_offset"])  # first: nibabel's own check cannot format an infinite offset
    if not np.isfinite(offset) or offset < 352 or offset != int(offset) or offset > _MAX_OFFSET:
        # (nibabel's own check lets 0 pass; SimpleITK then reads the header as voxels)
        raise InputError(path, f"NIfTI vox_offset is {offset:g}, not a plausible byte offset for a single-file NIfTI "
                               "(352 or more): the header is corrupt")
    try:
        with library_messages(f"checking {path}"):
            found = type(hdr).diagnose_binaryblock(hdr.binaryblock)
    except Exception as exc:  # nibabel's checks themselves can fail on absurd values
        raise InputError(path, f"NIfTI header is corrupt ({type(exc).__name__}: {str(exc)[:80]})") from exc
    problems = [p for p in found.splitlines() if p and not any(h in p for h in _HARMLESS)]
    if problems:
        raise InputError(path, f"NIfTI header is corrupt: {'; '.join(problems)}")
    try:
        spacing = spacing_mm(header)
    except UnitError as exc:
        raise InputError(path, f"NIfTI xyzt_units has spatial unit code {exc}, which NIfTI does not define: the "
                               "header is corrupt") from None
    for axis, s in zip("xyz", spacing):
        if not np.isfinite(s) or s <= 0 or s > MAX_SPACING_MM:
            what = "not a number" if not np.isfinite(s) else "not positive" if s <= 0 else f"over {MAX_SPACING_MM:g} mm"
            raise InputError(path, f"voxel spacing along {axis} (pixdim) is {s:g} mm, {what}: the header is corrupt")
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    try:
        with library_messages(f"reading {path}"):
            qform, sform = hdr.get_qform(), hdr.get_sform()
    except Exception as exc:
        raise InputError(path, f"NIfTI qform/sform cannot be read ({type(exc).__name__})") from exc
    for name, code, affine in (("qform", qcode, qform), ("sform", scode, sform)):
        if code > 0 and not np.all(np.isfinite(affine)):
            raise InputError(path, f"NIfTI {name} holds values that are not numbers: the header is corrupt")
    if qcode > 0 and scode > 0:
        apart = corner_distance(qform, sform, header.shape)
        if apart > tolerance_mm(spacing):
            raise InputError(path, f"NIfTI qform and sform disagree: they place the image's corners up to {apart:.2f} mm "
                                   "apart, so its position is ambiguous; make them agree (nibabel: "
                                   "img.set_qform(img.get_sform()))")


def check_itk_geometry(path: Path, header: Header, spacing: tuple[float, ...], origin: tuple[float, ...],
                       direction: tuple[float, ...]) -> None:
    """Refuse when SimpleITK's reading of the geometry (LPS) differs from nibabel's (RAS)."""
    hdr = header.raw
    if int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) == 0:
        return  # no orientation at all: both fall back to pixdim, in their own conventions
    n = len(spacing)
    lps = np.eye(4)
    d = np.eye(3)
    d[:n, :n] = np.asarray(direction, float).reshape(n, n)
    s = np.ones(3)
    s[:n] = spacing
    t = np.zeros(3)
    t[:n] = origin
    lps[:3, :3] = d @ np.diag(s)
    lps[:3, 3] = t
    itk_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    try:
        with library_messages(f"reading {path}"):
            best = header.affine
    except Exception as exc:
        raise InputError(path, f"NIfTI qform/sform cannot be read ({type(exc).__name__})") from exc
    apart = corner_distance(itk_ras, best, header.shape)
    if not apart <= tolerance_mm(spacing):
        raise InputError(path, f"SimpleITK and nibabel read different geometry from this NIfTI header (corners up to "
                               f"{apart:.2f} mm apart: a sheared or inconsistent qform/sform?); fix the header")


def tolerance_mm(spacing: tuple[float, ...]) -> float:
    return max(0.5 * min(spacing), 0.1)


def corner_distance(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (mm) between where affines `a` and `b` put the corners of a voxel grid of `shape`."""
    extent = [max(int(v) - 1, 0) for v in (tuple(shape) + (1, 1, 1))[:3]]
    corners = np.array([[i, j, k, 1.0] for i in (0, extent[0]) for j in (0, extent[1]) for k in (0, extent[2])]).T
    with np.errstate(all="ignore"):
        return float(np.max(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0)))


def check_voxels_stored(path: Path, header: Header, finite: bool = True) -> None:
    """Refuse a cut file and (with `finite`) float voxels that are NaN or infinite, reading the data in chunks."""
    offset, dtype = header.offset, header.dtype
    count = int(np.prod([max(int(d), 1) for d in header.shape], dtype=np.int64))
    needed = offset + count * dtype.itemsize
    floats = finite and dtype.kind == "f"
    gz = path.name.lower().endswith(".gz")
    have, bad, extra = 0, 0, 0
    try:
        with (gzip.open if gz else open)(path, "rb") as fh:
            while have < offset and (chunk := fh.read(min(_CHUNK, offset - have))):
                have += len(chunk)
            carry = b""
            while have < needed:
                chunk = fh.read(min(_CHUNK, needed - have))
                if not chunk:
                    break
                have += len(chunk)
                if floats:
                    data = carry + chunk
                    usable = len(data) - len(data) % dtype.itemsize
                    values = np.frombuffer(data[:usable], dtype=dtype)
                    bad += int(np.count_nonzero(~np.isfinite(values)))
                    carry = data[usable:]
            extra = 0
            while chunk := fh.read(_CHUNK):  # to the end: the gzip checksum is verified there
                extra += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        if gz:
            raise InputError(path, f"compressed NIfTI is truncated or corrupt ({exc})") from exc
        raise InputError(path, f"NIfTI file cannot be read ({exc})") from exc
    if have < needed:
        raise InputError(path, f"NIfTI file is truncated: {have} bytes of voxel data and header, expected {needed}")
    if extra:  # inserted bytes shift the voxels and leave the file long: nothing else would notice
        raise InputError(path, f"NIfTI file holds {extra} byte(s) more than its header describes ({needed}): file "
                               "corrupt")
    if bad:
        raise InputError(path, f"image holds {bad} NaN or infinite voxel(s) of {count}")


def check_written(path: Path, expected_shape: tuple[int, ...]) -> None:
    """A NIfTI just written holds a readable header with `expected_shape` and every voxel byte.

    niftilib reports a short write (a full disk) on stderr only and returns normally."""
    header = load_header(path)
    if header.shape[:len(expected_shape)] != tuple(expected_shape):
        raise InputError(path, f"written NIfTI header says {header.shape}, expected {expected_shape}")
    check_voxels_stored(path, header, finite=False)
