"""Lesion tracking: findings of successive follow-ups linked by overlap or distance on a grid the pairs share,
one ID and one Tracking UID per lesion, lesions.tsv with FreeSurfer-style slopes; then a real batch over a
sample patient with three visits, against the baseline and against the previous visit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

from longitudinal.batch import run_batch
from longitudinal.tracking import (FindingMeasures, FindingsRecord, TrackingSettings, first_seen_tracking, lesion_table,
                                   slopes, track, track_folders, tracking_uid)

SAMPLES = Path(__file__).resolve().parent.parent / "sample_studies"
SHAPE = (20, 40, 40)  # z, y, x; 1 mm voxels


def _grid(labels: np.ndarray, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    itk = sitk.GetImageFromArray(labels.astype(np.uint16))
    itk.SetOrigin(origin)
    return itk


def _ball(centre_zyx, radius, value, out=None):
    out = np.zeros(SHAPE, np.uint16) if out is None else out
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    inside = (z - centre_zyx[0]) ** 2 + (y - centre_zyx[1]) ** 2 + (x - centre_zyx[2]) ** 2 <= radius ** 2
    out[inside] = value
    return out


def _record(base_visit, follow_visit, date, labels_baseline, labels_followup=None):
    ids = sorted(set(np.unique(labels_baseline).tolist()) - {0})
    findings = tuple(FindingMeasures(id=i, volume_mm3=float((labels_baseline == i).sum()), diameter_mm=4.0,
                                     mean_change_pct=-30.0, score=9.0, centre_mm=(0.0, 0.0, 0.0)) for i in ids)
    follow = labels_baseline if labels_followup is None else labels_followup
    return FindingsRecord(baseline_visit=base_visit, followup_visit=follow_visit, baseline_date="20200101",
                          followup_date=date, findings=findings, labels=_grid(follow, (5.0, 0, 0)),
                          labels_baseline=_grid(labels_baseline), verdict="progression" if ids else "no progression",
                          progression_score=9.0, threshold=4.5, modality="MR", pipeline=("brain-mri", "1.2"))


def test_against_baseline_growth_gap_shift_and_new_lesions():
    v1 = _ball((10, 10, 10), 2, 1)                       # A appears
    _ball((10, 30, 30), 2, 2, v1)                        # C appears
    v2 = _ball((10, 10, 10), 3, 1)                       # A grows (overlaps)
    _ball((10, 10, 22), 2, 2, v2)                        # B: new, 7 mm from A's edge: too far to be A
    # C missed at visit 2
    v3 = _ball((10, 10, 10), 4, 2)                       # A grows again, now numbered 2
    _ball((10, 30, 30), 3, 1, v3)                        # C found again: the same lesion as at visit 1
    _ball((10, 14, 26), 2, 3, v3)                        # B moved 4 mm without overlap: within 5 mm, still B
    records = [_record("v0", "v1", "20200701", v1), _record("v0", "v2", "20210101", v2),
               _record("v0", "v3", "20210701", v3)]
    tracking = track(records, "anon-1")
    by_id = {lesion.id: lesion.seen for lesion in tracking.lesions}
    assert by_id == {"L1": ((0, 1), (1, 1), (2, 2)),   # A: one ID through growth and renumbering
                     "L2": ((0, 2), (2, 1)),           # C: missed once, recognised again
                     "L3": ((1, 2), (2, 3))}           # B: new at v2, shifted 4 mm at v3
    assert tracking.for_record(2) == {2: ("L1", tracking.lesions[0].tracking_uid),
                                      1: ("L2", tracking.lesions[1].tracking_uid),
                                      3: ("L3", tracking.lesions[2].tracking_uid)}
    # UIDs come from where each lesion was first seen: a rerun gives the same ones
    assert tracking.lesions[0].tracking_uid == tracking_uid("anon-1", "v1", 1)
    assert track(records, "anon-1").lesions == tracking.lesions
    # what a pair's DICOM carries before the patient's other pairs are done: right for its first follow-up
    assert first_seen_tracking("anon-1", "v1", [1, 2]) == tracking.for_record(0)


def test_links_are_one_to_one_and_limited_by_distance():
    v1 = _ball((10, 20, 20), 3, 1)
    v2 = _ball((10, 20, 17), 2, 1)                       # overlaps more
    _ball((10, 20, 23), 2, 2, v2)                        # overlaps less: must not take the same lesion
    _ball((10, 5, 35), 1, 3, v2)                         # far from everything: new
    tracking = track([_record("v0", "v1", "20200701", v1), _record("v0", "v2", "20210101", v2)], "p")
    assert [lesion.seen for lesion in tracking.lesions] == [((0, 1), (1, 1)), ((1, 2),), ((1, 3),)]
    v3 = _ball((10, 20, 29), 2, 1)                       # 8 - 2 - 3 = 3 mm gap: linked at 5 mm, not at 2 mm
    records = [_record("v0", "v1", "20200701", v1), _record("v0", "v3", "20210101", v3)]
    assert len(track(records, "p").lesions) == 1
    assert len(track(records, "p", TrackingSettings(max_distance_mm=2.0)).lesions) == 2


def test_against_previous_links_through_the_visit_both_pairs_share():
    """Pair 1 (v0 -> v1) has its findings on v1's grid as follow-up; pair 2 (v1 -> v2) on v1's grid as baseline.
    The other grids differ (offset origins) and must not be used."""
    on_v1_as_followup = _ball((10, 10, 10), 3, 1)
    on_v0 = _ball((12, 12, 12), 3, 1)  # the same lesion seen on the baseline grid: elsewhere
    on_v1_as_baseline = _ball((10, 10, 11), 3, 1)
    on_v2 = _ball((15, 30, 30), 3, 1)
    first = _record("v0", "v1", "20200701", on_v0, on_v1_as_followup)
    second = FindingsRecord(**{**first.__dict__, "baseline_visit": "v1", "followup_visit": "v2",
                               "followup_date": "20210101", "labels_baseline": _grid(on_v1_as_baseline, (5.0, 0, 0)),
                               "labels": _grid(on_v2, (9.0, 0, 0))})
    tracking = track([first, second], "p")
    assert [lesion.seen for lesion in tracking.lesions] == [((0, 1), (1, 1))]
    # with no shared visit (v0 -> v1, then v2 -> v3) nothing can be linked
    third = FindingsRecord(**{**second.__dict__, "baseline_visit": "v2", "followup_visit": "v3"})
    assert len(track([first, third], "p").lesions) == 2


def test_slopes_are_freesurfers_avg_rate_pc1_spc():
    fit = slopes([0.5, 1.5], [100.0, 200.0])
    assert (fit.avg, fit.rate, fit.pc1) == pytest.approx((150.0, 100.0, 100.0))
    assert fit.spc == pytest.approx(100.0 * 100.0 / 150.0)
    three = slopes([0.0, 1.0, 2.0], [10.0, 14.0, 12.0])  # least squares: slope 1, value 12 at the middle
    assert (three.avg, three.rate, three.pc1, three.spc) == pytest.approx((12.0, 1.0, 10.0, 100 / 12))
    assert slopes([1.0], [5.0]) is None


def test_lesion_table_gives_volume_per_visit_first_seen_and_rates(tmp_path):
    v1 = _ball((10, 10, 10), 2, 1)
    v2 = _ball((10, 10, 10), 3, 1)
    _ball((10, 30, 30), 2, 2, v2)
    tracking = track([_record("v0", "v1", "20200701", v1), _record("v0", "v2", "20210701", v2)], "p")
    paths = lesion_table(tracking, tmp_path, prefix="sub-p_")
    with open(paths["table"], newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["lesion"] for r in rows] == ["L1", "L2"]
    growing, new = rows
    volumes = [(v1 == 1).sum(), (v2 == 1).sum()]
    assert growing["volume_mm3_v0"] == "n/a"  # the baseline: nothing to find
    assert float(growing["volume_mm3_v1"]) == volumes[0] and float(growing["volume_mm3_v2"]) == volumes[1]
    assert growing["first_seen"] == "v1" and growing["first_seen_date"] == "2020-07-01"
    assert float(growing["volume_mm3_rate"]) == pytest.approx((volumes[1] - volumes[0]) / (365 / 365.25), rel=1e-3)
    assert new["first_seen"] == "v2" and new["volume_mm3_rate"] == "n/a"  # one visit: no rate
    sidecar = json.loads(paths["sidecar"].read_text())
    assert set(sidecar) == set(rows[0]) and sidecar["volume_mm3_rate"]["Units"] == "mm3/year"


# --------------------------------------------------------------------------- a real batch

VISITS = {"ses-01": "20200115", "ses-02": "20200720", "ses-03": "20210118"}  # sample_studies/easy/sub-01


@pytest.fixture(scope="module")
def three_visits(tmp_path_factory) -> Path:
    """The easy set's patient with three visits as DICOM series (its ground truth: L1 new at ses-02 and still
    there at ses-03, L2 new and L3 growing at ses-03), so one run checks tracking and the DICOM objects."""
    from dicom_writer import write_dicom_series

    root = tmp_path_factory.mktemp("studies") / "dicom"  # <patient>/<visit>/ of DICOM files
    for number, (visit, date) in enumerate(VISITS.items(), start=1):
        image = sitk.ReadImage(str(SAMPLES / f"easy/sub-01/{visit}/anat/sub-01_{visit}_T1w.nii.gz"))
        assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        write_dicom_series(root / "EASY01" / visit, sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                           patient_id="EASY01", patient_name="EASY^SUBJECT", study_date=date, modality="MR",
                           series_description="T1w", seed=number)
    return root


def _truth_centres(visit: str) -> dict[str, np.ndarray]:
    doc = json.loads((SAMPLES / "easy/derivatives/changes/sub-01" / visit / "changes.json").read_text())
    return {c["id"]: np.asarray(c["centre_mm"]) for c in doc["changes"]}


def test_batch_against_baseline_keeps_a_lesions_id_and_tracking_uid(three_visits, tmp_path):
    out = tmp_path / "out"
    summary = run_batch(three_visits, out, pipeline="brain-mri", progress=False)
    assert summary.ok == 2
    pairs = [out / "EASY01" / v for v in ("ses-02", "ses-03")]
    tracking = track_folders(pairs, "EASY01")
    with open(out / "EASY01" / "lesions.tsv", newline="") as fh:
        rows = {r["lesion"]: r for r in csv.DictReader(fh, delimiter="\t")}
    def truth_of(k: int, fid: int) -> str | None:
        """The ground-truth change a finding is (its centre, mapped into the follow-up, near the truth's)."""
        record = tracking.records[k]
        centre = next(f.centre_mm for f in record.findings if f.id == fid)  # baseline space
        transform = sitk.ReadTransform(str(pairs[k] / "transform.tfm"))
        in_followup = np.asarray(transform.TransformPoint(centre))
        distances = {t: np.linalg.norm(c - in_followup)
                     for t, c in _truth_centres(record.followup_visit).items()}
        best = min(distances, key=distances.get)
        return best if distances[best] < 6.0 else None

    # the truth lesion L1 is found at both follow-ups: one lesion, its two volumes in lesions.tsv
    l1 = [lesion for lesion in tracking.lesions if {truth_of(k, f) for k, f in lesion.seen} == {"L1"}]
    assert len(l1) == 1 and len(l1[0].seen) == 2, [(x.id, x.seen) for x in tracking.lesions]
    row = rows[l1[0].id]
    assert row["volume_mm3_ses-01"] == "n/a"
    assert float(row["volume_mm3_ses-02"]) > 100 and float(row["volume_mm3_ses-03"]) > 100
    assert row["first_seen"] == "ses-02" and row["first_seen_date"] == "2020-07-20" and row["n_seen"] == "2"
    assert row["volume_mm3_rate"] != "n/a"
    assert (out / "EASY01" / "lesions.png").stat().st_size > 0
    page = (out / "summary.html").read_text()  # the plot, embedded: the summary is one self-contained page
    assert "lesions of EASY01" in page and page.count('src="data:image/png;base64,') >= 1
    seen = [s for lesion in tracking.lesions for s in lesion.seen]
    assert len(seen) == len(set(seen)) == sum(len(r.findings) for r in tracking.records)

    # its DICOM SEG and SR at both follow-ups carry the same Tracking ID and UID
    for k, folder in enumerate(pairs):
        fid = next(f for j, f in l1[0].seen if j == k)
        seg = hd.seg.segread(folder / "findings_seg.dcm")
        present = [f.id for f in tracking.records[k].findings]
        description = seg.get_segment_description(present.index(fid) + 1)
        assert (description.tracking_id, description.tracking_uid) == (l1[0].id, l1[0].tracking_uid)
        groups = hd.sr.srread(folder / "findings_sr.dcm").content.get_volumetric_roi_measurement_groups()
        assert l1[0].tracking_uid in {g.tracking_uid for g in groups}
    # every other lesion has its own UID in the last SEG
    last = hd.seg.segread(pairs[1] / "findings_seg.dcm")
    uids = [uid for _, uid in last.get_tracking_ids()]
    assert len(uids) == len(set(uids)) == len(tracking.records[1].findings)


def test_batch_against_previous(three_visits, tmp_path):
    out = tmp_path / "out"
    summary = run_batch(three_visits, out, pipeline="brain-mri", against="previous", progress=False)
    assert summary.ok == 2
    records = [FindingsRecord.load(out / "EASY01" / v) for v in ("ses-02", "ses-03")]
    assert [(r.baseline_visit, r.followup_visit) for r in records] == [("ses-01", "ses-02"), ("ses-02", "ses-03")]
    with open(out / "EASY01" / "lesions.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    # against the previous visit, L1 (unchanged since ses-02) is no change at ses-03; L2 and L3 are new there
    assert sum(len(r.findings) for r in records) == sum(int(r["n_seen"]) for r in rows)
    assert {r["first_seen"] for r in rows} == {"ses-02", "ses-03"}
    assert len({r["tracking_uid"] for r in rows}) == len(rows)
