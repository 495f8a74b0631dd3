"""What goes into the human-readable page; the data files always hold every region."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReportSettings:
    max_table_rows: int = 50
    max_region_figures: int = 12  # one figure per finding, highest score first
    overview_slices: int = 6
    # grey window of the overview: percentiles of the baseline inside the compared region (the body). The top
    # sits above white matter so its texture stays visible; each finding's crop gets its own window.
    window_percentiles: tuple[float, float] = (0.5, 99.9)
    context_mm: float = 25.0  # half-width of the field of view around a finding (at most a quarter of the image)
    dpi: int = 80
