"""Instance and class maps as compressed, tiled, pyramidal OME-TIFF files (tifffile).

Layout of a file written by :func:`write_label_tiff` (readable by tifffile, Bio-Formats/QuPath,
napari, OpenSlide-free viewers):

* OME-TIFF (OME-XML in the first page's description, axes ``YX``; ``PhysicalSizeX/Y`` in um when
  ``mpp`` is known, also stored as TIFF resolution in pixels per centimetre);
* full resolution in the first page, tiled (``tile`` x ``tile``, default 256) and compressed with
  Deflate (``compression="zlib"``, TIFF compression 8, lossless);
* the pyramid as SubIFDs of that page (the OME-TIFF >= 6 convention): level ``k`` is
  ``map[::2**k, ::2**k]``, i.e. nearest-neighbour downsampling by 2 per level that keeps the
  top-left pixel of each ``2**k x 2**k`` block, so every value in a level is a real id/class
  (no blending of labels). Levels are added while the previous level is larger than one tile;
  a map that fits in one tile has no pyramid. In tifffile the levels are
  ``TiffFile(path).series[0].levels``.

Instance maps are stored as uint32 (ids up to 4294967295), class maps as uint8 (classes 0..255).
BigTIFF is used when the full-resolution map exceeds 2 GiB uncompressed. The file is written to a
temporary sibling and renamed into place (:func:`kerasnuc.fileutil.atomic_path`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import tifffile

from kerasnuc.fileutil import atomic_path

logger = logging.getLogger(__name__)

# Deflate needs only the standard library (LZW/Zstd would need imagecodecs).
_COMPRESSIONS = ("zlib", "deflate", "none")


def pyramid_shapes(shape: tuple[int, int], tile: int = 256) -> list[tuple[int, int]]:
    """Shapes of the pyramid levels (level 0 first) for a map of ``shape``.

    Level ``k`` has shape ``ceil(H / 2**k), ceil(W / 2**k)``; levels are added while the
    previous level's larger side exceeds ``tile``.
    """
    h, w = int(shape[0]), int(shape[1])
    shapes = [(h, w)]
    while max(shapes[-1]) > tile:
        k = len(shapes)
        shapes.append((-(-h // 2**k), -(-w // 2**k)))
    return shapes


def write_label_tiff(
    path: str | os.PathLike,
    labels: np.ndarray,
    dtype: np.dtype | type = np.uint32,
    mpp: float | None = None,
    tile: int = 256,
    pyramid: bool = True,
    compression: str = "zlib",
) -> list[tuple[int, int]]:
    """Write a label map as a tiled, compressed, pyramidal OME-TIFF (layout in module doc).

    Args:
        path: output file (``.ome.tif`` recommended).
        labels: ``(H, W)`` non-negative integer map (an ``np.memmap`` works: only the
            downsampled levels are copied).
        dtype: stored integer dtype; values must fit.
        mpp: micrometres per pixel of level 0, or None.
        tile: tile side, a positive multiple of 16.
        pyramid: write the downsampled levels.
        compression: ``"zlib"`` or ``"deflate"`` (the same Deflate codec), or ``"none"``.

    Returns:
        Shapes of the levels written, level 0 first.

    Raises:
        ValueError: bad shape, values that do not fit ``dtype``, or bad options.
    """
    labels = np.asarray(labels)
    dtype = np.dtype(dtype)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"`labels` must be a (H, W) integer array. Received: shape={labels.shape}, "
            f"dtype={labels.dtype}"
        )
    if not np.issubdtype(dtype, np.unsignedinteger):
        raise ValueError(f"`dtype` must be an unsigned integer type. Received: dtype={dtype}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"`tile` must be a positive multiple of 16. Received: tile={tile}")
    if compression not in _COMPRESSIONS:
        raise ValueError(
            f"`compression` must be one of {_COMPRESSIONS}. Received: compression={compression!r}"
        )
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"`mpp` must be a positive number or None. Received: mpp={mpp}")
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > np.iinfo(dtype).max:
            raise ValueError(
                f"`labels` values must lie in 0..{np.iinfo(dtype).max} to be stored as {dtype}. "
                f"Received: min={lo}, max={hi}"
            )
    shapes = pyramid_shapes(labels.shape, tile) if pyramid else [tuple(labels.shape)]
    codec = None if compression == "none" else ("zlib" if compression == "deflate" else compression)
    metadata: dict[str, object] = {"axes": "YX"}
    if mpp is not None:
        metadata.update(
            PhysicalSizeX=float(mpp),
            PhysicalSizeXUnit="µm",
            PhysicalSizeY=float(mpp),
            PhysicalSizeYUnit="µm",
        )
    bigtiff = labels.size * dtype.itemsize > 2**31
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=True) as tif:
        for k in range(len(shapes)):
            step = 2**k
            level = labels if k == 0 else labels[::step, ::step]
            options: dict[str, object] = {
                "tile": (tile, tile),
                "compression": codec,
                "photometric": "minisblack",
            }
            if mpp is not None:
                options.update(resolution=(1e4 / (mpp * step),) * 2, resolutionunit="CENTIMETER")
            if k == 0:
                options.update(subifds=len(shapes) - 1, metadata=metadata)
            else:
                options.update(subfiletype=1, metadata=None)
            tif.write(np.ascontiguousarray(level, dtype=dtype), **options)
    logger.info("wrote %s (%d level(s))", Path(path), len(shapes))
    return shapes


def write_instance_tiff(
    path: str | os.PathLike,
    instances: np.ndarray,
    mpp: float | None = None,
    tile: int = 256,
    pyramid: bool = True,
    compression: str = "zlib",
) -> list[tuple[int, int]]:
    """Instance map (0 = background) as uint32 OME-TIFF; see :func:`write_label_tiff`."""
    return write_label_tiff(path, instances, np.uint32, mpp, tile, pyramid, compression)


def write_class_tiff(
    path: str | os.PathLike,
    classes: np.ndarray,
    mpp: float | None = None,
    tile: int = 256,
    pyramid: bool = True,
    compression: str = "zlib",
) -> list[tuple[int, int]]:
    """Class map (0 = background, 1..C) as uint8 OME-TIFF; see :func:`write_label_tiff`."""
    return write_label_tiff(path, classes, np.uint8, mpp, tile, pyramid, compression)


def read_label_tiff(path: str | os.PathLike, level: int = 0) -> np.ndarray:
    """Read one pyramid level of a label TIFF (level 0 = full resolution), as stored."""
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        if not 0 <= level < len(levels):
            raise ValueError(
                f"`level` must be in 0..{len(levels) - 1} for {path}. Received: level={level}"
            )
        return levels[level].asarray()
