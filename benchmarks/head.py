"""A whole T1-weighted head around the skull-stripped MNI152 brain, random per patient (cohort generator).

Real scanners deliver whole heads: CSF around the brain, a dark skull with fatty marrow, scalp and subcutaneous
fat that are bright on T1, muscle of intermediate intensity, eyes (dark vitreous in bright orbital fat), sinuses,
a face, a neck with the spinal cord, and air. nilearn's MNI152 T1 is skull-stripped, so the head is built around
it from implicit shapes whose thickness and size vary smoothly and at random per patient. Two intensity
components are kept apart, ``other`` and ``fat``, because fat answers to the bias field and to protocol drift
differently from brain: the acquisition applies its own curve to each.

Coordinates: arrays are numpy (z, y, x) on an LPS grid with direction diag(-1, -1, 1) like the template; the
shape code works in RAS millimetres (x right, y anterior, z superior), which is what anatomy atlases quote.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_studies"))
import build as ss  # noqa: E402  (sample_studies/build.py: template loading, geometry helpers)

# RAS bounds (mm) of the head grid: vertex to below the chin, ear to ear, nose tip to occiput.
HEAD_BOUNDS_RAS = ((-92.0, 92.0), (-132.0, 116.0), (-178.0, 106.0))
FAT_REL = 1.2  # subcutaneous fat / white matter on a T1 (MPRAGE-like) image

# Tissue classes: (name, ``other`` intensity in template units (white matter = 220), fat fraction).
TISSUES: tuple[tuple[str, float, float], ...] = (
    ("air", 0.0, 0.0),
    ("skin", 125.0, 0.1),
    ("subcutaneous_fat", 15.0, 0.95),
    ("muscle", 100.0, 0.03),
    ("deep_fat", 20.0, 0.9),
    ("cortical_bone", 10.0, 0.0),
    ("marrow", 45.0, 0.55),
    ("csf", -1.0, 0.0),  # 0.75 x the patient's own (template) CSF value: no partial volume outside the brain
    ("vitreous", 22.0, 0.0),
    ("lens", 150.0, 0.0),
    ("sclera", 45.0, 0.0),
    ("orbital_fat", 12.0, 0.95),
    ("optic_nerve", 175.0, 0.0),
    ("mucosa", 120.0, 0.0),
    ("spinal_cord", 185.0, 0.0),
    ("vertebral_marrow", 60.0, 0.4),
    ("disc", 85.0, 0.0),
    ("tongue", 118.0, 0.08),
    ("artery", 12.0, 0.0),  # flow void
    ("vein", 45.0, 0.0),
    ("galea", 70.0, 0.0),
)
LABEL = {name: i for i, (name, _, _) in enumerate(TISSUES)}


@dataclass
class Head:
    """A patient's 1 mm (or ``spacing``) whole-head anatomy; arrays in numpy (z, y, x) order on ``ref``."""

    ref: sitk.Image
    other: np.ndarray  # every tissue but fat, template units (brain from the warped template)
    fat: np.ndarray  # the fat component, template units
    t1_brain: np.ndarray  # the warped template T1 (brain only): lesions and atrophy act on ``other`` through it
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray  # 0/1 brain mask: the truth of brain extraction
    strip: np.ndarray  # brain mask dilated by 2 mm: what a skull-stripping step keeps
    labels: np.ndarray  # uint8 tissue class outside the brain (TISSUES index); 255 inside the brain
    csf_value: float
    landmarks: dict[str, list[float]]  # RAS mm of the eyes, chin, cord: recorded in cohort.json
    shape: dict[str, float]  # the random shape parameters, recorded in cohort.json

    @property
    def csf(self) -> np.ndarray:
        return np.clip(self.brain - self.gm - self.wm, 0.0, 1.0)

    @property
    def head_mask(self) -> np.ndarray:
        return (self.labels != LABEL["air"]) | (self.brain > 0)


def head_grid(spacing: float) -> sitk.Image:
    """The empty LPS grid covering HEAD_BOUNDS_RAS at ``spacing`` mm (direction of the MNI template)."""
    (x0, x1), (y0, y1), (z0, z1) = HEAD_BOUNDS_RAS
    size = [int(round((hi - lo) / spacing)) + 1 for lo, hi in HEAD_BOUNDS_RAS]
    img = sitk.Image(size, sitk.sitkUInt8)
    img.SetSpacing([spacing] * 3)
    img.SetDirection([-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0])
    img.SetOrigin([-x0, -y0, z0])  # LPS of index 0: RAS (x0, y0, z0)
    return img


def ras_axes(ref: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable RAS coordinates (Z, Y, X) of a head grid's voxels (numpy order)."""
    nx, ny, nz = ref.GetSize()
    s = ref.GetSpacing()[0]
    ox, oy, oz = ref.GetOrigin()
    x = (-ox + s * np.arange(nx)).astype(np.float32)
    y = (-oy + s * np.arange(ny)).astype(np.float32)
    z = (oz + s * np.arange(nz)).astype(np.float32)
    return z[:, None, None], y[None, :, None], x[None, None, :]


def smooth_noise(ref: sitk.Image, rng: np.random.Generator, scale_mm: float) -> np.ndarray:
    """Smooth random field with unit standard deviation and correlation length about ``scale_mm``.

    White noise on a grid of scale/2 spacing, Gaussian-smoothed there and linearly interpolated: as smooth as a
    B-spline field for this purpose and ten times faster on a whole-head grid.
    """
    size = np.array(ref.GetSize())
    sp = np.array(ref.GetSpacing())
    step = scale_mm / 2
    n = np.ceil(size * sp / step).astype(int) + 3
    coarse = ndimage.gaussian_filter(rng.normal(size=n[::-1]), 1.0, mode="wrap").astype(np.float32)
    img = sitk.GetImageFromArray(coarse)
    img.SetSpacing([float(step)] * 3)
    d = np.array(ref.GetDirection()).reshape(3, 3)
    img.SetDirection(ref.GetDirection())
    img.SetOrigin((np.array(ref.GetOrigin()) - d @ np.full(3, step)).tolist())
    out = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                                               sitk.sitkFloat32))
    return (out - out.mean()) / max(float(out.std()), 1e-6)


def depth(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Euclidean distance (mm) of each mask voxel to the nearest voxel outside it: scipy's EDT, 5x faster."""
    img = sitk.GetImageFromArray((~mask).astype(np.uint8))
    img.SetSpacing([float(spacing)] * 3)
    d = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(d), 0.0).astype(np.float32)


def distance_outside(mask: np.ndarray, ref: sitk.Image) -> np.ndarray:
    """Euclidean distance (mm) to the mask for voxels outside it, 0 inside (Maurer, multi-threaded)."""
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(ref)
    d = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(d), 0.0).astype(np.float32)


def smax(a: np.ndarray, b: np.ndarray, k: float = 4.0) -> np.ndarray:
    """Smooth union of two implicit shapes (positive inside): a soft maximum with blending width k mm."""
    return (k * np.logaddexp(a / k, b / k)).astype(np.float32)


def ellipsoid(Z, Y, X, centre, semi, tilt_x_deg: float = 0.0, power: float = 2.0) -> np.ndarray:
    """Approximate signed distance (mm, positive inside) of an ellipsoid, optionally tilted about the x axis.

    ``power`` > 2 squares the horizontal (x, y) cross-section off, like a face seen from above.
    """
    dx, dy, dz = X - np.float32(centre[0]), Y - np.float32(centre[1]), Z - np.float32(centre[2])
    if tilt_x_deg:
        c, s = np.float32(np.cos(np.radians(tilt_x_deg))), np.float32(np.sin(np.radians(tilt_x_deg)))
        dy, dz = c * dy + s * dz, -s * dy + c * dz
    if power == 2.0:
        rho = np.sqrt((dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2)
    else:
        hor = (np.abs(dx / semi[0]) ** power + np.abs(dy / semi[1]) ** power) ** (2.0 / power)
        rho = np.sqrt(hor + (dz / semi[2]) ** 2)
    return ((1.0 - rho) * min(semi)).astype(np.float32)


def warped_template(rng: np.random.Generator, ref: sitk.Image) -> tuple[dict[str, np.ndarray], float]:
    """The template T1/GM/WM under a random smooth warp and scaling (as sample_studies), on the head grid.

    Returns the arrays and the mean scale factor (landmarks of the head scale with the brain).
    """
    tpl = ss.load_template()
    tref = tpl["t1"]
    size = np.array(tref.GetSize())
    centre = np.array(tref.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    bs = sitk.BSplineTransformInitializer(tref, [4, 4, 4], 3)
    bs.SetParameters(rng.normal(0.0, 2.0, len(bs.GetParameters())).tolist())
    scale = rng.uniform(0.95, 1.05, 3)
    aff = sitk.AffineTransform(3)
    aff.SetCenter(centre.tolist())
    aff.SetMatrix(np.diag(scale).ravel().tolist())
    warp = sitk.CompositeTransform([aff, bs])
    field_ref = sitk.Image([int(n) for n in np.ceil(size / 3) + 1], sitk.sitkFloat32)
    field_ref.SetSpacing([3.0] * 3)
    field_ref.SetOrigin(tref.GetOrigin())
    field_ref.SetDirection(tref.GetDirection())
    disp = sitk.DisplacementFieldTransform(sitk.TransformToDisplacementField(
        warp, sitk.sitkVectorFloat64, field_ref.GetSize(), field_ref.GetOrigin(), field_ref.GetSpacing(),
        field_ref.GetDirection()))
    # only the part of the head grid the warped template can reach is resampled (a third of the grid)
    corners = np.array([tref.TransformIndexToPhysicalPoint([int(i), int(j), int(k)])
                        for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    idx = np.array([ref.TransformPhysicalPointToContinuousIndex(c.tolist()) for c in corners])
    margin = 15.0 / ref.GetSpacing()[0]
    lo = np.clip(np.floor(idx.min(0) - margin), 0, None).astype(int)
    hi = np.minimum(np.ceil(idx.max(0) + margin).astype(int) + 1, np.array(ref.GetSize()))
    sub = sitk.Image([int(v) for v in hi - lo], sitk.sitkFloat32)
    sub.SetSpacing(ref.GetSpacing())
    sub.SetDirection(ref.GetDirection())
    sub.SetOrigin(ref.TransformIndexToPhysicalPoint([int(v) for v in lo]))
    shape = tuple(int(n) for n in ref.GetSize()[::-1])
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo[::-1], hi[::-1]))
    arr = {}
    for k, img in tpl.items():
        full = np.zeros(shape, np.float32)
        full[box] = sitk.GetArrayFromImage(sitk.Resample(img, sub, disp, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        arr[k] = full
    return arr, float(1.0 / np.mean(scale))


def make_head(rng: np.random.Generator, spacing: float = 1.0, whole_head: bool = True) -> Head:
    """One patient's head: warped template brain plus (if ``whole_head``) the head built around it."""
    ref = head_grid(spacing)
    arr, zoom = warped_template(rng, ref)
    t1 = arr["t1"]
    brain = t1 > 0.5
    brain = ndimage.binary_fill_holes(ndimage.binary_opening(brain, iterations=1))
    brain_f = brain.astype(np.float32)
    d_brain = distance_outside(brain, ref)
    strip = (d_brain <= 2.0).astype(np.float32)
    gm, wm = arr["gm"] * brain_f, arr["wm"] * brain_f
    t1 = t1 * (1.0 + rng.uniform(-0.05, 0.05) * gm)
    csf_in = np.clip(brain_f - gm - wm, 0, 1)
    csf_value = float(np.median(t1[(csf_in > 0.8) & brain]))
    labels = np.zeros(t1.shape, np.uint8)
    shape: dict[str, float] = {"brain_zoom": round(zoom, 4)}
    landmarks: dict[str, list[float]] = {}
    if whole_head:
        labels, shape_h, landmarks = _head_labels(rng, ref, brain, d_brain, zoom)
        shape.update(shape_h)
    labels[brain] = 255
    other_tab = np.array([0.75 * csf_value if v < 0 else v for _, v, _ in TISSUES] + [0.0] * (256 - len(TISSUES)),
                         np.float32)
    fat_tab = np.array([f for _, _, f in TISSUES] + [0.0] * (256 - len(TISSUES)), np.float32)
    fat_value = ss.WM_REF * FAT_REL * rng.uniform(0.93, 1.07)
    other = other_tab[labels]
    fat = fat_tab[labels] * fat_value
    if whole_head:
        tex = smooth_noise(ref, rng, 3.0)
        other *= 1.0 + 0.06 * tex
        fat *= 1.0 + 0.05 * smooth_noise(ref, rng, 4.0)
        # partial volume at tissue boundaries: the 1 mm anatomy is not a staircase of labels
        other = _blur(other, ref, 0.6 * spacing)
        fat = _blur(fat, ref, 0.6 * spacing)
    w = np.clip(t1 / csf_value, 0.0, 1.0)  # the template's own brain edge blends into the head's CSF
    other = np.where(brain, t1 + (1.0 - w) * other, other).astype(np.float32)
    fat = np.where(brain, 0.0, fat).astype(np.float32)
    shape["fat_value"] = round(float(fat_value), 1)
    return Head(ref, other, fat, t1.astype(np.float32), gm.astype(np.float32), wm.astype(np.float32), brain_f,
                strip, labels, csf_value, landmarks, shape)


def _blur(a: np.ndarray, ref: sitk.Image, sigma: float) -> np.ndarray:
    img = sitk.GetImageFromArray(a)
    img.CopyInformation(ref)
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, sigma)).astype(np.float32)


def _head_labels(rng: np.random.Generator, ref: sitk.Image, brain: np.ndarray, d_brain: np.ndarray,
                 zoom: float) -> tuple[np.ndarray, dict[str, float], dict[str, list[float]]]:
    """Tissue classes of everything outside the brain (implicit shapes, smoothly varying thickness)."""
    Z, Y, X = ras_axes(ref)
    L = LABEL
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    # brain centre (RAS): landmarks below are quoted for the template and scale with the patient's brain
    nz = np.argwhere(brain)
    sp = ref.GetSpacing()[0]
    c_idx = nz.mean(0)
    bc = np.array([X.ravel()[int(c_idx[2])], Y.ravel()[int(c_idx[1])], Z.ravel()[int(c_idx[0])]])
    bc_tpl = np.array([0.0, -22.1, 9.5])  # the unwarped template brain centroid
    face_scale = zoom * u(0.92, 1.08)

    def P(x: float, y: float, z: float, s: float = zoom) -> np.ndarray:  # template RAS -> this patient
        return bc + (np.array([x, y, z]) - bc_tpl) * s

    # --- smooth random thickness fields (mm)
    n1, n2, n3, n4 = (smooth_noise(ref, rng, s) for s in (30.0, 25.0, 20.0, 35.0))
    csf_t = np.clip(u(1.5, 2.5) + 0.8 * n1, 0.8, 4.0)
    skull_t = np.clip(u(5.0, 7.5) + 1.5 * n2, 3.0, 10.0)
    fat_t = np.clip(u(2.5, 5.0) + 1.3 * n3, 1.0, 8.0)
    skin_t = np.float32(u(1.5, 2.3))
    galea_t = np.float32(1.2)
    # temporalis muscle: thick on the sides of the skull above the ear, none at the vertex or occiput
    temporal = np.clip(1.6 - np.abs((Z - P(0, 0, 15)[2]) / 38.0) ** 2 - ((Y - P(0, -5, 0)[1]) / 45.0) ** 2,
                       0, 1) * np.clip((np.abs(X) - 35.0) / 25.0, 0, 1)
    temporal_t = (u(6.0, 11.0) * temporal).astype(np.float32)
    scalp_t = skin_t + fat_t + galea_t + temporal_t
    cranium = (csf_t + skull_t + scalp_t - d_brain).astype(np.float32)
    # --- face, nose, neck (implicit shapes, positive inside)
    fs = face_scale
    face_c = P(0, 30, -74, fs)
    face = ellipsoid(Z, Y, X, face_c, (u(66, 74) * fs, u(66, 72) * fs, u(58, 66) * fs), power=3.0)
    nose = ellipsoid(Z, Y, X, P(0, 88, -60, fs), (u(10, 13) * fs, u(12, 16) * fs, u(24, 28) * fs), -18.0)
    chin = ellipsoid(Z, Y, X, P(0, 62, -118, fs), (u(26, 32) * fs, u(22, 28) * fs, u(20, 26) * fs))
    cord_xy = _cord_line(brain, ref, Z)
    neck_y = P(0, -20, 0)[1]
    nrx, nry = u(54, 62) * fs, u(64, 72) * fs
    neck = np.minimum(((1 - np.sqrt((X / nrx) ** 2 + ((Y - neck_y) / nry) ** 2)) * min(nrx, nry)),
                      (P(0, 0, -62)[2] - Z)).astype(np.float32)
    outer = smax(smax(smax(cranium, face, 6.0), smax(nose, chin, 4.0), 4.0), neck, 8.0)
    outer = outer + 1.5 * n4
    labels = np.zeros(brain.shape, np.uint8)
    head = outer > 0
    labels[head] = L["muscle"]
    deep_fat = smooth_noise(ref, rng, 6.0) > u(1.0, 1.4)
    labels[head & deep_fat] = L["deep_fat"]
    labels[head & (outer < skin_t + fat_t + 1.0)] = L["subcutaneous_fat"]
    labels[head & (outer < skin_t)] = L["skin"]
    # cranial layers, outward from the brain
    skull_in, skull_out = csf_t, csf_t + skull_t
    in_scalp = (d_brain > skull_out) & (d_brain < skull_out + galea_t + temporal_t) & (outer >= skin_t + fat_t)
    labels[in_scalp] = L["galea"]
    labels[in_scalp & (temporal_t > 1.0) & (d_brain > skull_out + galea_t)] = L["muscle"]
    table = np.clip(u(1.2, 2.0) + 0.3 * n3, 0.8, 2.5)
    bone = (d_brain > skull_in) & (d_brain <= skull_out)
    labels[bone] = L["cortical_bone"]
    labels[bone & (d_brain > skull_in + table) & (d_brain < skull_out - table)] = L["marrow"]
    labels[(d_brain > 0) & (d_brain <= skull_in)] = L["csf"]
    # --- eyes and orbits (pushed down if the brain's CSF/skull shell reaches them); small structures are
    # drawn inside their own boxes (views of the full arrays), which keeps a head at about 10 s
    eye_r = u(11.0, 12.5)
    eyes = []
    for side in (-1.0, 1.0):
        c = P(side * u(30, 34), u(55, 61), u(-44, -39))
        while _value_at(d_brain, ref, c) < eye_r + 7.0 and c[2] > -80:
            c = c + np.array([0.0, 0.5, -1.0])
        eyes.append(c)
        orbit_c = c + np.array([-side * 2.0, -9.0, 0.0])
        sl, (z, y, x) = _local(Z, Y, X, orbit_c, 30.0)
        lab, db = labels[sl], d_brain[sl]
        orbit = ellipsoid(z, y, x, orbit_c, (17.0 * fs, 23.0 * fs, 16.0 * fs))
        outside_cranium = db > skull_out[sl] - 0.5
        lab[outside_cranium & (orbit > -2.0) & (orbit <= 0)] = L["cortical_bone"]
        lab[outside_cranium & (orbit > 0)] = L["orbital_fat"]
        # optic nerve: from the back of the eye towards the apex of the orbit
        apex = orbit_c + np.array([-side * 8.0, -20.0, 2.0])
        lab[_tube(z, y, x, c, apex, 2.2) & outside_cranium & (orbit > 0)] = L["optic_nerve"]
        e = ellipsoid(z, y, x, c, (eye_r, eye_r, eye_r))
        lab[e > 0] = L["sclera"]
        lab[e > 1.0] = L["vitreous"]
        lens = ellipsoid(z, y, x, c + np.array([0.0, eye_r - 3.0, 0.0]), (4.5, 2.0, 4.5))
        lab[lens > 0] = L["lens"]
    outside_skull = d_brain > skull_out
    # --- nasal cavity (septum, turbinates), maxillary and sphenoid sinuses, palate, tongue
    nasal_c = P(0, 66, -68, fs)
    sl, (z, y, x) = _local(Z, Y, X, nasal_c, 40.0)
    lab = labels[sl]
    nasal = ellipsoid(z, y, x, nasal_c, (13.0 * fs, 30.0 * fs, 24.0 * fs))
    cavity = outside_skull[sl] & (nasal > 0)
    turb = ndimage.gaussian_filter(rng.normal(size=lab.shape), 2.5 / ref.GetSpacing()[0])
    turb /= max(float(turb.std()), 1e-6)
    lab[cavity] = L["air"]
    lab[cavity & ((turb > 0.4) | (nasal < 2.0) | (np.abs(x - bc[0]) < 1.2))] = L["mucosa"]
    # ethmoid air cells between the orbits: air in thin bony septa
    eth = ellipsoid(z, y, x, P(0, 56, -46, fs), (11.0 * fs, 19.0 * fs, 11.0 * fs))
    cells = outside_skull[sl] & (eth > 0) & (lab != L["orbital_fat"]) & (lab != L["cortical_bone"])
    lab[cells] = L["cortical_bone"]
    lab[cells & (np.abs(turb) < 1.0) & (eth > 1.0)] = L["air"]
    for side in (-1.0, 1.0):
        mc = P(side * 27, 54, -74, fs)
        sl2, (z2, y2, x2) = _local(Z, Y, X, mc, 22.0)
        mx = ellipsoid(z2, y2, x2, mc, (13.0 * fs, 16.0 * fs, 16.0 * fs))
        lab2 = labels[sl2]
        m = outside_skull[sl2] & (mx > -1.5)
        lab2[m] = L["cortical_bone"]
        lab2[m & (mx > 0)] = L["mucosa"]
        lab2[m & (mx > u(1.0, 3.0))] = L["air"]
    sc = P(0, 22, -38)
    sl2, (z2, y2, x2) = _local(Z, Y, X, sc, 14.0)
    sph = ellipsoid(z2, y2, x2, sc, (11.0, 11.0, 9.0))
    labels[sl2][(d_brain[sl2] > csf_t[sl2] + 2.5) & (sph > 0)] = L["air"]
    palate_z = P(0, 0, -90, fs)[2]
    palate = (np.abs(z - palate_z) < 2.0) & (nasal > -15) & (face[sl] > 6) & (y > P(0, 30, 0, fs)[1])
    lab[palate & outside_skull[sl]] = L["marrow"]
    tc = P(0, 52, -104, fs)
    sl2, (z2, y2, x2) = _local(Z, Y, X, tc, 36.0)
    tongue = ellipsoid(z2, y2, x2, tc, (24.0 * fs, 32.0 * fs, 13.0 * fs))
    labels[sl2][tongue > 0] = L["tongue"]
    # mandible: a U of bone (cortex around marrow) from the chin back to the angles, rami going up
    jc = P(0, 26, 0, fs)
    jx, jy = 47.0 * fs, 64.0 * fs
    rho = np.sqrt(((X - jc[0]) / jx) ** 2 + ((Y - jc[1]) / jy) ** 2)
    jz0, jz1 = P(0, 0, -138, fs)[2], P(0, 0, -112, fs)[2]
    body = (rho > 0.84) & (rho < 1.0) & (Z > jz0) & (Z < jz1) & (Y > jc[1] - 8.0)
    ramus = (rho > 0.82) & (rho < 0.98) & (Z >= jz1) & (Z < P(0, 0, -82, fs)[2]) & (Y > jc[1] - 14.0) & \
        (Y < jc[1] + 4.0)
    jaw = (body | ramus) & head
    labels[jaw] = L["cortical_bone"]
    labels[jaw & (rho > 0.87) & (rho < 0.96) & (Z > jz0 + 2) & (Z < jz1 - 2)] = L["marrow"]
    # --- cervical spine, cord, airway, vessels
    cx, cy = cord_xy
    bottom = Z < P(0, 0, -70)[2]
    r_c = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2)
    by = cy + 17.0
    r_b = np.sqrt(((X - cx) / 10.0) ** 2 + ((Y - by) / 8.5) ** 2)
    level = np.mod(Z - u(0, 19), 19.0)
    vb = bottom & (r_b < 1.0) & (Z < P(0, 0, -82)[2])
    labels[vb] = L["cortical_bone"]
    labels[vb & (r_b < 0.8) & (level >= 5.0)] = L["vertebral_marrow"]
    labels[vb & (level < 4.0)] = L["disc"]
    neural_arch = bottom & (r_c >= 8.0) & (r_c < 11.5) & (Y < cy + 4.0) & (level >= 4.0)
    spinous = bottom & (np.abs(X - cx) < 3.0) & (Y < cy - 8) & (Y > cy - 30) & (level >= 6.0) & (level < 15.0)
    labels[(neural_arch | spinous) & head] = L["cortical_bone"]
    labels[spinous & head & (np.abs(X - cx) < 1.5) & (Y < cy - 12) & (Y > cy - 27)] = L["vertebral_marrow"]
    canal = (Z < P(0, 0, -55)[2]) & (r_c < 8.0) & ~brain
    labels[canal] = L["csf"]
    cord_r = np.clip(5.0 + (Z - P(0, 0, -100)[2]) / 15.0, 5.0, 7.0)
    labels[canal & (r_c < cord_r) & (Z < P(0, 0, -60)[2])] = L["spinal_cord"]
    ay = by + 18.0
    airway = bottom & (((X - cx) / 9.0) ** 2 + ((Y - ay) / 6.0) ** 2 < 1.0)
    labels[airway] = L["air"]
    nc = np.array([float(cx.mean()), float(ay.mean()) + 14.0, P(0, 0, -66)[2]])
    sl2, (z2, y2, x2) = _local(Z, Y, X, nc, 22.0)
    naso = ellipsoid(z2, y2, x2, nc, (11.0, 20.0, 8.0))
    labels[sl2][(naso > 0) & outside_skull[sl2]] = L["air"]
    for side in (-1.0, 1.0):
        art = bottom & ((X - cx - side * 21.0) ** 2 + (Y - by - 10.0) ** 2 < 3.5 ** 2)
        vein = bottom & ((X - cx - side * 28.0) ** 2 + (Y - by - 4.0) ** 2 < 5.0 ** 2)
        labels[art & head] = L["artery"]
        labels[vein & head] = L["vein"]
    labels[~head] = L["air"]
    labels[brain] = 0
    shape = {"face_scale": round(fs, 3), "eye_radius_mm": round(eye_r, 2),
             "csf_mm_mean": round(float(np.mean(csf_t[(d_brain > 0) & (d_brain < 3)])), 2),
             "skull_mm_mean": round(float(skull_t.mean()), 2), "scalp_fat_mm_mean": round(float(fat_t.mean()), 2)}
    chin_z = float(np.min(np.where(jaw.any(axis=(1, 2)))[0]) * ref.GetSpacing()[0] + Z.ravel()[0]) \
        if jaw.any() else float(jz0)
    landmarks = {"eye_left_ras": [round(float(v), 1) for v in eyes[0]],
                 "eye_right_ras": [round(float(v), 1) for v in eyes[1]],
                 "chin_z_ras": [round(chin_z, 1)], "brain_centre_ras": [round(float(v), 1) for v in bc]}
    return labels, shape, landmarks


def _local(Z, Y, X, centre: np.ndarray, half: float):
    """Slices of the box of half-size ``half`` mm around a RAS centre, and its broadcastable coordinates."""
    sl = []
    for axis, c in zip((X.ravel(), Y.ravel(), Z.ravel()), centre):
        lo, hi = np.searchsorted(axis, [c - half, c + half])
        sl.append(slice(int(lo), int(max(hi, lo + 1))))
    sx, sy, sz = sl
    return (sz, sy, sx), (Z[sz], Y[:, sy], X[..., sx])


def _value_at(a: np.ndarray, ref: sitk.Image, ras: np.ndarray) -> float:
    idx = np.round(ref.TransformPhysicalPointToContinuousIndex([-ras[0], -ras[1], ras[2]])).astype(int)[::-1]
    idx = np.clip(idx, 0, np.array(a.shape) - 1)
    return float(a[tuple(idx)])


def _tube(Z, Y, X, a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """Voxels within ``radius`` of the segment a-b (RAS mm)."""
    d = b - a
    L2 = float(d @ d)
    t = np.clip(((X - a[0]) * d[0] + (Y - a[1]) * d[1] + (Z - a[2]) * d[2]) / L2, 0, 1)
    return ((X - a[0] - t * d[0]) ** 2 + (Y - a[1] - t * d[1]) ** 2 + (Z - a[2] - t * d[2]) ** 2) < radius ** 2


def _cord_line(brain: np.ndarray, ref: sitk.Image, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) RAS of the cord centre per slice: continues the brainstem's lowest slice, with a mild lordosis."""
    Zr, Yr, Xr = ras_axes(ref)
    ks = np.where(brain.any(axis=(1, 2)))[0]
    k0 = int(ks.min())
    pts = np.argwhere(brain[k0: k0 + 3])
    x0 = float(Xr.ravel()[int(np.round(pts[:, 2].mean()))])
    y0 = float(Yr.ravel()[int(np.round(pts[:, 1].mean()))])
    z0 = float(Zr.ravel()[k0])
    dz = np.clip(z0 - Z, 0, None)
    y = y0 + 4.0 * np.sin(np.clip(dz / 90.0, 0, 1) * np.pi)  # cervical lordosis: mid-neck a little anterior
    return np.full_like(Z, x0, dtype=np.float64), y.astype(np.float64)


def render_mid_slices(volume: np.ndarray, path: Path, vmax: float | None = None,
                      spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
    """Axial, coronal and sagittal mid slices side by side (radiological-ish display) as a grey PNG.

    ``volume`` is numpy (z, y, x) of an LPS-like grid; slices are flipped so superior and anterior are up.
    """
    from skimage.io import imsave
    from skimage.transform import resize

    v = np.asarray(volume, np.float32)
    top = float(vmax) if vmax else float(np.percentile(v[v > 0], 99.5)) if (v > 0).any() else 1.0
    z, y, x = (n // 2 for n in v.shape)
    sz, sy, sx = spacing[2], spacing[1], spacing[0]
    views = [(v[z][::-1], sy, sx), (v[::-1, y, :], sz, sx), (v[::-1, :, x], sz, sy)]
    tiles = []
    for img, rs, cs in views:
        shape = (int(round(img.shape[0] * rs)), int(round(img.shape[1] * cs)))
        tiles.append(resize(img, shape, order=1, preserve_range=True))
    h = max(t.shape[0] for t in tiles)
    row = np.concatenate([np.pad(t, ((0, h - t.shape[0]), (0, 4))) for t in tiles], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(str(path), (np.clip(row / top, 0, 1) * 255).astype(np.uint8), check_contrast=False)


def main(argv: list[str] | None = None) -> None:
    """Render the mid slices (and a sagittal slice through an eye) of a few random heads, to look at them."""
    import argparse

    ap = argparse.ArgumentParser(description="render random whole heads to PNG")
    ap.add_argument("-o", "--out", required=True, help="folder for head<seed>.png and head<seed>_eye.png")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    args = ap.parse_args(argv)
    out = Path(args.out)
    for seed in args.seeds:
        h = make_head(np.random.default_rng(seed), 1.0, True)
        img = h.other + h.fat
        render_mid_slices(img, out / f"head{seed}.png")
        x = int(round(h.landmarks["eye_left_ras"][0] - HEAD_BOUNDS_RAS[0][0]))
        render_mid_slices(img[:, :, x - 1: x + 2], out / f"head{seed}_eye.png")
        print(out / f"head{seed}.png", h.shape)


if __name__ == "__main__":
    main()
