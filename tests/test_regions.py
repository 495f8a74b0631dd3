"""Regions on the baseline grid: the cube grid, label maps, the integral-image box sums, change components."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from longitudinal.errors import InputError
from longitudinal.regions import RegionSettings, box_sums, component_regions, grid_regions, make_regions

SPACING = (1.0, 1.0, 2.0)  # (x, y, z) mm
ORIGIN = (-5.0, 10.0, 3.0)


def _reference(size_xyz, spacing=SPACING, origin=ORIGIN) -> sitk.Image:
    ref = sitk.Image(list(size_xyz), sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin(origin)
    return ref


def _coverage(regions, mask, labels=None) -> np.ndarray:
    covered = np.zeros(mask.shape, bool)
    for r in regions:
        covered[r.slices()] |= r.members(mask, labels)
    return covered


def _bboxes(regions):
    return {(r.bbox[0], r.bbox[1]) for r in regions}


# --------------------------------------------------------------------------- the grid

# A (x, y, z) = (14, 12, 10) voxel image of 1 x 1 x 2 mm voxels and 4 mm cubes at half overlap: the cube is
# 4 x 4 x 2 voxels, neighbours start 2, 2 and 1 voxels apart, and (size - edge) is a multiple of the step on
# every axis, so the last cube ends exactly at the image edge.
SIZE = (14, 12, 10)
STARTS = ([0, 2, 4, 6, 8, 10], [0, 2, 4, 6, 8], list(range(9)))
EDGE = (4, 4, 2)


def _lattice():
    """Every cube the 4 mm / 0.5 grid of SIZE holds, written out by hand: ((lo), (hi)) in (x, y, z)."""
    return {((x, y, z), (x + EDGE[0], y + EDGE[1], z + EDGE[2]))
            for x in STARTS[0] for y in STARTS[1] for z in STARTS[2]}


def test_full_mask_grid_has_every_cube_of_the_lattice_and_covers_every_voxel():
    mask = np.ones(SIZE[::-1], bool)
    regions = grid_regions(_reference(SIZE), mask, RegionSettings(size_mm=4.0, overlap=0.5))
    assert len(regions) == 6 * 5 * 9 == 270
    assert _bboxes(regions) == _lattice()
    assert [r.id for r in regions] == list(range(1, 271))
    assert all(r.label == "grid" and r.value is None for r in regions)
    assert all(r.volume_mm3 == pytest.approx(4 * 4 * 4.0) for r in regions)  # a 4 mm cube: 32 voxels of 2 mm3
    assert _coverage(regions, mask).all()
    # neighbours share half a cube: the x-neighbour of the first cube starts half an edge further on
    first = min(regions, key=lambda r: r.bbox[0])
    assert first.bbox == ((0, 0, 0), (4, 4, 2))
    assert ((2, 0, 0), (6, 4, 2)) in _bboxes(regions)


def test_grid_cube_centre_is_the_physical_centre_of_its_voxels():
    mask = np.ones(SIZE[::-1], bool)
    regions = grid_regions(_reference(SIZE), mask, RegionSettings(size_mm=4.0, overlap=0.5))
    for r in regions[:: 37]:
        (lo, hi) = r.bbox
        centre_index = [(a + b - 1) / 2 for a, b in zip(lo, hi)]
        expected = [o + s * c for o, s, c in zip(ORIGIN, SPACING, centre_index)]
        assert r.centre_mm == pytest.approx(expected, abs=0.01)


def test_no_overlap_tiles_the_image_without_sharing_voxels():
    size = (12, 8, 6)
    mask = np.ones(size[::-1], bool)
    regions = grid_regions(_reference(size), mask, RegionSettings(size_mm=4.0, overlap=0.0))
    assert len(regions) == 3 * 2 * 3  # 4 x 4 x 2-voxel tiles of a 12 x 8 x 6 image
    counts = np.zeros(mask.shape, int)
    for r in regions:
        counts[r.slices()] += 1
    assert (counts == 1).all()


def test_every_in_mask_voxel_of_an_irregular_mask_is_in_some_region():
    rng = np.random.default_rng(3)
    z, y, x = np.indices(SIZE[::-1])
    mask = ((x - 7) ** 2 + (y - 6) ** 2 + (2 * (z - 5)) ** 2 <= 30) | (rng.random(SIZE[::-1]) < 0.05)
    # any foreground voxel is enough for a cube to count (and a cube with none never counts)
    regions = grid_regions(_reference(SIZE), mask, RegionSettings(size_mm=4.0, overlap=0.5, min_mask_fraction=1e-9))
    covered = _coverage(regions, mask)
    assert covered[mask].all() and not covered[~mask].any()
    for r in regions:  # each region's volume is its foreground, not its cube
        assert r.volume_mm3 == pytest.approx(r.members(mask).sum() * 2.0)
        assert r.members(mask).any()


def test_min_mask_fraction_drops_cubes_mostly_outside_the_mask():
    mask = np.zeros(SIZE[::-1], bool)
    mask[:, :, :5] = True  # x < 5: 5 of 14 columns
    fraction = 0.3
    regions = grid_regions(_reference(SIZE), mask,
                           RegionSettings(size_mm=4.0, overlap=0.5, min_mask_fraction=fraction))
    # cubes starting at x = 0, 2 are 100 % and 75 % inside, x = 4 is 25 % (dropped), x >= 6 are outside
    assert {r.bbox[0][0] for r in regions} == {0, 2}
    assert len(regions) == 2 * 5 * 9
    expected = {b for b in _lattice() if mask[tuple(slice(a, c) for a, c in zip(b[0][::-1], b[1][::-1]))].mean()
                >= fraction}
    assert _bboxes(regions) == expected
    assert all(r.members(mask).mean() >= fraction for r in regions)
    # a lower floor keeps the 25 % cubes too, and still nothing wholly outside the mask
    loose = grid_regions(_reference(SIZE), mask, RegionSettings(size_mm=4.0, overlap=0.5, min_mask_fraction=0.2))
    assert {r.bbox[0][0] for r in loose} == {0, 2, 4}
    assert len(loose) == 3 * 5 * 9


def test_an_empty_mask_has_no_grid_regions():
    mask = np.zeros(SIZE[::-1], bool)
    assert grid_regions(_reference(SIZE), mask, RegionSettings(size_mm=4.0)) == []


def test_grid_settings_refuse_a_cube_of_no_size_and_full_overlap():
    with pytest.raises(ValueError, match="size_mm"):
        RegionSettings(size_mm=0.0)
    with pytest.raises(ValueError, match="overlap"):
        RegionSettings(overlap=1.0)


@pytest.mark.parametrize("size,overlap", [((11, 12, 10), 0.5), ((10, 8, 6), 0.0)], ids=["half-overlap", "no-overlap"])
def test_voxels_at_the_far_edge_of_an_axis_belong_to_some_region(size, overlap):
    mask = np.ones(size[::-1], bool)
    regions = grid_regions(_reference(size), mask, RegionSettings(size_mm=4.0, overlap=overlap))
    covered = _coverage(regions, mask)
    assert covered.all(), f"{(~covered).sum()} of {mask.size} foreground voxels are in no region"


def test_min_mask_fraction_zero_keeps_no_cube_without_foreground():
    mask = np.zeros(SIZE[::-1], bool)
    mask[:, :, :5] = True
    regions = grid_regions(_reference(SIZE), mask, RegionSettings(size_mm=4.0, overlap=0.5, min_mask_fraction=0.0))
    assert {r.bbox[0][0] for r in regions} == {0, 2, 4}
    assert all(r.members(mask).any() for r in regions)


def test_a_single_thick_slice_has_no_empty_regions():
    size = (20, 20, 1)
    ref = _reference(size, spacing=(1.0, 1.0, 5.0))
    mask = np.ones(size[::-1], bool)
    regions = grid_regions(ref, mask, RegionSettings(size_mm=8.0, overlap=0.5))
    assert regions
    assert all(r.volume_mm3 > 0 and r.members(mask).any() for r in regions)


# --------------------------------------------------------------------------- box sums


@pytest.mark.parametrize("shape", [(7, 9, 11), (13, 6)])
def test_box_sums_match_a_brute_force_sum(shape):
    rng = np.random.default_rng(len(shape))
    values = rng.integers(-5, 20, size=shape)
    n = 200
    a = np.stack([rng.integers(0, s + 1, n) for s in shape], 1)
    b = np.stack([rng.integers(0, s + 1, n) for s in shape], 1)
    lo, hi = np.minimum(a, b), np.maximum(a, b)  # some boxes are empty (lo == hi on an axis)
    lo[0], hi[0] = 0, shape  # the whole image
    lo[1] = hi[1] = 0  # nothing
    got = box_sums(values, lo, hi)
    expected = [values[tuple(slice(l, h) for l, h in zip(lo_row, hi_row))].sum() for lo_row, hi_row in zip(lo, hi)]
    np.testing.assert_array_equal(got, expected)
    assert got[0] == values.sum() and got[1] == 0
    assert (lo == hi).any(axis=1).sum() > 0  # empty boxes were exercised


def test_box_sums_of_a_boolean_mask_count_voxels():
    mask = np.zeros((5, 6, 7), bool)
    mask[1:4, 2:5, 3:7] = True
    got = box_sums(mask, np.array([[0, 0, 0], [1, 2, 3], [2, 3, 4]]), np.array([[5, 6, 7], [4, 5, 7], [3, 4, 5]]))
    np.testing.assert_array_equal(got, [36, 36, 1])


# --------------------------------------------------------------------------- label maps

LABEL_SIZE = (12, 10, 8)  # (x, y, z)
LABEL_SPACING = (1.5, 1.0, 2.5)
LABEL_ORIGIN = (-20.0, 5.0, 40.0)
VOXEL_MM3 = 1.5 * 1.0 * 2.5


def _label_case():
    """A reference grid, its mask, and a label array (numpy order): 1 and 2 inside the mask, 3 partly inside,
    4 wholly outside."""
    ref = _reference(LABEL_SIZE, LABEL_SPACING, LABEL_ORIGIN)
    labels = np.zeros(LABEL_SIZE[::-1], np.int16)
    labels[1:4, 2:6, 1:5] = 1
    labels[4:7, 1:4, 6:11] = 2
    labels[2:6, 6:9, 2:8] = 3
    labels[0, 0, 0] = 4
    mask = np.zeros(labels.shape, bool)
    mask[1:7, 1:8, 1:11] = True
    assert not mask[0, 0, 0] and not mask[labels == 3].all() and mask[labels == 3].any()
    return ref, mask, labels


def _write_labels(path: Path, labels: np.ndarray, spacing=LABEL_SPACING, origin=LABEL_ORIGIN) -> Path:
    img = sitk.GetImageFromArray(labels)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


def test_label_map_gives_one_region_per_label_in_the_mask(tmp_path):
    ref, mask, labels = _label_case()
    path = _write_labels(tmp_path / "labels.nii.gz", labels)
    settings = RegionSettings(kind="labels", label_map=path, label_names=("caudate", "putamen"))
    regions, array = make_regions(ref, mask, settings)
    np.testing.assert_array_equal(array, labels)
    assert [r.value for r in regions] == [1, 2, 3]  # 4 lies wholly outside the mask: no region
    assert [r.label for r in regions] == ["caudate", "putamen", "label 3"]  # unnamed values keep their number
    assert [r.id for r in regions] == [1, 2, 3]
    for r in regions:
        inside = mask & (labels == r.value)
        assert r.volume_mm3 == pytest.approx(inside.sum() * VOXEL_MM3)
        members = np.zeros(mask.shape, bool)
        members[r.slices()] = r.members(mask, array)
        np.testing.assert_array_equal(members, inside)  # the bbox is tight and holds exactly those voxels
        where = np.argwhere(inside)
        assert r.bbox == (tuple(int(v) for v in where.min(0)[::-1]), tuple(int(v) for v in where.max(0)[::-1] + 1))
        centre = [o + s * c for o, s, c in zip(LABEL_ORIGIN, LABEL_SPACING, where.mean(0)[::-1])]
        assert r.centre_mm == pytest.approx(centre, abs=0.01)


def test_a_finer_label_map_in_the_same_space_is_resampled_onto_the_reference(tmp_path):
    ref, mask, labels = _label_case()
    # each reference voxel becomes 2 x 2 x 2 voxels of half the spacing over the same physical extent
    fine = labels.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    spacing = tuple(s / 2 for s in LABEL_SPACING)
    origin = tuple(o - s / 4 for o, s in zip(LABEL_ORIGIN, LABEL_SPACING))
    path = _write_labels(tmp_path / "fine.nii.gz", fine, spacing, origin)
    regions, array = make_regions(ref, mask, RegionSettings(kind="labels", label_map=path))
    np.testing.assert_array_equal(array, labels)
    assert [r.label for r in regions] == ["label 1", "label 2", "label 3"]
    assert [r.volume_mm3 for r in regions] == pytest.approx(
        [(mask & (labels == v)).sum() * VOXEL_MM3 for v in (1, 2, 3)])


def test_labels_without_a_label_map_is_an_input_error():
    ref, mask, _ = _label_case()
    with pytest.raises(InputError, match="label_map") as info:
        make_regions(ref, mask, RegionSettings(kind="labels"))
    assert "labels" in str(info.value)


def test_a_missing_label_map_is_an_input_error_naming_the_file(tmp_path):
    ref, mask, _ = _label_case()
    missing = tmp_path / "atlas" / "nowhere.nii.gz"
    with pytest.raises(InputError, match="not found") as info:
        make_regions(ref, mask, RegionSettings(kind="labels", label_map=missing))
    assert info.value.path == str(missing)


def test_a_label_map_of_another_dimension_or_elsewhere_is_refused(tmp_path):
    ref, mask, labels = _label_case()
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(labels[3]), str(flat))
    with pytest.raises(InputError, match="2D but the image is 3D"):
        make_regions(ref, mask, RegionSettings(kind="labels", label_map=flat))
    far = _write_labels(tmp_path / "far.nii.gz", labels, origin=(500.0, 500.0, 500.0))
    with pytest.raises(InputError, match="does not overlap") as info:
        make_regions(ref, mask, RegionSettings(kind="labels", label_map=far))
    assert info.value.path == str(far)


def test_grid_and_components_through_make_regions():
    ref, mask, _ = _label_case()
    assert make_regions(ref, mask, RegionSettings(kind="components")) == (None, None)
    regions, labels = make_regions(ref, mask, RegionSettings(kind="grid", size_mm=3.0, min_mask_fraction=0.0))
    assert labels is None and regions and all(r.label == "grid" for r in regions)


# --------------------------------------------------------------------------- components


def test_two_blobs_of_change_are_two_component_regions():
    size = (20, 18, 16)  # (x, y, z), 1 x 1 x 2 mm voxels
    ref = _reference(size)
    shape = size[::-1]
    mask = np.ones(shape, bool)
    mask[:, :, 18:] = False
    change = np.zeros(shape, np.float32)
    z, y, x = np.indices(shape)
    blob_a = (x - 4) ** 2 + (y - 4) ** 2 + (z - 4) ** 2 <= 4  # 33 voxels
    blob_b = (abs(x - 14) <= 1) & (abs(y - 12) <= 2) & (abs(z - 10) <= 1)  # 3 x 5 x 3 = 45 voxels
    change[blob_a] = 5.0
    change[blob_b] = 3.0
    change[14, 2, 16] = 9.0  # one voxel (2 mm3): below component_min_mm3
    change[5, 15, 19] = 9.0  # a strong blob outside the mask
    change[5, 15, 18] = 9.0
    change[10, 10, 10] = 2.0  # below the level
    settings = RegionSettings(kind="components", component_level=2.5, component_min_mm3=5.0)
    regions, labels = component_regions(ref, mask, change, settings)
    assert len(regions) == 2
    assert [r.label for r in regions] == ["component 1", "component 2"]
    assert [r.value for r in regions] == [1, 2]
    assert set(np.unique(labels)) == {0, 1, 2}
    by_blob = {int(np.unique(labels[blob])[0]): blob for blob in (blob_a, blob_b)}
    assert set(by_blob) == {1, 2}  # each blob is wholly one component
    for r in regions:
        blob = by_blob[r.value]
        np.testing.assert_array_equal(labels == r.value, blob)
        assert r.volume_mm3 == pytest.approx(blob.sum() * 2.0)
        members = np.zeros(shape, bool)
        members[r.slices()] = r.members(mask, labels)
        np.testing.assert_array_equal(members, blob)
    centre_b = next(r for r in regions if by_blob[r.value] is blob_b).centre_mm
    assert centre_b == pytest.approx([ORIGIN[0] + 14, ORIGIN[1] + 12, ORIGIN[2] + 2 * 10])


def test_diagonal_neighbours_are_one_component_and_a_lower_level_merges_blobs():
    ref = _reference((10, 10, 10), spacing=(1.0, 1.0, 1.0))
    mask = np.ones((10, 10, 10), bool)
    change = np.zeros(mask.shape, np.float32)
    change[2:4, 2:4, 2:4] = 4.0
    change[4:6, 4:6, 4:6] = 4.0  # touches the first cube at one corner: 26-connected
    change[7:9, 7:9, 7:9] = 4.0  # separate ...
    change[6, 6, 6] = 2.0  # ... unless this bridge voxel counts
    strict = component_regions(ref, mask, change, RegionSettings(kind="components", component_level=2.5,
                                                                component_min_mm3=1.0))[0]
    assert sorted(r.volume_mm3 for r in strict) == [8.0, 16.0]
    loose = component_regions(ref, mask, change, RegionSettings(kind="components", component_level=1.5,
                                                               component_min_mm3=1.0))[0]
    assert [r.volume_mm3 for r in loose] == [25.0]


def test_no_change_above_the_level_gives_no_components():
    ref = _reference((6, 6, 6))
    mask = np.ones((6, 6, 6), bool)
    regions, labels = component_regions(ref, mask, np.ones(mask.shape, np.float32), RegionSettings(kind="components"))
    assert regions == [] and not labels.any()
