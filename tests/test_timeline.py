"""Finding patients and visits in BIDS, plain and DICOM-tree layouts."""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pydicom
import pytest

from conftest import smooth_volume, write_nifti, write_png
from longitudinal.errors import InputError
from longitudinal.io import load_image
from longitudinal.timeline import Pair, TimelineSettings, discover, pairs


def _nii(path, seed=0, shape=(4, 5, 6), spacing=(1.0, 1.0, 1.0)):
    return write_nifti(path, smooth_volume(shape, seed=seed), spacing=spacing)


# ----------------------------------------------------------------------------- BIDS


def _bids(root, sessions=("ses-01", "ses-02", "ses-10"), subjects=("sub-01", "sub-02")):
    for s, sub in enumerate(subjects):
        for k, ses in enumerate(sessions):
            _nii(root / sub / ses / "anat" / f"{sub}_{ses}_T1w.nii.gz", seed=10 * s + k)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}')
    return root


def test_bids_sessions_in_natural_order_without_tsv(tmp_path):
    root = _bids(tmp_path)
    _nii(root / "derivatives" / "sub-99" / "ses-01" / "anat" / "sub-99_ses-01_T1w.nii.gz")
    _nii(root / ".hidden" / "sub-98" / "ses-01" / "anat" / "x_T1w.nii.gz")
    patients = discover(root)
    assert [p.id for p in patients] == ["sub-01", "sub-02"]
    p = patients[0]
    assert [v.id for v in p.visits] == ["ses-01", "ses-02", "ses-10"]
    assert all(v.date is None and v.kind == "nifti" and v.size == (6, 5, 4) and v.modality == "MR"
               for v in p.visits)
    assert p.visits[1].path.name == "sub-01_ses-02_T1w.nii.gz"


def test_bids_sessions_tsv_acq_time_orders_visits(tmp_path):
    root = _bids(tmp_path)
    (root / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tacq_time\nses-01\t2021-06-01T09:00:00\nses-02\t2022-01-15T10:30:00\n"
        "ses-10\t2020-12-24T08:00:00\n")
    p = discover(root)[0]
    assert [v.id for v in p.visits] == ["ses-10", "ses-01", "ses-02"]
    assert p.visits[0].date == dt.date(2020, 12, 24) and p.visits[0].time == "080000"


def test_bids_picks_t1w_over_others_and_refuses_two_runs(tmp_path):
    root = _bids(tmp_path, subjects=("sub-01",))
    _nii(root / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_FLAIR.nii.gz", seed=5, shape=(3, 3, 3))
    assert discover(root)[0].visits[0].path.name == "sub-01_ses-01_T1w.nii.gz"
    _nii(root / "sub-01" / "ses-02" / "anat" / "sub-01_ses-02_run-2_T1w.nii.gz", seed=6)
    with pytest.raises(InputError, match=r"2 candidate images \(sub-01_ses-02_T1w.nii.gz, sub-01_ses-02_run-2"):
        discover(root)


# ----------------------------------------------------------------------------- plain


def test_plain_layout_dates_files_and_dicom_folders(tmp_path, series_writer):
    root = tmp_path / "studies"
    _nii(root / "alice" / "2021-03-04" / "t1.nii.gz", seed=1)
    _nii(root / "alice" / "20200101.nii.gz", seed=2)
    series_writer(root / "alice" / "2022-05-06" / "series1", patient_id="A1", study_date="20220506")
    write_png(root / "bob" / "2019-01-01.png", np.arange(60).reshape(6, 10))
    write_png(root / "bob" / "2018-07-01.png", np.arange(60).reshape(6, 10)[::-1])
    (root / "alice" / "notes.txt").write_text("visits of alice")
    (root / "README.md").write_text("cohort")
    patients = discover(root)
    alice, bob = patients
    assert [v.id for v in alice.visits] == ["20200101", "2021-03-04", "2022-05-06"]
    assert [v.date for v in alice.visits] == [dt.date(2020, 1, 1), dt.date(2021, 3, 4), dt.date(2022, 5, 6)]
    assert [v.kind for v in alice.visits] == ["nifti", "nifti", "dicom"]
    assert alice.visits[2].size == (10, 12, 6) and alice.visits[2].modality == "MR"
    np.testing.assert_allclose(alice.visits[2].spacing, (0.8, 0.9, 2.5), atol=1e-5)
    assert alice.visits[2].load().size == (10, 12, 6)
    assert [v.id for v in bob.visits] == ["2018-07-01", "2019-01-01"]
    assert bob.visits[0].size == (10, 6) and bob.visits[0].kind == "picture"


def test_plain_ordinal_visit_names(tmp_path):
    for name in ("visit10", "baseline", "visit2"):
        _nii(tmp_path / "p1" / name / "scan.nii.gz")
    assert [v.id for v in discover(tmp_path)[0].visits] == ["baseline", "visit2", "visit10"]


def test_ordinal_names_get_dicom_dates_and_dates_win(tmp_path, series_writer, caplog):
    series_writer(tmp_path / "p1" / "visit1", study_date="20210601")
    series_writer(tmp_path / "p1" / "visit2", study_date="20200601", seed=1)
    with caplog.at_level(logging.WARNING, logger="longitudinal"):
        (p,) = discover(tmp_path)
    assert [(v.id, v.date) for v in p.visits] == [("visit2", dt.date(2020, 6, 1)), ("visit1", dt.date(2021, 6, 1))]
    assert "disagree on the order" in caplog.text


def test_root_that_is_one_patient(tmp_path):
    _nii(tmp_path / "pat" / "tp2.nii.gz")
    _nii(tmp_path / "pat" / "tp1.nii.gz", seed=3)
    (patient,) = discover(tmp_path / "pat")
    assert patient.id == "pat" and [v.id for v in patient.visits] == ["tp1", "tp2"]


def test_plain_visit_name_without_time_is_refused(tmp_path):
    _nii(tmp_path / "p1" / "2021-01-01" / "a.nii.gz")
    _nii(tmp_path / "p1" / "later" / "a.nii.gz")
    with pytest.raises(InputError, match="later: cannot tell when this visit happened"):
        discover(tmp_path)


def test_followup_of_another_patient_is_refused(tmp_path, series_writer):
    series_writer(tmp_path / "p1" / "2020-01-01", patient_id="SECRET-A")
    series_writer(tmp_path / "p1" / "2021-01-01", patient_id="SECRET-B", seed=4)
    with pytest.raises(InputError) as err:
        discover(tmp_path)
    msg = str(err.value)
    assert "PatientID differs from the baseline's" in msg
    assert "2021-01-01" in msg and "2020-01-01" in msg
    assert "SECRET" not in msg  # patient IDs are never printed
    (p,) = discover(tmp_path, allow_mixed_patients=True)
    assert len(p.visits) == 2


# ----------------------------------------------------------------------------- DICOM tree


def test_dicom_tree_groups_by_patient_and_date_and_prefers_3d(tmp_path, series_writer, caplog):
    root = tmp_path / "export"
    series_writer(root / "x" / "y" / "s1", patient_id="P2", study_date="20210101", series_description="vol")
    series_writer(root / "x" / "y" / "s1" / "loc", smooth_volume((1, 12, 10)), patient_id="P2",
                  study_date="20210101", series_description="localizer", seed=1)
    series_writer(root / "z", patient_id="P2", study_date="20200505", study_time="093000", seed=2)
    series_writer(root / "q" / "r", patient_id="P1", study_date="20190101", seed=3)
    series_writer(root / "q" / "t", patient_id="P1", study_date="20190303", seed=4)
    series_writer(root / "derivatives" / "d", patient_id="P9", study_date="20190303", seed=5)
    with caplog.at_level(logging.INFO, logger="longitudinal"):
        patients = discover(root)
    assert [p.id for p in patients] == ["P1", "P2"]
    p2 = patients[1]
    assert [v.id for v in p2.visits] == ["20200505", "20210101"]
    assert p2.visits[0].time == "093000"
    chosen = p2.visits[1]
    assert chosen.description == "vol" and chosen.size == (10, 12, 6)
    meta = chosen.load().meta
    assert meta.series_description == "vol"
    assert meta.series_choice.startswith(f"series {chosen.series_uid} 'vol' (MR, 6 slice(s)) chosen from 2 series")
    assert "'vol' (MR, 6 slice(s)) chosen from 2 series" in caplog.text and "P2" not in caplog.text
    only_loc = discover(root, TimelineSettings(series_description="^(loc.*)?$"))[1].visits[1]
    assert only_loc.description == "localizer" and only_loc.size == (10, 12)


def test_real_dicom_tree_from_pydicom(dicom_tree_subset):
    (patient,) = discover(dicom_tree_subset)
    assert [v.date for v in patient.visits] == [dt.date(2001, 1, 1), dt.date(2003, 5, 5)]
    ct = patient.visits[0]
    assert ct.modality == "CT" and ct.size == (16, 16, 5) and ct.path.name == "CT5N"  # not the 2-slice scout


def test_dicom_tree_with_only_broken_series_names_the_problem(tmp_path, series_writer):
    files = series_writer(tmp_path / "a", patient_id="P1", origin=(0, 0, 0))
    sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))[2].unlink()
    with pytest.raises(InputError, match=r"no usable image series .*1 missing slice\(s\)\? gap of 5.000 mm"):
        discover(tmp_path, TimelineSettings(layout="dicom"))


# ----------------------------------------------------------------------------- pairs and errors


def test_pairs_against_baseline_and_previous(tmp_path):
    for d in ("2020-01-01", "2020-07-01", "2021-01-01"):
        _nii(tmp_path / "p" / f"{d}.nii.gz")
    (p,) = discover(tmp_path)
    base = pairs(p)
    assert [(x.baseline.id, x.followup.id) for x in base] == [("2020-01-01", "2020-07-01"),
                                                               ("2020-01-01", "2021-01-01")]
    assert base[1].interval_days == 366 and isinstance(base[0], Pair) and base[0].patient_id == "p"
    prev = pairs(p, against="previous")
    assert [(x.baseline.id, x.followup.id) for x in prev] == [("2020-01-01", "2020-07-01"),
                                                               ("2020-07-01", "2021-01-01")]
    with pytest.raises(ValueError):
        pairs(p, against="first")


def test_missing_root_file_root_and_empty_root(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        discover(tmp_path / "absent")
    f = _nii(tmp_path / "x.nii.gz")
    with pytest.raises(InputError, match="expected a folder"):
        discover(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no patients found"):
        discover(tmp_path / "empty")


def test_visit_load_fills_date_and_modality_the_nifti_header_lacks(tmp_path):
    for day in ("2020-01-01", "2020-06-01"):
        write_nifti(tmp_path / "P1" / day / "t1.nii.gz", smooth_volume((3, 4, 4)))
    (patient,) = discover(tmp_path)
    image = patient.visits[1].load()
    assert image.meta.study_date == "20200601"
    assert image.meta.modality is None  # a plain NIfTI says nothing about modality, and neither does its folder


# ----------------------------------------------------------------------------- several series in a visit


def test_a_visit_never_takes_the_other_visits_series(tmp_path, series_writer):
    """The baseline folder also holds a copy of the follow-up's series (more slices): it must not be taken."""
    own = series_writer(tmp_path / "p1" / "2020-01-01" / "a", patient_id="P", study_date="20200101",
                        series_description="T1", seed=1)
    copy = smooth_volume((9, 12, 10), seed=2)
    series_writer(tmp_path / "p1" / "2020-01-01" / "b", copy, patient_id="P", study_date="20210101",
                  series_description="T1", series_uid="1.2.826.0.9.2")
    series_writer(tmp_path / "p1" / "2021-01-01", copy, patient_id="P", study_date="20210101",
                  series_description="T1", series_uid="1.2.826.0.9.2")
    (patient,) = discover(tmp_path)
    baseline, followup = patient.visits
    assert followup.series_uid == "1.2.826.0.9.2"
    assert baseline.series_uid == pydicom.dcmread(own[0]).SeriesInstanceUID
    note = baseline.series_choice
    assert note.startswith(f"series {baseline.series_uid} 'T1' (MR, 6 slice(s)) chosen from 2 series in this visit")
    assert "dated 2020-01-01 like the visit (1 left out)" in note
    assert baseline.load().meta.series_choice == note and followup.series_choice is None


def test_undated_visits_leave_out_the_series_found_in_the_other_visit(tmp_path, series_writer):
    series_writer(tmp_path / "p1" / "baseline" / "a", patient_id="P", study_date="20200101", seed=1)
    shared = smooth_volume((9, 12, 10), seed=2)
    for visit in ("baseline", "visit2"):
        series_writer(tmp_path / "p1" / visit / "b", shared, patient_id="P", study_date="20210101",
                      series_uid="1.2.826.0.9.3")
    (patient,) = discover(tmp_path)
    assert [v.series_uid for v in patient.visits][1] == "1.2.826.0.9.3"
    assert patient.visits[0].series_uid != "1.2.826.0.9.3"


def test_two_visits_that_would_use_one_series_are_refused(tmp_path, series_writer):
    shared = smooth_volume((6, 12, 10), seed=2)
    for visit in ("visit1", "visit2"):
        series_writer(tmp_path / "p1" / visit, shared, patient_id="P", study_date="20210101",
                      series_uid="1.2.826.0.9.4")
    with pytest.raises(InputError, match="visits visit1 and visit2 would both use series 1.2.826.0.9.4"):
        discover(tmp_path)


def test_a_series_mixing_patients_is_refused_by_discover(tmp_path, series_writer):
    for day in ("2020-01-01", "2021-01-01"):
        files = series_writer(tmp_path / "p1" / day, patient_id="SECRET-A", study_date=day.replace("-", ""))
    ds = pydicom.dcmread(files[2])
    ds.PatientID = "SECRET-B"
    ds.save_as(files[2])
    with pytest.raises(InputError) as err:
        discover(tmp_path)
    assert "PatientID differs" in str(err.value) and "SECRET" not in str(err.value)
    (patient,) = discover(tmp_path, allow_mixed_patients=True)
    assert patient.visits[1].load(allow_mixed_patients=True).size == (10, 12, 6)


def test_an_unreadable_file_in_a_dicom_tree_is_listed_not_dropped(tmp_path, series_writer):
    for day, seed in (("20200101", 0), ("20210101", 1)):
        series_writer(tmp_path / "export" / day, patient_id="P1", study_date=day, seed=seed)
    (tmp_path / "export" / "lost").mkdir()
    (tmp_path / "export" / "lost" / "IM0001").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(InputError, match="IM0001: not a DICOM file"):
        discover(tmp_path / "export", TimelineSettings(layout="dicom"))
    found = discover(tmp_path / "export", TimelineSettings(layout="dicom"), strict=False)
    assert [len(p.visits) for p in found if p.problem is None] == [2]
    assert any(p.problem and "IM0001" in p.problem for p in found)


# ----------------------------------------------------------------------------- one pair, as compare loads it


def test_load_pair_refuses_a_followup_of_another_patient(tmp_path, series_writer):
    from longitudinal.timeline import check_same_patient, load_pair

    series_writer(tmp_path / "a", patient_id="SECRET-A")
    series_writer(tmp_path / "b", patient_id="SECRET-B", seed=1)
    with pytest.raises(InputError) as err:
        load_pair(tmp_path / "a", tmp_path / "b")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'b'}: PatientID differs from the baseline's ({tmp_path / 'a'})")
    assert "SECRET" not in msg
    base, follow = load_pair(tmp_path / "a", tmp_path / "b", allow_mixed_patients=True)
    with pytest.raises(InputError, match="PatientID differs"):
        check_same_patient(base, follow)  # what Python callers of compare.compare use


def test_load_pair_chooses_a_series_by_rule_never_the_other_inputs(tmp_path, series_writer):
    from longitudinal.timeline import load_pair

    series_writer(tmp_path / "base" / "own", patient_id="P", study_date="20200101", series_description="T1")
    later = smooth_volume((9, 12, 10), seed=3)
    series_writer(tmp_path / "base" / "copy", later, patient_id="P", study_date="20210101", series_uid="1.2.826.0.9.5")
    series_writer(tmp_path / "follow", later, patient_id="P", study_date="20210101", series_uid="1.2.826.0.9.5")
    base, follow = load_pair(tmp_path / "base", tmp_path / "follow")
    assert base.meta.series_uid != "1.2.826.0.9.5" and base.size == (10, 12, 6)
    assert base.meta.series_choice.startswith(f"series {base.meta.series_uid} 'T1' (MR, 6 slice(s)) chosen from 2")
    assert "not also in another visit's folder (1 left out)" in base.meta.series_choice
    assert follow.meta.series_uid == "1.2.826.0.9.5" and follow.meta.series_choice is None


# ----------------------------------------------------------------------------- dates from every source


def test_dates_from_a_bids_sidecar_and_its_modality(tmp_path):
    image = _nii(tmp_path / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_T1w.nii.gz")
    image.with_name("sub-01_ses-01_T1w.json").write_text('{"AcquisitionDateTime": "2021-03-04T10:11:12.5", '
                                                         '"Modality": "CT"}')
    meta = load_image(image).meta
    assert (meta.study_date, meta.study_time, meta.modality) == ("20210304", "101112", "CT")
    assert meta.study_date_source == "BIDS sidecar AcquisitionDateTime"
    image.with_name("sub-01_ses-01_T1w.json").write_text('{"AcquisitionDate": "2021-03-05"}')
    assert load_image(image).meta.study_date == "20210305"
    image.with_name("sub-01_ses-01_T1w.json").write_text('{"AcquisitionDateTime": "last tuesday"}')
    with pytest.raises(InputError, match=r"sub-01_ses-01_T1w.json: AcquisitionDateTime 'last tuesday' is not a valid"):
        load_image(image)


def test_dates_from_bids_sessions_tsv_and_session_names(tmp_path):
    first = _nii(tmp_path / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_T1w.nii.gz")
    dated = _nii(tmp_path / "sub-01" / "ses-20200102" / "anat" / "sub-01_ses-20200102_T1w.nii.gz", seed=1)
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tacq_time\nses-01\t2019-05-06T08:00:00\n")
    meta = load_image(first).meta
    assert (meta.study_date, meta.study_time, meta.study_date_source) == ("20190506", "080000",
                                                                         "BIDS sessions.tsv acq_time")
    meta = load_image(dated).meta
    assert (meta.study_date, meta.study_date_source) == ("20200102", "BIDS session name")
    visits = discover(tmp_path)[0].visits
    assert [v.date for v in visits] == [dt.date(2019, 5, 6), dt.date(2020, 1, 2)]


def test_dates_from_plain_folder_and_file_names_but_not_further_up(tmp_path):
    meta = load_image(_nii(tmp_path / "P001" / "2021-03-04" / "t1.nii.gz")).meta
    assert (meta.study_date, meta.study_date_source) == ("20210304", "folder name")
    meta = load_image(_nii(tmp_path / "P001" / "20200101.nii.gz")).meta
    assert (meta.study_date, meta.study_date_source) == ("20200101", "file name")
    assert load_image(_nii(tmp_path / "2019-01-01-export" / "P002" / "visit1" / "t1.nii.gz")).meta.study_date is None


def test_dates_given_for_the_pair_override_and_say_so(tmp_path, caplog):
    from longitudinal.timeline import load_pair

    a = _nii(tmp_path / "P001" / "2021-03-04" / "t1.nii.gz")
    b = _nii(tmp_path / "P001" / "scan2" / "t1.nii.gz", seed=1)
    with caplog.at_level(logging.WARNING, logger="longitudinal"):
        base, follow = load_pair(a, b, dates=(dt.date(2021, 3, 5), dt.date(2022, 1, 2)))
    assert (base.meta.study_date, base.meta.study_date_source) == ("20210305", "--baseline-date")
    assert (follow.meta.study_date, follow.meta.study_date_source) == ("20220102", "--followup-date")
    assert "--baseline-date 2021-03-05 overrides the date 20210304 from folder name" in caplog.text
    base, follow = load_pair(a, b)
    assert (base.meta.study_date, follow.meta.study_date) == ("20210304", None)
