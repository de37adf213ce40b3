"""Tests of the conic model: shapes, saving, configuration and training with its losses."""

import json

import keras
import numpy as np
import pytest

from kerasnuc.backbones.efficientnet import build_efficientnet_encoder
from kerasnuc.layers.dropout import MCDropout, set_mc_dropout
from kerasnuc.losses.conic import conic_losses
from kerasnuc.models.conic import (
    OUTPUT_NAMES,
    ConicModel,
    ConicModelConfig,
    build_conic,
    build_conic_from_config,
)

TINY = (16, 8, 8, 8, 8)


@pytest.fixture(scope="module")
def b0_model():
    return build_conic("efficientnet_b0", num_classes=4, decoder_filters=TINY)


def _check_outputs(outputs, batch, size, num_classes):
    assert sorted(outputs) == sorted(OUTPUT_NAMES)
    assert outputs["semantic"].shape == (batch, size, size, num_classes + 1)
    assert outputs["three_label"].shape == (batch, size, size, 3)
    assert outputs["vectors"].shape == (batch, size, size, 2)
    for name in ("semantic", "three_label"):
        np.testing.assert_allclose(outputs[name].sum(-1), 1.0, rtol=1e-5)
        assert outputs[name].min() >= 0
    assert np.all(np.isfinite(outputs["vectors"]))


def _targets(rng, batch, size, num_classes):
    three_label = rng.integers(0, 3, (batch, size, size))
    vectors = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    vectors[..., 2] = three_label > 0
    return {
        "semantic": rng.integers(0, num_classes + 1, (batch, size, size)),
        "three_label": three_label,
        "vectors": vectors,
    }


def _prior_after(steps_labels, num_channels, momentum=0.99):
    """The EMA of the class frequency written out step by step from a uniform start."""
    prior = np.full(num_channels, 1.0 / num_channels)
    for labels in steps_labels:
        frequency = np.array([np.mean(labels == c) for c in range(num_channels)])
        prior = momentum * prior + (1 - momentum) * frequency
    return prior


@pytest.mark.parametrize("encoder", ["efficientnet_b0", "efficientnet_b1", "efficientnet_lite0"])
def test_shape_matrix(encoder, rng):
    model = build_conic(encoder, num_classes=3, decoder_filters=TINY, input_shape=(64, 64, 3))
    images = rng.random((2, 64, 64, 3), dtype=np.float32)
    _check_outputs(model.predict(images, verbose=0), 2, 64, 3)


@pytest.mark.parametrize("size", [64, 96])
def test_unknown_height_width(b0_model, size, rng):
    images = rng.random((1, size, size, 3), dtype=np.float32)
    _check_outputs(b0_model.predict(images, verbose=0), 1, size, 4)


def test_parameter_count(b0_model):
    """Encoder + two decoders + heads + class prior + 10 MC switches, counted by hand."""
    encoder = build_efficientnet_encoder("efficientnet_b0")
    skips = (672, 240, 144, 96, 0)  # B0 widths of P4..P1, none at full resolution
    decoder = 0
    channels = 1280  # P5
    for filters, skip in zip(TINY, skips, strict=True):
        in_channels = channels + skip
        decoder += 9 * in_channels * filters + 4 * filters  # conv (no bias) + batch norm
        decoder += 9 * filters * filters + 4 * filters
        channels = filters
    heads = (8 + 1) * 5 + (8 + 1) * 3 + (8 + 1) * 2
    expected = encoder.count_params() + 2 * decoder + heads + 5 + 10
    assert b0_model.count_params() == expected


def test_lite0_parameter_count():
    """Lite0 'blocks' encoder: the decoder sees 320 channels at P5 and 112/40/24/16 skips."""
    from kerasnuc.backbones.efficientnet_lite import build_efficientnet_lite_encoder

    model = build_conic(
        "efficientnet_lite0", num_classes=4, decoder_filters=TINY, encoder_features="blocks"
    )
    encoder = build_efficientnet_lite_encoder(features="blocks")
    skips, channels, decoder = (112, 40, 24, 16, 0), 320, 0
    for filters, skip in zip(TINY, skips, strict=True):
        decoder += 9 * (channels + skip) * filters + 4 * filters
        decoder += 9 * filters * filters + 4 * filters
        channels = filters
    heads = (8 + 1) * 5 + (8 + 1) * 3 + (8 + 1) * 2
    assert model.count_params() == encoder.count_params() + 2 * decoder + heads + 5 + 10


def _bilinear_up2(x):
    """2x bilinear upsampling with half-pixel centres along axes 1 and 2, by its definition:
    output pixel ``2i`` samples the input at ``i - 1/4`` and ``2i + 1`` at ``i + 1/4``, edges
    clamped."""
    for axis in (1, 2):
        prev = np.concatenate([np.take(x, [0], axis), np.delete(x, -1, axis)], axis)
        nxt = np.concatenate([np.delete(x, 0, axis), np.take(x, [-1], axis)], axis)
        even, odd = 0.25 * prev + 0.75 * x, 0.75 * x + 0.25 * nxt
        shape = list(x.shape)
        shape[axis] *= 2
        x = np.stack([even, odd], axis + 1).reshape(shape)
    return x


def test_four_level_decoder_ends_at_stride_2_and_resizes_the_logits(rng):
    """Four decoder levels: two conv blocks of width 8 per decoder fewer than five levels, the
    heads see 8 channels as before; the outputs are the heads' stride-2 logits resized
    bilinearly to the input size, then softmax."""
    kwargs = {"num_classes": 3, "encoder_features": "blocks"}
    five = build_conic("efficientnet_lite0", decoder_filters=TINY, **kwargs)
    four = build_conic("efficientnet_lite0", decoder_filters=TINY[:4], **kwargs)
    level5 = 9 * 8 * 8 + 2 * 8 + 9 * 8 * 8 + 2 * 8  # trainable: 2 convs, BN gamma / beta
    trainable = lambda m: sum(int(np.prod(w.shape)) for w in m.trainable_weights)  # noqa: E731
    assert trainable(five) - trainable(four) == 2 * level5

    images = rng.random((2, 96, 64, 3), dtype=np.float32)
    out = four.predict(images, verbose=0)
    _check_outputs({k: v[:, :64] for k, v in out.items()}, 2, 64, 3)  # of (2, 96, 64, K)
    assert out["semantic"].shape == (2, 96, 64, 4)
    logits = keras.Model(
        four.input,
        [four.get_layer(n).output for n in ("semantic_logits", "three_label_logits")]
        + [four.get_layer("vectors_linear").output],
    ).predict(images, verbose=0)
    assert logits[0].shape == (2, 48, 32, 4)
    for name, value in zip(("semantic", "three_label"), logits[:2], strict=True):
        up = _bilinear_up2(value.astype(np.float64))
        expected = np.exp(up - up.max(-1, keepdims=True))
        expected /= expected.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[name], expected, atol=1e-5)
    np.testing.assert_allclose(out["vectors"], _bilinear_up2(logits[2]), atol=1e-5)


def test_mc_dropout_layers(b0_model, rng):
    drops = [x for x in b0_model.layers if isinstance(x, MCDropout)]
    assert len(drops) == 10
    assert all(x.rate == 0.2 for x in drops)
    images = rng.random((1, 64, 64, 3), dtype=np.float32)
    a = b0_model.predict(images, verbose=0)["semantic"]
    assert set_mc_dropout(b0_model, True) == 10
    try:
        b = b0_model.predict(images, verbose=0)["semantic"]
    finally:
        set_mc_dropout(b0_model, False)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(b0_model.predict(images, verbose=0)["semantic"], a)


def test_keras_round_trip(b0_model, tmp_path, rng):
    b0_model.class_frequency.assign(np.array([0.6, 0.1, 0.1, 0.1, 0.1], dtype=np.float32))
    path = tmp_path / "conic.keras"
    b0_model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, ConicModel)
    np.testing.assert_allclose(loaded.class_frequency.numpy(), [0.6, 0.1, 0.1, 0.1, 0.1])
    for batch, size in ((2, 64), (1, 96)):
        images = rng.random((batch, size, size, 3), dtype=np.float32)
        expected = b0_model.predict(images, verbose=0)
        got = loaded.predict(images, verbose=0)
        for name in OUTPUT_NAMES:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
    b0_model.class_frequency.assign(np.full(5, 0.2, dtype=np.float32))


def test_fit_step_with_conic_losses(rng):
    model = build_conic("efficientnet_b0", num_classes=2, decoder_filters=TINY)
    # Eager steps: tracing the EfficientNet training graph takes about a minute on a loaded
    # CPU (see test_compiled_fit_step); the compiled path is tested on a small model below.
    model.compile(optimizer="adam", loss=conic_losses(2), run_eagerly=True)
    images = rng.random((2, 64, 64, 3), dtype=np.float32)
    targets = _targets(rng, 2, 64, 2)
    history = model.fit(images, targets, batch_size=2, epochs=1, verbose=0)
    for key in ("loss", "semantic_loss", "three_label_loss", "vectors_loss"):
        assert np.isfinite(history.history[key][0])
    expected = _prior_after([targets["semantic"]], 3)
    np.testing.assert_allclose(model.class_frequency.numpy(), expected, rtol=1e-5)


def _small_conic_model():
    """A ConicModel with the conic outputs on a single convolution."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    outputs = {
        "semantic": keras.layers.Activation("softmax", name="semantic")(
            keras.layers.Conv2D(3, 1)(x)
        ),
        "three_label": keras.layers.Activation("softmax", name="three_label")(
            keras.layers.Conv2D(3, 1)(x)
        ),
        "vectors": keras.layers.Conv2D(2, 1, name="vectors")(x),
    }
    return ConicModel(inputs, outputs)


def test_prior_updated_in_compiled_train_step_only(rng):
    model = _small_conic_model()
    np.testing.assert_allclose(model.class_frequency.numpy(), [1 / 3] * 3)
    model.compile(optimizer="sgd", loss=conic_losses(2))  # graph mode (tf.function / jit)
    images = rng.random((4, 16, 16, 3), dtype=np.float32)
    targets = _targets(rng, 4, 16, 2)
    val_images = rng.random((2, 16, 16, 3), dtype=np.float32)
    val_targets = _targets(rng, 2, 16, 2)
    val_targets["semantic"][:] = 0

    # Two train steps of 2 images; the validation pass (all background) must not count.
    model.fit(
        images,
        targets,
        batch_size=2,
        epochs=1,
        shuffle=False,
        verbose=0,
        validation_data=(val_images, val_targets),
    )
    steps = [targets["semantic"][:2], targets["semantic"][2:]]
    expected = _prior_after(steps, 3)
    np.testing.assert_allclose(model.class_frequency.numpy(), expected, rtol=1e-5)

    model.evaluate(val_images, val_targets, verbose=0)
    np.testing.assert_allclose(model.class_frequency.numpy(), expected, rtol=1e-5)

    model.fit(images[:2], {k: v[:2] for k, v in targets.items()}, epochs=1, verbose=0)
    expected = _prior_after([*steps, targets["semantic"][:2]], 3)
    np.testing.assert_allclose(model.class_frequency.numpy(), expected, rtol=1e-5)


@pytest.mark.slow
def test_compiled_fit_step(rng):
    model = build_conic("efficientnet_b0", num_classes=2, decoder_filters=TINY)
    model.compile(optimizer="adam", loss=conic_losses(2), jit_compile=False)
    images = rng.random((2, 64, 64, 3), dtype=np.float32)
    targets = _targets(rng, 2, 64, 2)
    # Build the loss trackers and the optimizer first (as train_run does): left to the first
    # trace of the train step they make tf.function trace it a second time (~25 s for B0).
    # training=False: the class prior is not updated by this call.
    model.compute_loss(images, targets, model(images), training=False)
    model.optimizer.build(model.trainable_variables)
    np.testing.assert_allclose(model.class_frequency.numpy(), [1 / 3] * 3)
    history = model.fit(images, targets, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    expected = _prior_after([targets["semantic"]], 3)
    np.testing.assert_allclose(model.class_frequency.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_shape": (100, 64, 3)}, "positive multiples of 32"),
        ({"input_shape": (64, 64, 4)}, r"must be \(height, width, 3\)"),
        ({"encoder": "resnet50"}, "`encoder` must be one of"),
        ({"num_classes": 0}, "`num_classes` must be a positive int"),
        ({"decoder_filters": (16, 8, 8)}, "`decoder_filters` must be a list of 5"),
        ({"decoder_filters": (16, 8, 8, 8, 8, 8)}, "`decoder_filters` must be a list of 5"),
        ({"dropout": 1.0}, "`dropout` must be a float in"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_conic(**kwargs)
    with pytest.raises(ValueError, match=match):
        ConicModelConfig(**kwargs)


def test_config_round_trip():
    config = ConicModelConfig(num_classes=4, decoder_filters=[16, 8, 8, 8, 8], dropout=0.1)
    assert config.decoder_filters == TINY
    data = json.loads(json.dumps(config.to_dict()))
    assert data == {
        "encoder": "efficientnet_b0",
        "num_classes": 4,
        "decoder_filters": [16, 8, 8, 8, 8],
        "dropout": 0.1,
        "encoder_weights": None,
        "input_shape": [None, None, 3],
        "encoder_features": "expand",
    }
    assert ConicModelConfig.from_dict(data) == config
    assert ConicModelConfig.from_dict({}) == ConicModelConfig()
    with pytest.raises(ValueError, match="Unknown ConicModelConfig keys"):
        ConicModelConfig.from_dict({"encoder": "efficientnet_b0", "width": 3})


def test_defaults():
    config = ConicModelConfig()
    assert config.encoder == "efficientnet_b0"
    assert config.num_classes == 6
    assert config.decoder_filters == (256, 128, 64, 32, 16)
    assert config.dropout == 0.2
    assert config.input_shape == (None, None, 3)


def test_build_from_config(b0_model):
    config = ConicModelConfig(num_classes=4, decoder_filters=TINY)
    model = build_conic_from_config(config)
    assert isinstance(model, ConicModel)
    assert model.count_params() == b0_model.count_params()
    assert [x.name for x in model.layers] == [x.name for x in b0_model.layers]
