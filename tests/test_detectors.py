"""Region detectors: the scikit-learn estimator contract, honest in-pair scores, one class to add one."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from longitudinal.detectors import DETECTORS, make_detector, register
from longitudinal.scoring import ChangeDetector, ScoringSettings


def _regions(seed: int = 0) -> np.ndarray:
    """800 ordinary regions and 4 that changed (far out in every feature)."""
    rng = np.random.default_rng(seed)
    return np.vstack([rng.normal(size=(800, 4)), rng.normal(8.0, 0.5, size=(4, 4))])


@pytest.mark.parametrize("name", ["ocsvm", "iforest"])
def test_detectors_follow_the_estimator_contract(name):
    det = make_detector(name, seed=3, max_fit_regions=500, nu=0.1, n_estimators=50, detector="ignored")
    assert det.get_params()["seed"] == 3 and clone(det).get_params() == det.get_params()
    with pytest.raises(NotFittedError):
        det.decision_function(np.zeros((2, 4)))
    X = _regions()
    scores = det.fit(X).decision_function(X)
    assert scores[-4:].min() > np.percentile(scores[:-4], 99)  # higher = more change


@pytest.mark.parametrize("name", ["ocsvm", "iforest"])
def test_within_a_pair_no_region_is_judged_by_a_model_that_learned_it(name):
    """Fitted on the pair's own regions (a lesion spans several overlapping ones), each fitted region is judged
    by the model of the other half: changed regions score higher than in-sample, the bulk is unaffected."""
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(1000, 4)), rng.normal(6.0, 0.3, size=(6, 4))])
    det = make_detector(name, max_fit_regions=5000, nu=0.05, n_estimators=100).fit(X)
    in_sample = det._by_model(X, det.fold_)  # each fitted row by the model that learned it
    held_out = det.held_out_decision(X)
    assert held_out[-6:].mean() > in_sample[-6:].mean()
    assert held_out[-6:].min() > np.quantile(held_out[:-6], 0.99)
    assert abs(np.quantile(held_out[:-6], 0.9) - np.quantile(in_sample[:-6], 0.9)) < 0.05 * abs(
        np.quantile(held_out[:-6], 0.9)) + 0.01


def test_a_new_detector_is_one_registered_class(tmp_path):
    from sklearn.base import BaseEstimator

    @register("distance")
    class Distance(BaseEstimator):
        """Change = distance from the median region (a toy, to show the contract)."""

        def __init__(self, seed: int = 0):
            self.seed = seed

        def fit(self, X, y=None, feature_names=()):
            self.centre_ = np.median(X, axis=0)
            self.fitted_rows_ = np.arange(len(X))
            return self

        def decision_function(self, X):
            return np.linalg.norm(np.asarray(X) - self.centre_, axis=1)

        held_out_decision = decision_function

    try:
        X = _regions(2)
        det = ChangeDetector(ScoringSettings(detector="distance")).fit(X, ("a", "b", "c", "d"))
        scores = det.score_samples(X)
        assert scores[-4:].min() > scores[:-4].max()
        with pytest.raises(ValueError, match="distance"):
            ScoringSettings(detector="nope")  # the error lists the registered names
    finally:
        del DETECTORS["distance"]
