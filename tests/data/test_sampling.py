import numpy as np
import pytest

from kerasnuc.data.sampling import (
    ImportanceSampler,
    importance_probabilities,
)


def test_importance_probabilities_by_hand():
    # 3 images, classes bg, a, b.  sum_n X: bg 1.5, a 0.5, b 1.0
    freqs = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    expected = np.array(
        [
            (0.5 / 1.5 + 0.5 / 0.5 + 0.0) / 3,
            (1.0 / 1.5 + 0.0 + 0.0) / 3,
            (0.0 + 0.0 + 1.0 / 1.0) / 3,
        ]
    )
    p = importance_probabilities(freqs)
    np.testing.assert_allclose(p, expected)
    assert p.sum() == pytest.approx(1.0)


def test_absent_class_is_left_out():
    freqs = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    # |C| = 2 (class 2 never occurs): p = ((0.5/1.5 + 1)/2, (1/1.5)/2)
    np.testing.assert_allclose(importance_probabilities(freqs), [2 / 3, 1 / 3])


def _rare_class_set(n=500, rare_fraction=0.02):
    """Images with background + class 1 (common) and, in 2 % of them, class 2 (rare)."""
    rng = np.random.default_rng(1)
    freqs = np.zeros((n, 3))
    rare = rng.choice(n, size=int(n * rare_fraction), replace=False)
    freqs[:, 1] = rng.uniform(0.1, 0.3, n)
    freqs[rare, 2] = rng.uniform(0.01, 0.05, rare.size)
    freqs[:, 0] = 1 - freqs[:, 1] - freqs[:, 2]
    return freqs, rare


def test_sampled_class_distribution_is_uniform():
    freqs, rare = _rare_class_set()
    sampler = ImportanceSampler(freqs, seed=3)
    idx, cls = sampler.draw(epoch=0, size=30000)
    # Every class (background included) is the reason for 1/3 of the draws.
    share = np.bincount(cls, minlength=3) / cls.size
    np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.015)
    # The rare class is in 2 % of the images but, by Eq. 2, in about 1/3 * (1 + 0.02) of draws.
    in_rare = np.isin(idx, rare).mean()
    expected = importance_probabilities(freqs)[rare].sum()
    assert expected == pytest.approx((1 + 0.02) / 3, abs=0.02)
    assert in_rare == pytest.approx(expected, abs=0.015)


def test_draw_marginal_matches_probabilities():
    freqs = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    idx, _ = ImportanceSampler(freqs, seed=0).draw(0, size=60000)
    emp = np.bincount(idx, minlength=3) / idx.size
    np.testing.assert_allclose(emp, [(1 / 3 + 1) / 3, (2 / 3) / 3, 1 / 3], atol=0.01)


def test_new_subset_each_epoch_and_reproducible():
    freqs, _ = _rare_class_set(n=50)
    s = ImportanceSampler(freqs, seed=7)
    a0, _ = s.draw(0)
    a1, _ = s.draw(1)
    b0, _ = ImportanceSampler(freqs, seed=7).draw(0)
    assert a0.shape == (50,)
    np.testing.assert_array_equal(a0, b0)
    assert not np.array_equal(a0, a1)
    assert len(np.unique(a0)) < 50  # with replacement: repeats expected for n=50


def test_disabled_is_a_permutation():
    freqs, _ = _rare_class_set(n=40)
    idx, cls = ImportanceSampler(freqs, seed=0, enabled=False).draw(0)
    np.testing.assert_array_equal(np.sort(idx), np.arange(40))
    assert (cls == -1).all()
