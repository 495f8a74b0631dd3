"""The console command: version, help, `studies` output, and exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import longitudinal
from conftest import smooth_volume, write_nifti
from longitudinal import cli


@pytest.fixture
def studies(tmp_path):
    root = tmp_path / "cohort"
    write_nifti(root / "p01" / "2020-01-02" / "t1.nii.gz", smooth_volume((4, 5, 6)), spacing=(1.0, 1.0, 1.5))
    write_nifti(root / "p01" / "2021-02-03" / "t1.nii.gz", smooth_volume((4, 5, 6), seed=1), spacing=(1.0, 1.0, 1.5))
    write_nifti(root / "p02" / "baseline.nii.gz", smooth_volume((3, 3, 3), seed=2))
    write_nifti(root / "p02" / "visit2.nii.gz", smooth_volume((3, 3, 3), seed=3))
    return root


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"longitudinal {longitudinal.__version__}"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "studies" in out and "--debug" in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: longitudinal" in capsys.readouterr().err


def test_studies_table(studies, capsys):
    assert cli.main(["studies", str(studies)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["patient", "visit", "date", "modality", "size", "spacing", "(mm)", "path"]
    assert lines[1].split() == ["p01", "2020-01-02", "2020-01-02", "-", "6x5x4", "1x1x1.5", "p01/2020-01-02/t1.nii.gz"]
    assert lines[3].split()[:3] == ["p02", "baseline", "-"]
    assert lines[4].split()[:2] == ["p02", "visit2"]
    assert lines[0].index("path") == lines[1].index("p01/") == lines[4].index("p02/")  # aligned columns
    assert "2 patient(s), 4 visit(s)" in err


def test_studies_json(studies, capsys):
    assert cli.main(["studies", str(studies), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["id"] for p in doc] == ["p01", "p02"]
    v = doc[0]["visits"][1]
    assert v["id"] == "2021-02-03" and v["date"] == "2021-02-03" and v["modality"] is None
    assert v["size"] == [6, 5, 4] and v["spacing"] == [1.0, 1.0, 1.5]
    assert v["path"].endswith("p01/2021-02-03/t1.nii.gz")
    assert doc[1]["visits"][0]["date"] is None


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    assert cli.main(["studies", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"longitudinal: error: {tmp_path / 'absent'}: no such folder"]
    write_nifti(tmp_path / "p" / "2020-01-01.nii.gz", smooth_volume((2, 3, 3)))
    (tmp_path / "p" / "someday").mkdir()
    assert cli.main(["studies", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "someday: cannot tell when this visit happened" in err[0]
    assert err[1:] == ["0 patient(s), 0 visit(s), 1 unusable patient(s) (errors above)"]


def test_unexpected_error_is_status_1_and_debug_shows_traceback(studies, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr("longitudinal.timeline.discover", boom)
    assert cli.main(["studies", str(studies)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["longitudinal: unexpected error: RuntimeError: disk on fire (run with --debug for the traceback)"]
    assert cli.main(["studies", str(studies), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_console_script_entry_point():
    script = Path(sys.executable).parent / "longitudinal"
    if not script.exists():
        pytest.skip("package not installed with its console script")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"longitudinal {longitudinal.__version__}"


def test_studies_lists_good_patients_past_a_broken_one(tmp_path, capsys):
    for day in ("2020-01-01", "2020-06-01"):
        write_nifti(tmp_path / "good" / f"{day}.nii.gz", smooth_volume((2, 3, 3)))
    write_nifti(tmp_path / "bad" / "2020-01-01.nii.gz", smooth_volume((2, 3, 3)))
    (tmp_path / "bad" / "2020-06-01.nii.gz").write_bytes(b"not a nifti")
    assert cli.main(["studies", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "good" in out and "2020-06-01" in out and "bad" not in out
    assert f"{tmp_path / 'bad' / '2020-06-01.nii.gz'}:" in err and "1 unusable patient(s)" in err
