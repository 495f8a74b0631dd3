"""Registration on real anatomy (nilearn's MNI152 T1 at 2 mm, scikit-image's fundus photograph) with known transforms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from longitudinal.errors import InputError
from longitudinal.io import Image, Meta, load_image
from longitudinal.registration import Registration, RegistrationSettings, load_transform, register

MNI_REL = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _nilearn_file(rel: str) -> Path:
    nilearn = pytest.importorskip("nilearn", reason="nilearn not installed: its MNI152 T1 is the test anatomy")
    path = Path(nilearn.__file__).parent / rel
    if not path.exists():
        pytest.skip(f"nilearn installed without {rel}")
    return path


@pytest.fixture(scope="module")
def mni2() -> sitk.Image:
    """nilearn's MNI152 T1 (1 mm) smoothed and resampled to 2 mm: 99x117x95 voxels."""
    img = sitk.Cast(sitk.ReadImage(str(_nilearn_file(MNI_REL))), sitk.sitkFloat32)
    size = [int(math.ceil(s / 2)) for s in img.GetSize()]
    return sitk.Resample(sitk.SmoothingRecursiveGaussian(img, 0.85), size, sitk.Transform(), sitk.sitkLinear,
                         img.GetOrigin(), (2.0, 2.0, 2.0), img.GetDirection())


def _centre(img: sitk.Image):
    return img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])


def _moved(base: sitk.Image, g: sitk.Transform, seed: int = 0, noise: float = 0.0, shift_grid_mm: float = 3.0) -> sitk.Image:
    """The follow-up: base seen through g (follow-up point -> baseline point) on its own, shifted grid."""
    origin = np.array(base.GetOrigin()) + shift_grid_mm
    size = [s - 4 for s in base.GetSize()]
    out = sitk.Resample(base, size, g, sitk.sitkLinear, tuple(origin), base.GetSpacing(), base.GetDirection(), 0.0)
    if noise:
        arr = sitk.GetArrayFromImage(out)
        arr = arr + np.random.default_rng(seed).normal(0, noise, arr.shape).astype(np.float32)
        noisy = sitk.GetImageFromArray(np.clip(arr, 0, None))
        noisy.CopyInformation(out)
        out = noisy
    return out


def _brain_points(base: sitk.Image) -> np.ndarray:
    idx = np.argwhere(sitk.GetArrayViewFromImage(base) > 20)[:, ::-1]
    return np.array([base.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in idx[::7]])


def _tre(estimated: sitk.Transform, true: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    return np.array([np.linalg.norm(np.subtract(estimated.TransformPoint(tuple(p)), true.TransformPoint(tuple(p)))) for p in pts])


def _img(itk: sitk.Image, name: str) -> Image:
    return Image(itk, Meta(sources=(name,)))


def test_known_rigid_motion_is_recovered_within_half_a_millimetre(mni2):
    g = sitk.Euler3DTransform(_centre(mni2), math.radians(4), math.radians(-3), math.radians(5), (6.0, -4.0, 8.0))
    moving = _moved(mni2, g, noise=3.0)
    r = register(_img(mni2, "base.nii.gz"), _img(moving, "fu.nii.gz"))
    pts = _brain_points(mni2)
    before = _tre(sitk.Transform(3, sitk.sitkIdentity), g.GetInverse(), pts)
    err = _tre(r.transform, g.GetInverse(), pts)
    assert before.mean() > 8.0  # the motion was real
    assert err.mean() < 0.5, err.mean()
    assert np.percentile(err, 95) < 1.0
    assert not r.qc.suspect, r.qc.reasons
    assert r.qc.dice > 0.95 and r.qc.ncc > 0.9
    assert r.qc.metric < r.qc.identity_metric and r.qc.ncc > r.qc.identity_ncc
    assert r.qc.stages == ("rigid", "affine")
    # registered = follow-up on the baseline grid, matching the baseline
    assert r.registered.size == tuple(mni2.GetSize()) and r.registered.meta.sources == ("fu.nii.gz",)
    f = sitk.GetArrayFromImage(mni2)
    reg = r.registered.array
    brain = f > 20
    assert np.corrcoef(f[brain], reg[brain])[0, 1] > 0.95


def test_identity_pair_stays_put_and_is_not_suspect(mni2):
    noisy = _moved(mni2, sitk.Transform(3, sitk.sitkIdentity), seed=1, noise=3.0, shift_grid_mm=0.0)
    r = register(_img(mni2, "a.nii.gz"), _img(noisy, "b.nii.gz"))
    err = _tre(r.transform, sitk.Transform(3, sitk.sitkIdentity), _brain_points(mni2))
    assert err.mean() < 0.1, err.mean()
    assert not r.qc.suspect, r.qc.reasons
    assert r.qc.dice > 0.98


def test_registration_gives_the_same_bytes_whatever_the_process_thread_count(mni2):
    """The metric and optimiser run on `threads` (1); the pyramid's smoothing runs on the process's ITK threads
    and computes each voxel on its own: 1 or 2 of them, and run after run, the same transform and image."""
    from longitudinal.registration import itk_threads

    g = sitk.Euler3DTransform(_centre(mni2), 0.05, 0.0, -0.04, (3.0, 2.0, -5.0))
    moving = _moved(mni2, g, noise=2.0)
    runs = []
    for n in (1, 2, 2):
        with itk_threads(n):
            runs.append(register(_img(mni2, "a"), _img(moving, "b"), RegistrationSettings()))
    first = runs[0]
    for other in runs[1:]:
        assert other.transform.GetParameters() == first.transform.GetParameters()
        assert np.array_equal(sitk.GetArrayViewFromImage(other.registered.itk),
                              sitk.GetArrayViewFromImage(first.registered.itk))
        assert other.qc.metric == first.qc.metric and other.qc.dice == first.qc.dice


def test_rgb_photo_pair_is_recovered_and_stays_rgb():
    skimage = pytest.importorskip("skimage", reason="scikit-image not installed: its retina photograph is the 2D test image")
    path = Path(skimage.__file__).parent / "data" / "retina.jpg"
    rgb = sitk.ReadImage(str(path))  # real fundus photograph, 1411x1411 RGB
    assert rgb.GetNumberOfComponentsPerPixel() == 3
    small = sitk.Resample(sitk.SmoothingRecursiveGaussian(rgb, 2.0), [320, 320], sitk.Transform(), sitk.sitkLinear,
                          rgb.GetOrigin(), [s * 1411 / 320 for s in rgb.GetSpacing()], rgb.GetDirection())
    centre = _centre(small)
    g = sitk.Euler2DTransform(centre, math.radians(6), (25.0, -18.0))  # follow-up point -> baseline point
    moving = sitk.Resample(small, small, g, sitk.sitkLinear, 0.0)
    r = register(_img(small, "v1.png"), _img(moving, "v2.png"))
    assert r.registered.is_rgb and r.registered.itk.GetNumberOfComponentsPerPixel() == 3
    assert r.registered.itk.GetPixelID() == small.GetPixelID()
    gray = sitk.GetArrayFromImage(sitk.VectorIndexSelectionCast(small, 1))
    idx = np.argwhere(gray > 30)[:, ::-1][::25]
    pts = np.array([small.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in idx])
    err = _tre(r.transform, g.GetInverse(), pts)
    spacing = small.GetSpacing()[0]
    assert err.mean() < 0.5 * spacing, (err.mean(), spacing)
    assert not r.qc.suspect, r.qc.reasons


def test_saved_transform_reloads_and_resamples_identically(mni2, tmp_path):
    g = sitk.Euler3DTransform(_centre(mni2), 0.03, -0.02, 0.05, (4.0, -2.0, 3.0))
    moving = _moved(mni2, g)
    r = register(_img(mni2, "a"), _img(moving, "b"))
    out = r.save(tmp_path / "pair")
    assert sorted(p.name for p in out.iterdir()) == ["qc.json", "registered.nii.gz", "transform.tfm"]
    qc = json.loads((out / "qc.json").read_text())
    assert qc["suspect"] is False and qc["dice"] == pytest.approx(r.qc.dice) and qc["seconds"] > 0
    tx = load_transform(out / "transform.tfm")
    again = sitk.Resample(moving, mni2, tx, sitk.sitkLinear, 0.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(again), r.registered.array, atol=1e-4)
    saved = sitk.ReadImage(str(out / "registered.nii.gz"))
    np.testing.assert_allclose(sitk.GetArrayFromImage(saved), r.registered.array, atol=1e-4)
    assert not list(out.glob(".*"))  # no temp files left behind


def test_bspline_stage_saves_a_composite_that_reloads(mni2, tmp_path):
    g = sitk.Euler3DTransform(_centre(mni2), 0.03, 0.0, 0.02, (3.0, 1.0, -2.0))
    moving = _moved(mni2, g)
    s = RegistrationSettings(stages=("rigid", "affine", "bspline"), bspline_iterations=5)
    r = register(_img(mni2, "a"), _img(moving, "b"), s)
    assert r.qc.stages[-1] == "bspline" and r.transform.GetName() == "CompositeTransform"
    err = _tre(r.transform, g.GetInverse(), _brain_points(mni2))
    assert err.mean() < 0.7  # a bounded deformable stage must not wreck a rigid truth
    r.save(tmp_path)
    tx = load_transform(tmp_path / "transform.tfm")
    again = sitk.Resample(moving, mni2, tx, sitk.sitkLinear, 0.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(again), r.registered.array, atol=1e-3)
    # inverse direction: a baseline-grid map goes onto the follow-up grid and back
    back = r.to_fixed(r.to_moving(mni2, moving))
    brain = sitk.GetArrayFromImage(mni2) > 20
    assert np.corrcoef(sitk.GetArrayFromImage(back)[brain], sitk.GetArrayFromImage(mni2)[brain])[0, 1] > 0.97


def test_to_moving_puts_a_baseline_map_on_the_followup_grid(mni2):
    g = sitk.Euler3DTransform(_centre(mni2), 0.06, -0.04, 0.02, (5.0, -3.0, 4.0))
    moving = _moved(mni2, g)
    r = register(_img(mni2, "a"), _img(moving, "b"))
    # The baseline itself, taken to the follow-up grid, must look like the follow-up.
    on_moving = r.to_moving(_img(mni2, "a"), _img(moving, "b"))
    assert on_moving.size == tuple(moving.GetSize()) and on_moving.origin == moving.GetOrigin()
    m = sitk.GetArrayFromImage(moving)
    brain = m > 20
    assert np.corrcoef(m[brain], on_moving.array[brain])[0, 1] > 0.97
    # a label map survives nearest-neighbour resampling with its labels intact
    labels = sitk.Cast(sitk.GetImageFromArray((sitk.GetArrayFromImage(mni2) > 60).astype(np.uint8)), sitk.sitkUInt8)
    labels.CopyInformation(mni2)
    lab_m = r.to_moving(labels, moving, interpolator=sitk.sitkNearestNeighbor)
    assert set(np.unique(sitk.GetArrayFromImage(lab_m))) <= {0, 1}
    assert r.inverse.TransformPoint(r.transform.TransformPoint((1.0, 2.0, 3.0))) == pytest.approx((1.0, 2.0, 3.0), abs=1e-6)


def test_deliberately_wrong_result_is_flagged_suspect(mni2):
    g = sitk.Euler3DTransform(_centre(mni2), math.radians(25), math.radians(-12), math.radians(8), (8.0, -5.0, 10.0))
    moving = _moved(mni2, g)
    r = register(_img(mni2, "a"), _img(moving, "b"), RegistrationSettings(iterations=0))
    assert r.qc.suspect
    assert any("low" in reason for reason in r.qc.reasons), r.qc.reasons
    assert r.registered.size == tuple(mni2.GetSize())  # still returned, just marked


def test_extreme_affine_is_flagged(mni2):
    """A follow-up squashed by 35 % along one axis cannot be the same patient's anatomy: flag the affine."""
    squash = sitk.AffineTransform(3)
    squash.SetCenter(_centre(mni2))
    squash.SetMatrix((1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.35))  # follow-up point -> baseline point
    moving = _moved(mni2, squash, shift_grid_mm=0.0)
    r = register(_img(mni2, "a"), _img(moving, "b"))
    assert r.qc.suspect
    assert any("affine" in reason for reason in r.qc.reasons), r.qc.reasons


def test_non_overlapping_images_fail_with_both_file_names(mni2, tmp_path):
    far = sitk.Image(mni2)
    far.SetOrigin(tuple(np.array(mni2.GetOrigin()) + 5000.0))
    sitk.WriteImage(mni2, str(tmp_path / "baseline.nii.gz"))
    sitk.WriteImage(far, str(tmp_path / "followup.nii.gz"))
    with pytest.raises(InputError, match="do not overlap") as err:
        register(load_image(tmp_path / "baseline.nii.gz"), load_image(tmp_path / "followup.nii.gz"))
    assert "baseline.nii.gz" in str(err.value) and "followup.nii.gz" in str(err.value)


def test_constant_image_fails_naming_the_file(mni2, tmp_path):
    const = sitk.Image(mni2.GetSize(), sitk.sitkFloat32) + 7.0
    const.CopyInformation(mni2)
    sitk.WriteImage(const, str(tmp_path / "blank.nii.gz"))
    with pytest.raises(InputError, match="constant") as err:
        register(_img(mni2, "base.nii.gz"), load_image(tmp_path / "blank.nii.gz"))
    assert "blank.nii.gz" in str(err.value)


def test_dimension_mismatch_fails_clearly(mni2):
    slice2d = mni2[:, :, 40]
    with pytest.raises(InputError, match="dimension mismatch") as err:
        register(_img(mni2, "vol.nii.gz"), _img(slice2d, "slice.png"))
    assert "vol.nii.gz" in str(err.value) and "slice.png" in str(err.value)


def test_settings_validate_and_accept_toml_lists():
    s = RegistrationSettings(stages=["rigid"], shrink_factors=[2, 1], smoothing_sigmas_mm=[1, 0])
    assert s.stages == ("rigid",) and s.shrink_factors == (2, 1)
    with pytest.raises(ValueError):
        RegistrationSettings(stages=("warp",))
    with pytest.raises(ValueError):
        RegistrationSettings(shrink_factors=(4, 2), smoothing_sigmas_mm=(1.0,))


SAMPLES = Path(__file__).resolve().parent.parent / "sample_studies"


def _anatomy_tre(r: Registration, fixed: Image, a_fixed: sitk.Transform, a_moving: sitk.Transform) -> np.ndarray:
    """TRE through the studies' ground truth: each visit's to_anatomy.tfm maps its points to the patient's
    anatomy, so a correct fixed->moving transform T gives a_moving(T(p)) == a_fixed(p)."""
    arr = sitk.GetArrayFromImage(sitk.Cast(fixed.itk, sitk.sitkFloat32))
    thr = np.percentile(arr[arr > 0], 30)
    idx = np.argwhere(arr > thr)[::11][:, ::-1]
    pts = [fixed.itk.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in idx]
    return np.array([np.linalg.norm(np.subtract(a_moving.TransformPoint(r.transform.TransformPoint(p)),
                                                 a_fixed.TransformPoint(p))) for p in pts])


def test_sample_study_easy_pair_is_registered_to_its_ground_truth():
    sub = SAMPLES / "easy" / "sub-01"
    truth = SAMPLES / "easy" / "derivatives" / "changes" / "sub-01"
    files = [next((sub / s / "anat").glob("*_T1w.nii.gz"), None) if (sub / s / "anat").exists() else None
             for s in ("ses-01", "ses-02")]
    if None in files or not (truth / "ses-02" / "to_anatomy.tfm").exists():
        pytest.skip("sample_studies/easy/sub-01 not built")
    fixed, moving = load_image(files[0]), load_image(files[1])
    r = register(fixed, moving)
    err = _anatomy_tre(r, fixed, sitk.ReadTransform(str(truth / "ses-01" / "to_anatomy.tfm")),
                       sitk.ReadTransform(str(truth / "ses-02" / "to_anatomy.tfm")))
    assert err.mean() < 0.3 and np.percentile(err, 95) < 0.5, (err.mean(), np.percentile(err, 95))
    assert not r.qc.suspect, r.qc.reasons


def test_bspline_stage_absorbs_scanner_distortion_on_the_hard_sample_study():
    patient = SAMPLES / "hard" / "P002"
    truth = SAMPLES / "hard" / "derivatives" / "changes" / "P002"
    visits = sorted(p.name for p in patient.iterdir()) if patient.exists() else []
    if len(visits) < 2 or not (truth / visits[1] / "to_anatomy.tfm").exists():
        pytest.skip("sample_studies/hard/P002 not built")
    fixed, moving = load_image(patient / visits[0] / "t1.nii.gz"), load_image(patient / visits[1] / "t1.nii.gz")
    a_f = sitk.ReadTransform(str(truth / visits[0] / "to_anatomy.tfm"))
    a_m = sitk.ReadTransform(str(truth / visits[1] / "to_anatomy.tfm"))
    affine = _anatomy_tre(register(fixed, moving), fixed, a_f, a_m)
    deformable = _anatomy_tre(register(fixed, moving, RegistrationSettings(stages=("rigid", "affine", "bspline"))),
                              fixed, a_f, a_m)
    assert deformable.mean() < 0.8 * affine.mean(), (deformable.mean(), affine.mean())
    assert deformable.mean() < 0.4


def test_result_worse_than_identity_is_flagged(mni2):
    """A follow-up already aligned but carrying a big bright object (another field of view, a marker):
    intensity moments put the centres apart, and an unoptimised moments start is worse than doing nothing."""
    arr = sitk.GetArrayFromImage(mni2)
    arr[5:40, 5:45, 5:45] = arr.max()
    moving = sitk.GetImageFromArray(arr)
    moving.CopyInformation(mni2)
    r = register(_img(mni2, "a"), _img(moving, "b"), RegistrationSettings(init="moments", iterations=0))
    assert r.qc.suspect
    assert any("worse than identity" in reason for reason in r.qc.reasons), r.qc.reasons
    ok = register(_img(mni2, "a"), _img(moving, "b"))  # the default tries identity too and optimises
    assert ok.qc.metric <= ok.qc.identity_metric + 1e-3


def _sample_visits() -> list[Path]:
    from longitudinal.timeline import discover

    root = Path(__file__).resolve().parent.parent / "sample_studies"
    return [v.path for s in ("easy", "hard", "dicom", "fundus") for p in discover(root / s) for v in p.visits]


@pytest.mark.parametrize("path", _sample_visits(), ids=lambda p: "/".join(p.parts[-3:]))
def test_every_sample_visit_registers_to_itself_and_to_a_noisy_copy_as_identity(path):
    """The same scan, or the same scan with new noise, must land on identity (no scaling, no drift) every run:
    a registration that wanders off gives fake change everywhere."""
    from longitudinal.pipeline import for_image

    image = load_image(path)
    settings = for_image(image).registration
    arr = sitk.GetArrayFromImage(image.itk).astype(np.float32)
    scale = 0.03 * float(np.percentile(arr[arr > 0], 90))
    noisy = sitk.GetImageFromArray(arr + np.random.default_rng(1).normal(0, scale, arr.shape).astype(np.float32),
                                   isVector=image.is_rgb)
    noisy.CopyInformation(image.itk)
    pts = _brain_points(sitk.Cast(sitk.VectorIndexSelectionCast(image.itk, 1) if image.is_rgb else image.itk,
                                  sitk.sitkFloat32))
    identity = sitk.Transform(image.dim, sitk.sitkIdentity)
    for moving, runs in ((image, 1), (image.with_itk(noisy), 2)):
        results = [register(image, moving, settings) for _ in range(runs)]
        assert len({r.transform.GetParameters() for r in results}) == 1  # the same bytes every run
        r = results[0]
        assert not r.qc.suspect, r.qc.reasons
        # MI with linear interpolation favours a slight shift on a noisy copy (interpolation smooths the noise):
        # within a third of a voxel of identity is identity
        assert r.qc.max_scale < 1.005 and _tre(r.transform, identity, pts).max() < 0.35 * min(image.spacing)


def test_flattening_divides_out_broad_illumination_and_keeps_fine_structure():
    """registration.flatten_mm: a picture under two different broad illuminations (vignetting, gain) flattens
    to the same image inside its foreground, and its fine structure survives."""
    from longitudinal.registration import _flatten

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:160, :160].astype(np.float32)
    disc = (yy - 80) ** 2 + (xx - 80) ** 2 < 70 ** 2
    vessels = 100 + 40 * (np.sin(xx / 3.0) > 0.6) + rng.normal(0, 1, disc.shape)
    r2 = ((yy - 80) ** 2 + (xx - 80) ** 2) / 70.0 ** 2

    def picture(gain: float, vignette: float) -> sitk.Image:
        return sitk.GetImageFromArray((vessels * gain * (1 - vignette * r2) * disc).astype(np.float32))

    body = sitk.GetImageFromArray(disc.astype(np.uint8))
    raw_a, raw_b = picture(1.0, 0.1), picture(1.3, 0.4)
    a = sitk.GetArrayFromImage(_flatten(raw_a, body, 12.0))  # the generic-2d ratio: 50 mm on a 512-pixel picture
    b = sitk.GetArrayFromImage(_flatten(raw_b, body, 12.0))
    inner = (yy - 80) ** 2 + (xx - 80) ** 2 < 50 ** 2
    spread = lambda x, y: float(np.std(np.log(y[inner] / x[inner])))  # noqa: E731  how much the ratio varies
    before = spread(sitk.GetArrayFromImage(raw_a), sitk.GetArrayFromImage(raw_b))
    assert before > 0.05 and spread(a, b) < 0.1 * before, (before, spread(a, b))
    assert abs(np.median(b[inner] / a[inner]) - 1) < 0.02  # the gain is gone
    assert np.corrcoef(a[inner], vessels[inner])[0, 1] > 0.97
    assert not a[~disc].any()
