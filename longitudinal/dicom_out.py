"""Results where a radiologist reads follow-ups: a DICOM Segmentation and a TID 1500 Structured Report.

When the follow-up came from DICOM, `write_dicom_outputs` writes, next to the other outputs of the pair:

- `findings_seg.dcm`: a DICOM Segmentation (BINARY) on the follow-up series' own frames, one segment per flagged
  finding (SNOMED CT "Morphologically abnormal structure" / "Lesion", with its Tracking ID and Tracking UID),
  referencing the follow-up's source images. Frames are matched to their source files by
  ImagePositionPatient, never by file order.
- `findings_sr.dcm`: a Comprehensive 3D SR, TID 1500 Measurement Report: the follow-up's progression score
  (TID 1501, also when nothing was found), then per finding (TID 1411) its volume (2D: area), largest diameter, mean
  signed change (%) and calibrated score, a reference to its segment in the SEG and to the source series; every
  group with a Time Point Context (the follow-up, its order among the visits, its offset in days from the
  baseline) and the algorithm (longitudinal version, pipeline name and version, encoder checksum).

Both are built by highdicom (the field's maintained library), not by hand. With de-identification they are
built from de-identified copies of the source headers: an allow-list of attributes (geometry, modality, dates),
the report's pseudonym as PatientID and PatientName, and every instance UID replaced by a keyed hash of it
(`remap_uid`), so the same key maps a visit to the same UIDs in every pair and nothing of the original identity
is left.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import hmac
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from . import __version__
from .compare import Comparison
from .errors import InputError
from .io import atomic_write
from .tracking import FindingMeasures, FindingsRecord

log = logging.getLogger(__name__)

DICOM_FILES = {"seg": "findings_seg.dcm", "sr": "findings_sr.dcm"}
SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
MANUFACTURER = "longitudinal (open source)"
DEID_METHOD = "longitudinal: allow-list, keyed pseudonym, HMAC-remapped UIDs"

# Source-header attributes a de-identified SEG/SR may carry: geometry and acquisition kind, no identity.
_KEEP = ("SOPClassUID", "Modality", "Rows", "Columns", "ImageOrientationPatient", "ImagePositionPatient",
         "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "SamplesPerPixel", "PhotometricInterpretation",
         "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames", "StudyDate",
         "StudyTime", "SeriesDate", "SeriesTime", "SeriesNumber", "InstanceNumber", "BodyPartExamined",
         "PatientPosition", "ImageType", "PositionReferenceIndicator")
_REMAPPED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
# Type 2 attributes the SEG/SR copy from the source: present, empty (many files omit them altogether).
_EMPTIED = ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName", "StudyID")
_TYPE2 = ("PatientName", "PatientID", "StudyDate", "StudyTime", *_EMPTIED)


@dataclass(frozen=True)
class Tracked:
    """How one finding is known across visits: a human-readable ID and a UID (DICOM Tracking ID / UID)."""

    tracking_id: str
    tracking_uid: str


# --------------------------------------------------------------------------- CLI flags (wired by compare/batch)


def wants_dicom_outputs(comparison: Comparison, dicom_out: bool | None) -> bool:
    """What the flags mean for one pair: None (no flag) writes them when the follow-up came from DICOM and the
    pair was compared; False never; True always, and a follow-up without DICOM files is the user's error."""
    if dicom_out is False:
        return False
    from_dicom = is_dicom_image(comparison)
    if dicom_out is True and not from_dicom:
        where = comparison.followup.meta.sources[0] if comparison.followup.meta.sources else None
        raise InputError(where, "--dicom-out needs a follow-up read from DICOM files (a DICOM SEG is drawn on the "
                                "follow-up's own DICOM frames)")
    return from_dicom and comparison.verdict != "not comparable"


def is_dicom_image(comparison: Comparison) -> bool:
    meta = comparison.followup.meta
    return bool(meta.series_uid and meta.sources)


def dicom_sources(path: str | os.PathLike, series_uid: str | None = None) -> tuple[str, ...]:
    """The DICOM files of a visit (a series folder or one file), from headers only: the `sources` of
    `write_dicom_record` when a batch rebuilds a pair's SEG/SR after tracking (`timeline.Visit.path/series_uid`)."""
    from .io import scan_dicom

    path = Path(path)
    if path.is_file():
        return (str(path),)
    series = [s for s in scan_dicom(path) if series_uid is None or s.uid == series_uid]
    if len(series) != 1:
        raise InputError(path, f"{len(series)} DICOM series match here; name one by its SeriesInstanceUID")
    return tuple(str(f) for f in series[0].files)


# --------------------------------------------------------------------------- identity


def remap_uid(uid: str, key: bytes) -> str:
    """A keyed, deterministic replacement for a UID: `2.25.` + 128 bits of HMAC-SHA256 (same key, same UID)."""
    digest = hmac.new(key, uid.encode("ascii"), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _deidentified(ds: Dataset, pseudonym: str, key: bytes) -> Dataset:
    """A header holding only allow-listed attributes, the pseudonym and remapped UIDs."""
    out = Dataset()
    for keyword in _KEEP:
        if keyword in ds:
            setattr(out, keyword, copy.deepcopy(ds[keyword].value))
    for keyword in _REMAPPED:
        if keyword in ds:
            setattr(out, keyword, remap_uid(str(ds[keyword].value), key))
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if group in ds:  # enhanced multi-frame: keep only each frame's plane and pixel geometry
            items = []
            for item in ds[group].value:
                kept = Dataset()
                for seq in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"):
                    if seq in item:
                        setattr(kept, seq, copy.deepcopy(item[seq].value))
                items.append(kept)
            setattr(out, group, items)
    for keyword in _EMPTIED:
        setattr(out, keyword, "")
    out.PatientID = pseudonym
    out.PatientName = pseudonym + "^"  # the pseudonym as family name (a bare single component is a retired form)
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = DEID_METHOD
    out.file_meta = pydicom.dataset.FileMetaDataset()
    out.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return out


# --------------------------------------------------------------------------- frames


def _source_headers(sources: Sequence[str | os.PathLike]) -> list[Dataset]:
    headers = []
    for source in sources:
        try:
            ds = pydicom.dcmread(source, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise InputError(source, f"cannot re-read the follow-up's DICOM header for the SEG ({exc})") from exc
        for keyword in _TYPE2:  # the SEG and SR must carry them, empty if unknown
            if keyword not in ds:
                setattr(ds, keyword, "")
        headers.append(ds)
    return headers


def _frame_positions(headers: Sequence[Dataset]) -> list[np.ndarray | None]:
    """ImagePositionPatient of every source frame, in source order (files, or frames of one multi-frame file)."""
    if len(headers) == 1 and int(headers[0].get("NumberOfFrames", 1) or 1) > 1:
        frames = headers[0].get("PerFrameFunctionalGroupsSequence") or []
        out = []
        for item in frames:
            try:
                out.append(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float))
            except (AttributeError, IndexError):
                out.append(None)
        return out
    return [np.asarray(h.ImagePositionPatient, float) if "ImagePositionPatient" in h else None for h in headers]


def _source_order(image: sitk.Image, headers: Sequence[Dataset]) -> np.ndarray:
    """For each source frame (in source order), the z index of the image slice it holds.

    A SimpleITK array is (z, y, x) with z in the image's slice order; source files are in any order. Each
    slice is matched to the source frame at its physical position (ImagePositionPatient), within a tenth of
    the slice step.
    """
    n = image.GetSize()[2] if image.GetDimension() == 3 else 1
    positions = _frame_positions(headers)
    where = headers[0].filename if getattr(headers[0], "filename", None) else None
    if len(positions) != n:
        raise InputError(where, f"the follow-up has {n} slices but its DICOM sources hold {len(positions)} frames")
    if image.GetDimension() == 2:
        return np.zeros(1, int)
    if any(p is None for p in positions):
        raise InputError(where, "a source frame has no ImagePositionPatient; the SEG cannot be matched to it")
    slices = np.array([image.TransformIndexToPhysicalPoint((0, 0, z)) for z in range(n)])
    tolerance = 0.1 * image.GetSpacing()[2]
    order = np.empty(n, int)
    for k, p in enumerate(positions):
        distance = np.linalg.norm(slices - p, axis=1)
        z = int(np.argmin(distance))
        if distance[z] > tolerance:
            raise InputError(where, f"source frame {k + 1} at {np.round(p, 3).tolist()} mm is no slice of the "
                                    f"follow-up (nearest {distance[z]:.3f} mm away)")
        order[k] = z
    if len(set(order.tolist())) != n:
        raise InputError(where, "two source frames sit at the same slice position")
    return order


# --------------------------------------------------------------------------- the objects


def _algorithm(record: FindingsRecord):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    parameters = {"pipeline": " ".join(record.pipeline)}
    encoder = record.encoder
    sha = encoder.get("sha256") or encoder.get("weights_sha256")
    parameters["encoder"] = encoder.get("name", "none") + (f" sha256:{sha}" if sha else "")
    seg_algorithm = hd.AlgorithmIdentificationSequence(
        name="longitudinal", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters=parameters)
    sr_algorithm = hd.sr.AlgorithmIdentification(
        name="longitudinal", version=__version__, parameters=[f"{k}={v}" for k, v in parameters.items()])
    return seg_algorithm, sr_algorithm


def _tracked(findings: Sequence[FindingMeasures], tracking: Mapping[int, tuple[str, str]] | None,
             ) -> dict[int, Tracked]:
    import highdicom as hd

    out = {}
    for f in findings:
        if tracking is not None and f.id in tracking:
            tracking_id, tracking_uid = tracking[f.id]
            out[f.id] = Tracked(str(tracking_id), str(tracking_uid))
        else:
            out[f.id] = Tracked(f"finding {f.id}", str(hd.UID()))
    return out


def _segmentation(record: FindingsRecord, headers: list[Dataset], present: list[FindingMeasures],
                  tracked: dict[int, Tracked], seg_algorithm, deidentified: bool):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    labels = sitk.GetArrayFromImage(record.labels)
    if labels.ndim == 2:
        labels = labels[None]
    order = _source_order(record.labels, headers)
    multi_frame = len(headers) == 1 and int(headers[0].get("NumberOfFrames", 1) or 1) > 1
    frames = labels[order]  # frame k of the SEG is the slice held by source frame k
    stacked = np.stack([frames == f.id for f in present], axis=-1).astype(np.uint8)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=f"{tracked[f.id].tracking_id} (change)"[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=seg_algorithm, tracking_uid=tracked[f.id].tracking_uid,
            tracking_id=tracked[f.id].tracking_id)
        for number, f in enumerate(present, start=1)]
    seg = hd.seg.Segmentation(
        source_images=headers if not multi_frame else headers[:1],
        pixel_array=stacked, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name="longitudinal", software_versions=__version__, device_serial_number="0",
        series_description="longitudinal findings (SEG)", content_label="FINDINGS",
        content_description="Changed tissue of each flagged finding, follow-up vs baseline")
    if deidentified:
        seg.PatientIdentityRemoved = "YES"
        seg.DeidentificationMethod = DEID_METHOD
    return seg


def _procedure(modality: str | None):
    from pydicom.sr.codedict import codes

    return {"MR": codes.cid100.MRIUnspecifiedBodyRegion, "CT": codes.cid100.CTUnspecifiedBodyRegion,
            "PT": codes.cid100.PETUnspecifiedBodyRegion}.get((modality or "").upper(),
                                                            codes.cid100.ImagingProcedure)


def _time_point(record: FindingsRecord, visit_order: int | None):
    """TID 1502: the follow-up's time point, with its offset in days from the baseline (CID 280 Baseline)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    follow, base = record.followup_date, record.baseline_date
    context = hd.sr.TimePointContext(time_point=f"follow-up {_iso(follow) or ''}".strip(),
                                     time_point_order=visit_order, subject_time_point_identifier=follow or None)
    if follow and base:
        days = (_day(follow) - _day(base)).days
        offset = hd.sr.NumContentItem(
            name=codes.DCM.LongitudinalTemporalOffsetFromEvent, value=days, unit=hd.sr.CodedConcept("d", "UCUM", "day"),
            relationship_type=hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT)
        offset.ContentSequence = hd.sr.ContentSequence([hd.sr.CodeContentItem(
            name=codes.DCM.LongitudinalTemporalEventType, value=codes.DCM.Baseline,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)])
        context.append(offset)
    return context


def _iso(d: str | None) -> str | None:
    return _day(d).isoformat() if d else None


def _day(d: str) -> date:
    return date(int(d[:4]), int(d[4:6]), int(d[6:8]))


def _measurements(f: FindingMeasures, planar: bool):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    out = [
        hd.sr.Measurement(name=codes.SCT.Area if planar else codes.SCT.Volume, value=round(f.volume_mm3, 2),
                          unit=codes.UCUM.SquareMillimeter if planar else codes.UCUM.CubicMillimeter),
        hd.sr.Measurement(name=codes.SCT.Score, value=round(f.score, 3), unit=codes.UCUM.NoUnits),
    ]
    if f.diameter_mm is not None:
        out.insert(1, hd.sr.Measurement(name=codes.SCT.Diameter, value=round(f.diameter_mm, 2),
                                        unit=codes.UCUM.Millimeter, derivation=codes.SCT.Maximum))
    if f.mean_change_pct is not None:
        out.insert(-1, hd.sr.Measurement(name=codes.DCM.SignalChange, value=round(f.mean_change_pct, 2),
                                         unit=codes.UCUM.Percent, derivation=codes.SCT.Mean))
    return out


def _report(record: FindingsRecord, headers: list[Dataset], seg, present: list[FindingMeasures],
            tracked: dict[int, Tracked], sr_algorithm, visit_order: int | None, deidentified: bool):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=pydicom.uid.generate_uid(entropy_srcs=["longitudinal", __version__]), name="longitudinal",
            manufacturer_name=MANUFACTURER, model_name="longitudinal"))
    # the follow-up as a whole: its progression score (the highest region score), findings or not
    groups: list = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="whole follow-up"),
        time_point_context=_time_point(record, visit_order), algorithm_id=sr_algorithm,
        measurements=[hd.sr.Measurement(name=codes.SCT.Score, value=round(record.progression_score or 0.0, 3),
                                        unit=codes.UCUM.NoUnits, derivation=codes.SCT.Maximum)])]
    for number, f in enumerate(present, start=1):
        common = dict(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracked[f.id].tracking_uid,
                                                         identifier=tracked[f.id].tracking_id),
            time_point_context=_time_point(record, visit_order), finding_type=codes.SCT.Lesion,
            finding_category=codes.SCT.MorphologicallyAbnormalStructure, algorithm_id=sr_algorithm,
            measurements=_measurements(f, record.planar))
        # TID 1411 also for a 2D follow-up: TID 1410's segmentation-frame reference, as highdicom writes it
        # (frame and segment number both), is refused by dciodvfy
        segment = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(headers[0].SeriesInstanceUID))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=segment, **common))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_procedure(record.modality), imaging_measurements=groups)
    evidence = ([seg] if seg is not None else []) + list(headers)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description="longitudinal findings (TID 1500)")
    if deidentified:
        sr.PatientIdentityRemoved = "YES"
        sr.DeidentificationMethod = DEID_METHOD
    return sr


def write_dicom_outputs(
    comparison: Comparison,
    out_dir: str | os.PathLike,
    *,
    deidentify: bool = False,
    pseudonym: str | None = None,
    uid_key: bytes | None = None,
    tracking: Mapping[int, tuple[str, str]] | None = None,
    visit_order: int | None = None,
) -> dict[str, Path]:
    """Write `findings_seg.dcm` (when there are findings) and `findings_sr.dcm` into out_dir, atomically.

    tracking: finding id -> (Tracking ID, Tracking UID), so a lesion keeps both across visits (see
    `tracking.track`); findings it does not name get "finding <id>" and a new UID. visit_order: the follow-up's
    position among the patient's visits (baseline 1), for the SR's Time Point Order.
    deidentify: `pseudonym` (the report's, e.g. `report.pseudonym(patient_id, key)`) becomes PatientID and
    PatientName; `uid_key` (bytes, kept by the caller, e.g. the batch's `.deid_key`) remaps every source UID.
    Returns {"seg": path, "sr": path} for what was written; nothing for a pair that was not compared.
    """
    if comparison.verdict == "not comparable":
        return {}
    if not is_dicom_image(comparison):
        raise InputError(None, "the follow-up was not read from DICOM: no DICOM SEG/SR can reference it")
    return write_dicom_record(FindingsRecord.from_comparison(comparison), comparison.followup.meta.sources, out_dir,
                              deidentify=deidentify, pseudonym=pseudonym, uid_key=uid_key, tracking=tracking,
                              visit_order=visit_order)


def write_dicom_record(
    record: FindingsRecord,
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    deidentify: bool = False,
    pseudonym: str | None = None,
    uid_key: bytes | None = None,
    tracking: Mapping[int, tuple[str, str]] | None = None,
    visit_order: int | None = None,
) -> dict[str, Path]:
    """`write_dicom_outputs` from a pair's findings record and the follow-up's DICOM files (`sources`, any order):
    what a batch calls once lesions are tracked across the patient's visits (`tracking.Tracking.for_folder`)."""
    if record.verdict == "not comparable":
        return {}
    if deidentify and (not pseudonym or not uid_key):
        raise ValueError("deidentify needs the pseudonym and the UID key")
    headers = _source_headers(sources)
    if deidentify:
        headers = [_deidentified(h, pseudonym, uid_key) for h in headers]
    ids = set(np.unique(sitk.GetArrayViewFromImage(record.labels)).tolist()) - {0}
    present = [f for f in record.findings if f.id in ids]
    if len(present) < len(record.findings):
        log.warning("%d finding(s) too small to keep a voxel on the follow-up grid are left out of the SEG/SR",
                    len(record.findings) - len(present))
    tracked = _tracked(present, tracking)
    seg_algorithm, sr_algorithm = _algorithm(record)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    seg = None
    if present:
        seg = _segmentation(record, headers, present, tracked, seg_algorithm, deidentify)
        paths["seg"] = _save(seg, out / DICOM_FILES["seg"])
    else:
        (out / DICOM_FILES["seg"]).unlink(missing_ok=True)  # a rerun without findings must not keep an old SEG
    sr = _report(record, headers, seg, present, tracked, sr_algorithm, visit_order, deidentify)
    paths["sr"] = _save(sr, out / DICOM_FILES["sr"])
    return paths


def _save(ds: Dataset, path: Path) -> Path:
    return atomic_write(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))


def writer(dicom_out: bool | None):
    """The DICOM SEG/SR as an output writer of `report.write_outputs` (what `--dicom-out` asks for): it gets the
    resolved context, so the SEG and SR carry the report's pseudonym and key."""

    def write(comparison: Comparison, folder: Path, context) -> list[Path]:
        if not wants_dicom_outputs(comparison, dicom_out):
            return []
        return list(write_dicom_outputs(comparison, folder, deidentify=context.deidentify,
                                        pseudonym=context.pseudonym, uid_key=context.key).values())

    return write
