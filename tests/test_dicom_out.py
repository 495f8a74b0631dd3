"""DICOM SEG and TID 1500 SR of a follow-up: valid for dciodvfy, read back by highdicom, segments equal to the
flagged mask, tracking carried, and nothing of the identity left when de-identified."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from longitudinal.compare import Comparison, ScoredRegion, compare
from longitudinal.cli import _dicom_arguments
from longitudinal.dicom_out import (DICOM_FILES, dicom_sources, remap_uid, wants_dicom_outputs,
                                    write_dicom_outputs, write_dicom_record)
from longitudinal.errors import InputError
from longitudinal.io import load_image
from longitudinal.pipeline import load
from longitudinal.report import write_outputs
from longitudinal.tracking import FindingsRecord

SAMPLES = Path(__file__).resolve().parent.parent / "sample_studies" / "dicom"
BASELINE = SAMPLES / "STA8A648BF" / "SE5AF83877"
FOLLOWUP = SAMPLES / "STDCE25BFB" / "SEE1A2A8F9"
KEY = bytes(range(32))
PSEUDONYM = "anon-5e1f00c0ffee"


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's error lines for one file (it exits non-zero on errors)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian dicom3tools; .ci/run installs it)")
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    assert (done.returncode == 0) == (not errors), done.stderr[-2000:]
    return errors


def segment_masks(path: Path, reference: sitk.Image) -> dict[int, np.ndarray]:
    """Segment number -> (z, y, x) mask on `reference`'s grid, each SEG frame placed by its ImagePositionPatient."""
    seg = hd.seg.segread(path)
    shape = tuple(reversed(reference.GetSize()))
    out = {n: np.zeros(shape, bool) for n in seg.segment_numbers}
    pixels = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    slices = np.array([reference.TransformIndexToPhysicalPoint((0, 0, z)) for z in range(shape[0])])
    for k, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        distance = np.linalg.norm(slices - position, axis=1)
        assert distance.min() < 1e-3, "a SEG frame lies on no slice of the follow-up"
        out[number][int(np.argmin(distance))] |= pixels[k].astype(bool)
    return out


def every_value(ds: pydicom.Dataset) -> list[tuple[str, str]]:
    """(keyword, value as text) of every element, nested sequences and the file meta included."""
    out = []
    for source in (ds, getattr(ds, "file_meta", pydicom.Dataset())):
        for element in source.iterall():
            if element.VR != "SQ":
                value = element.value
                out.append((element.keyword, value.hex() if isinstance(value, bytes) and len(value) < 256
                            else str(value)))
    return out


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The sample DICOM pair compared once, its report folder, and SEG/SR written plainly and de-identified."""
    out = tmp_path_factory.mktemp("dicom")
    comparison = compare(load_image(BASELINE), load_image(FOLLOWUP))
    write_outputs(comparison, out / "plain")
    tracking = {f.id: (f"L{f.id}", hd.UID()) for f in comparison.findings}
    plain = write_dicom_outputs(comparison, out / "plain", tracking=tracking, visit_order=2)
    deid = write_dicom_outputs(comparison, out / "deid", deidentify=True, pseudonym=PSEUDONYM, uid_key=KEY,
                               tracking=tracking, visit_order=2)
    return comparison, out, plain, deid, tracking


def test_sample_followup_seg_and_sr_are_valid_dicom(sample):
    comparison, _, plain, deid, _ = sample
    assert comparison.findings, "the sample follow-up has two real changes"
    for paths in (plain, deid):
        assert set(paths) == {"seg", "sr"}
        for path in paths.values():
            assert dciodvfy(path) == [], path.name


def test_segments_are_the_flagged_mask_on_the_followup_frames(sample):
    comparison, out, plain, _, tracking = sample
    mask = sitk.ReadImage(str(out / "plain" / "flagged_mask.nii.gz"))
    labels = sitk.GetArrayFromImage(comparison.finding_labels.itk)
    segments = segment_masks(plain["seg"], mask)
    union = np.zeros(labels.shape, bool)
    for number, finding in enumerate(comparison.findings, start=1):
        assert np.array_equal(segments[number], labels == finding.id)
        union |= segments[number]
    assert np.array_equal(union, sitk.GetArrayFromImage(mask) > 0)
    seg = hd.seg.segread(plain["seg"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == comparison.followup.meta.series_uid
    sources = {pydicom.dcmread(s, stop_before_pixels=True).SOPInstanceUID for s in comparison.followup.meta.sources}
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} <= sources
    for number, finding in enumerate(comparison.findings, start=1):
        description = seg.get_segment_description(number)
        assert description.tracking_id == tracking[finding.id][0]
        assert description.tracking_uid == tracking[finding.id][1]
        assert description.segmented_property_type == hd.sr.CodedConcept("52988006", "SCT", "Lesion")


def test_sr_reloads_with_each_findings_measures_and_references(sample):
    comparison, _, plain, _, tracking = sample
    seg = hd.seg.segread(plain["seg"])
    sr = hd.sr.srread(plain["sr"])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(comparison.findings)
    for number, (group, finding) in enumerate(zip(groups, comparison.findings), start=1):
        assert group.tracking_uid == tracking[finding.id][1]
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert group.referenced_segment.referenced_segment_numbers == [number]
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert values["Volume"] == pytest.approx(finding.volume_mm3)
        assert values["Diameter"] == pytest.approx(finding.diameter_mm)
        assert values["Signal change"] == pytest.approx(finding.mean_change_pct)
        assert values["Score (attribute)"] == pytest.approx(finding.score)
        assert values["Time Point Order"] == 2
        assert values["Longitudinal Temporal Offset from Event"] == 219  # 2022-03-15 -> 2022-10-20
    whole, = sr.content.get_image_measurement_groups()
    scores = {m.name.meaning: m.value for m in whole.get_measurements()}
    assert scores["Score (attribute)"] == pytest.approx(comparison.progression_score, abs=1e-3)
    text = "\n".join(v for _, v in every_value(pydicom.dcmread(plain["sr"])))
    assert comparison.followup.meta.series_uid in text  # the source series is referenced
    assert f"pipeline={comparison.pipeline.name} {comparison.pipeline.version}" in text
    assert comparison.encoder["weights_sha256"] in text


def test_deidentified_outputs_carry_the_pseudonym_and_nothing_of_the_identity(sample):
    comparison, _, plain, deid, _ = sample
    original = pydicom.dcmread(comparison.followup.meta.sources[0], stop_before_pixels=True)
    uids = {str(pydicom.dcmread(s, stop_before_pixels=True).SOPInstanceUID) for s in comparison.followup.meta.sources}
    uids |= {str(original.StudyInstanceUID), str(original.SeriesInstanceUID), str(original.FrameOfReferenceUID)}
    secrets = {str(original.PatientID), str(original.PatientBirthDate), str(original.AccessionNumber),
               *str(original.PatientName).replace("^", " ").split()} | uids
    for path in deid.values():
        ds = pydicom.dcmread(path)
        for keyword, value in every_value(ds):
            leaked = [s for s in secrets if s.lower() in value.lower()]
            assert not leaked, f"{path.name} {keyword}: {leaked}"
        assert ds.PatientID == PSEUDONYM and ds.PatientName.family_name == PSEUDONYM
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.StudyInstanceUID == remap_uid(str(original.StudyInstanceUID), KEY)
        assert ds.StudyDate == original.StudyDate  # dates are kept, as in the report
    seg = pydicom.dcmread(deid["seg"])
    assert seg.FrameOfReferenceUID == remap_uid(str(original.FrameOfReferenceUID), KEY)
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= {remap_uid(u, KEY) for u in uids}
    # the same key maps a UID the same way every time (a visit keeps its UIDs in every pair); another key does not
    assert remap_uid(str(original.StudyInstanceUID), KEY) == remap_uid(str(original.StudyInstanceUID), bytes(KEY))
    assert remap_uid(str(original.StudyInstanceUID), KEY[::-1]) != ds.StudyInstanceUID
    # and the de-identified segments are the same voxels as the plain ones
    reference = comparison.finding_labels.itk
    plain_masks, deid_masks = segment_masks(plain["seg"], reference), segment_masks(deid["seg"], reference)
    assert all(np.array_equal(plain_masks[n], deid_masks[n]) for n in plain_masks)


def test_rebuilt_from_the_pair_folder_record_with_sources_in_any_order(sample, tmp_path):
    """What a batch does after tracking: the record saved by the pair, the follow-up's files found again."""
    comparison, _, plain, _, _ = sample
    FindingsRecord.from_comparison(comparison).save(tmp_path / "pair")
    record = FindingsRecord.load(tmp_path / "pair")
    sources = dicom_sources(FOLLOWUP)
    assert sorted(sources) == sorted(comparison.followup.meta.sources)
    paths = write_dicom_record(record, sources[::-1], tmp_path / "pair", tracking={1: ("L7", "2.25.77")})
    masks = segment_masks(paths["seg"], comparison.finding_labels.itk)
    assert all(np.array_equal(masks[n], segment_masks(plain["seg"], comparison.finding_labels.itk)[n])
               for n in masks)
    assert hd.seg.segread(paths["seg"]).get_segment_description(1).tracking_id == "L7"


# --------------------------------------------------------------------------- synthetic series (fast)


def _synthetic(tmp_path, series_writer, labels_zyx: np.ndarray, findings: list[ScoredRegion], **series):
    """A Comparison-shaped object over a real DICOM series written with shuffled file names."""
    files = series_writer(tmp_path / "follow", **series)  # (6, 12, 10) voxels
    followup = load_image(tmp_path / "follow")
    assert sorted(followup.meta.sources) == sorted(str(f) for f in files)
    itk = sitk.GetImageFromArray(labels_zyx.astype(np.uint16))
    itk.CopyInformation(followup.itk)
    labels = followup.with_itk(itk)
    baseline = followup  # what the SR reads of it: the study date
    return Comparison(
        baseline=baseline, followup=followup, registered=followup, baseline_harmonised=followup,
        followup_harmonised=followup, change_map_baseline=labels, change_map=labels, flagged_mask=labels,
        regions=tuple(findings), progression_score=9.0 if findings else 0.0, progression=bool(findings),
        threshold=4.0, false_alarm_rate=1e-4, registration=None, pipeline=load("brain-mri"),
        encoder={"name": "efficientnet-lite0", "weights_sha256": "ab" * 32}, timings_s={},
        verdict="progression" if findings else "no progression", finding_labels=labels,
        finding_labels_baseline=labels)


def _finding(k: int) -> ScoredRegion:
    return ScoredRegion(id=k, label="change", centre_mm=(0.0, 0.0, 0.0), bbox=((0, 0, 0), (1, 1, 1)),
                        volume_mm3=12.5 * k, score=5.0 + k, flagged=True, diameter_mm=3.0 + k, mean_change_pct=-20.0)


def test_oblique_reversed_series_frames_match_their_files(tmp_path, series_writer):
    """Slices whose normal points against the file order, tilted, with random file names and instance numbers:
    each SEG frame must sit on the slice of its own source file (ImagePositionPatient), first and last included."""
    labels = np.zeros((6, 12, 10), np.uint16)
    labels[0, 2:5, 3:6] = 1
    labels[5, 7:9, 1:3] = 2
    labels[3, 5, 5] = 2
    c, s = np.cos(0.3), np.sin(0.3)
    comparison = _synthetic(tmp_path, series_writer, labels, [_finding(1), _finding(2)],
                            iop=(c, 0.0, -s, 0.0, -1.0, 0.0), instance_numbers=[4, 2, 6, 1, 5, 3])
    paths = write_dicom_outputs(comparison, tmp_path / "out")
    masks = segment_masks(paths["seg"], comparison.finding_labels.itk)
    truth = sitk.GetArrayFromImage(comparison.finding_labels.itk)
    assert np.array_equal(masks[1], truth == 1) and np.array_equal(masks[2], truth == 2)
    seg = pydicom.dcmread(paths["seg"])
    by_file = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID):
               np.asarray(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, float)
               for f in comparison.followup.meta.sources}
    for item in seg.PerFrameFunctionalGroupsSequence:  # each frame says which file it is drawn on
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose(item.PlanePositionSequence[0].ImagePositionPatient, by_file[source], atol=1e-4)
    assert dciodvfy(paths["seg"]) == [] and dciodvfy(paths["sr"]) == []


def test_no_findings_gives_a_report_without_a_segmentation(tmp_path, series_writer):
    comparison = _synthetic(tmp_path, series_writer, np.zeros((6, 12, 10), np.uint16), [])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / DICOM_FILES["seg"]).write_bytes(b"stale")  # from an earlier run with findings
    paths = write_dicom_outputs(comparison, tmp_path / "out")
    assert set(paths) == {"sr"} and not (tmp_path / "out" / DICOM_FILES["seg"]).exists()
    content = hd.sr.srread(paths["sr"]).content
    assert content.get_volumetric_roi_measurement_groups() == []
    whole, = content.get_image_measurement_groups()  # the follow-up's own score is still reported
    assert {m.name.meaning: m.value for m in whole.get_measurements()}["Score (attribute)"] == 0.0
    assert dciodvfy(paths["sr"]) == []


def test_dicom_out_flags(tmp_path, series_writer, nibabel_file):
    parser = argparse.ArgumentParser()
    _dicom_arguments(parser)
    assert parser.parse_args([]).dicom_out is None
    assert parser.parse_args(["--dicom-out"]).dicom_out is True
    assert parser.parse_args(["--no-dicom-out"]).dicom_out is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--dicom-out", "--no-dicom-out"])
    from_dicom = _synthetic(tmp_path, series_writer, np.zeros((6, 12, 10), np.uint16), [])
    assert wants_dicom_outputs(from_dicom, None) and wants_dicom_outputs(from_dicom, True)
    assert not wants_dicom_outputs(from_dicom, False)
    nifti = load_image(nibabel_file("example4d.nii.gz").parent / "anatomical.nii")
    from_nifti = Comparison(**{**from_dicom.__dict__, "followup": nifti})
    assert not wants_dicom_outputs(from_nifti, None) and not wants_dicom_outputs(from_nifti, False)
    with pytest.raises(InputError, match="--dicom-out needs a follow-up read from DICOM"):
        wants_dicom_outputs(from_nifti, True)
    not_comparable = Comparison(**{**from_dicom.__dict__, "verdict": "not comparable"})
    assert not wants_dicom_outputs(not_comparable, None)
    assert write_dicom_outputs(not_comparable, tmp_path / "nc") == {}


def test_a_single_slice_followup(tmp_path, pydicom_file):
    """A 2D follow-up (one MR slice with its position): one frame, area instead of volume."""
    image = load_image(pydicom_file("MR_small.dcm"))
    assert image.dim == 2
    labels = np.zeros(tuple(reversed(image.size)), np.uint16)
    labels[10:20, 30:36] = 1
    itk = sitk.GetImageFromArray(labels)
    itk.CopyInformation(image.itk)
    finding = ScoredRegion(id=1, label="change", centre_mm=(0.0, 0.0), bbox=((30, 10), (36, 20)), volume_mm3=37.5,
                           score=6.0, flagged=True, diameter_mm=8.0, mean_change_pct=12.0)
    comparison = Comparison(
        baseline=image, followup=image, registered=image, baseline_harmonised=image, followup_harmonised=image,
        change_map_baseline=image.with_itk(itk), change_map=image.with_itk(itk), flagged_mask=image.with_itk(itk),
        regions=(finding,), progression_score=6.0, progression=True, threshold=4.0, false_alarm_rate=1e-4,
        registration=None, pipeline=load("generic-2d"), encoder={"name": "none"}, timings_s={},
        verdict="progression", finding_labels=image.with_itk(itk), finding_labels_baseline=image.with_itk(itk))
    paths = write_dicom_outputs(comparison, tmp_path)
    seg = hd.seg.segread(paths["seg"])
    assert np.array_equal(np.asarray(seg.pixel_array).reshape(labels.shape) > 0, labels > 0)
    group, = hd.sr.srread(paths["sr"]).content.get_volumetric_roi_measurement_groups()
    assert {m.name.meaning: m.value for m in group.get_measurements()}["Area"] == 37.5
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert dciodvfy(paths["seg"]) == [] and dciodvfy(paths["sr"]) == []


# --------------------------------------------------------------------------- a real PACS

_ORTHANC_CLIENT = r'''
import email.parser, json, sys, time, urllib.request
base, files, study, wanted = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
def call(path, data=None, accept=None):
    request = urllib.request.Request(base + path, data=data, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read(), response.headers.get("Content-Type", "")
for _ in range(100):
    try:
        call("/system"); break
    except OSError:
        time.sleep(0.1)
for f in files:
    call("/instances", open(f, "rb").read())
found = {}
for series in json.loads(call(f"/dicom-web/studies/{study}/series", accept="application/dicom+json")[0]):
    found[series["0008103E"]["Value"][0]] = series["0020000E"]["Value"][0]
out = {}
for description in wanted:
    series = found[description]
    instances = json.loads(call(f"/dicom-web/studies/{study}/series/{series}/instances",
                                accept="application/dicom+json")[0])
    sop = instances[0]["00080018"]["Value"][0]
    body, kind = call(f"/dicom-web/studies/{study}/series/{series}/instances/{sop}",
                      accept='multipart/related; type="application/dicom"')
    message = email.parser.BytesParser().parsebytes(b"Content-Type: " + kind.encode() + b"\r\n\r\n" + body)
    part, = [p for p in message.walk() if p.get_content_type() == "application/dicom"]
    out[description] = sys.argv[5] + "/" + description.replace(" ", "_") + ".dcm"
    open(out[description], "wb").write(part.get_payload(decode=True))
print(json.dumps(out))
call("/tools/shutdown", b"")
'''


def test_seg_and_sr_go_through_orthancs_dicomweb(sample, tmp_path):
    """Upload the follow-up, its SEG and SR to Orthanc (in a private network namespace: it listens on every
    interface), find them with QIDO-RS and fetch them with WADO-RS: they come back as written."""
    import json
    import sys

    orthanc, plugin = shutil.which("Orthanc"), Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if orthanc is None or not plugin.exists() or shutil.which("unshare") is None:
        pytest.skip("Orthanc with its DICOMweb plugin (Debian orthanc, orthanc-dicomweb) and unshare needed")
    comparison, _, plain, _, _ = sample
    config = {"Name": "test", "StorageDirectory": str(tmp_path / "db"), "IndexDirectory": str(tmp_path / "db"),
              "HttpPort": 8042, "DicomPort": 4242, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "Plugins": [str(plugin)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    (tmp_path / "client.py").write_text(_ORTHANC_CLIENT)
    files = [*comparison.followup.meta.sources, str(plain["seg"]), str(plain["sr"])]
    study = str(pydicom.dcmread(plain["seg"], stop_before_pixels=True).StudyInstanceUID)
    wanted = ["longitudinal findings (SEG)", "longitudinal findings (TID 1500)"]
    script = (f"ip link set lo up || exit 9; {orthanc} {tmp_path / 'orthanc.json'} >{tmp_path / 'orthanc.log'} 2>&1 & "
              f"pid=$!; {sys.executable} {tmp_path / 'client.py'} http://127.0.0.1:8042 '{json.dumps(files)}' "
              f"{study} '{json.dumps(wanted)}' {tmp_path}; status=$?; kill $pid 2>/dev/null; wait $pid; exit $status")
    done = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no private network namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    fetched = json.loads(done.stdout.strip().splitlines()[-1])
    seg = hd.seg.segread(fetched[wanted[0]])
    assert seg.SOPInstanceUID == pydicom.dcmread(plain["seg"]).SOPInstanceUID
    assert np.array_equal(seg.pixel_array, hd.seg.segread(plain["seg"]).pixel_array)
    groups = hd.sr.srread(fetched[wanted[1]]).content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(comparison.findings)
