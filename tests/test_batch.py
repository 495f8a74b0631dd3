"""Batch runs over a studies folder of real scans (nilearn's MNI152 at 6 mm), with the test scaffolding of
test_report.make_comparison standing in for compare.compare (its workers import it by name)."""

from __future__ import annotations

import csv
import dataclasses
import errno
import gzip
import json
import os
import re
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


def _srcs(page: str) -> list[str]:
    return re.findall(r"""src\s*=\s*['"]([^'"]*)""", page)


def test_batch_reports_every_pair_lists_the_failure_and_keeps_going(studies, tmp_path, capsys):
    out = tmp_path / "out"
    s = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST)
    assert (s.ok, s.failed, s.skipped) == (3, 1, 0)
    rows = _rows(out)
    assert len(rows) == 4
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]  # failures listed last
    assert all(r["verdict"] in ("progression", "no progression") for r in rows[:3]) and rows[3]["verdict"] == ""
    # worst first: within a verdict, the strongest change (comparable between pairs) first
    strongest = [float(r["strongest_change"]) for r in rows[:3] if r["verdict"] == rows[0]["verdict"]]
    assert len(strongest) >= 2 and strongest == sorted(strongest, reverse=True)
    failed = rows[-1]
    assert failed["patient"] == IDS[2] and "2019-09-01.nii.gz" in failed["error"] and failed["report"] == ""
    for r in rows[:3]:
        folder = out / Path(r["report"]).parent
        assert (out / r["report"]).is_file() and report.is_complete(folder)
        doc = json.loads((folder / "result.json").read_text())
        assert doc["progression_score"] == pytest.approx(float(r["progression_score"]), rel=1e-5)
        assert doc["strongest_change"] == pytest.approx(float(r["strongest_change"]), rel=1e-5)
        assert r["computed_at"] == doc["created"] and r["verdict"] == doc["verdict"]
        assert 'href="../../summary.html"' in (out / r["report"]).read_text()  # the way back to the summary
    lesion = {r["followup_visit"]: float(r["progression_score"]) for r in rows if r["patient"] == IDS[0]}
    stable = [float(r["progression_score"]) for r in rows if r["patient"] == IDS[1]][0]
    assert lesion["2021-01-15"] > lesion["2020-07-12"] > stable
    assert rows[0]["patient"] == IDS[0]
    page = (out / "summary.html").read_text()
    lesions = (out / "PSECRET-0042" / "lesions.png").is_file()  # its findings tracked over the visits
    assert page.count("<img") == 1 + lesions  # the only patient with 3 visits: score timeline (and lesions)
    assert "http://" not in page and all(src.startswith("data:") for src in _srcs(page))
    assert "2019-09-01.nii.gz" in page and 'href="PSECRET-0042/2021-01-15/report.html"' in page
    # rows take the colour of their verdict, not of "it ran"
    classes = re.findall(r'<tr class="v-(\w+)">', page)
    css = {"progression": "pos", "no progression": "neg"}
    assert classes == [css[r["verdict"]] for r in rows[:3]] + ["failed"]
    assert "comparing" not in capsys.readouterr().err  # no progress bar when stderr is not a terminal


def test_a_patient_whose_headers_cannot_be_read_is_listed_and_the_rest_compared(studies, tmp_path):
    (studies / IDS[1] / "visit1.nii.gz").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    s = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST,
                        progress=False)
    assert s.failed == 2 and s.ok == 2
    rows = _rows(out)
    unreadable = [r for r in rows if r["patient"] == IDS[1]]
    assert len(unreadable) == 1 and unreadable[0]["status"] == "failed"
    assert "visit1.nii.gz" in unreadable[0]["error"] and unreadable[0]["report"] == ""
    assert [r["status"] for r in rows if r["patient"] == IDS[0]] == ["ok", "ok"]


def _without_computed_at(out: Path) -> tuple[list[dict], str]:
    rows = [{k: v for k, v in r.items() if k != "computed_at"} for r in _rows(out)]
    page = re.sub(r'<td class="computed d">[^<]*</td>', "", (out / "summary.html").read_text())
    return rows, page


def test_a_resumed_summary_is_the_fresh_summary_but_for_when_each_result_was_computed(studies, tmp_path):
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    kw = dict(pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST, progress=False)
    batch.run_batch(studies, fresh, **kw)
    first = batch.run_batch(studies, resumed, **kw)
    times = [r["computed_at"] for r in _rows(resumed)]
    time.sleep(1.1)  # a later run would stamp a later time
    again = batch.run_batch(studies, resumed, **kw)
    assert (first.ok, again.ok, again.skipped) == (3, 0, 3)
    assert [r["computed_at"] for r in _rows(resumed)] == times  # the earlier results, with their times
    assert _without_computed_at(resumed) == _without_computed_at(fresh)
    assert "earlier run" not in (resumed / "summary.html").read_text()
    assert [r["status"] for r in _rows(resumed)] == ["ok", "ok", "ok", "failed"]


def test_resume_skips_finished_pairs_and_recomputes_changed_inputs(studies, tmp_path):
    out = tmp_path / "out"
    kw = dict(pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST, progress=False)
    first = batch.run_batch(studies, out, **kw)
    assert first.ok == 3
    stamp_times = {p: p.stat().st_mtime_ns for p in out.rglob(".complete")}

    again = batch.run_batch(studies, out, **kw)
    assert (again.ok, again.skipped, again.failed) == (0, 3, 1)  # the failed pair is retried, not skipped
    assert {p: p.stat().st_mtime_ns for p in out.rglob(".complete")} == stamp_times

    touched = studies / IDS[0] / "2021-01-15.nii.gz"
    later = time.time() + 5
    os.utime(touched, (later, later))
    third = batch.run_batch(studies, out, **kw)
    reused = {(r.patient, r.followup): r.reused for r in third.results}
    assert reused[(IDS[0], "2021-01-15")] is False
    assert reused[(IDS[0], "2020-07-12")] is True and reused[(IDS[1], "visit1")] is True

    # a folder whose write was interrupted (no .complete) is recomputed
    (out / IDS[1] / "visit1" / report.COMPLETE).unlink()
    fourth = batch.run_batch(studies, out, **kw)
    assert {(r.patient, r.followup): r.reused for r in fourth.results}[(IDS[1], "visit1")] is False


def test_resume_rechecks_every_file_listed_as_complete(studies, tmp_path):
    """A file damaged after the run (same size, unreadable header) is not taken as finished: the pair reruns."""
    out = tmp_path / "out"
    kw = dict(pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST, progress=False)
    batch.run_batch(studies, out, **kw)
    folder = out / IDS[1] / "visit1"
    target = folder / "change_map.nii.gz"
    size = target.stat().st_size
    target.write_bytes(b"\0" * size)  # same size, no readable header
    assert not report.is_complete(folder)
    again = batch.run_batch(studies, out, **kw)
    assert {(r.patient, r.followup): r.reused for r in again.results}[(IDS[1], "visit1")] is False
    assert report.is_complete(folder) and sitk.ReadImage(str(target)).GetSize()


def test_a_changed_pipeline_changes_the_stamp(studies):
    from longitudinal.timeline import discover, pairs

    pair = pairs(discover(studies)[0])[0]
    other = Pipeline(name=TEST_PIPELINE.name, version="0.2", source="x")
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


def not_comparable_for_the_stable_patient(baseline, followup, pipeline):
    """compare() as it answers a pair whose registration failed its QC: a verdict, no score, a reason."""
    c = make_comparison(baseline, followup, pipeline)
    if IDS[1] not in baseline.meta.sources[0]:
        return c
    reason = "registration failed its quality control (low similarity: NCC 0.35 < 0.7)"
    return dataclasses.replace(c, verdict="not comparable", reason=reason, progression=False,
                               progression_score=None, regions=())


def test_not_comparable_pairs_are_counted_and_coloured_apart(studies, tmp_path):
    out = tmp_path / "out"
    s = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=not_comparable_for_the_stable_patient,
                        report_settings=FAST, progress=False)
    assert (s.not_comparable, s.failed, s.count("progression") + s.count("no progression")) == (1, 1, 2)
    row = [r for r in _rows(out) if r["patient"] == IDS[1]][0]
    assert (row["status"], row["verdict"], row["progression_score"]) == ("ok", "not comparable", "")
    assert "NCC 0.35" in row["reason"]
    assert [r["verdict"] for r in _rows(out)][-2:] == ["not comparable", ""]  # after every verdict, before failures
    page = (out / "summary.html").read_text()
    assert page.count('<tr class="v-nc">') == 1 and '<span class="tag nc">1 not comparable</span>' in page


def test_output_folders_of_distinct_patients_never_collide(tmp_path):
    """'../../evil', 'evil', 'Ev il' and unicode names that the folder name would fold together."""
    names = ["../../evil", "evil", "..evil", "Müller", "M_ller", "M?ller", "ABC", "abc", "summary.html"]
    folders = batch.unique_names({n: n for n in names})
    assert len({f.lower() for f in folders.values()}) == len(names)
    assert folders["evil"] == "evil" and folders["M_ller"] == "M_ller"  # plain names keep their name
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and not f.startswith(".") for f in folders.values())
    assert batch.unique_names({"../../evil": "../../evil"}) == {"../../evil": folders["../../evil"]}  # stable

    root = tmp_path / "studies"
    base = mni(6.0)
    for i, name in enumerate(("ev il", "ev_il", "ev?il")):  # one folder name before: "ev_il"
        _write(_noisy(base, 10 + i), root / name / "2020-01-01.nii.gz")
        _write(_noisy(base, 20 + i), root / name / "2020-06-01.nii.gz")
    s = batch.run_batch(root, tmp_path / "out", pipeline=TEST_PIPELINE, compare_fn=make_comparison,
                        report_settings=FAST, progress=False)
    assert s.ok == 3 and len({r.folder.lower() for r in s.results}) == 3
    for r in s.results:  # each row's report is that patient's
        doc = json.loads((tmp_path / "out" / r.folder / "result.json").read_text())
        assert doc["patient"]["id"] == r.patient


def test_a_symlink_loop_in_one_patients_folder_does_not_stop_the_batch(studies, tmp_path, series_writer):
    """A loop (and a dangling link) inside a DICOM visit folder: fingerprinting goes on, every other pair runs,
    and that visit is refused in its own row, naming the link (an unreadable file in a series folder may be a
    missing slice: never dropped silently)."""
    vol = sitk.GetArrayFromImage(mni(6.0))
    for date, seed in (("20200101", 1), ("20200701", 2)):
        folder = studies / "PLOOP-0001" / date
        noisy = vol + np.random.default_rng(seed).normal(0, 1.0, vol.shape)
        series_writer(folder, noisy, spacing=(6.0, 6.0, 6.0), origin=(-90.0, -126.0, -72.0), study_date=date,
                      patient_id="PLOOP-0001")
    (studies / "PLOOP-0001" / "20200701" / "loop").symlink_to("loop")
    (studies / "PLOOP-0001" / "20200701" / "dangling").symlink_to("nowhere")
    out = tmp_path / "out"
    s = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST,
                        progress=False)
    assert len(s.results) == 5 and s.failed == 2  # the truncated file of the fixture, and the looped visit
    loop, = (r for r in s.results if r.patient == "PLOOP-0001")
    assert loop.status == "failed" and ("loop" in loop.error or "dangling" in loop.error)
    assert sum(r.status == "ok" for r in s.results) == 3
    assert (out / "summary.csv").is_file() and len(_rows(out)) == 5
    again = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison,
                            report_settings=FAST, progress=False)
    assert sum(r.reused for r in again.results) == 3  # the stamps are stable: the good pairs are not redone


def _disk_full(monkeypatch, where):
    """Renames into place fail with ENOSPC for the destinations `where` accepts (every atomic write ends so)."""
    real = os.replace

    def replace(src, dst, *a, **kw):
        if where(Path(dst)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)


def test_a_full_disk_fails_each_pair_with_its_reason_and_the_summary_is_still_written(studies, tmp_path,
                                                                                       monkeypatch):
    out = tmp_path / "out"
    _disk_full(monkeypatch, lambda dst: dst.parent != out)  # pair folders are full, the top folder is not
    s = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST,
                        progress=False)
    assert s.failed == 4 and s.summary_error is None
    rows = _rows(out)
    assert sum("No space left on device" in r["error"] for r in rows) == 3 and all(r["report"] == "" for r in rows)
    assert not list(out.rglob(report.COMPLETE))


def test_a_batch_that_cannot_write_its_summary_says_so_and_exits_non_zero(studies, tmp_path, monkeypatch, capsys):
    from longitudinal.cli import EXIT_CANNOT_WRITE, main

    out = tmp_path / "out"
    out.mkdir()
    _disk_full(monkeypatch, lambda dst: True)
    s = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST,
                        progress=False)
    assert s.summary_csv is None and "No space left on device" in s.summary_error
    capsys.readouterr()  # what the direct call logged; the CLI's own lines follow
    monkeypatch.setattr("longitudinal.compare.compare", make_comparison)
    toml = tmp_path / "p.toml"
    toml.write_text('name = "cli-test"\nversion = "1"\n')
    assert main(["batch", str(studies), "-o", str(out), "--pipeline", str(toml), "--no-progress"]) == EXIT_CANNOT_WRITE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("longitudinal: error: ") and "cannot write the summary" in err[-1]
    assert "Traceback" not in "\n".join(err)


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
    from longitudinal.cli import EXIT_NOT_COMPARABLE, main

    # compare() is the lead's; the CLI imports it at run time, so the scaffolding stands in for it here
    monkeypatch.setattr(longitudinal.compare, "compare", make_comparison, raising=False)
    toml = tmp_path / "p.toml"
    toml.write_text('name = "cli-test"\nversion = "1"\n')
    out = tmp_path / "out"
    assert main(["batch", str(studies), "-o", str(out), "--pipeline", str(toml), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "3 compared, 0 up to date: " in captured.out and "0 not comparable, 1 failed" in captured.out
    assert not any(i in captured.err for i in IDS)  # logs name pair numbers, not patients

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(["batch", str(studies), "-o", str(out), "--pipeline", str(toml)]) == 1
    bar = "".join(terminal.parts)
    assert "comparing" in bar and "4/4" in bar and "failed=1" in bar
    assert "0 compared, 3 up to date" in capsys.readouterr().out
    monkeypatch.undo()

    # every pair has a verdict, some are not comparable: its own exit status
    (studies / IDS[2] / "2019-09-01.nii.gz").unlink()
    monkeypatch.setattr(longitudinal.compare, "compare", not_comparable_for_the_stable_patient, raising=False)
    assert main(["batch", str(studies), "-o", str(tmp_path / "o2"), "--pipeline", str(toml),
                 "--no-progress"]) == EXIT_NOT_COMPARABLE

    assert main(["batch", str(tmp_path / "nothing-here"), "-o", str(out), "--pipeline", str(toml)]) == 2
    assert main(["batch", str(studies), "-o", str(out), "--pipeline", "no-such-pipeline"]) == 2
