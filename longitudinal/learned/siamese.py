"""Siamese change detector: one pretrained encoder reads both visits, a light decoder says which voxels changed.

Input: 2.5D patches on the baseline grid, the three neighbouring slices of a voxel as the three input channels
of the ImageNet encoder (2D images: their RGB, or gray three times), both visits through ONE intensity window
taken from the baseline. The encoder (`backbones.EfficientNetLite`, ImageNet weights) is shared by the visits;
at each stage the two feature maps are fused (both maps, their difference and its magnitude, 1x1 conv), and a
U-Net-like decoder of MONAI `Convolution` blocks upsamples the fused maps, joined at full resolution by a small
branch on the centre slices (baseline, follow-up, difference: a 1-voxel lesion is lost at stride 2), to one
change logit per voxel.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from ..backbones import EfficientNetLite, make_backbone
from ..encoding import intensity_window, scale_to_unit
from ..errors import InputError


@dataclass(frozen=True)
class SiameseSettings:
    """Architecture: what a model file must match to be loaded."""

    encoder: str = "efficientnet-lite0"
    stages: tuple[int, ...] = (0, 1, 2)  # Lite blocks: stride 2, 4, 8 (16, 24, 40 channels)
    width: int = 16  # decoder channels (the decoder's full-resolution convs cost more than the encoder)
    fine_width: int = 8  # full-resolution branch channels
    context: int = 1  # slices on each side of the centre slice (2.5D: 3 channels)
    patch: int = 64  # training patch edge (voxels); inference runs on whole slices

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(int(s) for s in self.stages))
        if self.context != 1:
            raise ValueError("context must be 1: the 3 slices fill the encoder's 3 input channels")
        if self.patch % 32:
            raise ValueError(f"patch {self.patch} must be a multiple of 32")

    @property
    def in_channels(self) -> int:
        return 2 * self.context + 1


def _conv(dims: int, cin: int, cout: int, kernel: int = 3) -> Convolution:
    return Convolution(dims, cin, cout, kernel_size=kernel, act="relu", norm="batch")


class SiameseNet(nn.Module):
    """Shared backbone, fused stage maps, U-Net decoder to one logit per pixel. forward(b, f): (B, 3, H, W)
    each in [0, 1], H and W multiples of the deepest stride -> (B, 1, H, W) logits."""

    def __init__(self, settings: SiameseSettings = SiameseSettings(), pretrained: bool = True, seed: int = 0,
                 frozen_norm: bool = True):
        super().__init__()
        self.settings = settings
        # pretrained batch-norm statistics stay fixed (patch batches are small); a randomly initialised encoder
        # has none worth keeping, so its statistics learn like the decoder's
        self.frozen_norm = frozen_norm
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if pretrained:
                self.backbone = make_backbone(settings.encoder, settings.stages)
            else:  # weights come from a model file: skip reading the packaged ones
                self.backbone = EfficientNetLite(settings.encoder, settings.stages)
            w = settings.width
            self.fuse = nn.ModuleList(_conv(2, 4 * c, w, kernel=1) for c in self.backbone.stage_channels)
            self.up = nn.ModuleList(_conv(2, 2 * w, w) for _ in self.backbone.stage_channels[:-1])
            self.fine = _conv(2, 3, settings.fine_width)
            # full resolution: 1x1 convs only (a 3x3 conv there costs more than the whole encoder)
            self.head = nn.Sequential(_conv(2, w + settings.fine_width, w, kernel=1),
                                      Convolution(2, w, 1, kernel_size=1, conv_only=True))
            # start from "nothing changed" (1 % prior): at 50 % the first steps only unlearn false alarms
            nn.init.constant_(self.head[-1].conv.bias, float(np.log(0.01 / 0.99)))

    @property
    def multiple(self) -> int:
        return self.backbone.pad_multiple

    def forward(self, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        n = b.shape[0]
        maps = self.backbone(self.backbone.normalise(torch.cat([b, f])))
        fused = []
        for m, fuse in zip(maps, self.fuse):
            mb, mf = m[:n], m[n:]
            fused.append(fuse(torch.cat([mb, mf, mf - mb, (mf - mb).abs()], 1)))
        x = fused[-1]
        for skip, up in zip(reversed(fused[:-1]), reversed(self.up)):
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], 1))
        x = F.interpolate(x, size=b.shape[2:], mode="bilinear", align_corners=False)
        c = self.settings.context
        centre_b, centre_f = b[:, c:c + 1], f[:, c:c + 1]
        fine = self.fine(torch.cat([centre_b, centre_f, centre_f - centre_b], 1))
        return self.head(torch.cat([x, fine], 1))

    def parameter_groups(self, lr: float, encoder_factor: float = 0.1, decay: float = 0.5) -> list[dict]:
        """Decoder at `lr`; the encoder's deepest stage at lr x encoder_factor, each earlier stage (and the
        stem) `decay` times less: generic early filters move least."""
        groups = [{"params": [p for n, p in self.named_parameters() if not n.startswith("backbone.")], "lr": lr}]
        stages = self.backbone.stage_parameters()
        for depth, params in enumerate(reversed(stages)):
            groups.append({"params": params, "lr": lr * encoder_factor * decay ** depth})
        return groups

    def train(self, mode: bool = True) -> "SiameseNet":
        """Batch-norm statistics of the encoder stay frozen when `frozen_norm` (pretrained: patch batches are
        small); the rest trains."""
        super().train(mode)
        if self.frozen_norm:
            self.backbone.eval()
        return self


# ------------------------------------------------------------------------------------------------ inputs


def window_of(baseline: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """One intensity window for both visits, from the baseline inside its mask (as the encoder does)."""
    return intensity_window(baseline, mask if mask.any() else None)


def as_stack(volume: np.ndarray, window: tuple[float, float], rgb: bool, context: int = 1) -> np.ndarray:
    """(n, 3, h, w) float32 in [0, 1]: per slice, the slice and its neighbours (edges repeated), or the 2D
    image's RGB (gray: three times)."""
    from .sampling import channels

    unit = scale_to_unit(volume, window)
    unit = unit[None] if rgb or unit.ndim == 2 else unit  # one slice: (1, Y, X[, 3])
    return np.ascontiguousarray(np.stack([channels(unit, z, context, rgb) for z in range(len(unit))]))


# ------------------------------------------------------------------------------------------------ inference


@dataclass(frozen=True, eq=False)
class ChangeProbability:
    """Per-voxel change probability on the baseline grid (0 outside the mask) and what it cost."""

    probability: np.ndarray  # float32, baseline grid (numpy order)
    seconds: float
    slices: int = 0  # slices run through the network
    info: dict = field(default_factory=dict)


def predict_volume(net: SiameseNet, baseline: np.ndarray, followup: np.ndarray, mask: np.ndarray, rgb: bool,
                   batch_size: int = 8, threads: int = 1) -> ChangeProbability:
    """Change probability of a registered, harmonised pair: only slices that hold mask voxels, cropped to the
    mask's in-plane bounding box (padded to the encoder's stride), run through the network."""
    clock = time.perf_counter()
    mask = np.asarray(mask, bool)
    window = window_of(baseline, mask)
    sb = as_stack(baseline, window, rgb, net.settings.context)
    sf = as_stack(followup, window, rgb, net.settings.context)
    slice_mask = mask[None] if mask.ndim == 2 else mask
    out = np.zeros(slice_mask.shape, np.float32)
    rows = np.flatnonzero(slice_mask.any(axis=(1, 2)))
    if rows.size == 0:
        return ChangeProbability(out.reshape(mask.shape), time.perf_counter() - clock)
    ys, xs = np.flatnonzero(slice_mask.any(axis=(0, 2))), np.flatnonzero(slice_mask.any(axis=(0, 1)))
    m = net.multiple
    y0, x0 = ys[0], xs[0]
    h, w = ys[-1] + 1 - y0, xs[-1] + 1 - x0
    hp, wp = -(-h // m) * m, -(-w // m) * m
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    was_training = net.training
    device = next(net.parameters()).device  # a GPU when the model was trained or moved there
    net.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                idx = rows[start:start + batch_size]
                tb = torch.from_numpy(sb[idx][:, :, y0:y0 + h, x0:x0 + w])
                tf = torch.from_numpy(sf[idx][:, :, y0:y0 + h, x0:x0 + w])
                pad = (0, wp - w, 0, hp - h)
                tb, tf = F.pad(tb, pad).to(device), F.pad(tf, pad).to(device)
                prob = torch.sigmoid(net(tb, tf))[:, 0, :h, :w].cpu().numpy()
                out[idx, y0:y0 + h, x0:x0 + w] = prob
    finally:
        torch.set_num_threads(before)
        net.train(was_training)
    out[~slice_mask] = 0.0
    return ChangeProbability(out.reshape(mask.shape), time.perf_counter() - clock, int(len(rows)),
                             {"window": list(window), "settings": asdict(net.settings)})


# ------------------------------------------------------------------------------------------------ model file

MODEL_FORMAT = "longitudinal.SiameseChangeDetector"


@dataclass(eq=False)
class SiameseModel:
    """A trained Siamese detector: the network, the grid it works on and its card."""

    net: SiameseNet
    spacing: tuple[float, ...]  # mm per voxel of the working grid, numpy order (z, y, x) or (y, x)
    rgb: bool  # trained on RGB 2D images (else gray volumes or images)
    card: dict

    def operating_threshold(self, false_findings_per_pair: float) -> float:
        """The lowest probability at which the held-back pairs of its training (the card's lesion figures by
        threshold) had at most `false_findings_per_pair`: where its voxels count as changed tissue. A card
        without them (or where none qualifies): the highest threshold it lists, else 0.5."""
        by = (self.card.get("metrics") or {}).get("lesion_by_threshold") or {}
        rows = sorted((float(t), v.get("false_positive_findings_per_pair", math.inf)) for t, v in by.items())
        ok = [t for t, fp in rows if fp <= false_findings_per_pair]
        return ok[0] if ok else (rows[-1][0] if rows else 0.5)

    def save(self, path, card: dict | None = None) -> None:
        """Model file: every tensor flattened into one array per dtype plus the card (modelfile: no pickle)."""
        from .. import modelfile

        if card is not None:
            self.card = card
        index, floats, ints = [], [], []
        for name, t in self.net.state_dict().items():
            t = t.detach().cpu()
            bucket = floats if t.is_floating_point() else ints
            offset = sum(a.size for a in bucket)
            bucket.append(t.numpy().astype(np.float32 if t.is_floating_point() else np.int64).ravel())
            index.append([name, "float32" if t.is_floating_point() else "int64", list(t.shape), offset])
        meta = {"card": self.card, "settings": asdict(self.net.settings), "spacing": list(self.spacing),
                "rgb": self.rgb, "tensors": index}
        arrays = {"float32": np.concatenate(floats) if floats else np.zeros(0, np.float32),
                  "int64": np.concatenate(ints) if ints else np.zeros(0, np.int64)}
        modelfile.save(path, MODEL_FORMAT, meta, arrays)

    @classmethod
    def load(cls, path) -> "SiameseModel":
        from pathlib import Path

        from .. import modelfile

        meta, arrays = modelfile.load(path, MODEL_FORMAT)
        try:
            settings = SiameseSettings(**meta["settings"])
            net = SiameseNet(settings, pretrained=False)
            state = {}
            for name, dtype, shape, offset in meta["tensors"]:
                flat = arrays[dtype]
                n = int(np.prod(shape)) if shape else 1
                if offset + n > flat.size:
                    raise ValueError(f"tensor {name} runs past the end of its array")
                state[name] = torch.from_numpy(flat[offset:offset + n].reshape(shape).copy())
            net.load_state_dict(state, strict=True)
            spacing, rgb, card = tuple(float(v) for v in meta["spacing"]), bool(meta["rgb"]), dict(meta["card"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(Path(path), f"Siamese model file does not fit this version: {message}") from None
        return cls(net.eval(), spacing, rgb, card)


def change_probability(model: SiameseModel, prepared, batch_size: int = 8, threads: int = 1) -> ChangeProbability:
    """Per-voxel change probability of a prepared pair (`compare.Prepared`) on its baseline grid, float32,
    0 outside the mask; `.seconds` is its runtime."""
    base_img, follow_img = prepared.baseline_harmonised, prepared.followup_harmonised
    if base_img.is_rgb != model.rgb:
        raise InputError(None, f"the Siamese model was trained on {'RGB' if model.rgb else 'gray'} images; this pair "
                               f"is {'RGB' if base_img.is_rgb else 'gray'}")
    return probability_of_arrays(model, base_img.array.astype(np.float32), follow_img.array.astype(np.float32),
                                 np.asarray(prepared.mask, bool), tuple(reversed(prepared.baseline.spacing)),
                                 batch_size, threads)


def probability_of_arrays(model: SiameseModel, baseline: np.ndarray, followup: np.ndarray, mask: np.ndarray,
                          spacing: tuple[float, ...], batch_size: int = 8, threads: int = 1) -> ChangeProbability:
    """`change_probability` of arrays on one grid (numpy order; `spacing` in mm, same order).

    The mask's bounding box is resampled to the model's working spacing (linear; the mask nearest), run, and
    the probability resampled back: a model trained at 1.5 mm sees lesions at the scale it learned."""
    from .sampling import resample, working_size

    clock = time.perf_counter()
    if len(spacing) != len(model.spacing):
        raise InputError(None, f"the Siamese model works on {len(model.spacing)}D images, this pair is {len(spacing)}D")
    out = np.zeros(mask.shape, np.float32)
    if not mask.any():
        return ChangeProbability(out, time.perf_counter() - clock)
    # crop to the mask's bounding box first: resampling and the network then skip the background
    box = tuple(slice(int(w.min()), int(w.max()) + 1) for w in np.nonzero(mask))
    crop_shape = tuple(s.stop - s.start for s in box)
    size = working_size(crop_shape, spacing, model.spacing)
    bc, fc = resample(baseline[box], size), resample(followup[box], size)
    mc = resample(mask[box].astype(np.float32), size, nearest=True) > 0.5
    result = predict_volume(model.net, bc, fc, mc, model.rgb, batch_size, threads)
    prob = resample(result.probability, crop_shape)
    out[box] = np.where(mask[box], np.clip(prob, 0.0, 1.0), 0.0)
    return ChangeProbability(out, time.perf_counter() - clock, result.slices,
                             {**result.info, "working_shape": list(size)})
