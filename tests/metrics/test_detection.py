"""Distance-based one-to-one detection matching on hand-placed points."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kerasnuc.instances import instance_centroids
from kerasnuc.metrics import detection_scores, match_points


def test_simple_matching_and_scores():
    gt = np.array([[0.0, 0.0], [10.0, 0.0]])
    pred = np.array([[0.0, 3.0], [10.0, 20.0], [5.0, 0.0]])
    gi, pi, d = match_points(gt, pred, max_dist=6)
    # Candidates: g0-p0 (3), g0-p2 (5), g1-p2 (5). Two pairs are possible: g0-p0, g1-p2.
    assert gi.tolist() == [0, 1] and pi.tolist() == [0, 2]
    np.testing.assert_allclose(d, [3.0, 5.0])
    r = detection_scores(gt, pred, 6)
    assert (r.tp, r.fp, r.fn) == (2, 1, 0)
    assert r.precision == pytest.approx(2 / 3)
    assert r.recall == 1.0
    assert r.f1 == pytest.approx(4 / 5)


def test_more_pairs_beat_a_shorter_distance():
    # Greedy nearest would pair A with P (4) and leave B alone (B-Q is 15 > 6).
    gt = np.array([[0.0, 0.0], [0.0, 10.0]])
    pred = np.array([[0.0, 4.0], [0.0, -5.0]])
    gi, pi, d = match_points(gt, pred, max_dist=6)
    assert gi.tolist() == [0, 1] and pi.tolist() == [1, 0]
    np.testing.assert_allclose(d, [5.0, 6.0])  # 6 == max_dist is within


def test_shorter_total_distance_among_maximal_pairings():
    gt = np.array([[0.0, 0.0], [0.0, 3.0]])
    pred = np.array([[0.0, 1.0], [0.0, 2.5]])
    gi, pi, d = match_points(gt, pred, max_dist=10)
    # g0-p0 + g1-p1 = 1 + 0.5 beats g0-p1 + g1-p0 = 2.5 + 2.
    assert pi.tolist() == [0, 1]
    assert d.sum() == pytest.approx(1.5)


def test_empty_sets():
    none = np.zeros((0, 2))
    pts = np.array([[1.0, 1.0]])
    r = detection_scores(pts, none, 5)
    assert (r.tp, r.fp, r.fn, r.recall, r.f1) == (0, 0, 1, 0.0, 0.0)
    assert math.isnan(r.precision)
    r = detection_scores(none, none, 5)
    assert math.isnan(r.precision) and math.isnan(r.recall) and math.isnan(r.f1)
    with pytest.raises(ValueError, match="max_dist"):
        match_points(pts, pts, 0)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        match_points(np.zeros((3, 3)), pts, 1)


def test_instance_centroids():
    inst = np.zeros((6, 6), np.int32)
    inst[0:2, 0:4] = 9  # rows 0-1, cols 0-3 -> (0.5, 1.5)
    inst[5, 5] = 4
    ids, c = instance_centroids(inst)
    assert ids.tolist() == [4, 9]
    np.testing.assert_allclose(c, [[5.0, 5.0], [0.5, 1.5]])
