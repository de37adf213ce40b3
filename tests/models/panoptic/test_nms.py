"""NMS against a brute-force NumPy greedy reference."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from kerasnuc.models.panoptic.nms import batched_nms, non_max_suppression


def _iou(a, b):
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms_ref(boxes, scores, max_output, thr, score_thr=-np.inf, top_k=None):
    """Textbook greedy NMS: repeatedly take the best remaining box, drop its overlaps."""
    cand = [i for i in np.argsort(-scores, kind="stable") if scores[i] > score_thr]
    if top_k is not None:
        cand = [i for i in np.argsort(-scores, kind="stable")[:top_k] if scores[i] > score_thr]
    kept = []
    while cand and len(kept) < max_output:
        best = cand.pop(0)
        kept.append(best)
        cand = [j for j in cand if _iou(boxes[best], boxes[j]) <= thr]
    return kept


def _random(seed, n=80, size=100):
    rng = np.random.default_rng(seed)
    yx = rng.uniform(0, size, (n, 2))
    hw = rng.uniform(5, 30, (n, 2))
    boxes = np.concatenate([yx, yx + hw], 1).astype("float32")
    scores = rng.permutation(n).astype("float32") / n + 0.01  # distinct: no ties
    return boxes, scores


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("thr", "max_out"), [(0.5, 30), (0.3, 100), (0.7, 5)])
def test_matches_bruteforce(seed, thr, max_out):
    boxes, scores = _random(seed)
    idx, n = non_max_suppression(boxes, scores, max_out, thr)
    idx, n = ops.convert_to_numpy(idx), int(ops.convert_to_numpy(n))
    ref = nms_ref(boxes, scores, max_out, thr)
    assert idx.shape == (max_out,)
    assert n == len(ref)
    np.testing.assert_array_equal(idx[:n], ref)
    assert (idx[n:] == -1).all()


def test_score_threshold_and_top_k():
    boxes, scores = _random(7)
    idx, n = non_max_suppression(boxes, scores, 50, 0.4, score_threshold=0.5, pre_nms_top_k=30)
    ref = nms_ref(boxes, scores, 50, 0.4, 0.5, top_k=30)
    n = int(ops.convert_to_numpy(n))
    assert n == len(ref)
    np.testing.assert_array_equal(ops.convert_to_numpy(idx)[:n], ref)


def test_hand_case():
    boxes = np.array(
        [[0, 0, 10, 10], [0, 1, 10, 11], [20, 20, 30, 30], [0, 0, 10, 5], [21, 21, 30, 30]],
        "float32",
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.95], "float32")
    # IoU(0, 1) = 90 / 110 = 0.82 -> 1 suppressed; IoU(0, 3) = 0.5 -> kept at threshold 0.5;
    # IoU(4, 2) = 81 / 100 -> 2 suppressed by the higher-scored 4.
    idx, n = non_max_suppression(boxes, scores, 6, 0.5)
    np.testing.assert_array_equal(ops.convert_to_numpy(idx), [4, 0, 3, -1, -1, -1])
    assert int(ops.convert_to_numpy(n)) == 3


def test_batched_and_dynamic_graph():
    b0, s0 = _random(10, n=60)
    b1, s1 = _random(11, n=60)
    boxes, scores = np.stack([b0, b1]), np.stack([s0, s1])

    @tf.function(
        input_signature=[
            tf.TensorSpec((None, None, 4), tf.float32),
            tf.TensorSpec((None, None), tf.float32),
        ]
    )
    def f(bx, sc):
        return batched_nms(bx, sc, 20, 0.5, pre_nms_top_k=100)  # k > N: padded internally

    idx, n = f(boxes, scores)
    idx, n = idx.numpy(), n.numpy()
    for i, (b, s) in enumerate([(b0, s0), (b1, s1)]):
        ref = nms_ref(b, s, 20, 0.5)
        assert n[i] == len(ref)
        np.testing.assert_array_equal(idx[i, : n[i]], ref)
        assert (idx[i, n[i] :] == -1).all()


def test_bad_args():
    with pytest.raises(ValueError, match="max_output"):
        non_max_suppression(np.zeros((3, 4)), np.zeros(3), 0)
    with pytest.raises(ValueError, match="iou_threshold"):
        non_max_suppression(np.zeros((3, 4)), np.zeros(3), 2, 1.5)


def test_saved_model_dynamic_image_size(tmp_path):
    """Anchors -> decode -> clip -> NMS exported as a SavedModel, reloaded at two image sizes."""
    from kerasnuc.models.panoptic.anchors import AnchorConfig, generate_anchors
    from kerasnuc.models.panoptic.boxes import clip_boxes, decode_boxes

    cfg = AnchorConfig()

    class Proposals(tf.Module):
        @tf.function(
            input_signature=[
                tf.TensorSpec((None, None, None, 3), tf.float32),
                tf.TensorSpec((None, None), tf.float32),
            ]
        )
        def __call__(self, image, scores):
            h, w = tf.shape(image)[1], tf.shape(image)[2]
            anchors = generate_anchors(h, w, cfg)
            boxes = clip_boxes(decode_boxes(anchors, tf.zeros_like(anchors)), h, w)
            boxes = tf.broadcast_to(boxes[None], (tf.shape(scores)[0], tf.shape(boxes)[0], 4))
            return batched_nms(boxes, scores, 16, 0.5, pre_nms_top_k=200)

    tf.saved_model.save(Proposals(), str(tmp_path / "sm"))
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    rng = np.random.default_rng(0)
    for h, w in [(64, 64), (96, 128)]:
        anchors = ops.convert_to_numpy(generate_anchors(h, w, cfg))
        scores = rng.permutation(len(anchors)).astype("float32")[None] / len(anchors)
        idx, n = loaded(tf.zeros((1, h, w, 3)), scores)
        clipped = np.clip(anchors, 0, [h, w, h, w])
        order = np.argsort(-scores[0])[:200]
        sub = nms_ref(clipped[order], scores[0, order], 16, 0.5)
        np.testing.assert_array_equal(idx.numpy()[0, : n.numpy()[0]], order[sub])
