"""The installed package, not the source tree: a wheel built from the project's files, installed without `-e`
into a fresh virtual environment, lists its pipelines and compares a pair from any working directory.

The fresh environment reuses the current one's third-party packages through a `.pth` line (torch is not
installed twice); plain `.pth` lines do not run the current environment's editable-install hook, so the only
`longitudinal` it can import is the one from the wheel (checked).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_studies"
PIPELINES = ("brain-mri", "chest-ct", "generic-2d")


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd[:3]} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(fresh venv, environment for its commands, the wheel) with the project installed from its wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    # build from a copy: the build must not write build/ or *.egg-info into the checkout
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "longitudinal", src / "longitudinal", ignore=shutil.ignore_patterns("__pycache__"))
    # the current environment's setuptools when it has one (no download); otherwise pip's isolated build
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "--wheel-dir", str(tmp / "dist"),
          str(src)], tmp, env)
    wheel = next((tmp / "dist").glob("longitudinal-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    python = venv / "bin" / "python"
    target = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       tmp, env).stdout.strip())
    (target / "_reuse_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
         tmp, env)
    return venv, env, wheel


def test_wheel_ships_the_pipelines(installed):
    _, _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"longitudinal/pipelines/{p}.toml" for p in PIPELINES} <= set(names)


def test_installed_wheel_lists_pipelines_and_compares_a_pair(installed, tmp_path):
    venv, env, _ = installed
    listed = _run([str(venv / "bin" / "longitudinal"), "pipelines"], tmp_path, env).stdout
    assert [line.split()[0] for line in listed.splitlines()] == list(PIPELINES)
    shown = json.loads(_run([str(venv / "bin" / "longitudinal"), "pipelines", "--show", "generic-2d"],
                            tmp_path, env).stdout)
    # read from the wheel's copy of the package, not the checkout or an editable install
    assert Path(shown["source"]).is_relative_to(venv), shown["source"]

    # a user's own pipeline file still works (--pipeline FILE), from a working directory that is not the checkout
    own = tmp_path / "mine" / "fundus.toml"
    own.parent.mkdir()
    own.write_text(Path(shown["source"]).read_text().replace('name = "generic-2d"', 'name = "my-fundus"'))
    mine = json.loads(_run([str(venv / "bin" / "longitudinal"), "pipelines", "--show", str(own)], tmp_path, env).stdout)
    assert mine["name"] == "my-fundus" and mine["scoring"] == shown["scoring"]

    # compare with no --pipeline: the shipped generic-2d is found inside the installed package
    visits = SAMPLES / "fundus" / "F001"
    out = tmp_path / "out"
    said = _run([str(venv / "bin" / "longitudinal"), "compare", str(visits / "2020-01-10" / "fundus.png"),
                 str(visits / "2020-08-05" / "fundus.png"), "-o", str(out)], tmp_path, env)
    result = json.loads((out / "result.json").read_text())
    assert result["pipeline"]["name"] == "generic-2d"
    assert result["verdict"] in ("progression", "no progression") and result["verdict"].upper() in said.stdout.upper()
    assert (out / "report.html").stat().st_size > 0 and (out / "flagged_mask.nii.gz").is_file()
