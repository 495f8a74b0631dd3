"""Scoring: vectorised region statistics, detector round trip, calibration on null data, a synthetic lesion."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from longitudinal.errors import InputError
from longitudinal.pipeline import available, load
from longitudinal.preprocessing import local_correction
from longitudinal.regions import RegionSettings, component_regions, grid_regions
from longitudinal.scoring import (ChangeDetector, ScoringSettings, TailCalibration, change_maps, combined_change,
                                  feature_names, intensity_change, region_features, region_max_map, score_pair,
                                  score_regions)

SAMPLES = Path(__file__).resolve().parent.parent / "sample_studies"


def _grid(shape, mask, size_mm=4.0, spacing=(1.0, 1.0, 1.0)):
    ref = sitk.Image(list(reversed(shape)), sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    return grid_regions(ref, mask, RegionSettings(size_mm=size_mm, overlap=0.5, min_mask_fraction=0.2))


def test_region_features_match_a_plain_loop():
    rng = np.random.default_rng(0)
    shape = (13, 17, 11)  # not multiples of the cube edge: some cubes are cut by the image edge
    mask = np.zeros(shape, bool)
    mask[1:12, 2:16, 1:10] = True
    mask[5:8, 5:9, 3:6] = False
    maps = {"a": rng.normal(size=shape).astype(np.float32), "b": rng.gamma(2, size=shape).astype(np.float32)}
    regions = _grid(shape, mask)
    X = region_features(maps, regions, mask, None)
    for i, r in enumerate(regions):
        members = r.members(mask)
        for j, values in enumerate(maps.values()):
            v = values[r.slices()][members]
            assert X[i, 2 * j] == pytest.approx(v.mean(), abs=1e-4)
            assert X[i, 2 * j + 1] == pytest.approx(v.max(), abs=1e-6)


def test_region_max_map_matches_a_plain_loop():
    rng = np.random.default_rng(1)
    shape = (12, 14, 10)
    mask = np.ones(shape, bool)
    mask[:, :, :2] = False
    regions = _grid(shape, mask)
    values = rng.normal(size=len(regions))
    expected = np.full(shape, -np.inf)
    for r, v in zip(regions, values):
        view = expected[r.slices()]
        view[r.members(mask)] = np.maximum(view[r.members(mask)], v)
    expected[~np.isfinite(expected)] = 0.0
    np.testing.assert_allclose(region_max_map(regions, values, mask, None), expected, atol=1e-6)


@pytest.mark.parametrize("rate", [0.01, 0.001])
def test_tail_calibration_false_alarm_rate_on_null_data(rate):
    rng = np.random.default_rng(2)
    for sample in (rng.gamma(2.0, size=(2, 200_000)), np.abs(rng.standard_t(4, size=(2, 200_000)))):
        cal = TailCalibration.fit(sample[0])
        flagged = np.mean(cal.score(sample[1]) > -np.log10(rate))  # fresh null data
        assert rate / 2 < flagged < rate * 2, (rate, flagged)


def test_tail_calibration_scores_grow_beyond_the_null():
    cal = TailCalibration.fit(np.random.default_rng(3).exponential(size=5000))
    s = cal.score(np.array([1.0, 5.0, 10.0, 50.0, 500.0]))
    assert np.all(np.diff(s) > 0) and np.all(np.isfinite(s))


@pytest.mark.parametrize("detector", ["ocsvm", "iforest"])
def test_detector_round_trip(tmp_path, detector):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(800, 4))
    det = ChangeDetector(ScoringSettings(detector=detector, max_fit_regions=300)).fit(X, ("a", "b", "c", "d"))
    Y = np.vstack([rng.normal(size=(50, 4)), rng.normal(6.0, 1.0, size=(5, 4))])
    path = tmp_path / "model.npz"
    det.save(path)
    loaded = ChangeDetector.load(path)
    np.testing.assert_array_equal(det.score_samples(Y), loaded.score_samples(Y))
    assert loaded.feature_names_ == ("a", "b", "c", "d") and loaded.settings == det.settings
    assert det.score_samples(Y)[50:].min() > np.percentile(det.score_samples(Y)[:50], 90)


def test_detector_load_rejects_other_files(tmp_path):
    bad = tmp_path / "model.npz"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="model.npz"):
        ChangeDetector.load(bad)


def _sample_pair(lesion: bool, seed: int):
    """A real brain crop (sample study baseline) and a follow-up with new noise, gain and a smooth bias."""
    image = sitk.ReadImage(str(SAMPLES / "easy/sub-03/ses-01/anat/sub-03_ses-01_T1w.nii.gz"), sitk.sitkFloat32)
    b = sitk.GetArrayFromImage(image)
    c = np.array(b.shape) // 2
    b = b[c[0] - 32:c[0] + 32, c[1] - 40:c[1] + 40, c[2] - 32:c[2] + 32]
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in b.shape], indexing="ij")
    f = b * 1.05 * (1 + 0.05 * x) + rng.normal(0, 1.5, b.shape)
    b = b + rng.normal(0, 1.5, b.shape)
    truth = np.zeros(b.shape, bool)
    if lesion:
        truth = (z * 32) ** 2 + (y * 40 - 5) ** 2 + (x * 32 + 6) ** 2 <= 3.5 ** 2  # 7 mm sphere
        f = np.where(truth, f * 0.6, f)
    mask = ndimage.binary_fill_holes(ndimage.gaussian_filter(b, 1) > 20)
    # scoring sees harmonised visits: the smooth gain and bias go in preprocessing, as in `compare`
    b_itk, f_itk, m_itk = (sitk.GetImageFromArray(a.astype(t)) for a, t in ((b, np.float32), (f, np.float32), (mask, np.uint8)))
    f = sitk.GetArrayFromImage(local_correction(f_itk, b_itk, m_itk))
    return b.astype(np.float32), f.astype(np.float32), mask, truth


def test_a_synthetic_lesion_is_the_one_finding_and_is_outlined_at_its_size():
    from longitudinal.compare import findings_of, scored_mask

    b, f, mask, truth = _sample_pair(True, 5)
    s = dataclasses.replace(load("brain-mri").scoring, maps=("intensity",))  # the shipped settings
    mask = scored_mask(mask, (1.0, 1.0, 1.0), s.edge_margin_mm)  # as compare scores: away from the crop's edge
    regions = _grid(b.shape, mask, size_mm=8.0)
    maps = change_maps(b, f, None, None, mask, (1.0, 1.0, 1.0), s)
    X = region_features(maps.maps, regions, mask, None)
    scores = score_regions(X, feature_names(maps.maps), regions, mask, None, (1.0, 1.0, 1.0), s)
    assert scores.voxel_map[truth].max() == pytest.approx(scores.region_scores.max())
    found, pair_score = findings_of(scores, regions, None, mask, maps, b, f, (1.0, 1.0, 1.0), s)
    assert [bool(truth[tuple(x.voxels.T)].any()) for x in found] == [True]  # the lesion, and nothing else
    lesion = found[0]
    assert pair_score == lesion.score > scores.threshold
    assert 0.7 < lesion.volume_mm3 / truth.sum() < 1.3  # the changed tissue, not the region cube (512 mm3)
    assert 6.0 <= lesion.diameter_mm <= 9.0 and -45 < lesion.mean_change_pct < -25  # a 7 mm sphere at -40 %


@pytest.mark.parametrize("findings", [5.0, 0.5])
def test_null_pair_flags_about_the_false_alarm_rate(findings):
    """The per-region rate is the expected false findings over the independent regions (overlapping cubes
    share voxels: about 8 cubes per place at half overlap); a null pair flags regions at that rate."""
    b, f, mask, _ = _sample_pair(False, 6)
    regions = _grid(b.shape, mask, size_mm=8.0)
    s = ScoringSettings(maps=("intensity", "subtraction"), false_findings_per_pair=findings)
    scores = score_pair(b, f, None, None, mask, (1.0, 1.0, 1.0), regions, None, s)
    assert 6 < len(regions) / scores.n_independent < 10
    rate = scores.false_alarm_rate
    assert rate == pytest.approx(findings / scores.n_independent)
    frac = float(np.mean(scores.region_scores > scores.threshold))
    assert rate / 3 < frac < rate * 3, frac


def test_component_regions_make_a_synthetic_lesion_one_region_that_scores_highest():
    b, f, mask, truth = _sample_pair(True, 5)
    settings = ScoringSettings(maps=("intensity",), false_findings_per_pair=0.05)
    maps = change_maps(b, f, None, None, mask, (1.0, 1.0, 1.0), settings).maps
    ref = sitk.GetImageFromArray(b)
    regions, labels = component_regions(ref, mask, combined_change(maps), RegionSettings(kind="components"))
    assert len(regions) >= 20  # noise blobs: the null the detector learns from
    values, counts = np.unique(labels[truth & (labels > 0)], return_counts=True)
    lesion = int(values[np.argmax(counts)])
    member = labels == lesion
    assert (member & truth).sum() >= 0.5 * truth.sum()  # most of the lesion is in one component
    assert member.sum() <= 8 * truth.sum()  # the maps pool over ~2 mm: a strong lesion's blob reaches ~2 mm beyond it
    region = next(r for r in regions if r.value == lesion)
    assert region.volume_mm3 == pytest.approx(float(member.sum()))
    X = region_features(maps, regions, mask, labels)
    scores = score_regions(X, feature_names(maps), regions, mask, labels, (1.0, 1.0, 1.0), settings)
    assert int(np.argmax(scores.region_scores)) == regions.index(region)
    assert scores.flagged_mask[truth].any()


def test_surround_keeps_a_compact_lesion_above_broad_shading():
    """A 5 mm lesion at -12 % and a broad -4 % shading patch (Gaussian, 5 mm SD) under 3 % noise: pooled alone,
    the shading stands out more than the lesion; less its 3 mm surround, the lesion does."""
    rng = np.random.default_rng(0)
    shape = (64, 64, 64)
    z, y, x = np.indices(shape)
    shading = np.exp(-((z - 20) ** 2 + (y - 32) ** 2 + (x - 32) ** 2) / (2 * 5.0 ** 2))
    lesion = (z - 44) ** 2 + (y - 32) ** 2 + (x - 32) ** 2 <= 2.5 ** 2
    b = np.full(shape, 100.0)
    f = b * (1 - 0.04 * shading) * np.where(lesion, 0.88, 1.0)
    b, f = (a + rng.normal(0, 3, shape) for a in (b, f))
    mask = np.zeros(shape, bool)
    mask[4:-4] = True
    peaks = {}
    for surround in (0.0, 3.0):
        m = intensity_change(b.astype(np.float32), f.astype(np.float32), mask, (1.0, 1.0, 1.0),
                             ScoringSettings(surround_mm=surround))[0]
        peaks[surround] = (m[40:49, 28:37, 28:37].max(), m[10:31, 22:43, 22:43].max())
    assert peaks[0.0][1] > peaks[0.0][0]  # the problem: shading outscores the lesion
    assert peaks[3.0][0] > 1.4 * peaks[3.0][1]  # the surround: the lesion outscores the shading
    with pytest.raises(ValueError, match="surround_mm"):
        ScoringSettings(surround_mm=1.0)  # not wider than pool_mm: no surround at all


def test_a_pickle_payload_named_as_the_normative_model_runs_nothing(tmp_path, capsys):
    """A pipeline file naming a pickled 'model' must not run its code (pickle.load would)."""
    import pickle

    from longitudinal import cli

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = tmp_path / "model.pkl"
    model.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError, match="never loaded"):
        ChangeDetector.load(model)
    pipeline = tmp_path / "evil.toml"
    text = available()["brain-mri"].read_text()
    pipeline.write_text(text.replace("[scoring]\n", f"[scoring]\nnormative_model = \"{model}\"\n"))
    base = SAMPLES / "easy/sub-03/ses-01/anat/sub-03_ses-01_T1w.nii.gz"
    follow = SAMPLES / "easy/sub-03/ses-02/anat/sub-03_ses-02_T1w.nii.gz"
    status = cli.main(["compare", str(base), str(follow), "-o", str(tmp_path / "out"), "--pipeline", str(pipeline)])
    assert status == 2 and "model.pkl" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 1.2, 0.9)])
def test_scored_mask_keeps_the_voxels_farther_than_the_margin_from_anything_not_compared(spacing):
    """Brute force on a small irregular mask: a voxel is kept exactly when every voxel within `margin` mm of it
    (the volume's outside counts as not compared) is compared."""
    from longitudinal.compare import scored_mask

    rng = np.random.default_rng(1)
    compared = np.zeros((14, 18, 20), bool)
    compared[2:13, 1:17, 3:20] = ndimage.gaussian_filter(rng.random((11, 16, 17)), 1.5) > 0.47
    margin = 2.0
    kept = scored_mask(compared, spacing, margin)
    outside = np.argwhere(~np.pad(compared, 1)) - 1
    expect = np.zeros_like(compared)
    for z, y, x in np.argwhere(compared):
        d = np.sqrt((((outside - (z, y, x)) * spacing) ** 2).sum(1)).min()
        expect[z, y, x] = d > margin
    assert 0 < kept.sum() < compared.sum()
    np.testing.assert_array_equal(kept, expect)


def test_a_tiny_lesion_under_the_pooled_gate_is_a_finding_by_its_unpooled_change_when_asked():
    """min_fine_change: a piece whose pooled change stays under min_change (a few pixels, diluted by pooling) is a
    finding when its unpooled change reaches the given level; off by default, and never outside scored regions."""
    from longitudinal.findings import outline

    shape = (40, 40)
    groups = np.zeros(shape, bool)
    groups[5:25, 5:25] = True
    inside = np.ones(shape, bool)
    region_of_voxel = np.where(groups, 0, -1)
    image = np.full(shape, 100.0, np.float32)
    fine = np.zeros(shape, np.float32)
    pooled = np.zeros(shape, np.float32)
    fine[10:12, 10:13] = 20.0  # 6 pixels far out of the unpooled noise ...
    pooled[9:13, 9:14] = 8.0  # ... pooled to 8, under min_change 12
    fine[30:32, 30:33] = 40.0  # as strong, outside every flagged region
    common = (groups, pooled, fine, inside, region_of_voxel, np.array([5.0]), image, image, (1.0, 1.0), 3.0)
    assert outline(*common, min_change=12.0) == []
    found = outline(*common, min_change=12.0, min_fine_change=14.0)
    assert len(found) == 1 and found[0].volume_mm3 == 6 and found[0].score == 5.0
    assert outline(*common, min_change=12.0, min_fine_change=24.0) == []
