"""Weak post-processing: detection by local maxima (um -> px), watershed from the points."""

from __future__ import annotations

import numpy as np
import pytest

from kerasnuc.fileutil import KerasnucError
from kerasnuc.postprocess.weak import (
    DEFAULT_MPP,
    WeakPostprocConfig,
    detect_nuclei,
    instances_from_points,
    postprocess_weak,
    tune_weak_postproc,
)


def blobs(shape, centres, sigma=2.0, heights=None):
    """Sum of Gaussian bumps ``h * exp(-d^2 / (2 sigma^2))`` at integer centres."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape)
    heights = heights or [1.0] * len(centres)
    for (r, c), h in zip(centres, heights, strict=True):
        out += h * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma**2))
    return np.clip(out, 0, 1).astype(np.float32)


def as_seg(prob):
    return np.stack([1 - prob, prob], axis=-1)


@pytest.mark.parametrize(
    ("um", "mpp", "px"),
    [(2.5, 0.5, 5), (2.5, 0.25, 10), (2.5, None, 5), (2.5, 2.0, 1), (1.0, 0.4, 3), (0.1, 1.0, 1)],
)
def test_min_distance_in_pixels(um, mpp, px):
    # round(um / mpp), at least one pixel; None = the paper's 0.5 um/px.
    assert WeakPostprocConfig(min_distance_um=um, mpp=mpp).min_distance_px == px
    assert DEFAULT_MPP == 0.5


def test_config_round_trip_and_errors(tmp_path):
    cfg = WeakPostprocConfig(mpp=0.25, peak_threshold=0.4, smooth_sigma=1.0, min_size=3)
    path = tmp_path / "postproc.json"
    cfg.save(path)
    assert WeakPostprocConfig.load(path) == cfg
    assert WeakPostprocConfig.from_dict(cfg.to_dict()) == cfg
    assert WeakPostprocConfig.from_dict({"mpp": 0.25}).min_distance_um == 2.5
    with pytest.raises(ValueError, match="Unknown post-processing setting"):
        WeakPostprocConfig.from_dict({"min_dist": 3})
    path.write_text('{"peak_threshold": 2}')
    with pytest.raises(KerasnucError, match="postproc.json: cannot read"):
        WeakPostprocConfig.load(path)
    for bad in (
        {"min_distance_um": 0},
        {"mpp": -1},
        {"peak_threshold": 1.5},
        {"smooth_sigma": -1},
        {"keep_unseeded": 1},
        {"min_size": 1.5},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            WeakPostprocConfig(**bad)


def test_detects_known_centres():
    centres = [(10, 12), (30, 40), (50, 15), (45, 52)]
    prob = blobs((64, 64), centres)
    found = detect_nuclei(prob, min_distance=5)
    assert sorted(map(tuple, found.tolist())) == sorted(centres)
    # Below the threshold nothing is detected.
    assert detect_nuclei(prob * 0.4, min_distance=5, threshold=0.5).shape == (0, 2)
    assert detect_nuclei(np.zeros((8, 8)), min_distance=1).shape == (0, 2)


def test_minimum_distance_follows_the_pixel_size():
    # Two peaks 7 px apart, the left one higher. 2.5 um is 5 px at 0.5 um/px (both kept) and
    # 10 px at 0.25 um/px (only the higher kept).
    centres = [(20, 20), (20, 27)]
    prob = blobs((40, 48), centres, sigma=1.5, heights=[1.0, 0.8])
    seg = as_seg(prob)
    at_half = postprocess_weak(seg, WeakPostprocConfig(mpp=0.5))
    at_quarter = postprocess_weak(seg, WeakPostprocConfig(mpp=0.25, keep_unseeded=False))
    assert at_half.num_instances == 2
    assert at_quarter.num_instances == 1
    assert at_quarter.instances[20, 20] == 1


def test_watershed_splits_touching_discs_at_the_valley():
    # Two discs of radius 6 touching at column 16; probability peaks at the centres.
    yy, xx = np.mgrid[:24, :33]
    d1 = np.hypot(yy - 12, xx - 10)
    d2 = np.hypot(yy - 12, xx - 22)
    fg = (d1 <= 6) | (d2 <= 6)
    prob = np.where(fg, 0.6 + 0.4 * np.exp(-(np.minimum(d1, d2) ** 2) / 8), 0.1)
    inst = instances_from_points(prob, fg, np.array([[12, 10], [12, 22]]))
    assert set(np.unique(inst)) == {0, 1, 2}
    assert np.array_equal(inst > 0, fg)
    # Every pixel goes to the nearer centre (the relief is symmetric).
    nearer = np.where(d1 < d2, 1, 2)
    off_axis = fg & (np.abs(xx - 16) > 0)
    assert np.array_equal(inst[off_axis], nearer[off_axis])


def test_unseeded_components_and_points_outside_the_mask():
    fg = np.zeros((10, 20), bool)
    fg[2:6, 2:6] = True  # seeded
    fg[2:6, 12:16] = True  # no point
    prob = fg * 0.9
    points = np.array([[3, 3], [8, 8], [-1, 4], [3, 40]])  # 2nd outside fg, 3rd/4th outside image
    kept = instances_from_points(prob, fg, points, keep_unseeded=True)
    assert kept.max() == 2 and np.array_equal(kept > 0, fg)
    assert (kept[2:6, 2:6] == 1).all() and (kept[2:6, 12:16] == 2).all()
    dropped = instances_from_points(prob, fg, points, keep_unseeded=False)
    assert dropped.max() == 1 and (dropped[2:6, 12:16] == 0).all()


def test_postprocess_table_and_segmentation_is_the_argmax():
    seg = np.zeros((12, 16, 2), np.float32)
    seg[..., 0] = 1.0
    seg[2:5, 2:6] = (0.2, 0.8)  # 12 px, mean nucleus probability 0.8
    seg[3, 3] = (0.1, 0.9)  # the peak
    seg[8:10, 10:12] = (0.45, 0.55)  # 4 px: foreground, peak below 0.6 -> unseeded
    seg[0, 15] = (0.5, 0.5)  # a tie is background (argmax: nucleus must be larger)
    res = postprocess_weak(seg, WeakPostprocConfig(peak_threshold=0.6))
    assert res.num_instances == 2
    assert np.array_equal(res.instances > 0, seg[..., 1] > seg[..., 0])
    assert np.array_equal(res.classes, (res.instances > 0).astype(np.int32))
    t = res.table
    assert t["id"].tolist() == [1, 2] and t["class"].tolist() == [1, 1]
    assert t["area"].tolist() == [12, 4]
    np.testing.assert_allclose(t["centroid"], [[3.0, 3.5], [8.5, 10.5]])
    np.testing.assert_allclose(
        t["probabilities"][0], [(11 * 0.2 + 0.1) / 12, (11 * 0.8 + 0.9) / 12]
    )
    np.testing.assert_allclose(t["probabilities"][1], [0.45, 0.55], rtol=1e-6)
    np.testing.assert_allclose(t["solidity"], [1.0, 1.0])
    small = postprocess_weak(seg, WeakPostprocConfig(peak_threshold=0.6, min_size=5))
    assert small.num_instances == 1 and small.table["area"].tolist() == [12]


def test_bad_maps():
    with pytest.raises(ValueError, match="`seg` must be"):
        postprocess_weak(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="`min_distance` must be"):
        detect_nuclei(np.zeros((4, 4)), min_distance=0)


def test_tune_picks_the_best_grid_point():
    # Two peaks 7 px apart, two nuclei: 2.5 um (5 px at 0.5 um/px) finds both, 5 um (10 px) one.
    seg = as_seg(blobs((40, 48), [(20, 20), (20, 27)], sigma=1.5, heights=[1.0, 0.8]))
    calls = []

    def score(instances, classes):
        calls.append(len(instances))
        return -abs(int(instances[0].max()) - 2)

    base = WeakPostprocConfig(mpp=0.5, keep_unseeded=False)
    grid = {"min_distance_um": [5.0, 2.5], "peak_threshold": [0.5, 0.95]}
    best, table = tune_weak_postproc([seg, seg], grid, score, base_config=base)
    assert best == WeakPostprocConfig(mpp=0.5, keep_unseeded=False, min_distance_um=2.5)
    assert [(r["min_distance_um"], r["peak_threshold"]) for r in table] == [
        (5.0, 0.5), (5.0, 0.95), (2.5, 0.5), (2.5, 0.95)
    ]  # fmt: skip
    # 5 um: one nucleus; 0.95: only the top of the higher peak passes -> one nucleus.
    assert [r["score"] for r in table] == [-1, -1, 0, -1]
    assert calls == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="Unknown post-processing setting"):
        tune_weak_postproc([seg], {"threshold": [0.5]}, score)
    with pytest.raises(ValueError, match="non-empty list"):
        tune_weak_postproc([seg], {"peak_threshold": []}, score)
