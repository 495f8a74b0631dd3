"""`batch --output-layout bids`: a BIDS-derivatives dataset that bids-validator-deno accepts without errors and
pybids indexes, whose files hold what the pair's own outputs hold."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from longitudinal import cli
from longitudinal.bids_out import BidsPair, bids_label, write_bids_dataset, write_bids_pair

SAMPLES = Path(__file__).resolve().parent.parent / "sample_studies"


def validator_errors(root: Path) -> list[dict]:
    # installed with the test extra, next to this interpreter (the venv need not be activated)
    exe = (shutil.which("bids-validator-deno", path=str(Path(sys.executable).parent))
           or shutil.which("bids-validator-deno"))
    if exe is None:
        pytest.skip("bids-validator-deno not installed (pip install -e '.[test]' installs it)")
    done = subprocess.run([exe, "--format", "json", str(root)], capture_output=True, text=True, timeout=300)
    issues = json.loads(done.stdout)["issues"]["issues"]
    errors = [i for i in issues if i["severity"] == "error"]
    assert (done.returncode == 0) == (not errors), done.stderr[-2000:]
    return errors


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def bids(tmp_path_factory) -> tuple[Path, Path]:
    """(input studies, output) of `batch --output-layout bids` on the easy set's patient with three visits and
    its stable patient."""
    raw = tmp_path_factory.mktemp("raw") / "easy"
    for name in ("sub-01", "sub-03", "dataset_description.json", "participants.tsv"):
        source = SAMPLES / "easy" / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, raw / name)
    out = tmp_path_factory.mktemp("bids") / "out"
    status = cli.main(["batch", str(raw), "-o", str(out), "--output-layout", "bids", "--no-progress"])
    assert status == 0
    return raw, out


def test_the_derivative_passes_the_bids_validator(bids):
    _, out = bids
    assert validator_errors(out) == []
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "longitudinal" and description["GeneratedBy"][0]["CodeURL"]
    assert description["SourceDatasets"]
    assert "*_xfm.txt" in (out / ".bidsignore").read_text().split()


def test_pybids_indexes_it_alone_and_as_the_inputs_derivative(bids):
    from bids import BIDSLayout

    raw, out = bids
    layout = BIDSLayout(out, is_derivative=True)
    assert layout.get_subjects() == ["01", "03"]
    masks = layout.get(suffix="mask", desc="flagged", extension=".nii.gz")
    assert sorted((m.entities["subject"], m.entities["session"]) for m in masks) == [("01", "02"), ("01", "03"),
                                                                                      ("03", "02")]
    assert masks[0].get_metadata()["Sources"]
    with_raw = BIDSLayout(raw, derivatives=out)
    derivative, = with_raw.derivatives.values()
    assert len(derivative.get(suffix="probseg", extension=".nii.gz")) == 3


def test_files_hold_what_the_pair_found(bids):
    raw, out = bids
    anat = out / "sub-01" / "ses-03" / "anat"
    report = out / "reports" / "sub-01" / "ses-03"
    result = json.loads((report / "result.json").read_text())
    mask = sitk.ReadImage(str(anat / "sub-01_ses-03_desc-flagged_mask.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(mask),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(report / "flagged_mask.nii.gz"))))
    score = sitk.GetArrayFromImage(sitk.ReadImage(str(report / "change_map.nii.gz"))).astype(np.float64)
    probability = sitk.GetArrayFromImage(sitk.ReadImage(str(anat / "sub-01_ses-03_desc-change_probseg.nii.gz")))
    assert probability.min() >= 0 and probability.max() <= 1
    assert np.allclose(probability, 1 - 10 ** -np.clip(score, 0, None), atol=1e-6)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(anat / "sub-01_ses-03_desc-findings_dseg.nii.gz")))
    assert np.array_equal(labels > 0, sitk.GetArrayFromImage(mask) > 0)
    findings = [r for r in result["regions"] if r["flagged"]]
    table = _rows(anat / "sub-01_ses-03_desc-findings_dseg.tsv")
    assert [int(r["index"]) for r in table] == [f["id"] for f in findings]
    assert [float(r["volume_mm3"]) for r in table] == [f["volume_mm3"] for f in findings]
    # the transforms: fMRIPrep's from-A_to-B resamples A onto B; the pair's transform maps baseline points to
    # follow-up points, so it is from-03_to-01, and the reverse is its inverse
    forward = sitk.ReadTransform(str(anat / "sub-01_from-03_to-01_mode-image_xfm.txt"))
    reverse = sitk.ReadTransform(str(anat / "sub-01_from-01_to-03_mode-image_xfm.txt"))
    pair = sitk.ReadTransform(str(report / "transform.tfm"))
    for point in [(0.0, 0.0, 0.0), (20.0, -30.0, 15.0)]:
        assert np.allclose(forward.TransformPoint(point), pair.TransformPoint(point), atol=1e-6)
        assert np.allclose(reverse.TransformPoint(forward.TransformPoint(point)), point, atol=1e-4)
    # sidecars point into the input dataset
    sidecar = json.loads((anat / "sub-01_ses-03_desc-flagged_mask.json").read_text())
    links = json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]
    target = sidecar["SpatialReference"].removeprefix("bids:raw:")
    assert (Path(links["raw"].removeprefix("file://")) / target).is_file() and sidecar["Sources"]
    # the cohort table lists every pair, and the tracked lesions sit with their subject
    changes = _rows(out / "changes.tsv")
    assert [(r["participant_id"], r["session_id"], r["verdict"]) for r in changes] == [
        ("sub-01", "ses-02", "progression"), ("sub-01", "ses-03", "progression"),
        ("sub-03", "ses-02", "no progression")]
    assert int(changes[1]["n_findings"]) == len(findings)
    lesions = _rows(out / "sub-01" / "sub-01_lesions.tsv")
    assert sum(int(r["n_seen"]) for r in lesions) == int(changes[0]["n_findings"]) + int(changes[1]["n_findings"])


def test_labels_and_a_deidentified_pair_carry_no_input_path(tmp_path):
    assert bids_label("sub-01", "sub") == "01" and bids_label("2021-06-10", "ses") == "20210610"
    assert bids_label("anon-3fa9c2", "sub") == "anon3fa9c2"
    grid = sitk.Image(8, 9, 4, sitk.sitkFloat32)
    image = SimpleNamespace(itk=grid, meta=SimpleNamespace(study_date="20200101"))
    comparison = SimpleNamespace(
        change_map=image, flagged_mask=SimpleNamespace(itk=sitk.Cast(grid, sitk.sitkUInt8)),
        finding_labels=SimpleNamespace(itk=sitk.Cast(grid, sitk.sitkUInt16)), findings=(), threshold=4.5,
        baseline=image, followup=image, verdict="no progression", progression_score=1.0,
        pipeline=SimpleNamespace(name="brain-mri", version="1.2"),
        registration=SimpleNamespace(transform=sitk.Euler3DTransform()))
    root = tmp_path / "out"
    write_bids_pair(comparison, root, BidsPair("anon3fa9c2", "20200701", "20200101", source=None))
    write_bids_dataset(root, source=None)
    for path in root.rglob("*.json"):
        text = path.read_text()
        assert str(tmp_path) not in text and "bids:raw" not in text and "file:" not in text, path
    assert validator_errors(root) == []
