"""Synthetic changes: only the voxels of the truth mask change (shared lesion cores change alike in both visits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from longitudinal.learned.synthetic import PASTERS, PasteSettings, pick_centre, random_change

nib = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def real_pair():
    """A real T1 slab (nilearn's MNI152) as baseline, the same with noise as follow-up."""
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    vol = np.asarray(nib.load(path).dataobj, dtype=np.float32).transpose(2, 1, 0)[80:100, 70:150, 50:130]
    rng = np.random.default_rng(0)
    follow = (vol + rng.normal(0, 2, vol.shape)).astype(np.float32)
    return vol, follow, vol > 20


@pytest.mark.parametrize("kind", sorted(PASTERS))
@pytest.mark.parametrize("seed", range(4))
def test_paste_changes_only_its_truth(real_pair, kind, seed):
    base, follow, mask = real_pair
    rng = np.random.default_rng(seed)
    centre = pick_centre(base, mask, kind, rng)
    paste = PASTERS[kind](base, follow, centre, (1.0, 1.0, 1.0), rng, within=mask)
    assert paste.kind == kind and paste.truth.any(), "a paste that changes nothing teaches nothing"
    assert not (paste.truth & ~mask).any(), "changes stay inside the tissue mask"
    assert not (paste.truth & paste.shared).any()
    outside = ~(paste.truth | paste.shared)
    np.testing.assert_array_equal(paste.followup[outside], follow[outside])
    np.testing.assert_array_equal(paste.baseline[outside], base[outside])
    assert (paste.followup[paste.truth] != follow[paste.truth]).all()  # truth voxels really changed
    # a shared (unchanged) lesion core is multiplied by the same factor in both visits
    if paste.shared.any():
        s = paste.shared & (base > 1) & (follow > 1)
        np.testing.assert_allclose(paste.followup[s] / follow[s], paste.baseline[s] / base[s], rtol=1e-5)
    assert paste.followup.dtype == follow.dtype and base.dtype == paste.baseline.dtype
    # the inputs were not modified
    assert paste.followup is not follow


def test_lesions_are_irregular_and_sized(real_pair):
    base, follow, mask = real_pair
    sizes = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        p = PASTERS["new_lesion"](base, follow, (10, 40, 40), (1.0, 1.0, 1.0), rng, PasteSettings(diameter_mm=(3, 7)))
        n = int(p.truth.sum())
        sizes.append(n)
        contrast = np.median(p.followup[p.truth] / follow[p.truth]) - 1
        assert 0.02 < abs(contrast) < 0.7
    diam = 2 * (3 * np.array(sizes) / (4 * np.pi)) ** (1 / 3)
    assert diam.min() > 1.5 and diam.max() < 10 and np.ptp(sizes) > 20


def test_rgb_2d_paste_keeps_outside(real_pair):
    base = np.repeat(real_pair[0][10][..., None], 3, -1)
    follow = np.repeat(real_pair[1][10][..., None], 3, -1)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        p = random_change(base, follow, real_pair[2][10], (1.0, 1.0), rng, rgb=True)
        outside = ~(p.truth | p.shared)
        assert p.truth.shape == base.shape[:2] and p.truth.any()
        np.testing.assert_array_equal(p.followup[outside], follow[outside])
        np.testing.assert_array_equal(p.baseline[outside], base[outside])
