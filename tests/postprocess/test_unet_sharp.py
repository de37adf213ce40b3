"""Tests for kerasnuc.postprocess.unet_sharp on synthetic softmax maps with known nuclei."""

from __future__ import annotations

import numpy as np
import pytest

from kerasnuc.fileutil import KerasnucError
from kerasnuc.postprocess.unet_sharp import (
    DEFAULT_GRID,
    UnetSharpPostprocConfig,
    postprocess_unet_sharp,
    split_touching_nuclei,
    tune_unet_sharp,
)


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _softmax_from_classes(class_map: np.ndarray, num_classes: int, p: float = 0.9) -> np.ndarray:
    """Softmax map with probability ``p`` on the given class, the rest spread evenly."""
    k = num_classes + 1
    out = np.full((*class_map.shape, k), (1.0 - p) / (k - 1), np.float32)
    np.put_along_axis(out, class_map[..., None], p, axis=-1)
    return out


def test_touching_discs_are_split():
    shape = (64, 96)
    a, b = _disc(shape, 32, 30, 10), _disc(shape, 32, 48, 10)  # overlap: one component
    far = _disc(shape, 10, 85, 5)
    fg = a | b | far
    from scipy import ndimage as ndi

    assert ndi.label(fg)[1] == 2
    inst = split_touching_nuclei(fg, min_distance=6)
    assert inst[32, 25] != inst[32, 53] and inst[32, 25] > 0 and inst[32, 53] > 0
    assert len(np.unique(inst[fg])) == 3 and np.all((inst > 0) == fg)
    merged = postprocess_unet_sharp(
        _softmax_from_classes(fg.astype(np.int64), 1), UnetSharpPostprocConfig(split_touching=False)
    )
    assert merged.num_instances == 2


def test_classes_sizes_and_table():
    shape = (64, 64)
    cls = np.zeros(shape, np.int64)
    big = _disc(shape, 20, 20, 8)
    cls[big] = 2
    cls[big & (np.arange(64)[None, :] < 15)] = 1  # a minority of class-1 pixels in it
    cls[_disc(shape, 45, 45, 7)] = 3
    cls[_disc(shape, 55, 10, 1)] = 1  # 5 pixels: below min_size 10
    semantic = _softmax_from_classes(cls, 3)
    result = postprocess_unet_sharp(semantic, UnetSharpPostprocConfig(min_size=10))
    assert result.num_instances == 2
    assert result.table["class"].tolist() == [2, 3]  # majority of the summed softmax
    assert result.table["area"].tolist() == [int(big.sum()), int(_disc(shape, 45, 45, 7).sum())]
    assert result.instances.dtype == np.int32 and result.classes.dtype == np.int32
    np.testing.assert_array_equal(result.classes[big], 2)
    assert result.classes[55, 10] == 0 and result.instances[55, 10] == 0
    np.testing.assert_allclose(result.table["probabilities"].sum(1), 1.0, atol=1e-5)
    kept = postprocess_unet_sharp(semantic, UnetSharpPostprocConfig(min_size=0))
    assert kept.num_instances == 3
    only_big = postprocess_unet_sharp(semantic, UnetSharpPostprocConfig(min_size={3: 1000}))
    assert only_big.table["class"].tolist() == [2, 1]


def test_threshold_and_empty():
    semantic = np.zeros((32, 32, 3), np.float32)
    semantic[..., 0] = 0.6
    semantic[..., 1] = 0.4
    assert postprocess_unet_sharp(semantic).num_instances == 0
    result = postprocess_unet_sharp(semantic, UnetSharpPostprocConfig(fg_threshold=0.3, min_size=0))
    assert result.num_instances == 1 and result.table["class"].tolist() == [1]


def test_config_round_trip(tmp_path):
    cfg = UnetSharpPostprocConfig(fg_threshold=0.4, min_distance=4, min_size={1: 20, 2: 5})
    cfg.save(tmp_path / "postproc.json")
    assert UnetSharpPostprocConfig.load(tmp_path / "postproc.json") == cfg
    assert UnetSharpPostprocConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Unknown post-processing setting"):
        UnetSharpPostprocConfig.from_dict({"seed_threshold": 0.5})
    with pytest.raises(ValueError, match="`min_distance` must be an int >= 1"):
        UnetSharpPostprocConfig(min_distance=0)
    with pytest.raises(ValueError, match="`fg_threshold` must be a float in"):
        UnetSharpPostprocConfig(fg_threshold=1.0)
    with pytest.raises(ValueError, match="connectivity"):
        UnetSharpPostprocConfig(connectivity=3)
    with pytest.raises(ValueError, match="`foreground` must be one of \\['threshold', 'argmax'\\]"):
        UnetSharpPostprocConfig(foreground="max")
    # A postproc.json written before `foreground` existed loads with the threshold rule.
    assert UnetSharpPostprocConfig.from_dict({"fg_threshold": 0.4}).foreground == "threshold"
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(KerasnucError, match="bad.json: cannot read post-processing settings"):
        UnetSharpPostprocConfig.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="`semantic` must have shape"):
        postprocess_unet_sharp(np.zeros((8, 8, 1), np.float32))


def _two_discs() -> np.ndarray:
    """Disc A: P(bg) 0.4, P(c1) 0.35, P(c2) 0.25 (nucleus probability 0.6 but background is the
    most probable class); disc B: P(bg) 0.3, P(c1) 0.7; background elsewhere: P(bg) 0.9."""
    shape = (48, 64)
    semantic = np.zeros((*shape, 3), np.float32)
    semantic[...] = (0.9, 0.05, 0.05)
    semantic[_disc(shape, 24, 16, 8)] = (0.4, 0.35, 0.25)
    semantic[_disc(shape, 24, 46, 8)] = (0.3, 0.7, 0.0)
    return semantic


def test_argmax_foreground():
    semantic = _two_discs()
    threshold = postprocess_unet_sharp(semantic, UnetSharpPostprocConfig(fg_threshold=0.5))
    assert threshold.num_instances == 2  # 1 - 0.4 = 0.6 > 0.5 and 1 - 0.3 = 0.7 > 0.5
    argmax = postprocess_unet_sharp(
        semantic, UnetSharpPostprocConfig(foreground="argmax", fg_threshold=0.1)
    )
    assert argmax.num_instances == 1  # disc A's most probable class is background
    assert argmax.instances[24, 16] == 0 and argmax.instances[24, 46] > 0
    assert argmax.table["class"].tolist() == [1]


def test_tune_searches_argmax_without_threshold():
    maps = [_two_discs()]

    def score_fn(instances, classes):  # 1 when exactly disc B is found
        inst = instances[0]
        return float(len(np.unique(inst[inst > 0])) == 1 and inst[24, 46] > 0)

    grid = {
        "foreground": ["threshold", "argmax"],
        "fg_threshold": [0.3, 0.5, 0.6],
        "min_distance": [6],
        "min_size": [0, 10],
    }
    best, table = tune_unet_sharp(maps, grid, score_fn)
    assert len(table) == 3 * 2 + 2  # argmax rows do not repeat the unused threshold
    argmax_rows = [r for r in table if r["foreground"] == "argmax"]
    assert [r["fg_threshold"] for r in argmax_rows] == [None, None]
    assert all(r["score"] == 1.0 for r in argmax_rows)
    # Thresholds 0.3 and 0.5 keep disc A (0.6 > t); 0.6 does not (0.6 > 0.6 is false).
    expected = {0.3: 0.0, 0.5: 0.0, 0.6: 1.0}
    for row in table:
        if row["foreground"] == "threshold":
            assert row["score"] == expected[row["fg_threshold"]], row
    # Ties go to the first configuration in grid order.
    assert best.foreground == "threshold" and best.fg_threshold == 0.6 and best.min_size == 0
    best, _ = tune_unet_sharp(maps, dict(grid, foreground=["argmax", "threshold"]), score_fn)
    assert best.foreground == "argmax" and best.fg_threshold == 0.5  # the base config's value
    # Every row's score is that of the plain post-processor with the row's settings.
    for row in table:
        settings = {k: v for k, v in row.items() if k != "score" and v is not None}
        result = postprocess_unet_sharp(maps[0], UnetSharpPostprocConfig(**settings))
        assert score_fn([result.instances], [result.classes]) == row["score"], row
    assert set(DEFAULT_GRID) == {"foreground", "fg_threshold", "min_distance", "min_size"}
