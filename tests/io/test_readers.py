"""Image / slide readers and tissue detection (kerasnuc.io.readers, .tissue)."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import tifffile

from kerasnuc.data.dataset import Dataset
from kerasnuc.fileutil import KerasnucError, write_png
from kerasnuc.inference.tiling import make_grid, select_tiles
from kerasnuc.io import readers
from kerasnuc.io.readers import ArraySource, TiffSource, open_image
from kerasnuc.io.tissue import saturation, tissue_mask

LOGGER = "kerasnuc.io.readers"


def quadrants(height: int, width: int) -> np.ndarray:
    """Four flat colours, one per quadrant."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    image[:h2, :w2] = (200, 30, 30)
    image[:h2, w2:] = (30, 200, 30)
    image[h2:, :w2] = (30, 30, 200)
    image[h2:, w2:] = (250, 250, 250)
    return image


def random_rgb(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


# --- plain images ----------------------------------------------------------------------------


def test_png_region_reads_and_white_padding(tmp_path):
    image = random_rgb((40, 50), seed=0)
    write_png(tmp_path / "a.png", image)
    with open_image(tmp_path / "a.png") as src:
        assert isinstance(src, ArraySource)
        assert src.shape == (40, 50) and src.mpp is None and src.level_count == 1
        np.testing.assert_array_equal(src.read_region(5, 7, 10, 12), image[5:15, 7:19])
        region = src.read_region(-3, 45, 8, 10)
    assert region.shape == (8, 10, 3) and region.dtype == np.uint8
    np.testing.assert_array_equal(region[3:, :5], image[0:5, 45:50])
    assert region[:3].min() == 255 and region[:, 5:].min() == 255
    with open_image(tmp_path / "a.png", mpp=0.5) as src:
        assert src.mpp == 0.5


def test_jpeg_is_read_as_rgb(tmp_path):
    image = quadrants(64, 64)
    cv2.imwrite(str(tmp_path / "q.jpg"), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    with open_image(tmp_path / "q.jpg") as src:
        region = src.read_region(0, 0, 64, 64)
    # Centres of the flat quadrants survive JPEG within a few levels; channel order is RGB.
    assert np.abs(region[16, 16].astype(int) - (200, 30, 30)).max() <= 4
    assert np.abs(region[48, 16].astype(int) - (30, 30, 200)).max() <= 4


def test_16bit_png_rescaled_with_warning(tmp_path, caplog):
    values = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    full = np.stack([values * 257] * 3, axis=-1).astype(np.uint16)  # 0..65535
    write_png(tmp_path / "full.png", full)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with open_image(tmp_path / "full.png") as src:
            np.testing.assert_array_equal(src.read_region(0, 0, 16, 16)[:, :, 0], values)
    assert "rescaled to uint8" in caplog.text and "full.png" in caplog.text
    # 12-bit data in a 16-bit file keeps its contrast: 4095 -> 255, 2048 -> 128 (127.53).
    twelve = np.zeros((2, 2, 3), np.uint16)
    twelve[0, 0] = 4095
    twelve[0, 1] = 2048
    write_png(tmp_path / "twelve.png", twelve)
    with open_image(tmp_path / "twelve.png") as src:
        px = src.read_region(0, 0, 2, 2)
    assert px[0, 0, 0] == 255 and px[0, 1, 0] == 128 and px[1, 1, 0] == 0


def test_rgba_composited_on_white(tmp_path, caplog):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (100, 50, 200, 128)  # 100*128/255 + 127 = 177.2, 152.1, 227.4
    rgba[0, 1] = (10, 20, 30, 0)  # transparent -> white
    rgba[0, 2] = (10, 20, 30, 255)  # opaque -> unchanged
    write_png(tmp_path / "rgba.png", rgba)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with open_image(tmp_path / "rgba.png") as src:
            px = src.read_region(0, 0, 1, 3)[0]
    assert px.tolist() == [[177, 152, 227], [255, 255, 255], [10, 20, 30]]
    assert "alpha" in caplog.text


def test_greyscale_rejected_or_converted(tmp_path):
    grey = np.arange(0, 250, 10, dtype=np.uint8).reshape(5, 5)
    write_png(tmp_path / "grey.png", grey)
    with pytest.raises(KerasnucError, match=r"grey\.png: greyscale image"):
        open_image(tmp_path / "grey.png")
    with open_image(tmp_path / "grey.png", grey="convert") as src:
        rgb = src.read_region(0, 0, 5, 5)
    np.testing.assert_array_equal(rgb, np.repeat(grey[:, :, None], 3, axis=2))
    with pytest.raises(ValueError, match="`grey` must be 'error' or 'convert'"):
        open_image(tmp_path / "grey.png", grey="yes")


def test_missing_corrupt_and_unsupported_files(tmp_path):
    with pytest.raises(KerasnucError, match=r"nothere\.png: file not found"):
        open_image(tmp_path / "nothere.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(KerasnucError, match=r"bad\.png"):
        open_image(tmp_path / "bad.png")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"\x07" * 64)
    with pytest.raises(KerasnucError, match=r"bad\.tif: cannot read TIFF"):
        open_image(tmp_path / "bad.tif")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(KerasnucError, match=r"x\.gif: unsupported image format"):
        open_image(tmp_path / "x.gif")


def test_corrupt_tile_data_names_the_file(tmp_path):
    image = random_rgb((128, 128), seed=1)
    path = tmp_path / "broken.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[3]
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    with open_image(path) as src:
        np.testing.assert_array_equal(src.read_region(0, 0, 64, 64), image[:64, :64])
        with pytest.raises(KerasnucError, match=r"broken\.tif: cannot decode segment 3"):
            src.read_region(64, 64, 10, 10)


# --- TIFF pyramids -----------------------------------------------------------------------------


def write_pyramid(path, image, **kwargs):
    """Two-level tiled TIFF (SubIFD pyramid), level 1 = 2x area-downsampled."""
    half = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), cv2.INTER_AREA)
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=(64, 64), subifds=1, photometric="rgb", compression="zlib", **kwargs)
        tw.write(half, tile=(64, 64), subfiletype=1, photometric="rgb", compression="zlib")
    return half


def test_pyramidal_tiff_levels_regions_and_mpp(tmp_path):
    image = random_rgb((300, 420), seed=2)
    path = tmp_path / "pyr.tif"
    half = write_pyramid(path, image, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with open_image(path) as src:
        assert isinstance(src, TiffSource)
        assert src.level_shapes == [(300, 420), (150, 210)]
        assert src.level_downsamples == [1.0, 2.0]
        assert src.mpp == pytest.approx(0.25)  # 40000 px/cm = 0.25 um/px
        assert src.level_mpp(1) == pytest.approx(0.5)
        assert src.best_level(2.0) == 1 and src.best_level(1.9) == 0
        np.testing.assert_array_equal(src.read_region(100, 130, 70, 90), image[100:170, 130:220])
        np.testing.assert_array_equal(src.read_region(10, 20, 30, 40, level=1), half[10:40, 20:60])
        edge = src.read_region(280, 400, 40, 40)
        np.testing.assert_array_equal(edge[:20, :20], image[280:, 400:])
        assert edge[20:].min() == 255 and edge[:, 20:].min() == 255
    assert src._tif is None  # closed by the context manager


def test_tiff_regions_decode_only_overlapping_tiles(tmp_path):
    image = random_rgb((512, 512), seed=3)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, image, tile=(128, 128), photometric="rgb", compression="zlib")
    with TiffSource(path) as src:
        src.read_region(10, 10, 5, 5)
        assert len(src._cache) == 1
        src.read_region(120, 120, 20, 20)  # touches tiles 0, 1, 4, 5
        assert sorted(src._cache) == [(0, 0), (0, 1), (0, 4), (0, 5)]
        src.cache_limit = 128 * 128 * 3  # room for one tile: older ones are dropped
        np.testing.assert_array_equal(src.read_region(0, 0, 512, 512), image)
        assert len(src._cache) == 1


def test_strip_tiff_16bit_planar_and_ome(tmp_path, caplog):
    image = random_rgb((90, 70), seed=4)
    strip = tmp_path / "strip16.tif"
    tifffile.imwrite(strip, image.astype(np.uint16) * 257, photometric="rgb", rowsperstrip=16)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with open_image(strip) as src:
            np.testing.assert_array_equal(src.read_region(0, 0, 90, 70), image)
    assert "rescaled to uint8" in caplog.text
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(
        planar, image.transpose(2, 0, 1), photometric="rgb", planarconfig="separate", tile=(32, 32)
    )
    with open_image(planar) as src:
        np.testing.assert_array_equal(src.read_region(5, 6, 50, 40), image[5:55, 6:46])
    ome = tmp_path / "img.ome.tif"
    meta = {"axes": "YXS", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm"}
    tifffile.imwrite(ome, image, photometric="rgb", tile=(32, 32), metadata=meta)
    with open_image(ome) as src:
        assert src.mpp == pytest.approx(0.25)


def test_mpp_sources_and_override(tmp_path, caplog):
    image = random_rgb((64, 64), seed=5)
    dpi72 = tmp_path / "dpi72.tif"
    tifffile.imwrite(dpi72, image, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with open_image(dpi72) as src:
        assert src.mpp is None  # 352.8 um/px is a writer default, not a pixel size
    svs = tmp_path / "fake.tif"
    desc = "Aperio Image Library v12.0.15 \r\n64x64 (64x64) JPEG/RGB Q=70|AppMag = 40|MPP = 0.2520"
    tifffile.imwrite(svs, image, photometric="rgb", description=desc, metadata=None)
    with open_image(svs) as src:
        assert src.mpp == pytest.approx(0.252)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with open_image(svs, mpp=0.5) as src:
            assert src.mpp == 0.5
    assert "the file says 0.252" in caplog.text
    for bad in (0, 1000, 1e-9):  # issue 20, item 8: a typo is refused, not run for minutes
        with pytest.raises(ValueError, match=r"`mpp` must be a pixel size in 0\.02\.\.50 um/px"):
            open_image(svs, mpp=bad)


def write_fake_svs(path, image):
    """A small Aperio-style SVS: tiled JPEG baseline with MPP, then a stripped thumbnail."""
    desc = (
        f"Aperio Image Library v12.0.15 \r\n{image.shape[1]}x{image.shape[0]} [0,0] (256x256) "
        "JPEG/RGB Q=90|AppMag = 40|MPP = 0.2520"
    )
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            image,
            tile=(256, 256),
            photometric="rgb",
            compression="jpeg",
            description=desc,
            metadata=None,
        )
        thumb_desc = "Aperio Image Library v12.0.15 \r\nthumbnail"
        tw.write(image[::4, ::4], photometric="rgb", description=thumb_desc, metadata=None)


def test_openslide_reads_svs_like_tifffile(tmp_path):
    pytest.importorskip("openslide")
    image = quadrants(384, 512)
    path = tmp_path / "slide.svs"
    write_fake_svs(path, image)
    with open_image(path) as src:
        assert isinstance(src, readers.OpenSlideSource)
        assert src.shape == (384, 512) and src.mpp == pytest.approx(0.252)
        via_openslide = src.read_region(-10, 300, 200, 250)
    with TiffSource(path) as src:
        via_tifffile = src.read_region(-10, 300, 200, 250)
    assert via_openslide.shape == (200, 250, 3)
    assert via_openslide[:10].min() == 255  # outside the slide: white
    assert np.abs(via_openslide.astype(int) - via_tifffile.astype(int)).max() <= 2


def test_without_openslide(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "openslide_available", lambda: False)
    image = quadrants(128, 128)
    path = tmp_path / "slide.svs"
    write_fake_svs(path, image)
    with open_image(path) as src:  # TIFF-based: tifffile fallback
        assert isinstance(src, TiffSource) and src.mpp == pytest.approx(0.252)
    (tmp_path / "slide.mrxs").write_bytes(b"\x00")
    monkeypatch.setattr(
        readers, "import_openslide", lambda p=None: (_ for _ in ()).throw(KerasnucError("needs"))
    )
    with pytest.raises(KerasnucError, match="needs"):
        open_image(tmp_path / "slide.mrxs")


def test_import_openslide_error_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "openslide":
            raise ImportError("no module")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(KerasnucError, match="pip install openslide-python openslide-bin"):
        readers.import_openslide("s.mrxs")


# --- thumbnails and tissue -----------------------------------------------------------------


def test_thumbnail_of_tiff_without_pyramid(tmp_path):
    image = quadrants(1200, 1600)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, image, photometric="rgb", rowsperstrip=64)
    with open_image(path) as src:
        thumb = src.thumbnail(200)
        small = src.thumbnail(4000)
    assert thumb.shape == (150, 200, 3)
    assert thumb[30, 40].tolist() == [200, 30, 30] and thumb[120, 160].tolist() == [250] * 3
    np.testing.assert_array_equal(small, image)


def test_tissue_mask_on_synthetic_slide():
    rng = np.random.default_rng(6)
    height, width = 2400, 3200
    yy, xx = np.mgrid[0:height, 0:width]
    blob = ((yy - 1100) / 700.0) ** 2 + ((xx - 1700) / 1000.0) ** 2 <= 1.0
    glass = (238, 234, 242)  # slightly tinted glass, saturation 8 / 242 = 0.033
    slide = np.empty((height, width, 3), np.uint8)
    slide[:] = glass
    slide[blob] = (215, 130, 185)  # eosin pink
    noise = rng.integers(-6, 7, size=slide.shape)
    slide = np.clip(slide.astype(int) + noise, 0, 255).astype(np.uint8)
    mask, scale = tissue_mask(ArraySource(slide), max_size=400, dilate=0)
    assert mask.shape == (300, 400) and scale == pytest.approx(0.125)
    expected = cv2.resize(blob.view(np.uint8), (400, 300), interpolation=cv2.INTER_AREA) > 0
    iou = (mask & expected).sum() / (mask | expected).sum()
    assert iou > 0.97
    # Glass alone (no contrast for Otsu) holds no tissue.
    empty = np.clip(np.array(glass) + noise, 0, 255).astype(np.uint8)
    blank, _ = tissue_mask(ArraySource(empty), 400)
    assert not blank.any()


def test_tissue_mask_on_real_image_keeps_every_nucleus_tile(shared_data):
    ds = Dataset(shared_data / "monuseg_kumar")
    image_id = "TCGA-EJ-A46H-01A-03-TSC"  # loose pale stroma with scattered nuclei
    canvas = np.full((2000, 2500, 3), 250, np.uint8)
    canvas[500:1500, 700:1700] = ds.image(image_id)
    source = ArraySource(canvas)
    mask, scale = tissue_mask(source, max_size=500)
    assert scale == pytest.approx(0.2)
    truth = np.zeros((400, 500), bool)
    truth[100:300, 140:340] = True
    assert (mask & truth).sum() / truth.sum() > 0.95
    assert (mask & ~truth).sum() / (~truth).sum() < 0.03
    # Every tile whose core holds a nucleus centroid is predicted.
    grid = make_grid(source, tile_size=256, margin=64)
    gt = ds.instances(image_id)
    rows, cols = np.indices(gt.shape)
    area = np.bincount(gt.ravel())[1:]
    cy = np.bincount(gt.ravel(), rows.ravel())[1:] / area + 500
    cx = np.bincount(gt.ravel(), cols.ravel())[1:] / area + 700
    needed = set(((cy // 128) * grid.cols + cx // 128).astype(int).tolist())
    selected = set(select_tiles(grid, mask).tolist())
    assert needed <= selected
    # Glass tiles are skipped: selected cores lie within 32 px of the tissue square.
    boxes = grid.core_boxes()[sorted(selected)]
    assert np.all((boxes[:, 2] > 500 - 32) & (boxes[:, 0] < 1500 + 32))
    assert np.all((boxes[:, 3] > 700 - 32) & (boxes[:, 1] < 1700 + 32))
    # An image that is tissue throughout stays tissue (the Otsu threshold is capped).
    full, _ = tissue_mask(ArraySource(ds.image("TCGA-A6-6782-01A-01-BS1")), max_size=250)
    assert full.mean() > 0.9


def test_saturation_definition():
    rgb = np.array([[[255, 255, 255], [200, 100, 50], [0, 0, 0]]], np.uint8)
    np.testing.assert_allclose(saturation(rgb)[0], [0.0, 150 / 200, 0.0])


def test_multipage_channels_tiff_falls_back_to_full_read(tmp_path):
    planes = random_rgb((50, 60), seed=7).transpose(2, 0, 1)  # three 1-channel pages
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, planes, photometric="minisblack")
    with open_image(path) as src:
        assert isinstance(src, ArraySource)
        np.testing.assert_array_equal(src.read_region(0, 0, 50, 60), planes.transpose(1, 2, 0))


@pytest.mark.parametrize(
    "name, kwargs, layout",
    [
        ("planes.tif", {"photometric": "minisblack", "planarconfig": "contig"}, "MINISBLACK"),
        ("cmyk.tif", {"photometric": "separated"}, "CMYK"),
        ("rgbx.tif", {"photometric": "rgb", "extrasamples": ["unspecified"]}, "UNSPECIFIED"),
        ("planar.tif", {"photometric": "minisblack", "planarconfig": "separate"}, "MINISBLACK"),
        ("pages.tif", {"photometric": "minisblack"}, "4 pages"),
    ],
)
def test_four_channels_that_are_not_rgba_are_refused(tmp_path, name, kwargs, layout):
    """Multiplex planes, CMYK and an unnamed 4th sample are not RGB + alpha (issue 20, item 5)."""
    data = random_rgb((40, 30), seed=8)
    data = np.concatenate([data, data[:, :, :1]], axis=2)  # 4 samples, 4th not an alpha
    if kwargs.get("planarconfig") == "separate" or name == "pages.tif":
        data = data.transpose(2, 0, 1)
    path = tmp_path / name
    tifffile.imwrite(path, data, **kwargs)
    with pytest.raises(KerasnucError, match=f"{name}: 4 channels.*{layout}") as info:
        open_image(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("extrasample", "expected"),
    [
        # premultiplied: 50 + 127 = 177, 25 + 127 = 152, 100 + 127 = 227
        ("assocalpha", [[177, 152, 227], [255, 255, 255], [10, 20, 30]]),
        # straight: 50*128/255 + 127 = 152.1, 25*128/255 + 127 = 139.5, 100*128/255 + 127 = 177.2
        ("unassalpha", [[152, 140, 177], [255, 255, 255], [10, 20, 30]]),
    ],
)
def test_rgb_with_associated_or_unassociated_alpha(tmp_path, extrasample, expected):
    """Only ExtraSamples ASSOCALPHA / UNASSALPHA make a 4th sample alpha; premultiplied colour is
    composited on white as C + (255 - A), straight colour as C * A / 255 + (255 - A)."""
    px = np.array([[[50, 25, 100, 128], [0, 0, 0, 0], [10, 20, 30, 255]]], np.uint8)
    path = tmp_path / f"{extrasample}.tif"
    tifffile.imwrite(path, px, photometric="rgb", extrasamples=[extrasample])
    with open_image(path) as src:
        assert src.read_region(0, 0, 1, 3)[0].tolist() == expected
