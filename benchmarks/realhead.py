"""A real whole-head T1 as the anatomy of the cohort's ``realhead`` set: pydeface's mean head.

pydeface (MIT license, PyPI wheel 8.2 MB) ships ``pydeface/data/mean_reg2mean.nii.gz``: a mean of registered
whole-head T1 scans (skull, scalp, face, eyes, upper neck; 176 x 256 x 256 at 1 x 0.98 x 0.98 mm). It is read
from the installed package, never copied into the repository (``pip install --no-deps pydeface``: only the data
is needed, not its nipype pipeline).

The head is put into the MNI frame of ``head.py`` by an affine registration of the MNI152 brain to it (mutual
information, inside the template's brain mask). The brain mask is the registered template mask; white matter is
the real head's own estimate: voxels brighter than an Otsu threshold inside the eroded brain mask where the
template also says white matter, so lesions are placed in tissue that is white matter on this image.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

import head as hd
from head import ss

_CACHE: dict[str, object] = {}


def pydeface_head_path() -> Path:
    spec = importlib.util.find_spec("pydeface")  # finds the package without importing it (nor nipype)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the realhead set needs pydeface's mean head: pip install --no-deps pydeface")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mean_reg2mean.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in this pydeface installation")
    return path


def _registered(spacing: float) -> dict[str, np.ndarray]:
    """The real head and the template's maps on the MNI head grid (cached per process and spacing)."""
    key = f"maps{spacing}"
    if key in _CACHE:
        return _CACHE[key]  # type: ignore[return-value]
    real = sitk.ReadImage(str(pydeface_head_path()), sitk.sitkFloat32)
    tpl = ss.load_template()
    mni = tpl["t1"]
    mask = sitk.Cast(sitk.BinaryDilate(mni > 0.5, [3] * 3), sitk.sitkUInt8)
    body = sitk.Cast(real > float(np.percentile(sitk.GetArrayViewFromImage(real), 70)), sitk.sitkUInt8)
    init = sitk.CenteredTransformInitializer(sitk.Cast(mni > 0.5, sitk.sitkUInt8), body, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, 1)  # fixed seed: the same registration every run
    reg.SetMetricFixedMask(mask)
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-3, 200)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetNumberOfThreads(1)  # multi-threaded metric sums differ in the last bits: keep runs identical
    tx = reg.Execute(mni, real)
    ref = hd.head_grid(spacing)
    head = sitk.GetArrayFromImage(sitk.Resample(real, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    maps = {k: sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                    sitk.sitkFloat32)) for k, img in tpl.items()}
    brain = ndimage.binary_fill_holes(ndimage.binary_opening(maps["t1"] > 0.5, iterations=1))
    inner = ndimage.binary_erosion(brain, iterations=max(1, int(round(2 / spacing))))
    vals = head[inner]
    thr = _otsu(vals)
    wm = inner & (head > thr) & (maps["wm"] > 0.2)
    wm_value = float(np.median(head[wm]))
    scale = ss.WM_REF / wm_value
    csf = brain & (head < 0.5 * thr)
    out = {"head": head * scale, "brain": brain.astype(np.float32), "wm": wm.astype(np.float32),
           "gm": (brain & ~wm & ~csf).astype(np.float32)}
    _CACHE[key] = out
    return out


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, 256)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids) / np.maximum(w0, 1)
    m1 = (np.sum(hist * mids) - np.cumsum(hist * mids)) / np.maximum(w1, 1)
    return float(mids[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def real_head(rng: np.random.Generator, spacing: float = 1.0) -> hd.Head:
    """The real head under a random smooth warp and scaling (one head, many patients), as a ``head.Head``.

    Fat is the real image's own: voxels outside the brain brighter than 1.1 x white matter are moved to the fat
    component, so protocol drift treats them as fat.
    """
    maps = _registered(spacing)
    ref = hd.head_grid(spacing)
    size = np.array(ref.GetSize())
    centre = np.array(ref.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    bs = sitk.BSplineTransformInitializer(ref, [5, 5, 5], 3)
    bs.SetParameters(rng.normal(0.0, 2.0, len(bs.GetParameters())).tolist())
    scale = rng.uniform(0.95, 1.05, 3)
    aff = sitk.AffineTransform(3)
    aff.SetCenter(centre.tolist())
    aff.SetMatrix(np.diag(scale).ravel().tolist())
    field_ref = hd.head_grid(4.0)
    disp = sitk.DisplacementFieldTransform(sitk.TransformToDisplacementField(
        sitk.CompositeTransform([aff, bs]), sitk.sitkVectorFloat64, field_ref.GetSize(), field_ref.GetOrigin(),
        field_ref.GetSpacing(), field_ref.GetDirection()))

    def warp(a: np.ndarray) -> np.ndarray:
        img = sitk.GetImageFromArray(a.astype(np.float32))
        img.CopyInformation(ref)
        return sitk.GetArrayFromImage(sitk.Resample(img, ref, disp, sitk.sitkLinear, 0.0, sitk.sitkFloat32))

    head = warp(maps["head"])
    brain = warp(maps["brain"]) >= 0.5
    wm = warp(maps["wm"]) * brain
    gm = warp(maps["gm"]) * brain
    d_out = hd.distance_outside(brain, ref)
    strip = (d_out <= 2.0).astype(np.float32)
    fat_mask = (~brain) & (head > 1.1 * ss.WM_REF)
    fat = np.where(fat_mask, head, 0.0).astype(np.float32)
    other = np.where(fat_mask, 0.0, head).astype(np.float32)
    csf = brain & (wm < 0.5) & (gm < 0.5)
    csf_value = float(np.median(head[csf])) if csf.any() else 0.3 * ss.WM_REF
    labels = np.where(brain, 255, np.where(head > 0.1 * ss.WM_REF, hd.LABEL["muscle"], hd.LABEL["air"])
                      ).astype(np.uint8)
    shape = {"source": "pydeface mean_reg2mean.nii.gz", "zoom": [round(float(s), 4) for s in scale]}
    return hd.Head(ref, other, fat, head * brain, gm.astype(np.float32), wm.astype(np.float32),
                   brain.astype(np.float32), strip, labels, csf_value, {}, shape)
