"""Build the sample studies (issue #2): small longitudinal studies with known ground truth.

Every image is simulated from a real scan that ships inside a package (nilearn's MNI ICBM152 2009a T1 with
its GM/WM maps; scikit-image's fundus photograph), so the demo, the tests and the evaluation never download
anything. The physics is kept honest because later stages are measured on these files:

* each patient has a 1 mm "true" anatomy (the template under a random smooth warp), to which the changes of a
  visit are applied (new / growing lesions as smooth-edged blobs in white matter, local CSF expansion);
* a visit is acquired by resampling that anatomy through the visit's own head pose (and, on the hard set, a
  scanner-fixed smooth distortion) onto the visit's scanner grid, then applying a bias field, scanner gain,
  an intensity curve and Rician noise;
* the truth of a follow-up is the difference of the 1 mm change masks (this visit vs the FIRST visit), mapped
  through the same transform onto the visit's own grid (linear interpolation, threshold 0.5).

Run ``python sample_studies/build.py`` to rebuild everything; the result is bit-identical for the same
package versions because every random draw comes from a generator seeded by (set, patient).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

LOG = logging.getLogger("sample_studies")

ROOT = Path(__file__).resolve().parent
SEED = 20240302  # change only on purpose: every file depends on it
SETS = ("easy", "hard", "dicom", "fundus")
WM_REF = 220.0  # template intensity of white matter; gains, curves and noise are relative to it
OUT_SCALE = 0.4  # scanner units per template unit (white matter about 88): keeps the gzip files small
ANAT_PAD_MM = 10  # margin kept around the template's brain when cropping the 1 mm anatomy
FOV_MARGIN_MM = 9.0  # margin between the brain's bounding box and each visit's field of view


# --------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Protocol:
    """Ranges every random nuisance and change of one set is drawn from."""

    rot_deg: float  # each Euler angle uniform in +-rot_deg
    shift_mm: float  # each translation component uniform in +-shift_mm
    noise_rel: tuple[float, float]  # Rician sigma / white-matter intensity
    bias_amp: float  # max |log bias| over the field of view
    gain: tuple[float, float]
    gamma: tuple[float, float] | None  # intensity curve exponent of every visit (None: linear)
    distortion_mm: tuple[float, float]  # max displacement of follow-ups' scanner distortion ((0, 0): none)
    lesion_diam_mm: tuple[float, float]
    contrast: tuple[float, float]  # |relative intensity change| of lesions
    growth_mm: tuple[float, float]  # growth in RADIUS per follow-up interval
    atrophy_mm: tuple[float, float]  # tissue thickness turned into CSF
    atrophy_radius_mm: tuple[float, float]
    voxel_mm: float = 1.5
    psf_sigma_mm: float = 0.6


EASY = Protocol(
    rot_deg=2.0, shift_mm=2.5, noise_rel=(0.015, 0.025), bias_amp=0.08, gain=(0.9, 1.1), gamma=None,
    distortion_mm=(0.0, 0.0), lesion_diam_mm=(6.0, 12.0), contrast=(0.30, 0.50), growth_mm=(2.0, 3.0),
    atrophy_mm=(2.0, 3.0), atrophy_radius_mm=(9.0, 12.0),
)
HARD = Protocol(
    rot_deg=5.0, shift_mm=6.0, noise_rel=(0.02, 0.05), bias_amp=0.15, gain=(0.8, 1.25), gamma=(0.8, 1.25),
    distortion_mm=(0.8, 1.5), lesion_diam_mm=(3.0, 6.0), contrast=(0.08, 0.15), growth_mm=(1.0, 2.0),
    atrophy_mm=(1.0, 1.5), atrophy_radius_mm=(7.0, 9.0),
)


@dataclass(frozen=True)
class PatientSpec:
    """One patient: visit dates and the changes that happen, the rest is drawn at random."""

    name: str
    dates: tuple[str, ...]  # ISO dates of the visits, first = baseline
    # (kind, visit index where it first differs from baseline); kinds: new_lesion, growing_lesion (present at
    # baseline, grows from that visit on), atrophy, static_lesion (present and unchanged at every visit).
    events: tuple[tuple[str, int], ...] = ()
    thick: tuple[int, ...] = ()  # visits acquired with 3 mm slices (hard set)
    oblique: tuple[int, ...] = ()  # visits with an oblique (tilted) acquisition grid


PATIENTS: dict[str, tuple[PatientSpec, ...]] = {
    "easy": (
        PatientSpec("sub-01", ("2020-01-15", "2020-07-20", "2021-01-18"),
                    (("new_lesion", 1), ("new_lesion", 2), ("growing_lesion", 2), ("static_lesion", 0))),
        PatientSpec("sub-02", ("2020-03-02", "2020-09-14"),
                    (("growing_lesion", 1), ("atrophy", 1), ("static_lesion", 0))),
        PatientSpec("sub-03", ("2019-11-05", "2020-05-12"), (("static_lesion", 0), ("static_lesion", 0))),
        PatientSpec("sub-04", ("2020-06-22", "2021-06-28"), (("new_lesion", 1), ("atrophy", 1))),
    ),
    "hard": (
        PatientSpec("P001", ("2021-03-04", "2021-06-10", "2021-12-02"),
                    (("new_lesion", 1), ("new_lesion", 2), ("growing_lesion", 2), ("static_lesion", 0)),
                    thick=(1,)),
        PatientSpec("P002", ("2020-10-12", "2021-04-19"), (("static_lesion", 0),), thick=(1,)),
        PatientSpec("P003", ("2019-05-06", "2019-11-11", "2020-05-18"),
                    (("atrophy", 2), ("new_lesion", 2), ("static_lesion", 0)), thick=(2,)),
        PatientSpec("P004", ("2022-01-10", "2022-07-11"), (), thick=(1,), oblique=(1,)),
        PatientSpec("P005", ("2021-09-01", "2022-03-02"), (("new_lesion", 1), ("growing_lesion", 1))),
    ),
    "dicom": (
        PatientSpec("D001", ("2022-03-15", "2022-10-20"),
                    (("new_lesion", 1), ("growing_lesion", 1), ("static_lesion", 0))),
    ),
    "fundus": (
        PatientSpec("F001", ("2020-01-10", "2020-08-05"), (("haemorrhage", 1), ("haemorrhage", 1))),
        PatientSpec("F002", ("2019-04-02", "2019-10-08", "2020-04-14"),
                    (("exudate", 1), ("exudate", 1), ("exudate", 1), ("haemorrhage", 2))),
        PatientSpec("F003", ("2021-05-17", "2021-11-22"), ()),
    ),
}


def visit_names(spec: PatientSpec, set_name: str) -> tuple[str, ...]:
    """Visit names exactly as the timeline names them (BIDS session, ISO date, DICOM StudyDate)."""
    if set_name == "easy":
        return tuple(f"ses-{i + 1:02d}" for i in range(len(spec.dates)))
    if set_name == "dicom":
        return tuple(d.replace("-", "") for d in spec.dates)
    return spec.dates


def patient_rng(set_name: str, patient: str) -> np.random.Generator:
    """One generator per patient, so any patient can be rebuilt alone and bit-identically."""
    key = int.from_bytes(hashlib.sha256(f"{set_name}/{patient}".encode()).digest()[:8], "little")
    return np.random.default_rng([SEED, key])


# --------------------------------------------------------------------------------------------------- file output


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_image(img: sitk.Image, path: Path) -> None:
    _atomic(path, lambda p: sitk.WriteImage(img, str(p), True))


def write_text(text: str, path: Path) -> None:
    _atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(obj: dict, path: Path) -> None:
    text = json.dumps(obj, indent=1)
    text = re.sub(r"\[([\s\d.,eE+-]*)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    write_text(text + "\n", path)


def _r(x, nd: int = 3):
    """Round floats (also inside lists) so the JSON is short and stable."""
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_r(v, nd) for v in x]
    if isinstance(x, (np.integer, int)):
        return int(x)
    return round(float(x), nd)


# --------------------------------------------------------------------------------------------------- geometry


def physical_points(ref: sitk.Image, slices: tuple[slice, ...]) -> np.ndarray:
    """Physical (x, y, z) of the voxels of ``array[slices]`` (numpy axis order z, y, x); shape (..., 3)."""
    dim = ref.GetDimension()
    idx = np.meshgrid(*[np.arange(s.start, s.stop) for s in slices], indexing="ij")  # numpy order
    ijk = np.stack(idx[::-1], axis=-1).astype(np.float64)  # (..., dim) in x, y, z order
    d = np.array(ref.GetDirection()).reshape(dim, dim)
    return (ijk * np.array(ref.GetSpacing())) @ d.T + np.array(ref.GetOrigin())


def box(shape: Sequence[int], centre_idx: Sequence[float], half: Sequence[float]) -> tuple[slice, ...]:
    """Slices (numpy order) of a box around a centre given in numpy order, clipped to the array."""
    return tuple(slice(max(0, int(np.floor(c - h))), min(n, int(np.ceil(c + h)) + 1))
                 for n, c, h in zip(shape, centre_idx, half))


def to_numpy_index(ref: sitk.Image, point: Sequence[float]) -> np.ndarray:
    return np.array(ref.TransformPhysicalPointToContinuousIndex([float(v) for v in point]))[::-1]


def random_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def invert_point(tx: sitk.Transform, rot: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The point p with tx(p) = q, for a rigid rotation ``rot`` plus a small smooth distortion."""
    p = rot.T @ (q - np.array(tx.TransformPoint([0.0] * len(q))))
    for _ in range(20):
        p = p + rot.T @ (q - np.array(tx.TransformPoint([float(v) for v in p])))
    return p


def blob(ref: sitk.Image, shape: Sequence[int], centre: np.ndarray, axes: np.ndarray, rot: np.ndarray,
         radius: float, edge_mm: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """Smooth-edged ellipsoid (equivalent-sphere radius ``radius``) as a partial-volume profile in [0, 1].

    The profile is 0.5 on the ellipsoid surface and falls off over ``edge_mm``, like a lesion imaged at finite
    resolution; ``profile >= 0.5`` is its mask.
    """
    sp = min(ref.GetSpacing())
    half = (radius * axes.max() + 3 * edge_mm + 2) / sp
    sl = box(shape, to_numpy_index(ref, centre), [half] * len(shape))
    pts = physical_points(ref, sl) - centre
    local = pts @ rot / (axes * radius)  # coordinates in the ellipsoid's frame, 1 on its surface
    rho = np.linalg.norm(local, axis=-1)
    prof = 0.5 * (1.0 - np.tanh((rho - 1.0) * radius / edge_mm))
    return sl, prof.astype(np.float32)


# --------------------------------------------------------------------------------------------------- 3D anatomy


@dataclass
class Anatomy:
    """A patient's 1 mm true anatomy (arrays in numpy z, y, x order on ``ref``'s grid)."""

    ref: sitk.Image
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray  # 0/1
    strip: np.ndarray  # 0/1 brain mask dilated by 2 mm: what a skull-stripping step keeps
    csf_value: float

    @property
    def csf(self) -> np.ndarray:
        return np.clip(self.brain - self.gm - self.wm, 0.0, 1.0)


_TEMPLATE: dict[str, sitk.Image] = {}  # loaded once per process: the packaged files never change
_RETINA: dict[str, np.ndarray] = {}


def template_paths() -> dict[str, Path]:
    import nilearn  # noqa: F401  (only needed to rebuild)

    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    return {k: folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}


def load_template() -> dict[str, sitk.Image]:
    """The MNI152 2009a T1 and tissue maps, cropped to the brain plus a margin (float32, maps in [0, 1])."""
    if not _TEMPLATE:
        imgs = {k: sitk.ReadImage(str(p), sitk.sitkFloat32) for k, p in template_paths().items()}
        a = sitk.GetArrayFromImage(imgs["t1"])
        nz = np.argwhere(a > 0)
        lo = np.maximum(nz.min(0) - ANAT_PAD_MM, 0)
        hi = np.minimum(nz.max(0) + ANAT_PAD_MM + 1, a.shape)
        for k, img in imgs.items():
            crop = img[int(lo[2]):int(hi[2]), int(lo[1]):int(hi[1]), int(lo[0]):int(hi[0])]
            _TEMPLATE[k] = crop / 255.0 if k != "t1" else crop
    return dict(_TEMPLATE)  # type: ignore[arg-type]


def patient_anatomy(rng: np.random.Generator) -> Anatomy:
    """The template under a random smooth warp and a mild GM/WM contrast change: one template, many heads."""
    tpl = load_template()
    ref = tpl["t1"]
    size = np.array(ref.GetSize())
    centre = np.array(ref.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    bs = sitk.BSplineTransformInitializer(ref, [4, 4, 4], 3)
    bs.SetParameters(rng.normal(0.0, 2.0, len(bs.GetParameters())).tolist())
    aff = sitk.AffineTransform(3)
    aff.SetCenter(centre.tolist())
    aff.SetMatrix(np.diag(rng.uniform(0.95, 1.05, 3)).ravel().tolist())
    warp = sitk.CompositeTransform([aff, bs])
    # The warp is evaluated once on a 3 mm grid and applied as a dense field: much faster than B-splines.
    field_ref = sitk.Image([int(n) for n in np.ceil(size / 3) + 1], sitk.sitkFloat32)
    field_ref.SetSpacing([3.0] * 3)
    field_ref.SetOrigin(ref.GetOrigin())
    field_ref.SetDirection(ref.GetDirection())
    disp = sitk.DisplacementFieldTransform(sitk.TransformToDisplacementField(
        warp, sitk.sitkVectorFloat64, field_ref.GetSize(), field_ref.GetOrigin(), field_ref.GetSpacing(),
        field_ref.GetDirection()))
    arr = {k: sitk.GetArrayFromImage(sitk.Resample(img, ref, disp, sitk.sitkLinear, 0.0)).astype(np.float32)
           for k, img in tpl.items()}
    brain = (arr["t1"] > 0.5).astype(np.float32)
    brain = ndimage.binary_fill_holes(ndimage.binary_opening(brain > 0, iterations=1)).astype(np.float32)
    strip = (ndimage.distance_transform_edt(brain == 0) <= 2.0).astype(np.float32)
    gm, wm = arr["gm"] * brain, arr["wm"] * brain
    t1 = arr["t1"] * (1.0 + rng.uniform(-0.05, 0.05) * gm)
    csf = np.clip(brain - gm - wm, 0, 1)
    csf_value = float(np.median(t1[(csf > 0.8) & (brain > 0)]))
    return Anatomy(ref, t1.astype(np.float32), gm, wm, brain, strip, csf_value)


# --------------------------------------------------------------------------------------------------- 3D changes


@dataclass
class Change3D:
    """A change of one patient; its size per visit follows from its kind."""

    cid: str
    kind: str
    start: int
    centre: np.ndarray  # anatomy space, mm
    radius0: float  # lesion radius at its first appearance; atrophy: region radius
    contrast: float = 0.0  # signed relative intensity change (lesions)
    growth: float = 0.0  # radius growth per follow-up interval (growing lesions)
    thinning: float = 0.0  # thickness turned into CSF per interval (atrophy)
    measured_contrast: float = 0.0  # atrophy: mean relative intensity change of the changed 1 mm voxels
    axes: np.ndarray = field(default_factory=lambda: np.ones(3))
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))

    def present(self, v: int) -> bool:
        return self.kind in ("static_lesion", "growing_lesion") or v >= self.start

    def radius(self, v: int) -> float:
        if self.kind == "growing_lesion":
            return self.radius0 + self.growth * max(0, v - self.start + 1)
        return self.radius0

    def amount(self, v: int) -> float:
        return self.thinning * max(0, v - self.start + 1)


def place_changes(anat: Anatomy, spec: PatientSpec, proto: Protocol, rng: np.random.Generator) -> list[Change3D]:
    """Draw sizes and positions: lesions in deep white matter, atrophy beside CSF inside the brain."""
    ref, shape = anat.ref, anat.t1.shape
    wm_depth = ndimage.distance_transform_edt(anat.wm > 0.5)
    brain_depth = ndimage.distance_transform_edt(anat.brain > 0)
    csf_dist = ndimage.distance_transform_edt(anat.csf < 0.5)
    n_visits = len(spec.dates)
    out: list[Change3D] = []
    for n, (kind, start) in enumerate(spec.events):
        for _attempt in range(200):
            if kind == "atrophy":
                rad = rng.uniform(*proto.atrophy_radius_mm)
                cand = (anat.gm > 0.5) & (csf_dist > 0) & (csf_dist <= 2) & (brain_depth >= rad + 4)
                ch = Change3D(f"A{n + 1}", kind, start, np.zeros(3), rad,
                              thinning=rng.uniform(*proto.atrophy_mm) / max(1, n_visits - start))
                reach = rad + 3
            else:
                diam = rng.uniform(*proto.lesion_diam_mm)
                growth = rng.uniform(*proto.growth_mm) if kind == "growing_lesion" else 0.0
                ch = Change3D(f"L{n + 1}", kind, start, np.zeros(3), diam / 2,
                              contrast=float(rng.choice([-1.0, -1.0, -1.0, 1.0]) * rng.uniform(*proto.contrast)),
                              growth=growth, axes=np.exp(rng.uniform(-0.2, 0.2, 3)), rot=random_rotation(rng, 3))
                ch.axes = ch.axes / np.prod(ch.axes) ** (1 / 3)
                reach = ch.radius(n_visits - 1) * ch.axes.max()
                cand = wm_depth >= reach + 2.5
            flat = np.flatnonzero(cand)
            pick = np.unravel_index(flat[rng.integers(len(flat))], shape)
            ch.centre = np.array(ref.TransformIndexToPhysicalPoint([int(i) for i in pick[::-1]]))
            if all(np.linalg.norm(ch.centre - o.centre) > reach + o.radius(n_visits - 1) * o.axes.max() + 10
                   for o in out):
                break
        else:  # pragma: no cover - the spec is fixed, so this would show at build time
            raise RuntimeError(f"could not place {kind} for {spec.name}")
        out.append(ch)
    return out


def visit_anatomy(anat: Anatomy, changes: list[Change3D], v: int, edge_mm: float
                  ) -> tuple[np.ndarray, dict[str, tuple[tuple[slice, ...], np.ndarray]]]:
    """Visit v's true 1 mm T1, and per change the 1 mm mask of what differs from baseline (ROI, mask)."""
    t1 = anat.t1.copy()
    shape = t1.shape
    diff: dict[str, tuple[tuple[slice, ...], np.ndarray]] = {}
    for ch in changes:
        if ch.kind != "atrophy" or not ch.present(v):
            continue
        sl = box(shape, to_numpy_index(anat.ref, ch.centre), [ch.radius0 + 8] * 3)
        r = np.linalg.norm(physical_points(anat.ref, sl) - ch.centre, axis=-1)
        region = np.clip((ch.radius0 - r) / 2.0 + 0.5, 0, 1)
        # Distance to CSF inside the ROI; tissue closer than the thinning amount becomes CSF, smoothly.
        d = ndimage.distance_transform_edt(anat.csf[sl] < 0.5)
        w = region * np.clip(ch.amount(v) - d + 0.5, 0, 1) * anat.brain[sl] * (anat.csf[sl] < 0.5)
        before = t1[sl].copy()
        t1[sl] = t1[sl] * (1 - w) + anat.csf_value * w
        diff[ch.cid] = (sl, (w >= 0.5).astype(np.float32))
        if (w >= 0.5).any():
            ch.measured_contrast = float(np.mean(t1[sl][w >= 0.5] / np.maximum(before[w >= 0.5], 1e-3) - 1))
    for ch in changes:
        if ch.kind == "atrophy" or not ch.present(v):
            continue
        sl, prof = blob(anat.ref, shape, ch.centre, ch.axes, ch.rot, ch.radius(v), edge_mm)
        t1[sl] *= 1.0 + ch.contrast * prof
        mask = prof >= 0.5
        if ch.kind == "growing_lesion":
            sl0, prof0 = blob(anat.ref, shape, ch.centre, ch.axes, ch.rot, ch.radius(0), edge_mm)
            base = np.zeros(shape, bool)
            base[sl0] = prof0 >= 0.5
            mask = mask & ~base[sl]
        if ch.kind != "static_lesion" and mask.any():
            diff[ch.cid] = (sl, mask.astype(np.float32))
    return t1, diff


# --------------------------------------------------------------------------------------------------- acquisition


@dataclass(frozen=True)
class Acquisition:
    """A visit's scanner grid and the transform from it to the patient's anatomy space."""

    grid: sitk.Image  # the visit image's geometry (its voxels are unused)
    fine: sitk.Image  # grid that is sampled before slab averaging (== grid for thin slices)
    slab: int  # fine slices averaged per acquired slice
    transform: sitk.Transform  # visit physical point -> anatomy physical point
    rot: np.ndarray
    nuisances: dict


def make_grid(fov_mm: np.ndarray, spacing: Sequence[float], direction: np.ndarray) -> sitk.Image:
    size = [int(np.ceil(f / s)) for f, s in zip(fov_mm, spacing)]
    img = sitk.Image(size, sitk.sitkUInt8)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection(direction.ravel().tolist())
    ext = (np.array(size) - 1) * np.array(spacing)
    img.SetOrigin((-(direction @ ext) / 2).tolist())  # the field of view is centred on the scanner isocentre
    return img


def euler_matrix(angles: np.ndarray) -> np.ndarray:
    t = sitk.Euler3DTransform()
    t.SetRotation(*[float(a) for a in angles])
    return np.array(t.GetMatrix()).reshape(3, 3)


def smooth_field(grid: sitk.Image, rng: np.random.Generator, mesh: int) -> sitk.BSplineTransform:
    bs = sitk.BSplineTransformInitializer(grid, [mesh] * grid.GetDimension(), 3)
    bs.SetParameters(rng.normal(0.0, 1.0, len(bs.GetParameters())).tolist())
    return bs


def acquisition(proto: Protocol, rng: np.random.Generator, v: int, spec: PatientSpec, brain_centre: np.ndarray,
                fov: np.ndarray) -> Acquisition:
    """Draw the visit's pose, grid and scanner nuisances."""
    direction = np.eye(3)
    if v in spec.oblique:
        direction = euler_matrix(np.radians([rng.choice([-1, 1]) * rng.uniform(8, 12), 0.0, 0.0]))
    thick = v in spec.thick
    vox = proto.voxel_mm
    spacing = (vox, vox, 3.0 if thick else vox)
    grid = make_grid(fov, spacing, direction)
    slab = 3 if thick else 1
    if thick:  # sampled at 1 mm along z, then every 3 slices averaged: a 3 mm slab profile
        nx, ny, nz = grid.GetSize()
        fine = sitk.Image([nx, ny, 3 * nz], sitk.sitkUInt8)
        fine.SetSpacing([vox, vox, 1.0])
        fine.SetDirection(grid.GetDirection())
        fine.SetOrigin((np.array(grid.GetOrigin()) - direction[:, 2] * 1.0).tolist())
    else:
        fine = grid
    angles = np.radians(rng.uniform(-proto.rot_deg, proto.rot_deg, 3))
    shift = rng.uniform(-proto.shift_mm, proto.shift_mm, 3)
    rigid = sitk.Euler3DTransform()
    rigid.SetRotation(*[float(a) for a in angles])
    rigid.SetTranslation((brain_centre + shift).tolist())
    rot = np.array(rigid.GetMatrix()).reshape(3, 3)
    transform: sitk.Transform = rigid
    dist_max = dist_rms = 0.0
    if v > 0 and proto.distortion_mm[1] > 0:
        # Gradient non-linearity is fixed to the scanner: a smooth field defined on the visit's grid.
        bs = smooth_field(grid, rng, 3)
        target = rng.uniform(*proto.distortion_mm)
        probe = make_grid(fov, (6.0, 6.0, 6.0), direction)
        field = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
            bs, sitk.sitkVectorFloat64, probe.GetSize(), probe.GetOrigin(), probe.GetSpacing(),
            probe.GetDirection()))
        mag = np.linalg.norm(field, axis=-1)
        scale = target / mag.max()
        bs.SetParameters((np.array(bs.GetParameters()) * scale).tolist())
        dist_max, dist_rms = target, float(np.sqrt(np.mean((mag * scale) ** 2)))
        transform = sitk.CompositeTransform([rigid, bs])  # distortion first (scanner space), then pose
    gain = rng.uniform(*proto.gain)
    gamma = float(rng.uniform(*proto.gamma)) if proto.gamma else 1.0
    noise_rel = rng.uniform(*proto.noise_rel)
    nuis = {
        "rotation_deg": _r(np.degrees(angles), 2),
        "translation_mm": _r(shift, 2),
        "pose_note": "visit point p maps to anatomy point R p + t_head + translation_mm; see to_anatomy.tfm",
        "gain": _r(gain),
        "gamma": _r(gamma),
        "wm_intensity": _r(WM_REF * OUT_SCALE * gain, 1),
        "noise_sigma": _r(noise_rel * WM_REF * OUT_SCALE * gain, 2),
        "noise_sigma_rel_wm": _r(noise_rel, 4),
        "noise_model": "Rician",
        "bias_field_max_pct": _r(100 * (np.exp(proto.bias_amp) - 1), 1),
        "distortion_max_mm": _r(dist_max),
        "distortion_rms_mm": _r(dist_rms),
        "slice_thickness_mm": _r(3.0 if thick else vox),
        "voxel_size_mm": _r(spacing),
        "direction": _r(direction.ravel(), 5),
        "psf_sigma_mm": proto.psf_sigma_mm,
    }
    return Acquisition(grid, fine, slab, transform, rot, nuis)


def sample(arr: np.ndarray, anat_ref: sitk.Image, acq: Acquisition) -> np.ndarray:
    """Sample a 1 mm anatomy-space array onto the visit grid (linear), averaging slabs for thick slices."""
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(anat_ref)
    out = sitk.GetArrayFromImage(sitk.Resample(img, acq.fine, acq.transform, sitk.sitkLinear, 0.0,
                                               sitk.sitkFloat32))
    if acq.slab > 1:
        z = out.shape[0] // acq.slab
        out = out[: z * acq.slab].reshape(z, acq.slab, *out.shape[1:]).mean(axis=1)
    return out.astype(np.float32)


def bias_field(grid: sitk.Image, amp: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field fixed to the scanner (coil sensitivity), max |log| = amp."""
    coarse = sitk.GetImageFromArray(rng.normal(size=(6, 6, 6)))
    size = np.array(grid.GetSize())
    step = (size - 1) * np.array(grid.GetSpacing()) / 3  # 4 knots span the grid, one spare on each side
    d = np.array(grid.GetDirection()).reshape(3, 3)
    coarse.SetSpacing(step.tolist())
    coarse.SetOrigin((np.array(grid.GetOrigin()) - d @ step).tolist())
    coarse.SetDirection(grid.GetDirection())
    logb = sitk.GetArrayFromImage(sitk.Resample(coarse, grid, sitk.Transform(), sitk.sitkBSpline, 0.0,
                                                sitk.sitkFloat64))
    logb -= logb.mean()
    return np.exp(amp * logb / np.abs(logb).max())


def scanner(true_img: np.ndarray, strip: np.ndarray, acq: Acquisition, proto: Protocol,
            rng: np.random.Generator) -> np.ndarray:
    """Intensity curve, bias, gain, Rician noise, skull-strip mask; int16 like a scanner's output."""
    n = acq.nuisances
    x = np.maximum(true_img, 0.0).astype(np.float64)
    if n["gamma"] != 1.0:
        x = WM_REF * (x / WM_REF) ** n["gamma"]
    x = x * bias_field(acq.grid, proto.bias_amp, rng) * n["gain"] * OUT_SCALE
    sigma = n["noise_sigma"]
    x = np.sqrt((x + rng.normal(0, sigma, x.shape)) ** 2 + rng.normal(0, sigma, x.shape) ** 2)
    x[strip < 0.5] = 0.0
    return np.clip(np.round(x), 0, 32767).astype(np.int16)


def on_grid(arr: np.ndarray, grid: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(grid)
    return img


# --------------------------------------------------------------------------------------------------- 3D patients


@dataclass
class Visit3D:
    name: str
    date: str
    image: sitk.Image  # int16
    changemask: sitk.Image | None  # uint8, follow-ups only
    transform: sitk.Transform
    record: dict


def simulate_patient_3d(set_name: str, spec: PatientSpec) -> list[Visit3D]:
    proto = HARD if set_name == "hard" else EASY
    rng = patient_rng(set_name, spec.name)
    anat = patient_anatomy(rng)
    changes = place_changes(anat, spec, proto, rng)
    nz = np.argwhere(anat.brain > 0)
    lo = np.array(anat.ref.TransformIndexToPhysicalPoint([int(i) for i in nz.min(0)[::-1]]))
    hi = np.array(anat.ref.TransformIndexToPhysicalPoint([int(i) for i in nz.max(0)[::-1]]))
    brain_centre = (lo + hi) / 2
    fov = np.abs(hi - lo) + 2 * FOV_MARGIN_MM
    names = visit_names(spec, set_name)
    edge = 0.6
    visits: list[Visit3D] = []
    for v, (vname, date) in enumerate(zip(names, spec.dates)):
        acq = acquisition(proto, rng, v, spec, brain_centre, fov)
        t1, diffs = visit_anatomy(anat, changes, v, edge)
        blurred = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(on_grid(t1, anat.ref),
                                                                         proto.psf_sigma_mm))
        img = scanner(sample(blurred, anat.ref, acq), sample(anat.strip, anat.ref, acq), acq, proto, rng)
        image = on_grid(img, acq.grid)
        grid = acq.grid
        records = []
        union = np.zeros(img.shape, np.uint8)
        for ch in changes:
            if ch.kind == "static_lesion" or ch.cid not in diffs:
                continue
            full = np.zeros(anat.t1.shape, np.float32)
            sl, m = diffs[ch.cid]
            full[sl] = m
            on_visit = sample(full, anat.ref, acq) >= 0.5
            union |= on_visit.astype(np.uint8)
            records.append(change_record(ch, v, m, on_visit, grid, acq, edge, anat))
        unchanged = [change_record(ch, v, None, None, grid, acq, edge, anat)
                     for ch in changes if ch.kind == "static_lesion"
                     or (ch.kind == "growing_lesion" and ch.cid not in diffs)]
        mask = on_grid(union, grid) if v > 0 else None
        rec = {"changes": records if v > 0 else [], "unchanged_lesions": unchanged, "nuisances": acq.nuisances}
        visits.append(Visit3D(vname, date, image, mask, acq.transform, rec))
    return visits


def change_record(ch: Change3D, v: int, mask_1mm: np.ndarray | None, on_visit: np.ndarray | None,
                  grid: sitk.Image, acq: Acquisition, edge: float, anat: Anatomy) -> dict:
    """What a change is, in this visit's physical space (LPS mm) and voxel indices (x, y, z)."""
    centre = invert_point(acq.transform, acq.rot, ch.centre)
    cidx = grid.TransformPhysicalPointToContinuousIndex(centre.tolist())
    rec: dict = {"id": ch.cid, "type": ch.kind, "centre_mm": _r(centre, 2),
                 "centre_voxel": [int(round(c)) for c in cidx]}
    if ch.kind == "atrophy":
        rec.update({"description": "CSF expansion: tissue next to CSF turned into CSF",
                    "diameter_mm": _r(2 * ch.radius0, 1), "thinning_mm": _r(ch.amount(v), 2),
                    "contrast_pct": _r(100 * ch.measured_contrast, 1)})
    else:
        rec.update({"diameter_mm": _r(2 * ch.radius(v), 2), "contrast_pct": _r(100 * ch.contrast, 1),
                    "shape_axes": _r(ch.axes, 3)})
        if ch.kind == "growing_lesion":
            rec.update({"baseline_diameter_mm": _r(2 * ch.radius(0), 2),
                        "growth_radius_mm": _r(ch.radius(v) - ch.radius(0), 2)})
        sl, prof = blob(anat.ref, anat.t1.shape, ch.centre, ch.axes, ch.rot, ch.radius(v), edge)
        rec["lesion_volume_mm3"] = int((prof >= 0.5).sum())
    if mask_1mm is not None:
        rec["volume_mm3"] = int(mask_1mm.sum())  # 1 mm anatomy voxels of the change
        rec["mask_voxels"] = int(on_visit.sum())  # voxels of this change in the visit's changemask
        rec["extent_mm"] = _r(ch.radius(v) * ch.axes.max() + 1 if ch.kind != "atrophy" else ch.radius0 + 1, 2)
    return rec


# --------------------------------------------------------------------------------------------------- 3D writers


def nifti_grid(img: sitk.Image) -> dict:
    return {"size": list(img.GetSize()), "spacing": _r(img.GetSpacing(), 4), "origin": _r(img.GetOrigin(), 4),
            "direction": _r(img.GetDirection(), 6)}


def write_truth(folder: Path, set_name: str, patient: str, visit: Visit3D, baseline: str, image_rel: str,
                date: str, extra: dict | None = None) -> None:
    doc = {"set": set_name, "patient": patient, "visit": visit.name, "date": date, "baseline": baseline,
           "is_baseline": visit.changemask is None, "image": image_rel,
           "coordinates": "centre_mm: LPS physical point of this visit's image; centre_voxel: (x, y, z) index",
           "grid": nifti_grid(visit.image), **(extra or {}), **visit.record}
    write_json(doc, folder / "changes.json")
    if visit.changemask is not None:
        write_image(visit.changemask, folder / "changemask.nii.gz")
    _atomic(folder / "to_anatomy.tfm", lambda p: sitk.WriteTransform(visit.transform, str(p)))


def build_easy(out: Path, spec: PatientSpec) -> None:
    visits = simulate_patient_3d("easy", spec)
    rows = ["session_id\tacq_time"]
    for i, vis in enumerate(visits):
        rel = f"{spec.name}/{vis.name}/anat/{spec.name}_{vis.name}_T1w.nii.gz"
        write_image(vis.image, out / rel)
        write_json({"Modality": "MR", "MagneticFieldStrength": 3, "SliceThickness": vis.image.GetSpacing()[2],
                    "Manufacturer": "SYNTHETIC (longitudinal sample_studies)"},
                   out / rel.replace(".nii.gz", ".json"))
        rows.append(f"{vis.name}\t{vis.date}T{9 + i:02d}:{(17 * i) % 60:02d}:00")
        write_truth(out / "derivatives" / "changes" / spec.name / vis.name, "easy", spec.name, vis,
                    visits[0].name, rel, vis.date)
    write_text("\n".join(rows) + "\n", out / spec.name / f"{spec.name}_sessions.tsv")


def build_hard(out: Path, spec: PatientSpec) -> None:
    visits = simulate_patient_3d("hard", spec)
    for vis in visits:
        rel = f"{spec.name}/{vis.name}/t1.nii.gz"
        write_image(vis.image, out / rel)
        write_truth(out / "derivatives" / "changes" / spec.name / vis.name, "hard", spec.name, vis,
                    visits[0].name, rel, vis.date)


def uid(*parts: str):
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["longitudinal-sample-studies", str(SEED), *parts])


def write_dicom_series(img: sitk.Image, folder: Path, *, patient_id: str, study_date: str, study_time: str,
                       rng: np.random.Generator, series_description: str = "T1w 3D") -> list[Path]:
    """One MR series, one RLE Lossless file per slice, random-looking file names (exact geometry kept)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import MRImageStorage, RLELossless, ExplicitVRLittleEndian

    arr = sitk.GetArrayFromImage(img).astype(np.int32)  # z, y, x
    # stored = value - intercept: a loader that ignores the rescale tags is off by 20. Values stay below 256
    # so RLE's high-byte segment is one long run.
    slope, intercept = 1.0, -20.0
    stored = np.round((arr - intercept) / slope).astype(np.uint16)
    d = np.array(img.GetDirection()).reshape(3, 3)
    sp = img.GetSpacing()
    study_uid = uid(patient_id, study_date, "study")
    series_uid = uid(patient_id, study_date, "series")
    frame_uid = uid(patient_id, study_date, "frame")
    names = [f"IM{rng.integers(0, 2**32):08X}" for _ in range(arr.shape[0])]
    paths = []
    for k in range(arr.shape[0]):
        pos = np.array(img.GetOrigin()) + d[:, 2] * sp[2] * k
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = uid(patient_id, study_date, "sop", str(k))
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName = f"SAMPLE^{patient_id}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study_time
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.StudyID = study_date[2:]
        ds.AccessionNumber = f"A{study_date}"
        ds.StudyDescription = "MRI BRAIN"
        ds.SeriesDescription = series_description
        ds.ProtocolName = series_description
        ds.Modality = "MR"
        ds.Manufacturer = "SYNTHETIC (longitudinal sample_studies)"
        ds.MagneticFieldStrength = 3
        ds.BodyPartExamined = "BRAIN"
        ds.PatientPosition = "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.MRAcquisitionType = "3D"
        ds.SeriesNumber = 3
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in np.concatenate([d[:, 0], d[:, 1]])]
        ds.PixelSpacing = [f"{sp[1]:.4f}", f"{sp[0]:.4f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{sp[2]:.4f}"
        ds.SpacingBetweenSlices = f"{sp[2]:.4f}"
        ds.SliceLocation = f"{float(pos @ d[:, 2]):.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "US"
        ds.WindowCenter = "90"
        ds.WindowWidth = "200"
        ds.compress(RLELossless, np.ascontiguousarray(stored[k]), generate_instance_uid=False)
        path = folder / names[k]
        _atomic(path, lambda p, ds=ds: pydicom.dcmwrite(p, ds, enforce_file_format=True))
        paths.append(path)
    return paths


def build_dicom(out: Path, spec: PatientSpec) -> None:
    visits = simulate_patient_3d("dicom", spec)
    rng = patient_rng("dicom-files", spec.name)
    for i, vis in enumerate(visits):
        study_time = f"{10 + i:02d}{(23 * i) % 60:02d}00"
        folder = out / f"ST{rng.integers(0, 2**32):08X}" / f"SE{rng.integers(0, 2**32):08X}"
        files = write_dicom_series(vis.image, folder, patient_id=spec.name, study_date=vis.name,
                                   study_time=study_time, rng=rng)
        rel = str(folder.relative_to(out))
        write_truth(out / "derivatives" / "changes" / spec.name / vis.name, "dicom", spec.name, vis,
                    visits[0].name, rel, vis.date, {"study_time": study_time, "n_files": len(files)})


# --------------------------------------------------------------------------------------------------- fundus (2D)


FUNDUS_TRUE = 1024  # px of the "true" photograph; visits are acquired at half that
FUNDUS_OUT = 512


def fundus_template() -> np.ndarray:
    """scikit-image's real fundus photograph, resized to the true resolution, float RGB in [0, 1]."""
    if "retina" not in _RETINA:
        from skimage import data, transform

        _RETINA["retina"] = transform.resize(data.retina(), (FUNDUS_TRUE, FUNDUS_TRUE), order=1,
                                               anti_aliasing=True).astype(np.float32)
    return np.array(_RETINA["retina"])


@dataclass
class Lesion2D:
    cid: str
    kind: str  # haemorrhage | exudate
    start: int
    centre: np.ndarray  # (x, y) px of the true image
    radius: float
    axes: np.ndarray
    rot: np.ndarray
    strength: float


def fundus_lesions(img: np.ndarray, spec: PatientSpec, rng: np.random.Generator) -> list[Lesion2D]:
    lum = img.mean(axis=2)
    field_mask = ndimage.binary_erosion(lum > 0.08, iterations=60)
    disc = np.unravel_index(np.argmax(ndimage.gaussian_filter(lum, 15)), lum.shape)
    yy, xx = np.mgrid[: lum.shape[0], : lum.shape[1]]
    field_mask &= (yy - disc[0]) ** 2 + (xx - disc[1]) ** 2 > 130 ** 2
    cand = np.flatnonzero(field_mask)
    out: list[Lesion2D] = []
    for n, (kind, start) in enumerate(spec.events):
        radius = rng.uniform(7, 13) if kind == "haemorrhage" else rng.uniform(4, 7)
        strength = rng.uniform(0.45, 0.65) if kind == "haemorrhage" else rng.uniform(0.55, 0.75)
        for _attempt in range(200):
            iy, ix = np.unravel_index(cand[rng.integers(len(cand))], lum.shape)
            c = np.array([ix, iy], float)
            if all(np.linalg.norm(c - o.centre) > 60 for o in out):
                break
        axes = np.exp(rng.uniform(-0.25, 0.25, 2))
        out.append(Lesion2D(f"L{n + 1}", kind, start, c, radius, axes / np.sqrt(np.prod(axes)),
                            random_rotation(rng, 2), strength))
    return out


def fundus_visit_true(img: np.ndarray, lesions: list[Lesion2D], v: int) -> tuple[np.ndarray, dict]:
    ref = sitk.Image([FUNDUS_TRUE, FUNDUS_TRUE], sitk.sitkUInt8)
    out = img.copy()
    masks = {}
    for les in lesions:
        if v < les.start:
            continue
        sl, prof = blob(ref, out.shape[:2], les.centre, les.axes, les.rot, les.radius, 1.2)
        p = (les.strength * prof)[..., None]
        if les.kind == "haemorrhage":  # dark red blot: green and blue absorbed more than red
            out[sl] = out[sl] * (1 - p * np.array([0.75, 1.0, 0.95]))
        else:  # hard exudate: bright yellow, lipid deposit
            out[sl] = out[sl] * (1 - p) + p * np.array([1.0, 0.9, 0.45]) * min(1.0, out[sl].max() + 0.25)
        masks[les.cid] = (sl, (prof >= 0.5).astype(np.float32))
    return out, masks


def build_fundus(out: Path, spec: PatientSpec) -> None:
    rng = patient_rng("fundus", spec.name)
    img = fundus_template()
    if rng.uniform() < 0.5:  # the other eye
        img = img[:, ::-1].copy()
    img = np.clip(img * rng.uniform(0.92, 1.08, 3), 0, 1)  # a patient's own fundus pigmentation
    lesions = fundus_lesions(img, spec, rng)
    names = visit_names(spec, "fundus")
    for v, vname in enumerate(names):
        angle = np.radians(rng.uniform(-4, 4))
        shift = rng.uniform(-12, 12, 2)
        zoom = rng.uniform(0.97, 1.03)
        tx = sitk.Similarity2DTransform()
        tx.SetCenter([(FUNDUS_TRUE - 1) / 2] * 2)
        tx.SetAngle(float(angle))
        tx.SetScale(float(zoom))
        tx.SetTranslation(shift.tolist())
        grid = sitk.Image([FUNDUS_OUT, FUNDUS_OUT], sitk.sitkUInt8)
        s = FUNDUS_TRUE / FUNDUS_OUT
        grid.SetSpacing([s, s])
        grid.SetOrigin([(s - 1) / 2] * 2)

        def to_visit(a: np.ndarray) -> np.ndarray:
            im = sitk.GetImageFromArray(a, isVector=a.ndim == 3)
            r = sitk.Resample(im, grid, tx, sitk.sitkLinear, 0.0)
            return sitk.GetArrayFromImage(r)

        true_v, masks = fundus_visit_true(img, lesions, v)
        blurred = np.stack([ndimage.gaussian_filter(true_v[..., c], 1.0) for c in range(3)], -1)
        x = to_visit(blurred.astype(np.float32)).astype(np.float64)
        gain = rng.uniform(0.85, 1.15)
        gamma = rng.uniform(0.85, 1.2)
        white = rng.uniform(0.95, 1.05, 3)
        sigma = rng.uniform(0.003, 0.006)
        x = np.clip(x * gain * white, 0, 1) ** gamma
        x = np.clip(x + rng.normal(0, sigma, x.shape) * (x > 0.02), 0, 1)
        png = np.round(x * 255).astype(np.uint8)
        write_rgb_png(png, out / spec.name / vname / "fundus.png")
        records = []
        union = np.zeros(png.shape[:2], np.uint8)
        inv = tx.GetInverse()
        for les in lesions:
            if v == 0 or les.cid not in masks:
                continue
            full = np.zeros((FUNDUS_TRUE, FUNDUS_TRUE), np.float32)
            sl, m = masks[les.cid]
            full[sl] = m
            mv = to_visit(full) >= 0.5
            union |= mv.astype(np.uint8)
            c = np.array(grid.TransformPhysicalPointToContinuousIndex(inv.TransformPoint(les.centre.tolist())))
            records.append({"id": les.cid, "type": "new_lesion", "appearance": les.kind,
                            "centre_px": _r(c, 1), "centre_voxel": [int(round(v_)) for v_ in c],
                            "diameter_px": _r(2 * les.radius / s / zoom, 1),
                            "contrast_pct": _r(-100 * les.strength if les.kind == "haemorrhage"
                                               else 100 * les.strength, 1),
                            "area_px": int(mv.sum()), "mask_voxels": int(mv.sum()),
                            "extent_mm": _r(les.radius * les.axes.max() / s + 1, 2)})
        folder = out / "derivatives" / "changes" / spec.name / vname
        doc = {"set": "fundus", "patient": spec.name, "visit": vname, "date": spec.dates[v],
               "baseline": names[0], "is_baseline": v == 0, "image": f"{spec.name}/{vname}/fundus.png",
               "coordinates": "centre_px: (x, y) pixel of this visit's fundus.png (spacing 1, origin 0)",
               "grid": {"size": [FUNDUS_OUT, FUNDUS_OUT], "spacing": [1.0, 1.0], "origin": [0.0, 0.0],
                        "direction": [1.0, 0.0, 0.0, 1.0]},
               "changes": records,
               "nuisances": {"rotation_deg": _r(np.degrees(angle), 2), "translation_px": _r(shift / s, 2),
                             "zoom": _r(zoom), "gain": _r(gain), "gamma": _r(gamma),
                             "white_balance": _r(white), "noise_sigma": _r(sigma * 255, 2),
                             "blur_sigma_px": 0.5}}
        write_json(doc, folder / "changes.json")
        if v > 0:
            _atomic(folder / "changemask.png", lambda p, u=union: sitk.WriteImage(sitk.GetImageFromArray(u), str(p)))


def write_rgb_png(arr: np.ndarray, path: Path) -> None:
    _atomic(path, lambda p: sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=True), str(p)))


# --------------------------------------------------------------------------------------------------- driver


BUILDERS = {"easy": build_easy, "hard": build_hard, "dicom": build_dicom, "fundus": build_fundus}


def write_set_files(out: Path, set_name: str) -> None:
    """Dataset-level files (BIDS needs a description and a participants list)."""
    if set_name == "easy":
        write_json({"Name": "longitudinal sample studies, easy set (simulated from MNI ICBM152 2009a)",
                    "BIDSVersion": "1.9.0", "DatasetType": "raw",
                    "License": "see sample_studies/README.md (MNI ICBM152 template terms)"},
                   out / "dataset_description.json")
        write_text("participant_id\n" + "".join(f"{p.name}\n" for p in PATIENTS["easy"]),
                   out / "participants.tsv")
    write_json({"Name": f"ground truth of the {set_name} sample studies", "BIDSVersion": "1.9.0",
                "DatasetType": "derivative", "GeneratedBy": [{"Name": "sample_studies/build.py"}]},
               out / "derivatives" / "changes" / "dataset_description.json")


def build(out_dir: Path | str = ROOT, sets: Iterable[str] = SETS, patients: Iterable[str] | None = None) -> None:
    """(Re)build the given sets (all patients, or only ``patients``) under ``out_dir``.

    Building a whole set first deletes its folder, so no stale file survives a change of the spec.
    """
    out_dir = Path(out_dir)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    wanted = set(patients) if patients is not None else None
    for set_name in sets:
        if set_name not in BUILDERS:
            raise ValueError(f"unknown set {set_name!r}; sets are {SETS}")
        out = out_dir / set_name
        if wanted is None and out.exists():
            shutil.rmtree(out)
        for spec in PATIENTS[set_name]:
            if wanted is None or spec.name in wanted:
                t0 = time.time()
                BUILDERS[set_name](out, spec)
                LOG.info("built %s/%s in %.1f s", set_name, spec.name, time.time() - t0)
        write_set_files(out, set_name)


def tree_hashes(root: Path | str) -> dict[str, str]:
    """sha256 of every file under root (relative path -> hex), to compare two builds."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def summary_markdown(out_dir: Path | str = ROOT) -> str:
    """A table of every patient (visits, changes with sizes, nuisances, MB), read back from the written truth."""
    out_dir = Path(out_dir)
    lines = ["| set | patient | visits | changes vs first visit (diameter; contrast) | nuisances | MB |",
             "|---|---|---|---|---|---|"]
    for set_name in SETS:
        for spec in PATIENTS[set_name]:
            truth = out_dir / set_name / "derivatives" / "changes" / spec.name
            docs = [json.loads((truth / v / "changes.json").read_text()) for v in visit_names(spec, set_name)]
            unit = "px" if set_name == "fundus" else "mm"
            parts = []
            for d in docs[1:]:
                items = []
                for c in d["changes"]:
                    kind = c.get("appearance", c["type"].replace("_lesion", ""))
                    size = c.get(f"diameter_{unit}")
                    extra = (f", +{c['growth_radius_mm']:g} mm radius" if "growth_radius_mm" in c else
                             f", {c['thinning_mm']:g} mm thinning" if "thinning_mm" in c else "")
                    vol = f", {c['volume_mm3']} mm3 changed" if "volume_mm3" in c else ""
                    items.append(f"{c['id']} {kind} {size:g} {unit}{extra}{vol}; {c['contrast_pct']:+g} %; "
                                 f"{c['mask_voxels']} vox")
                parts.append(f"{d['visit']}: " + (", ".join(items) if items else "none"))
            nuis = []
            for d in docs:
                n = d["nuisances"]
                bits = [f"rot {max(abs(a) for a in np.atleast_1d(n['rotation_deg'])):.1f} deg"]
                if "gamma" in n and n["gamma"] != 1.0:
                    bits.append(f"gamma {n['gamma']:g}")
                if n.get("distortion_max_mm"):
                    bits.append(f"warp {n['distortion_max_mm']:g} mm")
                if n.get("slice_thickness_mm", 0) > 2:
                    bits.append(f"{n['slice_thickness_mm']:g} mm slices")
                if "direction" in n and not np.allclose(n["direction"], np.eye(3).ravel()):
                    bits.append("oblique")
                bits.append(f"noise {n['noise_sigma']:g}")
                nuis.append(" ".join([d["visit"] + ":"] + [", ".join(bits)]))
            files = [p for p in (out_dir / set_name).rglob("*") if p.is_file() and
                     (spec.name in p.parts or set_name == "dicom" and "derivatives" not in p.parts)]
            mb = sum(p.stat().st_size for p in files) / 1e6
            lines.append(f"| {set_name} | {spec.name} | {len(docs)} | {'<br>'.join(parts)} | "
                         f"{'<br>'.join(nuis)} | {mb:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT), help="output folder (default: sample_studies/ itself)")
    ap.add_argument("--sets", nargs="*", default=list(SETS), choices=SETS)
    ap.add_argument("--patients", nargs="*", default=None, help="only these patients (e.g. sub-03 P002)")
    ap.add_argument("--summary", action="store_true", help="print the README table of what is built, then exit")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary_markdown(args.out), end="")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    build(args.out, args.sets, args.patients)
    LOG.info("done in %.1f s", time.time() - t0)


if __name__ == "__main__":
    main()
