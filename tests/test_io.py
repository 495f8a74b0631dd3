"""Loading: DICOM series geometry, compressed and multi-frame DICOM, NIfTI round trip, 2D pictures, refusals."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import PYDICOM_DIR, smooth_volume, write_nifti, write_png
from longitudinal.errors import InputError
from dicom_writer import write_dicom_series
from longitudinal.io import Image, describe, load_image, save_image, scan_dicom

SAMPLES = Path(__file__).resolve().parent.parent / "sample_studies"

OBLIQUE_IOP = (0.9659258, 0.2588190, 0.0, -0.2588190, 0.9659258, 0.0)  # 15 degrees about z


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- DICOM series geometry


def test_series_round_trip_keeps_voxels_and_geometry(tmp_path, series_writer):
    vol = smooth_volume((7, 12, 10), seed=1)
    # Reverse-sorted InstanceNumbers: a reader ordering by them would flip the volume.
    files = series_writer(tmp_path / "s", vol, iop=OBLIQUE_IOP, instance_numbers=list(range(7, 0, -1)))
    before = _folder_digest(tmp_path / "s")

    img = load_image(tmp_path / "s")

    np.testing.assert_array_equal(img.array, vol)
    assert img.size == (10, 12, 7)
    np.testing.assert_allclose(img.spacing, (0.8, 0.9, 2.5), atol=1e-5)
    normal = np.cross(OBLIQUE_IOP[:3], OBLIQUE_IOP[3:])
    np.testing.assert_allclose(np.reshape(img.direction, (3, 3)),
                               np.column_stack([OBLIQUE_IOP[:3], OBLIQUE_IOP[3:], normal]), atol=1e-6)
    # Every slice lands where its own file says it is.
    for f in files:
        ds = pydicom.dcmread(f)
        k = int(np.argmin([np.abs(img.array[i] - ds.pixel_array).max() for i in range(7)]))
        np.testing.assert_allclose(img.itk.TransformIndexToPhysicalPoint((0, 0, k)),
                                   [float(v) for v in ds.ImagePositionPatient], atol=1e-4)
    assert img.meta.patient_id == "ANON" and img.meta.modality == "MR" and len(img.meta.sources) == 7
    assert _folder_digest(tmp_path / "s") == before  # input untouched


def test_series_order_ignores_file_names_and_instance_numbers(tmp_path, series_writer):
    vol = np.stack([np.full((8, 8), 100.0 * k) + np.eye(8) for k in range(5)])
    # File names sort opposite to z; InstanceNumbers scrambled.
    series_writer(tmp_path / "s", vol, file_names=[f"IMG{9 - k}" for k in range(5)],
                  instance_numbers=[3, 1, 5, 2, 4])
    img = load_image(tmp_path / "s")
    assert [round(float(img.array[k].max())) for k in range(5)] == [1, 101, 201, 301, 401]


def test_non_integral_rescale_gives_float32_in_real_units(tmp_path, series_writer):
    vol = smooth_volume(seed=2) / 4.0  # quarter units need slope 0.25
    series_writer(tmp_path / "s", vol, rescale=(0.25, -1000.5))
    img = load_image(tmp_path / "s")
    assert img.array.dtype == np.float32
    np.testing.assert_allclose(img.array, vol, atol=0.125 + 1e-3)


def test_integral_rescale_stays_integer(tmp_path, series_writer):
    vol = smooth_volume(seed=3)
    series_writer(tmp_path / "s", vol, rescale=(1, -1024), modality="CT")
    img = load_image(tmp_path / "s")
    assert np.issubdtype(img.array.dtype, np.integer)
    np.testing.assert_array_equal(img.array, vol)


def test_missing_slice_reports_where_the_gap_is(tmp_path, series_writer):
    files = series_writer(tmp_path / "s", origin=(0, 0, 0))
    by_z = sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    by_z[3].unlink()
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "s")
    msg = str(err.value)
    assert "gap of 5.000 mm between slice 2 (z=5.000" in msg and "expected 2.500 mm" in msg
    assert by_z[4].name in msg


def test_uneven_spacing_is_refused(tmp_path, series_writer):
    files = series_writer(tmp_path / "s", smooth_volume((8, 6, 6)), origin=(0, 0, 0))
    f = max(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    ds = pydicom.dcmread(f)
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0
    ds.save_as(f)
    with pytest.raises(InputError, match=r"uneven slice spacing: step of 3.500 mm .* expected 2.500 mm"):
        load_image(tmp_path / "s")


def test_duplicated_slice_position_is_refused(tmp_path, series_writer):
    files = series_writer(tmp_path / "s")
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "s" / "copy")
    with pytest.raises(InputError, match="duplicated slice position"):
        load_image(tmp_path / "s")


def test_folder_with_two_series_lists_them_and_series_uid_picks(tmp_path, series_writer):
    a = smooth_volume((4, 8, 8), seed=4)
    series_writer(tmp_path / "s", a, series_description="T1 axial", series_uid="1.2.826.0.1.1")
    series_writer(tmp_path / "s" / "sub", a + 5, series_description="T2 axial", series_uid="1.2.826.0.1.2",
                  seed=5)
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "s")
    msg = str(err.value)
    assert "2 image series" in msg and "choose one with --series-uid (Python: series_uid=)" in msg
    assert "1.2.826.0.1.1 'T1 axial' MR 4 slices" in msg and "1.2.826.0.1.2 'T2 axial'" in msg
    np.testing.assert_array_equal(load_image(tmp_path / "s", series_uid="1.2.826.0.1.2").array, a + 5)
    assert load_image(tmp_path / "s", series_uid="1.2.826.0.1.1").meta.series_description == "T1 axial"
    with pytest.raises(InputError, match="no series with SeriesInstanceUID 9.9"):
        load_image(tmp_path / "s", series_uid="9.9")


def test_scan_dicom_groups_series_recursively_and_skips_non_images(tmp_path, series_writer, pydicom_file):
    series_writer(tmp_path / "a" / "b", smooth_volume((3, 5, 5)), series_uid="1.2.3.1")
    series_writer(tmp_path / "c", smooth_volume((6, 5, 5)), series_uid="1.2.3.2", seed=7)
    shutil.copy(pydicom_file("test-SR.dcm"), tmp_path / "a" / "report")
    (tmp_path / "notes.txt").write_text("not an image")
    found = {s.uid: s for s in scan_dicom(tmp_path)}
    assert set(found) == {"1.2.3.1", "1.2.3.2"}
    assert found["1.2.3.1"].n_slices == 3 and found["1.2.3.2"].n_slices == 6
    assert found["1.2.3.2"].problem is None and found["1.2.3.2"].folder == tmp_path / "c"


def test_real_series_from_pydicom_is_ordered_by_position(pydicom_file):
    folder = PYDICOM_DIR / "dicomdirtests" / "98892001" / "CT5N"
    img = load_image(folder)
    assert img.size == (16, 16, 5)
    np.testing.assert_allclose(img.spacing, (0.488281, 0.488281, 2.5), atol=1e-6)
    np.testing.assert_allclose(img.origin, (-72.199997, -143.0, -1.2375), atol=1e-5)  # lowest z, not first file
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        k = round((float(ds.ImagePositionPatient[2]) - img.origin[2]) / 2.5)
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(img.array[k], expected)


def test_real_series_with_a_gap_is_refused():
    with pytest.raises(InputError, match=r"gap of 202.500 mm between slice 0 \(z=-99.480.*expected 1.250 mm"):
        load_image(PYDICOM_DIR / "dicomdirtests" / "77654033" / "CT2")


def test_real_series_with_mixed_orientations_is_refused():
    with pytest.raises(InputError, match="different orientations"):
        load_image(PYDICOM_DIR / "dicomdirtests" / "98892003" / "MR700")


# ----------------------------------------------------------------------------- single files, compression


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_compressed_and_big_endian_decode_exactly(pydicom_file, name):
    reference = load_image(pydicom_file("MR_small.dcm"))
    img = load_image(pydicom_file(name))
    assert img.dim == 2 and img.size == (64, 64)
    np.testing.assert_allclose(img.spacing, (0.3125, 0.3125))
    np.testing.assert_array_equal(img.array, reference.array)


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_gdcm.dcm", "SC_rgb_gdcm_KY.dcm"])
def test_rgb_lossless_jpeg_and_j2k_match_rle(pydicom_file, name):
    reference = load_image(pydicom_file("SC_rgb_rle.dcm"))
    img = load_image(pydicom_file(name))
    assert img.is_rgb and img.array.shape == (100, 100, 3)
    np.testing.assert_array_equal(img.array, reference.array)


def test_single_ct_slice_applies_rescale(pydicom_file):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    img = load_image(pydicom_file("CT_small.dcm"))
    assert img.dim == 2 and img.meta.modality == "CT"
    np.testing.assert_array_equal(img.array, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG2000.dcm", "examples_palette.dcm",
                                  "SC_jpeg_no_color_transform.dcm", "ExplVR_BigEnd.dcm"])
def test_other_compressed_or_colour_files_load(pydicom_file, name):
    ds = pydicom.dcmread(pydicom_file(name), stop_before_pixels=True)
    img = load_image(pydicom_file(name))
    assert img.size == (ds.Columns, ds.Rows)
    assert img.array.std() > 0


def test_multiframe_dose_grid_becomes_a_volume(pydicom_file):
    ds = pydicom.dcmread(pydicom_file("rtdose.dcm"))
    img = load_image(pydicom_file("rtdose.dcm"))
    assert img.size == (10, 10, 15)
    np.testing.assert_allclose(img.spacing, (10, 10, 5))
    np.testing.assert_allclose(img.origin, [float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_array_equal(img.array, ds.pixel_array)


def test_file_gdcm_rejects_falls_back_to_pydicom(pydicom_file):
    # SimpleITK cannot read this single-frame RT dose; pydicom can.
    with pytest.raises(RuntimeError):
        sitk.ReadImage(str(pydicom_file("rtdose_1frame.dcm")))
    img = load_image(pydicom_file("rtdose_1frame.dcm"))
    np.testing.assert_array_equal(img.array, pydicom.dcmread(pydicom_file("rtdose_1frame.dcm")).pixel_array)


@pytest.mark.parametrize("name", ["SC_rgb_rle_2frame.dcm", "examples_ybr_color.dcm"])
def test_cine_multiframe_is_refused(pydicom_file, name):
    with pytest.raises(InputError, match="no per-frame positions"):
        load_image(pydicom_file(name))


@pytest.mark.parametrize("name", ["test-SR.dcm", "waveform_ecg.dcm", "rtplan.dcm", "rtstruct.dcm",
                                  "rtplan_truncated.dcm"])
def test_non_image_dicom_is_refused(pydicom_file, name):
    with pytest.raises(InputError, match="not an image: DICOM .* holds no pixel data") as err:
        load_image(pydicom_file(name))
    assert name in str(err.value)


def test_truncated_pixel_data_is_refused(pydicom_file):
    with pytest.raises(InputError, match="pixel data is truncated") as err:
        load_image(pydicom_file("MR_truncated.dcm"))
    assert "MR_truncated.dcm" in str(err.value)


def test_image_header_without_pixel_data_is_refused(tmp_path, pydicom_file):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(InputError, match="nopix.dcm: DICOM file has image attributes but no pixel data"):
        load_image(tmp_path / "nopix.dcm")


def test_truncated_header_is_refused(tmp_path, pydicom_file):
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(pydicom_file("CT_small.dcm").read_bytes()[:700])
    with pytest.raises(InputError, match="truncated or corrupt") as err:
        load_image(cut)
    assert "cut.dcm" in str(err.value)


def test_truncated_slice_inside_a_series_is_named(tmp_path, series_writer, pydicom_file):
    files = series_writer(tmp_path / "s")
    files[2].write_bytes(files[2].read_bytes()[:400])
    with pytest.raises(InputError, match="file truncated or corrupt") as err:
        load_image(tmp_path / "s")
    assert files[2].name in str(err.value)


def test_non_dicom_missing_empty_and_unsupported_files(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(np.random.default_rng(0).bytes(600))
    with pytest.raises(InputError, match="junk.dcm: not a DICOM file"):
        load_image(junk)
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "absent.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(tmp_path / "empty.nii.gz")
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported file type '.csv'"):
        load_image(tmp_path / "table.csv")
    (tmp_path / "only_notes").mkdir()
    (tmp_path / "only_notes" / "readme.txt").write_text("x")
    with pytest.raises(InputError, match=r"only_notes: no image found among 1 file\(s\) \(not DICOM\): expected a DICOM"):
        load_image(tmp_path / "only_notes")


def test_a_visit_folder_holding_one_image_file_is_that_image(tmp_path):
    """`compare F001/2020-01-10 F001/2020-08-05`: a plain-layout visit folder reads as the one image in it."""
    picture = SAMPLES / "fundus/F001/2020-01-10/fundus.png"
    folder = tmp_path / "2020-01-10"
    folder.mkdir()
    (folder / "fundus.png").write_bytes(picture.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    direct, via_folder = load_image(picture), load_image(folder)
    assert via_folder.size == direct.size and np.array_equal(via_folder.array, direct.array)
    assert describe(folder).size == describe(picture).size
    (folder / "other.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match="2 images in this folder, give one file: fundus.png, other.nii.gz"):
        load_image(folder)


def test_constant_and_nan_volumes_are_refused(tmp_path, series_writer):
    series_writer(tmp_path / "flat", np.full((4, 6, 6), 7.0))
    with pytest.raises(InputError, match="constant"):
        load_image(tmp_path / "flat")
    vol = smooth_volume((3, 4, 4)).astype(np.float32)
    vol[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="1 NaN"):
        load_image(write_nifti(tmp_path / "nan.mha", vol))
    # SimpleITK's NIfTI reader turns NaN into 0; the loader must still see it, written by nibabel too.
    for name in ("nan.nii", "nan.nii.gz"):
        with pytest.raises(InputError, match="nan.nii.*1 NaN"):
            load_image(write_nifti(tmp_path / name, vol))
    vol[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(vol.astype(np.float64), np.eye(4)), tmp_path / "inf.nii.gz")
    with pytest.raises(InputError, match="2 NaN or infinite"):
        load_image(tmp_path / "inf.nii.gz")


# ----------------------------------------------------------------------------- NIfTI, pictures, saving


@pytest.mark.parametrize("name", ["anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii"])
def test_nifti_round_trip_keeps_affine_and_voxels(tmp_path, nibabel_file, name):
    src = nibabel_file(name)
    out = save_image(load_image(src), tmp_path / "out.nii.gz")
    a, b = nib.load(src), nib.load(out)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(b.dataobj), np.asanyarray(a.dataobj))


def test_oblique_nifti_round_trip_and_lps_origin(tmp_path):
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.2, 0.9, 2.0])
    affine[:3, 3] = (12.5, -30.0, 7.25)
    data = smooth_volume((5, 6, 7)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "obl.nii.gz")
    img = load_image(tmp_path / "obl.nii.gz")
    np.testing.assert_allclose(img.origin, (-12.5, 30.0, 7.25), atol=1e-4)  # RAS -> LPS
    np.testing.assert_allclose(img.spacing, (1.2, 0.9, 2.0), atol=1e-5)
    save_image(img, tmp_path / "back.nii")
    np.testing.assert_allclose(nib.load(tmp_path / "back.nii").affine, affine, atol=1e-4)


def test_truncated_nifti_is_refused(tmp_path, nibabel_file):
    # SimpleITK alone would zero-fill the missing voxels and return a "valid" image.
    data = nibabel_file("anatomical.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[:2000])
    with pytest.raises(InputError, match=r"cut.nii: NIfTI file is truncated: 2000 bytes .* expected 68002"):
        load_image(tmp_path / "cut.nii")
    packed = gzip.compress(data)
    (tmp_path / "cut.nii.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(InputError, match="cut.nii.gz: compressed NIfTI is truncated"):
        load_image(tmp_path / "cut.nii.gz")


def test_4d_and_nifti2_are_refused(nibabel_file):
    with pytest.raises(InputError, match="4D image with 2 volumes"):
        load_image(nibabel_file("example4d.nii.gz"))
    with pytest.raises(InputError, match="NIfTI-2"):
        load_image(nibabel_file("example_nifti2.nii.gz"))


def test_pictures_grey_rgb_and_rgba(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (20, 30))
    rgb = rng.integers(0, 255, (20, 30, 3))
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255)], axis=2)
    g = load_image(write_png(tmp_path / "g.png", grey))
    assert g.dim == 2 and not g.is_rgb and g.size == (30, 20)
    np.testing.assert_array_equal(g.array, grey)
    c = load_image(write_png(tmp_path / "c.png", rgb))
    assert c.is_rgb and c.itk.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(c.array, rgb)
    a = load_image(write_png(tmp_path / "a.png", rgba))
    np.testing.assert_array_equal(a.array, rgb)


def test_real_fundus_jpeg_loads_as_rgb():
    skimage = pytest.importorskip("skimage")
    path = Path(skimage.__file__).parent / "data" / "retina.jpg"
    img = load_image(path)
    assert img.dim == 2 and img.is_rgb and img.array.shape[2] == 3


def test_truncated_pictures_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    write_png(tmp_path / "full.png", rng.integers(0, 255, (64, 64, 3)))
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "full.png")), str(tmp_path / "full.jpg"))
    assert load_image(tmp_path / "full.jpg").is_rgb
    for name in ("full.png", "full.jpg"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(InputError, match=f"cut_{name}: .*(truncated|corrupt)"):
            load_image(tmp_path / f"cut_{name}")


def test_save_is_atomic_and_overwrites(tmp_path):
    img = Image(sitk.GetImageFromArray(smooth_volume((3, 4, 5)).astype(np.float32)))
    target = tmp_path / "x.nii.gz"
    save_image(img, target)
    img2 = img.with_itk(img.itk + 1)
    save_image(img2, target)
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]  # no temp file left behind
    np.testing.assert_array_equal(load_image(target).array, img2.array)
    with pytest.raises(ValueError, match="cannot write '.txt'"):
        save_image(img, tmp_path / "x.txt")


# ----------------------------------------------------------------------------- header-only inspection


def test_describe_matches_load_without_reading_pixels(tmp_path, series_writer, pydicom_file):
    series_writer(tmp_path / "s", smooth_volume((4, 6, 5)), patient_id="P1", study_date="20210304", modality="CT")
    info = describe(tmp_path / "s")
    img = load_image(tmp_path / "s")
    assert info.kind == "dicom" and info.size == img.size
    np.testing.assert_allclose(info.spacing, img.spacing)
    assert (info.modality, info.patient_id, info.study_date) == ("CT", "P1", "20210304")
    # Header-only: a file whose pixel data is truncated still describes fine.
    assert describe(pydicom_file("MR_truncated.dcm")).size == (64, 64)
    nii = describe(write_nifti(tmp_path / "v.nii.gz", smooth_volume((3, 4, 5)), spacing=(1.0, 2.0, 3.0)))
    assert nii.kind == "nifti" and nii.size == (5, 4, 3) and nii.spacing == (1.0, 2.0, 3.0)
    with pytest.raises(InputError, match="not an image"):
        describe(pydicom_file("test-SR.dcm"))


def test_write_dicom_series_is_reusable_and_validates(tmp_path):
    files = write_dicom_series(tmp_path / "out", smooth_volume((2, 4, 4)), modality="CT", seed=3)
    assert len(files) == 2 and all(pydicom.dcmread(f).Modality == "CT" for f in files)
    with pytest.raises(ValueError, match="int16"):
        write_dicom_series(tmp_path / "big", np.full((2, 4, 4), 1e6))
