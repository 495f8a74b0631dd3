"""Batch runs over a studies folder of real scans (nilearn's MNI152 at 6 mm), with the test scaffolding of
test_report.make_comparison standing in for compare.compare (its workers import it by name)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from longitudinal import batch, report
from longitudinal.pipeline import Pipeline
from test_report import TEST_PIPELINE, make_comparison, mni, with_lesion

FAST = report.ReportSettings(max_region_figures=1, overview_slices=3, max_table_rows=10)
IDS = ("PSECRET-0042", "PSTABLE-0003", "PBROKEN-0007")


def _write(itk: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(itk, str(path), True)
    return path


def _noisy(itk: sitk.Image, seed: int) -> sitk.Image:
    arr = sitk.GetArrayFromImage(itk)
    arr = arr + np.random.default_rng(seed).normal(0, 1.0, arr.shape).astype(np.float32)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(itk)
    return out


@pytest.fixture()
def studies(tmp_path) -> Path:
    """Plain layout: <patient>/<date>.nii.gz. One patient with a growing lesion over 3 visits, one stable,
    one whose follow-up file is truncated (header readable, voxels not)."""
    root = tmp_path / "studies"
    base = mni(6.0)
    centre = (20.0, -10.0, 20.0)
    _write(_noisy(base, 1), root / IDS[0] / "2020-01-10.nii.gz")
    _write(_noisy(with_lesion(base, centre, 7.0, 50.0), 2), root / IDS[0] / "2020-07-12.nii.gz")
    _write(_noisy(with_lesion(base, centre, 12.0, 70.0), 3), root / IDS[0] / "2021-01-15.nii.gz")
    _write(_noisy(base, 4), root / IDS[1] / "baseline.nii.gz")
    _write(_noisy(base, 5), root / IDS[1] / "visit1.nii.gz")
    _write(_noisy(base, 6), root / IDS[2] / "2019-03-01.nii.gz")
    broken = _write(_noisy(base, 7), root / IDS[2] / "2019-09-01.nii.gz")
    data = gzip.decompress(broken.read_bytes())
    broken.write_bytes(gzip.compress(data[: 352 + 1000]))  # NIfTI header intact, voxels cut off
    return root


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "summary.csv").open()))


def test_batch_reports_every_pair_lists_the_failure_and_keeps_going(studies, tmp_path, capsys):
    out = tmp_path / "out"
    s = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST)
    assert (s.ok, s.failed, s.skipped) == (3, 1, 0) and s.exit_code == 1
    rows = _rows(out)
    assert len(rows) == 4
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]  # failures listed last
    scores = [float(r["progression_score"]) for r in rows[:3]]
    assert scores == sorted(scores, reverse=True)  # worst first
    failed = rows[-1]
    assert failed["patient"] == IDS[2] and "2019-09-01.nii.gz" in failed["error"] and failed["report"] == ""
    for r in rows[:3]:
        folder = out / Path(r["report"]).parent
        assert (out / r["report"]).is_file() and report.is_complete(folder)
        assert json.loads((folder / "result.json").read_text())["progression_score"] == pytest.approx(
            float(r["progression_score"]), rel=1e-5)
    # the growing lesion is the worst pair, and its later visit scores higher than its earlier one
    lesion = {r["followup_visit"]: float(r["progression_score"]) for r in rows if r["patient"] == IDS[0]}
    stable = [float(r["progression_score"]) for r in rows if r["patient"] == IDS[1]][0]
    assert lesion["2021-01-15"] > lesion["2020-07-12"] > stable
    assert rows[0]["patient"] == IDS[0]
    page = (out / "summary.html").read_text()
    assert page.count("<img") == 1  # timeline of the only patient with 3 visits
    assert "http://" not in page and all(src.startswith("data:") for src in _srcs(page))
    assert "2019-09-01.nii.gz" in page and "href='PSECRET-0042/2021-01-15/report.html'" in page
    assert "comparing" not in capsys.readouterr().err  # no progress bar when stderr is not a terminal


def test_a_patient_whose_headers_cannot_be_read_is_listed_and_the_rest_compared(studies, tmp_path):
    (studies / IDS[1] / "visit1.nii.gz").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    s = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST,
                        progress=False)
    assert s.failed == 2 and s.ok == 2 and s.exit_code == 1
    rows = _rows(out)
    unreadable = [r for r in rows if r["patient"] == IDS[1]]
    assert len(unreadable) == 1 and unreadable[0]["status"] == "failed"
    assert "visit1.nii.gz" in unreadable[0]["error"] and unreadable[0]["report"] == ""
    assert [r["status"] for r in rows if r["patient"] == IDS[0]] == ["ok", "ok"]


def _srcs(page: str) -> list[str]:
    import re

    return re.findall(r"""src\s*=\s*['"]([^'"]*)""", page)


def test_resume_skips_finished_pairs_and_recomputes_changed_inputs(studies, tmp_path):
    out = tmp_path / "out"
    first = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST,
                            progress=False)
    assert first.ok == 3
    stamp_times = {p: p.stat().st_mtime_ns for p in out.rglob(".complete")}

    again = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST,
                            progress=False)
    assert (again.ok, again.skipped, again.failed) == (0, 3, 1)  # the failed pair is retried, not skipped
    assert {p: p.stat().st_mtime_ns for p in out.rglob(".complete")} == stamp_times
    assert [r["status"] for r in _rows(out)] == ["skipped"] * 3 + ["failed"]

    touched = studies / IDS[0] / "2021-01-15.nii.gz"
    later = time.time() + 5
    os.utime(touched, (later, later))
    third = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST,
                            progress=False)
    status = {(r.patient, r.followup): r.status for r in third.results}
    assert status[(IDS[0], "2021-01-15")] == "ok"
    assert status[(IDS[0], "2020-07-12")] == "skipped" and status[(IDS[1], "visit1")] == "skipped"

    # a folder whose write was interrupted (no .complete) is recomputed
    (out / IDS[1] / "visit1" / report.COMPLETE).unlink()
    fourth = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST,
                             progress=False)
    assert {(r.patient, r.followup): r.status for r in fourth.results}[(IDS[1], "visit1")] == "ok"


def test_a_changed_pipeline_changes_the_stamp(studies):
    from longitudinal.timeline import discover, pairs

    pair = pairs(discover(studies)[0])[0]
    other = Pipeline(name=TEST_PIPELINE.name, version="0.2", description="", modality="", source="x", stages={})
    a = batch._stamp(pair, batch.pipeline_hash(TEST_PIPELINE), "baseline", False)
    assert a == batch._stamp(pair, batch.pipeline_hash(TEST_PIPELINE), "baseline", False)
    assert a != batch._stamp(pair, batch.pipeline_hash(other), "baseline", False)
    assert a != batch._stamp(pair, batch.pipeline_hash(TEST_PIPELINE), "previous", False)


def test_parallel_deidentified_batch_matches_serial_and_leaks_no_ids(studies, tmp_path):
    out = tmp_path / "deid"
    s = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST,
                        jobs=2, deidentify=True, progress=False, against="previous")
    assert (s.ok, s.failed) == (3, 1)
    assert [r.index for r in s.results] == [1, 2, 3, 4]  # gathered in discovery order
    key = bytes.fromhex((out / batch.DEID_KEY_FILE).read_text().strip())
    assert {r.patient for r in s.results} == {report.pseudonym(i, key) for i in IDS}
    lesion = [r for r in s.results if r.patient == report.pseudonym(IDS[0], key)]
    # against the previous visit: the last lesion pair compares 2021-01-15 with 2020-07-12
    assert [(r.baseline, r.followup) for r in lesion] == [("2020-01-10", "2020-07-12"), ("2020-07-12", "2021-01-15")]
    for path in out.rglob("*"):
        assert not any(i.lower() in str(path.relative_to(out)).lower() for i in IDS), path
        if path.is_file() and path.name != batch.DEID_KEY_FILE:
            data = path.read_bytes()
            data = gzip.decompress(data) if path.name.endswith(".gz") else data
            for i in IDS:
                assert i.lower().encode() not in data.lower(), (i, path)
    failed = [r for r in s.results if r.status == "failed"][0]
    assert "2019-09-01.nii.gz" in failed.error  # the file is named, the patient folder is not
    r0 = json.loads((out / lesion[1].folder / "result.json").read_text())
    assert r0["patient"]["id"] == lesion[1].patient and r0["patient"]["deidentified"] is True
    # a worker computes the same numbers as an in-process run of the same pair
    from longitudinal.timeline import discover, pairs

    patient = [p for p in discover(studies) if p.id == IDS[0]][0]
    pair = pairs(patient, "previous")[1]
    serial = make_comparison(pair.baseline.load(), pair.followup.load(), TEST_PIPELINE)
    assert r0["progression_score"] == pytest.approx(serial.progression_score, rel=1e-6)


def test_bad_arguments_raise_before_any_work(studies, tmp_path):
    with pytest.raises(ValueError):
        batch.run_batch(studies, tmp_path / "o", pipeline=TEST_PIPELINE, jobs=0)
    with pytest.raises(ValueError):
        batch.run_batch(studies, tmp_path / "o", pipeline=TEST_PIPELINE, against="first")
    from longitudinal.errors import InputError

    with pytest.raises(InputError):
        batch.run_batch(tmp_path / "missing", tmp_path / "o", pipeline=TEST_PIPELINE)


class _Terminal:
    """A stand-in stderr that says it is a terminal, to see the progress bar."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_cli_batch_exit_status_progress_bar_and_resume(studies, tmp_path, monkeypatch, capsys):
    import longitudinal.compare
    from longitudinal.cli import main

    # compare() is the lead's; the CLI imports it at run time, so the scaffolding stands in for it here
    monkeypatch.setattr(longitudinal.compare, "compare", make_comparison, raising=False)
    toml = tmp_path / "p.toml"
    toml.write_text('name = "cli-test"\nversion = "1"\n')
    out = tmp_path / "out"
    assert main(["batch", str(studies), "-o", str(out), "--pipeline", str(toml), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "3 compared, 0 up to date, 1 failed" in captured.out
    assert not any(i in captured.err for i in IDS)  # logs name pair numbers, not patients

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(["batch", str(studies), "-o", str(out), "--pipeline", str(toml)]) == 1
    bar = "".join(terminal.parts)
    assert "comparing" in bar and "4/4" in bar and "failed=1" in bar
    assert "0 compared, 3 up to date, 1 failed" in capsys.readouterr().out

    assert main(["batch", str(tmp_path / "nothing-here"), "-o", str(out), "--pipeline", str(toml)]) == 2
    assert main(["batch", str(studies), "-o", str(out), "--pipeline", "no-such-pipeline"]) == 2
