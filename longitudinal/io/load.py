"""Reading any supported image (`load_image`), its header alone (`describe`), and writing (`save_image`).

- An image is refused before its voxels are read when its size is over `InputSettings.max_voxels`
  (or, with `too_large = "downsample"`, read and averaged down by a whole factor per axis).
- An image with one frame (a single DICOM slice, PNG, JPEG) is 2D; its position in the patient is
  dropped because 2D registration works in the image plane. Alpha channels are dropped.
- 4D images are refused (the error says how many volumes) rather than silently taking the first volume.
- A date or modality the header lacks comes from the image's surroundings (`provenance.context`:
  BIDS sidecar and sessions.tsv, session and folder names); `Meta.study_date_source` says which.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import SimpleITK as sitk

from ..errors import InputError, OutputError
from . import nifti
from .dicom import SeriesInfo, _has_dicom_magic, file_series, pick_series, scan
from .dicom_pixels import load_series
from .files import atomic_write, existing
from .image import (DICOM_EXTS, ITK_EXTS, NIFTI_EXTS, PICTURE_EXTS, Image, ImageInfo, InputSettings, Meta, _ext,
                    _str, check_voxels)
from .native import library_messages
from .pictures import check_jpeg_complete
from .provenance import context

log = logging.getLogger(__name__)

# What ITK's writers say when the disk, not the image, is the problem.
_DISK_TROUBLE = ("No space left", "quota", "Input/output error", "Permission denied", "Read-only file system",
                 "File too large")


def _kind(path: Path) -> str:
    ext = _ext(path)
    if ext in NIFTI_EXTS:
        return "nifti"
    if ext in PICTURE_EXTS:
        return "picture"
    if ext in ITK_EXTS:
        return "itk"
    if ext in DICOM_EXTS or ext[1:].isdigit() or _has_dicom_magic(path):
        return "dicom"
    raise InputError(path, f"unsupported file type '{ext}' (expected a DICOM file or series folder, NIfTI "
                           ".nii/.nii.gz, PNG/JPEG/TIFF/BMP, NRRD or MHA)")


def _file(path: Path) -> str:
    """The kind of an image file, after refusing an empty one."""
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty (0 bytes)")
    return _kind(path)


def _itk_error(path: Path, kind: str, exc: RuntimeError) -> InputError:
    reason = (str(exc).strip().splitlines() or [""])[-1]
    return InputError(path, f"cannot read {kind} file (truncated or corrupt?): {reason[:200]}")


@dataclasses.dataclass(frozen=True)
class _Header:
    """What SimpleITK (and for NIfTI, nibabel) read from an image file's header."""

    reader: sitk.ImageFileReader
    size: tuple[int, ...]  # spatial, after dropping a picture's single z slice
    spacing: tuple[float, ...]
    components: int  # after dropping alpha
    nifti: nifti.Header | None  # for NIfTI files, the header as nibabel reads it


def _information(path: Path, kind: str, doing: str) -> sitk.ImageFileReader:
    """A reader that has read `path`'s header; InputError naming the file when SimpleITK cannot."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with library_messages(doing):
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _itk_error(path, kind, exc) from exc
    return reader


def _header(path: Path, kind: str) -> _Header:
    """Header-only reading with every check the header allows (NIfTI: nibabel's checks and geometry)."""
    header = nifti.load_header(path) if kind == "nifti" else None
    if header is not None:
        nifti.check_header(path, header)
    reader = _information(path, kind, f"reading {path}")
    size = tuple(int(v) for v in reader.GetSize())
    spacing = tuple(float(v) for v in reader.GetSpacing())
    comps = reader.GetNumberOfComponents()
    if len(size) == 4:
        raise InputError(path, f"4D image with {size[3]} volumes; extract one volume first "
                               "(this tool compares 3D volumes or 2D images)")
    if header is not None:
        nifti.check_itk_geometry(path, header, spacing, reader.GetOrigin(), reader.GetDirection())
    if kind == "picture":
        if len(size) == 3 and size[2] == 1:
            size, spacing = size[:2], spacing[:2]
        comps = comps - 1 if comps in (2, 4) else comps
    return _Header(reader, size, spacing, comps, header)


def _shrink_factor(path: Path, size: tuple[int, ...], components: int, settings: InputSettings) -> int:
    """1 when the image is within `settings.max_voxels`; else refuse, or the whole factor that brings it within."""
    values = math.prod(size) * components
    if values <= settings.max_voxels:
        return 1
    if settings.too_large == "refuse":
        raise InputError(path, f"image too large: {'x'.join(map(str, size))} voxels x {components} channel(s) = "
                               f"{values:,} values, over the limit of {settings.max_voxels:,}; raise [input] "
                               "max_voxels in a pipeline file, or set [input] too_large = \"downsample\"")
    factor = 2
    while math.prod(max(s // factor, 1) for s in size) * components > settings.max_voxels:
        factor += 1
    return factor


def _downsample(image: Image, factor: int, settings: InputSettings) -> Image:
    """Average blocks of `factor` voxels per axis; the note says so (the report shows it)."""
    before = image.size
    values = math.prod(before) * image.itk.GetNumberOfComponentsPerPixel()
    shrunk = sitk.BinShrink(image.itk, [min(factor, s) for s in before])
    note = (f"downsampled {factor}x per axis (block average) from {'x'.join(map(str, before))} to "
            f"{'x'.join(map(str, shrunk.GetSize()))}: {values:,} values over the limit of {settings.max_voxels:,}")
    log.warning("%s", note)
    return Image(shrunk, dataclasses.replace(image.meta, downsampled=note))


def _itk_image(path: Path, kind: str, settings: InputSettings) -> Image:
    head = _header(path, kind)
    factor = _shrink_factor(path, head.size, head.components, settings)
    if head.nifti is not None:
        nifti.check_voxels_stored(path, head.nifti)
    if _ext(path) in (".jpg", ".jpeg"):
        check_jpeg_complete(path)
    try:
        with library_messages(f"reading {path}"):
            img = head.reader.Execute()
    except RuntimeError as exc:
        raise _itk_error(path, kind, exc) from exc
    if img.GetDimension() == 3 and img.GetSize()[2] == 1 and kind == "picture":
        img = img[:, :, 0]
    n = img.GetNumberOfComponentsPerPixel()
    if kind == "picture" and n in (2, 4):
        # Grey+alpha or RGBA: alpha is not image content.
        keep = [sitk.VectorIndexSelectionCast(img, i) for i in range(n - 1)]
        img = keep[0] if n == 2 else sitk.Compose(keep)
    description = _str(img.GetMetaData("descrip")) if kind == "nifti" and img.HasMetaDataKey("descrip") else None
    image = Image(img, Meta(series_description=description, sources=(str(path),)))
    return _downsample(image, factor, settings) if factor > 1 else image


def _dicom_image(info: SeriesInfo, where: Path, allow_mixed_patients: bool, settings: InputSettings) -> Image:
    if info.problem:
        raise InputError(info.problem_path or where, info.problem)
    check_one_patient(info, allow_mixed_patients)
    factor = _shrink_factor(where, info.size, info.components, settings)
    image = load_series(info)
    return _downsample(image, factor, settings) if factor > 1 else image


def check_one_patient(info: SeriesInfo, allow_mixed_patients: bool = False) -> None:
    """Refuse a series whose slices carry different PatientIDs (naming two files, never the IDs)."""
    if info.mixed_patient_files and not allow_mixed_patients:
        a, b = info.mixed_patient_files
        raise InputError(b, f"PatientID differs from that of {a} in the same series; refusing a series that mixes "
                            "two people (--allow-mixed-patients, Python allow_mixed_patients=True, accepts it)")


def _with_context(image: Image, path: Path) -> Image:
    """Fill the date and modality the header lacks from the image's surroundings."""
    meta = image.meta
    if meta.study_date and meta.modality:
        return image
    found = context(path)
    changes: dict[str, str | None] = {}
    if not meta.study_date and found.date is not None:
        changes.update(study_date=found.date.strftime("%Y%m%d"), study_time=meta.study_time or found.time,
                       study_date_source=found.date_source)
    if not meta.modality and found.modality:
        changes["modality"] = found.modality
    return dataclasses.replace(image, meta=dataclasses.replace(meta, **changes)) if changes else image


def _folder_image(folder: Path, series_uid: str | None) -> SeriesInfo | Path:
    """What a folder holds: its DICOM series (one, or the one `series_uid` names) or, in a folder with no DICOM,
    its only NIfTI/picture/NRRD/MHA file (a visit folder such as `F001/2020-01-10/fundus.png`)."""
    found = scan(folder)
    if not found.series and not found.orphans() and series_uid is None:
        images = sorted(f for f, _ in found.skipped if _ext(f) in NIFTI_EXTS + PICTURE_EXTS + ITK_EXTS)
        if len(images) == 1:
            return images[0]
        if images:
            raise InputError(folder, f"{len(images)} images in this folder, give one file: "
                                     + ", ".join(f.name for f in images[:5]) + (" ..." if len(images) > 5 else ""))
        if found.skipped:
            kinds = "; ".join(sorted({why for _, why in found.skipped}))
            raise InputError(folder, f"no image found among {len(found.skipped)} file(s) ({kinds}): expected a DICOM "
                                     "series or one NIfTI, PNG/JPEG/TIFF/BMP, NRRD or MHA file")
    return pick_series(folder, found, series_uid)


def load_image(path: str | os.PathLike, series_uid: str | None = None, *, allow_mixed_patients: bool = False,
               settings: InputSettings | None = None) -> Image:
    """Read one image: a DICOM series folder or file, NIfTI, or a 2D picture.

    `series_uid` picks one series of a folder that holds several; `allow_mixed_patients` accepts a series
    whose slices carry different PatientIDs; `settings` bounds the size (default `InputSettings()`).
    Raises InputError naming the file for anything the later stages could not use.
    """
    path = existing(path)
    settings = settings or InputSettings()
    source = _folder_image(path, series_uid) if path.is_dir() else path
    if isinstance(source, SeriesInfo):
        image = _dicom_image(source, source.folder, allow_mixed_patients, settings)
        where = source.folder
    else:
        path = source
        kind = _file(path)
        if kind == "dicom":
            info = file_series(path)
            if series_uid is not None and info.uid != series_uid:
                raise InputError(path, f"file belongs to series {info.uid}, not {series_uid}")
            image = _dicom_image(info, path, allow_mixed_patients, settings)
        else:
            image = _itk_image(path, kind, settings)
        where = path
    check_voxels(where, image.itk)
    log.debug("loaded %s: size %s spacing %s", path, image.size, image.spacing)
    return _with_context(image, path)


def describe(path: str | os.PathLike, series_uid: str | None = None, *, allow_mixed_patients: bool = False
             ) -> ImageInfo:
    """Header-only facts about an image (no voxels read), with the same refusals as load_image
    for anything the header alone can reveal (geometry, 4D, non-image DICOM, mixed patients)."""
    path = existing(path)
    source = _folder_image(path, series_uid) if path.is_dir() else path
    if isinstance(source, SeriesInfo):
        info = source
        if info.problem:
            raise InputError(info.problem_path or path, info.problem)
        check_one_patient(info, allow_mixed_patients)
        return _info_with_context(_info_from_series(path, info), path)
    path = source
    kind = _file(path)
    if kind == "dicom":
        info = file_series(path)
        if info.problem:
            raise InputError(path, info.problem)
        return _info_with_context(_info_from_series(path, info), path)
    head = _header(path, kind)
    return _info_with_context(ImageInfo(path=path, kind=kind, size=head.size, spacing=head.spacing,
                                        components=head.components), path)


def _info_from_series(path: Path, info: SeriesInfo) -> ImageInfo:
    return ImageInfo(path=path, kind="dicom", size=info.size, spacing=info.spacing, components=info.components,
                     modality=info.modality, patient_id=info.patient_id, study_date=info.study_date,
                     study_time=info.study_time, series_uid=info.uid, description=info.description)


def _info_with_context(info: ImageInfo, path: Path) -> ImageInfo:
    if info.study_date and info.modality:
        return info
    found = context(path)
    changes: dict[str, str | None] = {}
    if not info.study_date and found.date is not None:
        changes.update(study_date=found.date.strftime("%Y%m%d"), study_time=info.study_time or found.time)
    if not info.modality and found.modality:
        changes["modality"] = found.modality
    return dataclasses.replace(info, **changes) if changes else info


def save_image(image: Image, path: str | os.PathLike) -> Path:
    """Write `image` (NIfTI, NRRD, MHA, PNG/JPEG...) atomically, and verify it before it replaces `path`.

    A NIfTI is read back (header, and every voxel byte present: niftilib reports a short write on stderr
    and returns normally); other formats must read back with the same size. Failure: OutputError (an OSError).
    """
    path = Path(path)
    ext = _ext(path)
    if ext not in NIFTI_EXTS + PICTURE_EXTS + ITK_EXTS:
        raise ValueError(f"{path}: cannot write '{ext}' files; use .nii.gz, .nrrd, .mha or .png")

    def write(tmp: str) -> None:
        try:
            with library_messages(f"writing {path}") as messages:
                sitk.WriteImage(image.itk, tmp, useCompression=ext in (".nrrd", ".mha"))
        except RuntimeError as exc:
            reason = (str(exc).strip().splitlines() or [""])[-1]
            if any(s in str(exc) for s in _DISK_TROUBLE):
                raise OutputError(f"{path}: not written: {reason[:200]}") from exc
            raise ValueError(f"{path}: SimpleITK cannot write this {image.itk.GetPixelIDTypeAsString()} "
                             f"image as '{ext}': {reason[:200]}") from exc
        errors = [m for m in messages if "ERROR" in m]
        if errors:
            raise OutputError(f"{path}: not written: " + errors[0].strip()[:200])

    def verify(tmp: Path) -> None:
        if ext in NIFTI_EXTS:
            nifti.check_written(tmp, image.size)
            return
        try:
            reader = _information(tmp, ext, f"verifying {path}")
        except InputError as exc:
            raise OutputError(f"{path}: not written: the written file does not read back ({exc.problem})") from None
        if tuple(reader.GetSize())[:image.dim] != image.size:
            raise OutputError(f"{path}: not written: the written file reads back as {reader.GetSize()}, expected {image.size}")

    return atomic_write(path, write, verify=verify)
