"""Intensity harmonisation between two visits, and resolution matching.

Harmonisation runs after registration, so both images share the baseline grid and one mask (`masks`): the
region both visits imaged, where a histogram or a smooth correction says something about tissue.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.stats import median_abs_deviation

from .errors import InputError
from .io import Image
from .settings import check, choices, require
from .masks import foreground_mask, luminance, mask_array

log = logging.getLogger(__name__)

Harmonisation = Literal["histogram", "zscore", "none"]
HARMONISATIONS = choices(Harmonisation)
LOCAL_WORK_VOXELS = 2_000_000  # the residual curve and shading of larger images are fitted on a shrunk copy


@dataclass(frozen=True)
class PreprocessingSettings:
    """How masks are made and how the two visits' intensities are made comparable."""

    n4: bool = False  # N4 bias-field correction (MR); off for CT and photographs
    n4_shrink: int = 4  # N4 is fitted on an image shrunk this much, then applied at full size
    n4_iterations: tuple[int, ...] = (50, 50, 30)  # per fitting level
    harmonisation: Harmonisation = "histogram"
    histogram_match_points: int = 32  # quantiles matched between the tails
    histogram_tail_pct: float = 0.5  # percent of each tail left out of the match (new lesions live there)
    # After histogram matching, what still differs smoothly between the visits is divided out of the follow-up:
    # a residual intensity curve (scanner gamma, contrast drift: one value per intensity bin) and a residual
    # field (coil shading that N4 left or put: a Gaussian of this width in mm). 0 turns it off.
    local_correction_mm: float = 8.0
    curve_bins: int = 32
    # Give both visits the coarser of their resolutions (a follow-up with 3 mm slices against a 1.5 mm baseline
    # otherwise differs at every edge across its slices), and the same interpolation.
    match_resolution: bool = True
    ct_window: tuple[float, float] = (-160.0, 240.0)  # HU; soft tissue (level 40, width 400)
    ct: bool | None = None  # CT handling (window, no matching); None: when either image's modality is CT
    # ITK threads for this stage, whatever the machine or `batch --jobs`: N4 sums per-thread parts of its field,
    # so another count gives other bytes out
    threads: int = 2

    def __post_init__(self) -> None:
        check(self)
        require(self.ct_window[0] < self.ct_window[1], "ct_window", f"must be (low, high) with low < high, not {self.ct_window}")
        require(self.n4_shrink >= 1, "n4_shrink", "must be >= 1")
        require(bool(self.n4_iterations), "n4_iterations", "must not be empty")
        require(self.local_correction_mm >= 0, "local_correction_mm", "must be >= 0")
        require(self.curve_bins >= 0, "curve_bins", "must be >= 0")
        require(self.threads >= 1, "threads", "must be >= 1")


def _name(image: Image) -> str | None:
    return ", ".join(image.meta.sources) if image.meta.sources else None


# --------------------------------------------------------------------------- N4


def n4_correct(image: Image, mask: sitk.Image | None = None, settings: PreprocessingSettings = PreprocessingSettings()) -> Image:
    """Remove a smooth multiplicative bias field (MR coil shading) that differs between visits.

    N4 is fitted on a shrunk copy (the field is smooth, so this loses nothing and is much
    faster), then the log field is evaluated on the full-resolution grid and divided out.
    """
    if image.is_rgb:
        raise InputError(_name(image), "N4 bias-field correction needs a scalar (grayscale) image, not RGB")
    full = sitk.Cast(image.itk, sitk.sitkFloat32)
    if mask is None:
        mask = foreground_mask(full)
    arr = sitk.GetArrayViewFromImage(full)
    # N4 works on log intensities: shift to strictly positive values
    offset = 0.0
    lo = float(arr.min())
    if lo <= 0:
        offset = 1.0 - lo
    positive = full + offset if offset else full
    shrink = [settings.n4_shrink if s >= 4 * settings.n4_shrink else 1 for s in full.GetSize()]
    small = sitk.Shrink(positive, shrink)
    small_mask = sitk.Shrink(sitk.Cast(mask, sitk.sitkUInt8), shrink)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(settings.n4_iterations))
    corrector.Execute(small, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(positive)
    corrected = positive / sitk.Exp(log_bias)
    if offset:
        corrected = corrected - offset
    return image.with_itk(sitk.Cast(corrected, sitk.sitkFloat32))


# --------------------------------------------------------------------------- harmonisation


def _is_ct(image: Image) -> bool:
    return (image.meta.modality or "").upper() == "CT"


def _ct_window(itk: sitk.Image, window: tuple[float, float]) -> sitk.Image:
    lo, hi = window
    clipped = sitk.Clamp(sitk.Cast(itk, sitk.sitkFloat32), sitk.sitkFloat32, lo, hi)
    return (clipped - lo) / (hi - lo)


def _masked_values(itk: sitk.Image, mask: sitk.Image) -> np.ndarray:
    return sitk.GetArrayViewFromImage(itk)[sitk.GetArrayViewFromImage(mask) > 0].astype(np.float32)


def _histogram_match(source: sitk.Image, reference: sitk.Image, mask: sitk.Image, settings: PreprocessingSettings) -> sitk.Image:
    """Quantile matching inside the mask, between the `histogram_tail_pct` and 100 - that percentiles; beyond
    them the end segments extend linearly.

    The tails are left out on purpose: a new bright lesion in white matter IS the follow-up's brightest tissue, and
    a match that took the extremes (ITK's HistogramMatching maps the maximum onto the maximum) would map it onto
    the baseline's brightest white matter and erase the very change sought.
    """
    src = _masked_values(source, mask).astype(np.float64)
    ref = _masked_values(reference, mask).astype(np.float64)
    q = np.linspace(settings.histogram_tail_pct, 100.0 - settings.histogram_tail_pct,
                    settings.histogram_match_points)
    xs, ys = np.percentile(src, q), np.percentile(ref, q)
    xs, keep = np.unique(xs, return_index=True)  # flat stretches of the source: one point each
    ys = ys[keep]
    full = sitk.GetArrayFromImage(source).astype(np.float64)
    mapped = np.interp(full, xs, ys)
    if xs.size >= 2:
        lo_slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        hi_slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        below, above = full < xs[0], full > xs[-1]
        mapped[below] = ys[0] + lo_slope * (full[below] - xs[0])
        mapped[above] = ys[-1] + hi_slope * (full[above] - xs[-1])
    out = sitk.GetImageFromArray(mapped.astype(np.float32))
    out.CopyInformation(source)
    return out


def masked_smooth(values: np.ndarray, inside: np.ndarray, sigma) -> np.ndarray:
    """Gaussian mean over the foreground only (normalised convolution), so the background does not leak in."""
    w = inside.astype(np.float32)
    num = ndimage.gaussian_filter(values * w, sigma)
    den = ndimage.gaussian_filter(w, sigma)
    return num / np.maximum(den, 1e-3)


def _binned_median(x: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Medians of y in equally populated bins of x: a robust curve y(x) (empty where too few samples)."""
    edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, bins + 1)))
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    xs, ys = [], []
    for k in range(len(edges) - 1):
        sel = which == k
        if sel.sum() >= 20:
            xs.append(float(np.median(x[sel])))
            ys.append(float(np.median(y[sel])))
    return np.asarray(xs), np.asarray(ys)


def local_correction(followup: sitk.Image, baseline: sitk.Image, mask: sitk.Image,
                     settings: PreprocessingSettings = PreprocessingSettings(), iterations: int = 3) -> sitk.Image:
    """Divide out of the follow-up what smoothly differs from the baseline after global matching.

    The two visits' log ratio is modelled as a function of intensity (a residual intensity curve: one global
    histogram match cannot undo a gamma change under a bias field) plus a smooth field of the given width,
    fitted alternately with robust statistics, with voxels that differ by more than 3 robust SDs (a real
    lesion) left out of the fit. What is left is change, noise and misalignment. Both images on one grid."""
    inside = mask_array(mask)
    b = sitk.GetArrayFromImage(baseline).astype(np.float32)
    f = sitk.GetArrayFromImage(followup).astype(np.float32)
    if inside.sum() < 100:
        return sitk.Cast(followup, sitk.sitkFloat32)
    spacing = np.asarray(baseline.GetSpacing(), float)[::-1]
    floor = max(float(np.percentile(np.abs(b[inside]), 1)), float(np.abs(b[inside]).max()) * 1e-3, 1e-6)
    lb, lf = np.log(np.maximum(b, floor)), np.log(np.maximum(f, floor))
    sigma = 1.0 / spacing  # 1 mm: the curve is read off intensities, not off single noisy voxels
    sb, sf = ndimage.gaussian_filter(lb, sigma), ndimage.gaussian_filter(lf, sigma)
    level, ratio = 0.5 * (sb + sf), sf - sb
    # the curve and the field are smooth: large images are fitted on every k-th voxel (a 1 mm brain on a 2 mm
    # lattice). Sampled, not averaged: an average across a tissue border would bend the curve.
    k = max(1, math.ceil((ratio.size / LOCAL_WORK_VOXELS) ** (1.0 / ratio.ndim)))
    coarsest = max(1, int(settings.local_correction_mm / (4.0 * float(spacing.max()))))  # >= 4 samples per SD
    # a picture's field is wide (48 px): its Gaussian, not its pixel count, is the cost (1.7 of a fundus pair's
    # 1.8 s at full resolution), so 2D takes the coarsest lattice that still holds 4 samples per SD
    k = coarsest if ratio.ndim == 2 else min(k, coarsest)
    lattice = (slice(None, None, k),) * ratio.ndim
    level_w, ratio_w, inside_w = level[lattice], ratio[lattice], inside[lattice]
    xs = ys = np.zeros(0)
    curve = np.zeros_like(ratio_w)
    field = np.zeros_like(ratio_w)
    use = inside_w.copy()
    for _ in range(iterations):
        if settings.curve_bins > 1:
            xs, ys = _binned_median(level_w[use], (ratio_w - field)[use], settings.curve_bins)
            curve = np.interp(level_w, xs, ys).astype(np.float32) if len(xs) >= 2 else np.zeros_like(ratio_w)
        field = masked_smooth(np.where(use, ratio_w - curve, 0.0).astype(np.float32), use,
                              settings.local_correction_mm / (spacing * k))
        residual = (ratio_w - curve - field)[inside_w]
        spread = float(median_abs_deviation(residual, scale="normal")) or 1.0
        use = inside_w & (np.abs(ratio_w - curve - field) <= 3.0 * spread)
    if k > 1:
        curve = np.interp(level, xs, ys).astype(np.float32) if len(xs) >= 2 else np.zeros_like(ratio)
        field = ndimage.zoom(field, [n / m for n, m in zip(ratio.shape, field.shape)], order=1, mode="nearest")
    correction = np.where(inside, curve + field, 0.0)
    out = sitk.GetImageFromArray((f * np.exp(-correction)).astype(np.float32))
    out.CopyInformation(followup)
    return out


def match_resolution(baseline: Image, followup: Image, registration) -> tuple[Image, Image]:
    """Both visits at the coarser of their two resolutions, on the baseline grid: (baseline, registered follow-up).

    Along each axis the finer visit is blurred by a Gaussian of variance (w_coarse^2 - w_fine^2) / 12, the
    difference of the two slice profiles (boxes of width w), and the baseline is passed through the follow-up's
    grid and back, so it has been interpolated as the registered follow-up was."""
    fixed, moving = baseline.itk, followup.itk
    dim = fixed.GetDimension()
    jac = _jacobian(registration.transform, fixed)  # fixed physical -> moving physical
    d_f = np.array(fixed.GetDirection()).reshape(dim, dim)
    d_m = np.array(moving.GetDirection()).reshape(dim, dim)
    sp_f, sp_m = np.array(fixed.GetSpacing()), np.array(moving.GetSpacing())
    # extent of one voxel of each visit along the other's axes
    m_in_f = np.abs(d_f.T @ np.linalg.inv(jac) @ d_m) @ sp_m
    f_in_m = np.abs(d_m.T @ jac @ d_f) @ sp_f
    b_sigma = np.sqrt(np.maximum(m_in_f ** 2 - sp_f ** 2, 0.0) / 12.0)
    m_sigma = np.sqrt(np.maximum(f_in_m ** 2 - sp_m ** 2, 0.0) / 12.0)
    registered = registration.registered
    if m_sigma.max() > 0.05 * sp_m.min():
        registered = registration.to_fixed(followup.with_itk(_blur(moving, m_sigma)))
    base = _blur(fixed, b_sigma) if b_sigma.max() > 0.05 * sp_f.min() else fixed
    there = registration.to_moving(base, moving)
    back = registration.to_fixed(there)
    # beyond the follow-up's field of view the round trip has nothing to bring back: keep the (blurred) baseline
    ones = sitk.Cast(luminance(fixed) * 0 + 1, sitk.sitkFloat32)
    back = _where(registration.to_fixed(registration.to_moving(ones, moving)) > 0.999, back, base)
    log.debug("resolution matched: baseline blurred %s mm, follow-up %s mm", np.round(b_sigma, 2), np.round(m_sigma, 2))
    return baseline.with_itk(back), registered


def _where(condition: sitk.Image, a: sitk.Image, b: sitk.Image) -> sitk.Image:
    c = sitk.GetArrayViewFromImage(condition).astype(bool)
    av, bv = sitk.GetArrayFromImage(a), sitk.GetArrayViewFromImage(b)
    if av.ndim > c.ndim:
        c = c[..., None]
    out = sitk.GetImageFromArray(np.where(c, av, bv).astype(np.float32), isVector=a.GetNumberOfComponentsPerPixel() > 1)
    out.CopyInformation(a)
    return out


def _blur(itk: sitk.Image, sigma_mm: np.ndarray) -> sitk.Image:
    sigma = [float(max(s, 1e-3)) for s in sigma_mm]
    return _per_channel(lambda x: sitk.SmoothingRecursiveGaussian(x, sigma), itk)


def _jacobian(transform: sitk.Transform, reference: sitk.Image) -> np.ndarray:
    """Linear part of a transform at the centre of a grid (central differences, 1 mm), any transform kind."""
    dim = reference.GetDimension()
    centre = np.array(reference.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2.0 for s in reference.GetSize()]))
    jac = np.zeros((dim, dim))
    for k in range(dim):
        step = np.zeros(dim)
        step[k] = 1.0
        jac[:, k] = (np.array(transform.TransformPoint((centre + step).tolist()))
                     - np.array(transform.TransformPoint((centre - step).tolist()))) / 2.0
    return jac


def _zscore(itk: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """Robust z-score: (x - median) / IQR inside the mask, insensitive to a growing lesion's tail."""
    vals = _masked_values(itk, mask)
    q25, med, q75 = np.percentile(vals, [25, 50, 75])
    iqr = float(q75 - q25) or 1.0
    return (sitk.Cast(itk, sitk.sitkFloat32) - float(med)) / iqr


def _per_channel(fn, *images: sitk.Image) -> sitk.Image:
    """Apply a scalar->scalar function channel by channel so RGB stays RGB."""
    n = images[0].GetNumberOfComponentsPerPixel()
    if n == 1:
        return fn(*[sitk.Cast(i, sitk.sitkFloat32) for i in images])
    outs = [fn(*[sitk.Cast(sitk.VectorIndexSelectionCast(i, c), sitk.sitkFloat32) for i in images]) for c in range(n)]
    return sitk.Compose(outs)


def harmonise(
    baseline: Image,
    registered_followup: Image,
    mask: sitk.Image | None = None,
    settings: PreprocessingSettings = PreprocessingSettings(),
) -> tuple[Image, Image]:
    """Make the two visits' intensities comparable inside the body; returns float32 (baseline, follow-up).

    CT keeps Hounsfield units, so both visits only get the same window (clip, scale to 0..1);
    MR/photographs get optional N4, then the follow-up's histogram matched to the baseline's
    (or both robustly z-scored). The follow-up must already be on the baseline's grid.
    """
    b, f = baseline.itk, registered_followup.itk
    if (
        b.GetSize() != f.GetSize()
        or not np.allclose(b.GetSpacing(), f.GetSpacing(), atol=1e-4)
        or not np.allclose(b.GetOrigin(), f.GetOrigin(), atol=1e-3)
        or not np.allclose(b.GetDirection(), f.GetDirection(), atol=1e-4)
    ):
        raise InputError(_name(registered_followup), "follow-up is not on the baseline grid: register it first")
    if b.GetNumberOfComponentsPerPixel() != f.GetNumberOfComponentsPerPixel():
        raise InputError(_name(registered_followup), "baseline and follow-up have different numbers of channels")
    if mask is None:
        mask = foreground_mask(baseline.itk)
    else:
        if mask.GetSize() != b.GetSize():
            raise InputError(None, f"mask size {mask.GetSize()} differs from the baseline grid {b.GetSize()}")
        mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
        mask.CopyInformation(b)
    if not mask_array(mask).any():
        raise InputError(_name(baseline), "foreground mask is empty: cannot harmonise intensities")

    is_ct = settings.ct if settings.ct is not None else (_is_ct(baseline) or _is_ct(registered_followup))
    if is_ct:
        w = settings.ct_window
        return (
            baseline.with_itk(_ct_window(b, w)),
            registered_followup.with_itk(_ct_window(f, w)),
        )

    if settings.n4:
        # the two fits at once: each runs in ITK (outside the GIL) on the stage's fixed thread count, so the bytes
        # out are those of one after the other
        with ThreadPoolExecutor(max_workers=2) as pool:
            baseline, registered_followup = pool.map(lambda image: n4_correct(image, mask, settings),
                                                     (baseline, registered_followup))
        b, f = baseline.itk, registered_followup.itk

    if settings.harmonisation == "histogram":
        f_out = _per_channel(lambda src, ref: _histogram_match(src, ref, mask, settings), f, b)
        b_out = _per_channel(lambda x: x, b)
    elif settings.harmonisation == "zscore":
        b_out = _per_channel(lambda x: _zscore(x, mask), b)
        f_out = _per_channel(lambda x: _zscore(x, mask), f)
    else:
        b_out, f_out = _per_channel(lambda x: x, b), _per_channel(lambda x: x, f)
    if settings.local_correction_mm > 0 and settings.harmonisation != "zscore":
        f_out = _per_channel(lambda src, ref: local_correction(src, ref, mask, settings), f_out, b_out)
    log.debug("harmonised intensities (%s, n4=%s)", settings.harmonisation, settings.n4)
    return baseline.with_itk(b_out), registered_followup.with_itk(f_out)
