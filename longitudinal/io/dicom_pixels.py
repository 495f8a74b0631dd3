"""DICOM pixel data: checked against the header before decoding, decoded, checked again.

Decoders read what they are told: pixel data cut short, grown or shifted by inserted bytes decodes to
other values without an error, and GDCM masks bits above BitsStored (which hides corruption). So each
file's pixel data element is checked first (`check_pixel_data`); decoded values are checked against what
BitsStored and the rescale allow (`_check_values`). Pixels are decoded by SimpleITK (GDCM handles JPEG,
JPEG-LS, JPEG 2000, RLE and applies rescale slope/intercept); pydicom (pixel_array + modality LUT) is the
fallback for files GDCM rejects, and decodes those GDCM gets wrong (colour RLE over 8 bits, 32-bit
big-endian data). Non-integral rescale gives float32.
"""

from __future__ import annotations

import logging
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from ..errors import InputError
from .dicom import PixelLayout, SeriesInfo, _numbers, _read_header, _slices_of
from .image import Image
from .native import library_messages

log = logging.getLogger(__name__)

_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF  # an encapsulated (compressed) element's length


def _decode_file(path: Path, gdcm: bool = True) -> np.ndarray:
    """Real-valued pixels of one DICOM file as (frames, rows, cols[, channels]); `gdcm=False`: pydicom only."""
    try:
        if not gdcm:
            raise RuntimeError("decoded by pydicom")
        with library_messages(f"decoding {path}"):
            img = sitk.ReadImage(str(path), imageIO="GDCMImageIO")
        arr = sitk.GetArrayFromImage(img)
        if img.GetDimension() == 2:
            arr = arr[None]
    except RuntimeError:
        try:
            with library_messages(f"decoding {path} with pydicom"):
                ds = pydicom.dcmread(path, force=True)
                raw = ds.pixel_array
                from pydicom.pixels import apply_color_lut, apply_modality_lut
                if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
                    arr = apply_color_lut(raw, ds)
                elif ds.get("BitsAllocated") == 1:
                    arr = raw.astype(np.uint8) * 255  # as GDCM unpacks bits, so both decoders agree
                else:
                    arr = apply_modality_lut(raw, ds)
            frames = _numbers(path, ds, "NumberOfFrames", count=1, integer=True)
            if not frames or frames[0] == 1:
                arr = arr[None]
        except InputError:
            raise
        except Exception as exc:
            if not _has_pixel_data(path):
                raise InputError(path, "DICOM file has image attributes but no pixel data") from exc
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
            raise InputError(path, f"pixel data is truncated or cannot be decoded ({_transfer_syntax(path)}): "
                                   f"{reason[:200]}") from exc
    if arr.dtype == np.float64:
        with np.errstate(over="ignore"):  # beyond float32: infinite, refused with the count by check_voxels
            arr = arr.astype(np.float32)
    if not arr.dtype.isnative:  # pydicom leaves big-endian data big-endian; SimpleITK takes native order only
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.ascontiguousarray(arr)


def _has_pixel_data(path: Path) -> bool:
    try:
        with library_messages(f"reading {path}"):
            ds = pydicom.dcmread(path, force=True,
                                 specific_tags=["PixelData", "FloatPixelData", "DoubleFloatPixelData"])
    except Exception:
        return True  # unreadable: report it as a decoding failure
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _transfer_syntax(path: Path) -> str:
    try:
        with library_messages(f"reading {path}"):
            return pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID.name
    except Exception:
        return "unknown transfer syntax"


def _check_values(path: Path, values: np.ndarray, layout: PixelLayout) -> None:
    """Refuse decoded pixels that no stored value within BitsStored could give (what decoders let through)."""
    if layout.value_range is None or values.size == 0:
        return
    low, high = layout.value_range
    lo, hi = float(values.min()), float(values.max())
    tol = max(1e-6 * max(abs(low), abs(high)), 1e-9)
    if lo < low - tol or hi > high + tol:
        raise InputError(path, f"pixel values {lo:g} to {hi:g} lie outside the {low:g} to {high:g} that BitsStored "
                               f"({layout.bits_stored}) and the rescale allow: pixel data corrupt")


def check_pixel_data(path: Path, layout: PixelLayout) -> None:
    """The pixel data element is whole and holds what the header describes, and nothing follows it.

    Decoders read what they are told: a pixel data element cut short, grown or shifted by inserted bytes
    decodes to other values without an error. So, before decoding: uncompressed data must be exactly the
    size Rows x Columns x SamplesPerPixel x NumberOfFrames x BitsAllocated gives (plus one pad byte);
    encapsulated data must be a well-formed run of items; the file must end there (or with the trailing
    padding element); and stored values must not use bits above BitsStored (GDCM and pydicom mask those
    bits away, which would hide the corruption; compressed data is masked by its decoder, so there a
    corruption shows as a decoding error or not at all).
    """
    try:
        with library_messages(f"reading {path}") as messages:
            ds = pydicom.dcmread(path, force=True, defer_size=1024)
            element = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    except Exception as exc:  # pydicom raises several types on a file corrupt past its header
        raise InputError(path, f"DICOM file is corrupt after its header ({type(exc).__name__}: {str(exc)[:100]})") \
            from exc
    cut = [m for m in messages if "End of file reached" in m or "Expected" in m and "bytes" in m]
    if cut:  # pydicom stops quietly (a warning) where a file ends inside an element
        raise InputError(path, f"DICOM file is truncated ({cut[0].split(': ', 1)[-1][:100]})")
    if element is None:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            return
        raise InputError(path, "DICOM file has image attributes but no pixel data: truncated or corrupt")
    if not hasattr(element, "value_tell"):
        raise InputError(path, "pixel data element cannot be located in the file: corrupt")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    deflated = syntax == pydicom.uid.DeflatedExplicitVRLittleEndian
    compressed = syntax is not None and syntax.is_compressed and not deflated
    expected = layout.native_bytes
    if element.length == _UNDEFINED:
        end = _encapsulated_end(path, element.value_tell) if not deflated else element.value_tell
    else:
        end = element.value_tell + element.length
        if not compressed and expected is not None and element.length != expected + expected % 2:
            # Zero padding past the data is allowed (some writers pad); anything else is a shift or a cut.
            data = _pixel_bytes(path, ds)
            if element.length < expected or any(data[expected:]):
                raise InputError(path, f"pixel data holds {element.length} bytes but the header describes {expected} "
                                       "(Rows x Columns x SamplesPerPixel x NumberOfFrames x BitsAllocated): file corrupt")
    if deflated:
        _check_deflated(path, ds)
    else:  # offsets of a deflated file are in the inflated stream
        size = path.stat().st_size
        if end > size:
            raise InputError(path, f"pixel data is truncated: the file ends {end - size} byte(s) early")
        if end < size:
            with open(path, "rb") as fh:
                fh.seek(end)
                tail = fh.read(4)
            if tail not in (b"\xfc\xff\xfc\xff", b"\xff\xfc\xff\xfc"):  # DataSetTrailingPadding, LE or BE
                raise InputError(path, f"{size - end} unexpected byte(s) after the pixel data: file corrupt")
    if compressed:
        data = _pixel_bytes(path, ds)
        with library_messages(f"reading {path}"):
            _check_frames(path, layout, syntax, data)
    elif layout.value_range is not None and layout.bits_stored and layout.bits_allocated in (8, 16, 32) \
            and layout.bits_stored < layout.bits_allocated:
        _check_stored_bits(path, layout, _pixel_bytes(path, ds), syntax is None or syntax.is_little_endian)


def _pixel_bytes(path: Path, ds: pydicom.Dataset) -> bytes:
    try:
        with library_messages(f"reading {path}"):
            data = ds.PixelData
    except Exception as exc:
        raise InputError(path, f"pixel data cannot be read ({type(exc).__name__}: {str(exc)[:80]})") from exc
    if not isinstance(data, bytes):
        raise InputError(path, "pixel data is not a byte string: corrupt")
    return data


def _check_frames(path: Path, layout: PixelLayout, syntax: pydicom.uid.UID, data: bytes) -> None:
    """Each compressed frame must say the size the header says (decoders crop or pad to the header silently);
    RLE frames are decoded here to check their stored bits, which GDCM would mask."""
    from pydicom.encaps import generate_frames

    try:
        frames = list(generate_frames(data, number_of_frames=layout.frames))
    except Exception as exc:
        raise InputError(path, f"encapsulated pixel data is corrupt ({type(exc).__name__}: {str(exc)[:80]})") from exc
    if len(frames) != layout.frames:
        raise InputError(path, f"encapsulated pixel data holds {len(frames)} frame(s), the header says {layout.frames}")
    for k, frame in enumerate(frames):
        where = f"frame {k + 1}: " if layout.frames > 1 else ""
        if syntax == pydicom.uid.RLELossless:
            _check_rle(path, layout, frame, where)
            continue
        size = _codestream_size(frame)
        if size is None:
            if syntax in _JPEG_SYNTAXES:
                raise InputError(path, f"{where}compressed frame has no image header (SOF/SIZ marker): file corrupt")
            continue
        height, width, precision = size
        if (height, width) != (layout.rows, layout.cols):
            raise InputError(path, f"{where}compressed frame is {width}x{height} but Columns x Rows say "
                                   f"{layout.cols}x{layout.rows}: header or data corrupt")
        if layout.bits_stored and precision > max(layout.bits_stored, 8) and precision > (layout.bits_allocated or 0):
            raise InputError(path, f"{where}compressed frame has {precision}-bit samples but BitsAllocated is "
                                   f"{layout.bits_allocated}: header or data corrupt")


# Transfer syntaxes whose frames must start with a JPEG or JPEG 2000 image header.
_JPEG_SYNTAXES = frozenset(pydicom.uid.JPEGTransferSyntaxes + pydicom.uid.JPEGLSTransferSyntaxes
                           + pydicom.uid.JPEG2000TransferSyntaxes)


def _codestream_size(frame: bytes) -> tuple[int, int, int] | None:
    """(height, width, precision) from a JPEG SOF (incl. JPEG-LS SOF55) or a JPEG 2000 SIZ marker; None if absent."""
    at = frame.find(b"\xff\x4f\xff\x51")  # JPEG 2000: SOC then SIZ (also inside a JP2 file's boxes)
    if at >= 0 and len(frame) >= at + 40:
        siz = frame[at + 4:]
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", siz[4:20])
        precision = (siz[38] & 0x7F) + 1 if len(siz) > 38 else 0
        return ysiz - yo, xsiz - xo, precision
    if frame[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(frame[pos + 2:pos + 4], "big")
        if marker in _SOF_MARKERS and pos + 9 <= len(frame):
            precision, height, width = frame[pos + 4], *struct.unpack(">HH", frame[pos + 5:pos + 9])
            return height, width, precision
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        pos += 2 + length
    return None


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def _check_rle(path: Path, layout: PixelLayout, frame: bytes, where: str) -> None:
    from pydicom.pixels.decoders.rle import _rle_decode_segment, _rle_parse_header

    per_sample = math.ceil((layout.bits_allocated or 8) / 8)
    try:
        offsets = _rle_parse_header(frame[:64])
    except Exception as exc:
        raise InputError(path, f"{where}RLE header is corrupt ({type(exc).__name__})") from exc
    if len(offsets) != layout.samples * per_sample:
        raise InputError(path, f"{where}RLE frame has {len(offsets)} segment(s); SamplesPerPixel and BitsAllocated "
                               f"need {layout.samples * per_sample}: header or data corrupt")
    bounds = list(offsets) + [len(frame)]
    pixels = layout.rows * layout.cols
    segments = []
    for k in range(len(offsets)):
        if not 64 <= bounds[k] <= bounds[k + 1]:
            raise InputError(path, f"{where}RLE segment offsets are out of order: data corrupt")
        try:
            segment = _rle_decode_segment(frame[bounds[k]:bounds[k + 1]])
        except Exception as exc:
            raise InputError(path, f"{where}RLE segment {k + 1} cannot be decoded ({type(exc).__name__})") from exc
        if not pixels <= len(segment) <= pixels + 1:
            raise InputError(path, f"{where}RLE segment {k + 1} decodes to {len(segment)} bytes but Rows x Columns "
                                   f"is {pixels}: header or data corrupt")
        segments.append(np.frombuffer(bytes(segment[:pixels]), np.uint8))
    if layout.value_range is not None and layout.bits_stored and layout.bits_allocated in (16, 32) \
            and layout.bits_stored < layout.bits_allocated:
        for sample in range(layout.samples):  # segments: the most significant byte first, per sample
            planes = segments[sample * per_sample:(sample + 1) * per_sample]
            value = np.zeros(pixels, np.uint32)
            for plane in planes:
                value = (value << 8) | plane
            raw = value.astype(f"<u{per_sample}").tobytes()
            _check_stored_bits(path, layout, raw, little=True)


def _check_deflated(path: Path, ds: pydicom.Dataset) -> None:
    """A deflated dataset must inflate to its end with nothing after it but, as some writers add, a gzip-style
    trailer (CRC-32 and size), which is then checked: raw deflate itself carries no checksum."""
    try:
        start = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        crc, size = 0, 0
        with open(path, "rb") as fh:
            fh.seek(start)
            while chunk := fh.read(1 << 20):
                out = inflater.decompress(chunk)
                crc, size = zlib.crc32(out, crc), size + len(out)
        rest = inflater.unused_data
    except (zlib.error, AttributeError, TypeError, ValueError) as exc:
        raise InputError(path, f"deflated dataset is corrupt ({type(exc).__name__})") from exc
    if not inflater.eof:
        raise InputError(path, "deflated dataset is truncated: file corrupt")
    if rest and (len(rest) != 8 or rest != struct.pack("<II", crc, size & 0xFFFFFFFF)):
        raise InputError(path, f"deflated dataset is followed by {len(rest)} byte(s) that are not its checksum: "
                               "file corrupt")


def _encapsulated_end(path: Path, start: int) -> int:
    """Where encapsulated pixel data starting at byte `start` ends: after its items and the sequence delimiter."""
    with open(path, "rb") as fh:
        fh.seek(start)
        pos = start
        while True:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(path, "encapsulated pixel data is truncated (no sequence delimiter)")
            length = int.from_bytes(head[4:], "little")
            if head[:4] == b"\xfe\xff\xdd\xe0":
                return pos + 8
            if head[:4] != b"\xfe\xff\x00\xe0" or length == _UNDEFINED:
                raise InputError(path, f"encapsulated pixel data is corrupt (no item at byte {pos})")
            pos += 8 + length
            fh.seek(pos)


def _check_stored_bits(path: Path, layout: PixelLayout, data: bytes, little: bool) -> None:
    """Bits above BitsStored must be zero (unsigned) or copies of the sign bit (signed)."""
    bits, allocated = int(layout.bits_stored or 0), int(layout.bits_allocated or 0)
    dtype = np.dtype(f"{'<' if little else '>'}u{allocated // 8}")
    raw = np.frombuffer(data[:len(data) - len(data) % dtype.itemsize], dtype=dtype)
    above = raw >> (bits - 1 if layout.signed else bits)
    ok = above == 0
    if layout.signed:  # anything but a sign extension decodes to a different value
        ok |= above == (1 << (allocated - bits + 1)) - 1
    bad = int(np.count_nonzero(~ok))
    if bad:
        raise InputError(path, f"{bad} stored pixel value(s) (up to {int(raw[~ok].max())}) use bits above BitsStored "
                               f"({bits} of {allocated}): pixel data corrupt")


def load_series(info: SeriesInfo) -> Image:
    """Voxels of a scanned series (its problem, if any, raised), its pixel data checked before and after decoding."""
    if info.problem:
        raise InputError(info.problem_path or info.folder, info.problem)
    for path, layout in zip(info.files, info.pixel_layouts):
        check_pixel_data(path, layout)
    # GDCM swaps the bytes of colour RLE over 8 bits and of 32-bit big-endian data (found by tests/fuzz.py, where
    # its pydicom fallback disagreed): pydicom decodes those.
    gdcm = not any((layout.rle and layout.samples > 1 or layout.big_endian) and (layout.bits_allocated or 8) > 8
                   for layout in info.pixel_layouts)
    if len(info.size) == 3 and len(info.files) == info.size[2]:
        # One file per slice: ITK's series reader decodes in the order we give it.
        arr = None
        try:
            if not gdcm:
                raise RuntimeError("decoded by pydicom")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([str(f) for f in info.files])
            reader.SetImageIO("GDCMImageIO")
            if info.rescale_float:
                reader.SetOutputPixelType(sitk.sitkVectorFloat32 if info.components > 1 else sitk.sitkFloat32)
            with library_messages(f"decoding {info.folder}"):
                arr = sitk.GetArrayFromImage(reader.Execute())
        except RuntimeError:
            log.debug("ITK series reader failed on %s; decoding file by file", info.folder)
        if arr is None:
            arr = np.concatenate([_decode_file(f, gdcm) for f in info.files], axis=0)
            if info.rescale_float:
                with np.errstate(over="ignore"):
                    arr = arr.astype(np.float32)
        for k, (path, layout) in enumerate(zip(info.files, info.pixel_layouts)):
            _check_values(path, arr[k], layout)
    else:
        # A single file: one image, or a multi-frame stack that needs its frames reordered.
        (path,) = info.files
        arr = _decode_file(path, gdcm)
        if info.pixel_layouts:
            _check_values(path, arr, info.pixel_layouts[0])
        if len(info.size) == 3:
            ds = _read_header(path)
            frames = _slices_of(path, ds)  # type: ignore[arg-type]
            normal = np.asarray(info.direction).reshape(3, 3)[:, 2]
            order = np.argsort([np.dot(s.ipp, normal) for s in frames], kind="stable")  # type: ignore[arg-type]
            arr = arr[order]
        else:
            arr = arr[0]
    if arr.dtype == np.float64:
        with np.errstate(over="ignore"):
            arr = arr.astype(np.float32)
    img = sitk.GetImageFromArray(arr, isVector=info.components > 1)
    img.SetSpacing(info.spacing)
    img.SetOrigin(info.origin)
    img.SetDirection(info.direction)
    return Image(img, info.meta())
