"""Overlays: outline pixels take the class colour, the rest keeps the image; slide overview."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kerasnuc.fileutil import read_image
from kerasnuc.io.overlay import SlideOverlay, draw_overlay, outline_mask, write_overlay

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


def test_slide_overlay_area_mean_and_nearest_labels() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    inst = np.zeros((8, 12), dtype=np.int32)
    inst[0:6, 0:8] = 3
    classes = (inst > 0).astype(np.int32) * 2
    overview = SlideOverlay((8, 12), scale=0.5, class_colors={2: RED})
    # four uneven tiles, offsets not aligned with the 2 x 2 blocks
    for r0, r1 in ((0, 3), (3, 8)):
        for c0, c1 in ((0, 5), (5, 12)):
            overview.add(
                image[r0:r1, c0:c1],
                inst[r0:r1, c0:c1],
                classes[r0:r1, c0:c1],
                offset=(r0, c0),
            )
    out = overview.render()
    assert out.shape == (4, 6, 3)
    # colour = mean of each 2 x 2 block; labels sampled at (2R + 1, 2C + 1): nucleus 3 covers
    # overview rows 0..2, cols 0..3, whose 1-px ring is red
    small_inst = inst[1::2, 1::2]
    assert small_inst[0:3, 0:4].all() and not small_inst[3].any()
    ring = outline_mask(small_inst)
    expected = np.rint(image.reshape(4, 2, 6, 2, 3).astype(np.float64).mean(axis=(1, 3)))
    np.testing.assert_array_equal(out[~ring], expected.astype(np.uint8)[~ring])
    assert (out[ring] == RED).all()
    assert ring.sum() == 10  # 3 x 4 block minus its 1 x 2 interior


def test_slide_overlay_tiles_equal_whole_and_uncovered_is_white() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    inst = np.zeros((30, 40), dtype=np.int32)
    inst[3:20, 5:25] = 1
    inst[22:29, 30:39] = 2
    whole = SlideOverlay((30, 40), scale=0.3)
    whole.add(image, inst)
    tiled = SlideOverlay((30, 40), scale=0.3)
    for r0 in range(0, 30, 7):
        for c0 in range(0, 40, 9):
            tile = np.s_[r0 : r0 + 7, c0 : c0 + 9]
            tiled.add(image[tile], inst[tile], offset=(r0, c0))
    np.testing.assert_array_equal(tiled.render(), whole.render())
    blank = SlideOverlay((30, 40), scale=0.25)
    blank.add(image[:8, :8], offset=(0, 0))
    out = blank.render()
    assert out.shape == (8, 10, 3)
    assert (out[2:, :] == 255).all() and (out[:, 2:] == 255).all()
    with pytest.raises(ValueError, match="inside the slide"):
        blank.add(image, offset=(5, 5))
