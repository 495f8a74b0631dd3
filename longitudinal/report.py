"""Turn one `Comparison` into files people and programs can read.

One folder per pair: `report.html` (a single self-contained page), `result.json`, `regions.csv`,
`change_map.nii.gz` and `flagged_mask.nii.gz` (follow-up's own grid), `registered.nii.gz`
(follow-up on the baseline grid), `transform.tfm` (baseline -> follow-up points) and, last,
`.complete`: the folder counts as finished only once that stamp exists (batch resume relies on it).

Display orientation: 3D images are reoriented to LPS index order (SimpleITK `DICOMOrient`), then shown in
radiological convention: axial slices seen from the feet (anterior up, patient left on the image right),
coronal seen from the front (superior up, patient left on the image right), sagittal with anterior on the
left and superior up. 2D images (photographs, projection radiographs) are shown as stored (row 0 on top).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import hmac
import html
import io as _io
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import __version__
from .compare import Comparison, ScoredRegion
from .io import Image, atomic_write, atomic_write_text

log = logging.getLogger(__name__)

COMPLETE = ".complete"
HIDDEN = "(hidden)"
OUTPUT_FILES = {
    "report": "report.html",
    "result": "result.json",
    "regions": "regions.csv",
    "change_map": "change_map.nii.gz",
    "flagged_mask": "flagged_mask.nii.gz",
    "registered": "registered.nii.gz",
    "transform": "transform.tfm",
}
UNITS = {
    "centre_mm": "mm, physical LPS coordinates (x: patient right->left, y: anterior->posterior, z: inferior->superior)",
    "bbox": "voxel index (x, y[, z]) on the baseline grid, lo inclusive, hi exclusive",
    "volume_mm3": "cubic millimetres (2D images: area in square millimetres)",
    "spacing_mm": "mm per voxel along (x, y[, z])",
    "size": "voxels along (x, y[, z])",
    "score": "calibrated change score: -log10 of the chance that an unchanged region scores this high; flagged above threshold",
    "progression_score": "calibrated change score (dimensionless); progression when above threshold",
    "threshold": "same scale as score",
    "false_alarm_rate": "fraction of unchanged regions expected above the threshold (0..1)",
    "timings_s": "seconds",
    "change_map": "score per voxel, same scale as score",
}


@dataclass(frozen=True)
class ReportSettings:
    """What goes into the human-readable page; the data files always hold every region."""

    max_table_rows: int = 50
    max_region_figures: int = 12
    overview_slices: int = 6
    window_percentiles: tuple[float, float] = (0.5, 99.5)  # display window of the harmonised images
    context_mm: float = 40.0  # half-width of the field of view around a region (at most a quarter of the image)
    dpi: int = 80


# --------------------------------------------------------------------------- atomic writing


def _clean_itk(itk: sitk.Image) -> sitk.Image:
    """A copy without the metadata dictionary: NIfTI writes some keys (ITK_FileNotes, aux_file) into its header."""
    out = sitk.Image(itk)
    for key in out.GetMetaDataKeys():
        out.EraseMetaData(key)
    return out


def as_volume(itk: sitk.Image) -> sitk.Image:
    """2D images become single-slice 3D images on the same in-plane grid, so every tool reads them as volumes."""
    if itk.GetDimension() == 3:
        return itk
    vol = sitk.JoinSeries(itk)  # origin z = 0, spacing z = 1, direction = 2D block + unit z axis
    return vol


def _write_nifti(path: Path, itk: sitk.Image) -> Path:
    itk = _clean_itk(as_volume(itk))
    try:  # the io module's writer, once it has one, is the single place images are written
        from .io import save_image  # type: ignore[attr-defined]
    except ImportError:
        save_image = None
    if save_image is not None:
        save_image(Image(itk), path)
        return path
    return atomic_write(path, lambda p: sitk.WriteImage(itk, p, True))


# --------------------------------------------------------------------------- JSON


def jsonable(value: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, tuples, paths and dataclasses; non-finite floats become null."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


# --------------------------------------------------------------------------- identity


def pseudonym(patient_id: str | None, key: bytes) -> str:
    """Keyed hash of a patient id: the same key gives the same pseudonym, without the key it cannot be reversed."""
    if not patient_id:
        return HIDDEN
    return "anon-" + hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:12]


def identifiers(comparison: Comparison) -> list[str]:
    """Strings that must not appear in de-identified outputs: patient ids and names (and name parts)."""
    found: set[str] = set()
    for meta in (comparison.baseline.meta, comparison.followup.meta):
        for value in (meta.patient_id, meta.patient_name):
            if value and value.strip():
                found.add(value.strip())
                if value is meta.patient_name:
                    for part in value.replace("^", " ").replace(",", " ").split():
                        if len(part) >= 3:
                            found.add(part)
    return sorted(found, key=len, reverse=True)


_DATA_URI = re.compile(r"(data:image/png;base64,[A-Za-z0-9+/=]+)")


def scrub_page(page: str, secrets: list[str]) -> str:
    """`scrub` on the text of a page, leaving embedded images alone (base64 may contain any letters)."""
    return "".join(p if p.startswith("data:image/") else scrub(p, secrets) for p in _DATA_URI.split(page))


def page_text(page: str) -> str:
    return _DATA_URI.sub("", page)


def scrub(text: str | None, secrets: list[str], replacement: str = HIDDEN) -> str | None:
    """Replace identifiers inside free text (descriptions, error messages), case-insensitively."""
    if text is None:
        return None
    lower = text.lower()
    for secret in secrets:
        s = secret.lower()
        start = lower.find(s)
        while start >= 0:
            text = text[:start] + replacement + text[start + len(s):]
            lower = text.lower()
            start = lower.find(s, start + len(replacement))
    return text


def _visit_block(image: Image, role: str, deidentify: bool, secrets: list[str]) -> dict:
    m = image.meta
    return {
        "role": role,
        "study_date": m.study_date,
        "study_time": m.study_time,
        "modality": m.modality,
        "series_description": scrub(m.series_description, secrets) if deidentify else m.series_description,
        "series_uid": None if deidentify else m.series_uid,
        "sources": [] if deidentify else list(m.sources),
        "size": list(image.size),
        "spacing_mm": [float(s) for s in image.spacing],
        "origin_mm": [float(s) for s in image.origin],
        "direction": [float(s) for s in image.direction],
        "orientation": _orientation_code(image.itk),
        "rgb": image.is_rgb,
    }


def _patient_block(comparison: Comparison, deidentify: bool, key: bytes | None, patient_id: str | None) -> dict:
    b, f = comparison.baseline.meta, comparison.followup.meta
    pid = patient_id or b.patient_id or f.patient_id
    name = b.patient_name or f.patient_name
    if not deidentify:
        return {"id": pid, "name": name, "deidentified": False}
    return {"id": pseudonym(pid, key or os.urandom(32)), "name": HIDDEN if name else None, "deidentified": True}


def _orientation_code(itk: sitk.Image) -> str | None:
    if itk.GetDimension() != 3:
        return None
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(itk.GetDirection())


# --------------------------------------------------------------------------- registration


def _registration_block(registration: Any) -> dict:
    """QC fields as plain JSON, whatever object the registration stage returned."""
    qc = getattr(registration, "qc", None)
    if qc is None:
        fields: dict = {}
    elif hasattr(qc, "to_dict"):
        fields = dict(qc.to_dict())
    elif dataclasses.is_dataclass(qc):
        fields = {f.name: getattr(qc, f.name) for f in dataclasses.fields(qc)}
    elif isinstance(qc, Mapping):
        fields = dict(qc)
    else:
        fields = dict(vars(qc))
    fields = jsonable(fields)
    suspect = bool(fields.get("suspect", getattr(registration, "suspect", False)))
    reasons = fields.get("reasons") or list(getattr(registration, "reasons", ()) or ())
    fields["suspect"] = suspect
    fields["reasons"] = list(reasons)
    transform = getattr(registration, "transform", None)
    fields["transform_file"] = OUTPUT_FILES["transform"] if transform is not None else None
    fields["transform_kind"] = transform.GetName() if transform is not None else None
    fields["transform_direction"] = "maps baseline (fixed) points to follow-up (moving) points"
    return fields


def _write_registration(comparison: Comparison, out_dir: Path) -> None:
    """registered.nii.gz and transform.tfm, through `Registration.save` when the stage provides it."""
    reg = comparison.registration
    registered = _clean_itk(as_volume(comparison.registered.itk))
    if hasattr(reg, "save") and dataclasses.is_dataclass(reg) and hasattr(reg, "registered"):
        # Registration.save writes registered.nii.gz, transform.tfm and qc.json atomically; hand it the
        # report's copy of the registered image (metadata stripped, 2D as a single-slice volume).
        dataclasses.replace(reg, registered=comparison.registered.with_itk(registered)).save(out_dir)
        return
    _write_nifti(out_dir / OUTPUT_FILES["registered"], registered)
    transform = getattr(reg, "transform", None)
    if transform is not None:
        atomic_write(out_dir / OUTPUT_FILES["transform"], lambda p: sitk.WriteTransform(transform, p))


# --------------------------------------------------------------------------- regions


def ordered_regions(regions: tuple[ScoredRegion, ...] | list[ScoredRegion]) -> list[ScoredRegion]:
    """Flagged first, then by score (highest first), then id: the order every listing uses."""
    return sorted(regions, key=lambda r: (not r.flagged, -_finite(r.score), r.id))


def _finite(x: float) -> float:
    x = float(x)
    return x if math.isfinite(x) else -math.inf


def _region_row(r: ScoredRegion, stat_keys: list[str]) -> dict:
    centre = list(r.centre_mm) + [None] * (3 - len(r.centre_mm))
    row = {
        "id": r.id,
        "label": r.label,
        "centre_x_mm": centre[0],
        "centre_y_mm": centre[1],
        "centre_z_mm": centre[2],
        "volume_mm3": r.volume_mm3,
        "score": r.score,
        "flagged": bool(r.flagged),
        "bbox_lo": " ".join(str(int(v)) for v in r.bbox[0]),
        "bbox_hi": " ".join(str(int(v)) for v in r.bbox[1]),
    }
    for k in stat_keys:
        row[k] = r.stats.get(k)
    return row


def _stat_keys(regions: list[ScoredRegion]) -> list[str]:
    keys: list[str] = []
    for r in regions:
        for k in r.stats:
            if k not in keys:
                keys.append(k)
    return keys


def _regions_csv(regions: list[ScoredRegion]) -> str:
    keys = _stat_keys(regions)
    buf = _io.StringIO()
    fields = list(_region_row(regions[0], keys)) if regions else list(_region_row(_EMPTY_REGION, []))
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in regions:
        row = _region_row(r, keys)
        writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()})
    return buf.getvalue()


_EMPTY_REGION = ScoredRegion(id=0, label="", centre_mm=(0.0, 0.0, 0.0), bbox=((0,), (0,)), volume_mm3=0.0, score=0.0, flagged=False)


def _location(centre_mm: tuple[float, ...]) -> str:
    """LPS millimetres as anatomical directions a reader does not have to decode: R/L, A/P, I/S.
    2D images (photographs, projections) have no patient axes: plain x, y in the image plane."""
    if len(centre_mm) == 2:
        return f"x&nbsp;{centre_mm[0]:.2f} · y&nbsp;{centre_mm[1]:.2f}"
    names = (("R", "L"), ("A", "P"), ("I", "S"))
    parts = []
    for value, (neg, pos) in zip(centre_mm, names):
        parts.append(f"{pos if value >= 0 else neg}&nbsp;{abs(value):.1f}")
    return " · ".join(parts)


# --------------------------------------------------------------------------- display arrays


@dataclass(frozen=True)
class _View:
    """An image in display order: array (k, j, i[, c]) with i -> patient left, j -> posterior, k -> superior (3D)."""

    array: np.ndarray  # float32, (k, j, i) or (k, j, i, 3) for RGB
    spacing: tuple[float, float, float]  # (i, j, k) mm
    itk: sitk.Image  # the reoriented image (for index <-> physical)
    is3d: bool


def _view(image: sitk.Image) -> _View:
    if image.GetDimension() == 3:
        itk = sitk.DICOMOrient(image, "LPS")
        arr = sitk.GetArrayFromImage(itk).astype(np.float32)
        sp = tuple(float(s) for s in itk.GetSpacing())
        return _View(arr, sp, itk, True)
    arr = sitk.GetArrayFromImage(image).astype(np.float32)[None]
    sp = (float(image.GetSpacing()[0]), float(image.GetSpacing()[1]), 1.0)
    return _View(arr, sp, image, False)


def _gray(view: _View) -> np.ndarray:
    a = view.array
    if a.ndim == 4:
        n = a.shape[-1]
        if n >= 3:
            return 0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]
        return a.mean(axis=-1)
    return a


def _window(arr: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Robust display window from the foreground (voxels above the image minimum), so background does not set it."""
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return 0.0, 1.0
    fg = finite[finite > finite.min()]
    sample = fg if fg.size >= 16 else finite
    lo, hi = np.percentile(sample, percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _rgb_display(view: _View) -> np.ndarray:
    """RGB in 0..1: 8-bit data by its range, anything else by robust per-image limits."""
    a = view.array[..., :3]
    if a.max() <= 255 and a.min() >= 0 and a.max() > 1.0:
        return np.clip(a / 255.0, 0, 1)
    lo, hi = _window(a, (0.5, 99.5))
    return np.clip((a - lo) / (hi - lo), 0, 1)


def _plane(vol: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A 2D slice in display orientation (row 0 at the top of the screen)."""
    if plane == "axial":
        return vol[index]  # rows: anterior -> posterior, columns: right -> left
    if plane == "coronal":
        return vol[::-1, index]  # rows: superior -> inferior, columns: right -> left
    return vol[::-1, :, index]  # sagittal; rows: superior -> inferior, columns: anterior -> posterior


def _plane_axes(plane: str) -> tuple[int, int]:
    """(column axis, row axis) of a plane, as indices into (i, j, k)."""
    return {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[plane]


_SLICE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
_ORIENT_LABELS = {  # (top, bottom, left, right) of the screen
    "axial": ("A", "P", "R", "L"),
    "coronal": ("S", "I", "R", "L"),
    "sagittal": ("S", "I", "A", "P"),
}


def _box_in_view(bbox: tuple[tuple[int, ...], tuple[int, ...]], base: sitk.Image, view: _View) -> tuple[np.ndarray, np.ndarray]:
    """A baseline-grid bbox as (lo, hi) voxel index (i, j, k) of the display view (hi exclusive)."""
    lo, hi = np.array(bbox[0], dtype=float), np.array(bbox[1], dtype=float) - 1
    dim = base.GetDimension()
    if not view.is3d:
        lo2, hi2 = lo[:2], hi[:2]
        return np.append(lo2, 0), np.append(hi2, 0) + 1
    corners = []
    for bits in range(2 ** dim):
        idx = [float(hi[d] if (bits >> d) & 1 else lo[d]) for d in range(dim)]
        point = base.TransformContinuousIndexToPhysicalPoint(idx)
        corners.append(view.itk.TransformPhysicalPointToContinuousIndex(point))
    c = np.rint(np.array(corners))
    return c.min(axis=0), c.max(axis=0) + 1


# --------------------------------------------------------------------------- figures


def new_figure(**kwargs):
    """A matplotlib Figure on its own Agg canvas: no pyplot, so no global backend or figure registry is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def figure_data_uri(fig, dpi: int) -> str:
    """A matplotlib figure as an inline PNG."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class _Display:
    base: _View  # harmonised baseline (gray), display window source
    follow: _View  # harmonised follow-up on the baseline grid
    diff: np.ndarray  # follow - base, NaN where both are background
    base_rgb: np.ndarray | None  # colour baseline / registered follow-up, 0..1, when the inputs are RGB
    follow_rgb: np.ndarray | None
    score: _View
    window: tuple[float, float]
    diff_limit: float
    score_range: tuple[float, float]
    threshold: float


def _display(comparison: Comparison, settings: ReportSettings) -> _Display:
    base = _view(comparison.baseline_harmonised.itk)
    follow = _view(comparison.followup_harmonised.itk)
    base = dataclasses.replace(base, array=_gray(base))
    follow = dataclasses.replace(follow, array=_gray(follow))
    base_rgb = follow_rgb = None
    if comparison.baseline.is_rgb:
        base_rgb = _rgb_display(_view(comparison.baseline.itk))
        if comparison.registered.is_rgb:
            follow_rgb = _rgb_display(_view(comparison.registered.itk))
    score = _view(comparison.change_map_baseline.itk)
    window = _window(base.array, settings.window_percentiles)
    # Background that both images hold at their minimum (e.g. outside the head after harmonisation) is not
    # compared: the difference there is an artefact of the two harmonisations, so it is blanked (NaN).
    outside = (base.array <= base.array.min()) & (follow.array <= follow.array.min())
    diff = np.where(outside, np.nan, follow.array - base.array).astype(np.float32)
    finite = np.abs(diff[np.isfinite(diff)])
    diff_limit = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    s = score.array[np.isfinite(score.array)]
    threshold = float(comparison.threshold)
    if s.size:
        lo = min(float(np.percentile(s, 90)), threshold)
        hi = max(float(np.percentile(s, 99.9)), 1.5 * threshold)  # a few extreme voxels must not wash out the rest
    else:
        lo, hi = 0.0, threshold
    if hi <= lo:
        hi = lo + 1.0
    return _Display(base, follow, diff, base_rgb, follow_rgb, score, window, diff_limit or 1.0, (lo, hi), threshold)


def _crop(shape_kji: tuple[int, int, int], centre: np.ndarray, half_mm: float, spacing: tuple[float, float, float]):
    """Index ranges (i, j, k) of a field of view of +-half_mm around centre, clipped to the image."""
    lo, hi = [], []
    for axis in range(3):
        n = shape_kji[2 - axis]
        half = int(math.ceil(half_mm / spacing[axis]))
        a = int(max(0, round(centre[axis]) - half))
        b = int(min(n, round(centre[axis]) + half + 1))
        lo.append(a)
        hi.append(max(b, a + 1))
    return np.array(lo), np.array(hi)


def _cut(vol: np.ndarray, plane: str, index: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Plane at index, cropped to the (i, j, k) box lo..hi, in display orientation."""
    sl = _plane(vol, plane, index)
    ca, ra = _plane_axes(plane)
    nrows = sl.shape[0]
    if plane == "axial":
        rows = slice(lo[ra], hi[ra])
    else:  # rows are flipped (superior at the top)
        rows = slice(nrows - hi[ra], nrows - lo[ra])
    return sl[rows, lo[ca]:hi[ca]]


def _rect(plane: str, box_lo: np.ndarray, box_hi: np.ndarray, lo: np.ndarray, hi: np.ndarray, nk: int):
    """(x0, y0, width, height) of a region box in the cropped plane's pixel coordinates."""
    ca, ra = _plane_axes(plane)
    x0 = box_lo[ca] - lo[ca] - 0.5
    w = box_hi[ca] - box_lo[ca]
    if plane == "axial":
        y0 = box_lo[ra] - lo[ra] - 0.5
    else:
        # flipped rows: voxel k sits at row (nk - 1 - k); crop starts at row nk - hi[k]
        y0 = (nk - box_hi[ra]) - (nk - hi[ra]) - 0.5
    h = box_hi[ra] - box_lo[ra]
    return x0, y0, w, h


def _aspect(plane: str, spacing: tuple[float, float, float]) -> float:
    ca, ra = _plane_axes(plane)
    return spacing[ra] / spacing[ca]


def _orientation_marks(ax, plane: str) -> None:
    from matplotlib import patheffects

    top, bottom, left, right = _ORIENT_LABELS[plane]
    style = dict(color="yellow", fontsize=8, fontweight="bold", transform=ax.transAxes, ha="center", va="center",
                 path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])
    ax.text(0.5, 0.96, top, **style)
    ax.text(0.5, 0.04, bottom, **style)
    ax.text(0.03, 0.5, left, **style)
    ax.text(0.97, 0.5, right, **style)


def _size_text(region: ScoredRegion, is3d: bool) -> str:
    return f"{region.volume_mm3:.0f} mm³" if is3d else f"{region.volume_mm3:.3g} mm²"


def _score_cmap():
    """Inferno without its black end: an overlay colour must never read as "dark tissue"."""
    import matplotlib as mpl

    return mpl.colors.ListedColormap(mpl.colormaps["inferno"](np.linspace(0.3, 1.0, 256)), name="inferno_overlay")


def _score_mappable(d: _Display):
    import matplotlib as mpl

    return mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(*d.score_range), cmap=_score_cmap())


def _score_rgba(score: np.ndarray, d: _Display) -> np.ndarray:
    """Score colours whose opacity ramps up to the threshold: sub-threshold noise stays faint, flagged change solid."""
    lo, hi = d.score_range
    rgba = _score_cmap()(np.clip((score - lo) / (hi - lo), 0, 1))
    ramp = np.clip((score - lo) / max(d.threshold - lo, 1e-6), 0, 1)
    rgba[..., 3] = np.where(np.isfinite(score), 0.9 * ramp**2, 0)
    return rgba


class _RegionFigures:
    """One figure (planes x 4 panels, colour bars, legend) reused for every region: only image data, boxes and
    titles change between regions, which renders several times faster than building a figure per region."""

    COLUMNS = ("Baseline", "Follow-up (registered)", "Difference (follow-up − baseline)", "Change score over baseline")
    BOX = "#00e5ff"

    def __init__(self, d: _Display, settings: ReportSettings):
        import matplotlib as mpl
        from matplotlib.lines import Line2D
        from matplotlib.patches import Rectangle

        self.d, self.settings = d, settings
        view = d.base
        self.planes = ("axial", "coronal", "sagittal") if view.is3d else ("axial",)
        n = len(self.planes)
        height = 3.0 * n + 1.5
        self.fig = fig = new_figure(figsize=(12.0, height))
        top, bottom = 1 - 0.62 / height, 1.0 / height
        grid = fig.add_gridspec(n, 4, left=0.035, right=0.995, top=top, bottom=bottom, wspace=0.03, hspace=0.05)
        vmin, vmax = d.window
        blank = np.zeros((2, 2), np.float32)
        self.axes, self.images, self.boxes = [], [], []
        for row, plane in enumerate(self.planes):
            aspect = _aspect(plane, view.spacing)
            row_axes, row_images = [], []
            for col in range(4):
                ax = fig.add_subplot(grid[row, col])
                ax.set_axis_off()
                if col in (0, 1) and (d.base_rgb if col == 0 else d.follow_rgb) is not None:
                    ims = [ax.imshow(np.zeros((2, 2, 3)), aspect=aspect, interpolation="nearest")]
                elif col == 2:  # blanked background (NaN) drawn black like the other panels
                    ims = [ax.imshow(blank, cmap=mpl.colormaps["RdBu_r"].with_extremes(bad="black"), vmin=-d.diff_limit, vmax=d.diff_limit, aspect=aspect,
                                     interpolation="nearest")]
                else:
                    ims = [ax.imshow(blank, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")]
                if col == 3:
                    ims.append(ax.imshow(np.zeros((2, 2, 4)), aspect=aspect, interpolation="nearest"))
                box = Rectangle((0, 0), 1, 1, fill=False, edgecolor=self.BOX, linewidth=1.4, linestyle="--")
                ax.add_patch(box)
                self.boxes.append(box)
                if view.is3d and col == 0:
                    _orientation_marks(ax, plane)
                if row == 0:
                    ax.set_title(self.COLUMNS[col], fontsize=10)
                if col == 0 and view.is3d:
                    ax.text(-0.02, 0.5, plane, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=10)
                row_axes.append(ax)
                row_images.append(ims)
            self.axes.append(row_axes)
            self.images.append(row_images)
        # colour bars under the difference and score columns
        for col, label in ((2, "harmonised intensity difference"), (3, "change score (cyan line: threshold)")):
            box = grid[n - 1, col].get_position(fig)
            cax = fig.add_axes((box.x0 + 0.1 * box.width, 0.50 / height, 0.8 * box.width, 0.14 / height))
            mappable = self.images[0][col][-1] if col == 2 else _score_mappable(d)
            cb = fig.colorbar(mappable, cax=cax, orientation="horizontal")
            cb.set_label(label, fontsize=8)
            cb.ax.tick_params(labelsize=7)
            if col == 3:
                cb.ax.axvline(d.threshold, color=self.BOX, linewidth=2)
        fig.legend(handles=[Line2D([], [], color=self.BOX, linestyle="--", label="the region (bounding box)")],
                   loc="lower left", bbox_to_anchor=(0.03, 0.42 / height), fontsize=9, frameon=False)
        self.title = fig.suptitle("", fontsize=11, y=1 - 0.12 / height)

    def render(self, place: _Place, baseline_itk: sitk.Image) -> str:
        d, view, settings = self.d, self.d.base, self.settings
        region, others = place.lead, place.members
        box_lo, box_hi = _box_in_view(place.bbox, baseline_itk, view)
        centre = (box_lo + box_hi - 1) / 2.0
        extent_mm = max((box_hi[a] - box_lo[a]) * view.spacing[a] for a in range(3 if view.is3d else 2))
        image_mm = min(n * sp for n, sp in zip(view.array.shape[::-1], view.spacing) if n > 1)
        half = max(min(settings.context_mm, image_mm / 4), 1.5 * extent_mm)
        lo, hi = _crop(view.array.shape, centre, half, view.spacing)
        nk = view.array.shape[0]
        for row, plane in enumerate(self.planes):
            index = int(np.clip(round(centre[_SLICE_AXIS[plane]]), 0, view.array.shape[2 - _SLICE_AXIS[plane]] - 1))
            if not view.is3d:
                index = 0
            b = _cut(d.base.array, plane, index, lo, hi)
            f = _cut(d.follow.array, plane, index, lo, hi)
            s = _cut(d.score.array, plane, index, lo, hi)
            data = [
                _cut(d.base_rgb, plane, index, lo, hi) if d.base_rgb is not None else b,
                _cut(d.follow_rgb, plane, index, lo, hi) if d.follow_rgb is not None else f,
                _cut(d.diff, plane, index, lo, hi),
                b,
            ]
            x0, y0, w, h = _rect(plane, box_lo, box_hi, lo, hi, nk)
            rows, cols = b.shape
            for col in range(4):
                ims = self.images[row][col]
                ims[0].set_data(data[col])
                if col == 3:
                    ims[1].set_data(_score_rgba(s, d))
                for im in ims:
                    im.set_extent((-0.5, cols - 0.5, rows - 0.5, -0.5))
                ax = self.axes[row][col]
                ax.set_xlim(-0.5, cols - 0.5)
                ax.set_ylim(rows - 0.5, -0.5)
                self.boxes[row * 4 + col].set_bounds(x0, y0, w, h)
        title = f"Region {region.id} ({region.label}): score {region.score:.2f}, {_size_text(region, view.is3d)}"
        if others:
            title += f", with {len(others)} overlapping flagged region{'s' if len(others) > 1 else ''} (box: all of them)"
        self.title.set_text(title)
        return figure_data_uri(self.fig, settings.dpi)


def _overview_figure(d: _Display, flagged: list[ScoredRegion], baseline_itk: sitk.Image, settings: ReportSettings) -> str:
    view = d.base
    nk = view.array.shape[0]
    if view.is3d:
        wanted: list[int] = []
        for r in flagged:
            blo, bhi = _box_in_view(r.bbox, baseline_itk, view)
            k = int(np.clip(round((blo[2] + bhi[2] - 1) / 2), 0, nk - 1))
            if k not in wanted:
                wanted.append(k)
            if len(wanted) >= settings.overview_slices // 2:
                break
        fg = np.where((view.array > d.window[0]).reshape(nk, -1).any(axis=1))[0]
        k0, k1 = (int(fg.min()), int(fg.max())) if fg.size else (0, nk - 1)
        spread = np.linspace(k0, k1, settings.overview_slices + 2)[1:-1].round().astype(int)
        for k in spread:
            if len(wanted) >= settings.overview_slices:
                break
            if all(abs(k - w) > max(1, (k1 - k0) // (2 * settings.overview_slices)) for w in wanted):
                wanted.append(int(k))
        slices = sorted(wanted, reverse=True)  # superior first
    else:
        slices = [0]
    ncols = min(3, len(slices))
    nrows = int(math.ceil(len(slices) / ncols))
    height = 3.6 * nrows + 1.0
    fig = new_figure(figsize=(3.6 * ncols, height))
    grid = fig.add_gridspec(nrows, ncols, left=0.01, right=0.99, top=1 - 0.3 / height, bottom=0.95 / height,
                            wspace=0.03, hspace=0.12)
    axes = np.array([[fig.add_subplot(grid[r, c]) for c in range(ncols)] for r in range(nrows)])
    aspect = _aspect("axial", view.spacing)
    for n, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if n >= len(slices):
            continue
        k = slices[n]
        if d.base_rgb is not None:
            ax.imshow(_plane(d.base_rgb, "axial", k), aspect=aspect, interpolation="nearest")
        else:
            ax.imshow(_plane(d.base.array, "axial", k), cmap="gray", vmin=d.window[0], vmax=d.window[1], aspect=aspect,
                      interpolation="nearest")
        ax.imshow(_score_rgba(_plane(d.score.array, "axial", k), d), aspect=aspect, interpolation="nearest")
        if view.is3d:
            z = view.itk.TransformIndexToPhysicalPoint((0, 0, int(k)))[2]
            ax.set_title(f"axial, {'S' if z >= 0 else 'I'} {abs(z):.0f} mm", fontsize=11)
            _orientation_marks(ax, "axial")
    cax = fig.add_axes((0.2, 0.5 / height, 0.6, 0.14 / height))
    cb = fig.colorbar(_score_mappable(d), cax=cax, orientation="horizontal")
    cb.set_label("change score over the baseline (cyan line: threshold)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    cb.ax.axvline(d.threshold, color="#00e5ff", linewidth=2)
    return figure_data_uri(fig, settings.dpi)


@dataclass(frozen=True)
class _Place:
    """Flagged regions of one label whose boxes overlap (e.g. neighbouring grid cubes on one lesion): one figure."""

    lead: ScoredRegion  # highest score
    members: tuple[int, ...]  # ids of the other regions
    bbox: tuple[tuple[int, ...], tuple[int, ...]]  # union of the boxes


def _places(flagged: list[ScoredRegion], cap: int) -> list[_Place]:
    """Greedy, highest score first: a place is a flagged region plus the flagged regions of the same label whose
    boxes overlap it directly (not transitively, so the box stays about one region wide)."""
    places: list[_Place] = []
    taken: set[int] = set()
    for lead in flagged:
        if len(places) >= cap:
            break
        if lead.id in taken:
            continue
        lo, hi = np.array(lead.bbox[0]), np.array(lead.bbox[1])
        members = [r for r in flagged if r.id != lead.id and r.id not in taken and r.label == lead.label
                   and np.all(np.array(r.bbox[0]) < hi) and np.all(lead.bbox[0] < np.array(r.bbox[1]))]
        taken.add(lead.id)
        taken.update(r.id for r in members)
        ulo = np.min([lo] + [r.bbox[0] for r in members], axis=0)
        uhi = np.max([hi] + [r.bbox[1] for r in members], axis=0)
        places.append(_Place(lead=lead, members=tuple(r.id for r in members),
                             bbox=(tuple(int(v) for v in ulo), tuple(int(v) for v in uhi))))
    return places


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:1240px;margin:0 auto;padding:18px 24px 40px}
h1{font-size:22px;margin:4px 0 2px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #d5d9e0;padding-bottom:4px}
.sub{color:#5b6475;font-size:13px}
.cards{display:flex;gap:14px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px 14px;flex:1 1 300px}
.card h3{margin:0 0 6px;font-size:14px;color:#3b4456}
table.kv td{padding:2px 10px 2px 0;font-size:13px;vertical-align:top} table.kv td:first-child{color:#5b6475;white-space:nowrap}
.verdict{border-radius:10px;padding:16px 22px;margin:14px 0;color:#fff;display:flex;align-items:center;gap:28px;flex-wrap:wrap}
.verdict.pos{background:#b3261e} .verdict.neg{background:#1e7b45}
.verdict .big{font-size:34px;font-weight:700;letter-spacing:.5px}
.verdict .score{font-size:26px;font-weight:600}
.verdict .expl{font-size:14px;max-width:620px;opacity:.95}
.warn{background:#fff4d6;border:2px solid #e0a100;border-radius:8px;padding:10px 16px;margin:10px 0;color:#5a4100}
.warn b{font-size:15px} .warn ul{margin:6px 0 0 18px;padding:0}
.ok{background:#e7f5ec;border:1px solid #8cc9a4;border-radius:8px;padding:8px 14px;margin:10px 0;color:#1e5b37;font-size:14px}
table.regions{border-collapse:collapse;background:#fff;font-size:13px;width:100%}
table.regions th{background:#2f3a4f;color:#fff;text-align:left;padding:6px 8px;cursor:pointer;user-select:none;white-space:nowrap}
table.regions th::after{content:" \\2195";opacity:.55;font-size:11px}
table.regions td{padding:4px 8px;border-bottom:1px solid #e6e9ef}
table.regions tr.flag td{background:#fdecea} table.regions td.num{text-align:right;font-variant-numeric:tabular-nums}
.tag{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600}
.tag.y{background:#b3261e;color:#fff} .tag.n{background:#e3e6eb;color:#3b4456}
figure{margin:12px 0 22px;background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:8px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto} figcaption{font-size:13px;color:#3b4456;padding:4px 6px}
.note{font-size:12px;color:#5b6475;margin:6px 0}
footer{font-size:12px;color:#5b6475;margin-top:30px;border-top:1px solid #d5d9e0;padding-top:8px}
"""

_SORT_JS = """
document.querySelectorAll('table.regions th').forEach(function(th,col){th.addEventListener('click',function(){
var tb=th.closest('table').tBodies[0],rows=Array.from(tb.rows),asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
rows.sort(function(a,b){var x=a.cells[col].dataset.v||a.cells[col].textContent,y=b.cells[col].dataset.v||b.cells[col].textContent;
var nx=parseFloat(x),ny=parseFloat(y);var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);return asc?c:-c;});
rows.forEach(function(r){tb.appendChild(r);});});});
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return format(float(value), spec) if math.isfinite(float(value)) else "–"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, spec) for v in value)
    return str(value)


def _label(key: str) -> str:
    """A JSON key as a table label: units suffixes in brackets (translation_mm -> translation (mm))."""
    for suffix, unit in (("_mm3", "mm³"), ("_mm", "mm"), ("_s", "s")):
        if key.endswith(suffix):
            return key[: -len(suffix)].replace("_", " ") + f" ({unit})"
    return key.replace("_", " ")


def _date(d: str | None) -> str:
    if d and len(d) == 8 and d.isdigit():
        return f"{d[:4]}-{d[4:6]}-{d[6:]}"
    return d or "–"


def _html(result: dict, regions: list[ScoredRegion], figures: list[tuple[_Place, str]], overview: str,
          settings: ReportSettings) -> str:
    patient, visits, reg = result["patient"], result["visits"], result["registration"]
    flagged_n = sum(1 for r in regions if r.flagged)
    title = f"Change report — {patient['id'] or 'unknown patient'}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body><main>"]
    b, f = visits
    parts.append(f"<h1>Longitudinal change report</h1><div class='sub'>Patient <b>{_e(patient['id'] or '–')}</b>"
                 f"{'' if not patient.get('name') else ' · ' + _e(patient['name'])}"
                 f" · baseline {_e(_date(b['study_date']))} → follow-up {_e(_date(f['study_date']))}"
                 f" · {_e(b['modality'] or f['modality'] or '')}</div>")

    # verdict
    pos = bool(result["progression"])
    far = result["false_alarm_rate"]
    far_txt = f"{far * 100:.3g}%" if far is not None else "–"
    parts.append(
        f"<div class='verdict {'pos' if pos else 'neg'}'><div class='big'>{'PROGRESSION' if pos else 'NO PROGRESSION'}</div>"
        f"<div class='score'>score {_fmt(result['progression_score'], '.2f')}<br><span style='font-size:15px;font-weight:400'>"
        f"threshold {_fmt(result['threshold'], '.2f')}</span></div>"
        f"<div class='expl'>{flagged_n} flagged finding{'' if flagged_n == 1 else 's'} above the threshold, among "
        f"{int(result.get('n_regions_scored') or len(regions)):,} regions scored. The threshold is set so that about "
        f"{far_txt} of regions that did not change would be flagged by chance (false-alarm rate {_fmt(far, '.3g')} per region). "
        f"This is decision support: read the images below.</div></div>")

    # registration quality
    if reg.get("suspect"):
        reasons = "".join(f"<li>{_e(r)}</li>" for r in reg.get("reasons", [])) or "<li>no reason given</li>"
        parts.append(f"<div class='warn'><b>⚠ Registration is suspect — changes below may be alignment errors.</b><ul>{reasons}</ul></div>")
    else:
        parts.append("<div class='ok'>Registration passed its quality checks.</div>")

    # summary cards
    def visit_card(v: dict, name: str) -> str:
        rows = [("study date", _date(v["study_date"])), ("modality", v["modality"]), ("series", v["series_description"]),
                ("size (voxels)", " × ".join(map(str, v["size"]))),
                ("spacing (mm)", " × ".join(f"{s:.3g}" for s in v["spacing_mm"])),
                ("orientation", v["orientation"] or ("2D" if len(v["size"]) == 2 else "–")),
                ("colour", "RGB" if v["rgb"] else "grey")]
        return (f"<div class='card'><h3>{name}</h3><table class='kv'>"
                + "".join(f"<tr><td>{_e(k)}</td><td>{_e(val if val not in (None, '') else '–')}</td></tr>" for k, val in rows)
                + "</table></div>")

    qc_rows = [(k, v) for k, v in reg.items() if k not in ("reasons", "suspect", "transform_direction") and not isinstance(v, (dict, list))]
    qc_rows += [(k, v) for k, v in reg.items() if k == "stages"]
    reg_card = ("<div class='card'><h3>Registration quality</h3><table class='kv'>"
                + "".join(f"<tr><td>{_e(_label(k))}</td><td>{_e(_fmt(v, '.4g'))}</td></tr>" for k, v in qc_rows)
                + "</table></div>")
    parts.append("<h2>Patient and visits</h2><div class='cards'>" + visit_card(b, "Baseline") + visit_card(f, "Follow-up")
                 + reg_card + "</div>")

    # overview
    parts.append(f"<h2>Overview</h2><figure><img alt='change map overview' src='{overview}'><figcaption>Change score over "
                 + ("the baseline (harmonised), axial slices seen from the feet: anterior up, patient left on the image right. "
                    if len(b["size"]) == 3 else "the baseline, shown as stored (first row at the top). ") +
                 "The cyan line on the colour bar is the flagging threshold.</figcaption></figure>")

    # table
    shown = regions[: settings.max_table_rows]
    stat_keys = _stat_keys(shown)[:4]
    is3d = len(b["size"]) == 3
    head = ["id", "label", "location (mm)", "volume (mm³)" if is3d else "area (mm²)", "score", "flagged"] + stat_keys
    rows_html = []
    for r in shown:
        cells = [f"<td class='num'>{r.id}</td>", f"<td>{_e(r.label)}</td>",
                 f"<td data-v='{r.centre_mm[-1]:.3f}'>{_location(r.centre_mm)}</td>",
                 f"<td class='num'>{_fmt(r.volume_mm3, '.0f' if is3d else '.3g')}</td>", f"<td class='num'>{_fmt(r.score, '.2f')}</td>",
                 f"<td data-v='{1 if r.flagged else 0}'><span class='tag {'y' if r.flagged else 'n'}'>{'yes' if r.flagged else 'no'}</span></td>"]
        cells += [f"<td class='num'>{_fmt(r.stats.get(k))}</td>" for k in stat_keys]
        rows_html.append(f"<tr class='{'flag' if r.flagged else ''}'>{''.join(cells)}</tr>")
    where = ("distance from the scanner origin towards patient Right/Left, Anterior/Posterior, Inferior/Superior"
             if is3d else "x, y in the image plane")
    parts.append(f"<h2>Regions</h2><p class='note'>Flagged first, then by score. Location: {where}. "
                 "Click a column to sort.</p>"
                 "<table class='regions'><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head)
                 + "</tr></thead><tbody>" + "".join(rows_html) + "</tbody></table>")
    if len(regions) > len(shown):
        parts.append(f"<p class='note'>Showing {len(shown)} of {len(regions)} regions; all are in regions.csv and result.json.</p>")

    # flagged figures
    parts.append("<h2>Flagged regions</h2>")
    if not figures:
        parts.append("<p class='note'>No region is above the threshold.</p>")
    for place, uri in figures:
        r, others = place.lead, place.members
        listed = ", ".join(map(str, others[:20])) + (", …" if len(others) > 20 else "")
        also = (f" The dashed box also covers {len(others)} overlapping flagged region{'s' if len(others) > 1 else ''} "
                f"({listed}).") if others else " Dashed box: the region."
        parts.append(f"<figure><img alt='region {r.id}' src='{uri}'><figcaption><b>Region {r.id}</b> ({_e(r.label)}), "
                     f"{_location(r.centre_mm)} mm, score {_fmt(r.score, '.2f')}.{also} "
                     "Difference: red = brighter at follow-up, blue = darker. Score overlay: transparent well below "
                     "the threshold, solid above it.</figcaption></figure>")
    n_flagged_regions = sum(1 for r in regions if r.flagged)
    drawn = len(figures) + sum(len(p.members) for p, _ in figures)
    if drawn < n_flagged_regions:
        parts.append(f"<p class='note'>{n_flagged_regions - drawn} more flagged regions are not drawn (limit "
                     f"{settings.max_region_figures} figures); see regions.csv.</p>")

    pipe, enc = result["pipeline"], result["encoder"]
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in result["timings_s"].items() if isinstance(v, (int, float)))
    parts.append(f"<footer>longitudinal {_e(result['longitudinal_version'])} · pipeline {_e(pipe.get('name'))} "
                 f"{_e(pipe.get('version'))} · encoder {_e(enc.get('name'))} (weights sha256 {_e((enc.get('sha256') or '–')[:16])}…) · "
                 f"{_e(timings)} · written {_e(result['created'])}. Not a diagnosis.</footer>")
    parts.append(f"</main><script>{_SORT_JS}</script></body></html>")
    return "".join(parts)


# --------------------------------------------------------------------------- entry points


def _pipeline_block(pipeline: Any) -> dict:
    if pipeline is None:
        return {"name": None, "version": None, "source": None}
    return {
        "name": getattr(pipeline, "name", None),
        "version": getattr(pipeline, "version", None),
        "source": jsonable(getattr(pipeline, "source", None)),
        "settings": jsonable(getattr(pipeline, "stages", {}) or {}),
    }


def _encoder_block(encoder: Mapping[str, str] | None, deidentify: bool) -> dict:
    enc = dict(encoder or {})
    out = {"name": enc.get("name"), "sha256": enc.get("sha256") or enc.get("weights_sha256")}
    for k, v in enc.items():
        if k not in out:
            out[k] = v
    return jsonable(out)


def is_complete(out_dir: str | os.PathLike, stamp: Mapping | None = None) -> bool:
    """True when `write_outputs` finished in out_dir (every file present, sizes as written) with this stamp."""
    path = Path(out_dir) / COMPLETE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    for name, size in record.get("files", {}).items():
        f = Path(out_dir) / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return stamp is None or record.get("stamp") == jsonable(dict(stamp))


def write_outputs(
    comparison: Comparison,
    out_dir: str | os.PathLike,
    *,
    deidentify: bool = False,
    deid_key: bytes | None = None,
    secrets: tuple[str, ...] = (),
    patient_id: str | None = None,
    stamp: Mapping | None = None,
    settings: ReportSettings = ReportSettings(),
) -> dict[str, Path]:
    """Write every output file of one pair into out_dir, each atomically; `.complete` last.

    deidentify: patient id -> keyed pseudonym (`deid_key`, random when None), name -> "(hidden)", series UIDs and
    source paths dropped, free text scrubbed of id/name (and of `secrets`, e.g. the patient's folder name);
    patient_id: the caller's name for the patient (e.g. the batch's patient folder), used before the images' own;
    study dates are kept (intervals matter for reading change).
    stamp: anything that identifies the inputs (e.g. file sizes and mtimes, pipeline hash); stored in `.complete`
    so a later run can tell with `is_complete(out_dir, stamp)` whether this folder is still current.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE).unlink(missing_ok=True)  # an interrupted rewrite must not look finished
    extra = {s for s in (*secrets, patient_id) if s}
    secrets = sorted(set(identifiers(comparison)) | extra, key=len, reverse=True) if deidentify else []
    ordered = ordered_regions(comparison.regions)

    _write_nifti(out / OUTPUT_FILES["change_map"], sitk.Cast(comparison.change_map.itk, sitk.sitkFloat32))
    _write_nifti(out / OUTPUT_FILES["flagged_mask"], sitk.Cast(comparison.flagged_mask.itk, sitk.sitkUInt8))
    _write_registration(comparison, out)
    atomic_write_text(out / OUTPUT_FILES["regions"], _regions_csv(ordered))

    registration = _registration_block(comparison.registration)
    if deidentify:
        registration["reasons"] = [scrub(r, secrets) for r in registration["reasons"]]
    result: dict[str, Any] = {
        "progression_score": None if comparison.progression_score is None else float(comparison.progression_score),
        "progression": bool(comparison.progression),
        "verdict": comparison.verdict,
        "reason": comparison.reason,
        "warnings": list(comparison.warnings),
        "identical_inputs": comparison.identical,
        "threshold": float(comparison.threshold),
        "false_alarm_rate": float(comparison.false_alarm_rate),
        "n_regions": len(ordered),
        "n_flagged": sum(1 for r in ordered if r.flagged),
        "n_regions_scored": int(comparison.regions_scored),
        "patient": _patient_block(comparison, deidentify, deid_key, patient_id),
        "visits": [_visit_block(comparison.baseline, "baseline", deidentify, secrets),
                   _visit_block(comparison.followup, "followup", deidentify, secrets)],
        "registration": registration,
        "pipeline": _pipeline_block(comparison.pipeline),
        "encoder": _encoder_block(comparison.encoder, deidentify),
        "longitudinal_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": dict(OUTPUT_FILES),
        "change_map_grid": "follow-up (2D inputs written as single-slice volumes)",
        "units": UNITS,
        "regions": [
            {"id": r.id, "label": r.label, "centre_mm": list(r.centre_mm), "bbox": [list(r.bbox[0]), list(r.bbox[1])],
             "volume_mm3": r.volume_mm3, "score": r.score, "flagged": bool(r.flagged), "stats": dict(r.stats),
             "diameter_mm": r.diameter_mm, "mean_change_pct": r.mean_change_pct, "n_voxels": r.n_voxels,
             "centre_index": None if r.centre_index is None else list(r.centre_index)}
            for r in ordered
        ],
    }
    result = jsonable(result)

    display = _display(comparison, settings)
    flagged = [r for r in ordered if r.flagged]
    chosen = _places(flagged, settings.max_region_figures)
    drawer = _RegionFigures(display, settings) if chosen else None
    figures = [(p, drawer.render(p, comparison.baseline_harmonised.itk)) for p in chosen]
    overview = _overview_figure(display, flagged, comparison.baseline_harmonised.itk, settings)

    timings = {k: float(v) for k, v in dict(comparison.timings_s).items()}
    timings["report"] = time.perf_counter() - t0
    result["timings_s"] = jsonable(timings)
    page = _html(result, ordered, figures, overview, settings)
    if deidentify:
        text = page_text(page).lower()
        leaked = [s for s in secrets if s.lower() in text]
        if leaked:  # defence in depth; only text is scrubbed, never the embedded images
            log.warning("scrubbing %d identifier string(s) left in the report text", len(leaked))
            page = scrub_page(page, secrets)
    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    if deidentify and any(s.lower() in text.lower() for s in secrets):
        log.warning("scrubbing identifier string(s) left in result.json")
        text = scrub(text, secrets)
    atomic_write_text(out / OUTPUT_FILES["report"], page)
    atomic_write_text(out / OUTPUT_FILES["result"], text)

    paths = {key: out / name for key, name in OUTPUT_FILES.items()}
    files = {name: (out / name).stat().st_size for name in OUTPUT_FILES.values()}
    record = {"files": files, "stamp": jsonable(dict(stamp)) if stamp is not None else None,
              "longitudinal_version": __version__, "deidentified": deidentify}
    atomic_write_text(out / COMPLETE, json.dumps(record, indent=2) + "\n")
    log.info("report written in %.1f s (%d regions, %d flagged)", timings["report"], len(ordered), len(flagged))
    return paths
