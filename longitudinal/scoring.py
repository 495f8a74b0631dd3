"""Scoring change: per-region change features, a one-class detector of unchanged anatomy, calibrated scores.

The detector learns what "no real change" looks like (noise, residual misalignment, scanner drift) from
regions of the same pair (most anatomy is stable) or from a cohort of stable pairs (a normative model),
and scores every region by how far it lies outside that. Scores are calibrated on the null regions as robust
z-values, so a threshold reads as a per-region false-alarm rate under a Gaussian tail.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.stats import norm
from sklearn.ensemble import IsolationForest
from sklearn.preprocessing import RobustScaler
from sklearn.svm import OneClassSVM

from .encoding import FeatureMap
from .errors import InputError
from .regions import Region

FEATURE_NAMES = (
    "feature_distance_p50",
    "feature_distance_p90",
    "feature_distance_max",
    "intensity_abs_z_mean",
    "intensity_abs_z_p90",
    "intensity_z_p02",
    "intensity_z_p98",
)


@dataclass(frozen=True)
class ScoringSettings:
    detector: Literal["ocsvm", "iforest"] = "ocsvm"
    nu: float = 0.05  # OCSVM: upper bound on the fraction of fitting regions treated as outliers
    gamma: float | str = "scale"
    n_estimators: int = 200  # Isolation Forest
    false_alarm_rate: float = 1e-4  # per region; sets the flagging threshold
    normative_model: Path | None = None  # fitted by `longitudinal fit-normative`; None = fit within the pair
    smoothing_mm: float = 1.0  # of the voxel change maps, against single-voxel noise
    seed: int = 0

    @property
    def threshold(self) -> float:
        """Calibrated score above which a region is flagged."""
        return float(norm.isf(self.false_alarm_rate))


def change_maps(
    baseline: np.ndarray,
    followup: np.ndarray,
    feature_distance: np.ndarray,
    mask: np.ndarray,
    spacing_zyx: tuple[float, ...],
    smoothing_mm: float,
) -> dict[str, np.ndarray]:
    """Voxel maps of change on the baseline grid, each robustly standardised inside the mask."""
    sigma = [smoothing_mm / s for s in spacing_zyx]
    inside = mask.astype(bool)
    diff = ndimage.gaussian_filter(followup.astype(np.float32) - baseline.astype(np.float32), sigma)
    return {
        "intensity_z": _robust_z(diff, inside),
        "feature_distance": _robust_z(feature_distance.astype(np.float32), inside),
    }


def _robust_z(values: np.ndarray, inside: np.ndarray) -> np.ndarray:
    sample = values[inside]
    median = float(np.median(sample))
    scale = 1.4826 * float(np.median(np.abs(sample - median))) or float(sample.std()) or 1.0
    return ((values - median) / scale).astype(np.float32)


def region_features(maps: dict[str, np.ndarray], regions: list[Region], mask: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """One row of change statistics per region (columns as FEATURE_NAMES)."""
    rows = np.zeros((len(regions), len(FEATURE_NAMES)), np.float32)
    for i, region in enumerate(regions):
        s, members = region.slices(), region.members(mask, labels)
        d = maps["feature_distance"][s][members]
        z = maps["intensity_z"][s][members]
        if d.size == 0:
            continue
        dp50, dp90 = np.percentile(d, [50, 90])
        zlo, zhi = np.percentile(z, [2, 98])
        rows[i] = (dp50, dp90, d.max(), np.abs(z).mean(), np.percentile(np.abs(z), 90), zlo, zhi)
    return rows


class ChangeDetector:
    """One-class model of unchanged regions: fit / score_samples / save / load, as scikit-learn estimators."""

    def __init__(self, settings: ScoringSettings = ScoringSettings()):
        self.settings = settings

    def fit(self, X: np.ndarray) -> "ChangeDetector":
        if len(X) < 10:
            raise InputError(None, f"too few regions ({len(X)}) to learn what unchanged anatomy looks like")
        s = self.settings
        self.scaler_ = RobustScaler().fit(X)
        Z = self.scaler_.transform(X)
        if s.detector == "ocsvm":
            self.model_ = OneClassSVM(kernel="rbf", nu=s.nu, gamma=s.gamma).fit(Z)
        else:
            self.model_ = IsolationForest(n_estimators=s.n_estimators, random_state=s.seed).fit(Z)
        raw = self._raw(X)
        self.centre_ = float(np.median(raw))
        self.scale_ = 1.4826 * float(np.median(np.abs(raw - self.centre_))) or float(raw.std()) or 1.0
        return self

    def _raw(self, X: np.ndarray) -> np.ndarray:
        # Both detectors' decision functions are higher for normal samples: negate so higher = more change.
        return -self.model_.decision_function(self.scaler_.transform(X))

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Calibrated change score: a robust z-value against the regions the model was fitted on."""
        return (self._raw(X) - self.centre_) / self.scale_

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"settings": asdict(self.settings), "state": self.__dict__}, f)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "ChangeDetector":
        path = Path(path)
        try:
            with open(path, "rb") as f:
                payload = pickle.load(f)
            detector = cls.__new__(cls)
            detector.__dict__.update(payload["state"])
        except (OSError, pickle.UnpicklingError, KeyError, EOFError) as exc:
            raise InputError(path, f"not a normative model saved by longitudinal ({exc})") from None
        return detector


@dataclass(frozen=True, eq=False)
class PairScores:
    """A pair's change, on the baseline grid."""

    region_scores: np.ndarray  # (n_regions,) calibrated; flagged above `threshold`
    region_stats: np.ndarray  # (n_regions, len(FEATURE_NAMES))
    voxel_map: np.ndarray  # calibrated score per voxel, same scale as `threshold`
    flagged_mask: np.ndarray  # bool: the voxels of flagged regions that changed
    threshold: float


def feature_distance(features_b: FeatureMap, features_f: FeatureMap) -> np.ndarray:
    """Per-location distance of the two visits' features, each channel scaled by its typical difference."""
    diff = features_b.data - features_f.data
    scale = np.median(np.abs(diff), axis=tuple(range(1, diff.ndim)), keepdims=True) + 1e-6
    dist = np.sqrt(((diff / scale) ** 2).mean(0)).astype(np.float32)
    return FeatureMap(dist[None], features_b.stride, features_b.input_shape).upsampled()[0]


def score_pair(
    baseline: np.ndarray,
    followup: np.ndarray,
    features_b: FeatureMap,
    features_f: FeatureMap,
    mask: np.ndarray,
    spacing_zyx: tuple[float, ...],
    regions: list[Region],
    labels: np.ndarray | None,
    settings: ScoringSettings,
    detector: ChangeDetector | None = None,
) -> PairScores:
    """Score every region; `detector` is a fitted normative model, else one is fitted within the pair."""
    maps = change_maps(baseline, followup, feature_distance(features_b, features_f), mask, spacing_zyx, settings.smoothing_mm)
    X = region_features(maps, regions, mask, labels)
    detector = detector or ChangeDetector(settings).fit(X)
    scores = detector.score_samples(X)
    threshold = settings.threshold
    voxel_map = np.zeros(mask.shape, np.float32)
    flagged_mask = np.zeros(mask.shape, bool)
    for region, score in zip(regions, scores):
        s, members = region.slices(), region.members(mask, labels)
        view = voxel_map[s]
        view[members] = np.maximum(view[members], score)
        if score > threshold:
            flagged_mask[s] |= members
    return PairScores(scores, X, voxel_map, flagged_mask, threshold)
