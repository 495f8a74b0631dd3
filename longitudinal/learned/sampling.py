"""Training patches for the Siamese detector: balanced between changed and unchanged tissue.

A patch is the centre slice and its neighbours (3 x P x P) of both visits around a voxel, with the change truth
of the centre slice. Positives are centred near a truth voxel, either of a real labelled change or of a
synthetic change pasted on the fly (`synthetic.random_change`) into a 3D block around a random tissue voxel.
Negatives are unchanged voxels; a share of them are hard: tissue edges (where residual misalignment shows),
the borders of the field of view and of the body mask (where interpolation and masking differ), and - once the
training loop has mined them (`PatchSampler.mine`) - unchanged voxels the current model flags.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .pairs import PairArrays
from .synthetic import PasteSettings, random_change


@dataclass(frozen=True)
class SamplingSettings:
    patch: int = 64
    context: int = 1
    positive_fraction: float = 0.4
    synthetic_fraction: float = 0.6  # of positives (all of them when no training pair has real changes)
    hard_negative_fraction: float = 0.5  # of negatives
    offset: float = 0.3  # positives: the change lies up to this fraction of the patch from its centre
    paste: PasteSettings = PasteSettings()


@dataclass(frozen=True, eq=False)
class Prepped:
    """A pair on the model's working grid, in [0, 1] through the baseline's window, with its sampling lists.
    Volumes are (Z, Y, X); a 2D image is one slice (Z = 1)."""

    key: str
    # (Z, Y, X) gray or (1, Y, X, 3) RGB, in [0, 1]: what changes are pasted into; a patch's input channels (a
    # slice and its neighbours, or the RGB) are cut from them (`channels`), not kept three times over (a 1 mm
    # head's stacks took 160 MB a pair: 15 GB for the dev split)
    image_b: np.ndarray
    image_f: np.ndarray
    context: int
    window: tuple[float, float]  # intensities of 0 and 1 (pastes multiply intensities, not window units)
    mask: np.ndarray  # (Z, Y, X) bool
    truth: np.ndarray  # (Z, Y, X) bool
    spacing: tuple[float, float, float]
    rgb: bool
    tissue: np.ndarray  # (N, 3) voxel indices (int32): mask, away from real truth
    hard: np.ndarray  # (M, 3): tissue edges and borders, away from real truth
    dark: np.ndarray  # (L, 3): dark tissue next to bright (CSF next to brain): where atrophy is pasted
    changed: np.ndarray  # (K, 3): real truth voxels


def resample(array: np.ndarray, size: tuple[int, ...], nearest: bool = False) -> np.ndarray:
    """(*spatial[, channels]) -> size, linear (or nearest for masks), torch's interpolate (align_corners=False)."""
    if tuple(array.shape[:len(size)]) == tuple(size):
        return array
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    channels = array.ndim > len(size)
    t = t.movedim(-1, 0)[None] if channels else t[None, None]
    mode = "nearest" if nearest else ("bilinear" if len(size) == 2 else "trilinear")
    out = F.interpolate(t, size=tuple(size), mode=mode, **({} if nearest else {"align_corners": False}))[0]
    out = out.movedim(0, -1) if channels else out[0]
    return out.numpy()


def working_size(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def prepare_for_sampling(pair: PairArrays, target_spacing: tuple[float, ...], context: int = 1) -> Prepped:
    from .siamese import scale_to_unit, window_of

    spatial = pair.baseline.shape[:-1] if pair.rgb else pair.baseline.shape
    size = working_size(spatial, pair.spacing, target_spacing)
    b = resample(pair.baseline, size)
    f = resample(pair.followup, size)
    mask = resample(pair.mask.astype(np.float32), size, nearest=True) > 0.5
    truth = resample(pair.truth.astype(np.float32), size, nearest=True) > 0.5
    window = window_of(b, mask)
    vol = lambda a: a[None] if a.ndim == 2 else a  # noqa: E731  2D images as one slice
    mask3, truth3 = vol(mask), vol(truth)
    image = (lambda a: a[None]) if pair.rgb else vol  # (1, Y, X, 3) RGB
    image_b, image_f = image(scale_to_unit(b, window)), image(scale_to_unit(f, window))
    gray = image_b.mean(-1) if pair.rgb else image_b
    near_truth = ndimage.binary_dilation(truth3, iterations=3) if truth3.any() else truth3
    inside = mask3 & ~near_truth
    grad = np.sqrt(sum(ndimage.sobel(gray, axis=a) ** 2 for a in range(1, 3)))
    edges = inside & (grad > np.percentile(grad[mask3], 90)) if mask3.any() else inside
    border = mask3 ^ ndimage.binary_erosion(mask3, iterations=2)
    border[:, :2], border[:, -2:], border[:, :, :2], border[:, :, -2:] = True, True, True, True
    if border.shape[0] > 4:  # first and last slices: the field of view ends there (thick-slice follow-ups too)
        border[:2], border[-2:] = True, True
    hard = edges | (border & ~near_truth & ndimage.binary_dilation(mask3, iterations=3))
    if mask3.any():
        lo, hi = np.percentile(gray[mask3], (25, 60))
        dark = inside & (gray < lo) & (ndimage.maximum_filter(gray, size=(1, 5, 5)) > hi)
    else:
        dark = inside
    spacing3 = (1.0, *target_spacing) if len(target_spacing) == 2 else tuple(target_spacing)
    where = lambda a: np.argwhere(a).astype(np.int32)  # noqa: E731
    return Prepped(pair.key, image_b, image_f, context, window, mask3, truth3, spacing3, pair.rgb,
                   where(inside), where(hard), where(dark), where(truth3))


def channels(volume: np.ndarray, z: int, context: int, rgb: bool) -> np.ndarray:
    """The network's input channels of slice z, (3, Y, X): the slice and its `context` neighbours each side
    (edges repeated), or a 2D image's RGB. Training patches and `siamese.as_stack` (a whole volume) both use it."""
    if rgb:
        return np.moveaxis(volume[z], -1, 0)
    return volume[np.clip(np.arange(z - context, z + context + 1), 0, len(volume) - 1)]


def _crop(a: np.ndarray, lo: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop a (Z, [C,] Y, X) array (leading axes as given) at lo with zero padding outside."""
    out = np.zeros(shape, a.dtype)
    src, dst = [], []
    for l, n, full in zip((int(v) for v in lo), shape, a.shape):
        s0, s1 = max(l, 0), min(l + n, full)
        src.append(slice(s0, max(s0, s1)))
        dst.append(slice(s0 - l, s0 - l + max(0, s1 - s0)))
    out[tuple(dst)] = a[tuple(src)]
    return out


@dataclass(frozen=True, eq=False)
class Batch:
    baseline: torch.Tensor  # (B, 3, P, P)
    followup: torch.Tensor
    truth: torch.Tensor  # (B, 1, P, P) float
    mask: torch.Tensor  # (B, 1, P, P) bool


class PatchSampler:
    """Draws balanced batches from prepared pairs with a seeded generator."""

    def __init__(self, pairs: list[Prepped], settings: SamplingSettings, seed: int):
        self.pairs = pairs
        self.settings = settings
        self.rng = np.random.default_rng(seed)
        self.with_truth = [p for p in pairs if len(p.changed)]
        self.mined: dict[str, np.ndarray] = {}  # pair key -> (N, 3) unchanged voxels the model flagged

    def mine(self, key: str, voxels: np.ndarray) -> None:
        """Hard negatives found by running the model on a training pair (replaces that pair's earlier ones)."""
        shape = next(p.mask.shape for p in self.pairs if p.key == key)
        self.mined[key] = np.minimum(np.asarray(voxels, np.int64).reshape(-1, 3), np.array(shape) - 1)

    def _patch(self, pair: Prepped, centre: np.ndarray):
        """The patch of a real pair centred at voxel `centre` (zero outside the image)."""
        p = self.settings.patch
        z = int(centre[0])
        lo = np.array([int(centre[1]) - p // 2, int(centre[2]) - p // 2])
        b = _crop(channels(pair.image_b, z, pair.context, pair.rgb), np.r_[0, lo], (3, p, p))
        f = _crop(channels(pair.image_f, z, pair.context, pair.rgb), np.r_[0, lo], (3, p, p))
        return b, f, _crop(pair.truth[z], lo, (p, p)), _crop(pair.mask[z], lo, (p, p))

    def _synthetic(self, pair: Prepped):
        """A change pasted into a block of real anatomy around a tissue voxel; the patch is centred near it."""
        s = self.settings
        p, c = s.patch, s.context
        kind = s.paste.kinds[int(self.rng.integers(len(s.paste.kinds)))]
        voxels = pair.dark if kind == "atrophy" and len(pair.dark) else pair.tissue
        if not len(voxels):
            return None
        centre = voxels[int(self.rng.integers(len(voxels)))]
        reach = max(s.paste.diameter_mm[1] / 2 + s.paste.growth_mm[1], s.paste.atrophy_radius_mm[1])
        depth = 0 if pair.mask.shape[0] == 1 else c + int(np.ceil(reach / pair.spacing[0]))
        lo = np.array([centre[0] - depth, centre[1] - p, centre[2] - p])
        shape = (2 * depth + 1, 2 * p, 2 * p)
        extra = (3,) if pair.rgb else ()
        lo_w, hi_w = pair.window
        # paste into intensities (contrast is relative to tissue), back to [0, 1] after
        bb = lo_w + _crop(pair.image_b, np.r_[lo, [0] * len(extra)], shape + extra) * (hi_w - lo_w)
        bf = lo_w + _crop(pair.image_f, np.r_[lo, [0] * len(extra)], shape + extra) * (hi_w - lo_w)
        one_kind = PasteSettings(**{**s.paste.__dict__, "kinds": (kind,)})
        paste = random_change(bb, bf, _crop(pair.mask, lo, shape), pair.spacing, self.rng, one_kind,
                              rgb=pair.rgb, centre=tuple(centre - lo))
        unit_b = np.clip((paste.baseline - lo_w) / (hi_w - lo_w), 0, 1).astype(np.float32)
        unit_f = np.clip((paste.followup - lo_w) / (hi_w - lo_w), 0, 1).astype(np.float32)
        if pair.rgb:
            stack_b, stack_f = np.moveaxis(unit_b[0], -1, 0), np.moveaxis(unit_f[0], -1, 0)
        else:
            idx = np.clip(np.arange(depth - c, depth + c + 1), 0, shape[0] - 1)
            stack_b, stack_f = unit_b[idx], unit_f[idx]
        truth = _crop(pair.truth, lo, shape)[depth] | paste.truth[depth]
        if not paste.truth[depth].any():
            return None
        where = np.argwhere(paste.truth[depth])
        target = where[int(self.rng.integers(len(where)))]
        shift = (self.rng.uniform(-s.offset, s.offset, 2) * p).astype(int)
        y0, x0 = np.clip(target + shift, p // 2, 2 * p - p // 2) - p // 2
        window = (slice(y0, y0 + p), slice(x0, x0 + p))
        mask = _crop(pair.mask, lo, shape)[depth]
        return stack_b[(slice(None), *window)], stack_f[(slice(None), *window)], truth[window], mask[window]

    def _centre_near(self, voxel: np.ndarray) -> np.ndarray:
        shift = (self.rng.uniform(-self.settings.offset, self.settings.offset, 2) * self.settings.patch).astype(int)
        return np.array([voxel[0], voxel[1] + shift[0], voxel[2] + shift[1]])

    def sample(self, pair: Prepped | None = None, kind: str | None = None):
        """One patch (b, f, truth, mask) of a given kind ('synthetic', 'real', 'hard', 'tissue'), or drawn."""
        s = self.settings
        if kind is None:
            if self.rng.random() < s.positive_fraction:
                real_ok = bool(self.with_truth)
                kind = "synthetic" if not real_ok or self.rng.random() < s.synthetic_fraction else "real"
            else:
                kind = "hard" if self.rng.random() < s.hard_negative_fraction else "tissue"
        if pair is None:
            pool = self.with_truth if kind == "real" else self.pairs
            pair = pool[int(self.rng.integers(len(pool)))]
        if kind == "synthetic":
            for _ in range(5):
                out = self._synthetic(pair)
                if out is not None:
                    return out
            kind = "tissue"
        hard = pair.hard
        mined = self.mined.get(pair.key)
        if kind == "hard" and mined is not None and len(mined) and self.rng.random() < 0.5:
            hard = mined
        lists = {"real": pair.changed, "hard": hard, "tissue": pair.tissue}
        voxels = lists[kind] if len(lists[kind]) else pair.tissue if len(pair.tissue) else np.argwhere(pair.mask)
        voxel = voxels[int(self.rng.integers(len(voxels)))]
        return self._patch(pair, self._centre_near(voxel) if kind == "real" else voxel)

    def batch(self, size: int, augment: bool = True) -> Batch:
        items = [self.sample() for _ in range(size)]
        b, f, t, m = (np.stack(v) for v in zip(*items))
        if augment:  # flips and in-plane transposes: anatomy has no preferred side at patch scale
            for i in range(size):
                k = int(self.rng.integers(8))
                for arrs in (b, f, t, m):
                    arrs[i] = _dihedral(arrs[i], k).copy()
        return Batch(torch.from_numpy(np.ascontiguousarray(b, np.float32)),
                     torch.from_numpy(np.ascontiguousarray(f, np.float32)),
                     torch.from_numpy(t[:, None].astype(np.float32)), torch.from_numpy(m[:, None].astype(bool)))


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/transposes of the last two axes."""
    if k & 1:
        a = a[..., ::-1, :]
    if k & 2:
        a = a[..., :, ::-1]
    if k & 4:
        a = np.swapaxes(a, -1, -2)
    return a
