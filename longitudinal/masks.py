"""Where the body is, and where the brain is: the masks registration and preprocessing both need.

MI sampled in empty air only adds noise, and a histogram or z-score dominated by background says nothing about
tissue, so both stages take a mask; this module sits below both. A whole-head scan (skull, scalp, fat, eyes,
neck) must be compared inside the brain only: scalp and fat respond to the scanner differently from brain, and
a neck imaged at one visit only is not change. The brain is found by registering a template brain and its mask
(MNI152, shipped in `longitudinal/data/`) to the image, robust by construction: it needs no intensity rule tuned
to one scanner, and it works the same on skull-stripped images.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import numpy as np
import SimpleITK as sitk

from .io import Image
from .itkmethod import registration_method, set_metric_sampling
from .settings import check, require

log = logging.getLogger(__name__)

MASK_WORK_VOXELS = 1_500_000  # masks of larger images are computed on a shrunk copy
TEMPLATE_T1 = "mni152_2mm_t1.nii.gz"
TEMPLATE_MASK = "mni152_2mm_brainmask.nii.gz"


@dataclass(frozen=True)
class MaskSettings:
    """How the region to compare is found; a `[masks]` TOML table sets these by name."""

    method: Literal["otsu", "threshold", "none"] = "otsu"  # foreground: Otsu, a fixed threshold, or everything
    threshold: float | None = None  # intensity for "threshold" (None: the image's mean)
    closing_mm: float = 3.0  # closes sulci/bowel gas pockets that are still body
    # brain extraction (brain MRI): register the template brain to the baseline and compare inside its mask
    brain: bool = False
    brain_work_mm: float = 2.0  # the template registration runs on copies at this voxel size
    brain_min_ml: float = 600.0  # a brain mask outside this volume range means the template did not fit
    brain_max_ml: float = 2600.0

    def __post_init__(self) -> None:
        check(self)
        require(self.closing_mm >= 0, "closing_mm", "must be >= 0")
        require(self.brain_work_mm > 0, "brain_work_mm", "must be > 0")
        require(0 < self.brain_min_ml < self.brain_max_ml, "brain_min_ml", "0 < brain_min_ml < brain_max_ml")


def luminance(itk: sitk.Image) -> sitk.Image:
    """A float32 scalar image; RGB(A) is reduced to Rec. 601 luma so colour photos can be registered and masked."""
    n = itk.GetNumberOfComponentsPerPixel()
    if n == 1:
        return sitk.Cast(itk, sitk.sitkFloat32)
    if n in (3, 4):
        channels = [sitk.Cast(sitk.VectorIndexSelectionCast(itk, i), sitk.sitkFloat32) for i in range(3)]
        return 0.299 * channels[0] + 0.587 * channels[1] + 0.114 * channels[2]
    channels = [sitk.Cast(sitk.VectorIndexSelectionCast(itk, i), sitk.sitkFloat32) for i in range(n)]
    total = channels[0]
    for c in channels[1:]:
        total = total + c
    return total / float(n)


def gray_array(array: np.ndarray) -> np.ndarray:
    """Numpy luminance with the same Rec. 601 weights as `luminance` (RGB last axis), float32."""
    if array.ndim >= 3 and array.shape[-1] == 3:
        return (array[..., 0] * 0.299 + array[..., 1] * 0.587 + array[..., 2] * 0.114).astype(np.float32)
    return array.astype(np.float32, copy=False)


def mask_array(mask: sitk.Image) -> np.ndarray:
    return sitk.GetArrayViewFromImage(mask) > 0


def _radius_voxels(itk: sitk.Image, mm: float) -> list[int]:
    return [max(0, int(round(mm / s))) for s in itk.GetSpacing()]


def dilate(mask: sitk.Image, mm: float) -> sitk.Image:
    radius = _radius_voxels(mask, mm)
    return sitk.BinaryDilate(mask, radius, sitk.sitkBall, 0, 1) if any(radius) else mask


def foreground_mask(image: Image | sitk.Image, settings: MaskSettings = MaskSettings(),
                    dilate_mm: float = 0.0) -> sitk.Image:
    """Body/foreground mask (uint8 0/1) on the image's grid.

    Otsu (or a threshold), then a closing, holes filled and the largest component kept, so that dark tissue
    inside the body (ventricles, lungs, bowel gas) still counts as body. Large images are masked on a shrunk copy
    (about 1M voxels: morphology at 1 mm costs seconds and a body outline needs no finer detail), then brought
    back by interpolation.
    """
    gray = luminance(image.itk if isinstance(image, Image) else image)
    if settings.method == "none":
        return sitk.Cast(gray * 0 + 1, sitk.sitkUInt8)
    n = int(np.prod(gray.GetSize()))
    factor = max(1, math.ceil((n / MASK_WORK_VOXELS) ** (1.0 / gray.GetDimension())))
    shrink = [factor if s >= 8 * factor else 1 for s in gray.GetSize()]
    work = sitk.BinShrink(gray, shrink) if any(f > 1 for f in shrink) else gray
    if settings.method == "otsu":
        mask = sitk.OtsuThreshold(work, 0, 1)  # below threshold -> 0 (inside value), above -> 1
    else:
        thr = settings.threshold
        if thr is None:
            thr = float(np.mean(sitk.GetArrayViewFromImage(gray)))
        mask = sitk.Cast(work > thr, sitk.sitkUInt8)
    if np.any(sitk.GetArrayViewFromImage(mask)):
        radius = _radius_voxels(mask, settings.closing_mm)
        if any(radius):
            mask = sitk.BinaryMorphologicalClosing(mask, radius, sitk.sitkBall, 1)
        mask = sitk.BinaryFillhole(mask, fullyConnected=False, foregroundValue=1)
        labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
        mask = dilate(sitk.Cast(labels == 1, sitk.sitkUInt8), dilate_mm)
    if work is not gray:
        smooth = sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), gray, sitk.Transform(), sitk.sitkLinear, 0.0)
        mask = sitk.Cast(smooth >= 0.5, sitk.sitkUInt8)
    return mask


# --------------------------------------------------------------------------- brain extraction


@dataclass(frozen=True)
class BrainMask:
    """The brain found in an image: the mask on the image's grid and how well the template fitted."""

    mask: sitk.Image  # uint8 on the image's grid
    volume_ml: float
    metric: float  # Mattes MI of the template fit (lower is better)
    problem: str | None  # why the mask cannot be trusted, one sentence; None when it can


def _template() -> tuple[sitk.Image, sitk.Image]:
    data = resources.files("longitudinal") / "data"
    with resources.as_file(data / TEMPLATE_T1) as t1, resources.as_file(data / TEMPLATE_MASK) as mask:
        return sitk.Cast(sitk.ReadImage(str(t1)), sitk.sitkFloat32), sitk.ReadImage(str(mask), sitk.sitkUInt8)


def _work_copy(itk: sitk.Image, mm: float) -> sitk.Image:
    """The image on an isotropic grid of `mm` voxels along its own axes, smoothed first against aliasing."""
    spacing = np.array(itk.GetSpacing())
    size = np.array(itk.GetSize())
    new_size = [max(1, int(math.ceil(n * s / mm))) for n, s in zip(size, spacing)]
    sigma = [max(0.0, (mm ** 2 - s ** 2)) ** 0.5 / 2.355 for s in spacing]
    smooth = sitk.SmoothingRecursiveGaussian(itk, [max(s, 1e-3) for s in sigma]) if max(sigma) > 0.1 else itk
    grid = sitk.Image(new_size, sitk.sitkFloat32)
    grid.SetSpacing([mm] * 3)
    grid.SetDirection(itk.GetDirection())
    axes = np.array(itk.GetDirection()).reshape(3, 3)
    corner = np.array(itk.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    grid.SetOrigin((corner + axes @ np.full(3, mm / 2)).tolist())
    return sitk.Resample(smooth, grid, sitk.Transform(), sitk.sitkLinear, 0.0)


def _centroid(mask: sitk.Image) -> np.ndarray:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    return np.array(stats.GetCentroid(1))


def _brain_centre_guesses(head: sitk.Image) -> list[np.ndarray]:
    """Where the brain's centre may be in a head (or a brain): the foreground's centroid, and a point below the
    top of the head, since a head imaged down to the neck has its centroid far below the brain's."""
    centre = _centroid(head)
    arr = sitk.GetArrayViewFromImage(head) > 0
    idx = np.argwhere(arr)[:, ::-1].astype(float)  # (x, y, z) index
    axes = np.array(head.GetDirection()).reshape(3, 3)
    points = np.array(head.GetOrigin()) + (idx * np.array(head.GetSpacing())) @ axes.T
    top = points[:, 2].max()  # LPS z: towards the head
    upper = points[points[:, 2] > top - 110.0]
    guesses = [centre]
    for depth in (50.0, 65.0, 80.0):  # template brain centre sits ~55 mm below its top; add scalp and skull
        guesses.append(np.array([upper[:, 0].mean(), upper[:, 1].mean(), top - depth]))
    return guesses


def _template_run(template: sitk.Image, work: sitk.Image, region: sitk.Image, transform: sitk.Transform,
                  shrink: tuple[int, ...], sigmas: tuple[float, ...]) -> float:
    """Optimise `transform` (in place) to fit the template to the image inside `region`; the final MI."""
    # one ITK thread for the metric, as in `register`: with more, its sums change order from run to run, and a
    # whole head's brain mask (and every figure after it) changed between two runs of the same compare
    reg = registration_method(1)
    reg.SetMetricAsMattesMutualInformation(32)
    set_metric_sampling(reg, region, shrink, 0.05, 5000, seed=1)
    reg.SetMetricFixedMask(region)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=150,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(template, work)
    return float(reg.GetMetricValue())


def _template_fit(template: sitk.Image, work: sitk.Image, region: sitk.Image, transform: sitk.Transform) -> float:
    """MI of the template and the image inside `region` at 4 mm, every voxel (no random sampling): comparable
    between transforms. nan where they do not overlap."""
    reg = registration_method(1)
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetMetricFixedMask(sitk.Shrink(region, [2] * 3))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(transform, inPlace=False)
    try:
        return float(reg.MetricEvaluate(sitk.Shrink(template, [2] * 3), work))
    except RuntimeError:
        return math.nan


def brain_mask(itk: sitk.Image, settings: MaskSettings = MaskSettings(brain=True)) -> BrainMask:
    """The brain of a T1-like head or brain image, from the template brain registered to it.

    Rigid first, from several starting points, sampling the template brain and a rim around it: the brain's
    outline helps to place it. Then affine from the best, sampling inside the template brain only: there the
    outline would pull the template's size towards the head's outline against air (the scalp) instead."""
    gray = luminance(itk)
    work = _work_copy(gray, settings.brain_work_mm)
    head = foreground_mask(work, settings)
    template, template_mask = _template()
    outline = dilate(template_mask, 6.0)
    inside = sitk.BinaryErode(template_mask, [1, 1, 1], sitk.sitkBall, 0, 1)
    t_centre = _centroid(template_mask)
    def rigid_from(guess: np.ndarray) -> tuple[float, sitk.Transform]:
        tx = sitk.Euler3DTransform()
        tx.SetCenter(t_centre.tolist())
        tx.SetTranslation((guess - t_centre).tolist())
        try:
            return _template_run(template, work, outline, tx, (4, 2), (4.0, 2.0)), tx
        except RuntimeError:  # no overlap from this start
            return math.inf, tx

    # the starts are independent single-threaded ITK runs (outside the GIL): two at a time, same bytes out
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(rigid_from, _brain_centre_guesses(head)))
    best, best_value = None, math.inf
    for value, tx in runs:  # in the order of the guesses: the first of equal fits wins, as before
        if value < best_value:
            best, best_value = tx, value
    if best is None:
        return BrainMask(sitk.Image(itk.GetSize(), sitk.sitkUInt8), 0.0, math.nan, "no brain found: the template "
                         "does not overlap the image")
    transform = sitk.AffineTransform(3)
    transform.SetCenter(best.GetCenter())
    transform.SetMatrix(best.GetMatrix())
    transform.SetTranslation(best.GetTranslation())
    rigid = sitk.AffineTransform(transform)
    try:
        _template_run(template, work, inside, transform, (2, 1), (2.0, 0.0))
    except RuntimeError:
        transform = rigid
    # the affine stage may wander off (a field of view cut through the brain leaves part of the template outside
    # the image): keep it only when it fits the inside of the brain better than the rigid pose did
    fits = [_template_fit(template, work, inside, t) for t in (rigid, transform)]
    if not fits[1] <= fits[0]:
        log.info("brain mask: the affine fit (MI %.3f) is worse than the rigid one (%.3f); kept the rigid", *fits[::-1])
        transform = rigid
    metric = min(fits)
    # the template mask on the image's grid: image points -> template points is the inverse transform
    on_image = sitk.Resample(sitk.Cast(template_mask, sitk.sitkFloat32), gray, transform.GetInverse(),
                             sitk.sitkLinear, 0.0) >= 0.5
    mask = sitk.Cast(on_image, sitk.sitkUInt8)
    volume_ml = float(np.count_nonzero(sitk.GetArrayViewFromImage(mask))) * float(np.prod(itk.GetSpacing())) / 1000
    problem = None
    if not settings.brain_min_ml <= volume_ml <= settings.brain_max_ml:
        problem = (f"the brain found measures {volume_ml:.0f} ml, outside {settings.brain_min_ml:.0f}-"
                   f"{settings.brain_max_ml:.0f} ml: the template did not fit this image")
    log.info("brain mask: %.0f ml, template MI %.3f", volume_ml, metric)
    return BrainMask(mask, volume_ml, float(metric), problem)
