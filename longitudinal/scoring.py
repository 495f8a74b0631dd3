"""Scoring change: voxel change maps, per-region change features, a one-class detector, calibrated scores.

What differs between two scans without anything having changed (noise, a residual bias field, gain and
intensity curve, ~1 mm of residual misalignment or scanner distortion) is removed or discounted before any
detector sees it:

- intensity: log ratio of the harmonised visits (gain, residual intensity curve and shading were divided out
  by `preprocessing.local_correction`), divided by what noise and misalignment alone would give at that voxel
  (sqrt(noise^2 + (gradient x misalignment)^2): edges move, flat tissue does not), then pooled over ~1.5 mm,
  less its surround where `surround_mm` is set (broad shading is not a lesion);
- encoder: per-stage distance of the two visits' dense CNN features, each channel scaled by its typical
  difference inside the foreground.

Each region gets the mean and maximum of every map. A One-Class SVM (or Isolation Forest) learns what
unchanged regions look like - from the pair itself (most anatomy is stable) or from stable pairs of a cohort (a
normative model) - and its decision values are turned into p-values against null regions: empirical in the
bulk, a generalized Pareto tail (shape >= 0, so beyond the largest null value scores stay finite and ordered)
above the 90th percentile (shape fixed by `tail_shape`, or fitted and capped at MAX_SHAPE). A region's score is
-log10(p). The threshold is set per pair from `false_findings_per_pair`: the per-region rate is that number over
the pair's independent regions (compared volume / mean region volume), so a stable pair shows that many false
findings on average whatever its voxel size or field of view. Within a pair the null is refitted without
extended clusters of suspect regions, so a large change does not calibrate itself away.

Regions only say where to look: the findings (`findings.outline`) are the pieces of changed tissue in a
flagged group whose pooled change stands `min_change` times above the pooled noise. How well this holds on
scans no setting was chosen on: docs/change-detection.md (benchmarks/generalisation.py, dev beside validation).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.stats import genpareto, median_abs_deviation

from .encoding import FeatureMap
from .errors import InputError
from .preprocessing import masked_smooth
from .regions import Region, box_sums
from .settings import check, choices, require

log = logging.getLogger(__name__)

MapKind = Literal["intensity", "subtraction", "encoder"]
MAP_KINDS = choices(MapKind)
MAX_SCORE = 300.0  # -log10 of the smallest p-value reported
# Generalized Pareto shape cap. The fitted shape of sample brain pairs reaches it (heavier fitted tails come from a
# handful of extreme regions), so the cap sets how hard far-out regions are compressed: at 0.5 a small lesion's
# margin over nuisance was a fraction of a score unit; at 0.3 the stable sample pairs show ~1 finding at 1e-4 per
# region (2.2 overlapping regions expected) on both brain sets (benchmarks/margins.py, docs/change-detection.md).
MAX_SHAPE = 0.3
MODEL_FORMAT = "longitudinal.ChangeDetector"  # normative model files (modelfile: arrays + JSON)


@dataclass(frozen=True)
class ScoringSettings:
    """How change is measured and when a region is flagged; a `[scoring]` TOML table sets these by name."""

    detector: str = "ocsvm"  # a name registered in `detectors` (ocsvm, iforest, ...)
    nu: float = 0.05  # OCSVM: upper bound on the fraction of fitting regions treated as outliers
    gamma: float | str = 0.5  # RBF width on robustly scaled features (10-90 % range = 1)
    n_estimators: int = 200  # Isolation Forest
    # The flagging threshold is set per pair so that a pair without change shows this many false findings on
    # average, whatever its voxel size, field of view and region grid: the per-region false-alarm rate is this
    # divided by the number of independent regions (the compared volume over the mean region volume).
    false_findings_per_pair: float = 0.2
    # Generalized Pareto shape of the null tail: None fits it per pair (capped at MAX_SHAPE); a number fixes it
    # (chosen on a dev cohort), and only the bulk of the pair's regions sets the scale, never its extremes.
    tail_shape: float | None = None
    normative_model: Path | None = None  # fitted by `longitudinal fit-normative`; None = fit within the pair
    # a model trained by `longitudinal train`, for the supervised detectors ("svm", "rf", "siamese")
    model: Path | None = None
    # Change maps the detector sees: "intensity" (bias- and misalignment-tolerant log ratio), "encoder"
    # (per-stage feature distance), "subtraction" (plain |F - B| after harmonisation: the naive baseline).
    maps: tuple[MapKind, ...] = ("intensity", "encoder")
    smoothing_mm: float = 1.0  # pooling of the intensity maps, against single-voxel noise
    pool_mm: float = 1.5  # pooling of the signed intensity change over about a small lesion's radius
    # > 0: the pooled change minus its surround pooled this wide (a centre-surround filter): shading of 5-10 mm
    # that no smooth intensity model removed is broad, a small lesion is compact. 0 = off.
    surround_mm: float = 0.0
    misalignment_mm: float = 1.0  # residual misalignment/distortion tolerated at edges
    max_fit_regions: int = 3000  # regions subsampled to fit the detector (OCSVM is quadratic in them)
    tail_fraction: float = 0.1  # upper fraction of null scores described by the generalized Pareto tail
    trim_iterations: int = 3  # within a pair: refit the null without the regions touching suspect ones
    trim_level: float = 2.5  # -log10 p above which a region is suspect (not null) when the null is refitted
    trim_min_volume_mm3: float = 4000.0  # ... if its cluster of suspect regions is at least this large (~16 mm cube)
    merge_mm: float = 3.0  # flagged tissue at most this far apart is one finding (a cube cut by a sulcus, a rim)
    candidate_margin: float = 1.0  # regions this far below the threshold are outlined too (for the pair score)
    # voxels this close to the compared region's outline are not scored (the brain's surface, a field of view's
    # edge: partial volumes there change with any residual misalignment)
    edge_margin_mm: float = 0.0
    # a finding is the changed tissue: connected voxels of one sign at least this fraction of the change's plateau
    extent_fraction: float = 0.5
    # ... a piece whose pooled change stays below this (in units of the pooled noise) did not change measurably
    min_change: float = 4.0
    extent_floor: float = 2.0  # changed tissue is at least this far out of the unpooled noise (noise units)
    relative_change: float = 0.0  # pieces under this fraction of their group's strongest change are left out
    min_volume_mm3: float = 0.0  # ... and pieces of changed tissue smaller than this
    # > 0: a piece under min_change whose unpooled change reaches this (noise units) is a finding all the same:
    # pooling dilutes a change of a few voxels below min_change. 0 = off
    min_fine_change: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check(self)
        from .detectors import DETECTORS, SUPERVISED

        require(self.detector in DETECTORS, "detector", f"must be one of {', '.join(sorted(DETECTORS))}, got "
                f"{self.detector!r}")
        require((self.detector in SUPERVISED) == (self.model is not None), "model" if self.model else "detector",
                f"detector {self.detector!r} " + ("needs a trained model: model = \"PATH\""
                if self.detector in SUPERVISED else "takes no trained model (model is for "
                + ", ".join(SUPERVISED) + ")"))
        require(bool(self.maps), "maps", f"must name at least one of {', '.join(MAP_KINDS)}")
        require(self.false_findings_per_pair > 0.0, "false_findings_per_pair", "must be > 0")
        require(self.tail_shape is None or 0.0 <= self.tail_shape < 1.0, "tail_shape", "must be in [0, 1)")
        require(not self.surround_mm or self.surround_mm > self.pool_mm, "surround_mm",
                f"must be 0 (off) or wider than pool_mm {self.pool_mm}")
        require(0.0 < self.tail_fraction < 1.0, "tail_fraction", "must be in (0, 1)")
        require(self.max_fit_regions >= 10, "max_fit_regions", "must be >= 10")
        require(self.min_fine_change >= 0.0, "min_fine_change", "must be >= 0 (0: off)")

    def false_alarm_rate(self, n_independent: float) -> float:
        """Per-region rate for a pair of `n_independent` independent regions (capped below 1)."""
        return float(min(0.5, self.false_findings_per_pair / max(n_independent, 1.0)))


def independent_regions(regions: list[Region], mask: np.ndarray, labels: np.ndarray | None,
                        voxel_mm3: float) -> float:
    """How many regions' worth of independent tissue a pair holds: the compared volume over the mean region
    volume. Overlapping cubes share voxels, so one change raises several at once; this counts each place once."""
    if not regions:
        return 0.0
    covered = region_max_map(regions, np.ones(len(regions), np.float32), mask, labels, fill=0.0) > 0
    mean_mm3 = float(np.mean([r.volume_mm3 for r in regions]))
    return float(covered.sum()) * voxel_mm3 / max(mean_mm3, 1e-12)


# --------------------------------------------------------------------------- voxel maps


def _robust_z(values: np.ndarray, inside: np.ndarray) -> np.ndarray:
    sample = values[inside]
    median = float(np.median(sample))
    scale = float(median_abs_deviation(sample, scale="normal"))
    if scale <= 1e-12:
        scale = float(sample.std()) or 1.0
    return ((values - median) / scale).astype(np.float32)


# (|change| less its surround, pooled signed change, fine signed change): `intensity_change`
IntensityChange = tuple[np.ndarray, np.ndarray, np.ndarray]


def intensity_change(baseline: np.ndarray, followup: np.ndarray, mask: np.ndarray, spacing_zyx,
                     settings: "ScoringSettings") -> IntensityChange:
    """(|change|, signed change, fine signed change), in units of what noise (and, for the first two,
    misalignment) alone would produce at each voxel.

    The first is the detector's map (less its surround where `surround_mm` is set); the second, pooled over
    `pool_mm`, keeps the sign (+: brighter at follow-up) and says whether a finding's tissue changed at all; the
    third, smoothed over `smoothing_mm` only, outlines the changed tissue (pooling would blur its edge)."""
    inside = mask.astype(bool)
    sp = np.asarray(spacing_zyx, float)
    floor = max(float(np.percentile(baseline[inside], 1)), 1e-3) if inside.any() else 1.0
    lb = np.log(np.maximum(baseline.astype(np.float32), floor))
    lf = np.log(np.maximum(followup.astype(np.float32), floor))
    sigma = settings.smoothing_mm / sp
    sb, sf = ndimage.gaussian_filter(lb, sigma), ndimage.gaussian_filter(lf, sigma)
    del lb, lf  # each intermediate is a whole volume (35 MB at 1 mm): freed as soon as it is used
    # Misalignment moves edges that both visits have; an edge in one visit only (a new lesion's rim) is change,
    # so the tolerated gradient is the smaller of the two visits' at each voxel.
    grad2 = np.minimum(*(sum((ndimage.sobel(v, axis=a) / (8.0 * sp[a])) ** 2 for a in range(v.ndim)) for v in (sb, sf)))
    diff = np.where(inside, sf - sb, 0.0)
    del sb, sf
    noise = float(median_abs_deviation(diff[inside], scale="normal")) if inside.any() else 1.0
    z = diff / np.sqrt(noise ** 2 + grad2 * settings.misalignment_mm ** 2 + 1e-12)
    del grad2
    # a lesion changes its voxels the same way: pool the signed change over about its size (matched filter)
    z = z.astype(np.float32)
    pooled = masked_smooth(z, inside, settings.pool_mm / sp)
    band = pooled - masked_smooth(z, inside, settings.surround_mm / sp) if settings.surround_mm > 0 else pooled
    fine = np.where(inside, diff / max(noise, 1e-12), 0.0).astype(np.float32)
    # the pooled change in units of its own noise (pooling shrinks the noise, not a lesion's change)
    spread = float(median_abs_deviation(pooled[inside], scale="normal")) if inside.any() else 1.0
    signed = np.where(inside, pooled / max(spread, 1e-12), 0.0).astype(np.float32)
    return np.abs(band).astype(np.float32), signed, fine


def subtraction_change(baseline: np.ndarray, followup: np.ndarray, spacing_zyx, settings: "ScoringSettings") -> np.ndarray:
    """Plain |F - B| after harmonisation, smoothed like the other maps: the naive baseline method."""
    sigma = settings.smoothing_mm / np.asarray(spacing_zyx, float)
    return ndimage.gaussian_filter(np.abs(followup.astype(np.float32) - baseline.astype(np.float32)), sigma)


def feature_distances(features_b: FeatureMap, features_f: FeatureMap, mask: np.ndarray | None = None) -> list[np.ndarray]:
    """Per encoder stage, the distance of the two visits' features at every voxel.

    Each channel is scaled by its median absolute difference inside the foreground, so no channel dominates
    and the distance reads as 'times the typical between-visit difference'."""
    diff = features_b.data - features_f.data
    cell_mask = None
    if mask is not None:
        cell_mask = _cells_of(mask.astype(bool), features_b)
    stages = features_b.stage_channels or (features_b.channels,)
    out, start = [], 0
    for c in stages:
        d = diff[start:start + c]
        start += c
        sample = d[:, cell_mask] if cell_mask is not None and cell_mask.any() else d.reshape(c, -1)
        scale = np.median(np.abs(sample), axis=1) + 1e-6
        dist = np.sqrt(((d / scale.reshape((c,) + (1,) * (d.ndim - 1))) ** 2).mean(0)).astype(np.float32)
        out.append(FeatureMap(dist[None], features_b.stride, features_b.input_shape).upsampled()[0])
    return out


def _cells_of(mask: np.ndarray, fm: FeatureMap) -> np.ndarray:
    """Feature cells with any foreground voxel."""
    pad = [(0, g * s - n) for g, s, n in zip(fm.grid_shape, fm.stride, mask.shape)]
    m = np.pad(mask, pad)
    shape = []
    for g, s in zip(fm.grid_shape, fm.stride):
        shape += [g, s]
    return m.reshape(shape).any(axis=tuple(range(1, 2 * len(fm.grid_shape), 2)))


@dataclass(frozen=True, eq=False)
class ChangeMaps:
    """Voxel maps of change on the baseline grid: the detector's features, and the signed change findings are
    outlined and described with."""

    maps: dict[str, np.ndarray]  # each robustly standardised inside the mask, higher = more change
    signed: np.ndarray  # pooled signed change in units of its noise (+: brighter at follow-up), 0 outside
    fine: np.ndarray  # the same, smoothed but not pooled: where the changed tissue ends
    mask: np.ndarray  # the voxels the maps were computed on (and that regions, scores and findings use)
    # a supervised detector's own voxel map (Siamese: change probability) and the level at which its voxels are
    # changed tissue: findings are its pieces then (findings.outline), not the intensity gate's
    evidence: np.ndarray | None = None
    evidence_min: float = 0.5


def change_maps(
    baseline: np.ndarray,
    followup: np.ndarray,
    features_b: FeatureMap | None,
    features_f: FeatureMap | None,
    mask: np.ndarray,
    spacing_zyx: tuple[float, ...],
    settings: ScoringSettings,
    extra: dict[str, np.ndarray] | None = None,
    intensity: IntensityChange | None = None,
) -> ChangeMaps:
    """Voxel maps of change on the baseline grid, each robustly standardised inside the mask; `extra`: maps made
    elsewhere (a learned detector's voxel map), standardised the same way; `intensity`: `intensity_change` of
    these arrays, when already computed."""
    inside = mask.astype(bool)
    maps: dict[str, np.ndarray] = {}
    if intensity is None:
        intensity = intensity_change(baseline, followup, mask, spacing_zyx, settings)
    magnitude, signed, fine = intensity
    if "intensity" in settings.maps:
        maps["intensity"] = _robust_z(magnitude, inside)
    if "subtraction" in settings.maps:
        maps["subtraction"] = _robust_z(subtraction_change(baseline, followup, spacing_zyx, settings), inside)
    if "encoder" in settings.maps:
        if features_b is None or features_f is None:
            raise ValueError("scoring.maps includes 'encoder' but no features were given")
        for k, d in enumerate(feature_distances(features_b, features_f, inside), start=1):
            maps[f"encoder_stage{k}"] = _robust_z(d, inside)
    for name, values in (extra or {}).items():
        maps[name] = _robust_z(values, inside)
    return ChangeMaps(maps, signed, fine, inside)


# --------------------------------------------------------------------------- region features


def feature_names(map_names) -> tuple[str, ...]:
    return tuple(f"{m}_{stat}" for m in map_names for stat in ("mean_z", "max_z"))


def _boxes(regions: list[Region]) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) in numpy axis order."""
    lo = np.array([r.bbox[0][::-1] for r in regions], np.int64)
    hi = np.array([r.bbox[1][::-1] for r in regions], np.int64)
    return lo, hi


def region_features(maps: dict[str, np.ndarray], regions: list[Region], mask: np.ndarray,
                    labels: np.ndarray | None) -> np.ndarray:
    """Mean and max of every map over each region's foreground voxels (columns as `feature_names(maps)`).

    Boxes (grid regions) use integral images and one maximum filter, so 30k overlapping cubes cost about as
    much as one pass over the image; label regions use scipy's labelled statistics."""
    inside = mask.astype(bool)
    rows = np.zeros((len(regions), 2 * len(maps)), np.float32)
    if not regions:
        return rows
    if all(r.value is None for r in regions):
        lo, hi = _boxes(regions)
        count = np.maximum(box_sums(inside, lo, hi), 1)
        edge = Counter(map(tuple, hi - lo)).most_common(1)[0][0]
        centre = np.minimum(lo + np.array(edge) // 2, np.array(mask.shape) - 1)
        regular = np.all(hi - lo == np.array(edge), axis=1)
        for j, values in enumerate(maps.values()):
            rows[:, 2 * j] = box_sums(np.where(inside, values, 0.0), lo, hi) / count
            masked = np.where(inside, values, -np.inf).astype(np.float32)
            rows[:, 2 * j + 1] = ndimage.maximum_filter(masked, size=edge, mode="constant", cval=-np.inf)[tuple(centre.T)]
            for i in np.flatnonzero(~regular):  # boxes cut by the image edge
                s = regions[i].slices()
                rows[i, 2 * j + 1] = masked[s].max()
        rows[~np.isfinite(rows)] = 0.0
        return rows
    if labels is None:
        raise ValueError("label regions need the label array")
    values_of = np.array([r.value for r in regions])
    lab = np.where(inside, labels, 0)
    for j, values in enumerate(maps.values()):
        rows[:, 2 * j] = ndimage.mean(values, lab, values_of)
        rows[:, 2 * j + 1] = ndimage.maximum(values, lab, values_of)
    return np.nan_to_num(rows)


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True, eq=False)
class TailCalibration:
    """p-values of raw detector outputs against null (unchanged) regions: empirical below `u`, a generalized
    Pareto tail above it. Shape is kept >= 0 (exponential at least), so values beyond every null region get
    ever smaller, finite p-values instead of exactly 0."""

    null_sorted: np.ndarray
    u: float
    tail_prob: float
    shape: float
    scale: float

    @classmethod
    def fit(cls, null: np.ndarray, tail_fraction: float = 0.1, shape: float | None = None) -> "TailCalibration":
        """Empirical bulk; generalized Pareto (location 0) on the exceedances over the (1 - tail_fraction)
        quantile. `shape` None: fitted by maximum likelihood (capped at MAX_SHAPE); a number: fixed, and the scale
        comes from the median excess, so the pair's few most extreme regions (often the very changes being
        scored) do not shape their own null."""
        null = np.sort(np.asarray(null, np.float64))
        if len(null) < 20:
            raise InputError(None, f"too few null regions ({len(null)}) to calibrate scores")
        u = float(np.quantile(null, 1.0 - tail_fraction))
        excess = null[null > u] - u
        tail_prob = len(excess) / len(null)
        median = float(np.median(excess)) if len(excess) else 1.0
        if shape is not None:
            # median of a generalized Pareto = scale (2^shape - 1) / shape (scale ln 2 at shape 0)
            scale = median * shape / (2.0 ** shape - 1.0) if shape > 0 else median / math.log(2.0)
            return cls(null, u, max(tail_prob, 1.0 / len(null)), float(shape), max(scale, 1e-12))
        # exponential scale from the median excess (= scale x ln 2) unless the fit says the tail is heavier
        fitted_shape, scale = 0.0, median / math.log(2.0)
        if len(excess) >= 30:
            with np.errstate(all="ignore"):
                try:
                    c, _, sc = genpareto.fit(excess, floc=0.0)
                except (RuntimeError, ValueError):
                    c, sc = 0.0, scale
            if c > 0 and np.isfinite(sc) and sc > 0:
                fitted_shape, scale = min(float(c), MAX_SHAPE), float(sc)
        return cls(null, u, max(tail_prob, 1.0 / len(null)), fitted_shape, max(scale, 1e-12))

    def pvalue(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, np.float64)
        n = len(self.null_sorted)
        empirical = (n - np.searchsorted(self.null_sorted, raw, side="left") + 1) / (n + 1)
        tail = self.tail_prob * genpareto.sf(raw - self.u, self.shape, loc=0.0, scale=self.scale)
        return np.where(raw > self.u, tail, np.maximum(empirical, self.tail_prob))

    def score(self, raw: np.ndarray) -> np.ndarray:
        """-log10 p, capped at MAX_SCORE."""
        p = np.maximum(self.pvalue(raw), 10.0 ** -MAX_SCORE)
        return (-np.log10(p)).astype(np.float64)


# --------------------------------------------------------------------------- detector


class ChangeDetector:
    """A region detector (`detectors`: fit / decision_function) with its scores calibrated to p-values.

    Fitted within a pair, every region is judged by a model that did not learn from it (`held_out_decision`) and
    the calibration null is the pair's own regions; a normative model is fitted on stable pairs of a cohort and
    saved with `save` (arrays + JSON). `score_samples` returns -log10 p-values against the calibration null."""

    def __init__(self, settings: ScoringSettings = ScoringSettings(), trained=None):
        self.settings = settings
        self.trained = trained  # the loaded model of a supervised detector (learned.load_model)

    def fit(self, X: np.ndarray, feature_names_: tuple[str, ...] = ()) -> "ChangeDetector":
        X = np.asarray(X, np.float64)
        if len(X) < 20:
            raise InputError(None, f"too few regions ({len(X)}) to learn what unchanged anatomy looks like")
        self._fit_detector(X, feature_names_)
        s = self.settings
        self.calibration_ = TailCalibration.fit(self.raw(X, fitted=True), s.tail_fraction, s.tail_shape)
        self.n_fit_ = len(X)
        return self

    def _fit_detector(self, X: np.ndarray, feature_names_: tuple[str, ...]) -> "ChangeDetector":
        from .detectors import make_detector

        self.feature_names_ = tuple(feature_names_)
        settings = {**asdict(self.settings), "model": self.trained}
        self.detector_ = make_detector(self.settings.detector, **settings).fit(X, feature_names=self.feature_names_)
        self.fit_rows_ = X[self.detector_.fitted_rows_]
        return self

    def raw(self, X: np.ndarray, fitted: bool = False) -> np.ndarray:
        """Uncalibrated change, higher = less like unchanged anatomy; `fitted`: X is the array the detector was
        fitted on (within a pair), and each row is judged by a model that did not learn from it."""
        return self.detector_.held_out_decision(X) if fitted else self.detector_.decision_function(X)

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return self.calibration_.score(self.raw(X))

    def save(self, path: str | Path) -> None:
        """Arrays plus JSON (`modelfile`), never a pickle: the rows the model was fitted on, its settings and its
        calibration. `load` refits on those rows with the same seed, which gives the same model."""
        from . import modelfile

        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.settings).items()}
        cal = self.calibration_
        meta = {"version": 1, "settings": settings, "feature_names": list(self.feature_names_), "n_fit": self.n_fit_,
                "calibration": {"u": cal.u, "tail_prob": cal.tail_prob, "shape": cal.shape, "scale": cal.scale}}
        modelfile.save(path, MODEL_FORMAT, meta, {"fit_rows": self.fit_rows_, "null_sorted": cal.null_sorted})

    @classmethod
    def load(cls, path: str | Path) -> "ChangeDetector":
        from . import modelfile

        meta, arrays = modelfile.load(path, MODEL_FORMAT)
        try:
            if meta["version"] != 1:
                raise ValueError(f"version {meta['version']!r} is not 1")
            raw = dict(meta["settings"])
            raw["maps"] = tuple(raw["maps"])
            raw["normative_model"] = None
            raw["model"] = None
            settings = ScoringSettings(**raw)
            names = tuple(str(n) for n in meta["feature_names"])
            fit_rows = np.asarray(arrays["fit_rows"], np.float64)
            null = np.asarray(arrays["null_sorted"], np.float64)
            if fit_rows.ndim != 2 or fit_rows.shape[1] != len(names) or not np.isfinite(fit_rows).all():
                raise ValueError(f"fit_rows of shape {fit_rows.shape} do not match {len(names)} feature names")
            if null.ndim != 1 or len(null) < 20 or not np.isfinite(null).all():
                raise ValueError("calibration sample is empty, too small or not finite")
            c = meta["calibration"]
            calibration = TailCalibration(np.sort(null), float(c["u"]), float(c["tail_prob"]), float(c["shape"]),
                                          float(c["scale"]))
            n_fit = int(meta["n_fit"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(path, f"normative model file is inconsistent ({type(exc).__name__}: {exc})") from None
        detector = cls(dataclasses.replace(settings, max_fit_regions=max(len(fit_rows), 10)))._fit_detector(
            fit_rows, names)
        detector.calibration_ = calibration
        detector.n_fit_ = n_fit
        return detector


# --------------------------------------------------------------------------- a pair


@dataclass(frozen=True, eq=False)
class PairScores:
    """A pair's change, on the baseline grid."""

    region_scores: np.ndarray  # (n_regions,) -log10 p; flagged above `threshold`
    region_stats: np.ndarray  # (n_regions, len(feature_names))
    voxel_map: np.ndarray  # per voxel: the highest score of the regions holding it, same scale as `threshold`
    flagged_mask: np.ndarray  # bool: foreground voxels of flagged regions
    threshold: float
    feature_names: tuple[str, ...] = ()
    false_alarm_rate: float = math.nan  # per region, for this pair: false_findings_per_pair / n_independent
    n_independent: float = math.nan


def score_pair(
    baseline: np.ndarray,
    followup: np.ndarray,
    features_b: FeatureMap | None,
    features_f: FeatureMap | None,
    mask: np.ndarray,
    spacing_zyx: tuple[float, ...],
    regions: list[Region],
    labels: np.ndarray | None,
    settings: ScoringSettings,
    detector: ChangeDetector | None = None,
) -> PairScores:
    """Score every region; `detector` is a fitted normative model, else one is fitted within the pair."""
    maps = change_maps(baseline, followup, features_b, features_f, mask, spacing_zyx, settings).maps
    X = region_features(maps, regions, mask, labels)
    return score_regions(X, feature_names(maps), regions, mask, labels, spacing_zyx, settings, detector)


def score_regions(X: np.ndarray, names: tuple[str, ...], regions: list[Region], mask: np.ndarray,
                  labels: np.ndarray | None, spacing_zyx, settings: ScoringSettings,
                  detector: ChangeDetector | None = None, trained=None) -> PairScores:
    """Calibrated scores of regions whose change features are `X` (columns `names`): by a normative
    `detector`, or by one fitted (one-class) or applied (supervised: `trained`, a loaded model) within the pair,
    its raw scores calibrated against the pair's own regions either way."""
    within_pair = detector is None
    if within_pair:
        detector = ChangeDetector(settings, trained).fit(X, names)
    elif getattr(detector, "feature_names_", ()) and tuple(detector.feature_names_) != names:
        raise InputError(None, f"normative model was fitted on features {detector.feature_names_}, "
                               f"this pipeline makes {names}: fit it with the same pipeline")
    n_independent = independent_regions(regions, mask, labels, float(np.prod(spacing_zyx)))
    alpha = settings.false_alarm_rate(n_independent)
    threshold = float(-math.log10(alpha))
    if within_pair:
        scores = _trimmed_scores(detector, X, regions, mask, labels, settings, float(np.prod(spacing_zyx)))
    else:
        scores = detector.score_samples(X)
    voxel_map = region_max_map(regions, scores, mask, labels, fill=0.0)
    flagged = scores > threshold
    flagged_mask = region_max_map([r for r, f in zip(regions, flagged) if f], np.ones(int(flagged.sum())),
                                  mask, labels, fill=0.0) > 0
    return PairScores(scores, X, voxel_map, flagged_mask, threshold, names, alpha, n_independent)


def combined_change(maps: dict[str, np.ndarray]) -> np.ndarray:
    """One voxel statistic from all maps (each a robust z): their mean, so a blob must change in every view."""
    return np.mean(np.stack(list(maps.values())), axis=0)


def _trimmed_scores(detector: ChangeDetector, X, regions, mask, labels, settings: ScoringSettings,
                    voxel_mm3: float) -> np.ndarray:
    """Scores against the pair's own null, refitted without the regions that touch flagged voxels.

    A large change spans hundreds of overlapping regions: left in the null, it fattens the very tail it must
    stand out from (and calibrates itself away). Each round removes every region overlapping the flagged voxels
    from the calibration sample; unchanged pairs lose few regions, so their false-alarm rate barely moves."""
    raw = detector.raw(X, fitted=True)
    null = np.ones(len(X), bool)
    cal = detector.calibration_
    for _ in range(settings.trim_iterations):
        flagged = cal.score(raw) > settings.trim_level
        if not flagged.any():
            break
        hit = region_max_map([r for r, f in zip(regions, flagged) if f], np.ones(int(flagged.sum())), mask, labels) > 0
        # only extended suspect clusters: isolated outliers are what unchanged anatomy does and stay in the null
        comps, n = ndimage.label(hit)
        if n:
            volume_mm3 = ndimage.sum_labels(np.ones(hit.shape, np.float32), comps, np.arange(1, n + 1)) * voxel_mm3
            hit = np.isin(comps, 1 + np.flatnonzero(volume_mm3 >= settings.trim_min_volume_mm3))
        if all(r.value is None for r in regions):
            lo, hi = _boxes(regions)
            touching = box_sums(hit, lo, hi) > 0
        else:
            touching = np.array([hit[r.slices()][r.members(mask, labels)].any() for r in regions])
        if not (null & ~touching).sum() > 0.5 * len(X) or np.array_equal(null, ~touching):
            break
        null = ~touching
        cal = TailCalibration.fit(raw[null], settings.tail_fraction, settings.tail_shape)
    return cal.score(raw)


def region_max_map(regions: list[Region], values: np.ndarray, mask: np.ndarray, labels: np.ndarray | None,
                   fill: float = 0.0) -> np.ndarray:
    """Per foreground voxel, the largest value of the regions that hold it (`fill` elsewhere)."""
    out = np.full(mask.shape, -np.inf, np.float32)
    if len(regions):
        lo, hi = _boxes(regions)
        edge = Counter(map(tuple, hi - lo)).most_common(1)[0][0]
        regular = np.all(hi - lo == np.array(edge), axis=1) & np.array([r.value is None for r in regions])
        if regular.any():
            # each cube's value at its first corner; voxel v is in the cubes with corner in (v - edge, v]
            corner = np.full(mask.shape, -np.inf, np.float32)
            np.maximum.at(corner, tuple(lo[regular].T), np.asarray(values, np.float32)[regular])
            origin = [(e - 1) - e // 2 for e in edge]  # scipy's window then spans [v - e + 1, v]
            out = ndimage.maximum_filter(corner, size=edge, mode="constant", cval=-np.inf, origin=origin)
        for i in np.flatnonzero(~regular):
            s = regions[i].slices()
            members = regions[i].members(mask, labels)
            view = out[s]
            view[members] = np.maximum(view[members], values[i])
    out[~mask.astype(bool)] = -np.inf
    out[~np.isfinite(out)] = fill
    return out
