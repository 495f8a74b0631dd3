"""One baseline/follow-up comparison: every stage in order, and the result the reports are made from.

A verdict has three states. "not comparable" comes before any scoring when the tool cannot compare: the
registration failed its quality control, or the visits share too little of the field of view. Two inputs with
the same pixel data are reported as identical, with registration skipped.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import SimpleITK as sitk

from .io import Image
from .masks import gray_array

if TYPE_CHECKING:
    from .encoding import EncoderSettings, FeatureMap
    from .findings import Finding
    from .pipeline import Pipeline
    from .regions import Region
    from .registration import Registration
    from .scoring import ChangeDetector, ChangeMaps, IntensityChange, PairScores, ScoringSettings

Verdict = Literal["progression", "no progression", "not comparable"]
VERDICTS: tuple[Verdict, ...] = ("progression", "no progression", "not comparable")


@dataclass(frozen=True)
class ScoredRegion:
    """A flagged finding (changed tissue, measured) or, for context, an unflagged region with its score."""

    id: int
    label: str
    centre_mm: tuple[float, ...]  # physical (LPS) point on the baseline grid
    bbox: tuple[tuple[int, ...], tuple[int, ...]]  # voxel index (x, y[, z]) lo inclusive, hi exclusive, baseline grid
    volume_mm3: float  # findings: the changed tissue; regions: the region's foreground (2D: mm2)
    score: float  # calibrated: higher = more change; flagged when above the threshold
    flagged: bool
    stats: dict[str, float] = field(default_factory=dict)  # region change statistics, with units in the key name
    diameter_mm: float | None = None  # findings: largest extent of the changed tissue
    mean_change_pct: float | None = None  # findings: mean intensity change, % of the baseline (+: brighter)
    n_voxels: int | None = None  # findings: voxels of changed tissue on the baseline grid
    centre_index: tuple[int, ...] | None = None  # voxel index (x, y[, z]) of the centre on the baseline grid


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
    flagged_mask: Image  # uint8, follow-up's own grid: the changed tissue of every finding
    regions: tuple[ScoredRegion, ...]  # findings (flagged, numbered 1..n by score) then the top other regions
    progression_score: float | None  # None when not comparable
    progression: bool
    threshold: float  # flagging threshold of this pair (nan when nothing was scored)
    false_alarm_rate: float  # per region, for this pair: false_findings_per_pair / independent regions
    registration: Registration
    pipeline: Pipeline
    encoder: dict[str, str]  # name, weights path, sha256
    timings_s: dict[str, float]
    regions_scored: int = 0  # every region the detector scored; `regions` lists the flagged and the top others
    false_findings_per_pair: float = math.nan  # the calibration setting: false findings expected on a stable pair
    verdict: Verdict = "no progression"
    warnings: tuple[str, ...] = ()  # plain sentences for the reader
    reason: str | None = None  # why the pair is not comparable, one sentence
    identical: bool = False  # the two inputs hold the same pixel data
    analysis_mask: Image | None = None  # uint8, baseline grid: the voxels compared (both visits imaged them)
    finding_labels: Image | None = None  # uint16, follow-up grid: finding id per voxel, 0 elsewhere
    finding_labels_baseline: Image | None = None  # uint16, baseline grid
    # The peak of the detector's intensity map (pooled change less its surround, in units of what noise and
    # misalignment alone produce) inside the scored region: how strongly the pair changed anywhere. It ranks pairs
    # (a worklist, a cohort); `progression_score` does not, because region scores are calibrated within each pair
    # and a stable pair's best region scores as high as a changed pair's. None when not comparable.
    strongest_change: float | None = None

    @property
    def findings(self) -> tuple[ScoredRegion, ...]:
        return tuple(r for r in self.regions if r.flagged)


@dataclass(frozen=True, eq=False)
class Prepared:
    """A pair registered, masked, harmonised and divided into regions: what every scoring method shares
    (the evaluation scores several methods on one registration)."""

    baseline: Image
    followup: Image
    registration: Registration
    baseline_harmonised: Image
    followup_harmonised: Image
    mask: np.ndarray  # baseline grid, numpy order: the voxels compared (foreground both visits imaged)
    regions: list[Region] | None  # None: components, made from the change maps when the pair is scored
    labels: np.ndarray | None
    pipeline: Pipeline
    timings_s: dict[str, float]
    reason: str | None = None  # set when the pair cannot be compared: nothing is scored
    identical: bool = False  # the inputs hold the same pixel data: nothing is scored, nothing changed


def identical_pixels(a: Image, b: Image) -> bool:
    """Same size, channels and voxel values (geometry aside): one scan given twice."""
    if a.size != b.size or a.itk.GetNumberOfComponentsPerPixel() != b.itk.GetNumberOfComponentsPerPixel():
        return False
    return bool(np.array_equal(sitk.GetArrayViewFromImage(a.itk), sitk.GetArrayViewFromImage(b.itk)))


def prepare(baseline: Image, followup: Image, pipeline: Pipeline | None = None) -> Prepared:
    """Mask, register, harmonise, make regions; stop early (with `reason`) when the pair cannot be compared."""
    from .masks import brain_mask, foreground_mask, mask_array
    from .pipeline import for_image
    from .preprocessing import harmonise, match_resolution
    from .regions import make_regions
    from .registration import identity_registration, itk_threads, register

    pipeline = pipeline or for_image(baseline)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    identical = identical_pixels(baseline, followup)
    masks = pipeline.masks
    reason = None
    roi = None
    if masks.brain and baseline.dim == 3 and not identical:
        brain = brain_mask(baseline.itk, masks)
        roi, reason = brain.mask, brain.problem
    timings["masks"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    if identical:
        registration = identity_registration(baseline, followup, masks)
    else:
        registration = register(baseline, followup, pipeline.registration, foreground_mask(baseline.itk, masks),
                                foreground_mask(followup.itk, masks), roi)
    timings["registration"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    mask_itk = _analysis_mask(registration, pipeline.registration.fov_margin_mm)
    mask = mask_array(mask_itk)
    reason = reason or _not_comparable(registration, mask)
    if reason is not None or identical:  # nothing to score: keep the images as they are for the report
        timings["preprocessing"] = round(time.perf_counter() - clock, 3)
        return Prepared(baseline, followup, registration, baseline, registration.registered, mask, [], None, pipeline,
                        timings, reason, identical)
    base_in, follow_in = baseline, registration.registered
    # a fixed ITK thread count: N4's field sums per-thread parts, so with the machine's (or a batch worker's)
    # count the scores changed with `batch --jobs` (benchmarks/determinism.py)
    with itk_threads(pipeline.preprocessing.threads):
        if pipeline.preprocessing.match_resolution:
            base_in, follow_in = match_resolution(baseline, followup, registration)
        base_h, follow_h = harmonise(base_in, follow_in, mask_itk, pipeline.preprocessing)
    timings["preprocessing"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    regions, labels = make_regions(baseline.itk, mask, pipeline.regions)
    timings["regions"] = round(time.perf_counter() - clock, 3)
    return Prepared(baseline, followup, registration, base_h, follow_h, mask, regions, labels, pipeline, timings)


def _analysis_mask(registration: Registration, margin_mm: float) -> sitk.Image:
    """The region to compare (the brain, or the foreground) where the follow-up imaged the same tissue: inside
    its field of view, away from its edges, and inside its own foreground."""
    covered = registration.coverage(margin_mm)
    moving_fg = registration.to_fixed(registration.moving_mask, sitk.sitkNearestNeighbor, 0)
    both = sitk.And(sitk.And(registration.roi > 0, covered > 0), moving_fg > 0)
    return sitk.Cast(both, sitk.sitkUInt8)


def _not_comparable(registration: Registration, mask: np.ndarray) -> str | None:
    qc = registration.qc
    if qc.suspect:
        return "registration failed its quality control (" + "; ".join(qc.reasons) + ")"
    if mask.sum() < 100:
        return "the two visits share almost no imaged foreground"
    return None


def compare(baseline: Image, followup: Image, pipeline: Pipeline | None = None,
            detector: ChangeDetector | None = None, allow_mixed_patients: bool = False) -> Comparison:
    """Register, harmonise, encode, score: the follow-up against the baseline.

    `pipeline` is a `pipeline.Pipeline` (None: chosen from the images); `detector` a fitted normative
    `scoring.ChangeDetector` (None: the pipeline's normative model if it names one, else fitted within the pair).
    Images of two different patients (DICOM PatientID) are refused unless `allow_mixed_patients`.
    """
    from .pipeline import for_image
    from .scoring import ChangeDetector
    from .timeline import check_same_patient

    if not allow_mixed_patients:
        check_same_patient(baseline, followup)
    pipeline = pipeline or for_image(baseline)
    # model files are read (and refused, when they do not fit the pipeline) before any work
    if detector is None and pipeline.scoring.normative_model is not None:
        detector = ChangeDetector.load(pipeline.scoring.normative_model)
    trained = trained_model(pipeline.scoring, pipeline)
    return score_prepared(prepare(baseline, followup, pipeline), detector, trained=trained)


def trained_model(scoring: ScoringSettings, pipeline: Pipeline):
    """The loaded model of a supervised detector (None for the one-class ones); refused unless its card matches
    the pipeline."""
    if scoring.model is None:
        return None
    from .learned import load_model

    return load_model(scoring.model, pipeline)


def encode_prepared(prepared: Prepared, encoder_settings: EncoderSettings | None = None
                    ) -> tuple[FeatureMap, FeatureMap, dict[str, str]]:
    """Dense features of both harmonised visits (encoder settings default to the pipeline's)."""
    from .encoding import Encoder

    encoder = Encoder(encoder_settings or prepared.pipeline.encoding)
    b_arr = prepared.baseline_harmonised.array.astype(np.float32)
    f_arr = prepared.followup_harmonised.array.astype(np.float32)
    features_b, features_f, _ = encoder.encode_pair(b_arr, f_arr, prepared.mask, rgb=prepared.baseline_harmonised.is_rgb)
    return features_b, features_f, {k: ("" if v is None else str(v)) for k, v in encoder.describe().items()}


def score_prepared(prepared: Prepared, detector: ChangeDetector | None = None,
                   encoder_settings: EncoderSettings | None = None, scoring_settings: ScoringSettings | None = None,
                   features: tuple[FeatureMap, FeatureMap, dict[str, str]] | None = None,
                   trained=None) -> Comparison:
    """Encode (when the scoring uses encoder features) and score a prepared pair.

    `encoder_settings` / `scoring_settings` override the pipeline's (the evaluation's baselines);
    `features` = (features_b, features_f, encoder description) already computed for this pair; `trained`: the
    loaded model of a supervised detector (`trained_model`)."""
    from .scoring import score_regions

    pipeline = prepared.pipeline
    scoring = scoring_settings or pipeline.scoring
    if prepared.reason is not None or prepared.identical:
        return _without_scores(prepared, scoring)
    baseline, followup, registration = prepared.baseline, prepared.followup, prepared.registration
    mask = prepared.mask
    timings = dict(prepared.timings_s)
    clock = time.perf_counter()
    features_b = features_f = None
    encoder_info = {"name": "none"}
    from .scoring import intensity_change

    inputs = _scoring_inputs(prepared, scoring)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # the intensity maps need no features: made while the encoder runs (scipy and torch both work outside
        # the GIL), the same arrays as after it
        intensity = pool.submit(intensity_change, *inputs, scoring)
        if "encoder" in scoring.maps:
            features_b, features_f, encoder_info = features or encode_prepared(prepared, encoder_settings)
        timings["encoding"] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()
        intensity_maps = intensity.result()
    # intensity_change's first map (the detector's) inside the scoring inputs' mask (the scored region)
    strongest = float(intensity_maps[0][inputs[2]].max(initial=0.0))
    X, names, regions, labels, maps = region_features_prepared(prepared, scoring, features_b, features_f, trained,
                                                               inputs, intensity_maps)
    del features_b, features_f, inputs, intensity_maps  # the maps hold what is left (1 mm: features 210 MB)
    spacing_zyx = tuple(reversed(baseline.spacing))
    mask = maps.mask
    scores = score_regions(X, names, regions, mask, labels, spacing_zyx, scoring, detector, trained)
    timings["scoring"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    found, pair_score = findings_of(scores, regions, labels, mask, maps,
                                    gray_array(prepared.baseline_harmonised.array),
                                    gray_array(prepared.followup_harmonised.array), spacing_zyx, scoring)
    labels_b = np.zeros(mask.shape, np.uint16)
    for k, finding in enumerate(found, start=1):
        labels_b[tuple(finding.voxels.T)] = k
    timings["findings"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    change_map_baseline = _on_grid(scores.voxel_map, baseline)
    labels_baseline = _on_grid(labels_b, baseline)
    change_map = registration.to_moving(change_map_baseline, followup, sitk.sitkLinear)
    finding_labels = registration.to_moving(labels_baseline, followup, sitk.sitkNearestNeighbor)
    finding_labels = finding_labels.with_itk(sitk.Cast(finding_labels.itk, sitk.sitkUInt16))
    flagged_mask = finding_labels.with_itk(sitk.Cast(finding_labels.itk > 0, sitk.sitkUInt8))
    timings["mapping"] = round(time.perf_counter() - clock, 3)
    scored = _finding_rows(found, baseline, scores) + _context_rows(regions, scores, len(found))
    progression = bool(found)
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
        progression_score=float(pair_score),
        progression=progression,
        strongest_change=strongest,
        threshold=scores.threshold,
        false_alarm_rate=scores.false_alarm_rate,
        false_findings_per_pair=scoring.false_findings_per_pair,
        registration=registration,
        pipeline=pipeline,
        encoder=encoder_info,
        timings_s=timings,
        regions_scored=len(regions),
        verdict="progression" if progression else "no progression",
        warnings=_warnings(prepared),
        analysis_mask=_on_grid(mask.astype(np.uint8), baseline),
        finding_labels=finding_labels,
        finding_labels_baseline=labels_baseline,
    )


def findings_of(scores: PairScores, regions: list[Region], labels: np.ndarray | None, mask: np.ndarray,
                maps: ChangeMaps, baseline_gray: np.ndarray, followup_gray: np.ndarray, spacing_zyx,
                scoring: ScoringSettings) -> tuple[list[Finding], float]:
    """(findings above the threshold, pair score) of a scored pair.

    Regions a little below the threshold are outlined too, and the pair score is the best outlined candidate's:
    a stable pair's near-misses then rank below a real change, and a region with no measurable change of its
    tissue (nuisance the detector still found unusual) ranks nowhere."""
    from .findings import outline
    from .scoring import region_max_map

    # the highest-scoring region holding each voxel: the largest score rank, mapped back to the region
    order = np.argsort(scores.region_scores, kind="stable")
    rank = np.empty(len(order), np.float32)
    rank[order] = np.arange(len(order), dtype=np.float32)
    top = region_max_map(regions, rank, mask, labels, fill=-1).astype(np.int64)
    region_of_voxel = np.where(top >= 0, order[np.maximum(top, 0)], -1)
    floor = scores.threshold - scoring.candidate_margin
    near = scores.region_scores > floor
    candidate_voxels = region_max_map([r for r, c in zip(regions, near) if c], np.ones(int(near.sum()), np.float32),
                                      mask, labels, fill=0.0) > 0
    candidates = outline(candidate_voxels, maps.signed, maps.fine, mask, region_of_voxel, scores.region_scores,
                         baseline_gray,
                         followup_gray, spacing_zyx, scoring.merge_mm, scoring.extent_fraction,
                         scoring.min_change, scoring.extent_floor, scoring.relative_change, scoring.min_volume_mm3,
                         scoring.min_fine_change, maps.evidence, maps.evidence_min)
    found = [c for c in candidates if c.score > scores.threshold]
    pair_score = candidates[0].score if candidates else min(floor, float(scores.region_scores.max(initial=floor)))
    return found, float(pair_score)


def _warnings(prepared: Prepared) -> tuple[str, ...]:
    out = []
    if prepared.identical:
        out.append("The two inputs hold identical pixel data: the same scan was given twice, so nothing changed "
                   "and registration was skipped.")
    if prepared.reason is not None:
        out.append(f"Not comparable: {prepared.reason}.")
    shared = prepared.registration.qc.shared_fraction
    if shared < 0.999:
        out.append(f"The follow-up imaged {100 * shared:.0f} % of the baseline's foreground; only the part both "
                   "visits imaged was compared.")
    return tuple(out)


def _without_scores(prepared: Prepared, scoring: ScoringSettings) -> Comparison:
    """A pair with nothing to score: identical inputs (no progression, score 0) or a pair that cannot be compared
    (no score, no verdict on change). Its images and registration, an empty change map, no findings."""
    baseline, followup = prepared.baseline, prepared.followup
    zero_b = _on_grid(np.zeros(prepared.mask.shape, np.float32), baseline)
    zero_f = prepared.registration.to_moving(zero_b, followup, sitk.sitkNearestNeighbor)
    labels_b = zero_b.with_itk(sitk.Cast(zero_b.itk, sitk.sitkUInt16))
    labels_f = zero_f.with_itk(sitk.Cast(zero_f.itk, sitk.sitkUInt16))
    return Comparison(
        baseline=baseline, followup=followup, registered=prepared.registration.registered,
        baseline_harmonised=prepared.baseline_harmonised, followup_harmonised=prepared.followup_harmonised,
        change_map_baseline=zero_b, change_map=zero_f,
        flagged_mask=zero_f.with_itk(sitk.Cast(zero_f.itk, sitk.sitkUInt8)), regions=(),
        progression_score=None if prepared.reason else 0.0, progression=False, threshold=math.nan,
        strongest_change=None if prepared.reason else 0.0,
        false_alarm_rate=math.nan, false_findings_per_pair=scoring.false_findings_per_pair,
        registration=prepared.registration, pipeline=prepared.pipeline,
        encoder={"name": "none"}, timings_s=dict(prepared.timings_s), regions_scored=0,
        verdict="not comparable" if prepared.reason else "no progression", warnings=_warnings(prepared),
        reason=prepared.reason, identical=prepared.identical,
        analysis_mask=_on_grid(prepared.mask.astype(np.uint8), baseline), finding_labels=labels_f,
        finding_labels_baseline=labels_b,
    )


# (baseline grey, follow-up grey, scored mask, spacing zyx): what a pair's change maps are computed from
ScoringInputs = tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]]


def _scoring_inputs(prepared: Prepared, scoring: ScoringSettings) -> ScoringInputs:
    b_arr = gray_array(prepared.baseline_harmonised.array.astype(np.float32))
    f_arr = gray_array(prepared.followup_harmonised.array.astype(np.float32))
    spacing_zyx = tuple(reversed(prepared.baseline.spacing))
    return b_arr, f_arr, scored_mask(prepared.mask, spacing_zyx, scoring.edge_margin_mm), spacing_zyx


def region_features_prepared(prepared: Prepared, scoring: ScoringSettings, features_b: FeatureMap | None = None,
                             features_f: FeatureMap | None = None, trained=None, inputs: ScoringInputs | None = None,
                             intensity: IntensityChange | None = None):
    """(X, feature names, regions, labels, change maps) of a prepared pair: the change maps pooled over its
    regions. Component regions are made here, from the change maps themselves. A Siamese model (`trained`) adds
    its voxel map of change probability as the "siamese" map. `inputs` / `intensity`: the pair's scoring inputs
    and `scoring.intensity_change` of them, when already computed."""
    from .regions import component_regions
    from .scoring import change_maps, combined_change, feature_names, region_features

    b_arr, f_arr, mask, spacing_zyx = inputs if inputs is not None else _scoring_inputs(prepared, scoring)
    extra = {}
    if scoring.detector == "siamese":
        from .learned import change_probability

        extra["siamese"] = change_probability(trained, prepared).probability
    maps = change_maps(b_arr, f_arr, features_b, features_f, mask, spacing_zyx, scoring, extra, intensity)
    if "siamese" in extra:
        maps = replace(maps, evidence=np.where(maps.mask, extra["siamese"], 0.0),
                       evidence_min=trained.operating_threshold(scoring.false_findings_per_pair))
    regions, labels = prepared.regions, prepared.labels
    if regions is None:
        regions, labels = component_regions(prepared.baseline.itk, mask, combined_change(maps.maps),
                                            prepared.pipeline.regions)
    X = region_features(maps.maps, regions, mask, labels)
    return X, feature_names(maps.maps), regions, labels, maps


def scored_mask(compared: np.ndarray, spacing_zyx, margin_mm: float) -> np.ndarray:
    """The compared voxels at least `margin_mm` inside the compared region: at its outline (the brain's surface
    against CSF and skull, the edge of a field of view) a fraction of a millimetre of residual misalignment or
    distortion changes partial volumes everywhere, and a lesion is not made of that."""
    if margin_mm <= 0 or not compared.any():
        return compared
    from scipy import ndimage

    # the transform only inside the compared box (plus the one-voxel rim of "outside" it needs): the same
    # distances, on a brain's box about a third of the head's volume
    box = ndimage.find_objects(compared.astype(np.uint8))[0]
    inside = ndimage.distance_transform_edt(np.pad(compared[box], 1), sampling=spacing_zyx)
    out = np.zeros_like(compared, dtype=bool)
    out[box] = inside[(slice(1, -1),) * compared.ndim] > margin_mm
    return out


def _on_grid(array: np.ndarray, reference: Image) -> Image:
    itk = sitk.GetImageFromArray(array)
    itk.CopyInformation(reference.itk)
    return reference.with_itk(itk)


def _finding_rows(found, reference: Image, scores) -> tuple[ScoredRegion, ...]:
    out = []
    for k, f in enumerate(found, start=1):
        centre_zyx = f.voxels.mean(0)
        centre = reference.itk.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre_zyx[::-1]])
        lo, hi = f.voxels.min(0), f.voxels.max(0) + 1
        out.append(ScoredRegion(
            id=k, label="change", centre_mm=tuple(round(c, 2) for c in centre),
            bbox=(tuple(int(v) for v in lo[::-1]), tuple(int(v) for v in hi[::-1])),
            volume_mm3=round(f.volume_mm3, 2), score=round(f.score, 3), flagged=True,
            stats=_stats(scores, f.region) if f.region >= 0 else {}, diameter_mm=round(f.diameter_mm, 2),
            mean_change_pct=round(f.mean_change_pct, 2) if math.isfinite(f.mean_change_pct) else None,
            n_voxels=int(len(f.voxels)), centre_index=tuple(int(round(v)) for v in centre_zyx[::-1]),
        ))
    return tuple(out)


def _context_rows(regions, scores, first_id: int, context: int = 20) -> tuple[ScoredRegion, ...]:
    """The highest-scoring unflagged regions, for context."""
    unflagged = [i for i in np.argsort(-scores.region_scores) if scores.region_scores[i] <= scores.threshold][:context]
    return tuple(ScoredRegion(
        id=first_id + k, label=regions[i].label, centre_mm=regions[i].centre_mm, bbox=regions[i].bbox,
        volume_mm3=regions[i].volume_mm3, score=round(float(scores.region_scores[i]), 3), flagged=False,
        stats=_stats(scores, i),
    ) for k, i in enumerate(unflagged, start=1))


def _stats(scores, i: int) -> dict[str, float]:
    return {name: round(float(v), 3) for name, v in zip(scores.feature_names, scores.region_stats[i])}
