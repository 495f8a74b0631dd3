"""Evaluation metrics on hand-made masks with known answers, and `evaluate` on one sample pair."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from longitudinal import cli
from longitudinal.errors import InputError
from longitudinal.evaluation import (f1, lesion_metrics, pair_auroc, read_truth, summarise,
                                     truth_lesions, voxel_metrics)
from longitudinal.pipeline import available

SAMPLES = Path(__file__).resolve().parent.parent / "sample_studies"


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_lesion_metrics_known_answer():
    shape = (20, 20, 20)
    truth = _box(shape, (2, 2, 2), (5, 5, 5)) | _box(shape, (12, 12, 12), (15, 15, 15))
    flagged = _box(shape, (4, 4, 4), (8, 8, 8))  # overlaps the first lesion
    flagged |= _box(shape, (2, 15, 2), (4, 18, 4))  # touches nothing: a false positive
    flagged |= _box(shape, (16, 2, 16), (18, 4, 18))  # another false positive
    m = lesion_metrics(truth, flagged)
    assert (m["truth_lesions"], m["found_lesions"], m["flagged_findings"], m["false_positive_findings"]) == (2, 1, 3, 2)
    assert m["true_findings"] == 1
    assert f1(0.5, 1 / 3) == pytest.approx(0.4)
    assert lesion_metrics(truth, np.zeros(shape, bool))["false_positive_findings"] == 0


def test_flagged_pieces_two_voxels_apart_are_one_finding_three_apart_are_two():
    shape = (20, 20, 20)
    truth = _box(shape, (2, 2, 2), (5, 5, 5))
    near = _box(shape, (3, 3, 3), (5, 5, 5)) | _box(shape, (7, 3, 3), (9, 5, 5))  # gap of 2 voxels: a rim piece
    assert lesion_metrics(truth, near)["flagged_findings"] == 1
    assert lesion_metrics(truth, near)["false_positive_findings"] == 0
    far = _box(shape, (3, 3, 3), (5, 5, 5)) | _box(shape, (8, 3, 3), (10, 5, 5))  # gap of 3 voxels: apart
    m = lesion_metrics(truth, far)
    assert (m["flagged_findings"], m["false_positive_findings"]) == (2, 1)
    assert lesion_metrics(truth, far, merge_voxels=0)["flagged_findings"] == 2


def test_truth_fragments_one_voxel_apart_are_one_lesion():
    shape = (10, 10, 10)
    truth = _box(shape, (2, 2, 2), (4, 4, 4)) | _box(shape, (5, 2, 2), (7, 4, 4))  # gap of one voxel
    truth |= _box(shape, (2, 8, 8), (3, 9, 9))  # far away
    _, n = truth_lesions(truth)
    assert n == 2


def test_voxel_metrics_known_answers():
    truth = np.array([0, 0, 1, 1, 0, 1], bool)
    fg = np.ones(6, bool)
    assert voxel_metrics(truth, truth.astype(float), fg)["voxel_auroc"] == 1.0
    assert voxel_metrics(truth, 1.0 - truth, fg)["voxel_auroc"] == 0.0
    # positives 0.6, 0.9, 0.2; negatives 0.1, 0.3, 0.5 -> 7 of 9 pairs ordered right
    score = np.array([0.1, 0.3, 0.6, 0.9, 0.5, 0.2])
    assert voxel_metrics(truth, score, fg)["voxel_auroc"] == pytest.approx(7 / 9)
    fg[2] = False  # outside the foreground: ignored
    assert voxel_metrics(truth, score, fg)["voxel_auroc"] == pytest.approx(4 / 6)  # 0.9 > all, 0.2 > 0.1
    assert np.isnan(voxel_metrics(np.zeros(6, bool), score, fg)["voxel_auroc"])
    assert pair_auroc([3.0, 1.0, 2.0], [True, False, False]) == 1.0
    assert pair_auroc([1.0, 3.0, 4.0], [True, False, True]) == 0.5


def test_summarise_pools_pairs():
    rows = [
        {"changed": True, "lesions": [{"diameter_mm": 4.0}, {"diameter_mm": 8.0}], "methods": {"ours": {
            "truth_lesions": 2, "found_lesions": 1, "found_ids": [2], "flagged_findings": 2, "true_findings": 1,
            "false_positive_findings": 1, "voxel_auroc": 0.9, "voxel_ap": 0.5, "progression_score": 9.0,
            "progression": True, "seconds": 10.0}}},
        {"changed": False, "lesions": [], "methods": {"ours": {
            "truth_lesions": 0, "found_lesions": 0, "found_ids": [], "flagged_findings": 0, "true_findings": 0,
            "false_positive_findings": 0, "voxel_auroc": float("nan"), "voxel_ap": float("nan"),
            "progression_score": 2.0, "progression": False, "seconds": 20.0}}},
    ]
    s = summarise(rows, ("ours",))["ours"]
    assert s["lesion_sensitivity"] == 0.5 and s["lesion_precision"] == 0.5 and s["lesion_f1"] == 0.5
    assert s["false_positives_per_pair"] == 0.5 and s["false_positives_per_stable_pair"] == 0.0
    assert s["pair_auroc"] == 1.0 and s["smallest_found_diameter_mm"] == 8.0
    assert s["all_found_from_diameter_mm"] == 8.0 and s["voxel_auroc_mean"] == 0.9
    assert (s["pair_accuracy"], s["pair_recall"], s["pair_precision"], s["pair_f1"]) == (1.0, 1.0, 1.0, 1.0)
    rows[1]["methods"]["ours"]["progression"] = True  # a stable pair called progressing
    s = summarise(rows, ("ours",))["ours"]
    assert (s["pair_accuracy"], s["pair_recall"], s["pair_precision"]) == (0.5, 1.0, 0.5)
    assert s["pair_f1"] == pytest.approx(2 / 3)


def test_read_truth_names_the_missing_folder(tmp_path):
    with pytest.raises(InputError, match="P9"):
        read_truth(tmp_path, "P9", "v2")


def test_evaluate_one_sample_pair_writes_metrics(tmp_path, capsys):
    out = tmp_path / "eval"
    status = cli.main(["evaluate", str(SAMPLES / "easy"), "-o", str(out), "--methods", "subtraction",
                       "--patients", "sub-01"])
    assert status == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["pairs"] == 2 and [r["visit"] for r in doc["rows"]] == ["ses-02", "ses-03"]
    s = doc["summary"]["subtraction"]
    for key in ("lesion_sensitivity", "false_positives_per_pair", "false_positives_per_stable_pair", "lesion_f1",
                "voxel_auroc_mean", "voxel_ap_mean", "pair_auroc", "smallest_found_diameter_mm", "truth_lesions"):
        assert key in s
    assert s["truth_lesions"] == 4  # 1 lesion at ses-02, 3 at ses-03 (sample_studies/README.md)
    assert s["lesion_sensitivity"] >= 0.75 and s["voxel_auroc_mean"] > 0.95  # easy: subtraction works
    assert (out / "summary.md").read_text() in capsys.readouterr().out


def test_fit_normative_on_a_stable_sample_pair(tmp_path, capsys):
    text = available()["brain-mri"].read_text()
    text = text.replace('maps = ["intensity", "encoder"]', 'maps = ["intensity", "subtraction"]')
    assert 'maps = ["intensity", "subtraction"]' in text
    pipeline = tmp_path / "intensity.toml"
    pipeline.write_text(text)
    model = tmp_path / "model.npz"
    status = cli.main(["fit-normative", str(SAMPLES / "easy"), "-o", str(model), "--pipeline", str(pipeline),
                       "--patients", "sub-03"])  # sub-03: the easy set's stable patient
    assert status == 0 and "normative model fitted on" in capsys.readouterr().out
    from longitudinal.scoring import ChangeDetector

    detector = ChangeDetector.load(model)
    assert detector.n_fit_ > 1000
    assert detector.feature_names_ == ("intensity_mean_z", "intensity_max_z", "subtraction_mean_z",
                                       "subtraction_max_z")


def test_methods_sharing_an_encoder_score_as_each_does_alone():
    """evaluate_pair encodes once per encoder: ours and random-encoder side by side give exactly what each gives
    alone (the random encoder's features are not ours, and sharing changes no figure)."""
    from longitudinal.evaluation import PairJob, evaluate_pair
    from longitudinal.timeline import discover, pairs

    patient = next(p for p in discover(SAMPLES / "easy") if p.id == "sub-01")
    pair = pairs(patient)[0]
    job = lambda methods: PairJob(SAMPLES / "easy", pair, None, methods)  # noqa: E731
    together = evaluate_pair(job(("ours", "subtraction", "random-encoder")))["methods"]
    keys = ("found_lesions", "false_positive_findings", "progression_score", "voxel_auroc", "threshold")
    for method in ("ours", "random-encoder"):
        alone = evaluate_pair(job((method,)))["methods"][method]
        assert {k: together[method][k] for k in keys} == {k: alone[k] for k in keys}, method
    assert together["ours"]["progression_score"] != together["random-encoder"]["progression_score"]
