"""Seeded benchmark cohorts (dev / validation splits) of longitudinal studies with known ground truth.

The detector's settings were chosen on ``sample_studies/`` (skull-stripped MNI brains) and failed on held-out
studies and on real whole-head scans. This generator makes the studies settings are tuned on (``dev``) and the
ones results are reported on (``validation``, never used to choose anything), closer to what scanners deliver:
whole heads (``head.py``) in most pairs, thick slices along any axis, oblique grids, fields of view that end in
the neck or above the chin and are cut at one end, pose up to 10 degrees / 15 mm, intensity curves that treat fat
differently from brain, distortion, bias, gain and Rician noise. Changes: irregular new lesions (deep,
juxtacortical, periventricular white matter), growing lesions, local atrophy; 2D fundus micro-lesions.

    python benchmarks/cohort.py --split dev -o /work/cohorts/dev --jobs 2

The physics of a visit and the truth (changed voxels vs the first visit, on each visit's own grid) follow
``sample_studies/build.py``, whose helpers are imported, not copied. Output is deterministic per split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import head as hd  # noqa: E402
from head import ss  # noqa: E402  (sample_studies/build.py)

LOG = logging.getLogger("cohort")

SPLIT_SEEDS = {"dev": 61_20_0417, "validation": 83_57_1129}  # never sample_studies' SEED; fixed on purpose
assert ss.SEED not in SPLIT_SEEDS.values()
SETS = ("visible", "subtle", "fundus", "realhead")
DEFAULT_SETS = ("visible", "subtle", "fundus")
DEFAULT_PATIENTS = {"visible": 17, "subtle": 17, "fundus": 26, "realhead": 8}
ORIENTATIONS = {  # grid direction cosines (LPS columns: row, column, slice normal), as DICOM scanners write them
    "axial": np.eye(3),
    "coronal": np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]),  # columns (1,0,0), (0,0,-1), (0,1,0)
    "sagittal": np.array([[0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]]),  # columns (0,1,0), (0,0,-1), (-1,0,0)
}
CUT_ENDS = {"superior": (0.0, 0.0, 1.0), "inferior": (0.0, 0.0, -1.0), "anterior": (0.0, -1.0, 0.0),
            "posterior": (0.0, 1.0, 0.0)}  # LPS directions


# --------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Protocol3D:
    """Ranges of one 3D set: changes and scanner drift (the acquisition geometry is drawn the same for both)."""

    lesion_diam_mm: tuple[float, float]
    contrast: tuple[float, float]
    growth_mm: tuple[float, float]
    atrophy_mm: tuple[float, float]
    atrophy_radius_mm: tuple[float, float]
    gamma: tuple[float, float]
    fat_gamma_rel: tuple[float, float]  # fat's exponent / the brain's: protocol drift changes fat differently
    fat_gain_rel: tuple[float, float]
    fat_bias_power: tuple[float, float]  # fat sits under the coil: bias ** power
    gain: tuple[float, float]
    bias_amp: float
    noise_rel: tuple[float, float]
    distortion_mm: tuple[float, float]
    rot_deg: float = 10.0
    shift_mm: float = 15.0
    psf_sigma_mm: float = 0.6


VISIBLE = Protocol3D(lesion_diam_mm=(5.0, 12.0), contrast=(0.20, 0.40), growth_mm=(1.5, 3.0),
                     atrophy_mm=(2.0, 3.0), atrophy_radius_mm=(9.0, 12.0), gamma=(0.85, 1.18),
                     fat_gamma_rel=(0.92, 1.08), fat_gain_rel=(0.9, 1.1), fat_bias_power=(1.1, 1.5),
                     gain=(0.85, 1.15), bias_amp=0.12, noise_rel=(0.015, 0.035), distortion_mm=(0.5, 1.0))
SUBTLE = Protocol3D(lesion_diam_mm=(3.0, 6.0), contrast=(0.08, 0.15), growth_mm=(0.5, 1.5),
                    atrophy_mm=(1.0, 1.5), atrophy_radius_mm=(7.0, 9.0), gamma=(0.75, 1.3),
                    fat_gamma_rel=(0.85, 1.15), fat_gain_rel=(0.8, 1.2), fat_bias_power=(1.2, 1.8),
                    gain=(0.8, 1.25), bias_amp=0.18, noise_rel=(0.02, 0.05), distortion_mm=(0.8, 1.5))
PROTOCOLS = {"visible": VISIBLE, "subtle": SUBTLE, "realhead": VISIBLE}


@dataclass(frozen=True)
class Options:
    """Size knobs. The defaults make the benchmark; the tests shrink everything to run in seconds."""

    anatomy_mm: float = 1.0  # spacing of the patients' true anatomy
    voxel_scale: float = 1.0  # multiplies every drawn voxel size and slice thickness
    change_scale: float = 1.0  # multiplies lesion sizes, growth, atrophy (tests: visible on coarse grids)
    fundus_px: int = 512  # output size of fundus photographs


@dataclass(frozen=True)
class Event:
    kind: str  # new_lesion | growing_lesion | atrophy | static_lesion (3D); haemorrhage | exudate (fundus)
    start: int  # first visit that differs from the baseline (static lesions: 0)
    location: str = ""  # deep_wm | juxtacortical | periventricular (lesions)


@dataclass(frozen=True)
class PatientPlan:
    name: str
    dates: tuple[str, ...]
    events: tuple[Event, ...]
    whole_head: bool

    def stable(self, v: int) -> bool:
        """No change of any kind between the baseline and visit v."""
        return not any(e.kind != "static_lesion" and e.start <= v for e in self.events)


def rng_for(split: str, *parts: str) -> np.random.Generator:
    key = int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:8], "little")
    return np.random.default_rng([SPLIT_SEEDS[split], key])


def _dates(rng: np.random.Generator, n: int) -> tuple[str, ...]:
    import datetime as dt

    d = dt.date(2018, 1, 1) + dt.timedelta(days=int(rng.integers(0, 5 * 365)))
    out = [d]
    for _ in range(n - 1):
        out.append(out[-1] + dt.timedelta(days=int(rng.integers(120, 400))))
    return tuple(x.isoformat() for x in out)


def plan_set(split: str, set_name: str, n: int) -> list[PatientPlan]:
    """Who has 3 visits, who is stable, what changes where: a quarter with 3 visits, ~40 % stable patients."""
    rng = rng_for(split, set_name, "plan")
    prefix = {"visible": "V", "subtle": "S", "fundus": "F", "realhead": "R"}[set_name]
    three = set(rng.permutation(n)[: max(1, math.ceil(n / 4))].tolist())
    stable = set(rng.permutation(n)[: max(1, round(0.4 * n))].tolist()) if n > 1 else set()
    late_done = False
    plans = []
    for i in range(n):
        nv = 3 if i in three else 2
        events: list[Event] = []
        if set_name == "fundus":
            if i not in stable:
                start = 2 if nv == 3 and rng.uniform() < 0.4 else 1
                for _ in range(int(rng.integers(1, 5))):
                    events.append(Event(str(rng.choice(["haemorrhage", "exudate"])), int(rng.integers(start, nv))))
        else:
            for _ in range(int(rng.integers(0, 3)) if i in stable else int(rng.integers(0, 2))):
                events.append(Event("static_lesion", 0, str(rng.choice(["deep_wm", "juxtacortical",
                                                                          "periventricular"]))))
            if i not in stable:
                # a 3-visit patient whose changes start at the second follow-up gives one more stable pair
                start = 2 if nv == 3 and (not late_done or rng.uniform() < 0.3) else 1
                late_done |= start == 2
                for _ in range(int(rng.integers(1, 4))):
                    kind = str(rng.choice(["new_lesion", "new_lesion", "growing_lesion", "atrophy"],
                                          p=[0.35, 0.25, 0.25, 0.15]))
                    loc = "" if kind == "atrophy" else str(rng.choice(["deep_wm", "juxtacortical",
                                                                        "periventricular"]))
                    events.append(Event(kind, int(rng.integers(start, nv)) if kind != "growing_lesion" else start,
                                        loc))
        whole = set_name == "realhead" or (set_name != "fundus" and bool(rng.uniform() < 0.75))
        plans.append(PatientPlan(f"{prefix}{i + 1:03d}", _dates(rng, nv), tuple(events), whole))
    return plans


# --------------------------------------------------------------------------------------------------- lesions


@dataclass
class Shape:
    """An irregular lesion: a union of overlapping ellipsoids whose boundary is perturbed by smooth waves.

    ``level(p)`` is 1 on the boundary for unit scale; the lesion at scale R occupies level(p / R) <= 1.
    """

    offsets: np.ndarray  # (n, 3) lobe centres, units of R
    axes: np.ndarray  # (n, 3)
    rots: np.ndarray  # (n, 3, 3)
    waves: np.ndarray  # (m, 3) wave vectors, 1/units of R
    phases: np.ndarray  # (m,)
    bump: float  # relative amplitude of the boundary perturbation
    unit_volume: float = 0.0  # volume of level <= 1 at R = 1

    def level(self, u: np.ndarray) -> np.ndarray:
        rho = np.full(u.shape[:-1], np.inf, np.float32)
        for off, ax, rot in zip(self.offsets, self.axes, self.rots):
            rho = np.minimum(rho, np.linalg.norm((u - off) @ rot / ax, axis=-1))
        wave = np.mean(np.sin(u @ self.waves.T + self.phases), axis=-1)
        return (rho * (1.0 + self.bump * wave)).astype(np.float32)

    @property
    def extent(self) -> float:
        return float(np.max(np.linalg.norm(self.offsets, axis=1) + self.axes.max(1)) * (1 + self.bump))


def random_shape(rng: np.random.Generator) -> Shape:
    n = int(rng.integers(1, 4))
    offsets = np.zeros((n, 3))
    for i in range(1, n):
        d = rng.normal(size=3)
        offsets[i] = d / np.linalg.norm(d) * rng.uniform(0.4, 0.8)
    axes = np.exp(rng.uniform(-0.3, 0.3, (n, 3)))
    axes /= np.prod(axes, axis=1, keepdims=True) ** (1 / 3)
    axes *= rng.uniform(0.6, 1.0, (n, 1))
    rots = np.stack([ss.random_rotation(rng, 3) for _ in range(n)])
    m = 6
    waves = rng.normal(size=(m, 3))
    waves = waves / np.linalg.norm(waves, axis=1, keepdims=True) * rng.uniform(2.0, 5.0, (m, 1))
    sh = Shape(offsets, axes, rots, waves, rng.uniform(0, 2 * np.pi, m), float(rng.uniform(0.12, 0.25)))
    g = np.linspace(-2.5, 2.5, 61)
    u = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1)
    sh.unit_volume = float((sh.level(u) <= 1).sum() * (g[1] - g[0]) ** 3)
    return sh


@dataclass
class Change:
    """A 3D change of one patient; its size per visit follows from its kind (like build.Change3D)."""

    cid: str
    kind: str
    start: int
    location: str
    centre: np.ndarray  # anatomy LPS mm
    radius0: float  # equivalent-sphere radius at first appearance; atrophy: region radius
    shape: Shape | None = None
    contrast: float = 0.0
    growth: float = 0.0
    thinning: float = 0.0
    measured_contrast: float = 0.0

    def present(self, v: int) -> bool:
        return self.kind in ("static_lesion", "growing_lesion") or v >= self.start

    def radius(self, v: int) -> float:
        if self.kind == "growing_lesion":
            return self.radius0 + self.growth * max(0, v - self.start + 1)
        return self.radius0

    def amount(self, v: int) -> float:
        return self.thinning * max(0, v - self.start + 1)

    def scale(self, v: int) -> float:
        """R of the shape whose equivalent-sphere radius is radius(v)."""
        return (4 / 3 * np.pi * self.radius(v) ** 3 / self.shape.unit_volume) ** (1 / 3)

    def reach(self, v: int) -> float:
        return self.scale(v) * self.shape.extent if self.shape else self.radius0


def lesion_profile(ref: sitk.Image, shape_zyx: Sequence[int], ch: Change, v: int, edge_mm: float
                   ) -> tuple[tuple[slice, ...], np.ndarray]:
    """Partial-volume profile in [0, 1] of the lesion at visit v (0.5 on its boundary), in its bounding box."""
    R = ch.scale(v)
    sp = min(ref.GetSpacing())
    half = (R * ch.shape.extent + 3 * edge_mm + 2) / sp
    sl = ss.box(shape_zyx, ss.to_numpy_index(ref, ch.centre), [half] * 3)
    u = (ss.physical_points(ref, sl) - ch.centre) / R
    lev = ch.shape.level(u)
    return sl, (0.5 * (1.0 - np.tanh((lev - 1.0) * R / edge_mm))).astype(np.float32)


def place_changes(anat: hd.Head, plan: PatientPlan, proto: Protocol3D, rng: np.random.Generator,
                  opts: Options) -> list[Change]:
    """Lesions in deep, juxtacortical (touching cortex) or periventricular (touching ventricles) white matter;
    atrophy beside CSF. Distances are computed once on the brain's bounding box."""
    nz = np.argwhere(anat.brain > 0)
    lo, hi = np.maximum(nz.min(0) - 3, 0), nz.max(0) + 4
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    sp = anat.ref.GetSpacing()
    wm, gm, brain = anat.wm[crop] > 0.5, anat.gm[crop] > 0.5, anat.brain[crop] > 0
    csf = anat.csf[crop] > 0.5
    edt = lambda m: hd.depth(m, sp[0])  # noqa: E731  (the anatomy is isotropic)
    wm_depth = edt(wm)
    brain_depth = edt(brain)
    csf_dist = edt(~csf)
    gm_dist = edt(~gm)
    deep_csf = csf & (brain_depth > 12)
    lab, n = ndimage.label(deep_csf)
    sizes = ndimage.sum(deep_csf, lab, range(1, n + 1)) * np.prod(sp)
    vent = np.isin(lab, 1 + np.flatnonzero(sizes > 300))
    vent_dist = edt(~vent) if vent.any() else np.full(wm.shape, 99.0)
    n_visits = len(plan.dates)
    out: list[Change] = []
    for i, ev in enumerate(plan.events):
        for _attempt in range(300):
            if ev.kind == "atrophy":
                rad = rng.uniform(*proto.atrophy_radius_mm) * opts.change_scale
                ch = Change(f"A{i + 1}", ev.kind, ev.start, "cortex", np.zeros(3), rad,
                            thinning=rng.uniform(*proto.atrophy_mm) * opts.change_scale / max(1, n_visits - ev.start))
                reach = rad + 3
                cand = gm & (csf_dist > 0) & (csf_dist <= max(2.0, 1.5 * sp[0])) & (brain_depth >= rad + 4)
            else:
                diam = rng.uniform(*proto.lesion_diam_mm) * opts.change_scale
                ch = Change(f"L{i + 1}", ev.kind, ev.start, ev.location, np.zeros(3), diam / 2, random_shape(rng),
                            contrast=float(rng.choice([-1.0, -1.0, 1.0]) * rng.uniform(*proto.contrast)),
                            growth=rng.uniform(*proto.growth_mm) * opts.change_scale
                            if ev.kind == "growing_lesion" else 0.0)
                reach = ch.reach(n_visits - 1)
                r_eq = ch.radius(n_visits - 1)
                tol = max(1.0, sp[0])
                if ev.location == "juxtacortical":
                    cand = wm & (np.abs(gm_dist - r_eq) < tol) & (brain_depth > r_eq + 8) & (vent_dist > reach + 3)
                elif ev.location == "periventricular":
                    cand = wm & (np.abs(vent_dist - r_eq) < tol) & (gm_dist > reach + 2)
                else:
                    cand = (wm_depth >= reach + 2) & (vent_dist > reach + 4) & (gm_dist > reach + 4)
            flat = np.flatnonzero(cand)
            if not len(flat) and ev.kind != "atrophy":  # no room there (coarse test anatomies): any white matter
                ch.location = "white_matter"
                flat = np.flatnonzero(wm & (wm_depth >= wm_depth.max() / 2))
            if not len(flat):
                raise RuntimeError(f"no room for a {ev.kind} ({ev.location}) in {plan.name}")
            pick = np.array(np.unravel_index(flat[rng.integers(len(flat))], cand.shape)) + lo
            ch.centre = np.array(anat.ref.TransformIndexToPhysicalPoint([int(k) for k in pick[::-1]]))
            if all(np.linalg.norm(ch.centre - o.centre) > reach + o.reach(n_visits - 1) + 6 for o in out):
                break
        else:
            raise RuntimeError(f"could not place {ev.kind} for {plan.name}")
        out.append(ch)
    return out


def visit_other(anat: hd.Head, changes: list[Change], v: int, edge_mm: float
                ) -> tuple[np.ndarray, dict[str, tuple[tuple[slice, ...], np.ndarray]]]:
    """Visit v's true ``other`` component, and per change the mask of what differs from baseline (ROI, mask)."""
    other = anat.other.copy()
    shape = other.shape
    diff: dict[str, tuple[tuple[slice, ...], np.ndarray]] = {}
    csf_value = anat.csf_value
    for ch in changes:
        if ch.kind != "atrophy" or not ch.present(v):
            continue
        sl = ss.box(shape, ss.to_numpy_index(anat.ref, ch.centre), [(ch.radius0 + 8) / anat.ref.GetSpacing()[0]] * 3)
        r = np.linalg.norm(ss.physical_points(anat.ref, sl) - ch.centre, axis=-1)
        region = np.clip((ch.radius0 - r) / 2.0 + 0.5, 0, 1)
        csf = anat.csf[sl]
        d = ndimage.distance_transform_edt(csf < 0.5, sampling=anat.ref.GetSpacing())
        w = region * np.clip(ch.amount(v) - d + 0.5, 0, 1) * anat.brain[sl] * (csf < 0.5)
        before = other[sl].copy()
        other[sl] = other[sl] * (1 - w) + csf_value * w
        diff[ch.cid] = (sl, (w >= 0.5).astype(np.float32))
        if (w >= 0.5).any():
            ch.measured_contrast = float(np.mean(other[sl][w >= 0.5] / np.maximum(before[w >= 0.5], 1e-3) - 1))
    for ch in changes:
        if ch.kind == "atrophy" or not ch.present(v):
            continue
        sl, prof = lesion_profile(anat.ref, shape, ch, v, edge_mm)
        tissue = np.clip(anat.gm[sl] + anat.wm[sl], 0, 1)  # lesions are in tissue: CSF stays CSF
        other[sl] *= 1.0 + ch.contrast * prof * tissue
        mask = (prof >= 0.5) & (tissue >= 0.5)
        if ch.kind == "growing_lesion":
            sl0, prof0 = lesion_profile(anat.ref, shape, ch, 0, edge_mm)
            base = np.zeros(shape, bool)
            base[sl0] = prof0 >= 0.5
            mask = mask & ~base[sl]
        if ch.kind != "static_lesion" and mask.any():
            diff[ch.cid] = (sl, mask.astype(np.float32))
    return other, diff


# --------------------------------------------------------------------------------------------------- acquisition


@dataclass
class Acq:
    """A visit's grid (and the finer grid sampled before slab averaging), its transform and its drawn tags."""

    grid: sitk.Image
    fine: sitk.Image
    slab: int
    transform: sitk.Transform  # visit physical point -> anatomy physical point (exact: to_anatomy.tfm)
    dense: sitk.Transform  # the same as a 4 mm displacement field: resampling through it is ~8x faster
    rot: np.ndarray
    tags: dict
    nuisances: dict


def _grid(lo: np.ndarray, hi: np.ndarray, spacing: np.ndarray, direction: np.ndarray) -> sitk.Image:
    size = [max(2, int(np.ceil((h - l) / s)) + 1) for l, h, s in zip(lo, hi, spacing)]
    img = sitk.Image(size, sitk.sitkUInt8)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection(direction.ravel().tolist())
    img.SetOrigin((direction @ lo).tolist())
    return img


def draw_acquisition(anat: hd.Head, head_points: np.ndarray, changes: list[Change], plan: PatientPlan, v: int,
                     proto: Protocol3D, rng: np.random.Generator, opts: Options) -> Acq:
    """Orientation, voxel size, slab, field of view (and its cut), pose, distortion, intensity drift."""
    orient = str(rng.choice(["axial", "sagittal", "coronal"], p=[0.5, 0.25, 0.25]))
    direction = ORIENTATIONS[orient]
    oblique_deg = 0.0
    if rng.uniform() < 0.25:
        oblique_deg = float(rng.uniform(5, 15))
        axis = direction[:, int(rng.integers(0, 2))]  # tilt about an in-plane axis
        direction = _axis_angle(axis, np.radians(oblique_deg * rng.choice([-1, 1]))) @ direction
    thick = v > 0 and rng.uniform() < 0.35
    a = rng.uniform(0.9, 1.5)
    aniso = rng.uniform() < 0.4
    b = float(np.clip(a * rng.uniform(0.8, 1.25), 0.9, 1.5)) if aniso else a
    c = rng.uniform(2.0, 3.0) if thick else (float(rng.uniform(0.9, 1.5)) if aniso else a)
    spacing = np.array([a, b, c]) * opts.voxel_scale
    # pose: a rotation of up to rot_deg about a random axis, a shift of up to shift_mm
    ax = rng.normal(size=3)
    angle = np.radians(rng.uniform(0, proto.rot_deg))
    rot = _axis_angle(ax / np.linalg.norm(ax), angle)
    shift_dir = rng.normal(size=3)
    shift = shift_dir / np.linalg.norm(shift_dir) * rng.uniform(0, proto.shift_mm)
    centre = head_points.mean(0)
    t = centre + shift
    # field of view: the head (down to the neck or to above the chin), plus margins, cut at one end
    bottom = "neck" if rng.uniform() < 0.55 else "above_chin"
    z_bottom = rng.uniform(-165, -140) if bottom == "neck" else rng.uniform(-108, -88)
    pts = head_points[head_points[:, 2] >= z_bottom] if plan.whole_head else head_points
    if not plan.whole_head:
        bottom = "brain"
    u = (pts - t) @ rot @ direction  # grid-axis coordinates of each point: D^T R^T (p - t)
    lo = u.min(0) - rng.uniform(3, 12, 3)
    hi = u.max(0) + rng.uniform(3, 12, 3)
    cut_mm, cut_end = 0.0, ""
    if rng.uniform() < (0.4 if v > 0 else 0.15):
        cut_end = str(rng.choice(list(CUT_ENDS), p=[0.35, 0.3, 0.2, 0.15]))
        g = direction.T @ rot.T @ np.array(CUT_ENDS[cut_end])
        k = int(np.argmax(np.abs(g)))
        want = float(rng.uniform(5, 30))
        # never cut a change away: the truth would silently lose it
        uc = np.array([direction.T @ rot.T @ (c.centre - t) for c in changes]).reshape(-1, 3)
        reach = np.array([c.reach(len(plan.dates) - 1) for c in changes])
        if g[k] > 0:
            limit = (u[:, k].max() - (uc[:, k] + reach + 8).max()) if len(changes) else want
            cut_mm = float(np.clip(min(want, limit), 0, None))
            hi[k] = u[:, k].max() - cut_mm
        else:
            limit = ((uc[:, k] - reach - 8).min() - u[:, k].min()) if len(changes) else want
            cut_mm = float(np.clip(min(want, limit), 0, None))
            lo[k] = u[:, k].min() + cut_mm
    grid = _grid(lo, hi, spacing, direction)
    slab = 1
    fine = grid
    if thick:
        slab = max(3, int(np.ceil(c / 0.8)))
        sub = spacing[2] / slab
        nx, ny, nz = grid.GetSize()
        fine = sitk.Image([nx, ny, nz * slab], sitk.sitkUInt8)
        fine.SetSpacing([float(spacing[0]), float(spacing[1]), float(sub)])
        fine.SetDirection(grid.GetDirection())
        fine.SetOrigin((np.array(grid.GetOrigin()) - direction[:, 2] * sub * (slab - 1) / 2).tolist())
    rigid = sitk.Euler3DTransform()
    rigid.SetMatrix(rot.ravel().tolist())
    rigid.SetTranslation(t.tolist())
    transform: sitk.Transform = rigid
    target = dist_rms = 0.0
    if v > 0:
        # Follow-ups come from other scanners, whose gradient non-linearity differs from the baseline's: a
        # smooth field on the visit's grid. Baselines stay rigid, so follow-up -> baseline truth is
        # baseline.GetInverse() o follow-up, as in sample_studies (check_drift.followup_to_baseline).
        target = float(rng.uniform(*proto.distortion_mm))
        bs = ss.smooth_field(grid, rng, 3)
        probe = _grid(lo, hi, np.full(3, 8.0), direction)
        fld = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
            bs, sitk.sitkVectorFloat64, probe.GetSize(), probe.GetOrigin(), probe.GetSpacing(),
            probe.GetDirection()))
        mag = np.linalg.norm(fld, axis=-1)
        scale = target / mag.max()
        bs.SetParameters((np.array(bs.GetParameters()) * scale).tolist())
        dist_rms = float(np.sqrt(np.mean((mag * scale) ** 2)))
        transform = sitk.CompositeTransform([rigid, bs])
    # Dense copy over the (fine) grid plus a margin: the rigid part is linear, the distortion smooth on a
    # ~80 mm scale, so linear interpolation of a 4 mm field is exact to far below a voxel.
    f_lo, f_hi = lo - 12.0, hi + 12.0
    dgrid = _grid(f_lo, f_hi, np.full(3, 4.0), direction)
    dense = sitk.DisplacementFieldTransform(sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, dgrid.GetSize(), dgrid.GetOrigin(), dgrid.GetSpacing(),
        dgrid.GetDirection()))
    gamma = float(rng.uniform(*proto.gamma))
    gain = float(rng.uniform(*proto.gain))
    noise_rel = float(rng.uniform(*proto.noise_rel))
    fat_gamma = gamma * float(rng.uniform(*proto.fat_gamma_rel))
    fat_gain = float(rng.uniform(*proto.fat_gain_rel))
    fat_bias_power = float(rng.uniform(*proto.fat_bias_power))
    rot_deg = float(np.degrees(angle))
    tags = {"whole_head": plan.whole_head, "orientation": orient, "slice_axis": orient,
            "voxel_size_mm": ss._r(spacing, 3), "anisotropic": bool(aniso or thick),
            "slice_thickness_mm": round(float(spacing[2]), 3), "thick_slices": bool(thick),
            "oblique_deg": round(oblique_deg, 2), "fov_bottom": bottom, "fov_cut_mm": round(cut_mm, 1),
            "fov_cut_end": cut_end or None, "rotation_deg": round(rot_deg, 2),
            "translation_mm": round(float(np.linalg.norm(shift)), 2), "gamma": round(gamma, 3),
            "fat_gamma": round(fat_gamma, 3), "fat_gain_rel": round(fat_gain, 3), "gain": round(gain, 3),
            "bias_amp": proto.bias_amp, "distortion_mm": round(target, 3), "noise_rel_wm": round(noise_rel, 4)}
    nuis = {
        "rotation_deg": round(rot_deg, 2), "rotation_axis": ss._r(ax / np.linalg.norm(ax), 4),
        "translation_mm": ss._r(shift, 2),
        "pose_note": "visit point p maps to anatomy point R p + t; see to_anatomy.tfm",
        "gain": round(gain, 3), "gamma": round(gamma, 3), "fat_gamma": round(fat_gamma, 3),
        "fat_gain_rel": round(fat_gain, 3), "fat_bias_power": round(fat_bias_power, 3),
        "wm_intensity": round(ss.WM_REF * ss.OUT_SCALE * gain, 1),
        "noise_sigma": round(noise_rel * ss.WM_REF * ss.OUT_SCALE * gain, 2), "noise_sigma_rel_wm": round(noise_rel, 4),
        "noise_model": "Rician", "bias_field_max_pct": round(100 * (np.exp(proto.bias_amp) - 1), 1),
        "distortion_max_mm": round(target, 3), "distortion_rms_mm": round(dist_rms, 3),
        "slice_thickness_mm": round(float(spacing[2]), 3), "voxel_size_mm": ss._r(spacing, 3),
        "direction": ss._r(direction.ravel(), 5), "psf_sigma_mm": proto.psf_sigma_mm,
        "skull_stripped": not plan.whole_head, "fov_cut_mm": round(cut_mm, 1), "fov_cut_end": cut_end or None,
    }
    return Acq(grid, fine, slab, transform, dense, rot, tags, nuis)


def _axis_angle(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def sample_many(arrays: list[np.ndarray], anat_ref: sitk.Image, acq: Acq) -> list[np.ndarray]:
    """Resample anatomy arrays onto the visit grid (linear), averaging slabs for thick slices."""
    out = []
    for a in arrays:
        im = sitk.GetImageFromArray(a.astype(np.float32, copy=False))
        im.CopyInformation(anat_ref)
        r = sitk.GetArrayFromImage(sitk.Resample(im, acq.fine, acq.dense, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        if acq.slab > 1:
            z = r.shape[0] // acq.slab
            r = r[: z * acq.slab].reshape(z, acq.slab, *r.shape[1:]).mean(axis=1)
        out.append(r.astype(np.float32))
    return out


def sample_roi(roi: np.ndarray, sl: tuple[slice, ...], anat_ref: sitk.Image, acq: Acq) -> np.ndarray:
    """A small anatomy ROI sampled onto the visit grid; only the visit voxels near the ROI are resampled."""
    out = np.zeros(sitk.GetArrayViewFromImage(acq.grid).shape, np.float32)
    start = [s.start for s in sl]
    im = sitk.GetImageFromArray(roi.astype(np.float32))
    im.SetSpacing(anat_ref.GetSpacing())
    im.SetDirection(anat_ref.GetDirection())
    im.SetOrigin(anat_ref.TransformIndexToPhysicalPoint([int(start[2]), int(start[1]), int(start[0])]))
    corners = []
    for dz in (0, roi.shape[0] - 1):
        for dy in (0, roi.shape[1] - 1):
            for dx in (0, roi.shape[2] - 1):
                p = np.array(im.TransformIndexToPhysicalPoint([dx, dy, dz]))
                q = acq.rot.T @ (p - np.array(acq.transform.TransformPoint([0.0, 0.0, 0.0])))
                corners.append(acq.fine.TransformPhysicalPointToContinuousIndex(q.tolist()))
    c = np.array(corners)
    margin = 3.0 / np.array(acq.fine.GetSpacing()) + 2  # distortion (< 1.5 mm) and rounding
    size = np.array(acq.fine.GetSize())
    lo = np.clip(np.floor(c.min(0) - margin), 0, size).astype(int)
    hi = np.clip(np.ceil(c.max(0) + margin) + 1, 0, size).astype(int)
    lo[2] = (lo[2] // acq.slab) * acq.slab
    hi[2] = min(size[2], int(np.ceil(hi[2] / acq.slab)) * acq.slab)
    if np.any(hi <= lo):
        return out
    sub = sitk.Image([int(v) for v in hi - lo], sitk.sitkFloat32)
    sub.SetSpacing(acq.fine.GetSpacing())
    sub.SetDirection(acq.fine.GetDirection())
    sub.SetOrigin(acq.fine.TransformIndexToPhysicalPoint([int(v) for v in lo]))
    a = sitk.GetArrayFromImage(sitk.Resample(im, sub, acq.dense, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    if acq.slab > 1:
        a = a.reshape(a.shape[0] // acq.slab, acq.slab, *a.shape[1:]).mean(axis=1)
    k0 = lo[2] // acq.slab
    out[k0: k0 + a.shape[0], lo[1]: hi[1], lo[0]: hi[0]] = a
    return out


def bias_field(grid: sitk.Image, amp: float, rng: np.random.Generator) -> np.ndarray:
    """build.bias_field's smooth coil field (6^3 B-spline knots, max |log| = amp), evaluated with cubic
    B-splines on an 8 mm grid and linearly below that: the same smoothness, 10x faster on a whole head."""
    coarse = sitk.GetImageFromArray(rng.normal(size=(6, 6, 6)))
    size = np.array(grid.GetSize())
    sp = np.array(grid.GetSpacing())
    step = (size - 1) * sp / 3
    d = np.array(grid.GetDirection()).reshape(3, 3)
    coarse.SetSpacing(step.tolist())
    coarse.SetOrigin((np.array(grid.GetOrigin()) - d @ step).tolist())
    coarse.SetDirection(grid.GetDirection())
    mid_n = np.ceil((size - 1) * sp / 8.0).astype(int) + 1
    mid = sitk.Image([int(v) for v in mid_n], sitk.sitkFloat64)
    mid.SetSpacing(((size - 1) * sp / np.maximum(mid_n - 1, 1)).tolist())
    mid.SetOrigin(grid.GetOrigin())
    mid.SetDirection(grid.GetDirection())
    mid = sitk.Resample(coarse, mid, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat64)
    logb = sitk.GetArrayFromImage(sitk.Resample(mid, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                sitk.sitkFloat64))
    logb -= logb.mean()
    return np.exp(amp * logb / np.abs(logb).max())


def scanner(other: np.ndarray, fat: np.ndarray, strip: np.ndarray | None, acq: Acq, proto: Protocol3D,
            rng: np.random.Generator) -> np.ndarray:
    """Curves (fat its own), bias (fat more, it lies under the coil), gain, Rician noise; int16."""
    n = acq.nuisances
    ref = ss.WM_REF
    xo = ref * (np.maximum(other, 0.0).astype(np.float64) / ref) ** n["gamma"]
    xf = n["fat_gain_rel"] * ref * (np.maximum(fat, 0.0).astype(np.float64) / ref) ** n["fat_gamma"]
    bias = bias_field(acq.grid, proto.bias_amp, rng)
    x = (xo * bias + xf * bias ** n["fat_bias_power"]) * n["gain"] * ss.OUT_SCALE
    sigma = n["noise_sigma"]
    x = np.sqrt((x + rng.normal(0, sigma, x.shape)) ** 2 + rng.normal(0, sigma, x.shape) ** 2)
    if strip is not None:
        x[strip < 0.5] = 0.0
    return np.clip(np.round(x), 0, 32767).astype(np.int16)


# --------------------------------------------------------------------------------------------------- 3D patients


def head_points(anat: hd.Head, whole_head: bool) -> np.ndarray:
    """Anatomy points (LPS mm, every ~4 mm) of the head, or of the brain for skull-stripped patients."""
    mask = anat.head_mask if whole_head else anat.strip > 0
    step = max(1, int(round(4.0 / anat.ref.GetSpacing()[0])))
    idx = np.argwhere(mask[::step, ::step, ::step]) * step
    d = np.array(anat.ref.GetDirection()).reshape(3, 3)
    return (idx[:, ::-1] * np.array(anat.ref.GetSpacing())) @ d.T + np.array(anat.ref.GetOrigin())


def simulate_patient(split: str, set_name: str, plan: PatientPlan, out: Path, opts: Options) -> dict:
    """Make and write one 3D patient; returns its cohort.json entry."""
    t0 = time.time()
    proto = PROTOCOLS[set_name]
    rng = rng_for(split, set_name, plan.name)
    if set_name == "realhead":
        import realhead

        anat = realhead.real_head(rng, opts.anatomy_mm)
    else:
        anat = hd.make_head(rng, opts.anatomy_mm, plan.whole_head)
    changes = place_changes(anat, plan, proto, rng, opts)
    pts = head_points(anat, plan.whole_head)
    edge = 0.6
    fat_blur = _psf(anat.fat, anat.ref, proto.psf_sigma_mm)
    other_blur = _psf(anat.other, anat.ref, proto.psf_sigma_mm)
    nz = np.argwhere(anat.strip > 0)
    brain_box = tuple(slice(int(a), int(b) + 1) for a, b in zip(nz.min(0), nz.max(0)))
    visits = []
    for v, date in enumerate(plan.dates):
        acq = draw_acquisition(anat, pts, changes, plan, v, proto, rng, opts)
        other, diffs = visit_other(anat, changes, v, edge)
        other = blur_changes(other_blur, anat.other, other, anat.ref, proto.psf_sigma_mm)
        sampled = sample_many([other, fat_blur], anat.ref, acq)
        brain_v = sample_roi(anat.brain[brain_box], brain_box, anat.ref, acq) >= 0.5
        strip_v = None if plan.whole_head else sample_roi(anat.strip[brain_box], brain_box, anat.ref, acq)
        img = scanner(sampled[0], sampled[1], strip_v, acq, proto, rng)
        grid = acq.grid
        union = np.zeros(img.shape, np.uint8)
        records = []
        for ch in changes:
            if ch.kind == "static_lesion" or ch.cid not in diffs:
                continue
            sl, m = diffs[ch.cid]
            frac = sample_roi(m, sl, anat.ref, acq)
            on_visit = frac >= 0.5
            rule = None
            if not on_visit.any() and frac.max() >= 0.2:
                # a small change on thick slices: no voxel is half covered, but the image does change there;
                # the truth keeps its most covered voxel rather than silently dropping it
                on_visit = frac >= frac.max() * 0.999
                rule = f"most covered voxel (partial volume {frac.max():.2f} < 0.5)"
            union |= on_visit.astype(np.uint8)
            records.append(change_record(ch, v, m, on_visit, grid, acq, anat))
            if rule:
                records[-1]["mask_rule"] = rule
        unchanged = [change_record(ch, v, None, None, grid, acq, anat) for ch in changes
                     if ch.kind == "static_lesion" or (ch.kind == "growing_lesion" and ch.cid not in diffs)]
        image = ss.on_grid(img, grid)
        rel = f"{plan.name}/{date}/t1.nii.gz"
        ss.write_image(image, out / rel)
        folder = out / "derivatives" / "changes" / plan.name / date
        rec = {"set": set_name, "patient": plan.name, "visit": date, "date": date, "baseline": plan.dates[0],
               "is_baseline": v == 0, "image": rel,
               "coordinates": "centre_mm: LPS physical point of this visit's image; centre_voxel: (x, y, z) index",
               "grid": ss.nifti_grid(image), "changes": records if v > 0 else [], "unchanged_lesions": unchanged,
               "nuisances": acq.nuisances}
        ss.write_json(rec, folder / "changes.json")
        if v > 0:
            ss.write_image(ss.on_grid(union, grid), folder / "changemask.nii.gz")
        ss.write_image(ss.on_grid(brain_v.astype(np.uint8), grid), folder / "brainmask.nii.gz")
        ss._atomic(folder / "to_anatomy.tfm", lambda p, tx=acq.transform: sitk.WriteTransform(tx, str(p)))
        visits.append({"visit": date, "image": rel, "baseline": v == 0,
                       "stable": plan.stable(v) if v > 0 else None,
                       "truth_voxels": int(union.sum()) if v > 0 else None,
                       "changes": [r["id"] for r in records] if v > 0 else [],
                       "truth_from_most_covered_voxel": [r["id"] for r in records if "mask_rule" in r],
                       "grid_size": list(grid.GetSize()), "tags": acq.tags})
    LOG.info("%s/%s: %d visits in %.1f s", set_name, plan.name, len(plan.dates), time.time() - t0)
    return {"patient": plan.name, "whole_head": plan.whole_head, "n_visits": len(plan.dates),
            "stable": all(plan.stable(v) for v in range(len(plan.dates))),
            "events": [{"id": c.cid, "type": c.kind, "start_visit": c.start, "location": c.location,
                        "diameter_mm": round(2 * c.radius0, 2) if c.kind != "atrophy" else round(2 * c.radius0, 1),
                        "contrast_pct": round(100 * c.contrast, 1) if c.kind != "atrophy" else None,
                        "growth_radius_mm_per_interval": round(c.growth, 2) if c.growth else None}
                       for c in changes],
            "anatomy": {"shape": anat.shape, "landmarks": anat.landmarks}, "visits": visits}


def blur_changes(base_blurred: np.ndarray, base: np.ndarray, visit: np.ndarray, ref: sitk.Image,
                 sigma: float) -> np.ndarray:
    """PSF of a visit's anatomy from the patient's blurred baseline plus the blurred local differences.

    Blurring is linear and the changes are local, so only their boxes (plus 4 sigma) are filtered.
    """
    diff = visit - base
    changed = diff != 0
    if not changed.any():
        return base_blurred
    out = base_blurred.copy()
    lab, _ = ndimage.label(changed)
    s = sigma / ref.GetSpacing()[0]
    pad = int(np.ceil(4 * s)) + 1
    for k, box in enumerate(ndimage.find_objects(lab), start=1):
        big = tuple(slice(max(0, b.start - pad), min(n, b.stop + pad)) for b, n in zip(box, diff.shape))
        block = np.where(lab[big] == k, diff[big], 0.0).astype(np.float32)
        out[big] += ndimage.gaussian_filter(block, s, mode="constant", truncate=4.0)
    return out


def _psf(a: np.ndarray, ref: sitk.Image, sigma: float) -> np.ndarray:
    img = sitk.GetImageFromArray(a)
    img.CopyInformation(ref)
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, sigma)).astype(np.float32)


def change_record(ch: Change, v: int, mask_1mm: np.ndarray | None, on_visit: np.ndarray | None,
                  grid: sitk.Image, acq: Acq, anat: hd.Head) -> dict:
    """The keys of sample_studies' changes.json, plus location and shape of irregular lesions."""
    centre = ss.invert_point(acq.transform, acq.rot, ch.centre)
    cidx = grid.TransformPhysicalPointToContinuousIndex(centre.tolist())
    vox_mm3 = float(np.prod(anat.ref.GetSpacing()))
    rec: dict = {"id": ch.cid, "type": ch.kind, "centre_mm": ss._r(centre, 2),
                 "centre_voxel": [int(round(c)) for c in cidx],
                 "in_fov": bool(all(-0.5 <= c <= n - 0.5 for c, n in zip(cidx, grid.GetSize())))}
    if ch.kind == "atrophy":
        rec.update({"description": "CSF expansion: tissue next to CSF turned into CSF",
                    "diameter_mm": ss._r(2 * ch.radius0, 1), "thinning_mm": ss._r(ch.amount(v), 2),
                    "contrast_pct": ss._r(100 * ch.measured_contrast, 1)})
    else:
        rec.update({"location": ch.location, "shape": f"irregular, {len(ch.shape.offsets)} lobe(s)",
                    "diameter_mm": ss._r(2 * ch.radius(v), 2), "contrast_pct": ss._r(100 * ch.contrast, 1)})
        if ch.kind == "growing_lesion":
            rec.update({"baseline_diameter_mm": ss._r(2 * ch.radius(0), 2),
                        "growth_radius_mm": ss._r(ch.radius(v) - ch.radius(0), 2)})
        _, prof = lesion_profile(anat.ref, anat.other.shape, ch, v, 0.6)
        rec["lesion_volume_mm3"] = int(round((prof >= 0.5).sum() * vox_mm3))
    if mask_1mm is not None:
        rec["volume_mm3"] = int(round(mask_1mm.sum() * vox_mm3))
        rec["mask_voxels"] = int(on_visit.sum())
        rec["extent_mm"] = ss._r(ch.reach(v) + 1 if ch.kind != "atrophy" else ch.radius0 + 1, 2)
    return rec


# --------------------------------------------------------------------------------------------------- fundus


def simulate_fundus(split: str, plan: PatientPlan, out: Path, opts: Options) -> dict:
    """Micro-lesions (2-8 px: microaneurysms, dot haemorrhages, small exudates) under illumination change."""
    rng = rng_for(split, "fundus", plan.name)
    img = ss.fundus_template()
    true_px = img.shape[0]
    if rng.uniform() < 0.5:
        img = img[:, ::-1].copy()
    img = np.clip(img * rng.uniform(0.92, 1.08, 3), 0, 1)
    s = true_px / opts.fundus_px
    lum = img.mean(axis=2)
    field_mask = ndimage.binary_erosion(lum > 0.08, iterations=int(60 * true_px / 1024))
    disc = np.unravel_index(np.argmax(ndimage.gaussian_filter(lum, 15)), lum.shape)
    yy, xx = np.mgrid[: lum.shape[0], : lum.shape[1]]
    field_mask &= (yy - disc[0]) ** 2 + (xx - disc[1]) ** 2 > (130 * true_px / 1024) ** 2
    cand = np.flatnonzero(field_mask)
    lesions: list[ss.Lesion2D] = []
    for n, ev in enumerate(plan.events):
        diam_px = rng.uniform(2.0, 8.0)  # in output pixels
        strength = rng.uniform(0.35, 0.65) if ev.kind == "haemorrhage" else rng.uniform(0.4, 0.7)
        for _attempt in range(200):
            iy, ix = np.unravel_index(cand[rng.integers(len(cand))], lum.shape)
            c = np.array([ix, iy], float)
            if all(np.linalg.norm(c - o.centre) > 30 * s for o in lesions):
                break
        axes = np.exp(rng.uniform(-0.25, 0.25, 2))
        lesions.append(ss.Lesion2D(f"L{n + 1}", ev.kind, ev.start, c, diam_px * s / 2,
                                   axes / np.sqrt(np.prod(axes)), ss.random_rotation(rng, 2), strength))
    visits = []
    for v, date in enumerate(plan.dates):
        angle = np.radians(rng.uniform(-4, 4))
        shift = rng.uniform(-12, 12, 2) * true_px / 1024
        zoom = rng.uniform(0.97, 1.03)
        tx = sitk.Similarity2DTransform()
        tx.SetCenter([(true_px - 1) / 2] * 2)
        tx.SetAngle(float(angle))
        tx.SetScale(float(zoom))
        tx.SetTranslation(shift.tolist())
        grid = sitk.Image([opts.fundus_px] * 2, sitk.sitkUInt8)
        grid.SetSpacing([s, s])
        grid.SetOrigin([(s - 1) / 2] * 2)

        def to_visit(a: np.ndarray) -> np.ndarray:
            im = sitk.GetImageFromArray(a, isVector=a.ndim == 3)
            return sitk.GetArrayFromImage(sitk.Resample(im, grid, tx, sitk.sitkLinear, 0.0))

        true_v, masks = _fundus_true(img, lesions, v, s)
        blurred = np.stack([ndimage.gaussian_filter(true_v[..., c], 1.0) for c in range(3)], -1)
        x = to_visit(blurred.astype(np.float32)).astype(np.float64)
        # illumination: a smooth uneven field (vignetting, off-centre flash) of its own each visit
        gy, gx = np.mgrid[0:opts.fundus_px, 0:opts.fundus_px] / opts.fundus_px - 0.5
        cx, cy = rng.uniform(-0.2, 0.2, 2)
        vignette = float(rng.uniform(0.1, 0.35))
        tilt = rng.uniform(-0.15, 0.15, 2)
        illum = (1 - vignette * ((gx - cx) ** 2 + (gy - cy) ** 2) / 0.5) * (1 + tilt[0] * gx + tilt[1] * gy)
        gain = rng.uniform(0.8, 1.2)
        gamma = rng.uniform(0.8, 1.25)
        white = rng.uniform(0.93, 1.07, 3)
        sigma = rng.uniform(0.003, 0.008)
        x = np.clip(x * illum[..., None] * gain * white, 0, 1) ** gamma
        x = np.clip(x + rng.normal(0, sigma, x.shape) * (x > 0.02), 0, 1)
        png = np.round(x * 255).astype(np.uint8)
        rel = f"{plan.name}/{date}/fundus.png"
        ss.write_rgb_png(png, out / rel)
        union = np.zeros(png.shape[:2], np.uint8)
        records = []
        inv = tx.GetInverse()
        for les in lesions:
            if v == 0 or les.cid not in masks:
                continue
            full = np.zeros((true_px, true_px), np.float32)
            sl, m = masks[les.cid]
            full[sl] = m
            mv = to_visit(full) >= 0.5
            union |= mv.astype(np.uint8)
            c = np.array(grid.TransformPhysicalPointToContinuousIndex(inv.TransformPoint(les.centre.tolist())))
            records.append({"id": les.cid, "type": "new_lesion", "appearance": les.kind,
                            "centre_px": ss._r(c, 1), "centre_mm": ss._r(c, 1),
                            "centre_voxel": [int(round(q)) for q in c],
                            "diameter_px": ss._r(2 * les.radius / s / zoom, 1),
                            "contrast_pct": ss._r(-100 * les.strength if les.kind == "haemorrhage"
                                                  else 100 * les.strength, 1),
                            "area_px": int(mv.sum()), "mask_voxels": int(mv.sum()),
                            "extent_mm": ss._r(les.radius * les.axes.max() / s + 1, 2)})
        folder = out / "derivatives" / "changes" / plan.name / date
        doc = {"set": "fundus", "patient": plan.name, "visit": date, "date": date, "baseline": plan.dates[0],
               "is_baseline": v == 0, "image": rel,
               "coordinates": "centre_px: (x, y) pixel of this visit's fundus.png (spacing 1, origin 0)",
               "grid": {"size": [opts.fundus_px] * 2, "spacing": [1.0, 1.0], "origin": [0.0, 0.0],
                        "direction": [1.0, 0.0, 0.0, 1.0]},
               "changes": records,
               "nuisances": {"rotation_deg": ss._r(np.degrees(angle), 2), "translation_px": ss._r(shift / s, 2),
                             "zoom": ss._r(zoom), "gain": ss._r(gain), "gamma": ss._r(gamma),
                             "white_balance": ss._r(white), "noise_sigma": ss._r(sigma * 255, 2),
                             "vignette": ss._r(vignette), "illumination_centre": ss._r([cx, cy]),
                             "illumination_tilt": ss._r(tilt), "blur_sigma_px": 0.5}}
        ss.write_json(doc, folder / "changes.json")
        if v > 0:
            ss._atomic(folder / "changemask.png",
                       lambda p, u=union: sitk.WriteImage(sitk.GetImageFromArray(u), str(p)))
        visits.append({"visit": date, "image": rel, "baseline": v == 0,
                       "stable": plan.stable(v) if v > 0 else None,
                       "truth_voxels": int(union.sum()) if v > 0 else None,
                       "changes": [r["id"] for r in records] if v > 0 else [],
                       "tags": {"rotation_deg": ss._r(np.degrees(angle), 2), "zoom": ss._r(zoom),
                                "gain": ss._r(gain), "gamma": ss._r(gamma), "vignette": ss._r(vignette),
                                "noise_sigma": ss._r(sigma * 255, 2)}})
    return {"patient": plan.name, "n_visits": len(plan.dates),
            "stable": all(plan.stable(v) for v in range(len(plan.dates))),
            "events": [{"id": le.cid, "type": "new_lesion", "appearance": le.kind, "start_visit": le.start,
                        "diameter_px": round(2 * le.radius / s, 2)} for le in lesions],
            "visits": visits}


def _fundus_true(img: np.ndarray, lesions: list[ss.Lesion2D], v: int, s: float) -> tuple[np.ndarray, dict]:
    ref = sitk.Image([img.shape[1], img.shape[0]], sitk.sitkUInt8)
    out = img.copy()
    masks = {}
    for les in lesions:
        if v < les.start:
            continue
        sl, prof = ss.blob(ref, out.shape[:2], les.centre, les.axes, les.rot, les.radius, 0.6 * s)
        p = (les.strength * prof)[..., None]
        if les.kind == "haemorrhage":  # dark red dot: green and blue absorbed more than red
            out[sl] = out[sl] * (1 - p * np.array([0.75, 1.0, 0.95]))
        else:  # small hard exudate: bright yellow
            out[sl] = out[sl] * (1 - p) + p * np.array([1.0, 0.9, 0.45]) * min(1.0, out[sl].max() + 0.25)
        masks[les.cid] = (sl, (prof >= 0.5).astype(np.float32))
    return out, masks


# --------------------------------------------------------------------------------------------------- driver


def _job(args: tuple[str, str, PatientPlan, str, Options, int]) -> dict:
    split, set_name, plan, out, opts, threads = args
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    if set_name == "fundus":
        return simulate_fundus(split, plan, Path(out), opts)
    return simulate_patient(split, set_name, plan, Path(out), opts)


def generate(split: str, out_dir: Path | str, sets: Sequence[str] = DEFAULT_SETS, patients: int | None = None,
             jobs: int = 1, opts: Options = Options()) -> dict[str, dict]:
    """Write the split's sets under out_dir (each set folder is replaced); returns each set's cohort.json."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; splits are {tuple(SPLIT_SEEDS)}")
    out_dir = Path(out_dir)
    tasks = []
    plans: dict[str, list[PatientPlan]] = {}
    for set_name in sets:
        if set_name not in SETS:
            raise ValueError(f"unknown set {set_name!r}; sets are {SETS}")
        out = out_dir / set_name
        if out.exists():
            shutil.rmtree(out)
        plans[set_name] = plan_set(split, set_name, patients or DEFAULT_PATIENTS[set_name])
        threads = 1 if jobs > 1 else 2
        tasks += [(split, set_name, p, str(out), opts, threads) for p in plans[set_name]]
    # the slowest (3D, three visits) first, so the pool does not end on one long patient
    tasks.sort(key=lambda t: (t[1] == "fundus", -len(t[2].dates)))
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_job, tasks))
    else:
        results = [_job(t) for t in tasks]
    by_set: dict[str, dict[str, dict]] = {s: {} for s in sets}
    for t, r in zip(tasks, results):
        by_set[t[1]][r["patient"]] = r
    docs = {}
    for set_name in sets:
        entries = [by_set[set_name][p.name] for p in plans[set_name]]
        doc = {"split": split, "set": set_name, "seed": SPLIT_SEEDS[split], "generator": "benchmarks/cohort.py",
               "note": "dev tunes settings; validation reports them and is never used to choose anything",
               "options": {"anatomy_mm": opts.anatomy_mm, "voxel_scale": opts.voxel_scale,
                           "change_scale": opts.change_scale, "fundus_px": opts.fundus_px},
               "counts": counts(entries, set_name), "patients": entries}
        ss.write_json(doc, out_dir / set_name / "cohort.json")
        ss.write_json({"Name": f"ground truth of the {split} cohort, {set_name} set", "BIDSVersion": "1.9.0",
                       "DatasetType": "derivative", "GeneratedBy": [{"Name": "benchmarks/cohort.py"}]},
                      out_dir / set_name / "derivatives" / "changes" / "dataset_description.json")
        docs[set_name] = doc
    return docs


def counts(entries: list[dict], set_name: str) -> dict:
    """Per-set figures for the report: patients, pairs, stable pairs, lesions, subgroups."""
    fus = [v for e in entries for v in e["visits"] if not v["baseline"]]
    c = {"patients": len(entries), "three_visit_patients": sum(e["n_visits"] == 3 for e in entries),
         "pairs": len(fus), "stable_pairs": sum(bool(v["stable"]) for v in fus),
         "changed_pairs_with_empty_truth": sum((not v["stable"]) and v["truth_voxels"] == 0 for v in fus),
         "changes": sum(1 for e in entries for ev in e["events"] if ev["type"] != "static_lesion"),
         "new_or_growing_lesions": sum(1 for e in entries for ev in e["events"]
                                       if ev["type"] in ("new_lesion", "growing_lesion")),
         "old_unchanged_lesions": sum(1 for e in entries for ev in e["events"] if ev["type"] == "static_lesion"),
         "truth_from_most_covered_voxel": sum(len(v.get("truth_from_most_covered_voxel", [])) for v in fus)}
    if set_name != "fundus":
        c.update({
            "changes_by_type": _tally(ev["type"] for e in entries for ev in e["events"]),
            "lesions_by_location": _tally(ev["location"] for e in entries for ev in e["events"]
                                          if ev["type"] != "atrophy"),
            "whole_head_pairs": sum(e["whole_head"] for e in entries for v in e["visits"] if not v["baseline"]),
            "thick_followups_by_axis": _tally(v["tags"]["slice_axis"] for v in fus if v["tags"]["thick_slices"]),
            "oblique_visits": sum(v["tags"]["oblique_deg"] > 0 for e in entries for v in e["visits"]),
            "cut_fov_pairs": sum(any(v["tags"]["fov_cut_mm"] > 0 for v in (e["visits"][0], f))
                                 for e in entries for f in e["visits"][1:]),
            "fov_bottom": _tally(v["tags"]["fov_bottom"] for e in entries for v in e["visits"]),
        })
    return c


def _tally(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[str(i)] = out.get(str(i), 0) + 1
    return dict(sorted(out.items()))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", required=True, choices=tuple(SPLIT_SEEDS))
    ap.add_argument("-o", "--out", required=True, help="output folder (outside the repository)")
    ap.add_argument("--jobs", type=int, default=1, help="patients simulated in parallel (processes)")
    ap.add_argument("--sets", nargs="*", default=list(DEFAULT_SETS), choices=SETS,
                    help="realhead needs pydeface's mean head (pip install --no-deps pydeface)")
    ap.add_argument("--patients", type=int, default=None, help="patients per set (default: the benchmark's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    docs = generate(args.split, args.out, args.sets, args.patients, args.jobs)
    for set_name, doc in docs.items():
        print(f"{set_name}: {json.dumps(doc['counts'])}")
    print(f"generated split {args.split} ({', '.join(docs)}) in {time.time() - t0:.1f} s with --jobs {args.jobs}")


if __name__ == "__main__":
    main()
