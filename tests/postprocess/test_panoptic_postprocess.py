"""Tests of kerasnuc.postprocess.panoptic (detections -> instance map)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from kerasnuc.fileutil import KerasnucError
from kerasnuc.postprocess.panoptic import (
    PanopticPostprocConfig,
    detections_from_maps,
    grow_into_foreground,
    paste_mask,
    postprocess_panoptic,
    tune_panoptic_postproc,
)


def _maps(boxes, scores, masks, size=(20, 24), classes=None):
    """Model-layout outputs of one image: detection index in the last axis."""
    boxes = np.asarray(boxes, np.float32)
    n = len(scores)
    return {
        "boxes": boxes.T.reshape(1, 4, n),
        "scores": np.asarray(scores, np.float32).reshape(1, 1, n),
        "classes": np.asarray(classes if classes is not None else [1] * n, np.float32).reshape(
            1, 1, n
        ),
        "masks": np.moveaxis(np.asarray(masks, np.float32), 0, -1),
        "semantic": np.zeros((*size, 2), np.float32),
    }


def test_paste_mask_matches_cv2_on_integer_boxes(rng):
    mask = rng.uniform(size=(28, 28))
    rows, cols, values = paste_mask(mask, np.array([3, 5, 14, 12]), 20, 24)
    assert (rows, cols) == (slice(3, 14), slice(5, 12))
    expected = cv2.resize(mask.astype(np.float32), (7, 11), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(values, expected, atol=1e-5)


def test_paste_mask_fractional_box_and_clipping():
    # Pixel centres inside [2.4, 6.6): rows 2..6 (centres 2.5 .. 6.5); box leaving the image.
    rows, cols, values = paste_mask(np.ones((4, 4)), np.array([2.4, -3.0, 6.6, 3.2]), 10, 10)
    assert rows == slice(2, 7) and cols == slice(0, 3)
    np.testing.assert_allclose(values, 1.0)


def test_overlaps_go_to_the_higher_score():
    full = np.ones((2, 28, 28))
    maps = _maps([[2, 2, 10, 10], [6, 6, 14, 14]], [0.9, 0.6], full)
    res = postprocess_panoptic(maps, PanopticPostprocConfig(nms_iou=1.0))
    assert res.num_instances == 2
    inst = res.instances
    hi, lo = inst[3, 3], inst[12, 12]
    assert hi != lo and hi > 0 and lo > 0
    assert np.all(inst[6:10, 6:10] == hi)  # the overlap belongs to the 0.9 detection
    assert (inst == hi).sum() == 64 and (inst == lo).sum() == 64 - 16
    np.testing.assert_allclose(res.table["probabilities"][hi - 1], [0.1, 0.9], rtol=1e-6)
    np.testing.assert_array_equal(res.classes > 0, inst > 0)


def test_min_visible_drops_occluded_duplicates():
    """Full masks in 8 x 8 boxes (64 px) in one column: A rows 0-7 (score 0.9), B rows 2-9
    (0.8), C rows 6-13 (0.7). B loses rows 2-7 to A and keeps 16 / 64 = 0.25 of its mask. C
    loses rows 6-7 to A and, while B stays, rows 8-9 to B: 32 / 64 = 0.5 left; without B,
    48 / 64 = 0.75. So min_visible 0 keeps all, 0.5 drops B (C then keeps 48 px), 0.8 drops B
    and C; A always keeps its 64 px.
    """
    boxes = [[0, 0, 8, 8], [2, 0, 10, 8], [6, 0, 14, 8]]
    maps = _maps(boxes, [0.9, 0.8, 0.7], np.ones((3, 28, 28)), size=(20, 24))
    areas = {}
    for min_visible in (0.0, 0.5, 0.8):
        config = PanopticPostprocConfig(nms_iou=1.0, min_visible=min_visible)
        res = postprocess_panoptic(maps, config)
        areas[min_visible] = sorted(res.table["area"].tolist())
        assert (res.instances[0:8, 0:8] == res.instances[0, 0]).all() and res.instances[0, 0]
    assert areas == {0.0: [16, 32, 64], 0.5: [48, 64], 0.8: [64]}
    with pytest.raises(ValueError, match="min_visible"):
        PanopticPostprocConfig(min_visible=1.5)


def test_thresholds_and_nms():
    masks = np.zeros((3, 28, 28))
    masks[:, :14] = 0.8  # upper half of each box
    maps = _maps([[0, 0, 8, 8], [0, 0, 8, 9], [10, 10, 18, 18]], [0.9, 0.8, 0.3], masks)
    res = postprocess_panoptic(maps, PanopticPostprocConfig(score_threshold=0.5, nms_iou=0.5))
    assert res.num_instances == 1  # 0.8 suppressed by NMS (IoU 8/9), 0.3 below threshold
    assert (res.instances > 0).sum() == 4 * 8
    res = postprocess_panoptic(maps, PanopticPostprocConfig(score_threshold=0.2, nms_iou=1.0))
    # The 0.9 detection paints over the 0.8 one except its last column (rows 0..3 of col 8).
    assert res.num_instances == 3
    assert sorted(res.table["area"].tolist()) == [4, 32, 32]
    res = postprocess_panoptic(maps, PanopticPostprocConfig(mask_threshold=0.9))
    assert res.num_instances == 0
    res = postprocess_panoptic(maps, PanopticPostprocConfig(score_threshold=0.2, min_size=40))
    assert res.num_instances == 0


def test_classes_and_empty():
    maps = _maps([[0, 0, 4, 4], [5, 5, 9, 9]], [0.9, 0.7], np.ones((2, 28, 28)), classes=[2, 1])
    res = postprocess_panoptic(maps)
    assert sorted(res.table["class"].tolist()) == [1, 2]
    assert res.table["probabilities"].shape == (2, 3)
    assert res.classes[1, 1] == 2 and res.classes[6, 6] == 1
    empty = postprocess_panoptic(_maps(np.zeros((3, 4)), [0.0] * 3, np.zeros((3, 28, 28))))
    assert empty.num_instances == 0 and not empty.instances.any()


def test_config_roundtrip_and_errors(tmp_path):
    cfg = PanopticPostprocConfig(score_threshold=0.3, min_size=5)
    cfg.save(tmp_path / "pp.json")
    assert PanopticPostprocConfig.load(tmp_path / "pp.json") == cfg
    with pytest.raises(ValueError, match="score_threshold"):
        PanopticPostprocConfig(score_threshold=1.5)
    with pytest.raises(ValueError, match="Unknown"):
        PanopticPostprocConfig.from_dict({"fg_threshold": 0.5})
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(KerasnucError, match="bad.json"):
        PanopticPostprocConfig.load(tmp_path / "bad.json")
    with pytest.raises(KerasnucError, match="needs the outputs"):
        detections_from_maps({"semantic": np.zeros((4, 4, 2))})


def test_tune_picks_the_grid_point_with_the_right_count():
    """Three true nuclei; a duplicate of the first (IoU 8/9) scores 0.8, a false one 0.2."""
    masks = np.ones((5, 28, 28))
    boxes = [[0, 0, 8, 8], [0, 0, 8, 9], [10, 10, 18, 18], [10, 0, 18, 8], [0, 14, 4, 18]]
    maps = _maps(boxes, [0.9, 0.8, 0.7, 0.6, 0.2], masks)
    seen = []

    def score(instances, classes):  # 0 is best: exactly the 3 true nuclei
        seen.append([int(i.max()) for i in instances])
        return -abs(int(instances[0].max()) - 3) - abs(int(instances[1].max()) - 3)

    grid = {"score_threshold": [0.1, 0.5], "nms_iou": [1.0, 0.5]}
    best, table = tune_panoptic_postproc([maps, maps], grid, score, PanopticPostprocConfig())
    # 0.1 keeps all 5 (NMS off) or 4 (duplicate suppressed); 0.5 keeps 4 or 3.
    assert seen == [[5, 5], [4, 4], [4, 4], [3, 3]]
    assert [r["score"] for r in table] == [-4, -2, -2, 0]
    assert best == PanopticPostprocConfig(score_threshold=0.5, nms_iou=0.5)
    assert [(r["score_threshold"], r["nms_iou"]) for r in table] == [
        (0.1, 1.0), (0.1, 0.5), (0.5, 1.0), (0.5, 0.5)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="Unknown post-processing setting"):
        tune_panoptic_postproc([maps], {"fg_threshold": [0.5]}, score)
    with pytest.raises(ValueError, match="non-empty list"):
        tune_panoptic_postproc([maps], {"nms_iou": []}, score)
    with pytest.raises(ValueError, match="must be a number in"):
        tune_panoptic_postproc([maps], {"nms_iou": [1.5]}, score)
    with pytest.raises(ValueError, match="at least one image"):
        tune_panoptic_postproc([], {"nms_iou": [0.5]}, score)


def test_grow_into_foreground_by_hand():
    raw = np.zeros((9, 9), np.int32)
    raw[4, 2] = 1
    raw[4, 7] = 2
    foreground = np.ones((9, 9), bool)
    foreground[0, :] = False  # row 0 may not grow
    out = grow_into_foreground(raw, foreground, 2)
    # Every pixel within Euclidean distance 2 of (4, 2) or (4, 7), nearest label wins; (4, 4) and
    # (4, 5) are 2 from one label and 3 / 2 from the other.
    yy, xx = np.mgrid[:9, :9]
    d1 = np.hypot(yy - 4, xx - 2)
    d2 = np.hypot(yy - 4, xx - 7)
    expected = np.where((d1 <= 2) & (d1 < d2), 1, 0)
    expected = np.where((d2 <= 2) & (d2 < d1), 2, expected)
    expected[0, :] = 0
    tie = (d1 == d2) & (d1 <= 2)
    assert not tie.any()  # the two seeds are 5 apart: no tie within distance 2
    np.testing.assert_array_equal(out, expected)
    # The radius-2 digital disc has 13 pixels; the right edge cuts (4, 9) off the second one.
    assert (out == 1).sum() == 13 and (out == 2).sum() == 12
    np.testing.assert_array_equal(grow_into_foreground(raw, foreground, 0), raw)
    empty = np.zeros((4, 4), np.int32)
    np.testing.assert_array_equal(grow_into_foreground(empty, np.ones((4, 4), bool), 3), empty)


def test_grow_takes_only_unclaimed_semantic_nucleus_pixels():
    # One detection whose mask covers the inner 4 x 4 of its 8 x 8 box [4, 4, 12, 12]; the
    # semantic branch calls the whole box plus a one-pixel rim nucleus (0.9), the rest 0.2.
    mask = np.zeros((1, 28, 28))
    mask[0, 7:21, 7:21] = 1.0  # box rows 2..5 of 8 -> image rows 6..9
    maps = _maps([[4, 4, 12, 12]], [0.9], mask)
    maps["semantic"][..., 0] = 0.8
    maps["semantic"][..., 1] = 0.2
    maps["semantic"][3:13, 3:13] = [0.1, 0.9]
    plain = postprocess_panoptic(maps)
    assert (plain.instances == 1).sum() == 16
    rows, cols = np.nonzero(plain.instances)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 9, 6, 9)
    grown = postprocess_panoptic(maps, PanopticPostprocConfig(grow=2))
    # Within Euclidean 2 of the 4 x 4 square (rows / cols 6..9): the square, a 2-pixel band of
    # 4 x 2 on each side, and per corner only the diagonal neighbour (sqrt 2; (1, 2) is sqrt 5).
    # All of it lies in the 10 x 10 nucleus region.
    assert (grown.instances == 1).sum() == 16 + 4 * 8 + 4
    assert grown.table["area"].tolist() == [52]
    far = postprocess_panoptic(maps, PanopticPostprocConfig(grow=6))
    assert (far.instances == 1).sum() == 100  # stops at the semantic nucleus region (10 x 10)
    strict = postprocess_panoptic(maps, PanopticPostprocConfig(grow=6, semantic_threshold=0.95))
    assert (strict.instances == 1).sum() == 16
    with pytest.raises(ValueError, match="grow"):
        PanopticPostprocConfig(grow=-1)
    with pytest.raises(KerasnucError, match="semantic must be"):
        detections_from_maps({**maps, "semantic": np.zeros((20, 24, 3))})


def test_tune_searches_growth_after_one_paste_per_setting():
    mask = np.zeros((1, 28, 28))
    mask[0, 7:21, 7:21] = 1.0
    maps = _maps([[4, 4, 12, 12]], [0.9], mask)
    maps["semantic"][..., 0] = 1.0
    maps["semantic"][3:13, 3:13] = [0.0, 1.0]
    areas = []

    def score(instances, classes):  # best: 52 pixels (grow 2, see the test above)
        areas.append(int((instances[0] > 0).sum()))
        return -abs(areas[-1] - 52)

    grid = {"score_threshold": [0.5, 0.95], "grow": [0, 2, 6]}
    best, table = tune_panoptic_postproc([maps], grid, score)
    assert areas == [16, 52, 100, 0, 0, 0]
    assert best == PanopticPostprocConfig(grow=2)
    assert [r["grow"] for r in table] == [0, 2, 6, 0, 2, 6]
