"""Tests of the ``conic`` post-processing on hand-made maps and a small piece of real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.segmentation import find_boundaries

from kerasnuc.data.dataset import Dataset
from kerasnuc.fileutil import KerasnucError
from kerasnuc.instances import composition_counts
from kerasnuc.postprocess import conic
from kerasnuc.postprocess.common import (
    fill_instance_holes,
    grid_search,
    instance_solidity,
    split_instance_components,
)
from kerasnuc.postprocess.conic import (
    ConicPostprocConfig,
    postprocess_conic,
    tune_conic,
    tune_postproc,
)

BG, INTERIOR, BOUNDARY = 0, 1, 2


def three_from_labels(labels: np.ndarray, high: float = 0.9) -> np.ndarray:
    """One-hot-like three-label softmax: ``high`` on the given label, the rest shared."""
    out = np.full(labels.shape + (3,), (1.0 - high) / 2.0, dtype=np.float32)
    np.put_along_axis(out, labels[..., None].astype(np.intp), high, axis=-1)
    return out


def semantic_from_classes(classes: np.ndarray, num_classes: int, high: float = 0.9) -> np.ndarray:
    out = np.full(classes.shape + (num_classes + 1,), (1.0 - high) / num_classes, np.float32)
    np.put_along_axis(out, classes[..., None].astype(np.intp), high, axis=-1)
    return out


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.indices(shape)
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (hand-rolled, independent of the code)."""
    p = np.pad(mask, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def squares_maps(
    boxes: list[tuple[int, int, int, int, int]], shape=(40, 40), num_classes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Maps with all-interior rectangles ``(r0, r1, c0, c1, class)`` (end exclusive)."""
    labels = np.zeros(shape, np.int32)
    classes = np.zeros(shape, np.int32)
    for r0, r1, c0, c1, cls in boxes:
        labels[r0:r1, c0:c1] = INTERIOR
        classes[r0:r1, c0:c1] = cls
    return semantic_from_classes(classes, num_classes), three_from_labels(labels)


def assert_consecutive(result) -> None:
    ids = np.unique(result.instances)
    ids = ids[ids > 0]
    n = result.num_instances
    np.testing.assert_array_equal(ids, np.arange(1, n + 1))
    np.testing.assert_array_equal(result.table["id"], np.arange(1, n + 1))
    assert result.instances.dtype == np.int32 and result.classes.dtype == np.int32


# --------------------------------------------------------------------------- watershed


def test_two_touching_discs_split_by_boundary_line():
    shape = (40, 64)
    union = disc(shape, (20, 22), 11) | disc(shape, (20, 42), 11)
    line = np.zeros(shape, bool)
    line[:, 32] = True
    labels = np.where(union, INTERIOR, BG)
    labels[outline(union) | (line & union)] = BOUNDARY
    semantic = semantic_from_classes(union.astype(np.int32), 1)
    result = postprocess_conic(semantic, three_from_labels(labels))

    assert result.num_instances == 2
    inst = result.instances
    np.testing.assert_array_equal(inst > 0, union)
    cols = np.indices(shape)[1]
    left = np.unique(inst[union & (cols < 32)])
    right = np.unique(inst[union & (cols > 32)])
    assert left.size == 1 and right.size == 1 and left[0] != right[0]
    assert_consecutive(result)


def test_one_blob_with_two_interior_peaks_is_split_by_watershed():
    shape = (40, 60)
    blob = disc(shape, (20, 20), 12) | disc(shape, (20, 40), 12)
    rows, cols = np.indices(shape)
    nearest = np.minimum(np.hypot(rows - 20, cols - 20), np.hypot(rows - 20, cols - 40))
    interior = np.clip(0.9 - 0.04 * nearest, 0.3, 0.9)
    three = np.zeros(shape + (3,), np.float32)
    three[..., 0] = np.where(blob, 0.05, 0.9)
    three[..., 1] = np.where(blob, interior, 0.05)
    three[..., 2] = 1.0 - three[..., 0] - three[..., 1]
    result = postprocess_conic(None, three, ConicPostprocConfig(seed_threshold=0.6))

    # Seeds: interior > 0.6 <=> within 7.5 px of a centre: two separate discs. The relief rises
    # with the distance to the nearest centre, so the basins meet on the mid column 30.
    assert result.num_instances == 2
    np.testing.assert_array_equal(result.instances > 0, blob)
    left = np.unique(result.instances[blob & (cols < 30)])
    right = np.unique(result.instances[blob & (cols > 30)])
    assert left.size == 1 and right.size == 1 and left[0] != right[0]


def test_boundary_surface_also_separates_touching_discs():
    shape = (40, 64)
    union = disc(shape, (20, 22), 11) | disc(shape, (20, 42), 11)
    labels = np.where(union, INTERIOR, BG)
    labels[outline(union)] = BOUNDARY
    labels[union & (np.indices(shape)[1] == 32)] = BOUNDARY
    result = postprocess_conic(
        None, three_from_labels(labels), ConicPostprocConfig(surface="boundary")
    )
    assert result.num_instances == 2
    np.testing.assert_array_equal(result.instances > 0, union)


# --------------------------------------------------------------------------- seeds


def _two_blobs_one_seed() -> np.ndarray:
    """Blob A (rows 5..14, cols 5..14) with interior 0.8, blob B (cols 25..34) with 0.4."""
    three = np.zeros((20, 40, 3), np.float32)
    three[...] = (0.9, 0.05, 0.05)
    three[5:15, 5:15] = (0.1, 0.8, 0.1)
    three[5:15, 25:35] = (0.1, 0.4, 0.5)
    return three


def test_unseeded_foreground_component_kept_or_dropped():
    three = _two_blobs_one_seed()
    kept = postprocess_conic(None, three, ConicPostprocConfig(seed_threshold=0.5))
    assert kept.num_instances == 2
    assert (kept.instances[5:15, 5:15] == 1).all() and (kept.instances[5:15, 25:35] == 2).all()
    dropped = postprocess_conic(None, three, ConicPostprocConfig(keep_unseeded=False))
    assert dropped.num_instances == 1
    assert (dropped.instances[5:15, 5:15] == 1).all() and (dropped.instances[:, 20:] == 0).all()


def test_flooded_background_merge_is_split_by_connected_components():
    three = _two_blobs_one_seed()
    # Flooding the whole image from the only seed gives both blobs the same id ...
    merged = postprocess_conic(
        None, three, ConicPostprocConfig(flood_background=True, split_components=False)
    )
    assert merged.num_instances == 1
    assert (merged.instances[5:15, 25:35] == 1).all()
    # ... and the connected-components step splits the distant false merge.
    split = postprocess_conic(None, three, ConicPostprocConfig(flood_background=True))
    assert split.num_instances == 2
    assert np.unique(split.instances[5:15, 5:15]).size == 1
    assert np.unique(split.instances[5:15, 25:35]).size == 1
    assert split.instances[7, 7] != split.instances[7, 30]


def test_split_instance_components_by_hand():
    inst = np.zeros((10, 12), np.int32)
    inst[1:3, 1:3] = 7
    inst[6:9, 8:11] = 7  # a distant second piece of instance 7
    inst[1:3, 3:5] = 3  # touches the first piece, different id
    inst[5, 0] = 7
    inst[6, 1] = 7  # only diagonally adjacent to (5, 0)
    out4 = split_instance_components(inst, connectivity=1)
    out8 = split_instance_components(inst, connectivity=2)
    assert out4.dtype == np.int32
    assert out4.max() == 5 and out8.max() == 4
    pieces = [(1, 1), (6, 8), (1, 3)]
    assert len({out4[p] for p in pieces}) == 3
    assert out4[5, 0] != out4[6, 1] and out8[5, 0] == out8[6, 1]
    assert np.unique(out4[6:9, 8:11]).size == 1


def test_seed_min_size_and_erosion_drop_small_seeds():
    three = np.zeros((20, 40, 3), np.float32)
    three[...] = (0.9, 0.05, 0.05)
    three[5:15, 5:15] = (0.1, 0.8, 0.1)  # 100 px seed
    three[5:7, 25:27] = (0.1, 0.8, 0.1)  # 4 px seed
    cfg = ConicPostprocConfig(keep_unseeded=False)
    assert postprocess_conic(None, three, cfg).num_instances == 2
    cfg = ConicPostprocConfig(keep_unseeded=False, seed_min_size=5)
    result = postprocess_conic(None, three, cfg)
    assert result.num_instances == 1 and result.table["area"][0] == 100
    # Erosion with a radius-1 disc removes the 2x2 seed, the 10x10 one survives as 8x8 and
    # the watershed grows it back over its whole foreground blob.
    cfg = ConicPostprocConfig(keep_unseeded=False, seed_erosion=1)
    result = postprocess_conic(None, three, cfg)
    assert result.num_instances == 1 and result.table["area"][0] == 100


def test_per_class_seed_and_foreground_thresholds():
    shape = (20, 60)
    three = np.zeros(shape + (3,), np.float32)
    three[...] = (0.9, 0.05, 0.05)
    classes = np.zeros(shape, np.int32)
    for c0, cls in ((5, 1), (25, 2), (45, 0)):
        three[5:15, c0 : c0 + 10] = (0.1, 0.6, 0.3)
        classes[5:15, c0 : c0 + 10] = cls
    semantic = semantic_from_classes(classes, 2, high=0.8)

    base = postprocess_conic(semantic, three, ConicPostprocConfig(keep_unseeded=False))
    assert base.num_instances == 3
    # Class-2 pixels need interior > 0.7 to seed: blob B loses its seed.
    cfg = ConicPostprocConfig(seed_threshold={2: 0.7}, keep_unseeded=False)
    result = postprocess_conic(semantic, three, cfg)
    assert result.num_instances == 2
    assert (result.instances[5:15, 25:35] == 0).all() and (result.instances[5:15, 5:15] > 0).all()
    # Foreground needs 1 - P(bg) = 0.9 > 0.95 on class-1 pixels: blob A disappears.
    result = postprocess_conic(semantic, three, ConicPostprocConfig(fg_threshold={1: 0.95}))
    assert result.num_instances == 2 and (result.instances[5:15, 5:15] == 0).all()
    # Key 0 applies where the semantic head says background: only blob C disappears.
    result = postprocess_conic(semantic, three, ConicPostprocConfig(fg_threshold=[0.95]))
    assert result.num_instances == 2 and (result.instances[5:15, 45:55] == 0).all()
    assert (result.instances[5:15, 5:15] > 0).all() and (result.instances[5:15, 25:35] > 0).all()


# --------------------------------------------------------------------------- filters


def test_min_and_max_size_per_class():
    semantic, three = squares_maps([(2, 5, 2, 5, 2), (10, 18, 10, 18, 1)])  # 9 px, 64 px
    assert postprocess_conic(semantic, three).num_instances == 2
    result = postprocess_conic(semantic, three, ConicPostprocConfig(min_size=10))
    assert result.num_instances == 1 and result.table["area"].tolist() == [64]
    assert postprocess_conic(semantic, three, ConicPostprocConfig(min_size=9)).num_instances == 2
    result = postprocess_conic(semantic, three, ConicPostprocConfig(max_size=63))
    assert result.table["area"].tolist() == [9]
    assert postprocess_conic(semantic, three, ConicPostprocConfig(max_size=64)).num_instances == 2
    # Class 1 (the 64 px square) needs >= 100 px, class 2 (9 px) needs >= 5 px.
    result = postprocess_conic(semantic, three, ConicPostprocConfig(min_size={1: 100, 2: 5}))
    assert result.table["area"].tolist() == [9] and result.table["class"].tolist() == [2]
    assert_consecutive(result)


def test_low_solidity_c_shape_removed():
    # U shape: 10x10 square minus a 6x8 notch open to the right: area 52, hull = the 10x10
    # square (100 pixel centres) -> solidity 0.52. Next to it a solid 6x6 square.
    labels = np.zeros((16, 30), np.int32)
    labels[3:13, 2:12] = INTERIOR
    labels[5:11, 4:12] = BG
    labels[5:11, 18:24] = INTERIOR
    three = three_from_labels(labels)
    result = postprocess_conic(None, three, ConicPostprocConfig(min_solidity=0.5))
    assert result.num_instances == 2
    np.testing.assert_allclose(sorted(result.table["solidity"]), [0.52, 1.0])
    result = postprocess_conic(None, three, ConicPostprocConfig(min_solidity=0.6))
    assert result.num_instances == 1
    assert result.table["area"].tolist() == [36]
    assert (result.instances[3:13, 2:12] == 0).all()


def test_instance_solidity_by_hand():
    inst = np.zeros((8, 12), np.int32)
    inst[0, 0] = inst[1, 0] = inst[2, 0] = inst[2, 1] = inst[2, 2] = 1  # L: hull triangle
    inst[5, 0:6] = 2  # straight line
    inst[0, 10] = 4  # single pixel
    inst[4:8, 8:12] = 5  # square
    sol = instance_solidity(inst)
    # L: pixel centres in the closed triangle (0,0),(2,0),(2,2) = 6, area 5.
    np.testing.assert_allclose(sol, [0.0, 5 / 6, 1.0, 0.0, 1.0, 1.0])


def test_ring_hole_filled_and_max_hole_size():
    shape = (30, 30)
    outer = disc(shape, (15, 15), 10)
    hole = disc(shape, (15, 15), 4)
    three = three_from_labels(np.where(outer & ~hole, INTERIOR, BG))
    result = postprocess_conic(None, three)
    assert result.num_instances == 1
    np.testing.assert_array_equal(result.instances > 0, outer)
    assert result.table["area"][0] == outer.sum()
    kept = postprocess_conic(None, three, ConicPostprocConfig(max_hole_size=int(hole.sum()) - 1))
    np.testing.assert_array_equal(kept.instances > 0, outer & ~hole)
    off = postprocess_conic(None, three, ConicPostprocConfig(fill_holes=False))
    np.testing.assert_array_equal(off.instances > 0, outer & ~hole)


def test_fill_instance_holes_leaves_shared_and_occupied_holes():
    shape = (30, 30)
    ring = disc(shape, (15, 15), 10) & ~disc(shape, (15, 15), 5)
    cols = np.indices(shape)[1]
    # A ring made of two instances: the hole is enclosed by both -> not filled.
    two = np.where(ring, np.where(cols < 15, 1, 2), 0).astype(np.int32)
    np.testing.assert_array_equal(fill_instance_holes(two), two)
    # A ring around another nucleus: the nucleus is never overwritten, the gap between them
    # touches both instances and stays background.
    nested = np.where(ring, 1, 0).astype(np.int32)
    nested[14:17, 14:17] = 2
    out = fill_instance_holes(nested)
    np.testing.assert_array_equal(out, nested)
    # A 1-pixel hole in a square is filled with the square's id.
    sq = np.zeros((6, 6), np.int32)
    sq[1:5, 1:5] = 3
    sq[2, 2] = 0
    expected = sq.copy()
    expected[2, 2] = 3
    np.testing.assert_array_equal(fill_instance_holes(sq), expected)


# --------------------------------------------------------------------------- classes, table


def test_class_by_summed_softmax_not_pixel_majority():
    three = np.zeros((6, 9, 3), np.float32)
    three[...] = (0.9, 0.05, 0.05)
    three[2:4, 2:7] = (0.05, 0.9, 0.05)  # a 2x5 nucleus: 10 pixels
    semantic = np.zeros((6, 9, 3), np.float32)
    semantic[...] = (0.9, 0.05, 0.05)
    semantic[2:4, 2:5] = (0.1, 0.5, 0.4)  # 6 px, pixel argmax = class 1
    semantic[2:4, 5:7] = (0.1, 0.0, 0.9)  # 4 px, pixel argmax = class 2
    result = postprocess_conic(semantic, three)
    # Majority of pixels says class 1; the sums are 3.0 (class 1) vs 2.4 + 3.6 = 6.0 (class 2).
    assert result.table["class"].tolist() == [2]
    assert (result.classes[2:4, 2:7] == 2).all() and (
        result.classes[result.instances == 0] == 0
    ).all()
    np.testing.assert_allclose(result.table["probabilities"][0], [0.1, 0.3, 0.6], atol=1e-6)


def test_class_ignores_background_channel():
    three = np.zeros((5, 5, 3), np.float32)
    three[...] = (0.9, 0.05, 0.05)
    three[1:4, 1:4] = (0.05, 0.9, 0.05)
    semantic = np.zeros((5, 5, 4), np.float32)
    semantic[...] = (0.6, 0.1, 0.1, 0.2)
    result = postprocess_conic(semantic, three)
    assert result.table["class"].tolist() == [3]


def test_table_area_centroid_and_consecutive_ids_after_removal():
    boxes = [
        (1, 4, 1, 4, 1),  # 9 px, centroid (2, 2)
        (1, 3, 10, 12, 1),  # 4 px -> removed
        (10, 14, 2, 8, 2),  # 24 px, centroid (11.5, 4.5)
        (20, 22, 20, 22, 2),  # 4 px -> removed
        (30, 35, 30, 35, 1),  # 25 px, centroid (32, 32)
    ]
    semantic, three = squares_maps(boxes)
    result = postprocess_conic(semantic, three, ConicPostprocConfig(min_size=5))
    assert_consecutive(result)
    assert result.num_instances == 3
    np.testing.assert_array_equal(result.table["area"], [9, 24, 25])
    np.testing.assert_array_equal(result.table["class"], [1, 2, 1])
    np.testing.assert_allclose(result.table["centroid"], [[2, 2], [11.5, 4.5], [32, 32]])
    np.testing.assert_array_equal(result.table["area"], np.bincount(result.instances.ravel())[1:])
    assert result.table["probabilities"].shape == (3, 3)
    assert result.table["probabilities"].dtype == np.float32


def test_empty_maps_give_empty_output():
    three = three_from_labels(np.zeros((16, 20), np.int32))
    semantic = semantic_from_classes(np.zeros((16, 20), np.int32), 4)
    result = postprocess_conic(semantic, three)
    assert result.num_instances == 0
    assert result.instances.shape == (16, 20) and not result.instances.any()
    assert result.classes.shape == (16, 20) and not result.classes.any()
    assert result.table["probabilities"].shape == (0, 5)
    assert result.table["centroid"].shape == (0, 2)
    for key in ("id", "class", "area", "solidity"):
        assert result.table[key].shape == (0,)
    counts = composition_counts(result.instances, result.classes, 4, crop=None)
    np.testing.assert_array_equal(counts, [0, 0, 0, 0])


def test_class_agnostic_run_and_timings():
    semantic, three = squares_maps([(2, 6, 2, 6, 1)])
    timings: dict[str, float] = {}
    result = postprocess_conic(None, three, timings=timings)
    assert result.table["class"].tolist() == [1]
    assert result.table["probabilities"].shape == (1, 2)
    assert {"thresholds", "seeds", "watershed", "split", "fill_holes", "select"} <= set(timings)


def test_input_checks():
    three = three_from_labels(np.zeros((8, 8), np.int32))
    with pytest.raises(ValueError, match="three_label"):
        postprocess_conic(None, three[..., :2])
    with pytest.raises(ValueError, match="same height and width"):
        postprocess_conic(np.zeros((8, 9, 3), np.float32), three)
    with pytest.raises(ValueError, match="semantic"):
        postprocess_conic(np.zeros((8, 8, 1), np.float32), three)
    with pytest.raises(ValueError, match="class id"):
        postprocess_conic(
            semantic_from_classes(np.zeros((8, 8), np.int32), 2),
            three,
            ConicPostprocConfig(min_size={5: 10}),
        )


# --------------------------------------------------------------------------- composition


def test_composition_counts_central_crop_by_hand():
    inst = np.zeros((256, 256), np.int32)
    cls = np.zeros((256, 256), np.int32)
    boxes = [
        (1, 1, 100, 111, 100, 111),  # inside
        (2, 2, 10, 21, 50, 61),  # rows 16..20 inside the crop (rows 16..239)
        (3, 2, 0, 16, 100, 111),  # rows 0..15: outside
        (4, 3, 240, 251, 120, 126),  # rows 240..250: outside
        (5, 3, 239, 246, 239, 246),  # pixel (239, 239) inside
        (6, 1, 128, 131, 0, 17),  # col 16 inside
    ]
    for i, c, r0, r1, c0, c1 in boxes:
        inst[r0:r1, c0:c1] = i
        cls[r0:r1, c0:c1] = c
    np.testing.assert_array_equal(composition_counts(inst, cls, 4), [2, 1, 1, 0])
    np.testing.assert_array_equal(composition_counts(inst, cls, 4, crop=None), [2, 2, 2, 0])
    assert composition_counts(inst, cls, 4).dtype == np.int64
    bad = cls.copy()
    bad[100, 100] = 2
    with pytest.raises(ValueError, match="single class"):
        composition_counts(inst, bad, 4)
    with pytest.raises(ValueError, match="crop"):
        composition_counts(inst, cls, 4, crop=300)


# --------------------------------------------------------------------------- config


def test_config_json_round_trip_and_per_class_forms(tmp_path):
    cfg = ConicPostprocConfig(
        fg_threshold=[0.4, 0.5, 0.6],
        seed_threshold={"2": 0.7},
        min_size={1: 10, 2: 30},
        max_size={1: 500, 2: None},
        min_solidity=0.8,
        max_hole_size=40,
        surface="boundary",
    )
    assert cfg.fg_threshold == {0: 0.4, 1: 0.5, 2: 0.6}
    assert cfg.seed_threshold == {2: 0.7}
    data = cfg.to_dict()
    assert data["min_size"] == {"1": 10, "2": 30} and data["max_size"] == {"1": 500, "2": None}
    again = ConicPostprocConfig.from_dict(json.loads(json.dumps(data)))
    assert again == cfg and hash(again) == hash(cfg)
    assert ConicPostprocConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "postproc.json")
    assert ConicPostprocConfig.load(tmp_path / "postproc.json") == cfg
    assert ConicPostprocConfig.from_dict({}) == ConicPostprocConfig()


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="fg_threshold"):
        ConicPostprocConfig(fg_threshold=1.5)
    with pytest.raises(ValueError, match="min_size"):
        ConicPostprocConfig(min_size={1: -3})
    with pytest.raises(ValueError, match="min_size"):
        ConicPostprocConfig(min_size=2.5)
    with pytest.raises(ValueError, match="keys must be class ids"):
        ConicPostprocConfig(seed_threshold={"a": 0.5})
    with pytest.raises(ValueError, match="surface"):
        ConicPostprocConfig(surface="distance")
    with pytest.raises(ValueError, match="connectivity"):
        ConicPostprocConfig(connectivity=3)
    with pytest.raises(ValueError, match="Unknown"):
        ConicPostprocConfig.from_dict({"fg_thresh": 0.5})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KerasnucError, match="bad.json"):
        ConicPostprocConfig.load(tmp_path / "bad.json")


# --------------------------------------------------------------------------- tuning


def _count_score(pred_inst, pred_cls, gt_inst, gt_cls) -> float:
    return -abs(int(pred_inst.max()) - int(gt_inst.max()))


def _tuning_data():
    maps, gts = [], []
    for offset in (0, 5):
        semantic, three = squares_maps(
            [(5 + offset, 13 + offset, 5, 13, 1), (30, 32, 30 - offset, 32 - offset, 1)]
        )
        gt = np.zeros((40, 40), np.int32)
        gt[5 + offset : 13 + offset, 5:13] = 1
        maps.append((semantic, three))
        gts.append((gt, (gt > 0).astype(np.int32)))
    return maps, gts


def test_tune_postproc_picks_best_and_caches(monkeypatch):
    maps, gts = _tuning_data()
    calls = {"pixel": 0, "refine": 0}
    pixel_stage, refine_stage = conic._pixel_stage, conic.refine_stage

    def counting_pixel(*args, **kwargs):
        calls["pixel"] += 1
        return pixel_stage(*args, **kwargs)

    def counting_refine(*args, **kwargs):
        calls["refine"] += 1
        return refine_stage(*args, **kwargs)

    monkeypatch.setattr(conic, "_pixel_stage", counting_pixel)
    monkeypatch.setattr(conic, "refine_stage", counting_refine)
    best, table = tune_postproc(maps, gts, {"min_size": [0, 5, 100]}, _count_score)
    # Predictions: 2 nuclei (min 0), 1 (min 5: the 4 px square goes), 0 (min 100); GT has 1.
    assert [row["score"] for row in table] == [-1.0, 0.0, -1.0]
    assert [row["min_size"] for row in table] == [0, 5, 100]
    assert best == ConicPostprocConfig(min_size=5)
    assert calls == {"pixel": 2, "refine": 2}  # once per image, shared by the 3 configs

    calls.update(pixel=0, refine=0)
    grid = {"seed_threshold": [0.5, 0.95], "fill_holes": [True, False], "min_size": [0, 5]}
    best, table = tune_postproc(maps, gts, grid, _count_score)
    assert len(table) == 8
    assert calls == {"pixel": 4, "refine": 8}
    # Seed threshold 0.95 > 0.9 leaves no seed, but the blobs stay as unseeded components.
    assert best.min_size == 5 and best.seed_threshold == 0.5


def test_tune_postproc_batched_score():
    maps, gts = _tuning_data()
    seen = []

    def batch_score(pred_insts, pred_clss, gt_insts, gt_clss):
        seen.append(len(pred_insts))
        assert len(pred_clss) == len(gt_insts) == len(gt_clss) == 2
        return -sum(
            abs(int(p.max()) - int(g.max())) for p, g in zip(pred_insts, gt_insts, strict=True)
        )

    best, table = tune_postproc(
        maps,
        gts,
        {"min_size": [0, 5]},
        batch_score,
        base_config=ConicPostprocConfig(max_size=1000),
        batched=True,
    )
    assert seen == [2, 2]
    assert [row["score"] for row in table] == [-2.0, 0.0]
    assert best == ConicPostprocConfig(min_size=5, max_size=1000)
    with pytest.raises(ValueError, match="unknown setting"):
        tune_postproc(maps, gts, {"min_area": [1]}, _count_score)


def test_staged_grid_search_equals_the_plain_one():
    """The stages share results but score exactly what postprocess_conic gives per config."""
    maps, gts = _tuning_data()
    grid = {"fg_threshold": [0.3, 0.6], "seed_threshold": [0.5, 0.95], "min_size": [0, 5]}

    def score(pred_insts, pred_clss):
        return -float(sum(abs(int(p.max()) - 1) for p in pred_insts))

    staged, staged_table = tune_conic(maps, grid, score)
    plain, plain_table = grid_search(
        maps, grid, lambda m, c: postprocess_conic(m[0], m[1], c), ConicPostprocConfig(), score
    )
    assert staged_table == plain_table and staged == plain
    assert len({row["score"] for row in plain_table}) > 1  # the grid matters


# --------------------------------------------------------------------------- real data


def test_consep_ground_truth_maps_are_recovered(shared_data):
    ds = Dataset(shared_data / "consep")
    image_id = max(ds.split("val")[:10], key=lambda i: int(ds.instances(i).max()))
    gt = ds.instances(image_id)
    gt_cls = ds.classes(image_id)
    fg = gt > 0
    labels = np.where(fg, INTERIOR, BG)
    labels[fg & find_boundaries(gt, mode="inner")] = BOUNDARY
    semantic = semantic_from_classes(gt_cls, ds.num_classes)
    result = postprocess_conic(semantic, three_from_labels(labels))

    both = fg & (result.instances > 0)
    pairs, inter = np.unique(
        np.stack([result.instances[both], gt[both]]), axis=1, return_counts=True
    )
    area_p = np.bincount(result.instances.ravel())
    area_g = np.bincount(gt.ravel())
    iou = inter / (area_p[pairs[0]] + area_g[pairs[1]] - inter)
    hit = iou > 0.5
    n_gt = int(gt.max())
    assert n_gt > 20
    assert hit.sum() >= 0.9 * n_gt
    assert result.num_instances <= 1.1 * n_gt
    gt_class_of = np.zeros(n_gt + 1, np.int64)
    gt_class_of[gt.ravel()] = gt_cls.ravel()
    pred_class_of = np.concatenate([[0], result.table["class"]])
    np.testing.assert_array_equal(pred_class_of[pairs[0][hit]], gt_class_of[pairs[1][hit]])
