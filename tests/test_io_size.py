"""The size limit: over `[input] max_voxels` an image is refused before its voxels are read, or downsampled."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import huge_png_header, smooth_volume, write_nifti, write_png
from longitudinal.errors import InputError
from longitudinal.io import InputSettings, describe, load_image
from longitudinal.pipeline import load


def test_over_the_limit_is_refused_before_any_voxel_is_read(tmp_path, monkeypatch):
    path = huge_png_header(tmp_path / "huge.png")
    assert describe(path).size == (10000, 10000)

    def no_voxels(self):
        raise AssertionError("voxels read")

    monkeypatch.setattr(sitk.ImageFileReader, "Execute", no_voxels)
    with pytest.raises(InputError) as err:
        load_image(path)
    assert str(err.value) == (f"{path}: image too large: 10000x10000 voxels x 3 channel(s) = 300,000,000 values, over "
                              "the limit of 33,554,432; raise [input] max_voxels in a pipeline file, or set [input] "
                              "too_large = \"downsample\"")


def test_a_dicom_series_over_the_limit_is_refused_from_its_headers(tmp_path, series_writer):
    series_writer(tmp_path / "s")
    with pytest.raises(InputError, match=r"s: image too large: 10x12x6 voxels x 1 channel\(s\) = 720 values"):
        load_image(tmp_path / "s", settings=InputSettings(max_voxels=700))


def test_downsample_averages_whole_blocks_and_says_so(tmp_path, series_writer):
    vol = smooth_volume((6, 12, 10))
    path = write_nifti(tmp_path / "v.nii.gz", vol, spacing=(1.0, 1.5, 2.0))
    image = load_image(path, settings=InputSettings(max_voxels=100, too_large="downsample"))
    assert image.size == (5, 6, 3) and image.spacing == (2.0, 3.0, 4.0)
    np.testing.assert_allclose(image.array[0, 0, 0], vol[:2, :2, :2].mean(), rtol=1e-5)
    assert image.meta.downsampled == ("downsampled 2x per axis (block average) from 10x12x6 to 5x6x3: 720 values "
                                      "over the limit of 100")
    rgb = load_image(write_png(tmp_path / "c.png", np.random.default_rng(0).integers(0, 255, (40, 60, 3))),
                     settings=InputSettings(max_voxels=1000, too_large="downsample"))
    assert rgb.is_rgb and rgb.size == (20, 13) and "3x per axis (block average) from 60x40 to 20x13: 7,200 values" \
        in rgb.meta.downsampled
    series_writer(tmp_path / "s")
    assert load_image(tmp_path / "s", settings=InputSettings(max_voxels=200, too_large="downsample")).size == (5, 6, 3)


def test_within_the_limit_nothing_changes(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", smooth_volume((6, 12, 10)))
    image = load_image(path, settings=InputSettings(max_voxels=720))
    assert image.size == (10, 12, 6) and image.meta.downsampled is None


def test_the_input_table_of_a_pipeline_sets_the_limit(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "p"\nversion = "1"\n[input]\nmax_voxels = 1000\ntoo_large = "downsample"\n')
    assert load(path).input == InputSettings(max_voxels=1000, too_large="downsample")
    assert load("brain-mri").input == InputSettings()
    path.write_text('name = "p"\nversion = "1"\n[input]\ntoo_large = "shrink"\n')
    with pytest.raises(InputError, match=r"line 4: \[input\] too_large: must be one of 'refuse', 'downsample'"):
        load(path)
    path.write_text('name = "p"\nversion = "1"\n[input]\nmax_voxels = 0\n')
    with pytest.raises(InputError, match=r"line 4: \[input\] max_voxels: must be at least 1"):
        load(path)
