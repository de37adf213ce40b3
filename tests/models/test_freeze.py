"""Tests for kerasnuc.models.freeze.EncoderFreezeSchedule on a small two-part model.

A nested ``encoder`` (conv -> BN -> conv -> BN) and a decoder (conv -> BN -> conv) are trained
for 3 epochs with AdaBound; the weights are recorded before training and after every epoch.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasnuc.models.freeze import EncoderFreezeSchedule, batchnorm_layers, train_only
from kerasnuc.optimizers.adabound import AdaBound


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="e_conv1")(inputs)
    x = keras.layers.BatchNormalization(name="e_bn1")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", name="e_conv2")(x)
    x = keras.layers.BatchNormalization(name="e_bn2")(x)
    encoder = keras.Model(inputs, x, name="encoder")
    image = keras.Input((None, None, 3))
    y = encoder(image)
    y = keras.layers.Conv2D(4, 3, padding="same", name="d_conv")(y)
    y = keras.layers.BatchNormalization(name="d_bn")(y)
    y = keras.layers.Conv2D(2, 1, activation="softmax", name="out")(y)
    return keras.Model(image, y)


class Record(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.snapshots = []

    def on_train_begin(self, logs=None):
        self.snapshots.append({v.path: v.numpy().copy() for v in self.model.variables})

    def on_epoch_end(self, epoch, logs=None):
        self.snapshots.append({v.path: v.numpy().copy() for v in self.model.variables})


def _fit(freeze_batchnorm, frozen_epochs=1, epochs=3, initial_epoch=0, model=None):
    rng = np.random.default_rng(0)
    x = rng.random((8, 16, 16, 3)).astype(np.float32) * 2.0 + 0.5
    y = rng.integers(0, 2, (8, 16, 16)).astype(np.int32)
    model = model or _model()
    model.compile(optimizer=AdaBound(learning_rate=1e-2), loss="sparse_categorical_crossentropy")
    record = Record()
    schedule = EncoderFreezeSchedule(frozen_epochs, freeze_batchnorm)
    model.fit(
        x, y, batch_size=4, epochs=epochs, initial_epoch=initial_epoch, verbose=0,
        callbacks=[schedule, record], shuffle=False,
    )  # fmt: skip
    return model, record.snapshots


def _changed(a, b, prefix):
    return {k for k in a if k.startswith(prefix) and not np.array_equal(a[k], b[k])}


def _keys(snapshot, prefix):
    return {k for k in snapshot if k.startswith(prefix)}


@pytest.mark.parametrize("freeze_batchnorm", [True, False])
def test_frozen_then_unfrozen(freeze_batchnorm):
    model, snaps = _fit(freeze_batchnorm)
    start, ep1, ep2, ep3 = snaps
    enc_conv = _keys(start, "e_conv")
    enc_bn = _keys(start, "e_bn")
    assert len(enc_conv) == 4 and len(enc_bn) == 8  # kernel+bias x2; gamma, beta, mean, var x2
    # Phase 1 (epoch 1): the whole encoder, BN statistics included, is untouched.
    assert _changed(start, ep1, "e_") == set()
    assert _changed(start, ep1, "d_conv") and _changed(start, ep1, "d_bn")
    # Phase 2 (epochs 2, 3): the encoder convolutions learn ...
    assert _changed(ep1, ep2, "e_conv") == enc_conv
    assert _changed(ep2, ep3, "e_conv") == enc_conv
    # ... its batch norms stay frozen (statistics and scale/offset) or learn too.
    if freeze_batchnorm:
        assert _changed(start, ep3, "e_bn") == set()
    else:
        assert _changed(ep1, ep2, "e_bn") == enc_bn
    assert _changed(ep2, ep3, "d_bn")
    # The optimizer was built once on every variable of both phases (2 slots each).
    trainable = [v for v in model.variables if v.trainable]
    assert len(trainable) == 4 + 4 + 2 + 2 + 2
    slots = [v for v in model.optimizer.variables if "momentum" in v.path]
    assert len(slots) == len(trainable)
    # After training the encoder is fully trainable again.
    assert all(layer.trainable for layer in batchnorm_layers(model.get_layer("encoder")))


def test_resume_in_second_phase_applies_it():
    """fit(initial_epoch=1): the schedule starts in phase 2 (as after --resume)."""
    _, snaps = _fit(True, frozen_epochs=1, epochs=2, initial_epoch=1)
    start, ep2 = snaps
    assert _changed(start, ep2, "e_conv") == _keys(start, "e_conv")
    assert _changed(start, ep2, "e_bn") == set()


def test_no_frozen_epochs_and_checks():
    _, snaps = _fit(True, frozen_epochs=0, epochs=1)
    assert _changed(snaps[0], snaps[1], "e_conv")
    with pytest.raises(ValueError, match="`frozen_epochs` must be an int >= 0"):
        EncoderFreezeSchedule(-1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="no layer named 'encoder'"):
        model.fit(
            np.zeros((2, 4)), np.zeros((2, 1)), verbose=0, callbacks=[EncoderFreezeSchedule(1)]
        )


def test_train_only_freezes_every_other_layer_exactly():
    """train_only(["d_*"]): the decoder conv and its batch norm learn; the nested encoder (convs,
    BN scale/offset and moving statistics) and the head ``out`` keep their values exactly."""
    model = _model()
    assert train_only(model, ["d_*"]) == ["d_conv", "d_bn"]
    assert not any(layer.trainable for layer in model.get_layer("encoder")._flatten_layers())
    # d_conv kernel + bias, d_bn gamma + beta.
    assert len(model.trainable_variables) == 4
    rng = np.random.default_rng(0)
    x = rng.random((8, 16, 16, 3)).astype(np.float32) * 2.0 + 0.5
    y = rng.integers(0, 2, (8, 16, 16)).astype(np.int32)
    model.compile(optimizer=AdaBound(learning_rate=1e-2), loss="sparse_categorical_crossentropy")
    record = Record()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[record], shuffle=False)
    start, end = record.snapshots
    assert _changed(start, end, "e_") == set()
    assert _changed(start, end, "out") == set()
    # Every d_bn variable moves: gamma, beta (gradient) and the moving statistics (training).
    assert _changed(start, end, "d_conv") == _keys(start, "d_conv")
    assert _changed(start, end, "d_bn") == _keys(start, "d_bn")


def test_train_only_patterns_must_match_a_layer_with_weights():
    model = _model()
    # "d_*" matches, "o" matches nothing; the Input layer has no weights.
    with pytest.raises(ValueError, match=r"pattern 'o' matches no layer with weights .*"
                       r"are encoder, d_conv, d_bn, out$"):  # fmt: skip
        train_only(model, ["d_*", "o"])
    # Several patterns: the union; the nested encoder is one layer.
    assert train_only(model, ["out", "enc*"]) == ["encoder", "out"]
    assert all(layer.trainable for layer in model.get_layer("encoder")._flatten_layers())
    assert not model.get_layer("d_bn").trainable
