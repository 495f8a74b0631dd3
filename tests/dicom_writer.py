"""Writing synthetic DICOM series for tests (the sample studies have their own writer in sample_studies/build.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from longitudinal.io import atomic_write

_SOP_FOR_MODALITY = {"CT": pydicom.uid.CTImageStorage, "MR": pydicom.uid.MRImageStorage,
                     "PT": pydicom.uid.PositronEmissionTomographyImageStorage}


def write_dicom_series(
    folder: str | os.PathLike,
    volume: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    iop: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    *,
    patient_id: str = "ANON",
    patient_name: str = "Anonymous",
    study_date: str = "20200101",
    study_time: str = "120000",
    modality: str = "MR",
    series_description: str = "",
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_number: int = 1,
    rescale: tuple[float, float] = (1.0, 0.0),
    file_names: Sequence[str] | None = None,
    instance_numbers: Sequence[int] | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write a (z, y, x) volume of real values as a DICOM series, one file per slice.

    `spacing` is (x, y, z) as in SimpleITK; slice k sits at origin + k * spacing[2] * normal,
    normal = row x column of `iop`. Stored pixels are int16 = round((value - intercept) / slope).
    File names are random unless given, so readers cannot rely on them; `instance_numbers`
    lets a caller scramble InstanceNumber too. Each file is written atomically.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    volume = np.asarray(volume)
    if volume.ndim == 2:
        volume = volume[None]
    if volume.ndim != 3:
        raise ValueError(f"volume must be 2D or 3D, got shape {volume.shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    slope, intercept = float(rescale[0]), float(rescale[1])
    raw = np.round((volume.astype(np.float64) - intercept) / slope)
    if raw.min() < -32768 or raw.max() > 32767:
        raise ValueError("volume does not fit int16 with this rescale slope/intercept")
    raw = raw.astype(np.int16)
    nz = volume.shape[0]
    iop = tuple(float(v) for v in iop)
    normal = np.cross(iop[:3], iop[3:])
    entropy = [str(seed), patient_id, study_date, study_time, series_description, str(series_number)]
    study_uid = study_uid or generate_uid(entropy_srcs=entropy[:4] + ["study"])
    series_uid = series_uid or generate_uid(entropy_srcs=entropy + ["series"])
    frame_uid = generate_uid(entropy_srcs=entropy + ["frame"])
    sop_class = _SOP_FOR_MODALITY.get(modality, pydicom.uid.SecondaryCaptureImageStorage)
    names = list(file_names) if file_names is not None else [rng.bytes(6).hex() for _ in range(nz)]
    numbers = list(instance_numbers) if instance_numbers is not None else list(range(1, nz + 1))
    if len(names) != nz or len(numbers) != nz:
        raise ValueError("file_names and instance_numbers need one entry per slice")
    written = []
    for k in rng.permutation(nz):
        k = int(k)
        sop_uid = generate_uid(entropy_srcs=entropy + ["sop", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / names[k]), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.StudyDate, ds.StudyTime, ds.SeriesDate, ds.SeriesTime = study_date, study_time, study_date, study_time
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber = modality, series_description, series_number
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.InstanceNumber = numbers[k]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin, float) + k * float(spacing[2]) * normal]
        ds.PixelSpacing = [f"{float(spacing[1]):.6f}", f"{float(spacing[0]):.6f}"]
        ds.SliceThickness = f"{float(spacing[2]):.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = raw.shape[1], raw.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = raw[k].tobytes()
        written.append(atomic_write(folder / names[k], lambda tmp: ds.save_as(tmp, enforce_file_format=True)))
    return sorted(written)


def set_raw_value(path: Path, keyword: str, value: bytes) -> None:
    """Rewrite one top-level element's value bytes in an explicit-VR little-endian file, as a corrupt file would
    hold them (pydicom would validate or convert a value set through its API)."""
    import struct

    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    key = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    data = bytearray(Path(path).read_bytes())
    pixels = data.find(struct.pack("<HH", 0x7FE0, 0x0010))
    i = data.find(key, 132)
    assert 0 < i < pixels, f"{keyword} not found before the pixel data"
    old = struct.unpack("<H", data[i + 6:i + 8])[0]
    if len(value) % 2:
        value += b"\0" if data[i + 4:i + 6] in (b"UI", b"OB") else b" "
    data[i + 6:i + 8 + old] = struct.pack("<H", len(value)) + value
    Path(path).write_bytes(bytes(data))
