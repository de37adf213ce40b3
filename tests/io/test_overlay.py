"""Overlays: outline pixels take the class colour, the rest keeps the image; slide overview."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kerasnuc.fileutil import read_image
from kerasnuc.io.overlay import (
    THICKNESS,
    add_legend,
    draw_legend,
    draw_overlay,
    outline_mask,
    write_overlay,
)

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


def test_legend_strip_names_every_colour(tmp_path: Path) -> None:
    entries = [("tumour", RED), ("lymphocyte", BLUE), ("stroma", (0, 200, 0))]
    wide = draw_legend(400, entries)
    assert wide.shape == (20, 400, 3) and wide.dtype == np.uint8
    # The first swatch fills x 4..15, y 4..15 (black frame, colour inside); white elsewhere.
    assert wide[10, 9].tolist() == list(RED) and wide[4, 4].tolist() == [0, 0, 0]
    assert wide[1, :].min() == 255 and wide[:, 0].min() == 255
    swatches = [tuple(c) for c in wide[10, :].tolist() if tuple(c) in (RED, BLUE, (0, 200, 0))]
    assert [c for i, c in enumerate(swatches) if i == 0 or c != swatches[i - 1]] == [
        RED,
        BLUE,
        (0, 200, 0),
    ]
    # Too narrow for one line: one entry per line.
    narrow = draw_legend(60, entries)
    assert narrow.shape == (60, 60, 3)
    assert [narrow[20 * k + 10, 9].tolist() for k in range(3)] == [
        list(RED),
        list(BLUE),
        [0, 200, 0],
    ]
    assert draw_legend(50, []).shape == (0, 50, 3)
    # The overlay keeps the image's rows and gets the strip below; without names, no strip.
    image, inst, classes = scene()
    out = write_overlay(
        tmp_path / "ov.png", image, inst, classes, {1: RED, 2: BLUE}, class_names={1: "a", 2: "b"}
    )
    assert out.shape == (12 + 2 * 20, 16, 3)  # 16 px wide: one entry per 20 px line
    np.testing.assert_array_equal(out[:12], draw_overlay(image, inst, classes, {1: RED, 2: BLUE}))
    np.testing.assert_array_equal(read_image(tmp_path / "ov.png"), out)
    assert add_legend(out[:12], None, {1: RED}).shape == (12, 16, 3)


def test_thick_outline_on_dark_nuclei() -> None:
    # kerasnuc predict draws 2 px outlines: on a 6 x 6 nucleus, the outer two rings.
    inst = np.zeros((10, 10), np.int32)
    inst[2:8, 2:8] = 1
    edge = outline_mask(inst, THICKNESS)
    assert THICKNESS == 2 and edge.sum() == 36 - 4 and not edge[4:6, 4:6].any()
