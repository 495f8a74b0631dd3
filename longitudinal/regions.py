"""Regions of the baseline grid that changes are scored over: a grid of cubes, a label map, or components."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from .errors import InputError


@dataclass(frozen=True)
class RegionSettings:
    kind: Literal["grid", "labels"] = "grid"
    size_mm: float = 8.0  # cube edge for the grid
    overlap: float = 0.5  # fraction of a cube that its neighbour shares, so no lesion is cut in two
    min_mask_fraction: float = 0.3  # a cube needs this much foreground to count
    label_map: Path | None = None  # NIfTI in the baseline's physical space (atlas or segmentation)
    label_names: tuple[str, ...] = ()  # names for label values 1, 2, ...


@dataclass(frozen=True)
class Region:
    """Voxels of the baseline grid: those inside `bbox` that are in the mask (and carry `value` in a label map)."""

    id: int
    label: str
    bbox: tuple[tuple[int, ...], tuple[int, ...]]  # (x, y[, z]) index, lo inclusive, hi exclusive
    value: int | None  # label value inside the bbox; None = every foreground voxel of the bbox
    centre_mm: tuple[float, ...]
    volume_mm3: float

    def slices(self) -> tuple[slice, ...]:
        """Numpy slices (z, y, x order, as sitk.GetArrayFromImage) of the bbox."""
        lo, hi = self.bbox
        return tuple(slice(a, b) for a, b in zip(reversed(lo), reversed(hi)))

    def members(self, mask: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Boolean membership inside the bbox (numpy order)."""
        s = self.slices()
        inside = mask[s].astype(bool)
        if self.value is not None and labels is not None:
            inside &= labels[s] == self.value
        return inside


def make_regions(reference: sitk.Image, mask: np.ndarray, settings: RegionSettings) -> tuple[list[Region], np.ndarray | None]:
    """Regions over `reference`'s grid and, for label maps, the label array they refer to."""
    if settings.kind == "labels":
        if settings.label_map is None:
            raise InputError(None, "regions.kind = 'labels' needs regions.label_map (a NIfTI label image)")
        labels = _label_array(reference, Path(settings.label_map))
        return _label_regions(reference, mask, labels, settings.label_names), labels
    return grid_regions(reference, mask, settings), None


def grid_regions(reference: sitk.Image, mask: np.ndarray, settings: RegionSettings) -> list[Region]:
    spacing = np.array(reference.GetSpacing())
    size = np.array(reference.GetSize())
    edge = np.maximum(1, np.round(settings.size_mm / spacing)).astype(int)
    step = np.maximum(1, np.ceil(edge * (1 - settings.overlap))).astype(int)
    voxel_mm3 = float(np.prod(spacing))
    starts = [np.arange(0, max(1, n - e) + 1, s) for n, e, s in zip(size, edge, step)]
    lo = np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, len(size))  # (x, y[, z]) order
    hi = np.minimum(lo + edge, size)
    counts = _box_sums(mask, lo[:, ::-1], hi[:, ::-1])
    keep = counts >= settings.min_mask_fraction * np.prod(hi - lo, axis=1)
    regions = []
    for a, b, count in zip(lo[keep], hi[keep], counts[keep]):
        centre = reference.TransformContinuousIndexToPhysicalPoint([float(v) for v in (a + b - 1) / 2])
        regions.append(
            Region(
                id=len(regions) + 1,
                label="grid",
                bbox=(tuple(int(v) for v in a), tuple(int(v) for v in b)),
                value=None,
                centre_mm=tuple(round(c, 2) for c in centre),
                volume_mm3=round(float(count) * voxel_mm3, 2),
            )
        )
    return regions


def _box_sums(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Foreground count of every box [lo, hi) (numpy axis order) from one integral image."""
    integral = np.pad(mask.astype(np.int64), [(1, 0)] * mask.ndim)
    for axis in range(mask.ndim):
        integral = integral.cumsum(axis)
    total = np.zeros(len(lo), np.int64)
    for corner in np.ndindex(*(2,) * mask.ndim):  # inclusion-exclusion over the box corners
        index = tuple(np.where(c, hi[:, k], lo[:, k]) for k, c in enumerate(corner))
        total += (-1) ** (mask.ndim - sum(corner)) * integral[index]
    return total


def _label_array(reference: sitk.Image, path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(path, "label map not found")
    try:
        labels = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"cannot read label map: {exc}") from None
    if labels.GetDimension() != reference.GetDimension():
        raise InputError(path, f"label map is {labels.GetDimension()}D but the image is {reference.GetDimension()}D")
    # Nearest neighbour keeps label values; the map is assumed to be in the baseline's physical space.
    on_grid = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    array = sitk.GetArrayFromImage(on_grid)
    if not array.any():
        raise InputError(path, "label map does not overlap the baseline image")
    return array


def _label_regions(reference: sitk.Image, mask: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> list[Region]:
    voxel_mm3 = float(np.prod(reference.GetSpacing()))
    regions = []
    for value in np.unique(labels[(labels > 0) & mask.astype(bool)]):
        where = np.argwhere((labels == value) & mask.astype(bool))  # numpy (z, y, x) order
        lo, hi = where.min(0)[::-1], where.max(0)[::-1] + 1
        centre = reference.TransformContinuousIndexToPhysicalPoint([float(v) for v in where.mean(0)[::-1]])
        regions.append(
            Region(
                id=len(regions) + 1,
                label=names[value - 1] if 0 < value <= len(names) else f"label {value}",
                bbox=(tuple(int(v) for v in lo), tuple(int(v) for v in hi)),
                value=int(value),
                centre_mm=tuple(round(c, 2) for c in centre),
                volume_mm3=round(len(where) * voxel_mm3, 2),
            )
        )
    return regions
