"""One baseline/follow-up comparison: every stage in order, and the result the reports are made from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
