"""Features of every backbone family on small real inputs, stored so a refactor of encoding.py can prove it
changed nothing: `tests/data/encoder_reference.npz` was written by the code before the Backbone refactor
(commit 13c9c93) with `python tests/encoder_reference.py`; test_encoding compares today's features to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

REFERENCE = Path(__file__).parent / "data" / "encoder_reference.npz"


def inputs() -> dict[str, np.ndarray]:
    """A real T1 slab (nilearn's MNI152) and a real photograph (scikit-image), small."""
    import nibabel as nib
    import nilearn
    from skimage import data

    from longitudinal.encoding import intensity_window, scale_to_unit

    path = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    vol = np.asarray(nib.load(path).dataobj, dtype=np.float32).transpose(2, 1, 0)
    slab = scale_to_unit(vol[90:98, 88:112, 64:92], intensity_window(vol, vol > 0))  # 8 x 24 x 28
    cat = data.chelsea()[::8, ::8].astype(np.float32) / 255.0  # 38 x 57 x 3
    return {"slab": slab, "cat": cat}


def medicalnet_weights(path: Path) -> Path:
    """A seeded MedicalNet-layout ResNet-10 state dict (no MedicalNet file ships in a package)."""
    from monai.networks.nets import resnet10

    torch.manual_seed(0)
    net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B",
                   bias_downsample=False, conv1_t_stride=2)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


def features(weights_dir: Path) -> dict[str, np.ndarray]:
    from longitudinal.encoding import Encoder, EncoderSettings

    x = inputs()
    slab, cat = x["slab"], x["cat"]
    mednet = str(medicalnet_weights(weights_dir / "resnet10.pth"))
    cases = {
        "lite0_2d": (EncoderSettings(), slab, False),
        "lite0_stages035": (EncoderSettings(stages=(0, 3, 5)), slab, False),
        "lite0_25d_concat": (EncoderSettings(stages=(1, 2), mode="2.5d", combine="concat"), slab, False),
        "lite0_zoom2_g2": (EncoderSettings(stages=(1, 2), zoom=2, grid_stride=2), slab[:4], False),
        "lite0_rgb": (EncoderSettings(), cat, True),
        "lite0_gray2d": (EncoderSettings(), cat.mean(-1), False),
        "lite2_2d": (EncoderSettings(name="efficientnet-lite2"), slab, False),
        "random_2d": (EncoderSettings(name="random", seed=3), slab, False),
        "medicalnet10_3d": (EncoderSettings(name="medicalnet-resnet10", mode="3d", weights=mednet, patch=32), slab, False),
    }
    return {k: Encoder(s).features(v, rgb=rgb) for k, (s, v, rgb) in cases.items()}


if __name__ == "__main__":
    import hashlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = features(Path(tmp))
    REFERENCE.parent.mkdir(exist_ok=True)
    np.savez_compressed(REFERENCE, **out)
    for k, v in out.items():
        print(k, v.shape, hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()[:16])
