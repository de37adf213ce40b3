"""ROI Align against a NumPy loop reference (torchvision/Detectron2 ``aligned`` convention)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from kerasnuc.models.panoptic.roi_align import MultiLevelROIAlign, assign_levels, roi_align


def _bilinear(fmap, y, x):
    """torchvision ``bilinear_interpolate`` on one (H, W, C) map."""
    h, w = fmap.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(fmap.shape[2])
    y, x = max(y, 0.0), max(x, 0.0)
    y_lo, x_lo = int(y), int(x)
    if y_lo >= h - 1:
        y_lo = y_hi = h - 1
        y = float(y_lo)
    else:
        y_hi = y_lo + 1
    if x_lo >= w - 1:
        x_lo = x_hi = w - 1
        x = float(x_lo)
    else:
        x_hi = x_lo + 1
    ly, lx = y - y_lo, x - x_lo
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * fmap[y_lo, x_lo]
        + hy * lx * fmap[y_lo, x_hi]
        + ly * hx * fmap[y_hi, x_lo]
        + ly * lx * fmap[y_hi, x_hi]
    )


def roi_align_ref(features, boxes, idx, out=(3, 4), scale=0.25, ratio=2, aligned=True):
    oh, ow = out
    res = np.zeros((len(boxes), oh, ow, features.shape[-1]))
    off = 0.5 if aligned else 0.0
    for r, (box, b) in enumerate(zip(boxes, idx, strict=True)):
        y1, x1, y2, x2 = box * scale - off
        rh, rw = y2 - y1, x2 - x1
        if not aligned:
            rh, rw = max(rh, 1.0), max(rw, 1.0)
        bh, bw = rh / oh, rw / ow
        for i in range(oh):
            for j in range(ow):
                acc = 0.0
                for iy in range(ratio):
                    y = y1 + i * bh + (iy + 0.5) * bh / ratio
                    for ix in range(ratio):
                        x = x1 + j * bw + (ix + 0.5) * bw / ratio
                        acc = acc + _bilinear(features[b], y, x)
                res[r, i, j] = acc / ratio**2
    return res


def _random_case(seed, b=2, h=9, w=11, c=3, stride=4, n=12):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(b, h, w, c)).astype("float32")
    ih, iw = h * stride, w * stride
    y = rng.uniform(-10, ih + 5, (n, 2))
    x = rng.uniform(-10, iw + 5, (n, 2))
    boxes = np.stack([y.min(1), x.min(1), y.max(1), x.max(1)], 1)
    # Boxes touching or crossing the border, a tiny box and a zero-size box.
    extra = np.array(
        [
            [0, 0, ih, iw],
            [ih - 6, iw - 6, ih + 3, iw + 3],
            [-6, -6, 5, 5],
            [7, 9, 7.5, 9.2],
            [12, 12, 12, 12],
        ],
        "float64",
    )
    boxes = np.concatenate([boxes, extra]).astype("float32")
    idx = rng.integers(0, b, len(boxes)).astype("int32")
    return feats, boxes, idx


@pytest.mark.parametrize(
    ("seed", "ratio", "aligned", "out"),
    [(0, 2, True, (3, 4)), (1, 1, True, (2, 2)), (2, 3, False, (3, 3)), (3, 2, True, (7, 7))],
)
def test_roi_align_matches_reference(seed, ratio, aligned, out):
    feats, boxes, idx = _random_case(seed)
    got = ops.convert_to_numpy(
        roi_align(feats, boxes, idx, out, spatial_scale=0.25, sampling_ratio=ratio, aligned=aligned)
    )
    ref = roi_align_ref(feats, boxes, idx, out, 0.25, ratio, aligned)
    assert got.shape == (len(boxes), *out, 3)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def roi_align_grad_ref(features, boxes, idx, upstream, out, scale=0.25, ratio=2):
    """d sum(roi_align * upstream) / d features, accumulated sample by sample (aligned)."""
    grad = np.zeros_like(features, dtype="float64")
    h, w = features.shape[1:3]
    oh, ow = out
    for r, (box, b) in enumerate(zip(boxes, idx, strict=True)):
        y1, x1, y2, x2 = box * scale - 0.5
        bh, bw = (y2 - y1) / oh, (x2 - x1) / ow
        for i in range(oh):
            for j in range(ow):
                for iy in range(ratio):
                    for ix in range(ratio):
                        y = y1 + i * bh + (iy + 0.5) * bh / ratio
                        x = x1 + j * bw + (ix + 0.5) * bw / ratio
                        if y < -1 or y > h or x < -1 or x > w:
                            continue
                        y, x = min(max(y, 0.0), h - 1), min(max(x, 0.0), w - 1)
                        y0, x0 = int(y), int(x)
                        y_1, x_1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
                        ly, lx = y - y0, x - x0
                        g = upstream[r, i, j] / ratio**2
                        grad[b, y0, x0] += (1 - ly) * (1 - lx) * g
                        grad[b, y0, x_1] += (1 - ly) * lx * g
                        grad[b, y_1, x0] += ly * (1 - lx) * g
                        grad[b, y_1, x_1] += ly * lx * g
    return grad


@pytest.mark.parametrize("multilevel", [False, True])
def test_roi_align_gradient(multilevel):
    feats, boxes, idx = _random_case(6)
    up = np.random.default_rng(7).normal(size=(len(boxes), 3, 4, 3)).astype("float32")
    x = tf.constant(feats)
    with tf.GradientTape() as tape:
        tape.watch(x)
        if multilevel:
            # All boxes forced to level 2 (stride 4) by a huge canonical size.
            layer = MultiLevelROIAlign((3, 4), 2, canonical_size=1e6, min_level=2, max_level=2)
            y = layer([x], boxes, idx)
        else:
            y = roi_align(x, boxes, idx, (3, 4), 0.25, 2)
        loss = tf.reduce_sum(y * up)
    got = tape.gradient(loss, x).numpy()
    np.testing.assert_allclose(got, roi_align_grad_ref(feats, boxes, idx, up, (3, 4)), atol=1e-4)


def test_roi_align_hand_value():
    # A linear ramp f(y, x) = 10 y + x is reproduced exactly inside the map.
    yy, xx = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
    feats = (10 * yy + xx)[None, :, :, None].astype("float32")
    # Box in feature pixels (stride 1) from (1.5, 2.5) to (3.5, 6.5), aligned: shift -0.5
    # -> (1, 2)-(3, 6); 2 x 2 bins -> bin centres y = 1.5, 2.5 and x = 3, 5.
    out = ops.convert_to_numpy(roi_align(feats, [[1.5, 2.5, 3.5, 6.5]], [0], (2, 2), 1.0, 2))
    np.testing.assert_allclose(out[0, :, :, 0], [[18, 20], [28, 30]], atol=1e-5)


def test_roi_align_batched_boxes():
    feats, boxes, _ = _random_case(4, n=6)
    batched = np.stack([boxes[:5], boxes[5:10]])
    got = ops.convert_to_numpy(roi_align(feats, batched, None, (2, 3), 0.25, 2))
    ref = roi_align_ref(feats, boxes[:10], np.repeat([0, 1], 5), (2, 3), 0.25, 2)
    np.testing.assert_allclose(got, ref.reshape(2, 5, 2, 3, 3), atol=1e-5)


def test_roi_align_dynamic_graph():
    feats, boxes, idx = _random_case(5)

    @tf.function(
        input_signature=[
            tf.TensorSpec((None, None, None, 3), tf.float32),
            tf.TensorSpec((None, 4), tf.float32),
            tf.TensorSpec((None,), tf.int32),
        ]
    )
    def f(x, bx, bi):
        return roi_align(x, bx, bi, (3, 4), 0.25, 2)

    np.testing.assert_allclose(
        f(feats, boxes, idx).numpy(), roi_align_ref(feats, boxes, idx), atol=1e-5
    )


def test_assign_levels_by_hand():
    def box(s):
        return [0.0, 0.0, s, s]

    sizes = [4, 16, 31.9, 32, 63.9, 64, 127, 128, 300]
    levels = ops.convert_to_numpy(assign_levels(np.array([box(s) for s in sizes], "float32")))
    # floor(3 + log2(s / 32)) clipped to [2, 5].
    np.testing.assert_array_equal(levels, [2, 2, 2, 3, 3, 4, 4, 5, 5])
    # sqrt(w h): a 16 x 64 box has size 32 -> level 3.
    assert int(ops.convert_to_numpy(assign_levels(np.array([[0, 0, 16, 64]], "float32")))[0]) == 3
    expected = [min(max(math.floor(4 + math.log2(s / 56)), 2), 5) for s in sizes]
    got = assign_levels(np.array([box(s) for s in sizes], "float32"), 56.0, 4)
    np.testing.assert_array_equal(ops.convert_to_numpy(got), expected)


def _pyramid(seed, b=2, size=64, c=4):
    rng = np.random.default_rng(seed)
    return {
        f"P{k}": rng.normal(size=(b, size // 2**k, size // 2**k, c)).astype("float32")
        for k in range(2, 6)
    }


def test_multilevel_matches_single_level_reference():
    feats = _pyramid(0)
    boxes = np.array(
        [
            [3, 4, 20, 15],  # ~14 px -> P2
            [0, 0, 40, 40],  # 40 px -> P3
            [10, 5, 64, 64],  # ~56 px -> P3
            [0, 0, 64, 64],  # 64 px -> P4
            [-20, -20, 80, 90],  # ~105 px -> P4
            [-40, -40, 120, 120],  # 160 px -> P5
            [60, 60, 64, 64],  # corner, tiny -> P2
        ],
        "float32",
    )
    idx = np.array([0, 1, 0, 1, 0, 1, 1], "int32")
    layer = MultiLevelROIAlign(output_size=(3, 3), sampling_ratio=2)
    got = ops.convert_to_numpy(layer(feats, boxes, idx))
    levels = [2, 3, 3, 4, 4, 5, 2]
    for r, k in enumerate(levels):
        ref = roi_align_ref(feats[f"P{k}"], boxes[r : r + 1], idx[r : r + 1], (3, 3), 2.0**-k)
        np.testing.assert_allclose(got[r], ref[0], atol=1e-5, err_msg=f"roi {r} level {k}")
    # A list of maps P2..P5 is equivalent to the dict; batched boxes give (B, S, ...).
    listed = ops.convert_to_numpy(layer([feats[f"P{k}"] for k in range(2, 6)], boxes, idx))
    np.testing.assert_allclose(listed, got)
    batched = ops.convert_to_numpy(layer(feats, np.stack([boxes[:3], boxes[3:6]])))
    assert batched.shape == (2, 3, 3, 3, 4)
    for r, k in enumerate(levels[:6]):
        b, s = divmod(r, 3)
        ref = roi_align_ref(feats[f"P{k}"], boxes[r : r + 1], [b], (3, 3), 2.0**-k)
        np.testing.assert_allclose(batched[b, s], ref[0], atol=1e-5)


def test_multilevel_layer_config_and_model(tmp_path):
    layer = MultiLevelROIAlign(output_size=7, sampling_ratio=1, canonical_size=48.0, name="ra")
    config = layer.get_config()
    clone = MultiLevelROIAlign.from_config(config)
    assert clone.get_config() == config
    assert clone.output_size == (7, 7) and clone.canonical_size == 48.0

    # Inside a functional model with dynamic image size, and through a .keras round trip.
    inputs = {f"P{k}": keras.Input((None, None, 4), name=f"P{k}") for k in range(2, 6)}
    rois = keras.Input((5, 4), name="rois")
    pooled = MultiLevelROIAlign(output_size=(2, 2), name="ra")(inputs, rois)
    out = keras.layers.Dense(1)(keras.layers.Flatten()(keras.layers.Reshape((5, 16))(pooled)))
    model = keras.Model({**inputs, "rois": rois}, out)
    assert tuple(pooled.shape) == (None, 5, 2, 2, 4)
    assert model.get_layer("ra").weights == []
    rng = np.random.default_rng(0)
    data = {**_pyramid(1), "rois": np.tile(rng.uniform(0, 30, (1, 5, 2)), (2, 1, 2)) + [0, 0, 9, 9]}
    data["rois"] = data["rois"].astype("float32")
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(data, np.zeros((2, 1)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(data)), ops.convert_to_numpy(model(data)), atol=1e-6
    )
    # New image size, also through an exported SavedModel.
    data2 = {**_pyramid(2, size=128), "rois": data["rois"]}
    expected2 = ops.convert_to_numpy(model(data2))
    assert expected2.shape == (2, 1)
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "sm"))
    for d in (data, data2):
        got = reloaded.serve({k: tf.constant(v) for k, v in d.items()})
        np.testing.assert_allclose(got.numpy(), ops.convert_to_numpy(model(d)), atol=1e-5)


def test_bad_args():
    with pytest.raises(ValueError, match="sampling_ratio"):
        MultiLevelROIAlign(sampling_ratio=0)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(np.zeros((1, 4, 4, 1)), np.zeros((1, 4)), [0], output_size=(0, 2))
    with pytest.raises(ValueError, match="lacks levels"):
        MultiLevelROIAlign()({"P2": np.zeros((1, 4, 4, 1))}, np.zeros((1, 4)), np.zeros(1, "int32"))
