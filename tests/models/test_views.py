"""Views (flips and turns) averaged: values worked out by hand for position-dependent forwards."""

import numpy as np
import pytest

from kerasnuc.models.views import VIEW_ORDER, average_views

H, W = 3, 5


def _position_forward(x):
    """``m = x_red * (row + 10 * col)``: depends on where a pixel sits, so views differ."""
    rows, cols = np.mgrid[: x.shape[1], : x.shape[2]]
    weight = (rows + 10 * cols).astype(np.float32)
    return {"m": x[..., :1] * weight[None, :, :, None]}


def test_two_and_four_views_average_the_position_weights():
    rng = np.random.default_rng(0)
    x = rng.random((2, H, W, 3)).astype(np.float32)
    rows, cols = np.mgrid[:H, :W]
    red = x[..., 0]
    one = average_views(_position_forward, x, 1)["m"][..., 0]
    np.testing.assert_allclose(one, red * (rows + 10 * cols), rtol=1e-6)
    # Mirror image: column c is seen at column W-1-c, so the weights of c and W-1-c average to
    # 10 (W-1) / 2 = 20 for every column; the rows keep their own weight.
    two = average_views(_position_forward, x, 2)["m"][..., 0]
    np.testing.assert_allclose(two, red * (rows + 20.0), rtol=1e-6)
    # Up-down flip and half turn average the rows too: (H-1)/2 = 1.
    four = average_views(_position_forward, x, 4)["m"][..., 0]
    np.testing.assert_allclose(four, red * (1.0 + 20.0), rtol=1e-6)


def test_constant_vectors_turn_with_the_views():
    """A forward that predicts (dy, dx) = (1, 2) in its own frame, whatever it sees: in the
    image's frame the mirror image's vector is (1, -2), the up-down flip's (-1, 2) and the
    half turn's (-1, -2)."""

    def forward(x):
        v = np.zeros((*x.shape[:3], 2), np.float32)
        v[..., 0], v[..., 1] = 1.0, 2.0
        return {"vectors": v}

    x = np.zeros((1, H, W, 3), np.float32)
    two = average_views(forward, x, 2)["vectors"]
    np.testing.assert_allclose(two[..., 0], 1.0)
    np.testing.assert_allclose(two[..., 1], 0.0)
    four = average_views(forward, x, 4)["vectors"]
    np.testing.assert_allclose(four, 0.0, atol=1e-7)


def test_view_order_and_bad_counts():
    assert sorted(VIEW_ORDER) == list(range(8))
    assert VIEW_ORDER[:2] == (0, 4)  # the image and its mirror image
    assert all(t % 2 == 0 for t in VIEW_ORDER[:4])  # the first four keep the shape
    x = np.zeros((1, 4, 4, 3), np.float32)
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="`views` must be an int in"):
            average_views(_position_forward, x, bad)
