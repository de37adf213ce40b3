"""Tiling, stitching, streaming, resolution handling and resuming (kerasnuc.inference.tiling)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from kerasnuc.data.dataset import Dataset
from kerasnuc.fileutil import KerasnucError
from kerasnuc.inference.tiling import (
    ResumableSink,
    StitchSink,
    balanced_tile_size,
    make_grid,
    predict_streaming,
    predict_tiled,
    select_tiles,
    tile_instances,
    tile_plan,
)
from kerasnuc.io.readers import ArraySource, ImageSource, TiffSource
from kerasnuc.metrics import pair_stats, panoptic_quality

# --- fake predictors ------------------------------------------------------------------------


def encode_ids(inst: np.ndarray) -> np.ndarray:
    """Instance ids written into the pixels (24 bits over R, G, B); white = id 0xFFFFFF."""
    v = inst.astype(np.uint32)
    return np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], axis=-1).astype(np.uint8)


def decode_ids(tiles: np.ndarray) -> list:
    """The exact inverse of :func:`encode_ids`; white padding reads as background."""
    v = tiles.astype(np.int64)
    ids = (v[..., 0] << 16) | (v[..., 1] << 8) | v[..., 2]
    ids[ids == 0xFFFFFF] = 0
    return [(m, None, None) for m in ids]


H_VECTOR = np.array([0.65, 0.70, 0.29], dtype=np.float32) / np.float32(
    np.linalg.norm([0.65, 0.70, 0.29])
)


def haematoxylin_label(tiles: np.ndarray, max_side: int = 48) -> list:
    """Optical density along the Ruifrok haematoxylin vector > 0.9, connected components.

    Components whose bounding box exceeds ``max_side`` are dropped, so that every kept object
    fits in a 64 px margin (the tiling assumption).
    """
    out = []
    for tile in tiles:
        od = -np.log((tile.astype(np.float32) + 1.0) / 256.0)
        mask = (od @ H_VECTOR > 0.9).astype(np.uint8)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        keep = (stats[:, 2] <= max_side) & (stats[:, 3] <= max_side) & (stats[:, 4] >= 10)
        keep[0] = False
        out.append(np.where(keep, np.arange(n), 0).astype(np.int32)[lab])
    return out


def dark_label(tiles: np.ndarray) -> list:
    """Pixels darker than 128 (mean of RGB), 8-connected components."""
    out = []
    for tile in tiles:
        mask = (tile.mean(axis=2) < 128).astype(np.uint8)
        out.append(cv2.connectedComponents(mask, connectivity=8)[1].astype(np.int32))
    return out


def disc_image(shape, radius, spacing, seed, colour=(40, 20, 90)):
    """White image with dark discs on a jittered grid; returns (image, centres (N, 2))."""
    rng = np.random.default_rng(seed)
    height, width = shape
    ys = np.arange(spacing // 2, height - radius, spacing)
    xs = np.arange(spacing // 2, width - radius, spacing)
    centres = np.array([(y, x) for y in ys for x in xs], dtype=np.float64)
    jitter = rng.integers(-(spacing // 4), spacing // 4 + 1, size=centres.shape)
    centres = np.clip(centres + jitter, radius, [height - radius - 1, width - radius - 1])
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    rr, cc = np.mgrid[0:height, 0:width]
    for cy, cx in centres:
        image[(rr - cy) ** 2 + (cc - cx) ** 2 <= radius**2] = colour
    return image, centres


def same_instances(a: np.ndarray, b: np.ndarray) -> bool:
    """Identical partitions up to the ids: every instance matches one with IoU 1."""
    stats = pair_stats(a, b)
    ious = stats.pair_inter / (
        stats.gt_areas[stats.pair_gt] + stats.pred_areas[stats.pair_pred] - stats.pair_inter
    )
    return stats.n_gt == stats.n_pred == stats.pair_inter.size and bool(np.all(ious == 1.0))


# --- grid geometry ---------------------------------------------------------------------------


class PyramidStub(ImageSource):
    """Level shapes and mpp only (no pixels), for grid arithmetic."""

    def __init__(self, shapes, mpp):
        self.name = "stub"
        self.mpp = mpp
        self._init_levels(shapes)


def test_grid_without_resampling():
    grid = make_grid(ArraySource(np.zeros((1000, 700, 3), np.uint8)), tile_size=256, margin=64)
    assert (grid.core, grid.rows, grid.cols, grid.n_tiles) == (128, 8, 6, 48)
    assert (grid.read_size, grid.read_margin, grid.level, grid.resampled) == (256, 64, 0, False)
    # Tile 7 = row 1, col 1: core starts at (128, 128), read window 64 px earlier.
    assert grid.origin(7) == (64, 64)
    np.testing.assert_array_equal(grid.core_boxes()[7], [128, 128, 256, 256])


def test_grid_resamples_to_model_resolution():
    # Input 0.5 um/px, model 0.25 um/px: 2 model px per input px, so half-size windows.
    src = PyramidStub([(1000, 1000)], mpp=0.5)
    grid = make_grid(src, tile_size=256, margin=64, target_mpp=0.25)
    assert (grid.level, grid.read_margin, grid.core, grid.read_size) == (0, 32, 64, 128)
    # Within the 5 % tolerance nothing is resampled.
    grid = make_grid(PyramidStub([(1000, 1000)], mpp=0.26), 256, 64, target_mpp=0.25)
    assert not grid.resampled


def test_grid_picks_pyramid_level():
    src = PyramidStub([(4000, 4000), (1000, 1000)], mpp=0.25)
    # Model at 1 um/px: level 1 (4x) matches exactly.
    grid = make_grid(src, 512, 64, target_mpp=1.0)
    assert (grid.level, grid.downsample, grid.read_size) == (1, 4.0, 512)
    # Model at 0.5 um/px: level 1 is too coarse; level 0 read at double size.
    grid = make_grid(src, 512, 64, target_mpp=0.5)
    assert (grid.level, grid.read_margin, grid.core, grid.read_size) == (0, 128, 768, 1024)


def test_grid_argument_checks():
    src = ArraySource(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="tile_size` must exceed 2"):
        make_grid(src, tile_size=128, margin=64)
    with pytest.raises(ValueError, match="`margin` must be an int >= 0"):
        make_grid(src, tile_size=128, margin=-1)
    with pytest.raises(ValueError, match="target_mpp"):
        make_grid(src, target_mpp=-0.25)


def test_select_tiles_with_mask():
    grid = make_grid(ArraySource(np.zeros((400, 400, 3), np.uint8)), tile_size=200, margin=50)
    # 4 x 4 tiles of 100 px cores; a mask at half scale with tissue in image pixels 250..299
    # (rows) and 0..49 (cols) touches only the core of tile (2, 0).
    mask = np.zeros((200, 200), bool)
    mask[125:150, 0:25] = True
    np.testing.assert_array_equal(select_tiles(grid, mask), [8])
    np.testing.assert_array_equal(select_tiles(grid, None), np.arange(16))


# --- tiled == untiled ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "tile_size", "margin", "scale", "expected"),
    [
        # 1000 px in cores of 384: 3 cores, ceil(1000 / 3) = 334 suffice -> 334 + 128
        ((1000, 1000), 512, 64, 1.0, 462),
        ((1000, 1000), 1152, 64, 1.0, 1128),  # one core of 1000
        ((1000, 700), 256, 64, 1.0, 253),  # rows: 8 cores of 125; cols: 6 of 117
        ((500, 500), 1152, 64, 2.0, 1128),  # 0.5 um/px input for a 0.25 um/px model
        ((50, 30), 512, 64, 1.0, 178),  # smaller than a tile: the image plus its margins
        ((5000, 5000), 1152, 64, 1.0, 1128),  # 5 cores of 1000
    ],
)
def test_balanced_tile_size(shape, tile_size, margin, scale, expected):
    assert balanced_tile_size(shape, tile_size, margin, scale) == expected


@pytest.mark.parametrize(
    ("shape", "tile_size", "margin", "scale", "expected"),
    [
        ((1000, 1000), 1152, 64, 1.0, (1000, 0)),  # fits: the image itself, no margin
        ((256, 320), 1152, 64, 1.0, (320, 0)),  # non-square: its longer side
        ((1152, 10), 1152, 64, 1.0, (1152, 0)),  # exactly one tile
        # 1000 x 1200 model px: 1200 > 1152, so balanced tiles: 1 x 2 cores of 1024, one core
        # of 1000 rows suffices -> 1000 + 2 * 64
        ((500, 600), 1152, 64, 2.0, (1128, 64)),
        ((500, 400), 1152, 64, 2.0, (1000, 0)),  # 0.5 um/px input: 1000 x 800 model px
        ((1000, 1000), 512, 64, 1.0, (462, 64)),  # too large: balanced_tile_size
        ((5000, 5000), 1152, 64, 1.0, (1128, 64)),
    ],
)
def test_tile_plan(shape, tile_size, margin, scale, expected):
    assert tile_plan(shape, tile_size, margin, scale) == expected


def test_single_tile_plan_shows_the_model_the_image_and_gives_every_nucleus(shared_data):
    """An image that fits: one call with the image itself (not squared with its mirror image),
    and exactly the GT nuclei, those cut by the image border included."""
    gt = Dataset(shared_data / "monuseg_kumar").instances("TCGA-44-2665-01B-06-BS6")[:300, :420]
    image = encode_ids(gt)
    tile_size, margin = tile_plan(gt.shape, 1152, 64)
    calls = []

    def recording(tiles):
        calls.append(tiles.copy())
        return decode_ids(tiles)

    result = predict_tiled(image, recording, tile_size=tile_size, margin=margin)
    assert tile_size == 420 and margin == 0
    assert [c.shape for c in calls] == [(1, 300, 420, 3)]
    np.testing.assert_array_equal(calls[0][0], image)
    assert same_instances(gt, result.instances)


def test_single_resampled_tile_is_the_image_at_the_model_resolution():
    """A 100 x 150 image at 0.5 um/px for a 0.25 um/px model: one 300 px tile without margin,
    of which 200 x 300 model pixels show the image; predict_fn gets exactly those, and a nucleus
    at model rows 20-39 / cols 30-59 comes back at input rows 10-19 / cols 15-29."""
    image = np.full((100, 150, 3), 200, np.uint8)
    tile_size, margin = tile_plan(image.shape[:2], 1152, 64, scale=2.0)
    assert (tile_size, margin) == (300, 0)
    calls = []

    def one_nucleus(tiles):
        calls.append(tiles.shape)
        inst = np.zeros(tiles.shape[1:3], np.int32)
        inst[20:40, 30:60] = 7
        return [inst]

    result = predict_tiled(
        image, one_nucleus, tile_size=tile_size, margin=margin, target_mpp=0.25, mpp=0.5
    )
    assert calls == [(1, 200, 300, 3)]
    expected = np.zeros((100, 150), np.int32)
    expected[10:20, 15:30] = 1
    np.testing.assert_array_equal(result.instances, expected)


def test_whole_image_predict_fn_must_return_the_image_shape():
    image = np.full((64, 96, 3), 200, np.uint8)
    with pytest.raises(ValueError, match=r"must return \(64, 96\) instance maps"):
        predict_tiled(image, lambda tiles: [np.zeros((96, 96), np.int32)], tile_size=96, margin=0)


def test_balanced_tiles_give_the_same_nuclei(shared_data):
    """GT ids encoded in the pixels: balanced and full-size tiles both give exactly the GT."""
    gt = Dataset(shared_data / "monuseg_kumar").instances("TCGA-44-2665-01B-06-BS6")
    tile = balanced_tile_size(gt.shape, 512, 64)
    assert tile < 512
    full = predict_tiled(encode_ids(gt), decode_ids, tile_size=512, margin=64)
    balanced = predict_tiled(encode_ids(gt), decode_ids, tile_size=tile, margin=64)
    assert same_instances(full.instances, balanced.instances)
    assert same_instances(gt, balanced.instances)


@pytest.mark.parametrize(("tile_size", "margin"), [(256, 64), (200, 70)])
def test_tiled_equals_untiled_ground_truth(shared_data, tile_size, margin):
    """GT ids encoded in the pixels: every tile's prediction is exactly the GT crop."""
    gt = Dataset(shared_data / "monuseg_kumar").instances("TCGA-44-2665-01B-06-BS6")
    sides = [max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in ndi.find_objects(gt)]
    assert max(sides) <= margin  # precondition: the largest nucleus fits in the margin
    result = predict_tiled(encode_ids(gt), decode_ids, tile_size=tile_size, margin=margin)
    n_gt = len(np.unique(gt)) - 1
    assert result.instances.max() == n_gt == result.table["id"].size
    assert same_instances(gt, result.instances)
    assert panoptic_quality(gt, result.instances).pq == 1.0


def test_tiled_matches_untiled_haematoxylin_threshold(shared_data):
    image = Dataset(shared_data / "monuseg_kumar").image("TCGA-21-5784-01Z-00-DX1")
    untiled = haematoxylin_label(image[None])[0]
    tiled = predict_tiled(image, haematoxylin_label, tile_size=256, margin=64).instances
    n_untiled = len(np.unique(untiled)) - 1
    n_tiled = int(tiled.max())
    assert n_untiled > 300
    # Away from the image border the tiles agree with the whole image exactly; at the border the
    # tiles see the image mirrored (read_tile), where this predictor's size filter drops some
    # nuclei merged with their mirror image that the unpadded whole image keeps.
    inner = (slice(64, -64), slice(64, -64))
    assert panoptic_quality(untiled[inner], tiled[inner]).pq >= 0.999
    assert abs(n_tiled - n_untiled) <= 0.01 * n_untiled
    assert panoptic_quality(untiled, tiled).pq >= 0.98


def test_image_smaller_than_tile_is_mirrored():
    image, _ = disc_image((90, 70), radius=5, spacing=20, seed=1)
    seen = []

    def predict(tiles):
        seen.append(tiles.copy())
        return dark_label(tiles)

    result = predict_tiled(image, predict, tile_size=256, margin=64)
    assert result.instances.shape == (90, 70)
    assert len(seen) == 1 and seen[0].shape == (1, 256, 256, 3)
    # The image sits at (64, 64) in the single tile; around it, the image mirrored at its
    # borders (repeatedly where the tile is more than twice as large): row 63 = row 0,
    # row 0 = row 63, row 154 = row 89 (the last), column 134 = column 69, column 204 = 0.
    tile = seen[0][0]
    np.testing.assert_array_equal(tile[64:154, 64:134], image)
    np.testing.assert_array_equal(tile[63, 64:134], image[0])
    np.testing.assert_array_equal(tile[0, 64:134], image[63])
    np.testing.assert_array_equal(tile[154, 64:134], image[89])
    np.testing.assert_array_equal(tile[64:154, 134], image[:, 69])
    np.testing.assert_array_equal(tile[64:154, 204], image[:, 0])
    # Mirrored nuclei outside the image are not part of the result.
    assert same_instances(dark_label(image[None])[0], result.instances)


def test_mirror_slivers_are_dropped_border_nuclei_kept():
    # One 36 px tile over a 20 x 20 image (margin 8): tile pixel (u, v) is image pixel
    # (u - 8, v - 8); tile rows/columns 0..7 and 28..35 are mirrored context.
    tile = np.zeros((36, 36), np.int32)
    tile[0:8, 10:16] = 1  # 48 px in the context above the image ...
    tile[8, 11:13] = 1  # ... and 2 px reaching into it: a mirror image's sliver (4 %)
    tile[12:20, 4:12] = 2  # a nucleus cut by the left border: 32 of 64 px inside (50 %)
    tile[14:30, 14:24] = 3  # a nucleus cut by the bottom border: 140 of 160 px inside
    tile[20:23, 26:32] = 4  # 6 of 18 px inside (33 %): kept, above a quarter
    tile[30:36, 30:36] = 5  # entirely in the context: its centroid is outside the core
    result = predict_tiled(
        np.full((20, 20, 3), 200, np.uint8), lambda t: [tile] * len(t), tile_size=36, margin=8
    )
    want = np.zeros((20, 20), np.int32)
    want[4:12, 0:4] = 1
    want[6:20, 6:16] = 2
    want[12:15, 18:20] = 3
    np.testing.assert_array_equal(result.instances, want)
    assert result.table["area"].tolist() == [32, 140, 6]


# --- streamed instance records ---------------------------------------------------------------


def test_streamed_instances_geometry_class_and_table():
    image, centres = disc_image((300, 260), radius=6, spacing=30, seed=2)
    disc_area = int(((np.mgrid[-6:7, -6:7] ** 2).sum(axis=0) <= 36).sum())  # 113 pixels

    def predict(tiles):
        out = []
        for lab in dark_label(tiles):
            ids = np.unique(lab)[1:]
            area = np.bincount(lab.ravel())[ids]
            # Table rows in reverse id order: rows are matched through the "id" column.
            table = {"id": ids[::-1], "class": np.full(ids.size, 3), "score": area[::-1] * 0.5}
            out.append((lab, None, table))
        return out

    received = []

    class Collect:
        closed = False

        def on_tile(self, instances):
            received.append(instances)

        def close(self):
            self.closed = True

    sink = Collect()
    summary = predict_streaming(image, predict, sink, tile_size=96, margin=16, tissue=False)
    assert sink.closed
    grid = summary.grid
    assert len(received) == grid.n_tiles == summary.n_processed
    flat = [inst for tile in received for inst in tile]
    assert [inst["id"] for inst in flat] == list(range(1, len(centres) + 1))
    assert summary.n_instances == len(centres)
    found = np.array([inst["centroid"] for inst in flat])
    order = np.lexsort((found[:, 1], found[:, 0]))
    expected = centres[np.lexsort((centres[:, 1], centres[:, 0]))]
    np.testing.assert_allclose(found[order], expected, atol=1e-9)
    boxes = grid.core_boxes()
    for inst in flat:
        y0, x0, y1, x1 = inst["bbox"]
        cy, cx = inst["centroid"]
        assert (y1 - y0, x1 - x0) == (13, 13) and (y0, x0) == (cy - 6, cx - 6)
        assert inst["mask"].shape == (13, 13) and inst["area"] == disc_area
        assert inst["class"] == 3 and inst["table"] == {"score": disc_area * 0.5}
        # Owned by its tile: centroid in the core extended by the seam tolerance (16 // 8).
        by0, bx0, by1, bx1 = boxes[inst["tile"]]
        assert by0 - 2 <= cy < by1 + 2 and bx0 - 2 <= cx < bx1 + 2
        dist = np.hypot(inst["contour"][:, 1] - cy, inst["contour"][:, 0] - cx)
        assert np.all(np.abs(dist - 6) <= 1.0)


def test_majority_class_without_table():
    grid = make_grid(ArraySource(np.zeros((64, 64, 3), np.uint8)), tile_size=64, margin=0)
    inst = np.zeros((64, 64), np.int32)
    inst[10:20, 10:20] = 5
    classes = np.zeros((64, 64), np.int32)
    classes[10:20, 10:20] = 2
    classes[10:13, 10:20] = 4  # 30 pixels of class 4, 70 of class 2
    out = tile_instances((inst, classes, None), grid, 0, first_id=7)
    assert len(out) == 1 and out[0]["id"] == 7 and out[0]["class"] == 2
    assert out[0]["bbox"] == (10, 10, 20, 20) and out[0]["area"] == 100


def test_predict_fn_contract_errors():
    image = np.full((64, 64, 3), 255, np.uint8)
    with pytest.raises(ValueError, match="one result per tile"):
        predict_tiled(image, lambda t: [], tile_size=64, margin=0)
    with pytest.raises(ValueError, match="integer instance maps"):
        predict_tiled(image, lambda t: [np.zeros((32, 32), np.int32)], tile_size=64, margin=0)


def test_progress_reports_every_batch():
    image, _ = disc_image((200, 200), radius=4, spacing=25, seed=3)
    calls = []
    predict_tiled(
        image,
        dark_label,
        tile_size=64,
        margin=12,
        batch_size=3,
        progress=lambda d, t: calls.append((d, t)),
    )
    # 200 / 40 = 5 x 5 = 25 tiles in batches of 3: 0, 3, 6, ..., 24, 25.
    assert calls == [(0, 25)] + [(min(25, 3 * b), 25) for b in range(1, 10)]


def test_tissue_mask_skips_background_tiles():
    image, _ = disc_image((256, 256), radius=4, spacing=20, seed=4)
    mask = np.zeros((64, 64), bool)
    mask[:16, :16] = True  # image pixels 0..63, i.e. the core of tile 0 only
    counted = []

    def predict(tiles):
        counted.append(len(tiles))
        return dark_label(tiles)

    sink = StitchSink((256, 256))
    summary = predict_streaming(
        image, predict, sink, tile_size=96, margin=16, tissue=mask, batch_size=1
    )
    assert summary.grid.n_tiles == 16 and summary.n_selected == 1 and sum(counted) == 1
    ys, xs = np.nonzero(sink.result().instances)
    assert ys.max() < 64 + 16 and xs.max() < 64 + 16


# --- resolution --------------------------------------------------------------------------------


def test_upsampled_for_a_finer_model_and_mapped_back():
    # Input 0.5 um/px, model 0.25 um/px: the model sees discs of radius ~10 instead of 5.
    image, centres = disc_image((240, 240), radius=5, spacing=30, seed=5)
    model_areas = []

    def predict(tiles):
        labs = dark_label(tiles)
        for lab in labs:
            model_areas.extend(np.bincount(lab.ravel())[1:].tolist())
        return labs

    result = predict_tiled(
        image, predict, tile_size=128, margin=32, target_mpp=0.25, mpp=0.5, batch_size=2
    )
    direct = dark_label(image[None])[0]
    assert result.instances.shape == (240, 240)
    assert result.instances.max() == len(centres)
    assert 3.5 < np.median(model_areas) / np.median(np.bincount(direct.ravel())[1:]) < 4.5
    assert panoptic_quality(direct, result.instances).pq > 0.93
    found = result.table["centroid"]
    dist = np.hypot(*(found[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))
    assert np.all(dist.min(axis=1) < 0.5)


def test_downsampled_for_a_coarser_model_and_mapped_back():
    # Input 0.25 um/px, model 0.5 um/px: discs of radius 8 become radius 4 for the model.
    image, centres = disc_image((240, 240), radius=8, spacing=40, seed=5)
    seen = []

    def predict(tiles):
        seen.append(tiles.shape)
        return dark_label(tiles)

    result = predict_tiled(image, predict, tile_size=128, margin=32, target_mpp=0.5, mpp=0.25)
    # Cores of 64 model px = 128 input px: 2 x 2 tiles read as 256 px, given as 128 px.
    assert seen == [(4, 128, 128, 3)]
    assert result.instances.shape == (240, 240)
    assert result.instances.max() == len(centres)
    direct = dark_label(image[None])[0]
    assert panoptic_quality(direct, result.instances).pq > 0.85
    found = result.table["centroid"]
    dist = np.hypot(*(found[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))
    assert np.all(dist.min(axis=1) < 0.5)


def test_pyramid_level_read_and_mapped_to_level0(tmp_path):
    # Level 0 at 0.25 um/px with discs of radius 8; model at 0.5 um/px reads level 1 (2x).
    image, centres = disc_image((512, 512), radius=8, spacing=48, seed=6)
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            image,
            tile=(64, 64),
            subifds=1,
            photometric="rgb",
            resolution=(4e4, 4e4),
            resolutionunit="CENTIMETER",
        )
        half = cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA)
        tw.write(half, tile=(64, 64), subfiletype=1, photometric="rgb")
    with TiffSource(path) as src:
        assert src.mpp == pytest.approx(0.25) and src.level_downsamples == [1.0, 2.0]
        result = predict_tiled(src, dark_label, tile_size=128, margin=32, target_mpp=0.5)
    assert result.instances.shape == (512, 512)
    assert result.instances.max() == len(centres)
    found = result.table["centroid"]
    dist = np.hypot(*(found[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))
    assert np.all(dist.min(axis=1) < 1.0)
    disc = np.pi * 8**2
    assert np.all(np.abs(result.table["area"] - disc) < 0.2 * disc)


def test_streaming_from_tiff_path_equals_array(tmp_path):
    image, _ = disc_image((300, 330), radius=5, spacing=24, seed=7)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, image, tile=(48, 48), photometric="rgb", compression="zlib")
    from_file = predict_tiled(path, dark_label, tile_size=96, margin=16)
    from_array = predict_tiled(image, dark_label, tile_size=96, margin=16)
    np.testing.assert_array_equal(from_file.instances, from_array.instances)


# --- resuming -----------------------------------------------------------------------------------


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    image, _ = disc_image((320, 320), radius=5, spacing=22, seed=8)
    options = {"tile_size": 96, "margin": 16, "batch_size": 4, "tissue": False}
    reference = predict_tiled(image, dark_label, **{k: options[k] for k in options})
    ckpt = tmp_path / "run.ckpt.json"
    work = tmp_path / "parts"
    calls = []

    def failing(tiles):
        calls.append(len(tiles))
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return dark_label(tiles)

    first = StitchSink((320, 320))
    with pytest.raises(RuntimeError, match="interrupted"):
        predict_streaming(
            image, failing, ResumableSink(work, first), checkpoint=ckpt, contours=True, **options
        )
    saved = json.loads(ckpt.read_text())
    assert saved["done"] == [[0, 8]] and saved["complete"] is False
    assert len(list(work.glob("tile_*.npz"))) > 0

    calls.clear()
    final = StitchSink((320, 320))
    summary = predict_streaming(
        image,
        lambda t: calls.append(len(t)) or dark_label(t),
        ResumableSink(work, final),
        checkpoint=ckpt,
        **options,
    )
    # 320 / 64 = 5 x 5 = 25 tiles; 8 were done, 17 remain.
    assert (summary.n_resumed, summary.n_processed, sum(calls)) == (8, 17, 17)
    out = final.result()
    np.testing.assert_array_equal(out.instances, reference.instances)
    np.testing.assert_allclose(out.table["centroid"], reference.table["centroid"])
    assert json.loads(ckpt.read_text())["complete"] is True
    assert not work.exists()  # parts cleaned up after the merge

    with pytest.raises(KerasnucError, match="belongs to another image or tiling"):
        predict_streaming(
            image, dark_label, StitchSink((320, 320)), checkpoint=ckpt, tile_size=128, margin=16
        )


def test_resumable_sink_round_trip(tmp_path):
    image, _ = disc_image((100, 100), radius=5, spacing=30, seed=9)

    def predict(tiles):
        out = []
        for lab in dark_label(tiles):
            n = int(lab.max())
            table = {"prob": np.tile([0.25, 0.75], (n, 1)), "name": np.array(["x"] * n)}
            out.append((lab, None, table))
        return out

    direct, replayed = [], []

    class Collect:
        def __init__(self, store):
            self.store = store

        def on_tile(self, instances):
            self.store.extend(instances)

        def close(self):
            pass

    predict_streaming(image, predict, Collect(direct), tile_size=64, margin=12, tissue=False)
    sink = ResumableSink(tmp_path / "w", Collect(replayed), cleanup=False)
    predict_streaming(image, predict, sink, tile_size=64, margin=12, tissue=False)
    assert len(direct) == len(replayed) == 9
    for a, b in zip(direct, replayed, strict=True):
        assert {k: a[k] for k in ("id", "class", "bbox", "centroid", "area", "tile")} == {
            k: b[k] for k in ("id", "class", "bbox", "centroid", "area", "tile")
        }
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_array_equal(a["contour"], b["contour"])
        np.testing.assert_array_equal(a["table"]["prob"], b["table"]["prob"])
        assert b["table"]["name"] == "x"


def test_sparse_large_ids_and_rows_without_id_column():
    grid = make_grid(ArraySource(np.zeros((32, 32, 3), np.uint8)), tile_size=32, margin=0)
    inst = np.zeros((32, 32), np.uint64)
    inst[2:5, 2:5] = 10**12  # 9 px
    inst[20:22, 20:30] = 7  # 20 px
    table = {"score": np.array([0.7, 0.1])}  # rows follow the sorted ids: 7, then 10**12
    out = tile_instances((inst, None, table), grid, 0, first_id=1, contours=False)
    assert [(d["id"], d["area"], d["table"]["score"]) for d in out] == [(1, 20, 0.7), (2, 9, 0.1)]
    assert out[0]["contour"] is None


def test_automatic_tissue_detection_skips_glass():
    # Pink "stroma" with dark discs in the top-left 640 x 640 of a white 1280 x 1280 image.
    image = np.full((1280, 1280, 3), 250, np.uint8)
    stroma, centres = disc_image((640, 640), radius=5, spacing=24, seed=10)
    stroma[stroma.sum(axis=2) == 3 * 255] = (225, 160, 200)
    image[:640, :640] = stroma
    sink = StitchSink((1280, 1280))
    summary = predict_streaming(image, dark_label, sink, tile_size=192, margin=32)
    # Cores of 128 px: 10 x 10 tiles, the tissue covers 5 x 5 of them (plus a safety band).
    assert summary.grid.n_tiles == 100 and 25 <= summary.n_selected <= 36
    assert sink.result().instances.max() == len(centres)


# --- seams: a model that is not translation-equivariant --------------------------------------

STROMA = (225, 160, 200)


def glass_sensitive_label(tiles: np.ndarray) -> list:
    """Dark pixels are nuclei, with a threshold that rises with the tile's share of glass.

    A stand-in for a network whose output depends on the whole tile, as the global pooling of
    squeeze-excitation makes the default model's: where two neighbouring tiles hold different
    amounts of glass, they outline a nucleus on their seam differently.
    """
    out = []
    for tile in tiles:
        t = tile.astype(np.float64)
        glass = float((t.min(axis=2) > 240).mean())
        out.append(ndi.label(t.mean(axis=2) < 90 + 80 * glass)[0].astype(np.int32))
    return out


def seam_image():
    """512 x 960 px: stroma from x = 300 to 660 on glass, discs (radius 6) on two seams.

    With 96 px tiles and 16 px margins (cores of 64) the seam at x = 320 has glass in its left
    tile only and the one at x = 640 in its right tile only. Each disc darkens from left to
    right (40 + 12 px per column), so a higher threshold (more glass) moves its outline and
    centroid to the right: on the first seam both tiles see some discs in the other's core, on
    the second both see some in their own.
    """
    img = np.full((512, 960, 3), 250, np.uint8)
    img[:, 300:660] = STROMA
    rr, cc = np.mgrid[:512, :960]
    centres = [(40, 400), (200, 500), (460, 600)]
    offsets = (-2, 0, 1, 2, 3, 4, 6)
    for k, y in enumerate(range(24, 500, 24)):
        centres.append((y, 320 + offsets[k % 7]))
        centres.append((y, 640 + offsets[(k + 3) % 7]))
    for cy, cx in centres:
        disc = (rr - cy) ** 2 + (cc - cx) ** 2 <= 36
        img[disc] = np.clip(40 + 12 * (cc[disc] - cx + 6), 0, 255)[:, None]
    return img, np.array(centres, dtype=np.float64)


class Collect:
    def __init__(self):
        self.instances = []

    def on_tile(self, instances):
        self.instances.extend(instances)

    def close(self):
        pass


def paint(instances, shape):
    out = np.zeros(shape, np.int32)
    for inst in instances:
        y0, x0, y1, x1 = inst["bbox"]
        out[y0:y1, x0:x1][inst["mask"]] = inst["id"]
    return out


def test_streamed_tissue_tiles_and_in_memory_give_the_same_nuclei_on_glass_seams(tmp_path):
    image, centres = seam_image()
    tissue = image.min(axis=2) <= 240
    streamed = Collect()
    summary = predict_streaming(
        image, glass_sensitive_label, streamed, tile_size=96, margin=16, tissue=tissue
    )
    assert summary.n_selected < summary.grid.n_tiles  # glass tiles skipped
    in_memory = predict_tiled(image, glass_sensitive_label, tile_size=96, margin=16)
    # Every disc exactly once: no duplicate from two tiles, none lost between two.
    found = np.array([inst["centroid"] for inst in streamed.instances])
    dist = np.hypot(*(found[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))
    assert len(found) == len(centres)
    assert sorted(dist.argmin(axis=1)) == list(range(len(centres)))
    assert dist.min(axis=1).max() < 6
    # No pixel claimed twice, and the same nuclei as the in-memory stitching.
    painted = paint(streamed.instances, image.shape[:2])
    assert int((painted > 0).sum()) == sum(inst["area"] for inst in streamed.instances)
    assert same_instances(painted, in_memory.instances)
    # The same after an interruption and --resume (the seam decisions of finished tiles are
    # read back from the work folder).
    ckpt, work = tmp_path / "ckpt.json", tmp_path / "parts"
    calls = []

    def failing(tiles):
        calls.append(len(tiles))
        if len(calls) == 6:
            raise RuntimeError("interrupted")
        return glass_sensitive_label(tiles)

    options = {"tile_size": 96, "margin": 16, "tissue": tissue, "batch_size": 4}
    with pytest.raises(RuntimeError, match="interrupted"):
        predict_streaming(
            image, failing, ResumableSink(work, Collect()), checkpoint=ckpt, **options
        )
    resumed = Collect()
    predict_streaming(
        image, glass_sensitive_label, ResumableSink(work, resumed), checkpoint=ckpt, **options
    )
    assert [(d["id"], d["centroid"]) for d in resumed.instances] == [
        (d["id"], d["centroid"]) for d in streamed.instances
    ]
