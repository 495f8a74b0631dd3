"""Model files that are data, never code: named numeric arrays plus one JSON document, in a zip (.npz layout).

A pickle runs code when it is loaded, so a shared pipeline file naming a pickled model could run anything on the
reader's machine. Here nothing is unpickled: the file must be a zip whose members are `.npy` arrays of plain
numeric or string dtypes (read with `allow_pickle=False`) and one `meta.json`, which carries a format name and
version that the caller checks before using any of it.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from .errors import InputError

_META = "meta.json"
_ZIP_MAGIC = b"PK\x03\x04"
_ALLOWED_KINDS = "biufU"  # bool, int, unsigned, float, unicode: nothing that holds Python objects
MAX_MEMBERS = 256
MAX_BYTES = 2 << 30  # 2 GiB uncompressed: a model file is not a way to fill the memory


def save(path: str | os.PathLike, fmt: str, meta: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write `arrays` and `meta` (JSON-serialisable, stored with `format` = fmt) atomically."""
    from .io import atomic_write

    doc = {"format": fmt, **meta}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(_META, json.dumps(doc, indent=1, sort_keys=True))
        for name, value in arrays.items():
            arr = np.asarray(value)
            if arr.dtype.kind not in _ALLOWED_KINDS:
                raise TypeError(f"array {name!r} has dtype {arr.dtype}, which a model file may not hold")
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            zf.writestr(f"{name}.npy", member.getvalue())
    payload = buf.getvalue()
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


def load(path: str | os.PathLike, fmt: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of a file written by `save` with the same `fmt`; InputError naming the file otherwise."""
    path = Path(path)
    what = f"not a model file of this tool ({fmt})"
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise InputError(path, "model file not found") from None
    except OSError as exc:
        raise InputError(path, f"cannot read the model file ({exc.strerror or exc})") from None
    if magic != _ZIP_MAGIC:
        raise InputError(path, f"{what}: it is not a zip of arrays (a pickle or other file is never loaded)")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS or sum(i.file_size for i in infos) > MAX_BYTES:
                raise InputError(path, f"{what}: too many or too large members")
            names = {i.filename for i in infos}
            if _META not in names:
                raise InputError(path, f"{what}: no {_META}")
            meta = json.loads(zf.read(_META).decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != fmt:
                found = meta.get("format") if isinstance(meta, dict) else None
                raise InputError(path, f"{what}: its format is {found!r}")
            arrays = {}
            for info in infos:
                if info.filename == _META:
                    continue
                if not info.filename.endswith(".npy") or "/" in info.filename:
                    raise InputError(path, f"{what}: unexpected member {info.filename!r}")
                arr = np.lib.format.read_array(io.BytesIO(zf.read(info)), allow_pickle=False)
                if arr.dtype.kind not in _ALLOWED_KINDS:
                    raise InputError(path, f"{what}: member {info.filename!r} has dtype {arr.dtype}")
                arrays[info.filename[:-4]] = arr
    except InputError:
        raise
    except (zipfile.BadZipFile, ValueError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise InputError(path, f"{what}: {type(exc).__name__}: {exc}") from None
    return meta, arrays
