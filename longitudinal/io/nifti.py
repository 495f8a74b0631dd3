"""NIfTI checks SimpleITK does not make: truncated files, NaN voxels, NIfTI-2."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError

def nifti_version(path: Path) -> int | None:
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return None
    if len(head) < 4:
        return None
    size = min(int.from_bytes(head, "little"), int.from_bytes(head, "big"))
    return 2 if size == 540 else 1 if size == 348 else None


def check_nifti_complete(path: Path) -> None:
    """Refuse a cut NIfTI and float voxels that are NaN or infinite.

    SimpleITK zero-fills missing voxels and reads NaN as 0 without a word (checked on .nii and .nii.gz),
    which would turn a broken file into a silently wrong answer.
    """
    import gzip
    import struct
    import zlib

    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open if gz else open)(path, "rb") as fh:
            content = fh.read()
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(path, f"compressed NIfTI is truncated or corrupt ({exc})") from exc
    hdr = content[:348]
    if len(hdr) < 348:
        raise InputError(path, f"NIfTI header is truncated ({len(hdr)} of 348 bytes)")
    for order in "<>":
        if struct.unpack(order + "i", hdr[:4])[0] == 348:
            break
    else:
        return  # NIfTI-2 or not NIfTI: the reader gives the error
    dims = struct.unpack(order + "8h", hdr[40:56])
    datatype, bitpix = struct.unpack(order + "2h", hdr[70:74])
    vox_offset = int(struct.unpack(order + "f", hdr[108:112])[0])
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        raise InputError(path, f"NIfTI header is corrupt (dim[0]={dims[0]}, bitpix={bitpix})")
    count = int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]], dtype=np.int64))
    needed = vox_offset + count * bitpix // 8
    if len(content) < needed:
        raise InputError(path, f"NIfTI file is truncated: {len(content)} bytes of voxel data and header, expected {needed}")
    floats = {16: "f4", 64: "f8"}  # NIfTI datatype codes FLOAT32, FLOAT64
    if datatype in floats:
        voxels = np.frombuffer(content, dtype=order + floats[datatype], count=count, offset=vox_offset)
        bad = int(np.count_nonzero(~np.isfinite(voxels)))
        if bad:
            raise InputError(path, f"image holds {bad} NaN or infinite voxel(s) of {count}")


