"""Loading and saving images: one internal type for DICOM, NIfTI and 2D pictures.

`Image` wraps a SimpleITK image, which already carries voxels, spacing, origin and
direction in LPS physical space, plus the metadata a report needs (`Meta`).

One module a format: `dicom` (series scan, strict header values, geometry), `dicom_pixels`
(pixel data checked and decoded), `nifti` (nibabel's header checks), `pictures`; `load`
dispatches (`load_image`, `describe`, `save_image`) and bounds the size (`InputSettings`);
`provenance` dates an image from its surroundings; `files` writes atomically and verified;
`native` sends library messages to the log.
"""

from .dicom import SeriesInfo, scan_dicom
from ..errors import OutputError
from .files import TEMP_PREFIX, atomic_write, atomic_write_text, clean_stale_temp
from .image import ITK_EXTS, NIFTI_EXTS, PICTURE_EXTS, Image, ImageInfo, InputSettings, Meta
from .load import check_one_patient, describe, load_image, save_image

__all__ = ["ITK_EXTS", "NIFTI_EXTS", "PICTURE_EXTS", "TEMP_PREFIX", "Image", "ImageInfo", "InputSettings", "Meta",
           "SeriesInfo", "OutputError", "atomic_write", "atomic_write_text", "check_one_patient", "clean_stale_temp",
           "describe", "load_image", "save_image", "scan_dicom"]
