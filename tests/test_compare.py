"""The real pipeline end to end on sample studies: `longitudinal compare` writes the output contract, and what it
flags is where the ground truth changed."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from longitudinal import cli

SAMPLES = Path(__file__).resolve().parent.parent / "sample_studies"


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


@pytest.fixture(scope="module")
def progressing(tmp_path_factory):
    out = tmp_path_factory.mktemp("sub-04")
    base = SAMPLES / "easy/sub-04/ses-01/anat/sub-04_ses-01_T1w.nii.gz"
    follow = SAMPLES / "easy/sub-04/ses-02/anat/sub-04_ses-02_T1w.nii.gz"
    assert cli.main(["compare", str(base), str(follow), "-o", str(out)]) == 0
    return out, follow


def test_compare_writes_the_output_contract_on_the_followups_grid(progressing):
    out, follow = progressing
    for name in ("report.html", "result.json", "regions.csv", "change_map.nii.gz", "flagged_mask.nii.gz",
                 "registered.nii.gz", "transform.tfm"):
        assert (out / name).is_file(), name
    result = json.loads((out / "result.json").read_text())
    assert isinstance(result["progression_score"], float) and result["progression"] is True
    assert result["regions"] and {"centre_mm", "volume_mm3", "score", "flagged"} <= set(result["regions"][0])
    assert result["registration"]["suspect"] is False
    # the report lists the findings and the top others, but says how many regions were scored (an 8 mm grid)
    assert result["n_regions_scored"] > 1000 > result["n_regions"]
    assert f"among {result['n_regions_scored']:,} regions scored" in (out / "report.html").read_text()
    followup = sitk.ReadImage(str(follow))
    for name in ("change_map.nii.gz", "flagged_mask.nii.gz"):
        assert _same_grid(sitk.ReadImage(str(out / name)), followup), name


def test_what_is_flagged_is_where_the_truth_changed(progressing):
    out, _ = progressing
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLES / "easy/derivatives/changes/sub-04/ses-02/changemask.nii.gz")))
    flagged = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "flagged_mask.nii.gz"))) > 0
    change = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "change_map.nii.gz")))
    assert (flagged & (truth > 0)).sum() > 0.5 * (truth > 0).sum()  # most changed voxels are flagged
    # the change map ranks changed voxels far above the rest of the head
    assert np.median(change[truth > 0]) > np.percentile(change[~(truth > 0)], 99)


def test_a_stable_patient_reads_as_no_progression_and_ranks_below_a_changed_one(tmp_path, progressing):
    base = SAMPLES / "easy/sub-03/ses-01/anat/sub-03_ses-01_T1w.nii.gz"
    follow = SAMPLES / "easy/sub-03/ses-02/anat/sub-03_ses-02_T1w.nii.gz"
    assert cli.main(["compare", str(base), str(follow), "-o", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["progression"] is False and not any(r["flagged"] for r in result["regions"])
    # the strongest change is comparable between pairs: the stable pair's is well below the changed pair's
    changed = json.loads((progressing[0] / "result.json").read_text())
    assert 0 < 2 * result["strongest_change"] < changed["strongest_change"]
    assert "strongest change" in (tmp_path / "report.html").read_text()


def test_2d_photographs_compare_on_single_slice_grids(tmp_path):
    base = SAMPLES / "fundus/F001/2020-01-10/fundus.png"
    follow = SAMPLES / "fundus/F001/2020-08-05/fundus.png"
    assert cli.main(["compare", str(base), str(follow), "-o", str(tmp_path)]) == 0
    change = sitk.ReadImage(str(tmp_path / "change_map.nii.gz"))
    assert change.GetSize() == (512, 512, 1)
    assert json.loads((tmp_path / "result.json").read_text())["pipeline"]["name"] == "generic-2d"


def _sample_visits() -> list[Path]:
    from longitudinal.timeline import discover

    return [v.path for s in ("easy", "hard", "dicom", "fundus") for p in discover(SAMPLES / s) for v in p.visits]


@pytest.mark.parametrize("path", _sample_visits(), ids=lambda p: "/".join(p.parts[-3:]))
def test_a_visit_compared_with_itself_is_identical_no_progression_every_run(path):
    from longitudinal.compare import compare
    from longitudinal.io import load_image

    image = load_image(path)
    for _ in range(3):
        c = compare(image, load_image(path))
        assert c.identical and c.verdict == "no progression" and c.progression_score == 0.0 and not c.findings
        assert any("identical pixel data" in w for w in c.warnings)
        assert c.registration.transform.GetParameters() == sitk.AffineTransform(image.dim).GetParameters()
