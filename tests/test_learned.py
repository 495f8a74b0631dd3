"""The supervised road: a Siamese network that learns, model files that are data, cards that must match."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from longitudinal import cli
from longitudinal.errors import InputError
from longitudinal.learned import RegionClassifier, SiameseModel, load_model, predict_regions
from longitudinal.learned.pairs import PairArrays, load_pair, save_pair
from longitudinal.learned.regional import ForestArrays, RegionalSettings
from longitudinal.learned.sampling import PatchSampler, SamplingSettings, prepare_for_sampling
from longitudinal.learned.siamese import SiameseNet, SiameseSettings, probability_of_arrays
from longitudinal.learned.siamese_training import loss_of, train_siamese
from longitudinal.learned.training import TrainSettings, check_requirements, requirements, split_patients
from longitudinal.pipeline import load as load_pipeline

nib = pytest.importorskip("nibabel")
SAMPLES = Path(__file__).resolve().parent.parent / "sample_studies"


@pytest.fixture(scope="module")
def pairs() -> list[PairArrays]:
    """Real anatomy (nilearn's MNI152 T1, 2 mm) as stable pairs of three 'patients' with their own noise; the
    first has a real change: a darker blob in its follow-up."""
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    vol = np.asarray(nib.load(path).dataobj, dtype=np.float32).transpose(2, 1, 0)[60:120:2, 40:200:2, 30:160:2]
    out = []
    for i in range(3):
        rng = np.random.default_rng(i)
        b = (vol + rng.normal(0, 2, vol.shape)).astype(np.float32)
        f = (vol + rng.normal(0, 2, vol.shape)).astype(np.float32)
        truth = np.zeros(vol.shape, bool)
        if i == 0:
            truth[14:17, 40:44, 30:34] = True
            f[truth] *= 0.6
        out.append(PairArrays(f"set/P{i}/v2", f"set/P{i}", b, f, vol > 15, truth, (2.0, 2.0, 2.0), False))
    return out


def _tiny() -> tuple[SiameseSettings, SamplingSettings]:
    return SiameseSettings(patch=32, width=8), SamplingSettings(patch=32)


def test_loss_goes_down_on_balanced_patches(pairs):
    net_settings, sampling = _tiny()
    torch.manual_seed(0)
    net = SiameseNet(net_settings).train()
    sampler = PatchSampler([prepare_for_sampling(p, p.spacing) for p in pairs], sampling, seed=0)
    batch = sampler.batch(8)
    assert 0 < float(batch.truth.sum()) < batch.truth.numel()  # changed and unchanged voxels
    optimiser = torch.optim.AdamW(net.parameter_groups(3e-3))
    losses = []
    for _ in range(12):
        loss = loss_of(net(batch.baseline, batch.followup), batch.truth)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_encoder_stages_learn_slower_than_the_decoder():
    net = SiameseNet(_tiny()[0], pretrained=False)
    groups = net.parameter_groups(1e-3)
    lrs = [g["lr"] for g in groups]
    assert lrs[0] == 1e-3 and lrs[1:] == sorted(lrs[1:], reverse=True) and lrs[-1] < lrs[1] < lrs[0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    used = {id(p) for n, p in net.named_parameters() if not n.startswith("backbone.network._conv_head")
            and not n.startswith("backbone.network._bn1") and not n.startswith("backbone.network._fc")
            and not any(n.startswith(f"backbone.network._blocks.{k}.") for k in range(3, 7))}
    assert used <= set(ids)


def test_the_random_init_control_trains_its_whole_encoder_and_its_batch_norm(pairs):
    """--random-init: same network, no ImageNet weights; nothing to protect, so its encoder stages learn at the
    decoder's rate and its batch-norm statistics follow the data (the pretrained ones stay fixed)."""
    net_settings, sampling = _tiny()
    settings = TrainSettings(epochs=1, steps=1, batch_size=4, eval_every=1, held_back_patches=8,
                             synthetic_per_pair=0, seed=0, pretrained=False)
    result = train_siamese(pairs[:2], pairs[2:], load_pipeline("brain-mri"), settings, net_settings, sampling)
    net = result.model.net
    pretrained = SiameseNet(net_settings)
    assert not any(torch.equal(a, b) for a, b in zip(net.backbone.state_dict().values(),
                                                       pretrained.backbone.state_dict().values())
                   if a.dtype.is_floating_point and a.numel() > 64)
    bn = next(m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # statistics moved with the data
    assert not net.frozen_norm and net.train().backbone.training
    assert not pretrained.train().backbone.training


def test_tiny_training_run_saves_a_model_that_reloads_and_scores_identically(pairs, tmp_path):
    net_settings, sampling = _tiny()
    settings = TrainSettings(epochs=2, steps=2, batch_size=4, eval_every=1, held_back_patches=8,
                             synthetic_per_pair=1, seed=0)
    pipeline = load_pipeline("brain-mri")
    result = train_siamese(pairs[:2], pairs[2:], pipeline, settings, net_settings, sampling)
    assert [h["epoch"] for h in result.history] == [1, 1, 2, 2]
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert "lesion_f1" in result.history[-1] and result.metrics["held_back_pairs_synthetic"] == 1
    assert result.requires["pipeline"] == "brain-mri" and result.requires["patch"] == 32
    path = tmp_path / "siamese.npz"
    result.save(path, {"kind": "siamese", "requires": result.requires})
    with zipfile.ZipFile(path) as zf:  # data only: arrays and JSON
        assert sorted(zf.namelist()) == ["float32.npy", "int64.npy", "meta.json"]
    loaded = load_model(path, pipeline)
    assert isinstance(loaded, SiameseModel) and loaded.spacing == (2.0, 2.0, 2.0)
    p = pairs[0]
    before = probability_of_arrays(result.model, p.baseline, p.followup, p.mask, p.spacing)
    after = probability_of_arrays(loaded, p.baseline, p.followup, p.mask, p.spacing)
    assert before.probability.dtype == np.float32 and before.probability.shape == p.mask.shape
    np.testing.assert_array_equal(before.probability, after.probability)
    assert before.probability[~p.mask].max() == 0 and 0 < before.probability.max() <= 1


def test_a_tiny_region_classifier_run_trains_on_the_pairs_region_features_and_reloads(pairs, tmp_path):
    """The SVM road end to end on prepared pairs: region features as compare makes them, labels from the truth,
    held-back figures, and a saved model that scores the same after reloading."""
    from longitudinal.learned.regional import pair_regions, train_regional

    pipeline = load_pipeline("brain-mri")
    settings = TrainSettings(kind="svm", synthetic_per_pair=1, seed=0)
    result = train_regional(pairs[:2], pairs[2:], pipeline, settings, tmp_path)
    assert result.metrics["train_changed_regions"] > 0 and result.metrics["held_back_pairs_synthetic"] == 1
    assert {h["split"] for h in result.history} == {"train", "held_back"}
    path = tmp_path / "svm.npz"
    result.save(path, {"kind": "svm", "requires": result.requires})
    loaded = load_model(path, pipeline)
    regions = pair_regions(pairs[0], pipeline, replace(pipeline.scoring, normative_model=None), tmp_path)
    before = predict_regions(result.model, regions.X, regions.names)
    np.testing.assert_allclose(predict_regions(loaded, regions.X, regions.names), before)
    assert before[regions.y].max() > np.median(before[~regions.y])  # the changed regions stand out


def test_model_with_a_mismatched_card_is_refused(pairs, tmp_path):
    net = SiameseNet(_tiny()[0], pretrained=False)
    brain = load_pipeline("brain-mri")
    path = tmp_path / "m.npz"
    SiameseModel(net, (2.0, 2.0, 2.0), False, {"requires": requirements(brain, "siamese", {"patch": 32})}).save(path)
    assert isinstance(load_model(path, brain), SiameseModel)
    with pytest.raises(InputError, match=r"m\.npz.*does not match the pipeline: pipeline is 'brain-mri' in the "
                                         r"model, 'generic-2d'"):
        load_model(path, load_pipeline("generic-2d"))
    other_encoder = replace(brain, encoding=replace(brain.encoding, name="efficientnet-lite2"))
    with pytest.raises(InputError, match="encoder is 'efficientnet-lite0' in the model, 'efficientnet-lite2'"):
        load_model(path, other_encoder)
    SiameseModel(net, (2.0, 2.0, 2.0), False, {}).save(path)
    with pytest.raises(InputError, match="model card lacks pipeline"):
        load_model(path, brain)
    with pytest.raises(InputError, match="features"):
        check_requirements({"requires": {"features": ["a", "b"]}}, {"features": ["a", "c"]}, path)


def test_siamese_file_that_is_a_pickle_or_truncated_is_refused(tmp_path):
    evil = tmp_path / "evil.npz"
    torch.save({"x": torch.zeros(2)}, evil)  # a torch/pickle zip: never unpickled here
    with pytest.raises(InputError, match="evil.npz"):
        load_model(evil)
    net = SiameseNet(_tiny()[0], pretrained=False)
    good = tmp_path / "good.npz"
    SiameseModel(net, (1.0, 1.0, 1.0), False, {}).save(good)
    with zipfile.ZipFile(good) as zf:
        meta = json.loads(zf.read("meta.json"))
        members = {n: zf.read(n) for n in zf.namelist()}
    meta["settings"]["width"] = 12  # the arrays no longer fit the network
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(bad, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, json.dumps(meta) if n == "meta.json" else data)
    with pytest.raises(InputError, match=r"bad\.npz.*does not fit"):
        load_model(bad)


@pytest.mark.parametrize("kind", ["svm", "rf"])
def test_region_classifier_round_trip_without_pickle(tmp_path, kind):
    rng = np.random.default_rng(0)
    names = ("intensity_mean_z", "intensity_max_z", "encoder_stage1_mean_z")
    X = rng.normal(size=(600, 3))
    y = X[:, 0] + 0.5 * X[:, 1] + rng.normal(0, 0.5, 600) > 1.5
    model = RegionClassifier(RegionalSettings(kind=kind, n_estimators=50)).fit(X, y, names)
    scores = predict_regions(model, X, names)
    assert scores.shape == (600,) and np.corrcoef(scores, y)[0, 1] > 0.5  # it learned the boundary
    path = tmp_path / f"{kind}.npz"
    model.save(path, {"kind": kind})
    with zipfile.ZipFile(path) as zf:  # SVM: the fit rows (refitted on load); forest: the trees as arrays
        members = sorted(zf.namelist())
    assert all(m.endswith(".npy") for m in members if m != "meta.json")
    assert members == (["X.npy", "meta.json", "y.npy"] if kind == "svm" else
                       sorted(["meta.json", *(f"forest_{k}.npy" for k in ForestArrays.FIELDS)]))
    loaded = load_model(path)
    assert isinstance(loaded, RegionClassifier) and loaded.card == {"kind": kind}
    np.testing.assert_array_equal(predict_regions(loaded, X, names), scores)
    if kind == "rf":  # the arrays predict as scikit-learn's forest does
        np.testing.assert_allclose(scores, model.model_.predict_proba(X)[:, 1], rtol=0, atol=1e-12)
        with zipfile.ZipFile(path) as zf:
            parts = {n: zf.read(n) for n in zf.namelist()}
        left = np.load(io.BytesIO(parts["forest_left.npy"]))
        inner = np.flatnonzero(left >= 0)[0]
        left[inner] = inner  # a node that is its own child would never end
        buf = io.BytesIO()
        np.save(buf, left)
        parts["forest_left.npy"] = buf.getvalue()
        bad = tmp_path / "cycle.npz"
        with zipfile.ZipFile(bad, "w") as zf:
            for n, data in parts.items():
                zf.writestr(n, data)
        with pytest.raises(InputError, match=r"cycle\.npz.*inconsistent"):
            load_model(bad)
    with pytest.raises(InputError, match="do not match the model"):
        predict_regions(loaded, X[:, :2], names[:2])


def test_pair_cache_round_trip_and_patient_split(pairs, tmp_path):
    save_pair(tmp_path / "p.npz", pairs[0])
    back = load_pair(tmp_path / "p.npz")
    assert back.key == pairs[0].key and back.spacing == pairs[0].spacing and back.digest() == pairs[0].digest()
    more = pairs + [replace(p, key=p.key + "b") for p in pairs]  # two follow-ups per patient
    train, held = split_patients(more, 0.3, seed=0)
    assert {p.patient for p in train}.isdisjoint({p.patient for p in held}) and train and held


def test_train_command_on_the_fundus_sample_writes_model_card_and_curves(tmp_path, capsys):
    """End to end on real 2D studies: tiny Siamese run; card, curves and ROC/PR beside the model."""
    model = tmp_path / "fundus.npz"
    status = cli.main(["train", str(SAMPLES / "fundus"), "-o", str(model), "--epochs", "1", "--steps", "2",
                       "--seed", "1"])
    assert status == 0 and "siamese model trained" in capsys.readouterr().out
    card = json.loads((tmp_path / "fundus.card.json").read_text())
    assert card["kind"] == "siamese" and card["seed"] == 1 and card["epochs_run"] == 1
    assert card["requires"]["pipeline"] == "generic-2d" and card["requires"]["rgb"] is True
    assert card["training_data"]["pairs"] == 4 and len(card["training_data"]["sha256"]) == 64
    assert "F001" not in json.dumps(card)  # pairs are named by voxel hashes, not patient ids
    for key in ("lesion_f1", "roc_auc", "average_precision", "patch_f1"):
        assert key in card["metrics"]
    rows = (tmp_path / "fundus.curves.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,split,loss,accuracy,precision,recall,f1,lesion_f1") and len(rows) == 3
    for suffix in (".card.md", ".curves.png", ".roc-pr.png", ".roc.csv", ".pr.csv"):
        assert (tmp_path / f"fundus{suffix}").stat().st_size > 0
    assert isinstance(load_model(model, load_pipeline("generic-2d")), SiameseModel)
    with pytest.raises(InputError, match="does not match the pipeline"):
        load_model(model, load_pipeline("brain-mri"))
    # prepared pairs are cached for the next run
    assert len(list((tmp_path / "fundus.cache").glob("*.npz"))) == 4


def test_train_refuses_a_validation_split(tmp_path):
    folder = tmp_path / "validation" / "visible"
    folder.mkdir(parents=True)
    assert cli.main(["train", str(folder), "-o", str(tmp_path / "m.npz")]) == cli.EXIT_BAD_INPUT


def test_more_changed_regions_than_fitted_rows_still_fit_both_classes():
    """The dev cohort has ~10,000 changed regions, more than the SVM's 6,000 fitted rows: the fit keeps at most
    half of them, so unchanged regions are learned too (it used to keep none and fail with one class)."""
    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(2, 1, (60, 3)), rng.normal(0, 1, (100, 3))]
    y = np.r_[np.ones(60, bool), np.zeros(100, bool)]
    model = RegionClassifier(RegionalSettings(kind="svm", max_rows=40)).fit(X, y, ("a", "b", "c"))
    assert len(model.fit_y_) == 40 and model.fit_y_.sum() == 20
    p = predict_regions(model, X, ("a", "b", "c"))
    assert p[y].mean() > p[~y].mean()


def test_siamese_findings_are_the_pieces_its_probability_marks_not_the_intensity_gates():
    """With a Siamese model, findings are the connected voxels at or above its operating probability (touching a
    scored region), whatever the pooled intensity change says; without evidence, the intensity gate decides."""
    from longitudinal.findings import outline

    shape = (20, 30, 30)
    groups = np.zeros(shape, bool)
    groups[5:15, 5:25, 5:25] = True
    inside = np.ones(shape, bool)
    region_of_voxel = np.where(groups, 0, -1)
    scores = np.array([6.0])
    flat = np.zeros(shape, np.float32)  # no measurable intensity change anywhere
    image = np.full(shape, 100.0, np.float32)
    evidence = np.zeros(shape, np.float32)
    evidence[8:11, 8:11, 8:11] = 0.97  # a subtle lesion the model is sure of
    evidence[12:14, 18:20, 18:20] = 0.85  # below its operating level
    evidence[0:2, 0:2, 0:2] = 0.99  # outside every scored region
    common = (groups, flat, flat, inside, region_of_voxel, scores, image, image, (1.0, 1.0, 1.0), 4.0)
    found = outline(*common, evidence=evidence, evidence_min=0.9)
    assert len(found) == 1 and found[0].volume_mm3 == 27 and found[0].score == 6.0
    assert {tuple(v) for v in found[0].voxels} == {(z, y, x) for z in range(8, 11) for y in range(8, 11)
                                                   for x in range(8, 11)}
    assert outline(*common) == []  # the intensity gate: nothing changed


def test_a_siamese_finding_is_the_extent_around_a_voxel_at_its_operating_level():
    """A small lesion the model is sure of has only a few voxels at its operating level: the finding is the
    connected tissue at or above `evidence_extent` around them, so it passes the volume floor and measures the
    lesion, not its core; a piece that never reaches the operating level stays out however large."""
    from longitudinal.findings import outline

    shape = (20, 30, 30)
    groups = np.ones(shape, bool)
    inside = np.ones(shape, bool)
    region_of_voxel = np.zeros(shape, np.int64)
    flat = np.zeros(shape, np.float32)
    image = np.full(shape, 100.0, np.float32)
    evidence = np.zeros(shape, np.float32)
    evidence[6:10, 6:10, 6:10] = 0.7  # the lesion (64 voxels) ...
    evidence[7:9, 7:8, 7:8] = 0.97  # ... with two voxels the model is sure of
    evidence[12:18, 15:25, 15:25] = 0.8  # a large piece below the operating level
    common = (groups, flat, flat, inside, region_of_voxel, np.array([6.0]), image, image, (1.0, 1.0, 1.0), 4.0)
    kwargs = dict(min_volume_mm3=10.0, evidence=evidence, evidence_min=0.9)
    found = outline(*common, **kwargs, evidence_extent=0.5)
    assert len(found) == 1 and found[0].volume_mm3 == 64
    assert {tuple(v) for v in found[0].voxels} == {(z, y, x) for z in range(6, 10) for y in range(6, 10)
                                                   for x in range(6, 10)}
    assert outline(*common, **kwargs, evidence_extent=0.9) == []  # the sure core alone: under the volume floor


def test_the_siamese_operating_level_is_the_lowest_that_kept_held_back_false_findings_within_the_setting():
    net = SiameseNet(_tiny()[0], pretrained=False)
    by = {"0.5": {"false_positive_findings_per_pair": 5.3}, "0.8": {"false_positive_findings_per_pair": 0.74},
          "0.9": {"false_positive_findings_per_pair": 0.16}, "0.95": {"false_positive_findings_per_pair": 0.0}}
    model = SiameseModel(net, (1.0, 1.0, 1.0), False, {"metrics": {"lesion_by_threshold": by}})
    assert model.operating_threshold(0.2) == 0.9 and model.operating_threshold(1.0) == 0.8
    assert model.operating_threshold(0.0) == 0.95
    assert SiameseModel(net, (1.0, 1.0, 1.0), False, {}).operating_threshold(0.2) == 0.5
