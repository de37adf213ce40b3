"""Overlays: outline pixels take the class colour, the rest keeps the image; slide overview."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kerasnuc.fileutil import read_image
from kerasnuc.io.overlay import draw_overlay, outline_mask, write_overlay

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.zeros((12, 16, 3), dtype=np.uint8)
    image[..., 0] = np.arange(16, dtype=np.uint8)[None, :] * 10
    image[..., 1] = np.arange(12, dtype=np.uint8)[:, None] * 10
    image[..., 2] = 77
    inst = np.zeros((12, 16), dtype=np.int32)
    inst[2:8, 2:8] = 4  # 6 x 6 square, class 1
    inst[2:8, 8:12] = 9  # touching 6 x 4 rectangle, class 2
    classes = np.where(inst == 4, 1, np.where(inst == 9, 2, 0)).astype(np.int32)
    return image, inst, classes


def test_outline_mask_by_hand() -> None:
    _, inst, _ = scene()
    edge = outline_mask(inst)
    square = np.ones((6, 6), dtype=bool)
    square[1:5, 1:5] = False  # 1-px ring of the 6 x 6 square
    np.testing.assert_array_equal(edge[2:8, 2:8], square)
    rect = np.ones((6, 4), dtype=bool)
    rect[1:5, 1:3] = False  # touching nuclei keep their own outline
    np.testing.assert_array_equal(edge[2:8, 8:12], rect)
    assert not edge[inst == 0].any()
    thick = outline_mask(inst, thickness=2)
    ring2 = np.ones((6, 6), dtype=bool)
    ring2[2:4, 2:4] = False
    np.testing.assert_array_equal(thick[2:8, 2:8], ring2)
    # a nucleus touching the image edge is closed along it
    border = np.zeros((4, 4), dtype=np.int32)
    border[:, :2] = 1
    np.testing.assert_array_equal(outline_mask(border)[:, :2], np.ones((4, 2), dtype=bool))


def test_draw_overlay_colours(tmp_path: Path) -> None:
    image, inst, classes = scene()
    out = write_overlay(tmp_path / "ov.png", image, inst, classes, {1: RED, 2: BLUE})
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    edge = outline_mask(inst)
    assert (out[edge & (inst == 4)] == RED).all()
    assert (out[edge & (inst == 9)] == BLUE).all()
    np.testing.assert_array_equal(out[~edge], image[~edge])  # interior and background kept
    assert out[4, 4].tolist() == image[4, 4].tolist()
    np.testing.assert_array_equal(read_image(tmp_path / "ov.png"), out)
    # without classes, or for a class without a colour: the default colour
    plain = draw_overlay(image, inst)
    assert (plain[edge] == GREEN).all()
    partial = draw_overlay(image, inst, classes, {1: RED}, default_color=(1, 2, 3))
    assert (partial[edge & (inst == 9)] == (1, 2, 3)).all()
