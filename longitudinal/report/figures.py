"""The report's pictures (matplotlib, no pyplot): an overview of the findings, one figure per finding, and the
alignment of a pair that could not be compared. Each returns an inline PNG (data URI).

Display orientation: 3D images are reoriented to LPS index order (SimpleITK `DICOMOrient`), then shown in
radiological convention: axial slices seen from the feet (anterior up, patient left on the image right),
coronal seen from the front (superior up, patient left on the image right), sagittal with anterior on the
left and superior up. 2D images (photographs, projection radiographs) are shown as stored (row 0 on top).

Drawing conventions, the same in every figure: a finding is filled and outlined in yellow with its number;
a region that scored below the threshold is a dashed cyan box without fill; tissue that only one visit imaged
(not compared) is hatched in the overview and grey in the difference panels, air is dark grey there.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..compare import Comparison, ScoredRegion
from .result import centre_index, ordered_regions
from .settings import ReportSettings

FINDING = "#ffd400"  # yellow: never used for tissue, for the difference or for the score
CONTEXT = "#00e5ff"  # cyan: regions below the threshold, and the threshold on colour bars
NOT_COMPARED = (0.55, 0.55, 0.55)
AIR = (0.17, 0.17, 0.17)
PLANES_3D = ("axial", "coronal", "sagittal")
_SLICE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}  # view axis (i, j, k) a plane's slices step along
_ORIENT_LABELS = {  # (top, bottom, left, right) of the screen
    "axial": ("A", "P", "R", "L"),
    "coronal": ("S", "I", "R", "L"),
    "sagittal": ("S", "I", "A", "P"),
}


def new_figure(**kwargs):
    """A matplotlib Figure on its own Agg canvas: no pyplot, so no global backend or figure registry is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def figure_data_uri(fig, dpi: int) -> str:
    """A matplotlib figure as an inline PNG (no timestamp in it: the same figure gives the same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- display arrays


@dataclass(frozen=True)
class View:
    """An image in display order: array (k, j, i[, c]) with i -> patient left, j -> posterior, k -> superior (3D)."""

    array: np.ndarray  # float32, (k, j, i) or (k, j, i, c)
    spacing: tuple[float, float, float]  # (i, j, k) mm
    itk: sitk.Image  # the reoriented image (index <-> physical)
    is3d: bool


def view(image: sitk.Image) -> View:
    if image.GetDimension() == 3:
        itk = sitk.DICOMOrient(image, "LPS")
        sp = tuple(float(s) for s in itk.GetSpacing())
        return View(sitk.GetArrayFromImage(itk).astype(np.float32), sp, itk, True)
    arr = sitk.GetArrayFromImage(image).astype(np.float32)[None]
    return View(arr, (float(image.GetSpacing()[0]), float(image.GetSpacing()[1]), 1.0), image, False)


def _gray(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:
        return 0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2] if a.shape[-1] >= 3 else a.mean(-1)
    return a


def _on_grid(mask: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A label image on `reference`'s grid (nearest neighbour when it is on another one)."""
    same = (mask.GetSize() == reference.GetSize()
            and np.allclose(mask.GetOrigin(), reference.GetOrigin(), atol=1e-4)
            and np.allclose(mask.GetSpacing(), reference.GetSpacing(), atol=1e-6)
            and np.allclose(mask.GetDirection(), reference.GetDirection(), atol=1e-6))
    return mask if same else sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


def _labels(mask: sitk.Image | None, reference: sitk.Image, dtype=np.int32) -> np.ndarray | None:
    if mask is None:
        return None
    return view(sitk.Cast(_on_grid(mask, reference), sitk.sitkFloat32)).array.astype(dtype)


def percentile_window(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _rgb(v: View) -> np.ndarray:
    """RGB in 0..1: 8-bit data by its range, anything else by robust limits."""
    a = v.array[..., :3]
    if a.max() <= 255 and a.min() >= 0 and a.max() > 1.0:
        return np.clip(a / 255.0, 0, 1)
    lo, hi = percentile_window(a, (0.5, 99.5))
    return np.clip((a - lo) / (hi - lo), 0, 1)


@dataclass(frozen=True)
class Display:
    """Everything the figures draw, in display order (k, j, i)."""

    base: View  # harmonised baseline, gray
    follow: np.ndarray  # harmonised follow-up on the baseline grid, gray
    base_rgb: np.ndarray | None  # colour photographs, 0..1
    follow_rgb: np.ndarray | None
    compared: np.ndarray  # bool: the voxels both visits imaged, which were compared
    body: np.ndarray  # bool: the baseline's body (compared or not)
    findings: np.ndarray  # finding number per voxel, 0 elsewhere
    score: np.ndarray
    window: tuple[float, float]
    diff_limit: float
    score_range: tuple[float, float]
    threshold: float
    reference: sitk.Image  # the baseline's own grid (slice numbers are given on it)
    percentiles: tuple[float, float]


def display(comparison: Comparison, settings: ReportSettings) -> Display:
    ref = comparison.baseline.itk
    base = view(comparison.baseline_harmonised.itk)
    base_gray = _gray(base.array)
    follow = _gray(view(comparison.followup_harmonised.itk).array)
    base_rgb = follow_rgb = None
    if comparison.baseline.is_rgb:
        base_rgb = _rgb(view(comparison.baseline.itk))
        if comparison.registered.is_rgb:
            follow_rgb = _rgb(view(comparison.registered.itk))
    analysis = comparison.analysis_mask.itk if comparison.analysis_mask is not None else None
    compared = _labels(analysis, ref)
    compared = np.ones(base_gray.shape, bool) if compared is None else compared > 0
    body = _labels(comparison.registration.fixed_mask, ref)
    body = compared.copy() if body is None else (body > 0) | compared
    labels = comparison.finding_labels_baseline
    findings = _labels(labels.itk, ref) if labels is not None else None
    findings = np.zeros(base_gray.shape, np.int32) if findings is None else findings
    score = view(comparison.change_map_baseline.itk).array
    inside = base_gray[compared] if compared.sum() >= 16 else base_gray[base_gray > base_gray.min()]
    window = percentile_window(inside, settings.window_percentiles)
    diff = np.abs(follow - base_gray)[compared]
    diff_limit = float(np.percentile(diff, 99.5)) if diff.size else 1.0
    s = score[np.isfinite(score) & compared]
    threshold = float(comparison.threshold)
    lo, hi = 0.0, threshold
    if s.size:
        lo = min(float(np.percentile(s, 90)), threshold)
        hi = max(float(np.percentile(s, 99.9)), 1.5 * threshold)  # a few extreme voxels must not wash out the rest
    return Display(dataclasses.replace(base, array=base_gray), follow, base_rgb, follow_rgb, compared, body, findings,
                   score, window, diff_limit or 1.0, (lo, hi if hi > lo else lo + 1.0), threshold, ref,
                   settings.window_percentiles)


# --------------------------------------------------------------------------- geometry


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


def _aspect(plane: str, spacing: tuple[float, float, float]) -> float:
    ca, ra = _plane_axes(plane)
    return spacing[ra] / spacing[ca]


def to_view_index(index: Sequence[float], reference: sitk.Image, v: View) -> np.ndarray:
    """A baseline-grid voxel index (x, y[, z]) as a view index (i, j, k)."""
    if not v.is3d:
        return np.array([float(index[0]), float(index[1]), 0.0])
    point = reference.TransformContinuousIndexToPhysicalPoint([float(c) for c in index])
    return np.array(v.itk.TransformPhysicalPointToContinuousIndex(point))


def box_in_view(bbox, reference: sitk.Image, v: View) -> tuple[np.ndarray, np.ndarray]:
    """A baseline-grid box (lo inclusive, hi exclusive) as (lo, hi) view index (i, j, k), hi exclusive."""
    lo, hi = np.array(bbox[0], float), np.array(bbox[1], float) - 1
    if not v.is3d:
        return np.append(lo[:2], 0), np.append(hi[:2], 0) + 1
    corners = [to_view_index([hi[d] if (bits >> d) & 1 else lo[d] for d in range(3)], reference, v)
               for bits in range(8)]
    c = np.rint(np.array(corners))
    return c.min(axis=0), c.max(axis=0) + 1


def stored_slice(v: View, plane: str, k: int, reference: sitk.Image) -> int:
    """The baseline file's own slice number of the view's slice `k` in `plane` (what a viewer of the file shows)."""
    idx = [0.0, 0.0, 0.0]
    idx[_SLICE_AXIS[plane]] = float(k)
    point = v.itk.TransformContinuousIndexToPhysicalPoint(idx)
    stored = reference.TransformPhysicalPointToContinuousIndex(point)
    d = np.abs(np.array(reference.GetDirection()).reshape(3, 3))
    axis = int(np.argmax(d[2 - ("axial", "coronal", "sagittal").index(plane)]))  # stored axis along the normal
    return int(round(stored[axis]))


def _crop(shape_kji: tuple[int, ...], centre: np.ndarray, half_mm: float, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Index ranges (i, j, k) of a field of view of +-half_mm around centre, clipped to the image."""
    lo, hi = [], []
    for axis in range(3):
        n = shape_kji[2 - axis]
        half = int(math.ceil(half_mm / spacing[axis])) if n > 1 else 0
        a = int(max(0, round(centre[axis]) - half))
        b = int(min(n, round(centre[axis]) + half + 1))
        lo.append(a)
        hi.append(max(b, a + 1))
    return np.array(lo), np.array(hi)


def _cut(vol: np.ndarray, plane: str, index: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Plane at index, cropped to the (i, j, k) box lo..hi, in display orientation."""
    sl = _plane(vol, plane, index)
    ca, ra = _plane_axes(plane)
    if plane == "axial":
        rows = slice(lo[ra], hi[ra])
    else:  # rows are flipped (superior at the top)
        n = sl.shape[0]
        rows = slice(n - hi[ra], n - lo[ra])
    return sl[rows, lo[ca]:hi[ca]]


def _to_screen(plane: str, point: np.ndarray, lo: np.ndarray, hi: np.ndarray, nk: int) -> tuple[float, float]:
    """A view index (i, j, k) as (x, y) in the cropped plane's pixel coordinates."""
    ca, ra = _plane_axes(plane)
    x = point[ca] - lo[ca]
    y = point[ra] - lo[ra] if plane == "axial" else (nk - 1 - point[ra]) - (nk - hi[ra])
    return float(x), float(y)


# --------------------------------------------------------------------------- drawing helpers


def _orientation_marks(ax, plane: str) -> None:
    from matplotlib import patheffects

    top, bottom, left, right = _ORIENT_LABELS[plane]
    style = dict(color="yellow", fontsize=8, fontweight="bold", transform=ax.transAxes, ha="center", va="center",
                 path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])
    for x, y, text in ((0.5, 0.96, top), (0.5, 0.04, bottom), (0.03, 0.5, left), (0.97, 0.5, right)):
        ax.text(x, y, text, **style)


def _number(ax, x: float, y: float, n: int, colour: str = FINDING, size: int = 11):
    from matplotlib import patheffects

    return ax.text(x, y, str(n), color=colour, fontsize=size, fontweight="bold", ha="left", va="bottom",
                   path_effects=[patheffects.withStroke(linewidth=2.5, foreground="black")], zorder=6)


def _fill(mask: np.ndarray, colour: str, alpha: float) -> np.ndarray:
    import matplotlib as mpl

    rgba = np.zeros(mask.shape + (4,), np.float32)
    rgba[mask] = (*mpl.colors.to_rgb(colour), alpha)
    return rgba


def _solid(mask: np.ndarray) -> np.ndarray:
    """`mask` without parts thinner than 3 pixels (the body's rim, where two masks differ by a voxel)."""
    from scipy import ndimage

    return ndimage.binary_opening(mask, np.ones((3, 3), bool)) if mask.any() else mask


def _hatch(mask: np.ndarray) -> np.ndarray:
    """Diagonal white stripes over `mask`: tissue only one visit imaged."""
    rows, cols = np.indices(mask.shape)
    stripes = ((rows + cols) // 2) % 3 == 0
    rgba = np.zeros(mask.shape + (4,), np.float32)
    rgba[mask & stripes] = (1.0, 1.0, 1.0, 0.55)
    rgba[mask & ~stripes] = (0.25, 0.35, 0.6, 0.25)
    return rgba


def _score_cmap():
    """Inferno without its black end: an overlay colour must never read as "dark tissue"."""
    import matplotlib as mpl

    return mpl.colors.ListedColormap(mpl.colormaps["inferno"](np.linspace(0.3, 1.0, 256)), name="inferno_overlay")


def _score_mappable(d: Display):
    import matplotlib as mpl

    return mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(*d.score_range), cmap=_score_cmap())


def _score_rgba(score: np.ndarray, compared: np.ndarray, d: Display) -> np.ndarray:
    """Score colours whose opacity ramps up to the threshold: sub-threshold noise stays faint, flagged change solid."""
    lo, hi = d.score_range
    rgba = _score_cmap()(np.clip((score - lo) / (hi - lo), 0, 1))
    ramp = np.clip((score - lo) / max(d.threshold - lo, 1e-6), 0, 1)
    rgba[..., 3] = np.where(np.isfinite(score) & compared, 0.85 * ramp**2, 0)
    return rgba


def _diff_rgb(base: np.ndarray, follow: np.ndarray, compared: np.ndarray, body: np.ndarray, limit: float) -> np.ndarray:
    """Follow-up minus baseline in red (brighter) / blue (darker) where compared; neutral grey elsewhere."""
    import matplotlib as mpl

    rgb = mpl.colormaps["RdBu_r"](np.clip((follow - base) / (2 * limit) + 0.5, 0, 1))[..., :3]
    rgb[~compared & body] = NOT_COMPARED
    rgb[~body] = AIR
    return rgb


def _gray_rgb(arr: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    g = np.clip((arr - window[0]) / (window[1] - window[0]), 0, 1)
    return np.repeat(g[..., None], 3, axis=-1)


def _legend_handles(with_context: bool, with_not_compared: bool):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=(1.0, 0.83, 0.0, 0.35), edgecolor=FINDING, linewidth=1.5,
                     label="finding (changed tissue), numbered as in the table")]
    if with_context:
        handles.append(Line2D([], [], color=CONTEXT, linestyle="--", linewidth=1.2,
                              label="region below the threshold (not a finding)"))
    if with_not_compared:
        handles.append(Patch(facecolor=(0.25, 0.35, 0.6, 0.4), edgecolor="white", hatch="///",
                             label="imaged at one visit only: not compared"))
    return handles


# --------------------------------------------------------------------------- overview


def _overview_slices(d: Display, regions: list[ScoredRegion], wanted_n: int) -> list[int]:
    """Axial slices (view k): through each finding first, then through the highest-scoring other regions (up
    to half the panels), then spread over the body; superior first."""
    v = d.base
    nk = v.array.shape[0]
    if not v.is3d:
        return [0]
    area = d.body.reshape(nk, -1).sum(axis=1)
    ks = np.where(area >= 0.3 * area.max())[0]  # slices with a fair share of the body, not its tips
    k0, k1 = (int(ks.min()), int(ks.max())) if ks.size else (0, nk - 1)
    gap = max(1, (k1 - k0) // (2 * wanted_n))  # slices other than the findings' stay apart
    wanted: list[int] = []
    for r in ordered_regions(regions):
        if len(wanted) >= (wanted_n if r.flagged else max(wanted_n // 2, sum(x.flagged for x in regions))):
            break
        k = int(np.clip(round(to_view_index(centre_index(r), d.reference, v)[2]), 0, nk - 1))
        if k not in wanted and (r.flagged or all(abs(k - w) > gap for w in wanted)):
            wanted.append(k)
    for k in np.linspace(k0, k1, wanted_n + 2)[1:-1].round().astype(int):
        if len(wanted) >= wanted_n:
            break
        if all(abs(int(k) - w) > gap for w in wanted):
            wanted.append(int(k))
    return sorted(wanted, reverse=True)


def overview_figure(d: Display, regions: list[ScoredRegion], settings: ReportSettings) -> str:
    """Axial slices (the picture itself in 2D) with every finding filled, outlined and numbered, regions below
    the threshold as dashed boxes, and the tissue only one visit imaged hatched."""
    from matplotlib.patches import Circle, Rectangle

    v = d.base
    findings = [r for r in regions if r.flagged]
    context = [r for r in regions if not r.flagged]
    slices = _overview_slices(d, regions, settings.overview_slices)
    ncols = min(3, len(slices))
    nrows = int(math.ceil(len(slices) / ncols))
    panel = 4.4 if v.is3d else 7.0
    height = panel * nrows + 1.1
    fig = new_figure(figsize=(panel * ncols, height))
    grid = fig.add_gridspec(nrows, ncols, left=0.01, right=0.99, top=1 - 0.35 / height, bottom=1.0 / height,
                            wspace=0.03, hspace=0.14)
    aspect = _aspect("axial", v.spacing)
    full_lo, full_hi = np.zeros(3, int), np.array(v.array.shape[::-1][:3])
    boxes = [(r, *box_in_view(r.bbox, d.reference, v)) for r in context]
    not_compared_shown = False
    for n in range(nrows * ncols):
        ax = fig.add_subplot(grid[n // ncols, n % ncols])
        ax.set_axis_off()
        if n >= len(slices):
            continue
        k = slices[n]
        if d.base_rgb is not None:
            ax.imshow(_plane(d.base_rgb, "axial", k), aspect=aspect, interpolation="nearest")
        else:
            ax.imshow(_plane(v.array, "axial", k), cmap="gray", vmin=d.window[0], vmax=d.window[1], aspect=aspect,
                      interpolation="nearest")
        outside = _solid(_plane(d.body & ~d.compared, "axial", k))
        if outside.any():
            ax.imshow(_hatch(outside), aspect=aspect, interpolation="nearest")
            not_compared_shown = True
        labels = _plane(d.findings, "axial", k)
        on_slice = []
        if labels.any():
            ax.imshow(_fill(labels > 0, FINDING, 0.35), aspect=aspect, interpolation="nearest")
            ax.contour(labels > 0, levels=[0.5], colors=[FINDING], linewidths=1.2)
        for r, lo, hi in boxes:
            if lo[2] <= k < hi[2]:
                ax.add_patch(Rectangle((lo[0] - 0.5, lo[1] - 0.5), hi[0] - lo[0], hi[1] - lo[1], fill=False,
                                       edgecolor=CONTEXT, linewidth=0.9, linestyle="--"))
        if labels.any():
            ring = 6.0 * max(labels.shape) / 100  # a ring around each finding: small ones stay easy to find
            for number in np.unique(labels[labels > 0]):
                rows, cols = np.nonzero(labels == number)
                cy, cx = rows.mean(), cols.mean()
                radius = max(ring, 0.5 * max(np.ptp(rows), np.ptp(cols)) + 3)
                ax.add_patch(Circle((cx, cy), radius, fill=False, edgecolor=FINDING, linewidth=1.4))
                _number(ax, cx + 0.75 * radius, cy - 0.75 * radius, int(number), size=14)
                on_slice.append(int(number))
        title = "" if not v.is3d else f"axial slice {stored_slice(v, 'axial', k, d.reference)}"
        if v.is3d:
            z = v.itk.TransformIndexToPhysicalPoint((0, 0, int(k)))[2]
            title += f" ({'S' if z >= 0 else 'I'} {abs(z):.0f} mm)"
            _orientation_marks(ax, "axial")
        if on_slice:
            title += ("; " if title else "") + "finding" + ("s " if len(on_slice) > 1 else " ") + ", ".join(
                map(str, sorted(on_slice)))
        ax.set_title(title, fontsize=10 if v.is3d else 12)
        ax.set_xlim(full_lo[0] - 0.5, full_hi[0] - 0.5)
        ax.set_ylim(full_hi[1] - 0.5, full_lo[1] - 0.5)
    fig.legend(handles=_legend_handles(bool(context), not_compared_shown), loc="lower center", ncol=3, fontsize=9,
               frameon=False, bbox_to_anchor=(0.5, 0.1 / height))
    return figure_data_uri(fig, settings.dpi)


# --------------------------------------------------------------------------- one figure per finding


class FindingFigures:
    """One figure (planes x 4 panels, colour bars, legend) reused for every finding: only image data, outlines
    and titles change between findings, which renders several times faster than building a figure each time."""

    COLUMNS = ("Baseline", "Follow-up (registered)", "Difference (follow-up − baseline)", "Change score over baseline")

    def __init__(self, d: Display, settings: ReportSettings):
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        self.d, self.settings = d, settings
        v = d.base
        self.planes = PLANES_3D if v.is3d else ("axial",)
        n = len(self.planes)
        height = 3.0 * n + 1.7 if v.is3d else 5.0
        self.height = height
        self.fig = fig = new_figure(figsize=(12.0, height))
        grid = fig.add_gridspec(n, 4, left=0.035, right=0.995, top=1 - 0.62 / height, bottom=1.15 / height,
                                wspace=0.03, hspace=0.14)
        blank = np.zeros((2, 2, 3), np.float32)
        self.axes, self.images, self.overlays, self.marks, self.plane_titles = [], [], [], [], []
        self.transient: list = []  # contours and numbers of the finding drawn last
        for row, plane in enumerate(self.planes):
            aspect = _aspect(plane, v.spacing)
            row_axes, row_images = [], []
            for col in range(4):
                ax = fig.add_subplot(grid[row, col])
                ax.set_axis_off()
                row_images.append(ax.imshow(blank, aspect=aspect, interpolation="nearest"))
                if col == 3:
                    self.overlays.append(ax.imshow(np.zeros((2, 2, 4)), aspect=aspect, interpolation="nearest"))
                if col in (0, 1):  # four ticks around the finding's centre, leaving the tissue itself visible
                    self.marks.append([ax.plot([], [], color=FINDING, linewidth=1.6)[0] for _ in range(4)])
                if v.is3d and col == 0:
                    _orientation_marks(ax, plane)
                if row == 0:
                    ax.set_title(self.COLUMNS[col], fontsize=10)
                if col == 0 and v.is3d:
                    self.plane_titles.append(ax.text(-0.03, 0.5, plane, transform=ax.transAxes, rotation=90,
                                                     ha="right", va="center", fontsize=10))
                row_axes.append(ax)
            self.axes.append(row_axes)
            self.images.append(row_images)
        import matplotlib as mpl

        for col, label, mappable in (
                (2, "difference (harmonised units)",
                 mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(-d.diff_limit, d.diff_limit), cmap="RdBu_r")),
                (3, "change score (cyan: threshold)", _score_mappable(d))):
            box = grid[n - 1, col].get_position(fig)
            cax = fig.add_axes((box.x0 + 0.08 * box.width, 0.62 / height, 0.84 * box.width, 0.13 / height))
            cb = fig.colorbar(mappable, cax=cax, orientation="horizontal")
            cb.set_label(label, fontsize=7.5)
            cb.ax.tick_params(labelsize=7)
            if col == 3:
                cb.ax.axvline(d.threshold, color=CONTEXT, linewidth=2)
        handles = [Line2D([], [], color=FINDING, linewidth=1.6, label="the finding: outline, number; ticks mark its centre"),
                   Patch(facecolor=NOT_COMPARED, label="grey: not compared (one visit only)"),
                   Patch(facecolor=AIR, label="dark grey: outside the body")]
        fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.03, 0.05 / height), ncol=1, fontsize=8,
                   frameon=False)
        self.title = fig.suptitle("", fontsize=11, y=1 - 0.12 / height)

    def _window(self, centre: np.ndarray, extent_mm: float) -> tuple[float, float]:
        """A grey window fitted to the tissue around the finding (both visits), so a change of a few per cent
        in white matter stays visible instead of washing out in a window made for the whole head."""
        d, v = self.d, self.d.base
        lo, hi = _crop(v.array.shape, centre, max(2.0 * extent_mm, 10.0), v.spacing)
        box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        body = d.body[box]
        if body.sum() < 16:
            return d.window
        near = np.concatenate([v.array[box][body], d.follow[box][body]])
        a, b = percentile_window(near, (1.0, 99.5))
        pad = 0.1 * (b - a)
        return a - pad, b + pad

    def render(self, region: ScoredRegion, title: str) -> str:
        d, v, settings = self.d, self.d.base, self.settings
        for artist in self.transient:
            artist.remove()
        self.transient = []
        centre = to_view_index(centre_index(region), d.reference, v)
        box_lo, box_hi = box_in_view(region.bbox, d.reference, v)
        extent_mm = max((box_hi[a] - box_lo[a]) * v.spacing[a] for a in range(3 if v.is3d else 2))
        image_mm = min(n * sp for n, sp in zip(v.array.shape[::-1], v.spacing) if n > 1)
        half = max(min(settings.context_mm, image_mm / 4), 1.5 * extent_mm)
        lo, hi = _crop(v.array.shape, centre, half, v.spacing)
        window = self._window(centre, extent_mm)
        nk = v.array.shape[0]
        slices = {}
        for row, plane in enumerate(self.planes):
            k = int(np.clip(round(centre[_SLICE_AXIS[plane]]), 0, v.array.shape[2 - _SLICE_AXIS[plane]] - 1))
            k = k if v.is3d else 0
            if v.is3d:
                slices[plane] = stored_slice(v, plane, k, d.reference)
                self.plane_titles[row].set_text(f"{plane} {slices[plane]}")
            cut = {name: _cut(arr, plane, k, lo, hi) for name, arr in (
                ("base", v.array), ("follow", d.follow), ("compared", d.compared), ("body", d.body),
                ("score", d.score), ("findings", d.findings))}
            mine = cut["findings"] == region.id
            panels = [
                _cut(d.base_rgb, plane, k, lo, hi) if d.base_rgb is not None else _gray_rgb(cut["base"], window),
                _cut(d.follow_rgb, plane, k, lo, hi) if d.follow_rgb is not None else _gray_rgb(cut["follow"], window),
                _diff_rgb(cut["base"], cut["follow"], cut["compared"], cut["body"], d.diff_limit),
                _gray_rgb(cut["base"], window),
            ]
            rows, cols = panels[0].shape[:2]
            x, y = _to_screen(plane, centre, lo, hi, nk)
            gap, arm = max(2.0, 0.06 * max(rows, cols)), max(3.0, 0.09 * max(rows, cols))
            for col in range(4):
                ax = self.axes[row][col]
                self.images[row][col].set_data(panels[col])
                self.images[row][col].set_extent((-0.5, cols - 0.5, rows - 0.5, -0.5))
                if col == 3:
                    self.overlays[row].set_data(_score_rgba(cut["score"], cut["compared"], d))
                    self.overlays[row].set_extent((-0.5, cols - 0.5, rows - 0.5, -0.5))
                if col in (0, 1):
                    ticks = (([x - gap - arm, x - gap], [y, y]), ([x + gap, x + gap + arm], [y, y]),
                             ([x, x], [y - gap - arm, y - gap]), ([x, x], [y + gap, y + gap + arm]))
                    for line, (xs, ys) in zip(self.marks[row * 2 + col], ticks):
                        line.set_data(xs, ys)
                if col in (2, 3) and mine.any():
                    self.transient.append(ax.contour(mine, levels=[0.5], colors=[FINDING], linewidths=1.4))
                    r_, c_ = np.nonzero(mine)
                    self.transient.append(_number(ax, c_.max() + 1.5, r_.min() - 1, region.id))
                ax.set_xlim(-0.5, cols - 0.5)
                ax.set_ylim(rows - 0.5, -0.5)
        self.title.set_text(title)
        return figure_data_uri(self.fig, settings.dpi)


# --------------------------------------------------------------------------- not comparable


def alignment_figure(d: Display, settings: ReportSettings, n_slices: int = 3) -> str:
    """Baseline and registered follow-up side by side, each in its own window, with the compared region
    outlined: what the reader needs to see why a pair could not be compared."""
    v = d.base
    ks = _overview_slices(d, [], n_slices) if v.is3d else [0]
    height = 3.4 * len(ks) + 0.8 if v.is3d else 6.0
    fig = new_figure(figsize=(7.4, height))
    grid = fig.add_gridspec(len(ks), 2, left=0.02, right=0.98, top=1 - 0.45 / height, bottom=0.45 / height,
                            wspace=0.04, hspace=0.12)
    aspect = _aspect("axial", v.spacing)
    windows = (percentile_window(v.array[d.body], d.percentiles),
               percentile_window(d.follow[d.follow > d.follow.min()], d.percentiles))
    for row, k in enumerate(ks):
        for col, (arr, rgb, name) in enumerate(((v.array, d.base_rgb, "Baseline"),
                                                (d.follow, d.follow_rgb, "Follow-up after registration"))):
            ax = fig.add_subplot(grid[row, col])
            ax.set_axis_off()
            if rgb is not None:
                ax.imshow(_plane(rgb, "axial", k), aspect=aspect, interpolation="nearest")
            else:
                ax.imshow(_plane(arr, "axial", k), cmap="gray", vmin=windows[col][0], vmax=windows[col][1],
                          aspect=aspect, interpolation="nearest")
            compared = _plane(d.compared, "axial", k)
            if compared.any() and not compared.all():
                ax.contour(compared, levels=[0.5], colors=[CONTEXT], linewidths=1.0, linestyles="--")
            title = name if row == 0 else ""
            if v.is3d:
                title += ("\n" if title else "") + f"axial slice {stored_slice(v, 'axial', k, d.reference)}"
                _orientation_marks(ax, "axial")
            ax.set_title(title, fontsize=10)
    fig.text(0.5, 0.15 / height, "cyan dashes: the part both visits imaged", ha="center", fontsize=9, color="#333")
    return figure_data_uri(fig, settings.dpi)
