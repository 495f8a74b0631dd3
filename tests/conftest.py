"""Shared fixtures: real test files shipped with pydicom/nibabel, and small studies written to tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_writer import write_dicom_series

PYDICOM_DIR = Path(__import__("pydicom.data", fromlist=["get_testdata_file"]).get_testdata_file(
    "CT_small.dcm")).parent
NIBABEL_DIR = Path(__import__("nibabel").__file__).parent / "tests" / "data"


@pytest.fixture
def pydicom_file():
    """Path of one of pydicom's bundled test files (they ship with the wheel: no download)."""

    def get(name: str) -> Path:
        path = PYDICOM_DIR / name
        assert path.exists(), path
        return path

    return get


@pytest.fixture
def nibabel_file():
    def get(name: str) -> Path:
        path = NIBABEL_DIR / name
        assert path.exists(), path
        return path

    return get


def smooth_volume(shape=(6, 12, 10), seed=0, lo=-200.0, hi=800.0) -> np.ndarray:
    """A non-constant (z, y, x) volume whose slices all differ, integral values in [lo, hi]."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    vol = lo + (hi - lo) * (0.5 * z + 0.3 * np.sin(3 * y) * x + 0.2 * rng.random(shape))
    return np.round(vol)


def write_nifti(path: Path, volume: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    img = sitk.GetImageFromArray(volume.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def huge_png_header(path: Path, width: int = 10000, height: int = 10000) -> Path:
    """A PNG whose header says width x height RGB; its pixel data is a stub (never read when refused)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8), isVector=array.ndim == 3), str(path))
    return path


@pytest.fixture
def series_writer():
    """`write_dicom_series` with test defaults; returns the written files."""

    def write(folder: Path, volume=None, **kw):
        if volume is None:
            volume = smooth_volume(seed=kw.pop("seed", 0))
        kw.setdefault("spacing", (0.8, 0.9, 2.5))
        kw.setdefault("origin", (-10.0, 20.0, 5.0))
        return write_dicom_series(folder, volume, **kw)

    return write


@pytest.fixture
def dicom_tree_subset(tmp_path) -> Path:
    """A copy of pydicom's dicomdirtests for one patient over two dates (real headers, 16x16 pixels)."""
    root = tmp_path / "tree"
    for name in ("98892001", "98892003"):
        shutil.copytree(PYDICOM_DIR / "dicomdirtests" / name, root / "nested" / name)
    return root
