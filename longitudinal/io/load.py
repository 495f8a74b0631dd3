"""Reading any supported image (`load_image`), its header alone (`describe`), and writing (`save_image`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import SimpleITK as sitk

from ..errors import InputError
from .dicom import (SeriesInfo, _has_dicom_magic, _is_image, _load_dicom_file, _load_series, _not_an_image, _pick_series,
                    _read_header, _scan, _series_from)
from .files import atomic_write
from .image import (DICOM_EXTS, ITK_EXTS, NIFTI_EXTS, PICTURE_EXTS, Image, ImageInfo, Meta, _ext, _exists, _str,
                    check_voxels)
from .nifti import check_nifti_complete, nifti_version
from .pictures import check_jpeg_complete

log = logging.getLogger(__name__)


def _read_itk(path: Path, kind: str) -> sitk.Image:
    if kind == "nifti":
        check_nifti_complete(path)
    if _ext(path) in (".jpg", ".jpeg"):
        check_jpeg_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        if kind == "nifti" and nifti_version(path) == 2:
            raise InputError(path, "NIfTI-2 files are not supported (SimpleITK reads NIfTI-1); "
                                   "convert with nibabel: nib.Nifti1Image(img.dataobj, img.affine)") from exc
        reason = str(exc).strip().splitlines()[-1]
        raise InputError(path, f"cannot read {kind} file (truncated or corrupt?): {reason[:200]}") from exc




def _kind(path: Path) -> str:
    ext = _ext(path)
    if ext in NIFTI_EXTS:
        return "nifti"
    if ext in PICTURE_EXTS:
        return "picture"
    if ext in ITK_EXTS:
        return "itk"
    if ext in DICOM_EXTS or _has_dicom_magic(path):
        return "dicom"
    raise InputError(path, f"unsupported file type '{ext}' (expected a DICOM file or series folder, NIfTI "
                           ".nii/.nii.gz, PNG/JPEG/TIFF/BMP, NRRD or MHA)")


def _itk_image(path: Path, kind: str) -> Image:
    img = _read_itk(path, kind)
    if img.GetDimension() == 4:
        raise InputError(path, f"4D image with {img.GetSize()[3]} volumes; extract one volume first "
                               "(this tool compares 3D volumes or 2D images)")
    if img.GetDimension() == 3 and img.GetSize()[2] == 1 and kind == "picture":
        img = img[:, :, 0]
    n = img.GetNumberOfComponentsPerPixel()
    if kind == "picture" and n in (2, 4):
        # Grey+alpha or RGBA: alpha is not image content.
        keep = [sitk.VectorIndexSelectionCast(img, i) for i in range(n - 1)]
        img = keep[0] if n == 2 else sitk.Compose(keep)
    modality = None
    description = None
    if kind == "nifti" and img.HasMetaDataKey("descrip"):
        description = _str(img.GetMetaData("descrip"))
    return Image(img, Meta(modality=modality, series_description=description, sources=(str(path),)))


def load_image(path: str | os.PathLike, series_uid: str | None = None) -> Image:
    """Read one image: a DICOM series folder or file, NIfTI, or a 2D picture.

    Raises InputError naming the file for anything the later stages could not use.
    """
    path = _exists(path)
    if path.is_dir():
        series, skipped = _scan(path)
        info = _pick_series(path, series, skipped, series_uid)
        image = _load_series(info)
        where = info.folder
    else:
        if path.stat().st_size == 0:
            raise InputError(path, "file is empty (0 bytes)")
        kind = _kind(path)
        if kind == "dicom":
            image = _load_dicom_file(path)
            if series_uid is not None and image.meta.series_uid != series_uid:
                raise InputError(path, f"file belongs to series {image.meta.series_uid}, not {series_uid}")
        else:
            image = _itk_image(path, kind)
        where = path
    check_voxels(where, image.itk)
    log.debug("loaded %s: size %s spacing %s", path, image.size, image.spacing)
    return image


def describe(path: str | os.PathLike, series_uid: str | None = None) -> ImageInfo:
    """Header-only facts about an image (no voxels read), with the same refusals as load_image
    for anything the header alone can reveal (geometry, 4D, non-image DICOM)."""
    path = _exists(path)
    if path.is_dir():
        series, skipped = _scan(path)
        info = _pick_series(path, series, skipped, series_uid)
        if info.problem:
            raise InputError(info.problem_path or path, info.problem)
        return _info_from_series(path, info)
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty (0 bytes)")
    kind = _kind(path)
    if kind == "dicom":
        ds = _read_header(path, strict=True)
        if ds is None:
            raise InputError(path, "not a DICOM file (and no known image extension)")
        if not _is_image(ds):
            raise _not_an_image(path, ds)
        info = _series_from(_str(ds.get("SeriesInstanceUID")) or path.name, [(path, ds)])
        if info.problem:
            raise InputError(path, info.problem)
        return _info_from_series(path, info)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        _read_itk(path, kind)  # raises the same clear error load_image would
        raise InputError(path, f"cannot read {kind} header") from exc
    size = tuple(int(v) for v in reader.GetSize())
    spacing = tuple(float(v) for v in reader.GetSpacing())
    comps = reader.GetNumberOfComponents()
    if len(size) == 4:
        raise InputError(path, f"4D image with {size[3]} volumes; extract one volume first "
                               "(this tool compares 3D volumes or 2D images)")
    if kind == "picture":
        if len(size) == 3 and size[2] == 1:
            size, spacing = size[:2], spacing[:2]
        comps = comps - 1 if comps in (2, 4) else comps
    return ImageInfo(path=path, kind=kind, size=size, spacing=spacing, components=comps)


def _info_from_series(path: Path, info: SeriesInfo) -> ImageInfo:
    return ImageInfo(path=path, kind="dicom", size=info.size, spacing=info.spacing, components=info.components,
                     modality=info.modality, patient_id=info.patient_id, study_date=info.study_date,
                     study_time=info.study_time, series_uid=info.uid, description=info.description)


def save_image(image: Image, path: str | os.PathLike) -> Path:
    """Write `image` (NIfTI, NRRD, MHA, PNG/JPEG...) atomically."""
    path = Path(path)
    ext = _ext(path)
    if ext not in NIFTI_EXTS + PICTURE_EXTS + ITK_EXTS:
        raise ValueError(f"{path}: cannot write '{ext}' files; use .nii.gz, .nrrd, .mha or .png")

    def write(tmp: str) -> None:
        try:
            sitk.WriteImage(image.itk, tmp, useCompression=ext in (".nrrd", ".mha"))
        except RuntimeError as exc:
            reason = (str(exc).strip().splitlines() or [""])[-1]
            raise ValueError(f"{path}: SimpleITK cannot write this {image.itk.GetPixelIDTypeAsString()} "
                             f"image as '{ext}': {reason[:200]}") from exc

    return atomic_write(path, write)


# ----------------------------------------------------------------------------- DICOM export
