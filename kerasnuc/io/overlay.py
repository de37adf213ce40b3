"""Quality-control overlays: nucleus outlines coloured by class over the H&E image (PNG).

* :func:`outline_mask`: the inner outline of every nucleus, ``thickness`` pixels wide: the
  nucleus pixels within city-block distance ``thickness`` of a pixel that is not the same
  nucleus (another nucleus, background or outside the image), so touching nuclei keep separate
  outlines and a nucleus cut by the image edge is closed along the edge. Vectorised:
  ``thickness`` passes of 4-neighbour minimum/maximum filters over the label map.
* :func:`draw_overlay` / :func:`write_overlay`: outline pixels take the colour of the class under
  them (``class_colors``; ``default_color`` without classes or for unknown classes), all other
  pixels keep the image colour.
* :class:`SlideOverlay`: a downsampled overview of a slide built tile by tile. Each overview
  pixel ``(R, C)`` covers the full-resolution pixels with ``floor(r * scale) == R`` and
  ``floor(c * scale) == C``; its colour is their mean (area downsampling, accumulated across
  tiles, so tiles need not align with the overview grid), and its nucleus/class are those of the
  full-resolution pixel nearest its centre, ``(floor((R + 0.5) / scale),
  floor((C + 0.5) / scale))``. Outlines are drawn once at the end at overview resolution, so they
  stay 1-2 px wide whatever the scale and show no tile seams. Overview pixels that no tile
  covered are white.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

from kerasnuc.fileutil import write_png

logger = logging.getLogger(__name__)

DEFAULT_COLOR = (0, 255, 0)
_CROSS = ndi.generate_binary_structure(2, 1)


def outline_mask(instances: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Inner outlines of the nuclei of an instance map.

    Args:
        instances: ``(H, W)`` integer map, 0 = background.
        thickness: outline width in pixels (>= 1).

    Returns:
        ``(H, W)`` bool, True on outline pixels (always inside a nucleus).
    """
    instances = np.asarray(instances)
    if instances.ndim != 2 or not np.issubdtype(instances.dtype, np.integer):
        raise ValueError(
            f"`instances` must be a (H, W) integer array. Received: shape={instances.shape}, "
            f"dtype={instances.dtype}"
        )
    if int(thickness) != thickness or thickness < 1:
        raise ValueError(f"`thickness` must be an int >= 1. Received: thickness={thickness}")
    # -1 outside the image: a nucleus touching the edge is outlined along it.
    padded = np.pad(instances.astype(np.int64), thickness, constant_values=-1)
    low = high = padded
    for _ in range(int(thickness)):
        low = ndi.minimum_filter(low, footprint=_CROSS, mode="nearest")
        high = ndi.maximum_filter(high, footprint=_CROSS, mode="nearest")
    inner = np.s_[thickness:-thickness, thickness:-thickness]
    return (instances > 0) & (low[inner] != high[inner])


def _color_table(
    class_colors: Mapping[int, Sequence[int]] | None, size: int, default: Sequence[int]
) -> np.ndarray:
    table = np.tile(np.asarray(default, dtype=np.uint8), (size, 1))
    for k, color in (class_colors or {}).items():
        if 0 < int(k) < size:
            table[int(k)] = np.asarray(color, dtype=np.uint8)
    return table


def _check_color(color: Sequence[int], name: str) -> tuple[int, int, int]:
    rgb = tuple(int(v) for v in color)
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"`{name}` must be (r, g, b) in 0..255. Received: {name}={color}")
    return rgb  # type: ignore[return-value]


def draw_overlay(
    image: np.ndarray,
    instances: np.ndarray,
    classes: np.ndarray | None = None,
    class_colors: Mapping[int, Sequence[int]] | None = None,
    thickness: int = 1,
    default_color: Sequence[int] = DEFAULT_COLOR,
) -> np.ndarray:
    """Draw the nucleus outlines over an image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB (greyscale ``(H, W)`` is repeated to RGB).
        instances: ``(H, W)`` integer instance map.
        classes: ``(H, W)`` integer class map, or None.
        class_colors: ``{class id: (r, g, b)}``.
        thickness: outline width in pixels.
        default_color: outline colour without a class or for classes missing from
            ``class_colors``.

    Returns:
        ``(H, W, 3)`` uint8 RGB copy of the image with the outlines.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    instances = np.asarray(instances)
    if image.dtype != np.uint8 or image.shape != (*instances.shape, 3):
        raise ValueError(
            "`image` must be (H, W, 3) uint8 with the shape of `instances` "
            f"{instances.shape}. Received: shape={image.shape}, dtype={image.dtype}"
        )
    default = _check_color(default_color, "default_color")
    out = image.copy()
    edge = outline_mask(instances, thickness)
    if classes is None:
        out[edge] = default
        return out
    classes = np.asarray(classes)
    if classes.shape != instances.shape:
        raise ValueError(
            f"`classes` must have the shape of `instances` {instances.shape}. "
            f"Received: shape={classes.shape}"
        )
    cls = classes[edge].astype(np.int64)
    top = max(int(cls.max(initial=0)), max((int(k) for k in class_colors or {}), default=0))
    colors = _color_table(class_colors, top + 1, default)
    out[edge] = colors[np.clip(cls, 0, top)]
    return out


def write_overlay(
    path: str | os.PathLike,
    image: np.ndarray,
    instances: np.ndarray,
    classes: np.ndarray | None = None,
    class_colors: Mapping[int, Sequence[int]] | None = None,
    thickness: int = 1,
    default_color: Sequence[int] = DEFAULT_COLOR,
) -> np.ndarray:
    """:func:`draw_overlay` written as PNG (atomically). Returns the overlay."""
    out = draw_overlay(image, instances, classes, class_colors, thickness, default_color)
    write_png(path, out)
    return out


def _bins(start: int, length: int, scale: float, size: int) -> np.ndarray:
    """Overview index ``floor(i * scale)`` of the full-resolution indices ``start..+length``."""
    return np.minimum(np.floor(np.arange(start, start + length) * scale).astype(np.int64), size - 1)


def _samples(start: int, length: int, scale: float, size: int, full: int) -> tuple[np.ndarray, ...]:
    """Overview indices whose sample pixel lies in ``start..+length`` and those samples."""
    lo = max(int(math.floor(start * scale)) - 1, 0)
    hi = min(int(math.ceil((start + length) * scale)) + 1, size)
    idx = np.arange(lo, hi)
    src = np.minimum(np.floor((idx + 0.5) / scale).astype(np.int64), full - 1)
    keep = (src >= start) & (src < start + length)
    return idx[keep], src[keep] - start


class SlideOverlay:
    """Downsampled overlay of a slide, accumulated tile by tile (method in the module doc).

    Memory: about 25 bytes per overview pixel (float32 colour sums, uint32 counts, int64 labels,
    uint8 classes). Nucleus ids must be unique across the slide (as after stitching): the parts
    of a nucleus split between tiles share its id and get one outline. Background pixels of a
    later tile do not erase the nuclei of earlier ones.

    Args:
        shape: ``(H, W)`` of the full-resolution slide.
        scale: overview size / full size, in (0, 1] (e.g. 1/32).
        class_colors: ``{class id: (r, g, b)}``.
        thickness: outline width in overview pixels.
        default_color: outline colour without a class or for unknown classes.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        scale: float,
        class_colors: Mapping[int, Sequence[int]] | None = None,
        thickness: int = 1,
        default_color: Sequence[int] = DEFAULT_COLOR,
    ) -> None:
        if not (0 < scale <= 1):
            raise ValueError(f"`scale` must be in (0, 1]. Received: scale={scale}")
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"`shape` must be (H, W) with H, W >= 1. Received: shape={shape}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.scale = float(scale)
        self.size = (
            max(1, math.ceil(self.shape[0] * self.scale)),
            max(1, math.ceil(self.shape[1] * self.scale)),
        )
        self.class_colors = dict(class_colors or {})
        self.thickness = int(thickness)
        self.default_color = _check_color(default_color, "default_color")
        self._sums = np.zeros((*self.size, 3), dtype=np.float32)
        self._counts = np.zeros(self.size, dtype=np.uint32)
        self._labels = np.zeros(self.size, dtype=np.int64)
        self._classes = np.zeros(self.size, dtype=np.uint8)

    def add(
        self,
        image: np.ndarray,
        instances: np.ndarray | None = None,
        classes: np.ndarray | None = None,
        offset: tuple[int, int] = (0, 0),
    ) -> None:
        """Add one tile.

        Args:
            image: ``(h, w, 3)`` uint8 RGB tile.
            instances: ``(h, w)`` integer instance map of the tile, or None.
            classes: ``(h, w)`` integer class map of the tile (values 0..255), or None.
            offset: ``(row0, col0)`` of the tile in the slide; the tile must lie inside it.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"`image` must be (h, w, 3) uint8. Received: shape={image.shape}, "
                f"dtype={image.dtype}"
            )
        h, w = image.shape[:2]
        if h == 0 or w == 0:
            return
        r0, c0 = int(offset[0]), int(offset[1])
        if r0 < 0 or c0 < 0 or r0 + h > self.shape[0] or c0 + w > self.shape[1]:
            raise ValueError(
                f"The tile ({h}x{w} at offset {tuple(offset)}) must lie inside the slide "
                f"{self.shape}."
            )
        rows = _bins(r0, h, self.scale, self.size[0])
        cols = _bins(c0, w, self.scale, self.size[1])
        row_starts = np.flatnonzero(np.diff(rows, prepend=-1))
        col_starts = np.flatnonzero(np.diff(cols, prepend=-1))
        sums = np.add.reduceat(image.astype(np.float32), row_starts, axis=0)
        sums = np.add.reduceat(sums, col_starts, axis=1)
        counts = np.outer(
            np.diff(np.append(row_starts, h)), np.diff(np.append(col_starts, w))
        ).astype(np.uint32)
        block = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        self._sums[block] += sums
        self._counts[block] += counts
        if instances is None:
            return
        instances = np.asarray(instances)
        if instances.shape != (h, w):
            raise ValueError(
                f"`instances` must have the tile shape {(h, w)}. Received: {instances.shape}"
            )
        r_idx, r_src = _samples(r0, h, self.scale, self.size[0], self.shape[0])
        c_idx, c_src = _samples(c0, w, self.scale, self.size[1], self.shape[1])
        sampled = instances[np.ix_(r_src, c_src)]
        fg = sampled > 0
        if not fg.any():
            return
        target = np.ix_(r_idx, c_idx)
        current = self._labels[target]
        current[fg] = sampled[fg]
        self._labels[target] = current
        if classes is not None:
            classes = np.asarray(classes)
            if classes.shape != (h, w):
                raise ValueError(
                    f"`classes` must have the tile shape {(h, w)}. Received: {classes.shape}"
                )
            cls = self._classes[target]
            cls[fg] = classes[np.ix_(r_src, c_src)][fg]
            self._classes[target] = cls

    def render(self) -> np.ndarray:
        """The overview: ``(ceil(H * scale), ceil(W * scale), 3)`` uint8 RGB with outlines."""
        counts = self._counts[..., None].astype(np.float32)
        mean = np.where(counts > 0, self._sums / np.maximum(counts, 1), 255.0)
        image = np.clip(np.rint(mean), 0, 255).astype(np.uint8)
        return draw_overlay(
            image,
            self._labels,
            self._classes,
            self.class_colors,
            self.thickness,
            self.default_color,
        )

    def write(self, path: str | os.PathLike) -> np.ndarray:
        """Write :meth:`render` as PNG (atomically). Returns the overview."""
        out = self.render()
        write_png(path, out)
        return out
