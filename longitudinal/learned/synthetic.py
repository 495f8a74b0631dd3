"""Synthetic changes pasted into pairs of real anatomy, with their exact truth.

Real labelled changes are few; stable pairs of real anatomy carry every nuisance (noise, residual shading,
misalignment) a detector must learn to ignore. Pasting changes into them gives positives with the real
background, made on the fly so no two epochs see the same lesion:

- new lesion: a random blob (thresholded smoothed noise inside a random ellipsoid, so not only ellipsoids),
  1-7 mm across, multiplying the follow-up by (1 + contrast), hypo- or hyperintense;
- growing lesion: one blob pasted into both visits with the same contrast (an unchanged lesion), a larger one
  in the follow-up: only the rim that grew is change;
- local atrophy: a small radial warp that widens a dark (CSF) region next to tissue by 1-2.5 mm.

Every paste changes only the voxels of its truth mask in the follow-up (voxels whose weight would fall below
`MIN_WEIGHT`, or whose warped value moves by less than `MIN_WARP_CHANGE` of the local range, are left as they
were and are not truth); a growing lesion also multiplies the baseline inside its `shared` core, by the same
factor in both visits (where it grew, the old core is truth too). Arrays are (z, y, x) or (y, x), gray or with a trailing RGB axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MIN_WEIGHT = 0.25  # lesion edge: voxels blended less than this stay untouched (and are not truth)
MIN_WARP_CHANGE = 0.1  # atrophy: fraction of the local intensity range a voxel must move by to be changed


@dataclass(frozen=True, eq=False)
class Paste:
    """A pair after a synthetic change, with the change's truth."""

    baseline: np.ndarray
    followup: np.ndarray
    truth: np.ndarray  # bool: the follow-up voxels changed relative to the baseline
    shared: np.ndarray  # bool: voxels changed identically in both visits (a growing lesion's old core)
    kind: str  # "new_lesion" | "growing_lesion" | "atrophy"


@dataclass(frozen=True)
class PasteSettings:
    diameter_mm: tuple[float, float] = (1.5, 7.0)  # new lesion, equivalent diameter range
    contrast: tuple[float, float] = (0.08, 0.6)  # |relative intensity change| range
    hyper_fraction: float = 0.35  # share of hyperintense lesions
    growth_mm: tuple[float, float] = (0.8, 2.5)  # growing lesion: radius added
    atrophy_mm: tuple[float, float] = (1.0, 2.5)  # local warp: largest displacement
    atrophy_radius_mm: tuple[float, float] = (4.0, 9.0)  # local warp: radius of the affected ball
    kinds: tuple[str, ...] = ("new_lesion", "new_lesion", "growing_lesion", "atrophy")  # drawn uniformly


def _grid(shape: tuple[int, ...], centre: np.ndarray, spacing: np.ndarray) -> list[np.ndarray]:
    return [(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)]


def blob_weight(shape: tuple[int, ...], centre, spacing, radius_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Blend weight in [0, 1] of a random blob about `radius_mm` in equivalent radius: a random ellipsoid
    (axes 0.6-1.4 x radius) whose surface is pushed in and out by smoothed noise, with a partial-volume edge."""
    spacing = np.asarray(spacing, float)
    centre = np.asarray(centre, float)
    axes = radius_mm * rng.uniform(0.6, 1.4, len(shape))
    axes *= radius_mm / np.prod(axes) ** (1.0 / len(shape))  # keep the equivalent radius
    rot = np.linalg.qr(rng.normal(size=(len(shape), len(shape))))[0]
    coords = np.stack(np.meshgrid(*_grid(shape, centre, spacing), indexing="ij"), -1)  # (..., ndim) in mm
    r = np.linalg.norm((coords @ rot) / axes, axis=-1)  # 1 on the ellipsoid
    sigma = np.maximum(0.5 * radius_mm / spacing, 0.5)
    bumps = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    bumps /= np.abs(bumps).max() + 1e-9
    r = r * (1.0 + 0.35 * bumps)  # irregular, lobulated outline
    edge = 0.6 / radius_mm  # ~0.6 mm partial-volume ramp
    return np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0)


def _apply(image: np.ndarray, weight: np.ndarray, contrast: float,
           within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """image x (1 + contrast x weight) where weight >= MIN_WEIGHT (and `within`); (new image, changed mask)."""
    changed = weight >= MIN_WEIGHT
    if within is not None:
        changed &= within
    factor = 1.0 + contrast * weight[changed]
    out = image.copy()
    out[changed] = image[changed] * (factor[:, None] if image.ndim > changed.ndim else factor)
    return out, changed


def _spatial(shape: tuple[int, ...], rgb: bool) -> tuple[int, ...]:
    return shape[:-1] if rgb else shape


def _signed_contrast(settings: PasteSettings, rng: np.random.Generator) -> float:
    c = rng.uniform(*settings.contrast)
    return float(c if rng.random() < settings.hyper_fraction else -c)


def paste_new_lesion(baseline: np.ndarray, followup: np.ndarray, centre, spacing, rng: np.random.Generator,
                     settings: PasteSettings = PasteSettings(), rgb: bool = False,
                     within: np.ndarray | None = None) -> Paste:
    """A new blob in the follow-up; only voxels `within` (the tissue mask) change."""
    radius = rng.uniform(*settings.diameter_mm) / 2
    weight = blob_weight(_spatial(followup.shape, rgb), centre, spacing, radius, rng)
    out, truth = _apply(followup, weight, _signed_contrast(settings, rng), within)
    return Paste(baseline, out, truth, np.zeros_like(truth), "new_lesion")


def paste_growing_lesion(baseline: np.ndarray, followup: np.ndarray, centre, spacing, rng: np.random.Generator,
                         settings: PasteSettings = PasteSettings(), rgb: bool = False,
                         within: np.ndarray | None = None) -> Paste:
    """The same lesion (same seed, same contrast) in both visits, its follow-up radius larger."""
    radius = rng.uniform(*settings.diameter_mm) / 2
    grown = radius + rng.uniform(*settings.growth_mm)
    contrast = _signed_contrast(settings, rng)
    seed = int(rng.integers(1 << 31))
    shape = _spatial(followup.shape, rgb)
    old = blob_weight(shape, centre, spacing, radius, np.random.default_rng(seed))
    new = np.maximum(blob_weight(shape, centre, spacing, grown, np.random.default_rng(seed)), old)
    base_out, core = _apply(baseline, old, contrast, within)
    # where the lesion did not grow (by at least half the edge cut), the follow-up keeps the baseline's factor
    weight_f = np.where(core & (new - old < MIN_WEIGHT / 2), old, new)
    follow_out, changed = _apply(followup, weight_f, contrast, within)
    shared = core & (weight_f == old)
    return Paste(base_out, follow_out, changed & ~shared, shared, "growing_lesion")


def paste_atrophy(baseline: np.ndarray, followup: np.ndarray, centre, spacing, rng: np.random.Generator,
                  settings: PasteSettings = PasteSettings(), rgb: bool = False,
                  within: np.ndarray | None = None) -> Paste:
    """Radial warp about `centre` (best placed in CSF next to tissue): the dark region widens."""
    spacing = np.asarray(spacing, float)
    shape = _spatial(followup.shape, rgb)
    radius = rng.uniform(*settings.atrophy_radius_mm)
    amplitude = rng.uniform(*settings.atrophy_mm)
    grids = np.meshgrid(*_grid(shape, np.asarray(centre, float), spacing), indexing="ij")
    dist = np.sqrt(sum(g ** 2 for g in grids)) + 1e-6
    # displacement grows from 0 at the centre to `amplitude` at radius/2 and falls to 0 at `radius`
    profile = amplitude * np.sin(np.pi * np.clip(dist / radius, 0, 1)) ** 2 * (dist < radius)
    # output voxel x samples the input at x - u(x) (u radial, outward): content moves outward
    coords = [np.arange(n)[tuple(slice(None) if a == i else None for a in range(len(shape)))] - profile * g / dist / s
              for i, (n, g, s) in enumerate(zip(shape, grids, spacing))]
    coords = [np.broadcast_to(c, shape) for c in coords]
    channels = [followup[..., k] for k in range(followup.shape[-1])] if rgb else [followup]
    warped = [ndimage.map_coordinates(ch, coords, order=1, mode="nearest").astype(followup.dtype) for ch in channels]
    local = [float(np.ptp(ch[dist < radius])) if (dist < radius).any() else 0.0 for ch in channels]
    moved = np.zeros(shape, bool)
    for ch, w, rng_k in zip(channels, warped, local):
        moved |= np.abs(w - ch) > MIN_WARP_CHANGE * max(rng_k, 1e-6)
    if within is not None:
        moved &= within
    out = followup.copy()
    if rgb:
        out[moved] = np.stack(warped, -1)[moved]
    else:
        out[moved] = warped[0][moved]
    return Paste(baseline, out, moved, np.zeros_like(moved), "atrophy")


PASTERS = {"new_lesion": paste_new_lesion, "growing_lesion": paste_growing_lesion, "atrophy": paste_atrophy}


def random_change(baseline: np.ndarray, followup: np.ndarray, mask: np.ndarray, spacing,
                  rng: np.random.Generator, settings: PasteSettings = PasteSettings(), rgb: bool = False,
                  centre=None) -> Paste:
    """A change of a random kind at `centre` (default: a random voxel of `mask`; atrophy: a dark voxel of the
    mask next to brighter tissue, where CSF would widen), changing voxels of `mask` only."""
    kind = settings.kinds[int(rng.integers(len(settings.kinds)))]
    if centre is None:
        centre = pick_centre(baseline, mask, kind, rng, rgb)
    return PASTERS[kind](baseline, followup, centre, spacing, rng, settings, rgb, np.asarray(mask, bool))


def pick_centre(baseline: np.ndarray, mask: np.ndarray, kind: str, rng: np.random.Generator,
                rgb: bool = False) -> tuple[int, ...]:
    gray = baseline.mean(-1) if rgb else baseline
    inside = np.asarray(mask, bool)
    if kind == "atrophy" and inside.any():
        lo = np.percentile(gray[inside], 25)
        dark = inside & (gray < lo) & (ndimage.maximum_filter(gray, size=5) > np.percentile(gray[inside], 60))
        if dark.any():
            inside = dark
    where = np.argwhere(inside) if inside.any() else np.argwhere(np.ones_like(inside))
    return tuple(int(v) for v in where[int(rng.integers(len(where)))])
