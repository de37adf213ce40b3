"""Counts, R2 and CCC against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kerasnuc.metrics import class_counts, concordance_cc, multiclass_r2, r2_score


def test_r2_by_hand():
    # SS_res = 1, SS_tot = (1-2)^2 + 0 + (3-2)^2 = 2.
    assert r2_score([1, 2, 3], [1, 2, 4]) == pytest.approx(0.5)
    assert r2_score([1, 2, 3], [1, 2, 3]) == 1.0
    # Constant truth: sklearn convention (1 if perfect else 0); one sample: undefined.
    assert r2_score([2, 2], [2, 2]) == 1.0
    assert r2_score([2, 2], [2, 3]) == 0.0
    assert math.isnan(r2_score([2], [2]))


def test_multiclass_r2_averages_classes():
    true = np.array([[1, 5], [2, 5], [3, 7]])
    pred = np.array([[1, 5], [2, 6], [4, 7]])
    # class 1: 0.5 (above); class 2: mean 17/3, SS_tot = 2 (2/3)^2 + (4/3)^2 = 8/3, SS_res = 1.
    r2_c2 = 1 - 3 / 8
    mean, per = multiclass_r2(true, pred)
    np.testing.assert_allclose(per, [0.5, r2_c2])
    assert mean == pytest.approx((0.5 + r2_c2) / 2)


def test_ccc_by_hand():
    # mean x 2, mean y 3, var x = var y = cov = 2/3 (population): 2*(2/3) / (4/3 + 1) = 4/7.
    assert concordance_cc([1, 2, 3], [2, 3, 4]) == pytest.approx(4 / 7)
    assert concordance_cc([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert concordance_cc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert concordance_cc([4, 4], [4, 4]) == 1.0
    assert math.isnan(concordance_cc([], []))
    with pytest.raises(ValueError, match="same length"):
        concordance_cc([1, 2], [1])


def test_class_counts():
    inst = np.array([[1, 1, 0, 7], [0, 3, 3, 7], [9, 0, 0, 0]])
    cls = np.array([[2, 2, 0, 1], [0, 2, 2, 1], [3, 0, 0, 0]])
    np.testing.assert_array_equal(class_counts(inst, cls, 4), [1, 2, 1, 0])
