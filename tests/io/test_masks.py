"""Label maps as tiled, compressed, pyramidal OME-TIFF, read back with tifffile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from kerasnuc.io.masks import (
    pyramid_shapes,
    read_label_tiff,
    write_class_tiff,
    write_instance_tiff,
)


def test_pyramid_shapes() -> None:
    assert pyramid_shapes((600, 520), 256) == [(600, 520), (300, 260), (150, 130)]
    assert pyramid_shapes((256, 100), 256) == [(256, 100)]
    assert pyramid_shapes((257, 3), 256) == [(257, 3), (129, 2)]


def test_instance_map_round_trip_with_pyramid(tmp_path: Path, rng: np.random.Generator) -> None:
    inst = rng.integers(0, 5, (600, 520)).astype(np.int64) * 70_001  # ids beyond uint16
    path = tmp_path / "instances.ome.tif"
    shapes = write_instance_tiff(path, inst, mpp=0.25, tile=256)
    assert shapes == [(600, 520), (300, 260), (150, 130)]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        levels = tif.series[0].levels
        assert [lvl.shape for lvl in levels] == shapes
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.tilelength == 256
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.dtype == np.uint32
        np.testing.assert_array_equal(levels[0].asarray(), inst)
        # nearest downsampling: top-left pixel of every 2 x 2 (4 x 4) block
        level1 = levels[1].asarray()
        assert level1[10, 20] == inst[20, 40] and level1[-1, -1] == inst[598, 518]
        np.testing.assert_array_equal(level1, inst[::2, ::2])
        np.testing.assert_array_equal(levels[2].asarray(), inst[::4, ::4])
        assert 'PhysicalSizeX="0.25"' in tif.ome_metadata
        # TIFF resolution: pixels per centimetre (1e4 um / 0.25 um)
        xres = page.tags["XResolution"].value
        assert xres[0] / xres[1] == pytest.approx(4e4)
    np.testing.assert_array_equal(read_label_tiff(path, level=2), inst[::4, ::4])


def test_class_map_uint8_small_without_pyramid(tmp_path: Path) -> None:
    classes = np.arange(40 * 30).reshape(40, 30) % 7
    path = tmp_path / "classes.ome.tif"
    assert write_class_tiff(path, classes) == [(40, 30)]
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series[0].levels) == 1
        assert tif.pages[0].dtype == np.uint8
        np.testing.assert_array_equal(tif.series[0].asarray(), classes)


def test_errors_leave_no_file(tmp_path: Path) -> None:
    path = tmp_path / "c.tif"
    with pytest.raises(ValueError, match=r"0\.\.255"):
        write_class_tiff(path, np.full((4, 4), 300))
    with pytest.raises(ValueError, match="tile"):
        write_instance_tiff(path, np.zeros((4, 4), np.int32), tile=100)
    with pytest.raises(ValueError, match="compression"):
        write_instance_tiff(path, np.zeros((4, 4), np.int32), compression="jpeg")
    assert list(tmp_path.iterdir()) == []
