"""Findings shaped like the change: high-scoring regions turned into the changed tissue they hold, measured.

A region is a cube (or a label, or a blob) that scored high; the lesion inside it is usually much smaller. So
the findings are the pieces of changed tissue inside groups of high-scoring regions: connected voxels of one
sign, at least half as strong as the piece's plateau (the median of what is at least half its peak: the
half-level contour of a blurred edge sits where the edge was, and a truth mask is drawn at half partial
volume). Volume, largest diameter and mean signed change are measured on those voxels. A group whose tissue
did not measurably change (the detector found it unusual, but nothing changed) gives no finding.
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
            spacing_zyx, merge_mm: float, extent_fraction: float = 0.5, min_change: float = 4.0,
            extent_floor: float = 2.0, relative_change: float = 0.0, min_volume_mm3: float = 0.0,
            min_fine_change: float = 0.0, evidence: np.ndarray | None = None, evidence_min: float = 0.5,
            evidence_extent: float = 0.5) -> list[Finding]:
    """Findings of a pair, highest score first.

    groups_of: voxels of the regions to turn into findings; signed: the pooled signed change in units of its own
    noise (whether a piece of tissue changed at all); fine: the signed change smoothed but not pooled, in noise
    units (where the changed tissue ends); region_of_voxel: index of the highest-scoring region holding each
    voxel (-1 outside every region); baseline/followup: harmonised images (gray) the mean change is measured on.

    Within each group of regions (pieces up to `merge_mm` apart), every piece of tissue that changed one way by
    more than `extent_floor` is a candidate; it is a finding when its pooled change reaches `min_change` (noise
    is pooled away, a lesion's change is not) and it touches the group's regions. Its voxels are those reaching
    `extent_fraction` of its plateau; its score is the best score of the regions holding them. So two lesions
    in one group are two findings, and a group with no measurable change of its tissue gives none. Pieces whose
    pooled change is under `relative_change` times the group's strongest (the halo harmonisation leaves around
    a strong lesion, noise beside it) or smaller than `min_volume_mm3` are left out. `min_fine_change` (0: off):
    a piece whose unpooled change reaches it is a finding even under `min_change`, since pooling dilutes a change
    of a few voxels.

    evidence: a supervised detector's own voxel map (the Siamese network's change probability). Its pieces are the
    changed tissue then, in place of the intensity gate: a model trained on labelled changes says where they are,
    including subtle ones the pooled intensity change never lifts above noise. A piece is the connected voxels
    at or above `evidence_extent` (the model's own boundary between changed and not) around a voxel at or above
    `evidence_min` (its operating level): the few voxels of a small lesion the model is sure of fall under
    `min_volume_mm3`, its extent does not (validation subtle S014: a 56-voxel lesion at p 0.997 had 2-4 voxels
    above 0.8)."""
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
        zone = ndimage.binary_dilation(members, structure, iterations=steps) & inside[box]
        owner = region_of_voxel[box]

        def add(tissue: np.ndarray, seed: tuple[int, ...]) -> None:
            """The piece `tissue` (in the box) as a finding, when it is big enough and in a scored region."""
            if tissue.sum() * voxel_mm3 < min_volume_mm3:
                return
            regions = owner[tissue]
            regions = regions[regions >= 0]
            if not regions.size:
                return
            best = int(regions[np.argmax(region_scores[regions])])
            b, f = baseline[box][tissue].astype(np.float64), followup[box][tissue].astype(np.float64)
            mean_b = float(b.mean())
            change = 100.0 * (float(f.mean()) - mean_b) / abs(mean_b) if abs(mean_b) > 1e-12 else math.nan
            voxels = np.argwhere(tissue) + offset
            out.append(Finding(voxels=voxels, peak=tuple(int(v) for v in np.add(seed, offset)),
                               volume_mm3=len(voxels) * voxel_mm3, diameter_mm=largest_extent(voxels, spacing),
                               mean_change_pct=change, score=float(region_scores[best]), region=best))

        if evidence is not None:
            ev = np.where(zone, evidence[box], 0.0)
            pieces, n = ndimage.label(ev >= min(evidence_extent, evidence_min), structure)
            for piece in range(1, n + 1):
                tissue = pieces == piece
                peak = np.unravel_index(int(np.argmax(np.where(tissue, ev, -np.inf))), ev.shape)
                if ev[peak] >= evidence_min and (tissue & members).any():
                    add(tissue, peak)
            continue
        strongest = float(np.abs(np.where(zone, signed[box], 0.0)).max())
        for sign in (1.0, -1.0):
            detail = sign * np.where(zone, fine[box], 0.0)
            pooled = sign * np.where(zone, signed[box], 0.0)
            pieces, n = ndimage.label(detail >= extent_floor, structure)
            for piece in range(1, n + 1):
                where = pieces == piece
                peak = float(pooled[where].max())
                peak_fine = float(detail[where].max())
                changed = peak >= min_change or 0.0 < min_fine_change <= peak_fine
                if not changed or peak < relative_change * strongest or not (where & members).any():
                    continue
                plateau = float(np.median(detail[where & (detail >= 0.5 * peak_fine)]))
                tissue = where & (detail >= max(extent_floor, extent_fraction * plateau))
                labels, _ = ndimage.label(tissue, structure)
                seed = np.unravel_index(int(np.argmax(np.where(where, detail, -np.inf))), detail.shape)
                add(labels == labels[seed], seed)
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
