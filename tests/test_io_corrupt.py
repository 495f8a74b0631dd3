"""Corrupt inputs are errors that name the file (and the tag), never a silently different image."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import smooth_volume, write_nifti
from dicom_writer import set_raw_value
from longitudinal.errors import InputError
from longitudinal.io import describe, load_image

SAMPLES = Path(__file__).resolve().parent.parent / "sample_studies"


def _by_z(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


# ----------------------------------------------------------------------------- DICOM numbers


def test_unparsable_rescale_intercept_is_an_error_not_zero(tmp_path, series_writer):
    files = series_writer(tmp_path / "s", rescale=(1, -20))
    reference = load_image(tmp_path / "s").array
    set_raw_value(files[3], "RescaleIntercept", b"\x8920")  # GDCM reads this as 0: every voxel of the slice +20
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "s")
    assert str(err.value).startswith(f"{files[3]}: malformed RescaleIntercept (0028,1052)")
    with pytest.raises(InputError, match="RescaleIntercept"):
        describe(tmp_path / "s")
    assert reference.min() < reference.max()


def test_the_sample_dicom_series_with_a_corrupt_intercept_is_refused(tmp_path):
    series = tmp_path / "series"
    shutil.copytree(SAMPLES / "dicom" / "STA8A648BF" / "SE5AF83877", series)
    victim = sorted(series.iterdir())[5]
    set_raw_value(victim, "RescaleIntercept", b"\x8920")
    with pytest.raises(InputError, match=f"{victim.name}: malformed RescaleIntercept"):
        load_image(series)


@pytest.mark.parametrize("keyword, value, what", [
    ("ImagePositionPatient", b"-10.0\\20.0\\5.O", "DS"),
    ("ImagePositionPatient", b"-10.0\\20.0", "expected 3"),
    ("ImageOrientationPatient", b"1\\0\\0\\0\\1\\nan", "DS"),
    ("PixelSpacing", b"0.9\\0.8x", "DS"),
    ("PixelSpacing", b"0\\0.8", "must be positive"),
    ("SliceThickness", b"2,5", "DS"),
    ("RescaleSlope", b"1e999", "not finite"),
    ("RescaleSlope", b"0", "is 0"),
    ("RescaleIntercept", b"--3", "DS"),
    ("Rows", b"\x01\x02\x03", "not an unsigned number"),
    ("BitsStored", b"\x14\x00", "expected 1 to BitsAllocated"),
    ("PixelRepresentation", b"\x02\x00", "expected 0 or 1"),
])
def test_malformed_geometry_and_pixel_tags_name_the_file_and_tag(tmp_path, series_writer, keyword, value, what):
    files = series_writer(tmp_path / "s")
    set_raw_value(files[2], keyword, value)
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "s")
    msg = str(err.value)
    assert msg.startswith(f"{files[2]}: ") and keyword in msg and what in msg


def test_malformed_number_of_frames_in_a_single_file(tmp_path, pydicom_file):
    path = tmp_path / "ct.dcm"
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.NumberOfFrames = "1"
    ds.save_as(path, enforce_file_format=True)
    assert load_image(path).size == (128, 128)
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.NumberOfFrames = "1"
    ds.save_as(path, enforce_file_format=True)
    set_raw_value(path, "NumberOfFrames", b"1A")
    with pytest.raises(InputError, match=r"ct.dcm: malformed NumberOfFrames \(0028,0008\): '1A' is not an integer"):
        load_image(path)


# ----------------------------------------------------------------------------- DICOM pixels


def _twelve_bit_series(folder: Path, series_writer) -> list[Path]:
    vol = smooth_volume((6, 16, 16), lo=0, hi=4000)
    files = series_writer(folder, vol, modality="CT")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.PixelData = np.frombuffer(ds.PixelData, np.int16).astype(np.uint16).tobytes()
        ds.save_as(f)
    return files


def test_flipped_pixel_bytes_beyond_bits_stored_are_an_error(tmp_path, series_writer):
    files = _twelve_bit_series(tmp_path / "s", series_writer)
    assert load_image(tmp_path / "s").array.max() <= 4095
    data = bytearray(files[3].read_bytes())
    for k in range(64):
        data[-200 + k] ^= 0xFF  # 64 flipped bytes in one slice's pixel data
    files[3].write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "s")
    assert str(err.value).startswith(f"{files[3]}: ") and "above BitsStored (12 of 16): pixel data corrupt" in str(err.value)


def test_a_single_signed_file_with_values_beyond_bits_stored_is_refused(tmp_path, pydicom_file):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))  # signed, 16 bits stored; values up to 2191
    ds.BitsStored, ds.HighBit = 12, 11  # 12-bit signed: -2048 to 2047
    path = tmp_path / "ct.dcm"
    ds.save_as(path)
    with pytest.raises(InputError, match=r"ct.dcm: \d+ stored pixel value\(s\) .* above BitsStored \(12 of 16\)"):
        load_image(path)


# ----------------------------------------------------------------------------- every file accounted for


def _break_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100:700] = np.random.default_rng(0).bytes(600)  # preamble end, magic and the start of the header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["edge", "middle"])
def test_an_unreadable_slice_is_an_error_naming_it_never_dropped(tmp_path, series_writer, where):
    files = _by_z(series_writer(tmp_path / "s"))
    victim = files[0] if where == "edge" else files[3]
    _break_header(victim)
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "s")
    assert str(err.value).startswith(f"{victim}: ")
    with pytest.raises(InputError, match=victim.name):
        describe(tmp_path / "s")


def test_a_gap_names_the_files_on_both_sides_and_the_unreadable_one(tmp_path, series_writer):
    files = _by_z(series_writer(tmp_path / "s", origin=(0, 0, 0)))
    _break_header(files[3])
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "s")
    msg = str(err.value)
    assert msg.startswith(f"{files[3]}: 1 missing slice(s)? gap of 5.000 mm")
    assert f"z=5.000, {files[2].name}) and slice 3 (z=10.000, {files[4].name})" in msg
    assert f"could not be read and may be the missing slice(s): {files[3].name} (" in msg


def test_a_plain_gap_is_reported_on_the_folder_not_on_a_healthy_file(tmp_path, series_writer):
    files = _by_z(series_writer(tmp_path / "s", origin=(0, 0, 0)))
    files[3].unlink()
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "s")
    assert str(err.value).startswith(f"{tmp_path / 's'}: 1 missing slice(s)? gap")
    assert files[2].name in str(err.value) and files[4].name in str(err.value)


def test_text_and_sidecar_files_next_to_a_series_are_still_skipped(tmp_path, series_writer):
    series_writer(tmp_path / "s")
    (tmp_path / "s" / "README").write_text("exported by the scanner\n")
    (tmp_path / "s" / "notes.json").write_text("{}")
    (tmp_path / "s" / ".DS_Store").write_bytes(b"\0\1\2")
    assert load_image(tmp_path / "s").size == (10, 12, 6)


def test_a_series_with_a_slice_of_another_patient_is_refused(tmp_path, series_writer):
    files = series_writer(tmp_path / "s", patient_id="SECRET-A")
    ds = pydicom.dcmread(files[4])
    ds.PatientID = "SECRET-B"
    ds.save_as(files[4])
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "s")
    msg = str(err.value)
    assert "PatientID differs" in msg and "--allow-mixed-patients" in msg and "SECRET" not in msg
    assert msg.startswith(f"{files[4]}: ") or files[4].name in msg
    with pytest.raises(InputError, match="PatientID differs"):
        describe(tmp_path / "s")
    assert load_image(tmp_path / "s", allow_mixed_patients=True).size == (10, 12, 6)


# ----------------------------------------------------------------------------- NIfTI geometry


def _nifti(path: Path, **header) -> Path:
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = (-10.0, 20.0, 30.0)
    img = nib.Nifti1Image(smooth_volume((8, 9, 10)).astype(np.int16), affine)
    for key, value in header.items():
        axis = int(key[-1]) if key[-1].isdigit() else None
        if axis is not None:
            img.header["pixdim"][axis] = value
    nib.save(img, path)
    return path


@pytest.mark.parametrize("value, what", [(np.nan, "not a number"), (0.0, "not positive"), (-1.5, "not positive"),
                                         (60.0, "over 50 mm")])
@pytest.mark.parametrize("axis", [1, 3])
def test_nifti_spacing_nan_zero_negative_or_absurd_is_an_error(tmp_path, value, what, axis):
    path = _nifti(tmp_path / "t1.nii.gz", **{f"pixdim{axis}": value})
    with pytest.raises(InputError) as err:
        load_image(path)
    assert str(err.value).startswith(f"{path}: voxel spacing along {'xyz'[axis - 1]}") and what in str(err.value)
    with pytest.raises(InputError, match="voxel spacing"):
        describe(path)


def test_a_healthy_1_5_mm_nifti_still_loads(tmp_path):
    img = load_image(_nifti(tmp_path / "t1.nii.gz"))
    np.testing.assert_allclose(img.spacing, (1.5, 1.5, 1.5))
    np.testing.assert_allclose(img.origin, (10.0, -20.0, 30.0))


def test_qform_and_sform_that_disagree_are_an_error(tmp_path):
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    img = nib.Nifti1Image(smooth_volume((8, 9, 10)).astype(np.int16), affine)
    shifted = affine.copy()
    shifted[0, 3] += 5.0
    img.set_qform(affine, 1)
    img.set_sform(shifted, 2)  # SimpleITK silently takes the qform here, nibabel the sform
    nib.save(img, tmp_path / "two.nii")
    with pytest.raises(InputError, match=r"two.nii: NIfTI qform and sform disagree: .* 5.00 mm apart"):
        load_image(tmp_path / "two.nii")


def test_an_sform_that_itk_and_nibabel_read_differently_is_an_error(tmp_path):
    """sform-only header whose scales say 3 mm while pixdim says 1.5 mm: ITK takes pixdim, nibabel the sform."""
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    img = nib.Nifti1Image(smooth_volume((8, 9, 10)).astype(np.int16), affine)
    img.set_qform(None, 0)
    img.header["pixdim"][1:4] = 1.5
    nib.save(img, tmp_path / "scaled.nii.gz")
    with pytest.raises(InputError, match=r"scaled.nii.gz: SimpleITK and nibabel read different geometry"):
        load_image(tmp_path / "scaled.nii.gz")


def test_corrupt_nifti_magic_is_an_error_from_nibabels_checks(tmp_path):
    path = write_nifti(tmp_path / "v.nii", smooth_volume((3, 4, 5)))
    data = bytearray(path.read_bytes())
    data[344:348] = b"xx1\0"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="v.nii: "):
        load_image(path)


def test_colour_rle_over_8_bits_decodes_as_pydicom_does(pydicom_file):
    """GDCM swaps the bytes of 16- and 32-bit colour RLE (found by tests/fuzz.py: its pydicom fallback disagreed)."""
    for name in ("SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm"):
        img = load_image(pydicom_file(name))
        np.testing.assert_array_equal(img.array, pydicom.dcmread(pydicom_file(name)).pixel_array)
        assert tuple(img.array[0, 0]) == (np.iinfo(img.array.dtype).max, 0, 0)  # the first pixel is pure red


def test_big_endian_32_bit_dose_decodes_like_its_little_endian_twin(pydicom_file):
    """GDCM swaps 32-bit big-endian data (found by tests/fuzz.py): the two encodings must load alike."""
    little, big = load_image(pydicom_file("rtdose.dcm")), load_image(pydicom_file("rtdose_expb.dcm"))
    np.testing.assert_array_equal(big.array, little.array)


def test_an_edge_slice_cut_after_its_file_meta_is_named_not_dropped(tmp_path, series_writer):
    """Found by tests/fuzz.py: a slice whose dataset is gone (only the preamble and file meta left) was skipped as
    "DICOM without pixels", and the series loaded one slice short."""
    files = _by_z(series_writer(tmp_path / "s"))
    meta = pydicom.dcmread(files[-1]).file_meta
    end = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    files[-1].write_bytes(files[-1].read_bytes()[:end])
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "s")
    assert str(err.value).startswith(f"{files[-1]}: DICOM MR Image Storage header has no Rows/Columns")


def test_headers_the_fuzzer_changed_silently_are_refused(tmp_path, pydicom_file):
    """Found by tests/fuzz.py (loaded before, with other values and no error)."""
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del ds.RescaleIntercept  # Hounsfield units shift by the intercept
    ds.save_as(tmp_path / "ct.dcm")
    with pytest.raises(InputError, match="ct.dcm: CT image without RescaleSlope and RescaleIntercept"):
        load_image(tmp_path / "ct.dcm")
    ds = pydicom.dcmread(pydicom_file("SC_rgb_rle.dcm"))
    ds.PixelRepresentation = 1  # colour samples read as signed
    ds.save_as(tmp_path / "rgb.dcm")
    with pytest.raises(InputError, match=r"rgb.dcm: PixelRepresentation \(0028,0103\) is 1 \(signed\) for RGB"):
        load_image(tmp_path / "rgb.dcm")
    path = write_nifti(tmp_path / "v.nii", smooth_volume((3, 4, 5)))
    data = bytearray(path.read_bytes())
    data[108:112] = np.float32(0).tobytes()  # vox_offset 0: SimpleITK reads the header as voxels
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="v.nii: NIfTI vox_offset is 0"):
        load_image(path)
