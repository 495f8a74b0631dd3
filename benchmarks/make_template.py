"""Build the brain template shipped in `longitudinal/data/` from the MNI152 2009a T1 that ships in nilearn.

    python benchmarks/make_template.py      # needs nilearn (pip install -e ".[samples]")

Brain extraction registers this template and its mask to each baseline (`longitudinal.masks.brain_mask`). 2 mm is
enough for a mask and keeps the files small (about 0.3 MB); the result is bit-identical for a nilearn version.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

OUT = Path(__file__).resolve().parent.parent / "longitudinal" / "data"
SPACING_MM = 2.0


def main() -> None:
    import nilearn

    src = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    t1 = sitk.Cast(sitk.ReadImage(str(src)), sitk.sitkFloat32)
    mask = sitk.Cast(t1 > 0, sitk.sitkFloat32)
    size = [int(round(n * s / SPACING_MM)) for n, s in zip(t1.GetSize(), t1.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([SPACING_MM] * 3)
    grid.SetDirection(t1.GetDirection())
    # the new grid's first voxel centre sits half a new voxel inside the old grid's first voxel corner
    corner = np.array(t1.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    axes = np.array(t1.GetDirection()).reshape(3, 3)
    grid.SetOrigin((corner + axes @ np.full(3, SPACING_MM / 2)).tolist())
    smooth = sitk.SmoothingRecursiveGaussian(t1, [SPACING_MM / 2.355] * 3)  # about one new voxel FWHM
    small = sitk.Resample(smooth, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    small_mask = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkLinear, 0.0) >= 0.5
    OUT.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Cast(sitk.Clamp(small, sitk.sitkFloat32, 0, 255) + 0.5, sitk.sitkUInt8),
                    str(OUT / "mni152_2mm_t1.nii.gz"), True)
    sitk.WriteImage(sitk.Cast(small_mask, sitk.sitkUInt8), str(OUT / "mni152_2mm_brainmask.nii.gz"), True)
    for name in ("mni152_2mm_t1.nii.gz", "mni152_2mm_brainmask.nii.gz"):
        print(name, (OUT / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
