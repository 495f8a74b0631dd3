"""The one internal image type (`Image`: a SimpleITK image plus `Meta`) and header-only facts (`ImageInfo`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..settings import check, require

NIFTI_EXTS = (".nii", ".nii.gz")
PICTURE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ITK_EXTS = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_EXTS = (".dcm", ".dicom", ".ima", "")


@dataclass(frozen=True)
class InputSettings:
    """What the loader accepts; an `[input]` table in pipelines/*.toml sets these by name.

    `max_voxels` counts voxels times colour channels (an RGB pixel counts 3): memory and time grow with it
    (a 2000x2000 RGB pair peaks at about 2 GB in `compare`). Above it the image is refused in one line before
    its voxels are read, or with `too_large = "downsample"` averaged down by a whole factor per axis
    (`Meta.downsampled` says so); the default admits a 320^3 volume (a whole head with its neck at 0.8 mm)
    or a 3344x3344 colour picture.
    """

    max_voxels: int = 2**25
    too_large: Literal["refuse", "downsample"] = "refuse"

    def __post_init__(self) -> None:
        check(self)
        require(self.max_voxels >= 1, "max_voxels", f"must be at least 1, got {self.max_voxels}")


@dataclass(frozen=True)
class Meta:
    """What a report needs to know about where an image came from.

    The last three fields explain choices the loader made, in one line each (None: nothing to say), so that
    result.json and the report can show them.
    """

    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str | None = None  # YYYYMMDD
    study_time: str | None = None  # HHMMSS
    modality: str | None = None  # DICOM modality code: MR, CT, OP, XC, ...
    series_description: str | None = None
    series_uid: str | None = None
    sources: tuple[str, ...] = ()
    # Where study_date came from: "DICOM StudyDate", "BIDS sidecar AcquisitionDateTime", "BIDS sessions.tsv
    # acq_time", "BIDS session name", "folder name", "file name", "--baseline-date", ...
    study_date_source: str | None = None
    # How the series was picked when the visit's folder held several, e.g. "series 1.2.3 'T1 3D' (MR, 176
    # slices) of 3 in the folder: the 3D series with the most slices dated on the visit's day".
    series_choice: str | None = None
    # Set when the image was larger than [input] max_voxels and averaged down, e.g. "downsampled 4x (block
    # average) from 10000x10000 to 2500x2500: 300,000,000 values over the limit of 33,554,432".
    downsampled: str | None = None

    @property
    def notes(self) -> tuple[str, ...]:
        """What the reader of a report should know about how this image was read (one line each)."""
        return tuple(n for n in (self.downsampled,) if n)


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


