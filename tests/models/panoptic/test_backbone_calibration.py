"""Frozen batch norms calibrated from a batch (ResNets trained from scratch)."""

from __future__ import annotations

import keras
import numpy as np

from kerasnuc.models.panoptic.backbone import build_panoptic_encoder, calibrate_frozen_batch_norm


def test_calibration_stores_each_layers_batch_statistics(rng):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    c1 = keras.layers.Conv2D(4, 3, padding="same", name="c1")
    b1 = keras.layers.BatchNormalization(epsilon=1e-3, name="b1")
    c2 = keras.layers.Conv2D(5, 1, name="c2")
    b2 = keras.layers.BatchNormalization(epsilon=1e-3, name="b2")
    model = keras.Model(inputs, b2(c2(b1(c1(inputs)))))
    for bn in (b1, b2):
        bn.trainable = False
    b1.gamma.assign(np.full(4, 2.0, "float32"))  # kept: only the statistics change
    x = rng.uniform(size=(3, 8, 8, 3)).astype("float32")

    assert calibrate_frozen_batch_norm(model, x) == 2

    y1 = keras.ops.convert_to_numpy(c1(x)).astype(np.float64)
    mean1, var1 = y1.mean(axis=(0, 1, 2)), y1.var(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(b1.moving_mean), mean1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(b1.moving_variance), var1, rtol=1e-4)
    z1 = 2.0 * (y1 - mean1) / np.sqrt(var1 + 1e-3)  # b1 with the new statistics, gamma 2
    y2 = keras.ops.convert_to_numpy(c2(z1.astype("float32"))).astype(np.float64)
    np.testing.assert_allclose(np.asarray(b2.moving_mean), y2.mean(axis=(0, 1, 2)), atol=1e-4)
    np.testing.assert_allclose(np.asarray(b2.moving_variance), y2.var(axis=(0, 1, 2)), rtol=1e-3)
    # frozen again, with their momentum, gamma kept; the model now normalises this batch
    assert not b1.trainable and not b2.trainable
    assert b1.momentum == b2.momentum == 0.99
    np.testing.assert_allclose(np.asarray(b1.gamma), 2.0)
    out = keras.ops.convert_to_numpy(model(x, training=True))  # frozen: inference mode anyway
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1.0, rtol=1e-2)


def test_tiny_encoder_has_nothing_to_calibrate(rng):
    enc = build_panoptic_encoder("tiny", tiny_widths=(8, 8, 8, 8))
    x = rng.uniform(size=(1, 32, 32, 3)).astype("float32")
    before = [np.asarray(v).copy() for v in enc.weights]
    assert calibrate_frozen_batch_norm(enc, x) == 0
    for a, b in zip(before, enc.weights, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_registry_hook_calibrates_resnets_from_scratch_only(rng):
    """``kerasnuc train`` (Method.initialize): a ResNet without weights gets the statistics of
    the first training batches; the GroupNorm tiny encoder is left alone."""
    import dataclasses

    import tensorflow as tf

    from kerasnuc.config import RunConfig
    from kerasnuc.models.panoptic.model import PanopticModelConfig, build_panoptic
    from kerasnuc.registry import get_method

    x = rng.uniform(size=(2, 64, 64, 3)).astype("float32")
    data = tf.data.Dataset.from_tensors((x, {"boxes": np.zeros((2, 1, 4), "float32")})).repeat()
    narrow = dict(fpn_filters=8, box_fc_units=8, mask_conv_filters=8, mask_fc_filters=4,
                  mask_up_filters=4, rpn_pre_nms=50, rpn_post_nms=20, rpn_pre_nms_test=50,
                  rpn_post_nms_test=20, roi_batch=16, max_mask_rois=8,
                  max_detections=8)  # fmt: skip
    cfg = PanopticModelConfig(encoder="resnet50", **narrow)
    model = build_panoptic(cfg)
    run = RunConfig(method="panoptic", model=cfg.to_dict())
    get_method("panoptic").initialize(model, run, data)
    bn = model.encoder.get_layer("resnet50_features").get_layer("conv1_bn")
    assert np.abs(np.asarray(bn.moving_variance) - 1.0).max() > 1.0  # caffe-scale inputs
    assert not bn.trainable
    tiny = dataclasses.replace(cfg, encoder="tiny", tiny_widths=(8, 8, 8, 8))
    model = build_panoptic(tiny)
    before = [np.asarray(v).copy() for v in model.encoder.weights]
    get_method("panoptic").initialize(
        model, RunConfig(method="panoptic", model=tiny.to_dict()), data
    )
    for a, b in zip(before, model.encoder.weights, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
