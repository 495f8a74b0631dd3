"""Findings shaped like the change: flagged regions turned into the changed tissue they hold, measured.

A flagged region is a cube (or a label, or a blob) that scored above the threshold; the lesion inside it is
usually much smaller. So each group of flagged regions becomes one finding whose voxels are the changed tissue
itself: connected to the strongest change in the group, of the same sign, and at least half as strong as the
change's plateau (the median of what is at least half the peak: the half-level contour of a blurred edge sits
where the edge was, and a truth mask is drawn at half partial volume), within the flagged regions grown by the
merge distance. Volume, largest diameter and mean signed change are measured on those voxels.
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


def outline(flagged: np.ndarray, signed: np.ndarray, inside: np.ndarray, region_of_voxel: np.ndarray,
            region_scores: np.ndarray, baseline: np.ndarray, followup: np.ndarray, spacing_zyx, merge_mm: float,
            extent_fraction: float = 0.5, min_abs_change: float = 1.5) -> list[Finding]:
    """Findings of a pair, highest score first.

    flagged: voxels of flagged regions; signed: signed change in noise units; region_of_voxel: index of the
    highest-scoring region holding each voxel (-1 outside every region); baseline/followup: harmonised images
    (gray) the mean change is measured on. Pieces of flagged tissue up to `merge_mm` apart are one finding.
    A group whose strongest change stays below `min_abs_change` noise units holds no changed tissue: dropped."""
    spacing = np.asarray(spacing_zyx, float)
    voxel_mm3 = float(np.prod(spacing))
    steps = max(1, round(merge_mm / 2 / float(spacing.min())))  # both pieces grow by half the gap
    groups, n = nearby_components(flagged, steps)
    grown_all = ndimage.binary_dilation(groups > 0, np.ones((3,) * flagged.ndim, bool), iterations=steps) & inside
    near, _ = ndimage.label(grown_all, np.ones((3,) * flagged.ndim, bool))
    out: list[Finding] = []
    for k, box in enumerate(ndimage.find_objects(groups), start=1):
        if box is None:
            continue
        members = groups[box] == k
        owners = region_of_voxel[box][members]
        owners = owners[owners >= 0]
        best = int(owners[np.argmax(region_scores[owners])]) if owners.size else -1
        # where this group may extend: its own grown neighbourhood
        seed = tuple(np.argwhere(members)[0] + [b.start for b in box])
        zone = near == near[seed]
        strength = np.where(zone, signed, 0.0)
        group_strength = np.where(groups == k, np.abs(strength), 0.0)
        peak = np.unravel_index(int(np.argmax(group_strength)), signed.shape)
        if abs(float(strength[peak])) < min_abs_change:
            continue  # an unusual region without a measurable change of its tissue: not a finding
        sign = 1.0 if strength[peak] >= 0 else -1.0
        # the change's plateau: the median of what is at least half the peak; its edge: half the plateau
        core = zone & (sign * strength >= 0.5 * abs(float(strength[peak])))
        plateau = float(np.median(sign * strength[core]))
        level = max(min_abs_change, extent_fraction * plateau)
        candidate = zone & (sign * strength >= level)
        labels, _ = ndimage.label(candidate, np.ones((3,) * flagged.ndim, bool))
        tissue = labels == labels[peak]
        voxels = np.argwhere(tissue)
        b, f = baseline[tissue].astype(np.float64), followup[tissue].astype(np.float64)
        mean_b = float(b.mean())
        change = 100.0 * (float(f.mean()) - mean_b) / abs(mean_b) if abs(mean_b) > 1e-12 else math.nan
        out.append(Finding(voxels=voxels, peak=tuple(int(v) for v in peak), volume_mm3=len(voxels) * voxel_mm3,
                           diameter_mm=largest_extent(voxels, spacing), mean_change_pct=change,
                           score=float(region_scores[best]) if best >= 0 else math.nan, region=best))
    return sorted(out, key=lambda f: -f.score if math.isfinite(f.score) else math.inf)


def largest_extent(voxels: np.ndarray, spacing: np.ndarray) -> float:
    """Largest distance across a set of voxels in mm, counted edge to edge (one voxel: its largest side)."""
    if len(voxels) == 0:
        return 0.0
    points = voxels * spacing
    if len(points) > 4 * points.shape[1]:
        try:
            from scipy.spatial import ConvexHull

            points = points[ConvexHull(points).vertices]
        except Exception:  # flat or degenerate sets (one slice, a line): every point is a candidate
            pass
    if len(points) > 4000:
        points = points[np.linspace(0, len(points) - 1, 4000).astype(int)]
    diffs = points[:, None, :] - points[None, :, :]
    centre_to_centre = float(np.sqrt((diffs ** 2).sum(-1)).max())
    return centre_to_centre + float(spacing.mean())
