"""End-to-end tests of the panoptic model at tiny size (64 x 64 images, narrow widths)."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

from kerasnuc.data.targets import panoptic_targets
from kerasnuc.models.panoptic.model import (
    LOSS_NAMES,
    STAT_NAMES,
    PanopticModel,
    PanopticModelConfig,
    build_panoptic,
)

TINY = PanopticModelConfig(
    encoder="tiny",
    tiny_widths=(8, 8, 16, 16),
    fpn_filters=8,
    box_fc_units=16,
    mask_conv_filters=8,
    mask_fc_filters=4,
    mask_up_filters=4,
    rpn_batch=64,
    rpn_pre_nms=200,
    rpn_post_nms=50,
    rpn_pre_nms_test=200,
    rpn_post_nms_test=50,
    roi_batch=32,
    max_mask_rois=8,
    max_detections=12,
)


def _batch(rng, n_images=2, size=64, slots=8):
    """Images with dark rectangles (nuclei) and the panoptic pipeline's targets."""
    images = rng.uniform(0.7, 0.9, size=(n_images, size, size, 3)).astype("float32")
    instances = np.zeros((n_images, size, size), np.int32)
    for b in range(n_images):
        inst = instances[b]
        for k in range(4):
            y, x = rng.integers(4, size - 16, 2)
            inst[y : y + 10, x : x + 9][inst[y : y + 10, x : x + 9] == 0] = k + 1
        images[b][inst > 0] = (0.3, 0.1, 0.5)
    return images, panoptic_targets(instances, slots)


def test_config_roundtrip_and_errors():
    cfg = dataclasses.replace(TINY, anchors={**TINY.anchors, "aspect_ratios": [1.0]})
    assert PanopticModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["anchors"]["aspect_ratios"] == [1.0]
    with pytest.raises(ValueError, match="Unknown PanopticModelConfig keys"):
        PanopticModelConfig.from_dict({"decoder_filters": [1]})
    with pytest.raises(ValueError, match="`encoder` must be one of"):
        PanopticModelConfig(encoder="vgg16")
    with pytest.raises(ValueError, match="max_mask_rois"):
        PanopticModelConfig(roi_batch=16, max_mask_rois=32)
    with pytest.raises(ValueError, match="strides"):
        PanopticModelConfig(anchors={"strides": [8, 16, 32, 64, 128]})


def test_inference_outputs_dynamic_size():
    model = build_panoptic(TINY)
    for shape in ((1, 64, 96, 3), (2, 128, 64, 3)):
        out = model(np.zeros(shape, "float32"))
        b, h, w, _ = shape
        n = TINY.max_detections
        assert tuple(out["boxes"].shape) == (b, 1, 4, n)
        assert tuple(out["scores"].shape) == (b, 1, 1, n)
        assert tuple(out["classes"].shape) == (b, 1, 1, n)
        assert tuple(out["masks"].shape) == (b, 28, 28, n)
        assert tuple(out["semantic"].shape) == (b, h, w, 2)
        boxes = keras.ops.convert_to_numpy(out["boxes"])[:, 0]
        scores = keras.ops.convert_to_numpy(out["scores"])[:, 0, 0]
        assert np.all(np.diff(scores, axis=-1) <= 1e-6)  # sorted by decreasing score
        valid = scores > 0
        assert np.all(boxes[:, 0][valid] >= 0) and np.all(boxes[:, 2][valid] <= h)
        assert np.all(boxes[:, 3][valid] <= w)


def test_fit_step_reports_all_seven_finite_losses(rng):
    keras.utils.set_random_seed(1)
    model = build_panoptic(TINY)
    images, targets = _batch(rng)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    parts = {
        name: getattr(model, name)
        for name in ("encoder", "fpn", "rpn", "box_head", "mask_head", "fusion", "gcn")
    }
    before = {
        name: [keras.ops.convert_to_numpy(v).copy() for v in layer.trainable_variables]
        for name, layer in parts.items()
    }
    hist = model.fit(images, targets, batch_size=2, epochs=1, verbose=0)
    assert set(hist.history) == {"loss", *LOSS_NAMES, *STAT_NAMES}
    for name in LOSS_NAMES:
        assert np.isfinite(hist.history[name][0]) and hist.history[name][0] > 0, name
    total = sum(hist.history[n][0] for n in LOSS_NAMES)
    np.testing.assert_allclose(hist.history["loss"][0], total, rtol=1e-4)  # Eq. 4, unweighted
    # Every part receives gradients: backbone, FPN, RPN, box head, mask head, fusion, GCN.
    for name, layer in parts.items():
        after = [keras.ops.convert_to_numpy(v) for v in layer.trainable_variables]
        assert any(not np.allclose(a, b) for a, b in zip(before[name], after, strict=True)), name


def test_positive_counts_follow_the_sampling_rules(rng):
    """Every gt box gets a positive anchor (low-quality matches) and joins the ROIs (IoU 1), so
    both counts are >= the number of nuclei; the ROI count is capped at 25 % of ``roi_batch``."""
    model = build_panoptic(TINY)
    images, targets = _batch(rng)
    terms = model._loss_terms(images, targets, training=False)
    n_gt = (targets["classes"] > 0).sum() / len(images)  # boxes per image
    assert n_gt >= 3
    assert float(terms["rpn_positives"]) >= n_gt
    assert n_gt <= float(terms["roi_positives"]) <= 0.25 * TINY.roi_batch


def test_probe_losses_fixed_sample(rng):
    """The probe uses the given proposals and a fixed sample: repeatable, and with proposals equal
    to the gt boxes and a box head that predicts zero deltas, ``L_det-reg`` is exactly 0."""
    model = build_panoptic(TINY)
    images, targets = _batch(rng)
    proposals = targets["boxes"].astype("float32")  # (B, G, 4), padded slots are empty boxes
    first = model.probe_losses(images, targets, proposals, seed=3)
    assert model.probe_losses(images, targets, proposals, seed=3) == first
    assert set(first) == {*LOSS_NAMES, *STAT_NAMES}
    assert first["det_reg_loss"] > 0  # random box head
    # every gt box twice (proposal + added gt), capped at 25 % of 32 ROIs
    n_gt = (targets["classes"] > 0).sum(axis=1)
    assert first["roi_positives"] == np.mean(np.minimum(2 * n_gt, 8))
    for v in model.box_head.box.weights:
        v.assign(np.zeros(v.shape, "float32"))
    assert model.probe_losses(images, targets, proposals, seed=3)["det_reg_loss"] == 0.0


def test_semantic_losses_match_definition(rng):
    """L_semseg1 = mean softmax CE of the GCN logits against the foreground map."""
    model = build_panoptic(TINY)
    images, targets = _batch(rng)
    terms = model._loss_terms(images, targets, training=False)
    feats = model.encoder(images)
    logits = keras.ops.convert_to_numpy(model.gcn(feats)).astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    fg = (targets["instances"] > 0).astype(int)
    expected = -np.take_along_axis(logp, fg[..., None], -1).mean()
    np.testing.assert_allclose(float(terms["semseg1_loss"]), expected, rtol=1e-4)


def test_weights_roundtrip(tmp_path, rng):
    model = build_panoptic(TINY)
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    other = build_panoptic(dataclasses.replace(TINY, seed=3))
    other.load_weights(path)
    x = rng.uniform(size=(1, 64, 64, 3)).astype("float32")
    a, b = model(x), other(x)
    for k in a:
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a[k]), keras.ops.convert_to_numpy(b[k]), atol=1e-5
        )
    restored = PanopticModel.from_config(model.get_config())
    assert restored.config == model.config
