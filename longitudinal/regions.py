"""Regions of the baseline grid that changes are scored over: a grid of cubes, a label map, or components."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .settings import check, require


@dataclass(frozen=True)
class RegionSettings:
    """What a region is: a cube of a regular grid, a structure of a label map, or a blob of the change itself."""

    kind: Literal["grid", "labels", "components"] = "grid"
    size_mm: float = 8.0  # cube edge for the grid
    overlap: float = 0.5  # fraction of a cube that its neighbour shares, so no lesion is cut in two
    min_mask_fraction: float = 0.3  # a cube needs this much foreground to count
    label_map: Path | None = None  # NIfTI in the baseline's physical space (atlas or segmentation)
    label_names: tuple[str, ...] = ()  # names for label values 1, 2, ...
    # components: connected voxels whose change (mean of the robust z maps) exceeds this many robust SDs;
    # most are noise blobs, which is what lets the detector learn what unchanged tissue does
    component_level: float = 2.5
    component_min_mm3: float = 5.0

    def __post_init__(self) -> None:
        check(self)
        require(self.size_mm > 0, "size_mm", "must be > 0")
        require(0.0 <= self.overlap < 1.0, "overlap", "must be in [0, 1)")


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


def make_regions(reference: sitk.Image, mask: np.ndarray, settings: RegionSettings
                 ) -> tuple[list[Region] | None, np.ndarray | None]:
    """Regions over `reference`'s grid and, for label maps, the label array they refer to.

    Components depend on the change, so they are not made here: (None, None), and `component_regions` makes
    them once the change maps exist."""
    if settings.kind == "components":
        return None, None
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
    starts = [_starts(int(n), int(e), int(s)) for n, e, s in zip(size, edge, step)]
    lo = np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, len(size))  # (x, y[, z]) order
    hi = np.minimum(lo + edge, size)
    counts = np.rint(box_sums(mask, lo[:, ::-1], hi[:, ::-1])).astype(np.int64)
    keep = (counts > 0) & (counts >= settings.min_mask_fraction * np.prod(hi - lo, axis=1))
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


def _starts(n: int, edge: int, step: int) -> np.ndarray:
    """Cube starts along an axis of n voxels: every `step`, and a last cube flush with the far edge, so every
    voxel is in a cube; an axis no longer than the cube has one cube."""
    if n <= edge:
        return np.zeros(1, int)
    starts = np.arange(0, n - edge + 1, step)
    return starts if starts[-1] == n - edge else np.append(starts, n - edge)


def box_sums(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Sum of `values` over every box [lo, hi) (rows of numpy-order indices) from one integral image: 30k
    overlapping cubes cost about one pass over the image."""
    integral = np.pad(values.astype(np.float64), [(1, 0)] * values.ndim)
    for axis in range(values.ndim):
        integral = integral.cumsum(axis)
    total = np.zeros(len(lo))
    for corner in np.ndindex(*(2,) * values.ndim):  # inclusion-exclusion over the box corners
        index = tuple(np.where(c, hi[:, k], lo[:, k]) for k, c in enumerate(corner))
        total += (-1) ** (values.ndim - sum(corner)) * integral[index]
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


def nearby_components(mask: np.ndarray, merge_voxels: int = 0) -> tuple[np.ndarray, int]:
    """26-connected blobs of a mask, pieces up to 2 x `merge_voxels` apart counted as one: (labels, count).

    Labels are 0 outside the mask. Truth lesions, flagged findings and change components are all counted so."""
    from scipy import ndimage

    mask = mask.astype(bool)
    structure = np.ones((3,) * mask.ndim, bool)
    grown = ndimage.binary_dilation(mask, structure, iterations=merge_voxels) if merge_voxels else mask
    labels, n = ndimage.label(grown, structure)
    return np.where(mask, labels, 0), int(n)


def component_regions(reference: sitk.Image, mask: np.ndarray, change: np.ndarray, settings: RegionSettings
                      ) -> tuple[list[Region], np.ndarray]:
    """Connected blobs (26-connected) of foreground voxels whose change exceeds `settings.component_level`."""
    from scipy import ndimage

    above = (change > settings.component_level) & mask.astype(bool)
    labels, n = nearby_components(above)
    if n:
        voxel_mm3 = float(np.prod(reference.GetSpacing()))
        sizes = ndimage.sum_labels(above, labels, np.arange(1, n + 1)) * voxel_mm3
        keep = np.zeros(n + 1, np.int32)
        kept = np.flatnonzero(sizes >= settings.component_min_mm3)
        keep[kept + 1] = np.arange(1, len(kept) + 1)
        labels = keep[labels]
    return _label_regions(reference, mask, labels, (), prefix="component"), labels


def _label_regions(reference: sitk.Image, mask: np.ndarray, labels: np.ndarray, names: tuple[str, ...],
                   prefix: str = "label") -> list[Region]:
    from scipy import ndimage

    voxel_mm3 = float(np.prod(reference.GetSpacing()))
    inside = np.where(mask.astype(bool), labels, 0)
    regions = []
    for value, box in enumerate(ndimage.find_objects(np.maximum(inside, 0)), start=1):
        if box is None:
            continue
        where = np.argwhere(inside[box] == value) + [b.start for b in box]  # numpy (z, y, x) order
        lo, hi = where.min(0)[::-1], where.max(0)[::-1] + 1
        centre = reference.TransformContinuousIndexToPhysicalPoint([float(v) for v in where.mean(0)[::-1]])
        regions.append(
            Region(
                id=len(regions) + 1,
                label=names[value - 1] if 0 < value <= len(names) else f"{prefix} {value}",
                bbox=(tuple(int(v) for v in lo), tuple(int(v) for v in hi)),
                value=int(value),
                centre_mm=tuple(round(c, 2) for c in centre),
                volume_mm3=round(len(where) * voxel_mm3, 2),
            )
        )
    return regions
