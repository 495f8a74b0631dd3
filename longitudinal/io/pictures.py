"""2D pictures (PNG, JPEG, TIFF, BMP): checks the image libraries do not make."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError


def check_jpeg_complete(path: Path) -> None:
    """Refuse a cut JPEG: libjpeg fills the missing part with grey and only warns on stderr."""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 1024))
        tail = fh.read()
    if b"\xff\xd9" not in tail:
        raise InputError(path, "JPEG file is truncated (no end-of-image marker)")


