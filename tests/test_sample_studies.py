"""The committed sample studies: files load, truth sits on each visit's grid and agrees with changes.json.

These read the committed files only (no nilearn / scikit-image needed); the rebuild tests skip without them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

SAMPLES = Path(__file__).resolve().parents[1] / "sample_studies"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"sample_studies_{name}", SAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


build = _load("build")
check_drift = _load("check_drift")

VISITS = [(s, p.name, v, i) for s in build.SETS for p in build.PATIENTS[s]
          for i, v in enumerate(build.visit_names(p, s))]
FOLLOWUPS = [x for x in VISITS if x[3] > 0]
THREE_D = [x for x in FOLLOWUPS if x[0] != "fundus"]


def truth_doc(set_name: str, patient: str, visit: str) -> dict:
    return json.loads((SAMPLES / set_name / "derivatives" / "changes" / patient / visit / "changes.json").read_text())


def visit_image(set_name: str, doc: dict) -> sitk.Image:
    if set_name == "fundus":  # RGB as stored
        return sitk.ReadImage(str(SAMPLES / set_name / doc["image"]))
    return check_drift.read_visit_image(SAMPLES / set_name, doc)


def changemask(set_name: str, patient: str, visit: str) -> sitk.Image:
    folder = SAMPLES / set_name / "derivatives" / "changes" / patient / visit
    return sitk.ReadImage(str(folder / ("changemask.png" if set_name == "fundus" else "changemask.nii.gz")))


def spec_of(set_name: str, patient: str):
    return next(p for p in build.PATIENTS[set_name] if p.name == patient)


def test_sets_have_the_promised_shape():
    stable = {s: [p.name for p in build.PATIENTS[s] if all(k == "static_lesion" for k, _ in p.events)]
              for s in build.SETS}
    assert len(build.PATIENTS["easy"]) >= 4 and len(stable["easy"]) >= 1
    assert len(build.PATIENTS["hard"]) >= 5 and len(stable["hard"]) >= 2
    assert len(build.PATIENTS["fundus"]) == 3 and len(stable["fundus"]) == 1
    assert all(2 <= len(p.dates) <= 3 for s in build.SETS for p in build.PATIENTS[s])
    kinds = {k for s in ("easy", "hard") for p in build.PATIENTS[s] for k, _ in p.events}
    assert {"new_lesion", "growing_lesion", "atrophy", "static_lesion"} <= kinds


@pytest.mark.parametrize("set_name,patient,visit,index", VISITS, ids=lambda x: str(x))
def test_visit_image_loads_on_its_recorded_grid(set_name, patient, visit, index):
    doc = truth_doc(set_name, patient, visit)
    assert (doc["patient"], doc["visit"], doc["is_baseline"]) == (patient, visit, index == 0)
    img = visit_image(set_name, doc)
    grid = doc["grid"]
    assert list(img.GetSize()) == grid["size"]
    if set_name == "fundus":
        assert img.GetNumberOfComponentsPerPixel() == 3 and img.GetPixelID() == sitk.sitkVectorUInt8
        return
    assert np.allclose(img.GetSpacing(), grid["spacing"], atol=1e-4)
    assert np.allclose(img.GetOrigin(), grid["origin"], atol=1e-3)
    assert np.allclose(img.GetDirection(), grid["direction"], atol=1e-5)
    arr = sitk.GetArrayViewFromImage(img)
    assert 0.2 < (arr > 0).mean() < 0.6  # a brain in the field of view, background zero
    if set_name != "dicom":
        assert sitk.ReadImage(str(SAMPLES / set_name / doc["image"])).GetPixelID() == sitk.sitkInt16
    n = doc["nuisances"]
    assert n["slice_thickness_mm"] == pytest.approx(img.GetSpacing()[2])
    if set_name == "hard" and index > 0:
        assert 0.5 <= n["distortion_max_mm"] <= 2.0 and 0.8 <= n["gamma"] <= 1.25


@pytest.mark.parametrize("set_name,patient,visit,index", FOLLOWUPS, ids=lambda x: str(x))
def test_changemask_is_on_exactly_its_visits_grid(set_name, patient, visit, index):
    doc = truth_doc(set_name, patient, visit)
    img, mask = visit_image(set_name, doc), changemask(set_name, patient, visit)
    assert mask.GetPixelID() == sitk.sitkUInt8 and mask.GetNumberOfComponentsPerPixel() == 1
    assert mask.GetSize() == img.GetSize()
    assert np.allclose(mask.GetSpacing(), img.GetSpacing(), atol=1e-5)
    assert np.allclose(mask.GetOrigin(), img.GetOrigin(), atol=1e-4)
    assert np.allclose(mask.GetDirection(), img.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}


@pytest.mark.parametrize("set_name,patient,visit,index", FOLLOWUPS, ids=lambda x: str(x))
def test_truth_agrees_with_changes_json(set_name, patient, visit, index):
    doc = truth_doc(set_name, patient, visit)
    mask_img = changemask(set_name, patient, visit)
    mask = sitk.GetArrayFromImage(mask_img) > 0
    changes = doc["changes"]
    stable = all(k == "static_lesion" for k, _ in spec_of(set_name, patient).events)
    if stable:
        assert changes == [] and not mask.any()
        return
    # Every change that reaches the grid owns voxels; the per-change counts add up (changes never overlap).
    assert sum(c["mask_voxels"] for c in changes) == mask.sum()
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    visible = [c for c in changes if c["mask_voxels"] > 0]
    assert n >= len(visible)  # no two changes merged into one component (they are placed >= 10 mm apart)
    spacing = np.array(mask_img.GetSpacing())
    owners = set()
    for lab in range(1, n + 1):
        centroid_xyz = np.argwhere(labels == lab).mean(axis=0)[::-1]
        dist = [np.linalg.norm((centroid_xyz - np.array(c["centre_voxel"])) * spacing) for c in visible]
        k = int(np.argmin(dist))
        assert dist[k] <= visible[k]["extent_mm"] + 2 * spacing.max(), (lab, dist)  # no orphan truth
        owners.add(visible[k]["id"])
    assert owners == {c["id"] for c in visible}
    for c in changes:
        assert c["type"] in {"new_lesion", "growing_lesion", "atrophy"}
        if c["type"] == "new_lesion" and c["mask_voxels"] > 0:  # the recorded centre is inside its lesion
            idx = tuple(int(i) for i in c["centre_voxel"][::-1])
            near = tuple(slice(max(i - 1, 0), i + 2) for i in idx)
            assert mask[near].any()
        if c["type"] == "growing_lesion":
            assert c["growth_radius_mm"] > 0 and c["diameter_mm"] > c["baseline_diameter_mm"]


@pytest.mark.parametrize("set_name,patient,visit,index", [x for x in THREE_D if x[0] == "easy"],
                         ids=lambda x: str(x))
def test_easy_lesions_show_their_contrast_in_the_image(set_name, patient, visit, index):
    """The truth points at voxels whose intensity really changed in the recorded direction."""
    doc = truth_doc(set_name, patient, visit)
    img = sitk.GetArrayFromImage(visit_image(set_name, doc))
    mask = sitk.GetArrayFromImage(changemask(set_name, patient, visit)) > 0
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    for c in doc["changes"]:
        if c["type"] != "new_lesion":
            continue
        lab = labels[tuple(c["centre_voxel"][::-1])]
        assert lab > 0
        inside = labels == lab
        ring = ndimage.binary_dilation(inside, iterations=3) & ~ndimage.binary_dilation(inside, iterations=1)
        rel = np.median(img[inside]) / np.median(img[ring]) - 1
        assert np.sign(rel) == np.sign(c["contrast_pct"]) and abs(rel) > 0.1, (c["id"], rel)


def test_bids_easy_set_lists_sessions_with_dates():
    easy = SAMPLES / "easy"
    assert json.loads((easy / "dataset_description.json").read_text())["BIDSVersion"]
    participants = (easy / "participants.tsv").read_text().split()
    for p in build.PATIENTS["easy"]:
        assert p.name in participants
        rows = [r.split("\t") for r in (easy / p.name / f"{p.name}_sessions.tsv").read_text().splitlines()]
        assert rows[0] == ["session_id", "acq_time"]
        assert [r[0] for r in rows[1:]] == list(build.visit_names(p, "easy"))
        assert [r[1][:10] for r in rows[1:]] == list(p.dates)


def test_dicom_series_are_rle_shuffled_and_named_by_study_date():
    pydicom = pytest.importorskip("pydicom")
    (spec,) = build.PATIENTS["dicom"]
    files = sorted((SAMPLES / "dicom").glob("*/*/IM*"))
    assert files
    seen = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
        assert ds.PatientID == spec.name and ds.Modality == "MR"
        seen.setdefault((ds.StudyDate, ds.SeriesInstanceUID), []).append((f.name, int(ds.InstanceNumber)))
    assert sorted(d for d, _ in seen) == list(build.visit_names(spec, "dicom"))
    for items in seen.values():
        by_name = [i for _, i in sorted(items)]
        assert sorted(by_name) == list(range(1, len(items) + 1)) and by_name != sorted(by_name)
    ds = pydicom.dcmread(files[0])
    assert float(ds.RescaleIntercept) != 0 and ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_subtraction_is_easy_on_easy_and_drowned_in_drift_on_hard():
    """With perfect registration, |follow-up - baseline| finds easy lesions but not the hard ones; a minimal
    pooled detector still finds the hard ones, so the hard set is hard, not impossible."""
    aurocs = {}
    for set_name in ("easy", "hard"):
        for p, v in check_drift.followups(set_name, changed_only=True):
            pair = check_drift.aligned_pair(set_name, p, v, "linear")
            for pooled in (False, True):
                aurocs.setdefault((set_name, pooled), []).append(
                    check_drift.figures(pair, p, v, "linear", pooled).auroc)
    assert np.mean(aurocs["easy", False]) > 0.95
    assert np.mean(aurocs["hard", False]) < 0.75
    assert np.mean(aurocs["hard", True]) > 0.8


needs_sources = pytest.mark.skipif(
    importlib.util.find_spec("nilearn") is None or importlib.util.find_spec("skimage") is None,
    reason="rebuilding needs nilearn and scikit-image")


@needs_sources
def test_rebuild_is_bit_identical_to_the_committed_files(tmp_path):
    """A fresh process rebuilding a patient reproduces the committed bytes: the build is deterministic and
    the committed data are not stale."""
    build.build(tmp_path, sets=["easy"], patients=["sub-03"])
    got = {k: v for k, v in build.tree_hashes(tmp_path).items() if "sub-03" in k}
    assert any(k.endswith("T1w.nii.gz") for k in got) and any(k.endswith("changemask.nii.gz") for k in got)
    committed = build.tree_hashes(SAMPLES)
    assert got == {k: committed.get(k) for k in got}, "sample_studies/ is stale: run python sample_studies/build.py"


@needs_sources
def test_fundus_rebuild_matches_the_committed_files(tmp_path):
    build.build(tmp_path, sets=["fundus"], patients=["F003"])
    got = build.tree_hashes(tmp_path)
    committed = build.tree_hashes(SAMPLES)
    assert got and all(committed.get(k) == v for k, v in got.items() if "F003" in k)
