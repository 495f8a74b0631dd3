"""One baseline/follow-up comparison: every stage in order, and the result the reports are made from."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from .io import Image


@dataclass(frozen=True)
class ScoredRegion:
    """A region of the baseline grid with its change score."""

    id: int
    label: str
    centre_mm: tuple[float, ...]  # physical (LPS) point on the baseline grid
    bbox: tuple[tuple[int, ...], tuple[int, ...]]  # voxel index (x, y[, z]) lo inclusive, hi exclusive, baseline grid
    volume_mm3: float
    score: float  # calibrated: higher = more change; flagged when above the threshold
    flagged: bool
    stats: dict[str, float] = field(default_factory=dict)  # region change statistics, with units in the key name


@dataclass(frozen=True)
class Comparison:
    """Everything a report needs about one pair."""

    baseline: Image
    followup: Image
    registered: Image  # follow-up resampled onto the baseline grid
    baseline_harmonised: Image  # what the encoder saw, baseline grid
    followup_harmonised: Image  # what the encoder saw, baseline grid
    change_map_baseline: Image  # score per voxel, baseline grid (for overlays)
    change_map: Image  # score per voxel, follow-up's own grid
    flagged_mask: Image  # uint8, follow-up's own grid
    regions: tuple[ScoredRegion, ...]
    progression_score: float
    progression: bool
    threshold: float
    false_alarm_rate: float
    registration: Any  # registration.Registration: transform, qc
    pipeline: Any  # pipeline.Pipeline
    encoder: dict[str, str]  # name, weights path, sha256
    timings_s: dict[str, float]


def compare(baseline: Image, followup: Image, pipeline: Any = None, detector: Any = None) -> Comparison:
    """Register, harmonise, encode, score: the follow-up against the baseline.

    `pipeline` is a `pipeline.Pipeline` (None: chosen from the images); `detector` a fitted normative
    `scoring.ChangeDetector` (None: the pipeline's normative model if it names one, else fitted within the pair).
    """
    from .encoding import Encoder
    from .pipeline import for_image
    from .preprocessing import foreground_mask, harmonise, mask_array
    from .regions import make_regions
    from .registration import register
    from .scoring import ChangeDetector, score_pair

    pipeline = pipeline or for_image(baseline)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 3)
        clock = now

    registration = register(baseline, followup, pipeline.registration, pipeline.preprocessing)
    lap("registration")
    mask_itk = foreground_mask(baseline, pipeline.preprocessing)
    base_h, follow_h = harmonise(baseline, registration.registered, mask_itk, pipeline.preprocessing)
    mask = mask_array(mask_itk)
    lap("preprocessing")
    encoder = Encoder(pipeline.encoding)
    b_arr, f_arr = base_h.array.astype(np.float32), follow_h.array.astype(np.float32)
    features_b, features_f, _ = encoder.encode_pair(b_arr, f_arr, mask, rgb=base_h.is_rgb)
    lap("encoding")
    regions, labels = make_regions(baseline.itk, mask, pipeline.regions)
    lap("regions")
    if detector is None and pipeline.scoring.normative_model is not None:
        detector = ChangeDetector.load(pipeline.scoring.normative_model)
    spacing_zyx = tuple(reversed(baseline.spacing))
    scores = score_pair(_gray(b_arr), _gray(f_arr), features_b, features_f, mask, spacing_zyx, regions, labels,
                        pipeline.scoring, detector)
    lap("scoring")

    change_map_baseline = _on_grid(scores.voxel_map, baseline)
    flagged_baseline = _on_grid(scores.flagged_mask.astype(np.uint8), baseline)
    change_map = registration.to_moving(change_map_baseline, followup, sitk.sitkLinear)
    flagged_mask = registration.to_moving(flagged_baseline, followup, sitk.sitkNearestNeighbor)
    flagged_mask = flagged_mask.with_itk(sitk.Cast(flagged_mask.itk, sitk.sitkUInt8))
    lap("mapping")
    scored = _scored_regions(regions, scores, mask, labels, baseline)
    flagged = bool(scores.flagged_mask.any())
    return Comparison(
        baseline=baseline,
        followup=followup,
        registered=registration.registered,
        baseline_harmonised=base_h,
        followup_harmonised=follow_h,
        change_map_baseline=change_map_baseline,
        change_map=change_map,
        flagged_mask=flagged_mask,
        regions=scored,
        progression_score=float(scores.region_scores.max()) if len(regions) else 0.0,
        progression=flagged,
        threshold=scores.threshold,
        false_alarm_rate=pipeline.scoring.false_alarm_rate,
        registration=registration,
        pipeline=pipeline,
        encoder={k: ("" if v is None else str(v)) for k, v in encoder.describe().items()},
        timings_s=timings,
    )


def _gray(array: np.ndarray) -> np.ndarray:
    return array.mean(-1) if array.ndim == 3 and array.shape[-1] == 3 else array


def _on_grid(array: np.ndarray, reference: Image) -> Image:
    itk = sitk.GetImageFromArray(array)
    itk.CopyInformation(reference.itk)
    return reference.with_itk(itk)


def _scored_regions(regions, scores, mask, labels, reference: Image, context: int = 20) -> tuple[ScoredRegion, ...]:
    """Flagged changes merged into connected findings, then the highest-scoring unflagged regions for context."""
    from scipy import ndimage

    from .scoring import FEATURE_NAMES

    out: list[ScoredRegion] = []
    voxel_mm3 = float(np.prod(reference.spacing))
    components, n = ndimage.label(scores.flagged_mask)
    region_of_voxel = np.full(mask.shape, -1, np.int64)
    order = np.argsort(scores.region_scores)  # ascending, so the best-scoring region wins each voxel
    for i in order:
        region_of_voxel[regions[i].slices()][regions[i].members(mask, labels)] = i
    for k, box in enumerate(ndimage.find_objects(components), start=1):
        inside = components[box] == k
        owners = np.unique(region_of_voxel[box][inside])
        owners = owners[owners >= 0]
        best = int(owners[np.argmax(scores.region_scores[owners])])
        where = np.argwhere(inside) + [b.start for b in box]
        centre = reference.itk.TransformContinuousIndexToPhysicalPoint([float(v) for v in where.mean(0)[::-1]])
        out.append(ScoredRegion(
            id=len(out) + 1, label=f"change near {regions[best].label} {regions[best].id}" if regions[best].value is not None else "change",
            centre_mm=tuple(round(c, 2) for c in centre),
            bbox=(tuple(int(b.start) for b in reversed(box)), tuple(int(b.stop) for b in reversed(box))),
            volume_mm3=round(len(where) * voxel_mm3, 2),
            score=round(float(scores.region_scores[best]), 3), flagged=True,
            stats={name: round(float(v), 3) for name, v in zip(FEATURE_NAMES, scores.region_stats[best])},
        ))
    unflagged = [i for i in np.argsort(-scores.region_scores) if scores.region_scores[i] <= scores.threshold][:context]
    for i in unflagged:
        r = regions[i]
        out.append(ScoredRegion(
            id=len(out) + 1, label=r.label, centre_mm=r.centre_mm, bbox=r.bbox, volume_mm3=r.volume_mm3,
            score=round(float(scores.region_scores[i]), 3), flagged=False,
            stats={name: round(float(v), 3) for name, v in zip(FEATURE_NAMES, scores.region_stats[i])},
        ))
    return tuple(out)
