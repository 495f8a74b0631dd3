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

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import Image
from .preprocessing import PreprocessingSettings, foreground_mask, luminance

log = logging.getLogger(__name__)

STAGES = ("rigid", "affine", "bspline")
INITS = ("geometry", "moments", "physical", "best")
OPTIMIZERS = ("regular_step", "gradient_descent")


@dataclass(frozen=True)
class RegistrationSettings:
    """Registration settings; a `[registration]` TOML table sets these by name."""

    stages: tuple[str, ...] = ("rigid", "affine")  # add "bspline" for a bounded deformable stage
    # "geometry": image centres; "moments": intensity centroids; "physical": scanner coordinates
    # as they are; "best": try all three and keep the one with the best MI.
    init: str = "best"
    metric_bins: int = 32
    sampling_fraction: float = 0.05  # fraction of in-mask voxels sampled at the finest level
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (2.0, 1.0, 0.0)
    iterations: int = 200  # per level, for each linear stage; 0 skips optimisation
    learning_rate: float = 1.0
    optimizer: str = "regular_step"  # "regular_step" | "gradient_descent"
    use_masks: bool = True  # sample the metric inside the (dilated) fixed foreground mask
    mask_dilation_mm: float = 4.0  # keep the body edge, the most informative contour, inside the mask
    bspline_mesh_mm: float = 60.0  # control-point spacing of the deformable stage
    bspline_iterations: int = 20  # per level; the deformable stage stays coarse and bounded
    bspline_shrink_factors: tuple[int, ...] = (4, 2)
    bspline_smoothing_sigmas_mm: tuple[float, ...] = (2.0, 1.0)
    seed: int = 1234
    threads: int = 0  # 0: SimpleITK's default for this process; set on the method object only
    # quality control thresholds
    qc_min_dice: float = 0.85
    qc_min_ncc: float = 0.5
    qc_max_scale: float = 1.25  # singular values of the affine outside [1/x, x] are suspect
    qc_max_anisotropy: float = 1.3  # ratio of largest to smallest singular value (shear/squash)
    qc_max_translation_fraction: float = 0.25  # of the fixed field-of-view diagonal
    qc_metric_tolerance: float = 0.01  # relative: final MI may not be worse than identity by more

    def __post_init__(self) -> None:
        for name in ("stages", "shrink_factors", "smoothing_sigmas_mm", "bspline_shrink_factors", "bspline_smoothing_sigmas_mm"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {self.stages}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, not {self.init!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if len(self.shrink_factors) != len(self.smoothing_sigmas_mm) or not self.shrink_factors:
            raise ValueError("shrink_factors and smoothing_sigmas_mm need the same, non-zero length")
        if len(self.bspline_shrink_factors) != len(self.bspline_smoothing_sigmas_mm) or not self.bspline_shrink_factors:
            raise ValueError("bspline_shrink_factors and bspline_smoothing_sigmas_mm need the same, non-zero length")
        if not 0.0 < self.sampling_fraction <= 1.0:
            raise ValueError("sampling_fraction must be in (0, 1]")
        if self.iterations < 0 or self.bspline_iterations < 0 or self.metric_bins < 4:
            raise ValueError("iterations must be >= 0 and metric_bins >= 4")


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = list(self.stages)
        d["reasons"] = list(self.reasons)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same folder (keeping the suffix, ITK picks its writer by it), then rename."""
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class Registration:
    """Result of `register`: the transform (fixed -> moving points), the resampled follow-up and its QC."""

    transform: sitk.Transform
    registered: Image  # moving resampled on the fixed grid (keeps RGB and the moving's metadata)
    qc: RegistrationQC
    fixed_reference: sitk.Image = field(repr=False)  # grid of the fixed image (voxels not needed)

    @property
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

    def save(self, folder: str | os.PathLike) -> Path:
        """Write registered.nii.gz, transform.tfm and qc.json into folder, each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / "registered.nii.gz", lambda p: sitk.WriteImage(self.registered.itk, p, True))
        _atomic_write(folder / "transform.tfm", lambda p: sitk.WriteTransform(self.transform, p))
        text = json.dumps(self.qc.to_dict(), indent=2)

        def write_json(p: str) -> None:
            Path(p).write_text(text + "\n", encoding="utf-8")

        _atomic_write(folder / "qc.json", write_json)
        return folder


def load_transform(path: str | os.PathLike) -> sitk.Transform:
    """Read a transform written by `Registration.save` (fixed -> moving points)."""
    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"not a readable ITK transform file ({str(exc).strip().splitlines()[-1]})") from None
    # A composite written by ITK reads back as a one-element composite wrapping a composite on some versions
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


def _method(settings: RegistrationSettings, fixed_mask: sitk.Image | None, shrink, sigmas, fraction_scale) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.metric_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # Constant sample count across levels: coarse levels have fewer voxels, so they sample a larger fraction.
    reg.SetMetricSamplingPercentagePerLevel(
        [min(1.0, settings.sampling_fraction * f ** fraction_scale) for f in shrink], settings.seed
    )
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if settings.threads > 0:
        reg.SetNumberOfThreads(settings.threads)
    return reg


def _set_optimizer(reg: sitk.ImageRegistrationMethod, settings: RegistrationSettings, iterations: int) -> None:
    if settings.optimizer == "regular_step":
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=settings.learning_rate,
            minStep=1e-4,
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


def _initial_transform(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings, fixed_mask) -> tuple[sitk.Transform, str]:
    dim = fixed.GetDimension()
    candidates: dict[str, sitk.Transform] = {}
    modes = ("geometry", "moments", "physical") if settings.init == "best" else (settings.init,)
    for mode in modes:
        base = _linear_transform("rigid", dim)
        if mode == "physical":
            centre = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()])
            base.SetCenter(centre)
            candidates[mode] = base
        else:
            flag = sitk.CenteredTransformInitializerFilter.GEOMETRY if mode == "geometry" else sitk.CenteredTransformInitializerFilter.MOMENTS
            candidates[mode] = sitk.CenteredTransformInitializer(fixed, moving, base, flag)
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
        reg = _method(settings, mask_small, (1,), (0.0,), 0)
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


def _quality(fixed_gray, moving_gray, fixed_mask, moving_mask, transform, settings, seconds, stages, init) -> RegistrationQC:
    dim = fixed_gray.GetDimension()
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    # Metric: same MI, but on all in-mask voxels of a 2x-shrunk image so QC figures are deterministic and comparable.
    shrink = [2 if s >= 64 else 1 for s in fixed_gray.GetSize()]
    f_small = sitk.Shrink(fixed_gray, shrink)
    m_small = sitk.Shrink(moving_gray, shrink)
    mask_small = sitk.Shrink(fixed_mask, shrink)

    def metric(tx) -> float:
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.metric_bins)
        reg.SetMetricSamplingStrategy(reg.NONE)
        reg.SetMetricFixedMask(mask_small)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetInitialTransform(tx, inPlace=False)
        if settings.threads > 0:
            reg.SetNumberOfThreads(settings.threads)
        try:
            return float(reg.MetricEvaluate(f_small, m_small))
        except RuntimeError:
            return math.nan

    fmask = sitk.GetArrayViewFromImage(fixed_mask) > 0
    farr = sitk.GetArrayViewFromImage(fixed_gray)[fmask].astype(np.float64)

    def overlap(tx) -> tuple[float, float]:
        mm = sitk.GetArrayFromImage(sitk.Resample(moving_mask, fixed_mask, tx, sitk.sitkNearestNeighbor, 0)) > 0
        denom = fmask.sum() + mm.sum()
        dice = float(2.0 * np.logical_and(fmask, mm).sum() / denom) if denom else 0.0
        mg = sitk.GetArrayFromImage(sitk.Resample(moving_gray, fixed_gray, tx, sitk.sitkLinear, 0.0))[fmask]
        return dice, _ncc(farr, mg.astype(np.float64))

    m_final, m_ident = metric(transform), metric(identity)
    dice, ncc = overlap(transform)
    try:
        idice, incc = overlap(identity)
    except RuntimeError:
        idice, incc = 0.0, 0.0

    reasons: list[str] = []
    max_scale, anisotropy, translation = 1.0, 1.0, 0.0
    lin = _linear_part(transform, dim)
    lo, hi = _bounds(fixed_gray)
    diag = float(np.linalg.norm(hi - lo))
    if lin is not None:
        matrix, centre, trans = lin
        sv = np.linalg.svd(matrix, compute_uv=False)
        max_scale = float(math.exp(np.max(np.abs(np.log(np.clip(sv, 1e-9, None))))))
        anisotropy = float(sv.max() / max(sv.min(), 1e-9))
        idx = np.argwhere(fmask)[:, ::-1].mean(axis=0) if fmask.any() else (np.array(fixed_gray.GetSize()) - 1) / 2
        c = np.array(fixed_gray.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx]))
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
        max_scale=max_scale, anisotropy=anisotropy, translation_mm=translation, seconds=seconds,
        stages=tuple(stages), init=init, suspect=bool(reasons), reasons=tuple(reasons),
    )


def _registration_mask(gray: sitk.Image, settings: RegistrationSettings, mask_settings: PreprocessingSettings) -> sitk.Image:
    mask = foreground_mask(gray, mask_settings)
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        mask = sitk.Cast(gray * 0 + 1, sitk.sitkUInt8)
    radius = [max(0, int(round(settings.mask_dilation_mm / s))) for s in gray.GetSpacing()]
    if any(radius):
        mask = sitk.BinaryDilate(mask, radius, sitk.sitkBall, 0, 1)
    return mask


def register(
    fixed: Image,
    moving: Image,
    settings: RegistrationSettings = RegistrationSettings(),
    mask_settings: PreprocessingSettings = PreprocessingSettings(),
) -> Registration:
    """Register the follow-up (moving) to the baseline (fixed).

    Raises InputError naming the files for pairs that cannot be registered (dimension mismatch,
    constant image, no physical overlap, optimiser failure). A poor but finished registration is
    returned with `qc.suspect` set and the reasons listed.
    """
    t0 = time.perf_counter()
    _check_inputs(fixed, moving)
    dim = fixed.dim
    f_gray = luminance(fixed.itk)
    m_gray = luminance(moving.itk)
    f_mask_body = foreground_mask(f_gray, mask_settings)
    m_mask_body = foreground_mask(m_gray, mask_settings)
    f_mask = _registration_mask(f_gray, settings, mask_settings) if settings.use_masks else None

    # Shrink factors larger than an axis would collapse it: cap per level for small (e.g. 2D) images.
    min_size = min(fixed.size)
    shrink = tuple(max(1, min(s, min_size // 8)) for s in settings.shrink_factors)
    fraction_scale = dim

    stages_run: list[str] = []
    try:
        tx, init_mode = _initial_transform(f_gray, m_gray, settings, f_mask)
        for kind in ("rigid", "affine"):
            if kind not in settings.stages:
                continue
            current = tx if kind == "rigid" else _as_affine(tx, dim)
            if settings.iterations > 0:
                reg = _method(settings, f_mask, shrink, settings.smoothing_sigmas_mm, fraction_scale)
                _set_optimizer(reg, settings, settings.iterations)
                reg.SetInitialTransform(current, inPlace=True)
                _run(reg, f_gray, m_gray, kind)
            tx = current
            stages_run.append(kind if settings.iterations > 0 else f"{kind}(0 iterations)")
        if "bspline" in settings.stages:
            linear = _as_affine(tx, dim)
            extent = [sz * sp for sz, sp in zip(fixed.size, fixed.spacing)]
            mesh = [max(1, int(round(e / settings.bspline_mesh_mm))) for e in extent]
            bspline = sitk.BSplineTransformInitializer(f_gray, mesh, order=3)
            if settings.bspline_iterations > 0:
                bshrink = tuple(max(1, min(s, min_size // 8)) for s in settings.bspline_shrink_factors)
                reg = _method(settings, f_mask, bshrink, settings.bspline_smoothing_sigmas_mm, fraction_scale)
                reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=settings.bspline_iterations,
                                         maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * settings.bspline_iterations,
                                         costFunctionConvergenceFactor=1e7)
                reg.SetMovingInitialTransform(linear)
                reg.SetInitialTransform(bspline, inPlace=True)
                _run(reg, f_gray, m_gray, "bspline")
            # moving initial ∘ optimised: the list's last transform is applied to a point first
            tx = sitk.CompositeTransform([linear, bspline])
            stages_run.append("bspline")
    except _RegistrationFailure as exc:
        raise InputError(_pair_name(fixed, moving), f"registration failed ({exc})") from None

    if tx.GetName() != "CompositeTransform":
        tx = tx.Downcast()
    registered = sitk.Resample(moving.itk, fixed.itk, tx, sitk.sitkLinear, 0.0)
    qc = _quality(f_gray, m_gray, f_mask_body, m_mask_body, tx, settings, 0.0, stages_run, init_mode)
    qc = dataclasses.replace(qc, seconds=time.perf_counter() - t0)
    if qc.suspect:
        log.warning("registration suspect: %s", "; ".join(qc.reasons))
    log.info("registered in %.1f s (%s), Dice %.3f, NCC %.3f", qc.seconds, "+".join(stages_run), qc.dice, qc.ncc)
    reference = sitk.Image(fixed.itk.GetSize(), sitk.sitkUInt8)
    reference.CopyInformation(fixed.itk)
    return Registration(transform=tx, registered=moving.with_itk(registered), qc=qc, fixed_reference=reference)
