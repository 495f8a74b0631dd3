"""Register the follow-up (moving) onto the baseline (fixed) with SimpleITK.

Every change reported later is only as good as this alignment: a 1 mm error at a tissue edge
looks like a new lesion. So: centred initialisation, rigid then affine (optionally a coarse,
bounded B-spline), multi-resolution Mattes MI sampled inside the body, and a QC record that
marks a pair as suspect instead of silently passing it on.

Convention (SimpleITK's): `Registration.transform` maps points of the FIXED (baseline) space
into the MOVING (follow-up) space; `sitk.Resample(moving, fixed, transform)` brings the
follow-up onto the baseline grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import Image, OutputError, atomic_write, atomic_write_text, save_image
from .settings import check, choices, require
from .itkmethod import registration_method, set_metric_sampling
from .masks import MaskSettings, dilate, foreground_mask, luminance

log = logging.getLogger(__name__)

Stage = Literal["rigid", "affine", "bspline"]
Init = Literal["geometry", "moments", "physical", "best"]
Optimizer = Literal["regular_step", "gradient_descent"]
STAGES, INITS, OPTIMIZERS = choices(Stage), choices(Init), choices(Optimizer)


@dataclass(frozen=True)
class RegistrationSettings:
    """Registration settings; a `[registration]` TOML table sets these by name."""

    stages: tuple[Stage, ...] = ("rigid", "affine")  # add "bspline" for a bounded deformable stage
    # "geometry": image centres; "moments": intensity centroids; "physical": scanner coordinates
    # as they are; "best": try all three and keep the one with the best MI.
    init: Init = "best"
    metric_bins: int = 32
    sampling_fraction: float = 0.01  # fraction of in-mask voxels sampled (same count at every level)
    min_samples: int = 5_000  # but at least this many samples per level (small images)
    shrink_factors: tuple[int, ...] = (8, 4, 2, 1)  # the 8x level widens the capture range (~25 degrees)
    smoothing_sigmas_mm: tuple[float, ...] = (4.0, 2.0, 1.0, 0.0)
    iterations: int = 200  # per level, for each linear stage; 0 skips optimisation
    learning_rate: float = 2.0  # initial step (about mm, since scales come from physical shifts)
    min_step: float = 1e-3  # regular-step optimiser stops below this step
    optimizer: Optimizer = "regular_step"
    # With both linear stages, rigid runs on all but the finest level and affine on the two finest:
    # rigid gets the capture range, affine the detail, and each pyramid level costs time.
    split_levels: bool = True
    crop_margin_mm: float = 10.0  # 3D images are cropped to their foreground box plus this margin
    # Photographs: each image is divided by its own illumination (a Gaussian of this width inside the foreground)
    # before registering and QC. A fundus camera's vignetting and gain differ between visits and are broad; left
    # in, the metric aligned them instead of the vessels (dev fundus: 5 of 33 pairs with vessels off, 1 at 50 mm;
    # benchmarks/flatten.py). 0: off (MR and CT intensities are left as they are).
    flatten_mm: float = 0.0
    use_masks: bool = True  # sample the metric inside the (dilated) fixed foreground mask
    mask_dilation_mm: float = 4.0  # keep the body edge, the most informative contour, inside the mask
    bspline_mesh_mm: float = 60.0  # control-point spacing of the deformable stage
    bspline_iterations: int = 20  # per level; the deformable stage stays coarse and bounded
    bspline_sampling_fraction: float = 0.003  # hundreds of parameters make each sample dearer: sample fewer
    bspline_shrink_factors: tuple[int, ...] = (4, 2)
    bspline_smoothing_sigmas_mm: tuple[float, ...] = (2.0, 1.0)
    seed: int = 1234
    # ITK threads of the metric and the optimiser. ITK's threaded metric sums in a varying order, so more than
    # one gives a slightly different transform on every run; 1 gives the same bytes out for the same input,
    # always. The images' smoothing and resampling compute each voxel on its own and run on the process's threads.
    threads: int = 1
    # quality control thresholds
    qc_min_dice: float = 0.9  # foreground masks, inside the follow-up's field of view, near the region that matters
    qc_dice_margin_mm: float = 10.0  # ... within this distance of it (the brain of a whole head: its skull, not its neck)
    qc_min_ncc: float = 0.7  # same-modality visits correlate well once aligned (set lower for contrast changes)
    qc_max_scale: float = 1.25  # singular values of the affine outside [1/x, x] are suspect
    qc_max_anisotropy: float = 1.3  # ratio of largest to smallest singular value (shear/squash)
    qc_max_translation_fraction: float = 0.25  # of the fixed field-of-view diagonal
    qc_metric_tolerance: float = 0.01  # relative: final MI may not be worse than identity by more
    # fraction of the baseline's foreground that the follow-up imaged too: below it there is too little to compare
    qc_min_shared_fraction: float = 0.5
    fov_margin_mm: float = 2.0  # voxels this close to the edge of either field of view are not compared

    def __post_init__(self) -> None:
        check(self)
        require(bool(self.stages), "stages", f"must name at least one of {', '.join(STAGES)}")
        require(self.flatten_mm >= 0, "flatten_mm", f"must be >= 0 (0: off), not {self.flatten_mm}")
        require(len(self.shrink_factors) == len(self.smoothing_sigmas_mm) > 0, "shrink_factors",
                "shrink_factors and smoothing_sigmas_mm need the same, non-zero length")
        require(len(self.bspline_shrink_factors) == len(self.bspline_smoothing_sigmas_mm) > 0,
                "bspline_shrink_factors",
                "bspline_shrink_factors and bspline_smoothing_sigmas_mm need the same, non-zero length")
        require(0.0 < self.sampling_fraction <= 1.0, "sampling_fraction", "must be in (0, 1]")
        require(0.0 < self.bspline_sampling_fraction <= 1.0, "bspline_sampling_fraction", "must be in (0, 1]")
        require(self.iterations >= 0 and self.bspline_iterations >= 0, "iterations", "must be >= 0")
        require(self.metric_bins >= 4, "metric_bins", "must be >= 4")


@dataclass(frozen=True)
class RegistrationQC:
    """How far to trust a pair: metric and overlap after registration, against doing nothing."""

    metric: float  # Mattes MI after registration (negative; lower is better)
    identity_metric: float  # the same metric with the identity transform (nan: no overlap at identity)
    dice: float  # Dice of fixed vs resampled moving foreground masks after registration
    identity_dice: float
    ncc: float  # normalised cross-correlation inside the fixed mask after registration
    identity_ncc: float
    max_scale: float  # largest |log| singular value of the linear part, as a factor (1 = no scaling)
    anisotropy: float  # largest / smallest singular value (shear or squash)
    translation_mm: float  # displacement of the fixed foreground centroid
    seconds: float
    stages: tuple[str, ...]
    init: str
    suspect: bool
    reasons: tuple[str, ...] = ()
    shared_fraction: float = 1.0  # of the fixed foreground, the part inside the moving image's field of view

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = list(self.stages)
        d["reasons"] = list(self.reasons)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass(frozen=True)
class Registration:
    """Result of `register`: the transform (fixed -> moving points), the resampled follow-up and its QC."""

    transform: sitk.Transform
    registered: Image  # moving resampled on the fixed grid (keeps RGB and the moving's metadata)
    qc: RegistrationQC
    fixed_reference: sitk.Image = field(repr=False)  # grid of the fixed image (voxels not needed)
    fixed_mask: sitk.Image | None = field(default=None, repr=False)  # the baseline's body mask registration used
    moving_mask: sitk.Image | None = field(default=None, repr=False)  # the follow-up's, on the follow-up's grid
    moving_reference: sitk.Image | None = field(default=None, repr=False)  # grid of the moving image
    roi: sitk.Image | None = field(default=None, repr=False)  # fixed grid: where alignment was measured

    @functools.cached_property
    def inverse(self) -> sitk.Transform:
        """Moving -> fixed point mapping (exact for linear transforms, iteratively inverted for B-spline)."""
        return invert_transform(self.transform, self.fixed_reference)

    def to_fixed(self, image: Image | sitk.Image, interpolator: int = sitk.sitkLinear, default: float = 0.0):
        """Resample anything on (or in the space of) the follow-up onto the baseline grid."""
        itk = image.itk if isinstance(image, Image) else image
        out = sitk.Resample(itk, self.fixed_reference, self.transform, interpolator, default)
        return image.with_itk(out) if isinstance(image, Image) else out

    def to_moving(
        self,
        map_on_fixed_grid: Image | sitk.Image,
        moving_reference: Image | sitk.Image,
        interpolator: int = sitk.sitkLinear,
        default: float = 0.0,
    ):
        """Resample a baseline-grid map (e.g. a change map) onto the follow-up's own grid."""
        itk = map_on_fixed_grid.itk if isinstance(map_on_fixed_grid, Image) else map_on_fixed_grid
        ref = moving_reference.itk if isinstance(moving_reference, Image) else moving_reference
        out = sitk.Resample(itk, ref, self.inverse, interpolator, default)
        return map_on_fixed_grid.with_itk(out) if isinstance(map_on_fixed_grid, Image) else out

    def coverage(self, margin_mm: float = 0.0) -> sitk.Image:
        """uint8 on the fixed grid: 1 where the follow-up imaged the same tissue, at least `margin_mm` inside both
        fields of view. Beyond it the resampled follow-up is extrapolated (or zero), so nothing there is change."""
        if self.moving_reference is None:
            raise ValueError("this registration does not know the follow-up's grid")
        ones = sitk.Image(self.moving_reference.GetSize(), sitk.sitkFloat32) + 1.0
        ones.CopyInformation(self.moving_reference)
        inside = sitk.Resample(ones, self.fixed_reference, self.transform, sitk.sitkLinear, 0.0) >= 0.999
        inside = sitk.Cast(inside, sitk.sitkUInt8)
        if margin_mm > 0:
            size = inside.GetSize()
            radius = [max(1, int(round(margin_mm / sp))) if n > 1 else 0 for n, sp in zip(size, inside.GetSpacing())]
            # the fixed grid's own edge counts as an edge too
            padded = sitk.ConstantPad(inside, [1 if n > 1 else 0 for n in size], [1 if n > 1 else 0 for n in size], 0)
            eroded = sitk.BinaryErode(padded, radius, sitk.sitkBox, 0, 1)
            inside = sitk.RegionOfInterest(eroded, size, [1 if n > 1 else 0 for n in size])
            inside.CopyInformation(self.fixed_reference)
        return inside

    def save(self, folder: str | os.PathLike) -> Path:
        """Write registered.nii.gz, transform.tfm and qc.json into folder, each atomically and read back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_image(self.registered, folder / "registered.nii.gz")
        atomic_write(folder / "transform.tfm", lambda p: sitk.WriteTransform(self.transform, p),
                     verify=lambda p: _check_transform(p, self.transform))
        atomic_write_text(folder / "qc.json", json.dumps(self.qc.to_dict(), indent=2) + "\n")
        return folder


def _check_transform(path: Path, written: sitk.Transform) -> None:
    """A written transform file must read back with the parameters it was written with."""
    try:
        back = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise OutputError(f"{path}: not written: the transform does not read back ({str(exc).strip()[-120:]})")
    if not np.allclose(back.GetParameters(), written.GetParameters()):
        raise OutputError(f"{path}: not written: the transform reads back with other parameters")


def load_transform(path: str | os.PathLike) -> sitk.Transform:
    """Read a transform written by `Registration.save` (fixed -> moving points)."""
    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"not a readable ITK transform file ({str(exc).strip().splitlines()[-1]})") from None
    return tx


def invert_transform(transform: sitk.Transform, fixed_reference: sitk.Image) -> sitk.Transform:
    """Moving -> fixed mapping: the exact inverse for linear transforms; for a composite
    affine∘B-spline, the B-spline part is inverted as a displacement field on the fixed grid."""
    try:
        return transform.GetInverse()
    except RuntimeError:
        pass
    comp = sitk.CompositeTransform(transform)
    parts = [comp.GetNthTransform(i) for i in range(comp.GetNumberOfTransforms())]
    inverses: list[sitk.Transform] = []
    for part in parts:  # composite applies the last part first, so its inverse applies the first part's inverse first
        try:
            inverses.append(part.GetInverse())
        except RuntimeError:
            disp = sitk.TransformToDisplacementField(
                part,
                sitk.sitkVectorFloat64,
                fixed_reference.GetSize(),
                fixed_reference.GetOrigin(),
                fixed_reference.GetSpacing(),
                fixed_reference.GetDirection(),
            )
            inv = sitk.InvertDisplacementField(disp, maximumNumberOfIterations=20, maxErrorToleranceThreshold=0.01,
                                               meanErrorToleranceThreshold=0.0001, enforceBoundaryCondition=True)
            inverses.append(sitk.DisplacementFieldTransform(inv))
    return sitk.CompositeTransform(inverses[::-1])


# --------------------------------------------------------------------------- checks


def _sources(image: Image) -> str:
    return ", ".join(image.meta.sources) if image.meta.sources else "<in-memory image>"


def _pair_name(fixed: Image, moving: Image) -> str:
    return f"{_sources(fixed)} (baseline) / {_sources(moving)} (follow-up)"


def _bounds(itk: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box of the image's voxel-corner extent."""
    size = np.array(itk.GetSize())
    corners = []
    for bits in range(2 ** itk.GetDimension()):
        idx = [(-0.5 if not (bits >> d) & 1 else size[d] - 0.5) for d in range(itk.GetDimension())]
        corners.append(itk.TransformContinuousIndexToPhysicalPoint(idx))
    c = np.array(corners)
    return c.min(axis=0), c.max(axis=0)


def _check_inputs(fixed: Image, moving: Image) -> None:
    if fixed.dim != moving.dim:
        raise InputError(
            _pair_name(fixed, moving),
            f"cannot register a {moving.dim}D follow-up to a {fixed.dim}D baseline (dimension mismatch)",
        )
    for img, role in ((fixed, "baseline"), (moving, "follow-up")):
        if min(img.size) < 4:
            raise InputError(_sources(img), f"{role} image is too small to register (size {img.size})")
        stats = sitk.StatisticsImageFilter()
        stats.Execute(luminance(img.itk))
        if not math.isfinite(stats.GetMaximum()) or not math.isfinite(stats.GetMinimum()):
            raise InputError(_sources(img), f"{role} image contains NaN or infinite values")
        if stats.GetMaximum() - stats.GetMinimum() <= 0:
            raise InputError(_sources(img), f"{role} image is constant ({stats.GetMaximum():g} everywhere): nothing to register on")
    flo, fhi = _bounds(fixed.itk)
    mlo, mhi = _bounds(moving.itk)
    if np.any(fhi < mlo) or np.any(mhi < flo):
        raise InputError(
            _pair_name(fixed, moving),
            "the two images do not overlap in physical space (different body region or frame of reference?)",
        )


# --------------------------------------------------------------------------- registration


def _linear_transform(kind: str, dim: int) -> sitk.Transform:
    if kind == "rigid":
        return sitk.Euler3DTransform() if dim == 3 else sitk.Euler2DTransform()
    return sitk.AffineTransform(dim)


def _as_affine(tx: sitk.Transform, dim: int) -> sitk.AffineTransform:
    """Any linear SimpleITK transform with a centre, as an AffineTransform (same mapping)."""
    out = sitk.AffineTransform(dim)
    t = tx.Downcast() if hasattr(tx, "Downcast") else tx
    out.SetCenter(t.GetCenter())
    out.SetMatrix(t.GetMatrix())
    out.SetTranslation(t.GetTranslation())
    return out


@contextlib.contextmanager
def itk_threads(n: int) -> Iterator[None]:
    """ITK's default thread count set to n (> 0) for the block, then restored."""
    if n <= 0:
        yield
        return
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _method(settings: RegistrationSettings, fixed_mask: sitk.Image | None, shrink, sigmas,
            sampling_fraction: float | None = None) -> sitk.ImageRegistrationMethod:
    """A configured ImageRegistrationMethod, sampling inside `fixed_mask`."""
    reg = registration_method(settings.threads)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.metric_bins)
    # On-the-fly central differences: a full-resolution gradient image per level costs more than it brings.
    reg.MetricUseFixedImageGradientFilterOff()
    reg.MetricUseMovingImageGradientFilterOff()
    set_metric_sampling(reg, fixed_mask, shrink, sampling_fraction or settings.sampling_fraction,
                        settings.min_samples, settings.seed)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def _set_optimizer(reg: sitk.ImageRegistrationMethod, settings: RegistrationSettings, iterations: int) -> None:
    if settings.optimizer == "regular_step":
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=settings.learning_rate,
            minStep=settings.min_step,
            numberOfIterations=iterations,
            relaxationFactor=0.5,
            gradientMagnitudeTolerance=1e-8,
        )
    else:
        reg.SetOptimizerAsGradientDescent(
            learningRate=settings.learning_rate,
            numberOfIterations=iterations,
            convergenceMinimumValue=1e-6,
            convergenceWindowSize=10,
            estimateLearningRate=reg.EachIteration,
        )
    reg.SetOptimizerScalesFromPhysicalShift()


def _initial_transform(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings, fixed_mask,
                       whole: tuple[sitk.Image, sitk.Image] | None = None) -> tuple[sitk.Transform, str]:
    """The starting pose. `fixed`/`moving` are the cropped working copies; `whole`: the uncropped images, whose
    centres and moments are candidates too under "best" (a fixed image cropped to the brain has its centre of
    mass far from a whole head's with its neck: validation S006 failed from every cropped start, NCC 0.07)."""
    dim = fixed.GetDimension()

    def centred(f_img: sitk.Image, m_img: sitk.Image, mode: str) -> sitk.Transform:
        flag = sitk.CenteredTransformInitializerFilter.GEOMETRY if mode == "geometry" else sitk.CenteredTransformInitializerFilter.MOMENTS
        return sitk.CenteredTransformInitializer(f_img, m_img, _linear_transform("rigid", dim), flag)

    candidates: dict[str, sitk.Transform] = {}
    for mode in ("geometry", "moments", "physical") if settings.init == "best" else (settings.init,):
        if mode == "physical":  # identity, rotating about the fixed image's centre
            candidates[mode] = _linear_transform("rigid", dim)
            candidates[mode].SetCenter(fixed.TransformContinuousIndexToPhysicalPoint(
                [(s - 1) / 2.0 for s in fixed.GetSize()]))
        else:
            candidates[mode] = centred(fixed, moving, mode)
    if whole is not None and settings.init == "best":
        for mode in ("geometry", "moments"):
            candidates[f"{mode} (whole images)"] = centred(*whole, mode)
    if len(candidates) == 1:
        mode = next(iter(candidates))
        return candidates[mode], mode
    # Pick by MI at a coarse level (cheap, and coarse smoothing tolerates the residual rotation).
    shrink = max(1, min(4, min(fixed.GetSize()) // 16))
    f_small = sitk.Shrink(fixed, [shrink] * dim)
    m_small = sitk.Shrink(moving, [shrink] * dim)
    mask_small = sitk.Shrink(fixed_mask, [shrink] * dim) if fixed_mask is not None else None
    best, best_val = None, math.inf
    for mode, tx in candidates.items():
        reg = _method(settings, mask_small, (1,), (0.0,))
        reg.SetMetricSamplingStrategy(reg.NONE)
        reg.SetInitialTransform(tx, inPlace=False)
        try:
            val = reg.MetricEvaluate(f_small, m_small)
        except RuntimeError:  # no overlap for this candidate
            val = math.inf
        log.debug("init %s: MI %.4f", mode, val)
        if val < best_val:
            best, best_val = mode, val
    if best is None:
        best = "geometry"
    return candidates[best], best


def _run(reg: sitk.ImageRegistrationMethod, fixed, moving, what: str) -> None:
    if log.isEnabledFor(logging.DEBUG):
        start = [time.perf_counter()]
        iters = [0]

        def level() -> None:
            log.debug("%s level %d starts at %.2f s (%d iterations so far)", what, reg.GetCurrentLevel(),
                      time.perf_counter() - start[0], iters[0])

        def iteration() -> None:
            iters[0] += 1

        reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, level)
        reg.AddCommand(sitk.sitkIterationEvent, iteration)
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise _RegistrationFailure(f"{what} stage failed: {str(exc).strip().splitlines()[-1]}") from None
    log.debug("%s: %s after %d iterations, MI %.4f", what, reg.GetOptimizerStopConditionDescription(),
              reg.GetOptimizerIteration(), reg.GetMetricValue())


class _RegistrationFailure(Exception):
    pass


def _linear_part(tx: sitk.Transform, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(matrix, centre, translation) of the linear transform in tx (the first of a composite)."""
    t = tx
    if t.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(t)
        t = comp.GetNthTransform(0)
    t = t.Downcast()
    if not hasattr(t, "GetMatrix"):
        return None
    return (np.array(t.GetMatrix()).reshape(dim, dim), np.array(t.GetCenter()), np.array(t.GetTranslation()))


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


class _Probe:
    """Deterministic, cheap measures of a transform: MI, foreground Dice and NCC on 2x-shrunk copies with every
    voxel of the region (no random sampling), so identity, candidates and the result compare fairly."""

    def __init__(self, fixed_gray: sitk.Image, moving_gray: sitk.Image, fixed_body: sitk.Image,
                 moving_body: sitk.Image, roi: sitk.Image, settings: RegistrationSettings):
        def small(img: sitk.Image) -> sitk.Image:
            return sitk.Shrink(img, [2 if n >= 64 else 1 for n in img.GetSize()])

        self.settings = settings
        self.f_small, self.m_small = small(fixed_gray), small(moving_gray)
        self.body_small, self.m_body_small, self.roi_small = small(fixed_body), small(moving_body), small(roi)
        self.roi = sitk.GetArrayFromImage(self.roi_small) > 0
        # foreground overlap is counted near the region that matters: a whole head's neck and jaw move apart
        # from the brain, and its outline there says nothing about how well the brain was aligned
        near = sitk.GetArrayFromImage(dilate(self.roi_small, settings.qc_dice_margin_mm)) > 0
        self.near = near
        self.body = (sitk.GetArrayFromImage(self.body_small) > 0) & near
        self.f_roi = sitk.GetArrayViewFromImage(self.f_small)[self.roi].astype(np.float64)

    def metric(self, tx: sitk.Transform) -> float:
        reg = registration_method(self.settings.threads)
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=self.settings.metric_bins)
        reg.SetMetricSamplingStrategy(reg.NONE)
        reg.SetMetricFixedMask(self.roi_small)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetInitialTransform(tx, inPlace=False)
        try:
            return float(reg.MetricEvaluate(self.f_small, self.m_small))
        except RuntimeError:
            return math.nan

    def overlap(self, tx: sitk.Transform) -> tuple[float, float, float]:
        """(foreground Dice, NCC in the region, fraction of the region the follow-up imaged), all counted only
        where the follow-up has data: a follow-up with a shorter field of view is not a misregistration."""
        inside = sitk.GetArrayFromImage(sitk.Resample(self.m_body_small, self.body_small, tx,
                                                      sitk.sitkNearestNeighbor, 255)) != 255
        moved = (sitk.GetArrayFromImage(sitk.Resample(self.m_body_small, self.body_small, tx,
                                                      sitk.sitkNearestNeighbor, 0)) == 1) & self.near
        fm = self.body & inside
        denom = fm.sum() + moved.sum()
        dice = float(2.0 * np.logical_and(fm, moved).sum() / denom) if denom else 0.0
        mg = sitk.GetArrayFromImage(sitk.Resample(self.m_small, self.f_small, tx, sitk.sitkLinear, 0.0))[self.roi]
        ok = inside[self.roi]
        shared = float(ok.mean()) if ok.size else 0.0
        ncc = _ncc(self.f_roi[ok], mg[ok].astype(np.float64)) if ok.sum() > 10 else 0.0
        return dice, ncc, shared


def _quality(probe: _Probe, transform: sitk.Transform, stages, init: str,
             metric: float | None = None) -> RegistrationQC:
    """QC of `transform` against identity; `metric`: the transform's probe MI when already measured."""
    settings = probe.settings
    dim = probe.f_small.GetDimension()
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    # the four measures at once: each is mostly single-threaded ITK (outside the GIL) on its own images
    with ThreadPoolExecutor(max_workers=2) as pool:
        final = pool.submit(probe.metric, transform) if metric is None else None
        ident = pool.submit(probe.metric, identity)
        fit, unmoved = pool.submit(probe.overlap, transform), pool.submit(probe.overlap, identity)
        m_final = final.result() if final is not None else metric
        m_ident = ident.result()
        dice, ncc, shared = fit.result()
        try:
            idice, incc, _ = unmoved.result()
        except RuntimeError:
            idice, incc = 0.0, 0.0
    fmask, f_small = probe.roi, probe.f_small

    reasons: list[str] = []
    max_scale, anisotropy, translation = 1.0, 1.0, 0.0
    lin = _linear_part(transform, dim)
    lo, hi = _bounds(f_small)
    diag = float(np.linalg.norm(hi - lo))
    if lin is not None:
        matrix, centre, trans = lin
        sv = np.linalg.svd(matrix, compute_uv=False)
        max_scale = float(math.exp(np.max(np.abs(np.log(np.clip(sv, 1e-9, None))))))
        anisotropy = float(sv.max() / max(sv.min(), 1e-9))
        idx = np.argwhere(fmask)[:, ::-1].mean(axis=0) if fmask.any() else (np.array(f_small.GetSize()) - 1) / 2
        c = np.array(f_small.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx]))
        mapped = matrix @ (c - centre) + centre + trans
        translation = float(np.linalg.norm(mapped - c))
        if np.linalg.det(matrix) <= 0:
            reasons.append("affine flips orientation (negative determinant)")
        if max_scale > settings.qc_max_scale:
            reasons.append(f"extreme scaling in the affine (factor {max_scale:.2f} > {settings.qc_max_scale:g})")
        if anisotropy > settings.qc_max_anisotropy:
            reasons.append(f"extreme shear/anisotropic scaling in the affine (ratio {anisotropy:.2f} > {settings.qc_max_anisotropy:g})")
        if translation > settings.qc_max_translation_fraction * diag:
            reasons.append(f"huge translation ({translation:.1f} mm > {settings.qc_max_translation_fraction:g} of the field of view)")
    if shared < settings.qc_min_shared_fraction:
        reasons.append(f"the follow-up imaged only {100 * shared:.0f} % of the baseline's foreground "
                       f"(< {100 * settings.qc_min_shared_fraction:.0f} %)")
    if dice < settings.qc_min_dice:
        reasons.append(f"low overlap: foreground Dice {dice:.3f} < {settings.qc_min_dice:g}")
    if ncc < settings.qc_min_ncc:
        reasons.append(f"low similarity: NCC {ncc:.3f} < {settings.qc_min_ncc:g}")
    if not math.isfinite(m_final):
        reasons.append("metric undefined after registration (images do not overlap)")
    elif math.isfinite(m_ident) and m_final > m_ident + settings.qc_metric_tolerance * abs(m_ident):
        reasons.append(f"metric worse than identity ({m_final:.4f} vs {m_ident:.4f})")
    return RegistrationQC(
        metric=m_final, identity_metric=m_ident, dice=dice, identity_dice=idice, ncc=ncc, identity_ncc=incc,
        max_scale=max_scale, anisotropy=anisotropy, translation_mm=translation, seconds=0.0,
        stages=tuple(stages), init=init, suspect=bool(reasons), reasons=tuple(reasons), shared_fraction=shared,
    )


def _flatten(gray: sitk.Image, body: sitk.Image, sigma_mm: float) -> sitk.Image:
    """`gray` divided by its local mean inside `body` (a normalised Gaussian of `sigma_mm`), 0 outside: the
    image's structure without its broad illumination."""
    def blur(img: sitk.Image) -> sitk.Image:
        return sitk.Cast(sitk.SmoothingRecursiveGaussian(img, sigma_mm), sitk.sitkFloat32)

    inside = sitk.Cast(body > 0, sitk.sitkFloat32)
    gray = sitk.Cast(gray, sitk.sitkFloat32)
    # sitk's "/" gives float64: cast back so every image of the registration stays float32
    mean = sitk.Cast(blur(gray * inside) / sitk.Maximum(blur(inside), 1e-3), sitk.sitkFloat32)
    return sitk.Cast(gray / sitk.Maximum(mean, 1e-3), sitk.sitkFloat32) * inside


def _crop_to(gray: sitk.Image, mask: sitk.Image, margin_mm: float):
    """(cropped image, (index, size) or None): the mask's bounding box plus a margin, 3D only."""
    if gray.GetDimension() != 3:
        return gray, None
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if not stats.HasLabel(1):
        return gray, None
    box = stats.GetBoundingBox(1)
    dim = gray.GetDimension()
    size = gray.GetSize()
    lo = [max(0, box[d] - int(math.ceil(margin_mm / gray.GetSpacing()[d]))) for d in range(dim)]
    hi = [min(size[d], box[d] + box[d + dim] + int(math.ceil(margin_mm / gray.GetSpacing()[d]))) for d in range(dim)]
    new_size = [h - l for l, h in zip(lo, hi)]
    if np.prod(new_size) > 0.8 * np.prod(size) or min(new_size) < 8:
        return gray, None
    return sitk.RegionOfInterest(gray, new_size, lo), (lo, new_size)


def _registration_mask(region: sitk.Image, settings: RegistrationSettings) -> sitk.Image:
    """The region dilated so its outline, the most informative contour, is sampled too."""
    if not np.any(sitk.GetArrayViewFromImage(region)):
        return sitk.Cast(region * 0 + 1, sitk.sitkUInt8)
    return dilate(region, settings.mask_dilation_mm)


def register(
    fixed: Image,
    moving: Image,
    settings: RegistrationSettings = RegistrationSettings(),
    fixed_body: sitk.Image | None = None,
    moving_body: sitk.Image | None = None,
    roi: sitk.Image | None = None,
) -> Registration:
    """Register the follow-up (moving) to the baseline (fixed).

    fixed_body / moving_body: foreground masks on each image's grid (default: Otsu foreground); roi: where the
    alignment matters, on the fixed grid (e.g. the brain of a whole-head scan; default: the fixed foreground).
    The metric is sampled in the roi and QC measures the roi. Of the starting pose and each stage's result the
    transform with the best metric is kept, so an optimiser that wanders off never makes things worse.

    Raises InputError naming the files for pairs that cannot be registered (dimension mismatch,
    constant image, no physical overlap, optimiser failure). A poor but finished registration is
    returned with `qc.suspect` set and the reasons listed.
    """
    t0 = time.perf_counter()
    _check_inputs(fixed, moving)
    dim = fixed.dim
    f_gray = luminance(fixed.itk)
    m_gray = luminance(moving.itk)
    f_body = fixed_body if fixed_body is not None else foreground_mask(f_gray)
    m_body = moving_body if moving_body is not None else foreground_mask(m_gray)
    region = roi if roi is not None else f_body
    if settings.flatten_mm > 0:
        f_gray, m_gray = _flatten(f_gray, f_body, settings.flatten_mm), _flatten(m_gray, m_body, settings.flatten_mm)
    # Registration sees cropped copies (same physical space): the pyramid smooths the whole
    # moving image at every level, so empty air around the body costs time for nothing.
    f_work, f_box = _crop_to(f_gray, region, settings.crop_margin_mm + settings.mask_dilation_mm)
    m_work, _ = _crop_to(m_gray, m_body, settings.crop_margin_mm + settings.mask_dilation_mm)
    f_mask = None
    if settings.use_masks:
        cropped = sitk.RegionOfInterest(region, f_box[1], f_box[0]) if f_box is not None else region
        f_mask = _registration_mask(cropped, settings)

    # Shrink factors larger than an axis would collapse it: cap per level for small (e.g. 2D) images.
    min_size = min(f_work.GetSize())
    shrink = tuple(max(1, min(s, min_size // 8)) for s in settings.shrink_factors)
    probe = _Probe(f_gray, m_gray, f_body, m_body, region, settings)

    stages_run: list[str] = []
    try:
        whole = (f_gray, m_gray) if f_box is not None else None
        tx, init_mode = _initial_transform(f_work, m_work, settings, f_mask, whole)
        kept: list[tuple[str, sitk.Transform]] = [("start", _as_affine(tx, dim))]
        for kind in ("rigid", "affine"):
            if kind not in settings.stages:
                continue
            current = tx if kind == "rigid" else _as_affine(tx, dim)
            levels = list(zip(shrink, settings.smoothing_sigmas_mm))
            if settings.split_levels and {"rigid", "affine"} <= set(settings.stages) and len(levels) > 1:
                levels = levels[:-1] if kind == "rigid" else levels[-2:]
            if settings.iterations > 0:
                reg = _method(settings, f_mask, [l[0] for l in levels], [l[1] for l in levels])
                _set_optimizer(reg, settings, settings.iterations)
                reg.SetInitialTransform(current, inPlace=True)
                _run(reg, f_work, m_work, kind)
            tx = current
            kept.append((kind, _as_affine(tx, dim)))
            stages_run.append(kind if settings.iterations > 0 else f"{kind}(0 iterations)")
        with ThreadPoolExecutor(max_workers=2) as pool:  # single-threaded ITK each, outside the GIL
            values = list(pool.map(probe.metric, [t for _, t in kept]))
        best = int(np.nanargmin(values)) if np.isfinite(values).any() else len(kept) - 1
        if best != len(kept) - 1:
            log.info("registration: the %s pose fits better than the %s result (MI %.4f vs %.4f); kept it",
                     kept[best][0], kept[-1][0], values[best], values[-1])
            stages_run.append(f"kept {kept[best][0]}")
        tx = kept[best][1]
        if "bspline" in settings.stages:
            linear = _as_affine(tx, dim)
            extent = [sz * sp for sz, sp in zip(f_work.GetSize(), f_work.GetSpacing())]
            mesh = [max(1, int(round(e / settings.bspline_mesh_mm))) for e in extent]
            bspline = sitk.BSplineTransformInitializer(f_work, mesh, order=3)
            if settings.bspline_iterations > 0:
                bshrink = tuple(max(1, min(s, min_size // 8)) for s in settings.bspline_shrink_factors)
                reg = _method(settings, f_mask, bshrink, settings.bspline_smoothing_sigmas_mm,
                              settings.bspline_sampling_fraction)
                reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=settings.bspline_iterations,
                                         maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * settings.bspline_iterations,
                                         costFunctionConvergenceFactor=1e7)
                reg.SetMovingInitialTransform(linear)
                reg.SetInitialTransform(bspline, inPlace=True)
                _run(reg, f_work, m_work, "bspline")
            # moving initial ∘ optimised: the list's last transform is applied to a point first
            tx = sitk.CompositeTransform([linear, bspline])
            stages_run.append("bspline")
    except _RegistrationFailure as exc:
        raise InputError(_pair_name(fixed, moving), f"registration failed ({exc})") from None

    if tx.GetName() != "CompositeTransform":
        tx = tx.Downcast()
    registered = sitk.Resample(moving.itk, fixed.itk, tx, sitk.sitkLinear, 0.0)
    # the kept linear pose's MI is known unless a deformable stage followed
    known = values[best] if "bspline" not in stages_run else None
    qc = dataclasses.replace(_quality(probe, tx, stages_run, init_mode, known), seconds=time.perf_counter() - t0)
    if qc.suspect:
        log.warning("registration suspect: %s", "; ".join(qc.reasons))
    log.info("registered in %.1f s (%s), Dice %.3f, NCC %.3f", qc.seconds, "+".join(stages_run), qc.dice, qc.ncc)
    return Registration(transform=tx, registered=moving.with_itk(registered), qc=qc, fixed_reference=_grid(fixed.itk),
                        fixed_mask=f_body, moving_mask=m_body, moving_reference=_grid(moving.itk), roi=region)


def _grid(itk: sitk.Image) -> sitk.Image:
    """An empty uint8 image on the same grid (geometry only)."""
    reference = sitk.Image(itk.GetSize(), sitk.sitkUInt8)
    reference.CopyInformation(itk)
    return reference


def grid_to_grid(fixed: sitk.Image, moving: sitk.Image) -> sitk.AffineTransform:
    """The transform that maps each fixed voxel's physical point to the same voxel index of the moving grid:
    identity when the two grids are the same; how two files holding the same pixel data correspond."""
    dim = fixed.GetDimension()
    if (fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection()) == (
            moving.GetOrigin(), moving.GetSpacing(), moving.GetDirection()):
        return sitk.AffineTransform(dim)  # exactly identity, without rounding from the matrix algebra

    def affine(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:  # index -> physical
        d = np.array(img.GetDirection()).reshape(dim, dim) * np.array(img.GetSpacing())
        return d, np.array(img.GetOrigin())

    af, of = affine(fixed)
    am, om = affine(moving)
    matrix = am @ np.linalg.inv(af)
    tx = sitk.AffineTransform(dim)
    tx.SetMatrix(matrix.ravel().tolist())
    tx.SetTranslation((om - matrix @ of).tolist())
    return tx


def identity_registration(fixed: Image, moving: Image, mask_settings: MaskSettings = MaskSettings()) -> Registration:
    """The registration of two images that hold the same pixel data: voxel to voxel, nothing optimised."""
    t0 = time.perf_counter()
    tx = grid_to_grid(fixed.itk, moving.itk)
    registered = sitk.Resample(moving.itk, fixed.itk, tx, sitk.sitkNearestNeighbor, 0.0)
    f_mask = foreground_mask(luminance(fixed.itk), mask_settings)
    m_mask = foreground_mask(luminance(moving.itk), mask_settings)
    qc = RegistrationQC(metric=math.nan, identity_metric=math.nan, dice=1.0, identity_dice=1.0, ncc=1.0,
                        identity_ncc=1.0, max_scale=1.0, anisotropy=1.0, translation_mm=0.0,
                        seconds=time.perf_counter() - t0, stages=("none: identical pixel data",), init="grid",
                        suspect=False)
    return Registration(transform=tx, registered=moving.with_itk(registered), qc=qc, fixed_reference=_grid(fixed.itk),
                        fixed_mask=f_mask, moving_mask=m_mask, moving_reference=_grid(moving.itk), roi=f_mask)
