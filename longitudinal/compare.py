"""One baseline/follow-up comparison: every stage in order, and the result the reports are made from."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from .io import Image

FINDING_MERGE_MM = 3.0  # flagged pieces at most this far apart are one finding


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
    regions_scored: int = 0  # every region the detector scored; `regions` lists the flagged and the top others


@dataclass(frozen=True, eq=False)
class Prepared:
    """A pair registered, masked, harmonised and divided into regions: what every scoring method shares
    (the evaluation scores several methods on one registration)."""

    baseline: Image
    followup: Image
    registration: Any
    baseline_harmonised: Image
    followup_harmonised: Image
    mask: np.ndarray  # baseline grid, numpy order
    regions: list | None  # None: components, made from the change maps when the pair is scored
    labels: np.ndarray | None
    pipeline: Any
    timings_s: dict[str, float]


def prepare(baseline: Image, followup: Image, pipeline: Any = None) -> Prepared:
    """Register, mask, harmonise, make regions."""
    from .pipeline import for_image
    from .preprocessing import harmonise, mask_array, match_resolution
    from .regions import make_regions
    from .registration import register

    pipeline = pipeline or for_image(baseline)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    registration = register(baseline, followup, pipeline.registration, pipeline.preprocessing)
    timings["registration"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    mask_itk = registration.fixed_mask  # the baseline's body mask, already made by the registration
    base_in, follow_in = baseline, registration.registered
    if pipeline.preprocessing.match_resolution:
        base_in, follow_in = match_resolution(baseline, followup, registration)
    base_h, follow_h = harmonise(base_in, follow_in, mask_itk, pipeline.preprocessing)
    mask = mask_array(mask_itk)
    timings["preprocessing"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    regions, labels = make_regions(baseline.itk, mask, pipeline.regions)
    timings["regions"] = round(time.perf_counter() - clock, 3)
    return Prepared(baseline, followup, registration, base_h, follow_h, mask, regions, labels, pipeline, timings)


def compare(baseline: Image, followup: Image, pipeline: Any = None, detector: Any = None) -> Comparison:
    """Register, harmonise, encode, score: the follow-up against the baseline.

    `pipeline` is a `pipeline.Pipeline` (None: chosen from the images); `detector` a fitted normative
    `scoring.ChangeDetector` (None: the pipeline's normative model if it names one, else fitted within the pair).
    """
    from .pipeline import for_image
    from .scoring import ChangeDetector

    pipeline = pipeline or for_image(baseline)
    if detector is None and pipeline.scoring.normative_model is not None:
        detector = ChangeDetector.load(pipeline.scoring.normative_model)  # a bad model file fails before any work
    return score_prepared(prepare(baseline, followup, pipeline), detector)


def encode_prepared(prepared: Prepared, encoder_settings: Any = None):
    """Dense features of both harmonised visits (encoder settings default to the pipeline's)."""
    from .encoding import Encoder

    encoder = Encoder(encoder_settings or prepared.pipeline.encoding)
    b_arr = prepared.baseline_harmonised.array.astype(np.float32)
    f_arr = prepared.followup_harmonised.array.astype(np.float32)
    features_b, features_f, _ = encoder.encode_pair(b_arr, f_arr, prepared.mask, rgb=prepared.baseline_harmonised.is_rgb)
    return features_b, features_f, {k: ("" if v is None else str(v)) for k, v in encoder.describe().items()}


def score_prepared(prepared: Prepared, detector: Any = None, encoder_settings: Any = None,
                   scoring_settings: Any = None, features: tuple | None = None) -> Comparison:
    """Encode (when the scoring uses encoder features) and score a prepared pair.

    `encoder_settings` / `scoring_settings` override the pipeline's (the evaluation's baselines);
    `features` = (features_b, features_f, encoder description) already computed for this pair."""
    from .scoring import ChangeDetector, score_regions

    pipeline = prepared.pipeline
    scoring = scoring_settings or pipeline.scoring
    baseline, followup, registration = prepared.baseline, prepared.followup, prepared.registration
    mask = prepared.mask
    timings = dict(prepared.timings_s)
    clock = time.perf_counter()
    features_b = features_f = None
    encoder_info = {"name": "none"}
    if "encoder" in scoring.maps:
        features_b, features_f, encoder_info = features or encode_prepared(prepared, encoder_settings)
    timings["encoding"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    if detector is None and scoring.normative_model is not None:
        detector = ChangeDetector.load(scoring.normative_model)
    X, names, regions, labels = region_features_prepared(prepared, scoring, features_b, features_f)
    spacing_zyx = tuple(reversed(baseline.spacing))
    scores = score_regions(X, names, regions, mask, labels, spacing_zyx, scoring, detector)
    timings["scoring"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()

    change_map_baseline = _on_grid(scores.voxel_map, baseline)
    flagged_baseline = _on_grid(scores.flagged_mask.astype(np.uint8), baseline)
    change_map = registration.to_moving(change_map_baseline, followup, sitk.sitkLinear)
    flagged_mask = registration.to_moving(flagged_baseline, followup, sitk.sitkNearestNeighbor)
    flagged_mask = flagged_mask.with_itk(sitk.Cast(flagged_mask.itk, sitk.sitkUInt8))
    timings["mapping"] = round(time.perf_counter() - clock, 3)
    scored = _scored_regions(regions, scores, mask, labels, baseline)
    return Comparison(
        baseline=baseline,
        followup=followup,
        registered=registration.registered,
        baseline_harmonised=prepared.baseline_harmonised,
        followup_harmonised=prepared.followup_harmonised,
        change_map_baseline=change_map_baseline,
        change_map=change_map,
        flagged_mask=flagged_mask,
        regions=scored,
        progression_score=float(scores.region_scores.max()) if len(regions) else 0.0,
        progression=bool(scores.flagged_mask.any()),
        threshold=scores.threshold,
        false_alarm_rate=scoring.false_alarm_rate,
        registration=registration,
        pipeline=pipeline,
        encoder=encoder_info,
        timings_s=timings,
        regions_scored=len(regions),
    )


def region_features_prepared(prepared: Prepared, scoring: Any, features_b=None, features_f=None):
    """(X, feature names, regions, labels) of a prepared pair: the change maps pooled over its regions.

    Component regions are made here, from the change maps themselves."""
    from .regions import component_regions
    from .scoring import change_maps, combined_change, feature_names, region_features

    b_arr = _gray(prepared.baseline_harmonised.array.astype(np.float32))
    f_arr = _gray(prepared.followup_harmonised.array.astype(np.float32))
    spacing_zyx = tuple(reversed(prepared.baseline.spacing))
    maps = change_maps(b_arr, f_arr, features_b, features_f, prepared.mask, spacing_zyx, scoring)
    regions, labels = prepared.regions, prepared.labels
    if regions is None:
        regions, labels = component_regions(prepared.baseline.itk, prepared.mask, combined_change(maps),
                                            prepared.pipeline.regions)
    return region_features(maps, regions, prepared.mask, labels), feature_names(maps), regions, labels


def _gray(array: np.ndarray) -> np.ndarray:
    return array.mean(-1) if array.ndim == 3 and array.shape[-1] == 3 else array


def _on_grid(array: np.ndarray, reference: Image) -> Image:
    itk = sitk.GetImageFromArray(array)
    itk.CopyInformation(reference.itk)
    return reference.with_itk(itk)


def _scored_regions(regions, scores, mask, labels, reference: Image, context: int = 20) -> tuple[ScoredRegion, ...]:
    """Flagged changes merged into connected findings, then the highest-scoring unflagged regions for context."""
    from scipy import ndimage

    from .regions import nearby_components

    out: list[ScoredRegion] = []
    voxel_mm3 = float(np.prod(reference.spacing))
    # pieces of flagged tissue a few mm apart (one cube cut by a sulcus, a lesion's rim) are one finding
    steps = max(1, round(FINDING_MERGE_MM / 2 / min(reference.spacing)))  # both pieces grow by half the gap
    components, _ = nearby_components(scores.flagged_mask, steps)
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
            id=len(out) + 1, label=f"change in {regions[best].label}" if regions[best].value is not None else "change",
            centre_mm=tuple(round(c, 2) for c in centre),
            bbox=(tuple(int(b.start) for b in reversed(box)), tuple(int(b.stop) for b in reversed(box))),
            volume_mm3=round(len(where) * voxel_mm3, 2),
            score=round(float(scores.region_scores[best]), 3), flagged=True, stats=_stats(scores, best),
        ))
    unflagged = [i for i in np.argsort(-scores.region_scores) if scores.region_scores[i] <= scores.threshold][:context]
    for i in unflagged:
        r = regions[i]
        out.append(ScoredRegion(
            id=len(out) + 1, label=r.label, centre_mm=r.centre_mm, bbox=r.bbox, volume_mm3=r.volume_mm3,
            score=round(float(scores.region_scores[i]), 3), flagged=False, stats=_stats(scores, i),
        ))
    return tuple(out)


def _stats(scores, i: int) -> dict[str, float]:
    return {name: round(float(v), 3) for name, v in zip(scores.feature_names, scores.region_stats[i])}
