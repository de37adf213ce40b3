import numpy as np
import pytest

from kerasnuc.data.sampling import (
    ImportanceSampler,
    class_distributions,
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


# Group balancing. Three images, classes bg and a; images 1 and 2 come from one slide (group 1).
_GROUP_FREQS = np.array([[0.5, 0.5], [0.9, 0.1], [0.8, 0.2]])
_GROUPS = np.array(["s0", "s1", "s1"])


def test_group_balance_alpha_one_is_the_paper():
    np.testing.assert_allclose(
        importance_probabilities(_GROUP_FREQS, _GROUPS, 1.0), importance_probabilities(_GROUP_FREQS)
    )


def test_group_balance_alpha_zero_by_hand():
    # bg: group masses 0.5 and 1.7, each group gets 1/2: q = (1/2, 0.9/1.7/2, 0.8/1.7/2)
    # a:  group masses 0.5 and 0.3, each group gets 1/2: q = (1/2, 0.1/0.3/2, 0.2/0.3/2)
    classes, q = class_distributions(_GROUP_FREQS, _GROUPS, 0.0)
    np.testing.assert_array_equal(classes, [0, 1])
    np.testing.assert_allclose(q[:, 0], [0.5, 0.9 / 3.4, 0.8 / 3.4])
    np.testing.assert_allclose(q[:, 1], [0.5, 1 / 6, 1 / 3])
    p = importance_probabilities(_GROUP_FREQS, _GROUPS, 0.0)
    np.testing.assert_allclose(p, [0.5, (0.9 / 3.4 + 1 / 6) / 2, (0.8 / 3.4 + 1 / 3) / 2])


def test_group_balance_square_root_by_hand():
    # class a, alpha 0.5: group shares sqrt(0.5) and sqrt(0.3) of their sum
    w0, w1 = np.sqrt(0.5), np.sqrt(0.3)
    _, q = class_distributions(_GROUP_FREQS, _GROUPS, 0.5)
    np.testing.assert_allclose(
        q[:, 1], [w0 / (w0 + w1), 1 / 3 * w1 / (w0 + w1), 2 / 3 * w1 / (w0 + w1)]
    )


def test_group_balance_lets_no_slide_own_a_class():
    # slide A: 9 images full of class a; slides B, C: one image each with a little of it
    freqs = np.array([[0.5, 0.5]] * 9 + [[0.9, 0.1], [0.9, 0.1]])
    groups = np.array(["A"] * 9 + ["B", "C"])
    sampler = ImportanceSampler(freqs, seed=0, groups=groups, alpha=0.0)
    idx, cls = sampler.draw(0, size=30000)
    from_a = idx[cls == 1]
    # draws for class a: each slide 1/3 (the paper's q_c gives slide A 4.5 / 4.7)
    assert (from_a < 9).mean() == pytest.approx(1 / 3, abs=0.015)
    assert (from_a == 9).mean() == pytest.approx(1 / 3, abs=0.015)


def test_group_balance_checks_its_arguments():
    with pytest.raises(ValueError, match="alpha"):
        importance_probabilities(_GROUP_FREQS, _GROUPS, 1.5)
    with pytest.raises(ValueError, match="groups"):
        importance_probabilities(_GROUP_FREQS, _GROUPS[:2], 0.5)
