"""benchmarks/cohort.py on one tiny patient per set: layout, truth, brain masks, determinism per seed.

The benchmark itself (1 mm whole heads, ~40 3D pairs) is generated outside the repository; here every size is
shrunk (2.5 mm anatomy, 2x voxels, 128 px fundus) so the checks run in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

pytest.importorskip("nilearn", reason="the cohort is simulated from nilearn's MNI152 template")
pytest.importorskip("skimage", reason="the fundus set is simulated from scikit-image's retina photograph")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


cohort = _load("cohort")
TINY = cohort.Options(anatomy_mm=2.5, voxel_scale=1.6, change_scale=2.0, fundus_px=128)
SETS = ("visible", "subtle", "fundus")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    cohort.generate("dev", out, SETS, patients=1, opts=TINY)
    return out


def _followups(root: Path, set_name: str):
    doc = json.loads((root / set_name / "cohort.json").read_text())
    for p in doc["patients"]:
        for v in p["visits"]:
            yield doc, p, v


def test_layout_is_what_evaluate_and_batch_read(tiny):
    from longitudinal.timeline import discover

    for set_name in SETS:
        root = tiny / set_name
        doc = json.loads((root / "cohort.json").read_text())
        assert doc["split"] == "dev" and doc["set"] == set_name and len(doc["patients"]) == 1
        found = {p.id: [v.id for v in p.visits] for p in discover(root)}
        for p in doc["patients"]:
            assert found[p["patient"]] == [v["visit"] for v in p["visits"]]
            for i, v in enumerate(p["visits"]):
                assert (root / v["image"]).is_file()
                truth = root / "derivatives" / "changes" / p["patient"] / v["visit"]
                changes = json.loads((truth / "changes.json").read_text())
                assert {"changes", "nuisances", "grid"} <= set(changes)
                mask_name = "changemask.png" if set_name == "fundus" else "changemask.nii.gz"
                assert (truth / mask_name).is_file() == (i > 0)
                if set_name != "fundus":
                    assert (truth / "brainmask.nii.gz").is_file() and (truth / "to_anatomy.tfm").is_file()
                    for key in ("whole_head", "slice_axis", "slice_thickness_mm", "fov_cut_mm", "fov_cut_end",
                                "rotation_deg", "gamma", "distortion_mm", "noise_rel_wm"):
                        assert key in v["tags"]
                    for c in changes["changes"]:
                        assert {"id", "type", "centre_mm", "centre_voxel", "diameter_mm", "contrast_pct",
                                "volume_mm3", "mask_voxels", "extent_mm"} <= set(c)


def test_truth_is_non_empty_exactly_for_changed_visits(tiny):
    seen = set()
    for set_name in SETS:
        for _doc, p, v in _followups(tiny, set_name):
            if v["baseline"]:
                continue
            folder = tiny / set_name / "derivatives" / "changes" / p["patient"] / v["visit"]
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(next(folder.glob("changemask.*")))))
            image = sitk.ReadImage(str(tiny / set_name / v["image"]))
            shape = sitk.GetArrayViewFromImage(image).shape
            assert mask.shape == (shape[:2] if set_name == "fundus" else shape)
            assert bool(mask.any()) == (not v["stable"]), (set_name, p["patient"], v["visit"])
            seen.add(bool(v["stable"]))
    assert seen == {True, False}  # the tiny plan has a stable and a changed follow-up


def test_brain_mask_covers_the_lesions(tiny):
    checked = 0
    for set_name in ("visible", "subtle"):
        for _doc, p, v in _followups(tiny, set_name):
            folder = tiny / set_name / "derivatives" / "changes" / p["patient"] / v["visit"]
            brain = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "brainmask.nii.gz"))) > 0
            assert 0.02 < brain.mean() < 0.9
            if v["baseline"] or v["stable"]:
                continue
            change = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "changemask.nii.gz"))) > 0
            assert (change & brain).sum() >= 0.9 * change.sum()
            checked += 1
    assert checked >= 2


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_split_same_bytes_other_split_differs(tiny, tmp_path):
    cohort.generate("dev", tmp_path / "again", ("subtle", "fundus"), patients=1, opts=TINY)
    for set_name in ("subtle", "fundus"):
        assert _tree(tmp_path / "again" / set_name) == _tree(tiny / set_name)
    cohort.generate("validation", tmp_path / "val", ("subtle",), patients=1, opts=TINY)
    a, b = _tree(tmp_path / "val" / "subtle"), _tree(tiny / "subtle")
    image_a = [k for k in a if k.endswith("t1.nii.gz")]
    assert image_a and all(a[k] != b.get(k) for k in image_a)
