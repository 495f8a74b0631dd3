"""The one internal image type (`Image`: a SimpleITK image plus `Meta`) and header-only facts (`ImageInfo`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

NIFTI_EXTS = (".nii", ".nii.gz")
PICTURE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ITK_EXTS = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_EXTS = (".dcm", ".dicom", ".ima", "")

@dataclass(frozen=True)
class Meta:
    """What a report needs to know about where an image came from."""

    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str | None = None  # YYYYMMDD
    study_time: str | None = None  # HHMMSS
    modality: str | None = None  # DICOM modality code: MR, CT, OP, XC, ...
    series_description: str | None = None
    series_uid: str | None = None
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Image:
    """A 2D or 3D image in physical space (SimpleITK's LPS convention)."""

    itk: sitk.Image
    meta: Meta = field(default_factory=Meta)

    @property
    def dim(self) -> int:
        return self.itk.GetDimension()

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(self.itk.GetSize())

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(self.itk.GetSpacing())

    @property
    def origin(self) -> tuple[float, ...]:
        return tuple(self.itk.GetOrigin())

    @property
    def direction(self) -> tuple[float, ...]:
        return tuple(self.itk.GetDirection())

    @property
    def is_rgb(self) -> bool:
        return self.itk.GetNumberOfComponentsPerPixel() > 1

    @property
    def array(self) -> np.ndarray:
        """Voxels as numpy, axes reversed as SimpleITK does: (z, y, x[, channel])."""
        return sitk.GetArrayFromImage(self.itk)

    def with_itk(self, itk: sitk.Image) -> "Image":
        """The same metadata on new voxels (e.g. after resampling or filtering)."""
        return dataclasses.replace(self, itk=itk)


@dataclass(frozen=True)
class ImageInfo:
    """Header-only facts about an image: enough to list studies without loading voxels."""

    path: Path
    kind: str  # "dicom" (series folder or file), "nifti", "picture" (PNG/JPEG/...), "itk" (NRRD/MHA)
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    components: int = 1
    modality: str | None = None
    patient_id: str | None = None
    study_date: str | None = None  # YYYYMMDD
    study_time: str | None = None
    series_uid: str | None = None
    description: str | None = None

    @property
    def dim(self) -> int:
        return len(self.size)


# ----------------------------------------------------------------------------- small helpers


def _ext(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _exists(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or folder")
    return p


def _str(value) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def check_voxels(path: Path, img: sitk.Image) -> None:
    arr = sitk.GetArrayViewFromImage(img)
    if arr.size == 0:
        raise InputError(path, "image is empty (no voxels)")
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(path, f"image holds {bad} NaN or infinite voxel(s) of {arr.size}")
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        raise InputError(path, f"image is constant (every voxel is {lo}); nothing to compare")


