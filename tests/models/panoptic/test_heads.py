"""Tests of the panoptic backbone/FPN, heads, GCN branch and feature fusion."""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest

from kerasnuc.models.panoptic.backbone import (
    CaffePreprocess,
    FeaturePyramid,
    build_panoptic_encoder,
)
from kerasnuc.models.panoptic.fusion import FeatureFusion, paste_masks
from kerasnuc.models.panoptic.gcn import BoundaryRefinement, GCNDecoder, GlobalConvBlock
from kerasnuc.models.panoptic.heads import BoxHead, DualModalMaskGenerator, PixelShuffle, RPNHead


def _roundtrip(layer):
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer)


def _conv(k1, k2, cin, cout):
    return k1 * k2 * cin * cout + cout


def _fit_once(layer, x, y):
    inputs = keras.Input(x.shape[1:])
    out = layer(inputs)
    model = keras.Model(inputs, out)
    model.compile(optimizer="sgd", loss="mse")
    before = [w.copy() for w in model.get_weights()]
    hist = model.fit(x, y, epochs=1, batch_size=len(x), verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights(), strict=True))


# ------------------------------------------------------------------------ mask generator


def test_mask_generator_paper_shape_and_weight_count():
    layer = DualModalMaskGenerator()
    out = layer(np.zeros((2, 14, 14, 256), "float32"))
    assert tuple(out.shape) == (2, 28, 28, 2)
    # Table 1: 3x conv(256), conv1 256, conv2 128, FC 14*14*128 -> 784, conv3 256, conv4 1024,
    # conv5 1x1 256 -> 2.
    expected = (
        3 * _conv(3, 3, 256, 256)
        + _conv(3, 3, 256, 256)
        + _conv(3, 3, 256, 128)
        + (14 * 14 * 128 * 784 + 784)
        + _conv(3, 3, 256, 256)
        + _conv(3, 3, 256, 1024)
        + _conv(1, 1, 256, 2)
    )
    assert layer.count_params() == expected == 25_276_050


def test_mask_generator_tiny_config_fit(rng):
    layer = DualModalMaskGenerator(conv_filters=8, fc_filters=4, up_filters=3, roi_size=6)
    x = rng.normal(size=(3, 6, 6, 5)).astype("float32")
    out = layer(x)
    assert tuple(out.shape) == (3, 12, 12, 2)
    expected = (
        _conv(3, 3, 5, 8)
        + 2 * _conv(3, 3, 8, 8)
        + 2 * _conv(3, 3, 8, 8)  # conv1, conv3
        + _conv(3, 3, 8, 4)
        + (6 * 6 * 4 * 144 + 144)
        + _conv(3, 3, 8, 12)
        + _conv(1, 1, 3, 2)
    )
    assert layer.count_params() == expected
    _roundtrip(layer)
    _fit_once(
        DualModalMaskGenerator(8, 4, 3, 6), x, rng.normal(size=(3, 12, 12, 2)).astype("float32")
    )


def test_mask_generator_fc_branch_is_duplicated():
    """With the up-mode conv5 zeroed, both output channels equal the FC output."""
    layer = DualModalMaskGenerator(conv_filters=4, fc_filters=2, up_filters=2, roi_size=4)
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 3)).astype("float32")
    layer(x)
    layer.conv5.set_weights([np.zeros((1, 1, 2, 2), "float32"), np.zeros(2, "float32")])
    out = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(out[..., 0], out[..., 1])
    assert np.abs(out).sum() > 0


def test_mask_generator_rejects_other_roi_size():
    with pytest.raises(ValueError, match="must be 14x14"):
        DualModalMaskGenerator()(np.zeros((1, 7, 7, 8), "float32"))


def test_pixel_shuffle_matches_pytorch_order():
    c, r = 2, 2
    x = np.arange(1 * 2 * 3 * c * r * r, dtype="float32").reshape(1, 2, 3, c * r * r)
    got = keras.ops.convert_to_numpy(PixelShuffle(r)(x))
    expected = np.zeros((1, 4, 6, c), "float32")
    for y in range(2):
        for xx in range(3):
            for ch in range(c):
                for i in range(r):
                    for j in range(r):
                        expected[0, y * r + i, xx * r + j, ch] = x[0, y, xx, ch * r * r + i * r + j]
    np.testing.assert_array_equal(got, expected)
    _roundtrip(PixelShuffle(3))


# ------------------------------------------------------------------------ RPN and box heads


def test_rpn_head_shapes_order_and_weights(rng):
    head = RPNHead(num_anchors=3, filters=8)
    levels = [rng.normal(size=(2, s, s, 4)).astype("float32") for s in (8, 4, 2)]
    logits, deltas = head(levels)
    k = 3 * (64 + 16 + 4)
    assert tuple(logits.shape) == (2, k) and tuple(deltas.shape) == (2, k, 4)
    assert head.count_params() == _conv(3, 3, 4, 8) + _conv(1, 1, 8, 3) + _conv(1, 1, 8, 12)
    # Row-major positions, anchor-minor: element (level 1, y=1, x=2, a=1) of the level map.
    obj = keras.ops.convert_to_numpy(head.objectness(head.conv(levels[1])))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(logits)[0, 3 * 64 + (1 * 4 + 2) * 3 + 1], obj[0, 1, 2, 1]
    )
    _roundtrip(head)


def test_box_head_shapes_and_weights(rng):
    head = BoxHead(num_classes=1, fc_units=16)
    cls, box = head(rng.normal(size=(5, 7, 7, 4)).astype("float32"))
    assert tuple(cls.shape) == (5, 2) and tuple(box.shape) == (5, 4)
    assert head.count_params() == (196 * 16 + 16) + (16 * 16 + 16) + (16 * 2 + 2) + (16 * 4 + 4)
    _roundtrip(head)


# ------------------------------------------------------------------------ backbone / FPN


def test_tiny_encoder_and_fpn_shapes(rng):
    enc = build_panoptic_encoder("tiny", tiny_widths=(4, 8, 8, 16))
    feats = enc(rng.uniform(size=(1, 64, 96, 3)).astype("float32"))
    assert [tuple(feats[f"P{i}"].shape[1:3]) for i in range(1, 6)] == [
        (32, 48),
        (16, 24),
        (8, 12),
        (4, 6),
        (2, 3),
    ]
    fpn = FeaturePyramid(8)
    out = fpn(feats)
    assert [tuple(out[f"fpn{i}"].shape) for i in range(2, 7)] == [
        (1, 16, 24, 8),
        (1, 8, 12, 8),
        (1, 4, 6, 8),
        (1, 2, 3, 8),
        (1, 1, 2, 8),
    ]
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(out["fpn6"]),
        keras.ops.convert_to_numpy(out["fpn5"])[:, ::2, ::2],
    )
    widths = (4, 8, 8, 16)
    assert fpn.count_params() == sum(_conv(1, 1, c, 8) + _conv(3, 3, 8, 8) for c in widths)
    _roundtrip(fpn)


def test_resnet_encoder_batch_norm_frozen():
    enc = build_panoptic_encoder("resnet50")
    bns = [
        layer
        for layer in enc._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert bns and not any(layer.trainable for layer in bns)
    x = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype("float32")
    means = [keras.ops.convert_to_numpy(b.moving_mean) for b in bns[:3]]
    feats = enc(x, training=True)
    assert tuple(feats["P5"].shape) == (2, 2, 2, 2048)
    for b, m in zip(bns[:3], means, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(b.moving_mean), m)


def test_caffe_preprocess():
    x = np.array([[[[0.0, 0.5, 1.0]]]], "float32")
    got = keras.ops.convert_to_numpy(CaffePreprocess()(x))
    np.testing.assert_allclose(got[0, 0, 0], [255 - 103.939, 127.5 - 116.779, -123.68], rtol=1e-5)


def test_unknown_encoder():
    with pytest.raises(ValueError, match="`name` must be one of"):
        build_panoptic_encoder("vgg")


# ------------------------------------------------------------------------ GCN branch


def test_gcn_block_matches_definition(rng):
    block = GlobalConvBlock(2, 5)
    x = rng.normal(size=(1, 7, 7, 3)).astype("float32")
    got = keras.ops.convert_to_numpy(block(x))
    assert block.count_params() == 2 * (_conv(5, 1, 3, 2) + _conv(1, 5, 2, 2))

    def conv(z, kernel, bias):  # 'same' correlation, NumPy
        kh, kw = kernel.shape[:2]
        p = np.pad(z, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
        out = np.zeros((*z.shape[:3], kernel.shape[-1]))
        for i in range(z.shape[1]):
            for j in range(z.shape[2]):
                out[:, i, j] = np.einsum("bhwc,hwco->bo", p[:, i : i + kh, j : j + kw], kernel)
        return out + bias

    l1, l2, r1, r2 = (block.left1, block.left2, block.right1, block.right2)
    expected = conv(conv(x, *l1.get_weights()), *l2.get_weights()) + conv(
        conv(x, *r1.get_weights()), *r2.get_weights()
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    _roundtrip(block)


def test_boundary_refinement_is_residual(rng):
    br = BoundaryRefinement()
    x = rng.normal(size=(1, 5, 5, 2)).astype("float32")
    br(x)
    br.conv2.set_weights([np.zeros((3, 3, 2, 2), "float32"), np.zeros(2, "float32")])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(br(x)), x)


def test_gcn_decoder_shape_weights_fit(rng):
    enc = build_panoptic_encoder("tiny", tiny_widths=(4, 4, 8, 8))
    inputs = keras.Input((None, None, 3))
    dec = GCNDecoder(num_classes=2, kernel_size=5)
    model = keras.Model(inputs, dec(enc(inputs)))
    x = rng.uniform(size=(2, 64, 64, 3)).astype("float32")
    assert tuple(model(x).shape) == (2, 64, 64, 2)
    gcn = sum(2 * (_conv(5, 1, c, 2) + _conv(1, 5, 2, 2)) for c in (4, 4, 8, 8))
    br = 2 * _conv(3, 3, 2, 2)
    deconv = _conv(4, 4, 2, 2)
    assert dec.count_params() == gcn + 4 * br + 3 * (deconv + br) + 2 * (deconv + br)
    _roundtrip(dec)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    y = (rng.uniform(size=(2, 64, 64)) > 0.5).astype("int32")
    assert np.isfinite(model.fit(x, y, verbose=0).history["loss"][0])


# ------------------------------------------------------------------------ fusion


def _paste_reference(base, masks, boxes, scores, valid):
    """Sequential overwrite with cv2.resize (integer boxes), lowest score first."""
    out = base.copy()
    for b in range(base.shape[0]):
        for i in sorted(np.flatnonzero(valid[b]), key=lambda k: (scores[b, k], k)):
            y1, x1, y2, x2 = boxes[b, i].astype(int)
            resized = cv2.resize(masks[b, i], (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
            out[b, y1:y2, x1:x2] = resized.reshape(y2 - y1, x2 - x1, -1)
    return out


def test_paste_masks_matches_sequential_reference(rng):
    b, h, w, n, m, c = 2, 20, 24, 5, 6, 2
    base = rng.normal(size=(b, h, w, c)).astype("float32")
    masks = rng.normal(size=(b, n, m, m, c)).astype("float32")
    y1 = rng.integers(0, h - 6, size=(b, n))
    x1 = rng.integers(0, w - 6, size=(b, n))
    boxes = np.stack(
        [y1, x1, y1 + rng.integers(3, 7, size=(b, n)), x1 + rng.integers(3, 9, size=(b, n))], -1
    ).astype("float32")
    scores = rng.uniform(size=(b, n)).astype("float32")
    scores[0, 3] = scores[0, 1]  # a tie: index order decides
    valid = np.ones((b, n), bool)
    valid[1, 2] = False
    got = keras.ops.convert_to_numpy(paste_masks(base, masks, boxes, scores, valid))
    expected = _paste_reference(base, masks, boxes, scores, valid)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_paste_masks_gradient_reaches_masks_and_base(rng):
    import tensorflow as tf

    base = tf.Variable(rng.normal(size=(1, 8, 8, 2)).astype("float32"))
    masks = tf.Variable(rng.normal(size=(1, 1, 4, 4, 2)).astype("float32"))
    boxes = np.array([[[0, 0, 4, 4]]], "float32")
    with tf.GradientTape() as tape:
        out = paste_masks(base, masks, boxes, np.ones((1, 1), "float32"), np.ones((1, 1), bool))
        loss = tf.reduce_sum(out)
    g_base, g_masks = tape.gradient(loss, [base, masks])
    g_base = g_base.numpy()
    assert np.all(g_base[0, :4, :4] == 0) and np.all(g_base[0, 4:] == 1)
    np.testing.assert_allclose(g_masks.numpy(), 1.0)  # 4x4 box: identity resize


def test_feature_fusion_layer(rng):
    layer = FeatureFusion(2, 4)
    p2 = rng.normal(size=(1, 4, 5, 3)).astype("float32")
    f0 = keras.ops.convert_to_numpy(layer(p2))
    assert f0.shape == (1, 16, 20, 2)
    k, bias = layer.conv.get_weights()
    np.testing.assert_allclose(f0[0, 5, 9], p2[0, 1, 2] @ k[0, 0] + bias, rtol=1e-5)
    assert layer.count_params() == _conv(1, 1, 3, 2)
    masks = rng.normal(size=(1, 1, 28, 28, 2)).astype("float32")
    fused = keras.ops.convert_to_numpy(
        layer(p2, masks, np.array([[[2, 3, 9, 12]]], "float32"), np.ones((1, 1)), np.ones((1, 1)))
    )
    np.testing.assert_allclose(fused[0, :2], f0[0, :2])
    assert not np.allclose(fused[0, 2:9, 3:12], f0[0, 2:9, 3:12])
    _roundtrip(layer)
