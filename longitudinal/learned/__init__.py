"""The supervised road: change detectors learned from labelled pairs and synthetic changes.

Entry points for compare/scoring (each documented where it lives):

- `load_model(path, pipeline)` -> `SiameseModel` or `RegionClassifier`; a model whose card does not match the
  pipeline (name, registration/preprocessing, encoder, maps) is refused with one InputError line;
- `change_probability(model, prepared)` -> `ChangeProbability` (Siamese): a float32 voxel map of change
  probability on the baseline grid of a `compare.Prepared`, with its runtime;
- `predict_regions(model, X, names)` -> raw score per region, higher = more change (SVM, random forest), for
  the region features of `compare.region_features_prepared`;
- `training.train(...)` / `longitudinal train`: fit one, with its card and curves.
"""

from __future__ import annotations

import importlib
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .regional import RegionClassifier
    from .siamese import SiameseModel

__all__ = ["ChangeProbability", "RegionClassifier", "SiameseModel", "change_probability", "load_model",
           "predict_regions"]
_LAZY = {"ChangeProbability": "siamese", "SiameseModel": "siamese", "change_probability": "siamese",
         "RegionClassifier": "regional", "predict_regions": "regional"}


def __getattr__(name: str):
    """torch and MONAI load on first use, so `longitudinal --help` and the CLI's other commands stay fast."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


def _format_of(path: Path) -> str | None:
    """The `format` in a model file's meta.json, or None (modelfile.load then says what is wrong)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return json.loads(zf.read("meta.json").decode("utf-8")).get("format")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, AttributeError):
        return None


def load_model(path, pipeline=None) -> "SiameseModel | RegionClassifier":
    """A trained change detector from its file; with `pipeline`, refused unless its card matches it."""
    from .regional import MODEL_FORMAT as REGIONAL_FORMAT
    from .regional import RegionClassifier
    from .siamese import SiameseModel
    from .training import check_requirements, requirements

    path = Path(path)
    fmt = _format_of(path)
    if fmt == REGIONAL_FORMAT:
        model: SiameseModel | RegionClassifier = RegionClassifier.load(path)
        kind = model.settings.kind
    else:  # a Siamese file, or anything else: modelfile.load names the problem
        model, kind = SiameseModel.load(path), "siamese"
    if pipeline is not None:
        required = requirements(pipeline, kind)
        check_requirements(model.card, required, path)
    return model
