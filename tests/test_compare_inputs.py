"""`longitudinal compare` on what it is given: identity, dates, size, write failures (the inputs side of compare)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pydicom
import pytest

from conftest import huge_png_header
from fuzz import CHEAP_PIPELINE as CHEAP  # one quick rigid stage, intensity change only
from longitudinal import cli

SAMPLES = Path(__file__).resolve().parent.parent / "sample_studies"


def test_compare_refuses_a_followup_of_another_patient_before_any_work(tmp_path, series_writer, capsys):
    series_writer(tmp_path / "a", patient_id="SECRET-A")
    series_writer(tmp_path / "b", patient_id="SECRET-B", seed=1)
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"longitudinal: error: {tmp_path / 'b'}: PatientID differs from the "
                                               f"baseline's ({tmp_path / 'a'})")
    assert "SECRET" not in err[0] and "--allow-mixed-patients" in err[0]
    assert not (tmp_path / "out").exists()


def test_compare_refuses_a_series_with_a_slice_of_another_patient(tmp_path, series_writer, capsys):
    series_writer(tmp_path / "a", patient_id="SECRET-A")
    files = series_writer(tmp_path / "b", patient_id="SECRET-A", seed=1)
    ds = pydicom.dcmread(files[1])
    ds.PatientID = "SECRET-B"
    ds.save_as(files[1])
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "PatientID differs" in err and "SECRET" not in err


def test_compare_dates_must_be_iso(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare", "a.nii", "b.nii", "-o", str(tmp_path), "--baseline-date", "04/03/2021"])
    assert exit_.value.code == 2
    assert "--baseline-date: expected an ISO date such as 2021-03-04, got '04/03/2021'" in capsys.readouterr().err


def test_compare_refuses_a_10000_pixel_pair_in_one_line_within_seconds(tmp_path, capsys):
    a, b = huge_png_header(tmp_path / "a.png"), huge_png_header(tmp_path / "b.png")
    start = time.perf_counter()
    assert cli.main(["compare", str(a), str(b), "-o", str(tmp_path / "out")]) == 2
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"longitudinal: error: {a}: image too large: 10000x10000 voxels x 3 channel(s) = 300,000,000 "
                   "values, over the limit of 33,554,432; raise [input] max_voxels in a pipeline file, or set [input] "
                   "too_large = \"downsample\""]
    print(f"refused in {seconds:.2f} s")  # a figure for the log, not an assert (benchmarks/ measures it)


def test_a_write_that_fails_is_one_line_and_status_3(tmp_path, monkeypatch, capsys):
    from longitudinal.errors import OutputError

    def full_disk(*args, **kwargs):
        raise OutputError(f"{tmp_path / 'out' / 'report.html'}: not written: No space left on device")

    monkeypatch.setattr("longitudinal.timeline.load_pair", full_disk)
    assert cli.main(["compare", "a.nii", "b.nii", "-o", str(tmp_path / "out")]) == 3  # cannot write: not bad input
    assert capsys.readouterr().err.strip().splitlines() == [
        f"longitudinal: error: {tmp_path / 'out' / 'report.html'}: not written: No space left on device"]


def test_compare_on_files_reports_their_dates_and_choices(tmp_path):
    """Dates from folder names and --followup-date reach result.json (the report showed "baseline -" before)."""
    pipeline = tmp_path / "cheap.toml"
    pipeline.write_text(CHEAP)
    base = tmp_path / "F001" / "2020-01-10" / "fundus.png"
    base.parent.mkdir(parents=True)
    shutil.copy(SAMPLES / "fundus/F001/2020-01-10/fundus.png", base)
    follow = SAMPLES / "fundus/F001/2020-08-05/fundus.png"
    out = tmp_path / "out"
    assert cli.main(["compare", str(base), str(follow), "-o", str(out), "--pipeline", str(pipeline),
                     "--followup-date", "2020-08-06"]) == 0
    visits = {v["role"]: v for v in json.loads((out / "result.json").read_text())["visits"]}
    assert visits["baseline"]["study_date"] == "20200110" and visits["followup"]["study_date"] == "20200806"
    assert visits["baseline"]["size"] == [256, 256]  # 512x512 RGB averaged down by the pipeline's [input] table
