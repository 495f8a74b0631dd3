"""Paths through the tool that had no test: component regions through `compare`, the `register` and `pipelines`
commands, and scoring with a normative model named by a pipeline (and refused when its file is corrupt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from longitudinal import cli, modelfile
from longitudinal.compare import VERDICTS, compare
from longitudinal.errors import InputError
from longitudinal.pipeline import available, load
from longitudinal.report.context import OutputContext
from longitudinal.report.outputs import write_result_json
from longitudinal.scoring import MODEL_FORMAT, ChangeDetector
from longitudinal.timeline import load_pair

SAMPLES = Path(__file__).resolve().parent.parent / "sample_studies"
EASY = SAMPLES / "easy"
TRUTH = EASY / "derivatives" / "changes"


def _visit(subject: str, session: str) -> Path:
    return EASY / subject / session / "anat" / f"{subject}_{session}_T1w.nii.gz"


def _pair(subject: str):
    return load_pair(_visit(subject, "ses-01"), _visit(subject, "ses-02"))


def _truth_mask(subject: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(TRUTH / subject / "ses-02" / "changemask.nii.gz"))) > 0


def _truth_changes(subject: str) -> list[dict]:
    return json.loads((TRUTH / subject / "ses-02" / "changes.json").read_text())["changes"]


def _brain_mri_text(**replace: str) -> str:
    text = available()["brain-mri"].read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("longitudinal: error: ")
    return lines[0]


def _result_doc(comparison, folder: Path) -> dict:
    (path,) = write_result_json(comparison, folder, OutputContext().resolved(comparison))
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- component regions through compare


@pytest.fixture(scope="module")
def components_pipeline(tmp_path_factory):
    """The shipped brain-mri pipeline with regions made from the change itself."""
    folder = tmp_path_factory.mktemp("components")
    path = folder / "components.toml"
    path.write_text(_brain_mri_text(**{'kind = "grid"': 'kind = "components"'}))
    return load(path)


@pytest.fixture(scope="module")
def progressing_components(components_pipeline):
    """easy/sub-04 (a new 11 mm lesion and a patch of atrophy) compared with component regions."""
    return compare(*_pair("sub-04"), components_pipeline)


def test_components_pipeline_file_selects_component_regions(components_pipeline):
    regions = components_pipeline.regions
    assert regions.kind == "components" and regions.component_level == 2.5 and regions.component_min_mm3 == 5.0
    assert components_pipeline.name == "brain-mri"  # only the region kind differs from the shipped pipeline


def test_compare_with_component_regions_scores_components(progressing_components, tmp_path):
    c = progressing_components
    assert c.verdict in VERDICTS and c.verdict != "not comparable" and c.reason is None
    assert isinstance(c.progression_score, float) and np.isfinite(c.threshold)
    assert c.pipeline.regions.kind == "components"
    context = [r for r in c.regions if not r.flagged]
    assert context, "no unflagged component listed for context"
    # unflagged rows are the regions themselves: blobs of the change, numbered, none below the minimum size
    assert all(r.label.startswith("component ") for r in context)
    assert all(r.volume_mm3 >= c.pipeline.regions.component_min_mm3 for r in context)
    assert all(r.label == "change" for r in c.findings)
    # far fewer regions than the 8 mm grid's ~20,000 over a brain: blobs of the change, not cubes
    assert 1 < c.regions_scored < 5000
    doc = _result_doc(c, tmp_path)
    assert doc["pipeline"]["settings"]["regions"]["kind"] == "components"
    assert doc["n_regions_scored"] == c.regions_scored
    assert doc["verdict"] == c.verdict
    assert {r["label"] for r in doc["regions"] if not r["flagged"]} == {r.label for r in context}


def _lesion_truth(subject: str) -> tuple[dict, np.ndarray]:
    """The new lesion of a follow-up (changes.json) and its own voxels of the truth mask."""
    truth = _truth_mask(subject)
    lesion = next(ch for ch in _truth_changes(subject) if ch["type"] == "new_lesion")
    pieces, _ = ndimage.label(truth, np.ones((3, 3, 3), bool))
    x, y, z = lesion["centre_voxel"]
    assert pieces[z, y, x] > 0
    return lesion, pieces == pieces[z, y, x]


def _assert_lesion_found(c, subject: str) -> None:
    """The new lesion is flagged: most of its truth voxels, by a finding centred on it, and what is flagged is
    mostly truth (the follow-up's grid, like the truth)."""
    lesion, voxels = _lesion_truth(subject)
    flagged = sitk.GetArrayFromImage(c.flagged_mask.itk) > 0
    assert flagged.shape == voxels.shape
    assert (flagged & voxels).sum() > 0.5 * voxels.sum(), ((flagged & voxels).sum(), voxels.sum())
    assert (flagged & _truth_mask(subject)).sum() > 0.5 * flagged.sum(), "most flagged voxels did not change"
    to_followup = c.registration.transform  # baseline points -> follow-up points; finding centres are baseline's
    distances = [np.linalg.norm(np.subtract(to_followup.TransformPoint(f.centre_mm), lesion["centre_mm"]))
                 for f in c.findings]
    best = int(np.argmin(distances))
    assert distances[best] < 0.5 * lesion["diameter_mm"], distances[best]
    assert c.findings[best].score == max(f.score for f in c.findings)  # and it is the top finding


def test_compare_with_component_regions_flags_the_known_lesion(progressing_components):
    c = progressing_components
    assert c.verdict == "progression" and c.progression and c.findings
    _assert_lesion_found(c, "sub-04")


def test_a_stable_pair_with_component_regions_reads_no_progression(components_pipeline):
    """easy/sub-03 has no change: its component blobs are noise and none is a finding (with the findings
    settings of brain-mri 1.2 this pair read 'progression' with ~73 one-voxel findings in two large blobs)."""
    c = compare(*_pair("sub-03"), components_pipeline)
    assert c.verdict == "no progression" and not c.findings, (c.verdict, len(c.findings))
    assert c.regions_scored > 20 and all(r.label.startswith("component ") for r in c.regions)


# --------------------------------------------------------------------------- register


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    out = tmp_path_factory.mktemp("register") / "out"
    status = cli.main(["register", str(_visit("sub-04", "ses-01")), str(_visit("sub-04", "ses-02")), "-o", str(out)])
    return status, out


def test_register_writes_the_registered_image_transform_and_qc(registered):
    status, out = registered
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == ["qc.json", "registered.nii.gz", "transform.tfm"]
    fixed = sitk.ReadImage(str(_visit("sub-04", "ses-01")))
    moving = sitk.ReadImage(str(_visit("sub-04", "ses-02")))
    image = sitk.ReadImage(str(out / "registered.nii.gz"))
    # on the baseline's grid
    assert image.GetSize() == fixed.GetSize()
    assert np.allclose(image.GetSpacing(), fixed.GetSpacing()) and np.allclose(image.GetOrigin(), fixed.GetOrigin())
    assert np.allclose(image.GetDirection(), fixed.GetDirection())
    transform = sitk.ReadTransform(str(out / "transform.tfm"))
    assert len(transform.GetParameters()) == 12  # rigid then affine: an affine transform
    # the image is the follow-up resampled through the written transform
    again = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, transform, sitk.sitkLinear, 0.0)
    diff = np.abs(sitk.GetArrayFromImage(again) - sitk.GetArrayFromImage(image).astype(np.float32))
    assert diff.max() <= 1.0  # rounding to the stored integer type
    qc = json.loads((out / "qc.json").read_text())
    for key in ("metric", "identity_metric", "dice", "identity_dice", "ncc", "identity_ncc", "max_scale",
                "anisotropy", "translation_mm", "seconds", "stages", "init", "suspect", "reasons",
                "shared_fraction"):
        assert key in qc, key
    assert qc["suspect"] is False and qc["reasons"] == []
    assert qc["stages"] == ["rigid", "affine"]
    assert qc["dice"] > qc["identity_dice"] and qc["ncc"] > qc["identity_ncc"] > 0
    assert qc["metric"] < qc["identity_metric"]  # Mattes MI: lower is better


def test_registered_transform_matches_the_simulated_head_motion(registered):
    """The truth's follow-up -> baseline mapping composed with the written baseline -> follow-up transform is
    the identity on brain points (sample_studies/README.md: to_anatomy.tfm)."""
    _, out = registered
    transform = sitk.ReadTransform(str(out / "transform.tfm"))
    t_b = sitk.Euler3DTransform(sitk.ReadTransform(str(TRUTH / "sub-04" / "ses-01" / "to_anatomy.tfm")))
    t_f = sitk.ReadTransform(str(TRUTH / "sub-04" / "ses-02" / "to_anatomy.tfm"))
    followup_to_baseline = sitk.CompositeTransform([t_b.GetInverse(), t_f])
    moving = sitk.ReadImage(str(_visit("sub-04", "ses-02")))
    brain = np.argwhere(sitk.GetArrayViewFromImage(moving) > 0)[::997]
    errors = []
    for z, y, x in brain:
        p = moving.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
        errors.append(np.linalg.norm(np.subtract(transform.TransformPoint(followup_to_baseline.TransformPoint(p)), p)))
    assert len(errors) > 100
    assert np.mean(errors) < 0.5 and np.max(errors) < 1.0  # mm; the voxels are 1.5 mm


@pytest.mark.parametrize("missing", ["fixed", "moving"])
def test_register_with_a_missing_input_fails_in_one_line_naming_it(tmp_path, capsys, missing):
    absent = tmp_path / "absent_T1w.nii.gz"
    fixed = absent if missing == "fixed" else _visit("sub-04", "ses-01")
    moving = absent if missing == "moving" else _visit("sub-04", "ses-02")
    out = tmp_path / "out"
    status = cli.main(["register", str(fixed), str(moving), "-o", str(out)])
    assert status == cli.EXIT_BAD_INPUT
    line = _one_error_line(capsys)
    assert str(absent) in line
    assert not out.exists()  # nothing written


# --------------------------------------------------------------------------- pipelines


def test_pipelines_lists_the_shipped_pipelines(capsys):
    assert cli.main(["pipelines"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert names == sorted(available()) and {"brain-mri", "chest-ct", "generic-2d"} <= set(names)
    brain = next(line for line in lines if line.startswith("brain-mri"))
    assert f"v{load('brain-mri').version}" in brain and " MR " in brain


def test_pipelines_show_prints_the_stage_tables_as_json(capsys):
    assert cli.main(["pipelines", "--show", "brain-mri"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["name"] == "brain-mri" and doc["version"] == load("brain-mri").version
    for stage in ("input", "timeline", "masks", "registration", "preprocessing", "encoding", "regions", "scoring"):
        assert isinstance(doc[stage], dict), stage
    # values from pipelines/brain-mri.toml, and defaults for keys it leaves out
    assert doc["regions"]["kind"] == "grid" and doc["regions"]["size_mm"] == 8.0 and doc["regions"]["overlap"] == 0.5
    assert doc["regions"]["min_mask_fraction"] == 0.3
    assert doc["scoring"]["maps"] == ["intensity", "encoder"] and doc["scoring"]["normative_model"] is None
    assert doc["registration"]["stages"] == ["rigid", "affine"] and doc["masks"]["brain"] is True
    assert doc["encoding"]["name"] == "efficientnet-lite0"


def test_pipelines_show_reads_a_pipeline_file(tmp_path, capsys):
    path = tmp_path / "mine.toml"
    path.write_text(_brain_mri_text(**{'kind = "grid"': 'kind = "components"', "size_mm = 8.0": "size_mm = 6.0"}))
    assert cli.main(["pipelines", "--show", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["regions"]["kind"] == "components" and doc["regions"]["size_mm"] == 6.0
    assert doc["source"] == str(path)


def test_pipelines_show_an_unknown_name_fails_in_one_line(capsys):
    assert cli.main(["pipelines", "--show", "no-such-pipeline"]) == cli.EXIT_BAD_INPUT
    line = _one_error_line(capsys)
    assert "unknown pipeline 'no-such-pipeline'" in line
    assert all(name in line for name in available())  # it says which ones exist


# --------------------------------------------------------------------------- a normative model


@pytest.fixture(scope="module")
def normative(tmp_path_factory):
    """A normative model fitted on the easy set's stable pair (sub-03), as in test_evaluation; its pipeline
    (intensity and subtraction maps: no encoder) and a pipeline that names the model in [scoring]."""
    folder = tmp_path_factory.mktemp("normative")
    fit = folder / "fit.toml"
    fit.write_text(_brain_mri_text(**{'maps = ["intensity", "encoder"]': 'maps = ["intensity", "subtraction"]'}))
    model = folder / "model.npz"
    status = cli.main(["fit-normative", str(EASY), "-o", str(model), "--pipeline", str(fit), "--patients", "sub-03"])
    assert status == 0 and model.is_file()
    use = folder / "use.toml"
    use.write_text(fit.read_text().replace("[scoring]\n", '[scoring]\nnormative_model = "model.npz"\n'))
    return folder, model, use


@pytest.fixture(scope="module")
def normative_comparison(normative):
    _, model, use = normative
    pipeline = load(use)
    calls = {"load": [], "fit": 0}
    real_load, real_fit = ChangeDetector.load.__func__, ChangeDetector.fit

    def spy_load(cls, path):
        calls["load"].append(Path(path))
        return real_load(cls, path)

    def spy_fit(self, *args, **kw):
        calls["fit"] += 1
        return real_fit(self, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ChangeDetector, "load", classmethod(spy_load))
        mp.setattr(ChangeDetector, "fit", spy_fit)
        comparison = compare(*_pair("sub-04"), pipeline)
    return comparison, calls


def test_a_pipeline_names_its_normative_model_relative_to_its_file(normative):
    folder, model, use = normative
    assert load(use).scoring.normative_model == model
    assert ChangeDetector.load(model).n_fit_ > 1000


def test_compare_scores_with_the_normative_model_the_pipeline_names(normative, normative_comparison, tmp_path):
    _, model, _ = normative
    c, calls = normative_comparison
    assert calls["load"] == [model]  # read once, before any work
    assert calls["fit"] == 0  # no detector fitted within the pair: the normative one scored it
    assert c.verdict in VERDICTS and c.verdict != "not comparable"
    assert isinstance(c.progression_score, float) and np.isfinite(c.threshold)
    assert c.pipeline.scoring.normative_model == model
    doc = _result_doc(c, tmp_path)
    assert doc["pipeline"]["settings"]["scoring"]["normative_model"] == str(model)
    assert doc["verdict"] == c.verdict


def test_compare_with_the_normative_model_finds_the_known_lesion(normative_comparison):
    c, _ = normative_comparison
    assert c.verdict == "progression"
    _assert_lesion_found(c, "sub-04")


def _garbage(model: Path, path: Path) -> None:
    path.write_bytes(b"\x00not a model at all\n" * 20)


def _truncated(model: Path, path: Path) -> None:
    data = model.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # starts like a zip, ends nowhere


def _inconsistent(model: Path, path: Path) -> None:
    meta, arrays = modelfile.load(model, MODEL_FORMAT)
    meta.pop("format")
    arrays["fit_rows"] = arrays["fit_rows"][:, :2]  # two columns for four feature names
    modelfile.save(path, MODEL_FORMAT, meta, arrays)


@pytest.mark.parametrize("corrupt,reason", [(_garbage, "not a zip of arrays"), (_truncated, "BadZipFile"),
                                            (_inconsistent, "inconsistent.*do not match 4 feature names")],
                         ids=["garbage", "truncated", "inconsistent"])
def test_a_corrupt_normative_model_is_an_input_error_naming_the_file(normative, tmp_path, corrupt, reason):
    folder, model, use = normative
    bad = tmp_path / "bad-model.npz"
    corrupt(model, bad)
    pipeline_file = tmp_path / "bad.toml"
    pipeline_file.write_text(use.read_text().replace('normative_model = "model.npz"',
                                                     'normative_model = "bad-model.npz"'))
    pipeline = load(pipeline_file)
    assert pipeline.scoring.normative_model == bad
    with pytest.raises(InputError, match=reason) as info:
        compare(*_pair("sub-04"), pipeline)
    assert info.value.path == str(bad) and str(bad) in str(info.value)


def test_a_corrupt_normative_model_fails_compare_in_one_line(normative, tmp_path, capsys):
    _, model, use = normative
    bad = tmp_path / "model.npz"
    _truncated(model, bad)
    pipeline_file = tmp_path / "bad.toml"
    pipeline_file.write_text(use.read_text())  # names model.npz next to it: the truncated copy
    out = tmp_path / "out"
    status = cli.main(["compare", str(_visit("sub-04", "ses-01")), str(_visit("sub-04", "ses-02")), "-o", str(out),
                       "--pipeline", str(pipeline_file)])
    assert status == cli.EXIT_BAD_INPUT
    line = _one_error_line(capsys)
    assert str(bad) in line and "model file" in line
    assert not (out / "result.json").exists()
