"""Numbers as a reader says them: dates and intervals, sizes with the units the image has, change in per cent,
a score against its threshold, and plain names for every column (the raw name goes in a tooltip).

Shared by the pair's page and the batch summary, so both say the same thing the same way.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence

DASH = "–"


def finite(value: object) -> float | None:
    """A float, or None for missing and non-finite values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def number(value: object, spec: str = ".3g") -> str:
    v = finite(value)
    return DASH if v is None else format(v, spec)


def parse_date(text: str | None) -> dt.date | None:
    """YYYYMMDD (DICOM) or YYYY-MM-DD."""
    if not text:
        return None
    digits = text.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def date_text(text: str | None) -> str:
    d = parse_date(text)
    return d.isoformat() if d else (text or "unknown")


def interval_days(baseline: str | None, followup: str | None) -> int | None:
    a, b = parse_date(baseline), parse_date(followup)
    return (b - a).days if a and b else None


def interval_text(days: int | None) -> str:
    """'182 days'; over a year also in years: '547 days (1.5 years)'."""
    if days is None:
        return "interval unknown"
    text = f"{days:,} day{'' if abs(days) == 1 else 's'}"
    if abs(days) > 365:
        text += f" ({days / 365.25:.1f} years)"
    return text


def areal(unit: str, is3d: bool) -> str:
    """Unit of a region's size: mm³ in 3D, mm² or px² in 2D."""
    return f"{unit}³" if is3d else f"{unit}²"


def size_text(volume: object, unit: str, is3d: bool) -> str:
    v = finite(volume)
    if v is None:
        return DASH
    return f"{v:,.0f} {areal(unit, is3d)}" if v >= 10 else f"{v:.2g} {areal(unit, is3d)}"


def across_text(diameter: object, unit: str) -> str:
    v = finite(diameter)
    return DASH if v is None else f"{v:.1f} {unit} across"


def change_text(pct: object) -> str:
    """Signed mean change: '8 % darker' / '12 % brighter' (of the baseline intensity)."""
    v = finite(pct)
    if v is None:
        return DASH
    if abs(v) < 0.5:
        return "under 1 % change"
    return f"{abs(v):.0f} % {'brighter' if v > 0 else 'darker'}"


def finding_summary(region: Mapping, unit: str, is3d: bool) -> str:
    """'12 mm³, 3.6 mm across, 8 % darker' (parts that are unknown are left out)."""
    parts = [size_text(region.get("volume_mm3"), unit, is3d)]
    if finite(region.get("diameter_mm")) is not None:
        parts.append(across_text(region.get("diameter_mm"), unit))
    if finite(region.get("mean_change_pct")) is not None:
        parts.append(change_text(region.get("mean_change_pct")))
    return ", ".join(parts)


def versus_threshold(score: object, threshold: object) -> str:
    """Where a score sits against the threshold, in words. One unit is a factor 10 in the chance of scoring
    that high by chance."""
    s, t = finite(score), finite(threshold)
    if s is None or t is None:
        return "not scored"
    d = s - t
    if d > 0:
        return "just above" if d < 0.5 else "above" if d < 1.5 else "far above"
    return "just below" if d > -0.5 else "below"


def score_text(score: object, threshold: object) -> str:
    """'score 4.60, threshold 4.52: just above'."""
    return f"score {number(score, '.2f')}, threshold {number(threshold, '.2f')}: {versus_threshold(score, threshold)}"


def threshold_sentence(doc: Mapping) -> str:
    """What the threshold means, from what result.json states: expected false findings per stable pair (the
    pipeline's setting) or, in older results, the false-alarm rate per unchanged region."""
    per_pair = finite(doc.get("false_findings_per_pair"))
    if per_pair is not None:
        return (f"The threshold is set so that a stable pair (no real change) shows about {per_pair:.2g} false "
                f"finding{'' if per_pair == 1 else 's'} on average.")
    rate = finite(doc.get("false_alarm_rate"))
    if rate is None or rate <= 0:
        return "The threshold's false-alarm setting is not recorded."
    text = (f"The threshold is set so that about 1 in {round(1 / rate):,} unchanged regions scores above it by "
            f"chance (false-alarm rate {rate:.2g} per region)")
    scored = doc.get("n_regions_scored")
    if isinstance(scored, int) and scored > 0:
        text += f"; with {scored:,} regions scored here, that is about {rate * scored:.2g} chance region(s) per pair"
    return text + "."


_SIDES = (("R", "L"), ("A", "P"), ("I", "S"))


def location_text(centre_mm: Sequence[float] | None) -> str:
    """LPS millimetres as directions a reader does not have to decode ('L 23.0 · A 13.0 · S 21.0'); 2D images
    have no patient axes: x, y in the image plane."""
    if not centre_mm:
        return DASH
    if len(centre_mm) == 2:
        return f"x {centre_mm[0]:.1f} · y {centre_mm[1]:.1f}"
    return " · ".join(f"{pos if v >= 0 else neg} {abs(v):.1f}" for v, (neg, pos) in zip(centre_mm, _SIDES))


def slices_text(slices: Mapping[str, int]) -> str:
    """'axial 57 · coronal 70 · sagittal 40' or, in 2D, 'pixel x 240, y 130'."""
    if set(slices) == {"x", "y"}:
        return f"pixel x {slices['x']}, y {slices['y']}"
    return " · ".join(f"{plane} {slices[plane]}" for plane in ("axial", "coronal", "sagittal") if plane in slices)


# ----------------------------------------------------------------------------- column names

COLUMNS = {  # raw name -> plain label; the raw name is the tooltip
    "id": "#",
    "label": "kind",
    "centre_mm": "where (mm from the scanner origin)",
    "slices": "slices (baseline voxel index)",
    "volume_mm3": "size",
    "diameter_mm": "largest extent",
    "mean_change_pct": "mean change",
    "score": "score vs threshold",
    "flagged": "finding?",
    "rank": "rank",
    "patient": "patient",
    "baseline_visit": "baseline",
    "followup_visit": "follow-up",
    "interval_days": "interval",
    "verdict": "verdict",
    "progression_score": "highest score",
    "strongest_change": "strongest change (× noise)",
    "n_findings": "findings",
    "registration_suspect": "alignment check",
    "report": "report",
    "error": "problem",
    "computed_at": "computed at",
}

_STAT_PARTS = {"intensity": "intensity change", "encoder": "texture change"}
_AGG = {"mean": "mean", "max": "peak", "p95": "95th percentile", "median": "median"}


def column_label(raw: str) -> str:
    """A plain label for a column: known names from COLUMNS, region statistics spelled out
    ('encoder_stage1_max_z' -> 'texture change (stage 1), peak, noise units')."""
    if raw in COLUMNS:
        return COLUMNS[raw]
    m = re.fullmatch(r"(intensity|encoder)(?:_stage(\d+))?_([a-z0-9]+)(?:_z)?", raw)
    if m:
        what = _STAT_PARTS[m.group(1)] + (f" (stage {m.group(2)})" if m.group(2) else "")
        unit = ", noise units" if raw.endswith("_z") else ""
        return f"{what}, {_AGG.get(m.group(3), m.group(3))}{unit}"
    for suffix, unit in (("_mm3", "mm³"), ("_mm", "mm"), ("_s", "s"), ("_pct", "%")):
        if raw.endswith(suffix):
            return raw[: -len(suffix)].replace("_", " ") + f" ({unit})"
    return raw.replace("_", " ")
