"""Masks and intensity harmonisation on real anatomy (nilearn's MNI152 T1 and tissue maps at 2 mm)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from longitudinal.errors import InputError
from longitudinal.io import Image, Meta
from longitudinal.masks import foreground_mask
from longitudinal.preprocessing import PreprocessingSettings, harmonise, match_resolution, n4_correct

DATA = "datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def _nilearn_2mm(kind: str) -> sitk.Image:
    nilearn = pytest.importorskip("nilearn", reason="nilearn not installed: its MNI152 T1 is the test anatomy")
    path = Path(nilearn.__file__).parent / DATA.format(kind)
    if not path.exists():
        pytest.skip(f"nilearn installed without {path.name}")
    img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    size = [int(math.ceil(s / 2)) for s in img.GetSize()]
    return sitk.Resample(sitk.SmoothingRecursiveGaussian(img, 0.85), size, sitk.Transform(), sitk.sitkLinear,
                         img.GetOrigin(), (2.0, 2.0, 2.0), img.GetDirection())


@pytest.fixture(scope="module")
def t1() -> sitk.Image:
    return _nilearn_2mm("t1")


@pytest.fixture(scope="module")
def wm(t1) -> np.ndarray:
    """White matter (probability > 0.9), where a T1 should be flat: the place to see a bias field."""
    prob = sitk.GetArrayFromImage(_nilearn_2mm("wm"))
    return prob > 0.9 * prob.max()  # the map's scale is not 0..1 in every nilearn release


def _like(ref: sitk.Image, arr: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(ref)
    return out


def _bias(shape) -> np.ndarray:
    """A smooth multiplicative field, 0.7 .. 1.4 across the head, like coil shading."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return np.exp(0.35 * x + 0.15 * y * z - 0.1 * z)


def test_foreground_mask_covers_the_brain_as_one_filled_component(t1):
    mask = foreground_mask(t1)
    m = sitk.GetArrayFromImage(mask) > 0
    brain = sitk.GetArrayFromImage(t1) > 15
    dice = 2 * (m & brain).sum() / (m.sum() + brain.sum())
    assert dice > 0.9
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(mask))
    assert labels.max() == 1  # largest component only
    filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(mask)) > 0
    assert (filled == m).all()  # ventricles are inside the mask, not holes
    assert mask.GetSize() == t1.GetSize() and mask.GetOrigin() == t1.GetOrigin()


def test_histogram_matching_makes_in_mask_quantiles_agree(t1):
    base = sitk.GetArrayFromImage(t1)
    # follow-up scanner: different gain, offset and a non-linear (gamma) response
    fu = 40.0 + 1.7 * 255.0 * (np.clip(base, 0, None) / 255.0) ** 0.8
    b_img, f_img = Image(t1), Image(_like(t1, fu))
    mask = foreground_mask(t1)
    inside = sitk.GetArrayFromImage(mask) > 0
    qs = np.linspace(5, 95, 19)
    before = np.abs(np.percentile(fu[inside], qs) - np.percentile(base[inside], qs)).max()
    hb, hf = harmonise(b_img, f_img, mask, PreprocessingSettings(harmonisation="histogram"))
    after = np.abs(np.percentile(hf.array[inside], qs) - np.percentile(hb.array[inside], qs)).max()
    spread = np.percentile(base[inside], 95) - np.percentile(base[inside], 5)
    assert before > 0.3 * spread
    assert after < 0.03 * spread, (after, spread)
    np.testing.assert_allclose(hb.array, base, atol=1e-3)  # the baseline is the reference: unchanged
    # the map is monotone, so the anatomy's ordering is kept
    assert np.corrcoef(hf.array[inside], base[inside])[0, 1] > 0.99


def test_zscore_centres_both_visits_robustly(t1):
    base = sitk.GetArrayFromImage(t1)
    fu = 3.0 * base + 100.0
    mask = foreground_mask(t1)
    inside = sitk.GetArrayFromImage(mask) > 0
    hb, hf = harmonise(Image(t1), Image(_like(t1, fu)), mask, PreprocessingSettings(harmonisation="zscore"))
    for arr in (hb.array[inside], hf.array[inside]):
        q25, med, q75 = np.percentile(arr, [25, 50, 75])
        assert abs(med) < 1e-3 and abs((q75 - q25) - 1.0) < 1e-3
    np.testing.assert_allclose(hb.array[inside], hf.array[inside], atol=1e-3)


def test_n4_reduces_a_known_bias_field(t1, wm):
    base = sitk.GetArrayFromImage(t1)
    field = _bias(base.shape)
    biased = Image(_like(t1, base * field))
    mask = foreground_mask(t1)
    corrected = n4_correct(biased, mask).array
    # how far each white-matter voxel is from the unbiased truth, after removing a global gain
    def residual(arr):
        r = np.log(np.clip(arr[wm], 1e-3, None) / np.clip(base[wm], 1e-3, None))
        return float(np.std(r))

    assert residual(base * field) > 0.08
    assert residual(corrected) < 0.35 * residual(base * field), (residual(corrected), residual(base * field))
    cv = lambda a: float(np.std(a[wm]) / np.mean(a[wm]))  # noqa: E731
    assert cv(corrected) < cv(base * field)


def test_harmonise_with_n4_then_histogram(t1):
    base = sitk.GetArrayFromImage(t1)
    fu = 1.3 * base * _bias(base.shape)
    mask = foreground_mask(t1)
    inside = sitk.GetArrayFromImage(mask) > 0
    s = PreprocessingSettings(n4=True, harmonisation="histogram")
    hb, hf = harmonise(Image(t1), Image(_like(t1, fu)), mask, s)
    diff_before = np.abs(fu - base)[inside].mean()
    diff_after = np.abs(hf.array - hb.array)[inside].mean()
    assert diff_after < 0.3 * diff_before, (diff_after, diff_before)


def test_ct_keeps_hounsfield_units_and_uses_the_window():
    hu = np.linspace(-1200, 1500, 8 * 8 * 8).reshape(8, 8, 8)
    img = sitk.GetImageFromArray(hu.astype(np.float32))
    ct = Image(img, Meta(modality="CT"))
    fu = Image(sitk.GetImageFromArray((hu + 10).astype(np.float32)), Meta(modality="CT"))
    s = PreprocessingSettings(ct_window=(-100.0, 300.0))
    hb, hf = harmonise(ct, fu, None, s)
    expected = (np.clip(hu, -100, 300) + 100) / 400
    np.testing.assert_allclose(hb.array, expected, atol=1e-6)
    np.testing.assert_allclose(hf.array, (np.clip(hu + 10, -100, 300) + 100) / 400, atol=1e-6)
    # NIfTI CT carries no modality: the pipeline can say so
    plain = Image(img), Image(sitk.GetImageFromArray((hu + 10).astype(np.float32)))
    hb2, _ = harmonise(*plain, None, PreprocessingSettings(ct_window=(-100.0, 300.0), ct=True))
    np.testing.assert_allclose(hb2.array, expected, atol=1e-6)
    hb3, _ = harmonise(*plain, None, PreprocessingSettings(harmonisation="none"))
    np.testing.assert_allclose(hb3.array, hu, atol=1e-3)  # not CT: HU left alone


def test_rgb_photos_are_matched_per_channel():
    skimage = pytest.importorskip("skimage", reason="scikit-image not installed: its retina photograph is the 2D test image")
    rgb = sitk.ReadImage(str(Path(skimage.__file__).parent / "data" / "retina.jpg"))
    small = sitk.Shrink(rgb, [6, 6])
    arr = sitk.GetArrayFromImage(small).astype(np.float32)
    darker = arr * np.array([0.7, 0.9, 1.2], dtype=np.float32)  # a camera with another white balance
    fu = sitk.GetImageFromArray(darker, isVector=True)
    fu.CopyInformation(small)
    mask = foreground_mask(small)
    inside = sitk.GetArrayFromImage(mask) > 0
    hb, hf = harmonise(Image(small), Image(fu), mask)
    assert hf.is_rgb and hb.is_rgb
    for c in range(3):
        a, b = hf.array[..., c][inside], hb.array[..., c][inside]
        assert abs(np.median(a) - np.median(b)) < 2.0


def test_harmonise_refuses_a_followup_off_the_baseline_grid(t1):
    other = sitk.Image(t1)
    other.SetOrigin(tuple(np.array(t1.GetOrigin()) + 5.0))
    with pytest.raises(InputError, match="not on the baseline grid") as err:
        harmonise(Image(t1), Image(other, Meta(sources=("fu.nii.gz",))))
    assert "fu.nii.gz" in str(err.value)


def test_settings_validate():
    with pytest.raises(ValueError):
        PreprocessingSettings(harmonisation="magic")
    with pytest.raises(ValueError):
        PreprocessingSettings(ct_window=(300, -100))
    assert PreprocessingSettings(ct_window=[-1000, 400]).ct_window == (-1000.0, 400.0)


def test_local_correction_removes_a_gamma_change_under_a_bias_field_but_keeps_a_lesion(t1):
    """A follow-up with another intensity curve (gamma 1.2) under another coil shading, plus a -30 % lesion:
    histogram matching alone leaves tissue-dependent and smooth differences of several percent; the local
    correction removes them and leaves the lesion's full contrast."""
    a = sitk.GetArrayFromImage(t1)
    mask = foreground_mask(t1)
    inside = sitk.GetArrayFromImage(mask) > 0
    wm_level = float(np.percentile(a[inside], 90))
    z, y, x = np.indices(a.shape)
    centre = np.array(a.shape) // 2 + np.array([5, 10, 12])
    lesion = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= 3 ** 2  # 12 mm at 2 mm voxels
    assert inside[lesion].all()
    truth_f = np.where(lesion, 0.7 * a, a)
    f = wm_level * (np.maximum(truth_f, 0) / wm_level) ** 1.2 * _bias(a.shape)
    settings = PreprocessingSettings(n4=False)
    _, matched = harmonise(Image(t1, Meta()), Image(_like(t1, f), Meta()), mask,
                           PreprocessingSettings(n4=False, local_correction_mm=0.0))
    _, corrected = harmonise(Image(t1, Meta()), Image(_like(t1, f), Meta()), mask, settings)
    tissue = inside & (a > 0.2 * wm_level) & ~ndimage.binary_dilation(lesion, iterations=3)

    def residual(img):
        r = np.log(np.maximum(img.array, 1e-3)) - np.log(np.maximum(a, 1e-3))
        return r[tissue]

    before, after = residual(matched), residual(corrected)
    assert np.percentile(np.abs(after), 90) < 0.4 * np.percentile(np.abs(before), 90), (
        np.percentile(np.abs(before), 90), np.percentile(np.abs(after), 90))
    ratio = np.median(corrected.array[lesion] / np.maximum(a[lesion], 1e-3))
    assert 0.62 < ratio < 0.78, ratio  # the lesion's -30 % stays (within the gamma it was drawn with)


def test_match_resolution_makes_a_thick_slice_followup_and_the_baseline_agree(t1):
    """The follow-up is the same anatomy acquired with 6 mm slices (2 mm baseline): after registration the two
    differ at every edge across the slices; with the baseline brought to the follow-up's resolution they agree
    much better. Beyond the follow-up's field of view the round trip has nothing to bring back: the baseline
    stays there (blurred like the rest), never zero."""
    thick = sitk.Resample(sitk.SmoothingRecursiveGaussian(t1, [0.1, 0.1, 6.0 / math.sqrt(12)]),
                          [t1.GetSize()[0], t1.GetSize()[1], t1.GetSize()[2] // 3 - 4], sitk.Transform(),
                          sitk.sitkLinear, t1.TransformIndexToPhysicalPoint((0, 0, 6)), (2.0, 2.0, 6.0),
                          t1.GetDirection())
    baseline, followup = Image(t1, Meta()), Image(thick, Meta())
    from longitudinal.registration import Registration, RegistrationQC

    identity = sitk.Euler3DTransform()
    registered = followup.with_itk(sitk.Resample(thick, t1, identity, sitk.sitkLinear, 0.0))
    qc = RegistrationQC(0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, ("rigid",), "geometry", False)
    reg = Registration(identity, registered, qc, t1)
    matched_b, matched_f = match_resolution(baseline, followup, reg)
    inside = (sitk.GetArrayFromImage(foreground_mask(t1)) > 0)
    covered = inside & (sitk.GetArrayFromImage(sitk.Resample(thick * 0 + 1, t1, identity, sitk.sitkLinear, 0.0)) > 0.999)

    def error(b):
        return float(np.sqrt(np.mean((b[covered] - registered.array[covered]) ** 2)))

    assert error(matched_b.array) < 0.5 * error(sitk.GetArrayFromImage(t1)), (error(matched_b.array), error(sitk.GetArrayFromImage(t1)))
    np.testing.assert_array_equal(matched_f.array, registered.array)  # the follow-up is the coarser one: as it was
    outside = inside & ~covered
    assert outside.any()
    original = sitk.GetArrayFromImage(t1)[outside]
    assert np.median(matched_b.array[outside] / np.maximum(original, 1e-3)) > 0.8


def test_local_correction_fitted_on_a_lattice_matches_the_full_fit(t1, monkeypatch):
    """Large images fit the curve and field on every k-th voxel: the correction must not change by it."""
    import longitudinal.preprocessing as preprocessing

    a = sitk.GetArrayFromImage(t1)
    rng = np.random.default_rng(7)
    f = _like(t1, 200 * (np.maximum(a, 0) / 200) ** 1.15 * _bias(a.shape) + rng.normal(0, 2, a.shape))
    mask = foreground_mask(t1)
    settings = PreprocessingSettings(local_correction_mm=16.0)  # at 2 mm voxels a lattice of 4 mm is allowed
    full = sitk.GetArrayFromImage(preprocessing.local_correction(f, t1, mask, settings))
    monkeypatch.setattr(preprocessing, "LOCAL_WORK_VOXELS", a.size // 8)  # forces a lattice of every 2nd voxel
    lattice = sitk.GetArrayFromImage(preprocessing.local_correction(f, t1, mask, settings))
    tissue = (sitk.GetArrayFromImage(mask) > 0) & (a > 0.1 * a.max())
    change = np.abs(np.log(np.maximum(lattice, 1e-3) / np.maximum(full, 1e-3)))[tissue]
    assert np.percentile(change, 99) < 0.005, np.percentile(change, 99)
    assert not np.array_equal(lattice, full)  # the lattice path did run


def test_brain_mask_gives_the_same_bytes_whatever_the_process_thread_count(t1):
    """The template's fit runs its metric on one ITK thread: with the process's two, its sums changed order and
    a whole head's brain mask, and every figure after it, changed from one run of the same compare to the next."""
    from longitudinal.masks import MaskSettings, brain_mask
    from longitudinal.registration import itk_threads

    centre = t1.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in t1.GetSize()])
    moved = sitk.Resample(t1, t1, sitk.Euler3DTransform(centre, 0.08, -0.05, 0.1, (4.0, -3.0, 6.0)),
                          sitk.sitkLinear, 0.0)
    runs = []
    for n in (1, 2, 2, 2):
        with itk_threads(n):
            runs.append(brain_mask(moved, MaskSettings(brain=True)))
    first = sitk.GetArrayFromImage(runs[0].mask)
    assert first.any()
    for other in runs[1:]:
        assert other.metric == runs[0].metric
        assert np.array_equal(sitk.GetArrayFromImage(other.mask), first)
