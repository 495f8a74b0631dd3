"""Supervised region classifiers: an SVM (probability calibrated) and a random forest on per-region change features.

The features are those the one-class road computes (`compare.region_features_prepared`: intensity and encoder
change maps pooled over each region); here a region is labelled changed when one of its voxels is truth, and a
classifier learns the boundary from both classes. Training pairs add copies of themselves with synthetic changes
pasted in (`synthetic`), so positives are not limited to the few labelled lesions.

Model files are arrays + JSON (`modelfile`, never a pickle). SVM: the fitted rows, their labels and the settings;
loading refits deterministically (fixed seed), as `scoring.ChangeDetector` does. Random forest: its trees as
arrays (`ForestArrays`), which predict exactly as scikit-learn does (to the last bit or so); refitting 300 trees
took 39 s per load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import InputError
from .pairs import PairArrays

log = logging.getLogger(__name__)

MODEL_FORMAT = "longitudinal.RegionClassifier"


@dataclass(frozen=True)
class RegionalSettings:
    kind: Literal["svm", "rf"] = "svm"
    C: float = 3.0  # SVM
    gamma: str | float = "scale"  # SVM RBF width on robustly scaled features
    n_estimators: int = 300  # random forest
    min_samples_leaf: int = 2
    max_rows: int | None = None  # rows fitted (every changed region, unchanged ones subsampled); None: SVM 6000
    # (quadratic in rows), random forest 30000
    seed: int = 0


@dataclass(frozen=True, eq=False)
class ForestArrays:
    """A fitted random forest (with its robust scaler) as plain arrays, predicting as scikit-learn does: the
    mean over trees of each leaf's class fractions. Refitting 300 trees on load took 39 s (benchmarks/learned.py);
    reading these arrays takes milliseconds, and they are what predictions use right after fitting too."""

    center: np.ndarray  # (F,) scaler
    scale: np.ndarray  # (F,)
    roots: np.ndarray  # (T,) index of each tree's first node in the node arrays
    left: np.ndarray  # (N,) child index (global), -1 at leaves
    right: np.ndarray
    feature: np.ndarray  # (N,) feature index, < 0 at leaves
    threshold: np.ndarray  # (N,) go left when x <= threshold (x as float32, as scikit-learn's trees read it)
    value: np.ndarray  # (N, classes) leaf class weights

    FIELDS = ("center", "scale", "roots", "left", "right", "feature", "threshold", "value")

    @classmethod
    def of(cls, fitted) -> "ForestArrays":
        scaler, forest = fitted[0], fitted[-1]
        lefts, rights, features, thresholds, values, roots = [], [], [], [], [], []
        offset = 0
        for tree in forest.estimators_:
            t = tree.tree_
            leaf = t.children_left < 0
            roots.append(offset)
            lefts.append(np.where(leaf, -1, t.children_left + offset))
            rights.append(np.where(leaf, -1, t.children_right + offset))
            features.append(np.where(leaf, -1, t.feature))
            thresholds.append(t.threshold)
            values.append(t.value[:, 0, :])
            offset += t.node_count
        return cls(np.asarray(scaler.center_, np.float64), np.asarray(scaler.scale_, np.float64),
                   np.asarray(roots, np.int64), np.concatenate(lefts).astype(np.int64),
                   np.concatenate(rights).astype(np.int64), np.concatenate(features).astype(np.int64),
                   np.concatenate(thresholds).astype(np.float64), np.concatenate(values).astype(np.float64))

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_features: int) -> "ForestArrays":
        """From a model file's arrays, checked so that a damaged file cannot index out of bounds."""
        forest = cls(**{k: np.asarray(arrays[f"forest_{k}"]) for k in cls.FIELDS})
        n = len(forest.left)
        ok = (forest.center.shape == forest.scale.shape == (n_features,) and forest.value.ndim == 2
              and len(forest.right) == len(forest.feature) == len(forest.threshold) == len(forest.value) == n
              and forest.roots.size and forest.roots.min() >= 0 and forest.roots.max() < n
              and all(a.min() >= -1 and a.max() < n for a in (forest.left, forest.right))
              and (forest.feature < n_features).all() and ((forest.left < 0) | (forest.feature >= 0)).all()
              and ((forest.left < 0) == (forest.right < 0)).all())
        inner = np.flatnonzero(forest.left >= 0) if ok else np.zeros(0, np.int64)
        # children after their parent (as trees are built): the descent in predict_proba always ends
        ok = ok and bool((forest.left[inner] > inner).all() and (forest.right[inner] > inner).all())
        if not ok:
            raise ValueError("forest arrays are inconsistent")
        return forest

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N,) probability of the second class (changed)."""
        x = ((np.asarray(X, np.float64) - self.center) / self.scale).astype(np.float32)
        total = np.zeros((len(x), self.value.shape[1]), np.float64)
        for root in self.roots:  # trees summed in order, as scikit-learn does
            node = np.full(len(x), root, np.int64)
            active = np.arange(len(x))
            while active.size:  # rows still at an inner node descend one level
                at = node[active]
                inner = self.left[at] >= 0
                active, at = active[inner], at[inner]
                go_left = x[active, self.feature[at]] <= self.threshold[at]
                node[active] = np.where(go_left, self.left[at], self.right[at])
            v = self.value[node]
            norm = v.sum(axis=1, keepdims=True)
            total += v / np.where(norm == 0.0, 1.0, norm)
        return (total / len(self.roots))[:, 1]


class RegionClassifier:
    """fit / predict_regions / save / load, as scikit-learn estimators."""

    def __init__(self, settings: RegionalSettings = RegionalSettings()):
        self.settings = settings
        self.feature_names_: tuple[str, ...] | None = None
        self.forest_: ForestArrays | None = None
        self.card: dict = {}

    def fit(self, X: np.ndarray, y: np.ndarray, feature_names: tuple[str, ...]) -> "RegionClassifier":
        X, y = np.asarray(X, np.float64), np.asarray(y, bool)
        if len(X) != len(y) or X.ndim != 2 or X.shape[1] != len(feature_names):
            raise ValueError(f"X {X.shape}, y {y.shape} and {len(feature_names)} feature names do not fit")
        if y.all() or not y.any():
            raise InputError(None, "training regions are all of one class: need changed and unchanged regions")
        rng = np.random.default_rng(self.settings.seed)
        pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
        max_rows = self.settings.max_rows or (6000 if self.settings.kind == "svm" else 30000)
        # changed regions first, but never more than half the rows: a cohort with many changed regions (the dev
        # split has 10,000) would otherwise leave no unchanged row to learn from
        n_pos = min(len(pos), max(max_rows // 2, max_rows - len(neg)))
        n_neg = min(len(neg), max_rows - n_pos)
        keep = np.sort(np.r_[rng.choice(pos, n_pos, replace=False) if n_pos < len(pos) else pos,
                             rng.choice(neg, n_neg, replace=False)])
        return self._fit_rows(X[keep], y[keep], tuple(feature_names))

    def _fit_rows(self, X: np.ndarray, y: np.ndarray, feature_names: tuple[str, ...]) -> "RegionClassifier":
        """The scaler and classifier on exactly these rows (deterministic for a given seed)."""
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import RobustScaler
        from sklearn.svm import SVC

        s = self.settings
        if s.kind == "svm":
            # Platt scaling fitted by cross-validation on the fit rows (what SVC(probability=True) did)
            clf = CalibratedClassifierCV(SVC(C=s.C, gamma=s.gamma, class_weight="balanced", random_state=s.seed),
                                         method="sigmoid", cv=5, ensemble=False)
        else:
            clf = RandomForestClassifier(n_estimators=s.n_estimators, min_samples_leaf=s.min_samples_leaf,
                                         class_weight="balanced_subsample", random_state=s.seed, n_jobs=1)
        self.model_ = make_pipeline(RobustScaler(), clf).fit(X, y)
        self.forest_ = ForestArrays.of(self.model_) if s.kind == "rf" else None
        self.fit_X_, self.fit_y_ = X, y
        self.feature_names_ = feature_names
        return self

    def predict_regions(self, X: np.ndarray, names: tuple[str, ...] | list[str]) -> np.ndarray:
        """Raw change score per region, higher = more change: the classifier's probability of change."""
        if self.feature_names_ is None:
            raise RuntimeError("RegionClassifier is not fitted")
        if tuple(names) != self.feature_names_:
            raise InputError(None, f"region features {list(names)[:4]}... do not match the model's "
                                   f"{list(self.feature_names_)[:4]}... ({len(names)} vs {len(self.feature_names_)})")
        X = np.asarray(X, np.float64)
        if len(X) == 0:
            return np.zeros(0, np.float64)
        if self.forest_ is not None:
            return self.forest_.predict_proba(X)
        return self.model_.predict_proba(X)[:, 1]

    def save(self, path, card: dict | None = None) -> None:
        from .. import modelfile

        if card is not None:
            self.card = card
        # SVM: the fit rows (refitted on load, deterministic); random forest: its trees as arrays
        arrays = ({f"forest_{k}": getattr(self.forest_, k) for k in ForestArrays.FIELDS} if self.forest_ is not None
                  else {"X": self.fit_X_, "y": self.fit_y_})
        modelfile.save(path, MODEL_FORMAT, {"settings": asdict(self.settings), "feature_names": list(self.feature_names_),
                                            "card": self.card}, arrays)

    @classmethod
    def load(cls, path) -> "RegionClassifier":
        from .. import modelfile

        meta, arrays = modelfile.load(path, MODEL_FORMAT)
        try:
            settings = RegionalSettings(**meta["settings"])
            names = tuple(str(n) for n in meta["feature_names"])
            if settings.kind == "rf":
                model = cls(settings)
                model.forest_ = ForestArrays.from_arrays(arrays, len(names))
                model.feature_names_ = names
            else:
                X, y = np.asarray(arrays["X"], np.float64), np.asarray(arrays["y"], bool)
                if X.ndim != 2 or X.shape != (len(y), len(names)):
                    raise ValueError(f"fit rows {X.shape} do not fit {len(y)} labels and {len(names)} features")
                model = cls(settings)._fit_rows(X, y, names)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(Path(path), f"region classifier file does not fit this version: {exc}") from None
        model.card = dict(meta.get("card", {}))
        return model


def predict_regions(model: RegionClassifier, X: np.ndarray, names) -> np.ndarray:
    """Raw score per region (higher = more change) for the lead's calibration; see RegionClassifier."""
    return model.predict_regions(X, names)


# ----------------------------------------------------------------------------------------- features of pairs


def prepared_from_arrays(pair: PairArrays, pipeline):
    """A `compare.Prepared` rebuilt from cached arrays (unit direction, zero origin; the registration is not
    needed to pool change maps over regions)."""
    import SimpleITK as sitk

    from ..compare import Prepared
    from ..io import Image
    from ..regions import make_regions

    def image(a: np.ndarray) -> Image:
        itk = sitk.GetImageFromArray(a, isVector=pair.rgb)
        itk.SetSpacing(tuple(reversed(pair.spacing)))
        return Image(itk)

    base, follow = image(pair.baseline), image(pair.followup)
    regions, labels = make_regions(base.itk, pair.mask, pipeline.regions)
    return Prepared(base, follow, None, base, follow, pair.mask, regions, labels, pipeline, {})


def region_labels(regions, truth: np.ndarray, mask: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """True for each region holding at least one truth voxel."""
    out = np.zeros(len(regions), bool)
    for i, r in enumerate(regions):
        s = r.slices()
        t = truth[s]
        if t.any():
            out[i] = bool((t & r.members(mask, labels)).any())
    return out


@dataclass(eq=False)
class PairRegions:
    key: str
    X: np.ndarray
    y: np.ndarray
    names: tuple[str, ...]
    regions: list = field(default_factory=list)
    labels: np.ndarray | None = None
    pair: PairArrays | None = None


def pair_regions(pair: PairArrays, pipeline, scoring, cache: Path | None) -> PairRegions:
    """Region features and labels of one pair (cached as npz by the pair's voxel hash and the pipeline)."""
    from ..compare import encode_prepared, region_features_prepared
    from .pairs import pipeline_digest

    prepared = prepared_from_arrays(pair, pipeline)
    key = hashlib.sha256((pair.digest() + pipeline_digest(pipeline)).encode()).hexdigest()[:24]
    path = Path(cache) / f"regions-{key}.npz" if cache else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            X, y, names = z["X"], z["y"].astype(bool), tuple(str(n) for n in z["names"])
        regions, labels = prepared.regions, prepared.labels
        if regions is not None and len(regions) == len(X):
            return PairRegions(pair.key, X, y, names, regions, labels, pair)
    fb = ff = None
    if "encoder" in scoring.maps:
        fb, ff, _ = encode_prepared(prepared)
    X, names, regions, labels, _ = region_features_prepared(prepared, scoring, fb, ff)
    y = region_labels(regions, pair.truth, pair.mask, labels)
    if path is not None:
        from ..io import atomic_write

        atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), X=X, y=y, names=np.asarray(names)))
    return PairRegions(pair.key, np.asarray(X, np.float64), y, tuple(names), regions, labels, pair)


def train_regional(train_pairs: list[PairArrays], held_pairs: list[PairArrays], pipeline, settings, cache: Path | None):
    """Fit an SVM or random forest on region features of training pairs (+ synthetic copies); held-back figures."""
    from ..evaluation import lesion_metrics
    from ..scoring import region_max_map
    from .training import (LESION_THRESHOLDS, TrainResult, confusion, curve_points, lesion_by_threshold, rates,
                           requirements, synthetic_copies)

    clock = time.perf_counter()
    scoring = dataclasses.replace(pipeline.scoring, normative_model=None)
    rng = np.random.default_rng(settings.seed)
    train_all = list(train_pairs) + [c for p in train_pairs for c in synthetic_copies(p, settings.synthetic_per_pair, 3, rng)]
    held_all = list(held_pairs) + [c for p in held_pairs for c in synthetic_copies(p, settings.synthetic_per_pair, 3, rng)]
    train_regions = [pair_regions(p, pipeline, scoring, cache) for p in train_all]
    held_regions = [pair_regions(p, pipeline, scoring, cache) for p in held_all]
    names = train_regions[0].names
    X = np.concatenate([r.X for r in train_regions])
    y = np.concatenate([r.y for r in train_regions])
    reg = RegionalSettings(kind=settings.kind, seed=settings.seed)
    model = RegionClassifier(reg).fit(X, y, names)
    fit_s = time.perf_counter() - clock
    thresholds = tuple(sorted({settings.threshold, *LESION_THRESHOLDS}))
    history, scores, labels = [], [], []
    rows: dict[float, list] = {t: [] for t in thresholds}
    # training figures on the rows it was fitted on: predicting every training region (2.7 million on the dev
    # split with its pasted copies) took longer than the fit itself and says nothing more
    train_p = model.predict_regions(model.fit_X_, names)
    history.append({"epoch": 1, "split": "train", "loss": _log_loss(train_p, model.fit_y_),
                    **rates(confusion(train_p, model.fit_y_, settings.threshold)), "seconds": round(fit_s, 1)})
    for r in held_regions:
        p = model.predict_regions(r.X, names)
        scores.append(p)
        labels.append(r.y)
        score_map = region_max_map(r.regions, p.astype(np.float32), r.pair.mask, r.labels)
        for t in thresholds:
            rows[t].append(lesion_metrics(r.pair.truth, (score_map >= t) & r.pair.mask))
    scores_all, labels_all = np.concatenate(scores), np.concatenate(labels)
    by_threshold = lesion_by_threshold(rows, held_all)
    lesion = by_threshold[settings.threshold]
    history.append({"epoch": 1, "split": "held_back", "loss": _log_loss(scores_all, labels_all),
                    **rates(confusion(scores_all, labels_all, settings.threshold)), **lesion,
                    "seconds": round(time.perf_counter() - clock, 1)})
    curves = {**curve_points(scores_all, labels_all), "unit": "regions (real pairs and with pasted changes)"}
    metrics = {**{f"region_{k}": v for k, v in history[-1].items() if k in ("loss", "accuracy", "precision", "recall", "f1")},
               **lesion, "lesion_by_threshold": {str(t): v for t, v in by_threshold.items()},
               "held_back_pairs_real": len(held_pairs),
               "held_back_pairs_synthetic": len(held_all) - len(held_pairs),
               "train_regions": int(len(y)), "train_changed_regions": int(y.sum()), "fit_rows": int(len(model.fit_y_))}
    requires = requirements(pipeline, settings.kind, {"features": list(names)})
    return TrainResult(model, history, curves, metrics, requires, {"regional": asdict(reg),
                           "synthetic": "new and growing lesions (hypo/hyper), local atrophy warps: "
                                        f"{settings.synthetic_per_pair} copies of each pair with 3 changes each"},
                           1, False, time.perf_counter() - clock)


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))
