"""Region detectors: how unlike unchanged anatomy a region's change features are. One class per detector,
registered by name; a pipeline picks one with `[scoring] detector = "<name>"`.

Each follows scikit-learn's estimator contract: parameters as given in `__init__` (no logic there),
`fit(X, y=None, feature_names=())` learning attributes that end in `_` (`fitted_rows_`: which rows of X it learned
from), `check_is_fitted`, and:
- `decision_function(X)`: uncalibrated change, HIGHER = MORE CHANGE (the opposite sign of scikit-learn's outlier
  detectors, whose decision function is high for inliers: a change score reads the other way);
- `held_out_decision(X)` for the very rows it was fitted on (a detector fitted within a pair): each row judged by
  a model that did not learn from that row, so an outlying region cannot make itself look typical.
`scoring.ChangeDetector` turns either into calibrated scores, the same way for every detector.

A new detector is one class here (or in its own module) decorated with `@register("name")`. The supervised ones
(`SUPERVISED`) apply a model trained by `longitudinal train` (`learned`), named by the pipeline's `model`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
from scipy.special import logsumexp
from sklearn.base import BaseEstimator
from sklearn.ensemble import IsolationForest
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.preprocessing import RobustScaler
from sklearn.svm import OneClassSVM
from sklearn.utils.validation import check_is_fitted

DETECTORS: dict[str, type[BaseEstimator]] = {}
SUPERVISED = ("svm", "rf", "siamese")  # trained by `longitudinal train`; a pipeline names the model file


def register(name: str) -> Callable[[type[BaseEstimator]], type[BaseEstimator]]:
    def add(cls: type[BaseEstimator]) -> type[BaseEstimator]:
        DETECTORS[name] = cls
        return cls

    return add


def make_detector(name: str, **settings) -> BaseEstimator:
    """The detector `name` with those of `settings` its constructor takes (a ScoringSettings as a dict)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r} (known: {', '.join(sorted(DETECTORS))})")
    cls = DETECTORS[name]
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in settings.items() if k in params})


def _fit_sample(n: int, max_rows: int, seed: int) -> np.ndarray:
    """Which rows a detector fits on: all, or a seeded subsample (OCSVM is quadratic in them)."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


class _OneSided(BaseEstimator):
    """Robust scaling (10-90 % range = 1), then clipped at the median: change is one-sided, a region changing
    less than the typical one is as unchanged as the typical one, so detectors only model 'more than usual'."""

    def fit(self, X: np.ndarray) -> "_OneSided":
        self.scaler_ = RobustScaler(quantile_range=(10.0, 90.0)).fit(X)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return np.maximum(self.scaler_.transform(np.asarray(X, np.float64)), 0.0)


class _CrossFitted(BaseEstimator):
    """Two models cross-fitted on halves of the fitting rows, and every row judged by ONE of them: a fitted row
    by the model of the other half, any other row (and new data) by the model its position picks. Every score
    then comes from the same kind of model that never saw the row, so the calibration null (a pair's own
    regions) and the regions it judges are alike, and no region's own fit makes it look typical."""

    def _fit_half(self, Z: np.ndarray):  # a fitted model of one half
        raise NotImplementedError

    def _change(self, model, Z: np.ndarray) -> np.ndarray:  # higher = more change
        raise NotImplementedError

    def fit(self, X: np.ndarray, y: np.ndarray | None = None, feature_names: tuple[str, ...] = ()):
        X = np.asarray(X, np.float64)
        self.fitted_rows_ = _fit_sample(len(X), self.max_fit_regions, self.seed)
        self.scale_ = _OneSided().fit(X[self.fitted_rows_])
        Z = self.scale_.transform(X[self.fitted_rows_])
        self.fold_ = np.random.default_rng(self.seed).permutation(len(Z)) % 2  # the half of each fitted row
        self.models_ = [self._fit_half(Z[self.fold_ == k]) for k in (0, 1)]
        return self

    def _by_model(self, X: np.ndarray, which: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        Z = self.scale_.transform(X)
        out = np.empty(len(Z))
        for k in (0, 1):
            rows = which == k
            if rows.any():
                out[rows] = self._change(self.models_[k], Z[rows])
        return out

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self._by_model(X, np.arange(len(X)) % 2)

    def held_out_decision(self, X: np.ndarray) -> np.ndarray:
        which = np.arange(len(X)) % 2
        which[self.fitted_rows_] = 1 - self.fold_
        return self._by_model(X, which)


@register("ocsvm")
class OneClassSVMDetector(_CrossFitted):
    """One-Class SVM (RBF) of unchanged regions; change = -log of its kernel expansion
    sum_i a_i exp(-gamma |x - sv_i|^2), computed in the log domain. (The decision function itself saturates at -rho
    far from every support vector, so a region twice as far out as another would score the same; the log does
    not.) `gamma` is on the robustly scaled features; "scale" = 1 / (n_features * variance), as scikit-learn."""

    def __init__(self, nu: float = 0.05, gamma: float | str = 0.5, max_fit_regions: int = 3000, seed: int = 0):
        self.nu = nu
        self.gamma = gamma
        self.max_fit_regions = max_fit_regions
        self.seed = seed

    def _fit_half(self, Z: np.ndarray) -> tuple[OneClassSVM, float]:
        gamma = self.gamma
        if gamma == "scale":
            gamma = 1.0 / (Z.shape[1] * Z.var()) if Z.var() > 0 else 1.0
        elif gamma == "auto":
            gamma = 1.0 / Z.shape[1]
        return OneClassSVM(kernel="rbf", nu=self.nu, gamma=float(gamma)).fit(Z), float(gamma)

    def _change(self, model: tuple[OneClassSVM, float], Z: np.ndarray) -> np.ndarray:
        svm, gamma = model
        log_alpha = np.log(np.maximum(svm.dual_coef_[0], 1e-300))
        return -logsumexp(log_alpha[None, :] - gamma * euclidean_distances(Z, svm.support_vectors_, squared=True),
                          axis=1)


@register("iforest")
class IsolationForestDetector(_CrossFitted):
    """Isolation Forest of unchanged regions; change = its negated decision function."""

    def __init__(self, n_estimators: int = 200, max_fit_regions: int = 3000, seed: int = 0):
        self.n_estimators = n_estimators
        self.max_fit_regions = max_fit_regions
        self.seed = seed

    def _fit_half(self, Z: np.ndarray) -> IsolationForest:
        return IsolationForest(n_estimators=self.n_estimators, random_state=self.seed).fit(Z)

    def _change(self, model: IsolationForest, Z: np.ndarray) -> np.ndarray:
        return -model.decision_function(Z)


class _Trained(BaseEstimator):
    """A detector trained elsewhere (`longitudinal train`), applied to a pair: nothing is learned from the pair,
    so every region is already held out; `fit` only checks the model against the pair's features."""

    def __init__(self, model=None):
        self.model = model  # the loaded model (learned.load_model)

    def fit(self, X: np.ndarray, y: np.ndarray | None = None, feature_names: tuple[str, ...] = ()):
        if self.model is None:
            raise ValueError(f"{type(self).__name__} needs a trained model")
        self.feature_names_ = tuple(feature_names)
        self.fitted_rows_ = np.zeros(0, np.int64)
        return self

    def held_out_decision(self, X: np.ndarray) -> np.ndarray:
        return self.decision_function(X)


@register("svm")
@register("rf")
class TrainedRegionDetector(_Trained):
    """SVM or random forest on the region change features: change = its probability of change."""

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        from .learned import predict_regions

        check_is_fitted(self)
        return predict_regions(self.model, X, self.feature_names_)


@register("siamese")
class SiameseRegionDetector(_Trained):
    """The Siamese network's voxel map of change probability (`compare` adds it as the "siamese" map):
    change = the region's maximum of that map."""

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        if "siamese_max_z" not in self.feature_names_:
            raise ValueError("the siamese detector needs the 'siamese' change map among the region features")
        return np.asarray(X, np.float64)[:, self.feature_names_.index("siamese_max_z")]
