"""Findings shaped like the change: high-scoring regions turned into the changed tissue they hold, measured.

A region is a cube (or a label, or a blob) that scored high; the lesion inside it is usually much smaller. So
each group of high-scoring regions becomes one finding whose voxels are the changed tissue itself: connected to
the strongest change in the group, of the same sign, and at least half as strong as the change's plateau (the
median of what is at least half the peak: the half-level contour of a blurred edge sits where the edge was,
and a truth mask is drawn at half partial volume), within the group grown by the merge distance. Volume,
largest diameter and mean signed change are measured on those voxels. A group whose strongest change is too
weak to measure holds no changed tissue and is not a finding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .regions import nearby_components


@dataclass(frozen=True)
class Finding:
    """One finding on the baseline grid (numpy order), before it is numbered for the report."""

    voxels: np.ndarray  # (n, ndim) int indices of the changed tissue, numpy (z, y, x) order
    peak: tuple[int, ...]  # numpy index of the strongest change
    volume_mm3: float  # changed tissue (2D: area in mm2)
    diameter_mm: float  # largest extent of the changed tissue
    mean_change_pct: float  # mean intensity change of the changed tissue, % of the baseline (+: brighter)
    score: float  # highest region score in the group
    region: int  # index of that region


def outline(groups_of: np.ndarray, signed: np.ndarray, fine: np.ndarray, inside: np.ndarray,
            region_of_voxel: np.ndarray, region_scores: np.ndarray, baseline: np.ndarray, followup: np.ndarray,
            spacing_zyx, merge_mm: float, extent_fraction: float = 0.5, min_abs_change: float = 1.5,
            extent_floor: float = 2.0) -> list[Finding]:
    """Findings of a pair, highest score first.

    groups_of: voxels of the regions to turn into findings; signed: pooled signed change in noise units (whether
    and where the tissue changed); fine: the same change unpooled (where the changed tissue ends);
    region_of_voxel: index of the highest-scoring region holding each voxel (-1 outside every region);
    baseline/followup: harmonised images (gray) the mean change is measured on. Pieces up to `merge_mm` apart
    are one finding. A group whose strongest change stays below `min_abs_change` noise units is dropped; the
    changed tissue is where `fine` reaches `extent_fraction` of the plateau and at least `extent_floor` (noise)."""
    spacing = np.asarray(spacing_zyx, float)
    voxel_mm3 = float(np.prod(spacing))
    steps = max(1, round(merge_mm / 2 / float(spacing.min())))  # both pieces grow by half the gap
    structure = np.ones((3,) * groups_of.ndim, bool)
    groups, _ = nearby_components(groups_of, steps)
    out: list[Finding] = []
    for k, box in enumerate(ndimage.find_objects(groups), start=1):
        if box is None:
            continue
        # work in the group's box grown by the merge distance: the changed tissue may reach past its regions
        box = tuple(slice(max(0, b.start - steps), min(n, b.stop + steps)) for b, n in zip(box, groups.shape))
        offset = np.array([b.start for b in box])
        members = groups[box] == k
        owners = region_of_voxel[box][members]
        owners = owners[owners >= 0]
        best = int(owners[np.argmax(region_scores[owners])]) if owners.size else -1
        zone = ndimage.binary_dilation(members, structure, iterations=steps) & inside[box]
        strength = np.where(zone, signed[box], 0.0)
        peak = np.unravel_index(int(np.argmax(np.where(members, np.abs(strength), 0.0))), strength.shape)
        if abs(float(strength[peak])) < min_abs_change:
            continue  # unusual, but without a measurable change of its tissue: not a finding
        sign = 1.0 if strength[peak] >= 0 else -1.0
        detail = sign * np.where(zone, fine[box], 0.0)
        core = zone & (sign * strength >= 0.5 * abs(float(strength[peak])))
        plateau = float(np.median(detail[core]))
        candidate = zone & (detail >= max(extent_floor, extent_fraction * plateau))
        labels, _ = ndimage.label(candidate, structure)
        # the changed tissue: the piece holding the strongest unpooled change of the core
        seed = np.unravel_index(int(np.argmax(np.where(core & candidate, detail, -np.inf))), detail.shape)
        tissue = labels == labels[seed] if candidate[seed] else (labels > 0) & core
        b, f = baseline[box][tissue].astype(np.float64), followup[box][tissue].astype(np.float64)
        mean_b = float(b.mean())
        change = 100.0 * (float(f.mean()) - mean_b) / abs(mean_b) if abs(mean_b) > 1e-12 else math.nan
        voxels = np.argwhere(tissue) + offset
        out.append(Finding(voxels=voxels, peak=tuple(int(v) for v in np.add(peak, offset)),
                           volume_mm3=len(voxels) * voxel_mm3, diameter_mm=largest_extent(voxels, spacing),
                           mean_change_pct=change, score=float(region_scores[best]) if best >= 0 else math.nan,
                           region=best))
    return sorted(out, key=lambda f: -f.score if math.isfinite(f.score) else math.inf)


def largest_extent(voxels: np.ndarray, spacing: np.ndarray) -> float:
    """Largest distance across a set of voxels in mm, counted edge to edge (one voxel: its mean side)."""
    if len(voxels) == 0:
        return 0.0
    points = voxels * spacing
    if len(points) > 4 * points.shape[1]:
        try:
            from scipy.spatial import ConvexHull, QhullError

            points = points[ConvexHull(points).vertices]
        except (QhullError, ValueError):  # flat or degenerate sets (one slice, a line): every point counts
            pass
    if len(points) > 4000:
        points = points[np.linspace(0, len(points) - 1, 4000).astype(int)]
    diffs = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diffs ** 2).sum(-1)).max()) + float(spacing.mean())
