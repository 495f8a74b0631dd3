"""Loading and saving images: one internal type for DICOM, NIfTI and 2D pictures.

`Image` wraps a SimpleITK image, which already carries voxels, spacing, origin and
direction in LPS physical space, plus the metadata a report needs (`Meta`).

One module a format: `dicom` (series scan, geometry, decoding), `nifti`, `pictures`;
`load` dispatches (`load_image`, `describe`, `save_image`); `files` writes atomically.
"""

from .dicom import SeriesInfo, scan_dicom
from .files import atomic_write, atomic_write_text
from .image import ITK_EXTS, NIFTI_EXTS, PICTURE_EXTS, Image, ImageInfo, Meta
from .load import describe, load_image, save_image

__all__ = ["ITK_EXTS", "NIFTI_EXTS", "PICTURE_EXTS", "Image", "ImageInfo", "Meta", "SeriesInfo", "atomic_write",
           "atomic_write_text", "describe", "load_image", "save_image", "scan_dicom"]
