"""Pipelines: every shipped file loads; a bad file gets an error naming the key and its line."""

from pathlib import Path

import pytest

from longitudinal.errors import InputError
from longitudinal.pipeline import available, load


def test_shipped_pipelines_load_with_their_settings():
    shipped = available()
    assert {"brain-mri", "chest-ct", "generic-2d"} <= set(shipped)
    brain = load("brain-mri")
    assert brain.name == "brain-mri"
    assert brain.registration.stages == ("rigid", "affine")
    assert brain.preprocessing.n4 is True
    assert load("chest-ct").preprocessing.harmonisation == "none"
    assert load("generic-2d").regions.size_mm > 0


def _write(tmp_path, text):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


HEADER = 'name = "x"\nversion = "1"\n'


def test_unknown_key_names_key_and_line(tmp_path):
    path = _write(tmp_path, HEADER + "\n[regions]\nkind = 'grid'\nsize_mmm = 8\n")
    with pytest.raises(InputError) as err:
        load(path)
    assert "line 6" in str(err.value) and "size_mmm" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_names_key_and_line(tmp_path):
    path = _write(tmp_path, HEADER + "[scoring]\nnu = 'high'\n")
    with pytest.raises(InputError, match=r"line 4: \[scoring\] nu: expected a number"):
        load(path)


def test_value_outside_choices_is_refused(tmp_path):
    path = _write(tmp_path, HEADER + "[regions]\nkind = 'hexagons'\n")
    with pytest.raises(InputError, match=r"line 4: \[regions\] kind: must be one of"):
        load(path)


def test_invalid_toml_and_unknown_table(tmp_path):
    with pytest.raises(InputError, match="not valid TOML"):
        load(_write(tmp_path, HEADER + "[scoring\n"))
    with pytest.raises(InputError, match=r"line 3: unknown key 'scorng'"):
        load(_write(tmp_path, HEADER + "[scorng]\nnu = 0.1\n"))


def test_settings_rejected_by_a_stage_are_reported(tmp_path):
    path = _write(tmp_path, HEADER + "[registration]\nstages = ['warp']\n")
    with pytest.raises(InputError, match=r"\[registration\].*stages"):
        load(path)


@pytest.mark.parametrize("table, line", [
    ("[registration]\nstages = ['warp']\n", r"line 4: \[registration\] stages: must be one of 'rigid'"),
    ("[scoring]\nnu = 0.1\nfalse_findings_per_pair = 0\n", r"line 5: \[scoring\] false_findings_per_pair: "
     r"must be > 0"),
    ("[encoding]\ngrid_stride = 3\n", r"line 4: \[encoding\] grid_stride: must be a power of two"),
    ("[masks]\nclosing_mm = -1.0\n", r"line 4: \[masks\] closing_mm: must be >= 0"),
    ("[timeline]\nseries_description = '(T1'\n", r"line 4: \[timeline\] series_description: not a regular"),
    ("[preprocessing]\nct_window = [1.0]\n", r"line 4: \[preprocessing\] ct_window: expected 2 values"),
])
def test_every_stage_rule_names_the_line_of_its_key(tmp_path, table, line):
    """Type rules and range rules live in the settings classes; the loader only points at the line."""
    with pytest.raises(InputError, match=line):
        load(_write(tmp_path, HEADER + table))


def test_the_python_api_meets_the_same_rules_as_a_pipeline_file():
    from longitudinal.encoding import EncoderSettings
    from longitudinal.scoring import ScoringSettings
    from longitudinal.settings import SettingError

    with pytest.raises(SettingError, match="maps: must be one of"):
        ScoringSettings(maps=("intensity", "colour"))
    with pytest.raises(SettingError, match="combine: must be one of 'mean', 'concat'"):
        EncoderSettings(combine="max")
    assert ScoringSettings(false_findings_per_pair=1, maps=["intensity"]).false_findings_per_pair == 1.0


def test_unknown_pipeline_name_lists_shipped():
    with pytest.raises(InputError, match="brain-mri"):
        load("no-such-pipeline")


def test_shipped_pipelines_are_package_resources():
    import longitudinal

    package = Path(longitudinal.__file__).resolve().parent
    shipped = available()
    assert set(shipped) == {p.stem for p in (package / "pipelines").glob("*.toml")}
    assert Path(load("brain-mri").source) == package / "pipelines" / "brain-mri.toml"


def test_files_named_in_a_pipeline_resolve_next_to_it(tmp_path, monkeypatch):
    folder = tmp_path.resolve() / "site" / "pipelines"
    folder.mkdir(parents=True)
    path = folder / "atlas.toml"
    path.write_text(HEADER + "[regions]\nkind = 'labels'\nlabel_map = 'atlas/labels.nii.gz'\n"
                    "[scoring]\nnormative_model = '../models/normal.npz'\n"
                    "[encoding]\nweights = 'w.pt'\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    p = load(path)
    assert p.regions.label_map == folder / "atlas" / "labels.nii.gz"
    assert p.scoring.normative_model == (folder / ".." / "models" / "normal.npz")
    assert p.encoding.weights == str(folder / "w.pt")
    # loaded through a relative path from another folder: still relative to the file
    monkeypatch.chdir(tmp_path)
    assert load(Path("site/pipelines/atlas.toml")).regions.label_map == folder / "atlas" / "labels.nii.gz"
    absolute = tmp_path.resolve() / "abs.nii.gz"
    path.write_text(HEADER + f"[regions]\nkind = 'labels'\nlabel_map = '{absolute}'\n")
    assert load(path).regions.label_map == absolute
