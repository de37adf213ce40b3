"""Image and whole-slide readers behind one interface: :class:`ImageSource`.

:func:`open_image` picks a reader from the file name:

* ``.png``, ``.jpg``, ``.jpeg``, ``.bmp``: decoded in full (:class:`ArraySource`).
* ``.tif``, ``.tiff``, ``.ome.tif``, ``.btf``, ``.tf8``: :class:`TiffSource`, which reads the
  strips or tiles of one pyramid level that a region overlaps, straight from the file with
  :mod:`tifffile` (no zarr needed), and keeps a bounded cache of decoded segments. A 20000 x 20000
  slide is never loaded whole. The levels are those tifffile finds for the first series: SubIFD
  and OME pyramids, SVS/NDPI/SCN levels, and plain reduced pages when every level is 2, 3 or 4
  times smaller than the one before. Layouts that cannot be read segment by segment (e.g. one
  page per colour channel) are decoded whole if at most 64 Mpx, and refused otherwise.
* ``.svs``, ``.ndpi``, ``.mrxs``, ``.scn``, ``.vms``, ``.vmu``, ``.bif``, ``.svslide``:
  :class:`OpenSlideSource` (OpenSlide, an optional dependency: ``pip install openslide-python
  openslide-bin``). When it is not installed, the TIFF-based formats among them (SVS, NDPI, SCN,
  BIF) fall back to :class:`TiffSource` (best effort: tifffile decodes SVS reliably, some NDPI
  variants less so); MIRAX and Hamamatsu VMS need OpenSlide.

Every reader returns ``uint8`` RGB whatever the file stores, with one warning (``logging``) per
file when it converts: 16-bit (or other integer) data is divided by the smallest ``2**k - 1``
(k = 8, 10, 12, 14, 16, ...) not below the image's maximum, so 12-bit data stored in 16 bits
keeps its contrast; float data in [0, 1] is multiplied by 255; RGBA is composited on white (the
colour of empty glass, so transparent areas read as background, never as dark tissue); greyscale
raises a :class:`~kerasnuc.fileutil.KerasnucError` unless ``grey="convert"`` (then the grey value
is repeated in R, G and B). A TIFF's 2nd or 4th channel is alpha only when its tags say so
(photometric RGB, or grey for 2 channels, with ExtraSamples associated or unassociated alpha;
associated alpha is premultiplied colour, composited as ``C + 255 - A``); other 2- and 4-channel
TIFFs (multiplex planes, CMYK, an unnamed extra sample, one page per channel) are refused with a
line naming the file and its channel layout.

Pixel size (``mpp``, micrometres per pixel at level 0) comes from, in order: the ``mpp``
argument; OME-XML ``PhysicalSizeX`` (with its unit); the Aperio ``MPP = ...`` field of the SVS
ImageDescription; the TIFF ``ResolutionUnit``/``XResolution`` tags; OpenSlide's ``openslide.mpp-x``
property. Values outside 0.02-50 um/px (:data:`~kerasnuc.checks.MPP_RANGE`; e.g. the 72 dpi
default of many writers) are ignored; a given ``mpp`` outside it is refused (ValueError).

Coordinates are ``(y, x)`` = ``(row, column)`` in pixels of the level they refer to; level 0 is
the full resolution.

One cohesive concept: the readers share the conversion rules, the pixel-size rules and the
region interface above, so they live in one module.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from kerasnuc.checks import check_mpp, is_plausible_mpp
from kerasnuc.fileutil import KerasnucError, read_image

logger = logging.getLogger(__name__)

GreyPolicy = Literal["error", "convert"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TIFF_BASED_SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".svslide")

DEFAULT_CACHE_BYTES = 128 * 1024**2
"""Decoded TIFF segments kept by :class:`TiffSource` (bytes)."""

_FALLBACK_PIXELS = 64 * 1024**2
"""TIFF layouts that cannot be read lazily are decoded whole up to this many pixels."""


def _check_grey(grey: str) -> None:
    if grey not in ("error", "convert"):
        raise ValueError(f"`grey` must be 'error' or 'convert'. Received: grey={grey!r}")


def _plausible_mpp(value: float | None, origin: str, name: str) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    if is_plausible_mpp(value):
        return float(value)
    logger.debug("%s: ignoring implausible pixel size %.4g um/px from %s", name, value, origin)
    return None


def _resolve_mpp(given: float | None, found: float | None, name: str) -> float | None:
    """The given pixel size wins; warn when the file says something clearly different."""
    given = check_mpp(given)
    if given is None:
        return found
    if found is not None and abs(given - found) > 0.1 * found:
        logger.warning(
            "%s: using the given pixel size %.4g um/px; the file says %.4g um/px",
            name,
            given,
            found,
        )
    return given


class _Conversion:
    """How stored pixels become ``uint8`` RGB; decided once per file, applied to every region.

    Args:
        channels: stored samples per pixel (1 grey, 2 grey + alpha, 3 RGB, 4 RGBA).
        dtype: stored dtype.
        max_value: largest stored value (used to scale non-uint8 data).
        grey: policy for greyscale data.
        name: file name for messages.
        invert: the data is MinIsWhite greyscale.
        premultiplied: the alpha channel (of 2 or 4 channels) is associated alpha: the colour is
            already multiplied by it.
    """

    def __init__(
        self,
        channels: int,
        dtype: np.dtype,
        max_value: float,
        grey: GreyPolicy,
        name: str,
        invert: bool = False,
        premultiplied: bool = False,
    ) -> None:
        _check_grey(grey)
        self.channels = channels
        self.invert = invert
        self.premultiplied = premultiplied
        self.name = name
        self.dtype = np.dtype(dtype)
        self.top: float | None = None
        if channels not in (1, 2, 3, 4):
            raise KerasnucError(
                f"{name}: images with {channels} channels are not supported "
                "(expected greyscale, RGB or RGBA)"
            )
        if channels in (1, 2) and grey == "error":
            raise KerasnucError(
                f"{name}: greyscale image; kerasnuc models expect RGB H&E "
                "(use grey='convert' / --grey convert to repeat the grey value in R, G and B)"
            )
        if channels in (1, 2):
            logger.warning("%s: greyscale image converted to RGB", name)
        if channels in (2, 4):
            logger.warning("%s: alpha channel removed by compositing on white", name)
        if self.dtype == np.uint8:
            return
        if self.dtype == np.bool_:
            self.top = 1.0
        elif self.dtype.kind == "f":
            if not math.isfinite(max_value):
                raise KerasnucError(f"{name}: NaN or infinite pixel values in a float image")
            self.top = 1.0 if max_value <= 1.0 else 255.0
        elif self.dtype.kind in "iu":
            bits = 8
            while 2**bits - 1 < max_value and bits < 64:
                bits += 2
            self.top = float(2**bits - 1)
        else:
            raise KerasnucError(f"{name}: unsupported pixel type {self.dtype}")
        logger.warning(
            "%s: %s image rescaled to uint8 (value %g -> 255)", name, self.dtype, self.top
        )

    @property
    def white(self) -> np.ndarray:
        """Stored value of a white pixel, per channel (used for missing tiles)."""
        top = 255.0 if self.top is None else self.top
        value = 0.0 if self.invert else top
        return np.full(self.channels, value).astype(self.dtype)

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        """``(h, w[, c])`` stored pixels -> ``(h, w, 3)`` uint8 RGB."""
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise KerasnucError(f"{self.name}: NaN or infinite pixel values in a float image")
        if self.top is not None:
            scaled = arr.astype(np.float32) * np.float32(255.0 / self.top)
            arr = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        if self.invert:
            arr = arr.copy()
            arr[:, :, 0] = 255 - arr[:, :, 0]
        if self.channels in (2, 4):
            color = arr[:, :, :-1].astype(np.uint32)
            alpha = arr[:, :, -1:].astype(np.uint32)
            if self.premultiplied:
                arr = np.minimum(color + (255 - alpha), 255).astype(np.uint8)
            else:
                arr = ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        return np.ascontiguousarray(arr, dtype=np.uint8)


class ImageSource:
    """A readable image or slide: level shapes, pixel size and region reads as ``uint8`` RGB.

    Subclasses set ``name``, ``level_shapes`` (and optionally ``level_downsamples``) and ``mpp``
    and implement :meth:`_read`. Sources are context managers; :meth:`close` releases the file.

    Attributes:
        name: file name (or ``"<array>"``) used in messages.
        level_shapes: ``[(H, W), ...]`` per pyramid level, level 0 first (full resolution).
        level_downsamples: level-0 pixels per level pixel for each level (1.0 for level 0).
        mpp: micrometres per level-0 pixel, or None when unknown.
    """

    name: str
    level_shapes: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None

    def _init_levels(self, level_shapes: list[tuple[int, int]]) -> None:
        self.level_shapes = [(int(h), int(w)) for h, w in level_shapes]
        h0, w0 = self.level_shapes[0]
        self.level_downsamples = [0.5 * (h0 / h + w0 / w) for h, w in self.level_shapes]

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` at level 0."""
        return self.level_shapes[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels (1 for a plain image)."""
        return len(self.level_shapes)

    def level_mpp(self, level: int) -> float | None:
        """Micrometres per pixel of ``level``, or None when the pixel size is unknown."""
        self._check_level(level)
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1 % slack).

        Args:
            downsample: wanted level-0 pixels per output pixel (>= 1 picks a pyramid level).
        """
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01 and ds > self.level_downsamples[best]:
                best = level
        return best

    def _check_level(self, level: int) -> None:
        if not isinstance(level, int | np.integer) or not 0 <= level < self.level_count:
            raise ValueError(
                f"`level` must be an int in [0, {self.level_count - 1}]. Received: level={level!r}"
            )

    def read_region(
        self, y: int, x: int, h: int, w: int, level: int = 0, fill: int = 255
    ) -> np.ndarray:
        """Read a rectangle of one level; parts outside the image are filled with ``fill``.

        Args:
            y: top row, in pixels of ``level`` (may be negative).
            x: left column, in pixels of ``level`` (may be negative).
            h: height in pixels (> 0).
            w: width in pixels (> 0).
            level: pyramid level.
            fill: value of the padding outside the image (255 = white, like empty glass).

        Returns:
            ``(h, w, 3)`` uint8 RGB.
        """
        self._check_level(level)
        y, x, h, w = int(y), int(x), int(h), int(w)
        if h <= 0 or w <= 0:
            raise ValueError(f"Region size must be positive. Received: h={h}, w={w}")
        height, width = self.level_shapes[level]
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + h, height), min(x + w, width)
        if y0 == y and x0 == x and y1 == y + h and x1 == x + w:
            return self._read(level, y0, x0, y1, x1)
        out = np.full((h, w, 3), fill, dtype=np.uint8)
        if y1 > y0 and x1 > x0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read(level, y0, x0, y1, x1)
        return out

    def _read(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """``(y1 - y0, x1 - x0, 3)`` uint8 RGB of a region inside ``level``."""
        raise NotImplementedError

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole image downscaled so that its longer side is at most ``max_size``.

        Reads the coarsest level that is at least as fine as the thumbnail, in bands of rows,
        and downsizes each band with area averaging, so memory stays bounded for slides without
        a pyramid.

        Args:
            max_size: longest side of the result in pixels (the image itself if smaller).

        Returns:
            ``(h, w, 3)`` uint8 RGB with ``h / H ~= w / W`` (level-0 ``(H, W)``).
        """
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"`max_size` must be a positive int. Received: max_size={max_size!r}")
        height, width = self.shape
        scale = min(1.0, max_size / max(height, width))
        out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
        level = self.best_level(1.0 / scale)
        lh, lw = self.level_shapes[level]
        if (lh, lw) == (out_h, out_w):
            return self.read_region(0, 0, lh, lw, level)
        band = max(1, (8 * 1024**2) // (lw * max(1, round(lh / out_h))))
        parts = []
        for o0 in range(0, out_h, band):
            o1 = min(out_h, o0 + band)
            r0 = math.floor(o0 * lh / out_h)
            r1 = max(r0 + 1, min(lh, math.ceil(o1 * lh / out_h)))
            rows = self.read_region(r0, 0, r1 - r0, lw, level)
            parts.append(cv2.resize(rows, (out_w, o1 - o0), interpolation=cv2.INTER_AREA))
        return np.concatenate(parts, axis=0)

    def close(self) -> None:
        """Release the file (idempotent)."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, shape={self.shape}, "
            f"levels={self.level_count}, mpp={self.mpp})"
        )


class ArraySource(ImageSource):
    """An image held in memory (decoded PNG/JPEG, or an array given by the caller).

    Args:
        image: ``(H, W)``, ``(H, W, 1..4)`` array; converted once to ``(H, W, 3)`` uint8 RGB (see
            the module docstring for the rules).
        mpp: micrometres per pixel, or None.
        name: label used in messages.
        grey: ``"error"`` (default) rejects greyscale images, ``"convert"`` repeats the grey value.
        premultiplied: the alpha of a 2- or 4-channel image is associated alpha (colour already
            multiplied by it); default: straight alpha, as in PNG.
    """

    def __init__(
        self,
        image: np.ndarray,
        mpp: float | None = None,
        name: str = "<array>",
        grey: GreyPolicy = "error",
        premultiplied: bool = False,
    ) -> None:
        _check_grey(grey)
        arr = np.asarray(image)
        self.name = name
        if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise KerasnucError(
                f"{name}: expected a 2-D image (H, W) or (H, W, C). Received: shape={arr.shape}"
            )
        channels = 1 if arr.ndim == 2 else arr.shape[2]
        max_value = float(arr.max()) if arr.dtype != np.uint8 else 255.0
        convert = _Conversion(
            channels, arr.dtype, max_value, grey, name, premultiplied=premultiplied
        )
        self.image = convert(arr)
        self.mpp = check_mpp(mpp)
        self._init_levels([self.image.shape[:2]])

    def _read(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        return self.image[y0:y1, x0:x1].copy()


def _ome_mpp(xml: str | None, name: str) -> float | None:
    """PhysicalSizeX of the first OME ``Pixels`` element, in um."""
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    units = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
    units["Å"] = 1e-4
    for elem in root.iter():
        if elem.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        size = elem.get("PhysicalSizeX")
        factor = units.get(elem.get("PhysicalSizeXUnit", "µm"))
        if size is None or factor is None:
            return None
        try:
            return _plausible_mpp(float(size) * factor, "OME PhysicalSizeX", name)
        except ValueError:
            return None
    return None


def _svs_mpp(description: str | None, name: str) -> float | None:
    """The ``MPP = ...`` field of an Aperio ImageDescription."""
    if not description or not description.startswith("Aperio"):
        return None
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    if match is None:
        return None
    try:
        return _plausible_mpp(float(match.group(1)), "Aperio MPP", name)
    except ValueError:
        return None


def _tag_mpp(page: Any, name: str) -> float | None:
    """Pixel size from the ResolutionUnit / XResolution tags."""
    unit_tag = page.tags.get("ResolutionUnit")
    res_tag = page.tags.get("XResolution")
    if res_tag is None:
        return None
    unit = int(unit_tag.value) if unit_tag is not None else 2
    um_per_unit = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}.get(unit)
    value = res_tag.value
    try:
        per_unit = value[0] / value[1] if isinstance(value, tuple) else float(value)
    except (TypeError, ZeroDivisionError, IndexError):
        return None
    if um_per_unit is None or per_unit <= 0:
        return None
    return _plausible_mpp(um_per_unit / per_unit, "TIFF resolution tags", name)


_ALPHA = {1: True, 2: False}  # TIFF ExtraSamples value -> premultiplied (associated alpha)


def _tiff_alpha(
    channels: int, photometric: int, extrasamples: tuple, name: str, pages: int = 0
) -> bool:
    """Whether the last of ``channels`` TIFF channels is premultiplied alpha (False: straight
    alpha or no alpha at all), from the photometric and ExtraSamples tags.

    Args:
        channels: channels of the decoded image.
        photometric: the TIFF photometric interpretation.
        extrasamples: the ExtraSamples tag values.
        name: the file named in errors.
        pages: > 0 when the channels are that many pages of one sample each.

    Raises:
        KerasnucError: 2 or 4 channels whose tags do not make the last one alpha (multiplex
            planes, CMYK, an unspecified extra sample): the message names the layout.
    """
    if channels not in (2, 4):
        return False
    colour = photometric == 2 if channels == 4 else photometric in (0, 1)
    extra = [int(e) for e in extrasamples]
    if colour and not pages and len(extra) == 1 and extra[0] in _ALPHA:
        return _ALPHA[extra[0]]
    import tifffile

    try:
        kind = tifffile.PHOTOMETRIC(photometric).name
    except ValueError:
        kind = str(photometric)
    if photometric == 5:
        kind += " (CMYK)"
    if pages:
        layout = f"{pages} pages of one {kind} sample each"
    else:
        names = []
        for e in extra:
            try:
                names.append(tifffile.EXTRASAMPLE(e).name)
            except ValueError:
                names.append(str(e))
        layout = f"photometric {kind}, ExtraSamples {', '.join(names) or 'none'}"
    expected = "RGB" if channels == 4 else "grey"
    raise KerasnucError(
        f"{name}: {channels} channels that are not {expected} + alpha ({layout}); kerasnuc reads "
        "RGB H&E images: save the RGB channels alone (multiplex planes and CMYK are not supported)"
    )


class _UnsupportedLayout(Exception):
    """The TIFF cannot be read lazily segment by segment."""


class TiffSource(ImageSource):
    """A (pyramidal) TIFF / OME-TIFF read lazily, segment by segment, with :mod:`tifffile`.

    The levels are those of the file's first series (SubIFD or OME pyramids, SVS/NDPI levels).
    :meth:`read_region` decodes only the strips or tiles that the region overlaps, reading their
    bytes through tifffile's file handle and decoding them with the page's own codec, and keeps
    up to ``cache_bytes`` of decoded segments (least recently used dropped first), so that the
    overlapping reads of neighbouring tiles decode each segment about once.

    Args:
        path: TIFF file.
        mpp: micrometres per pixel; overrides the file's tags.
        grey: greyscale policy (see :class:`ArraySource`).
        cache_bytes: size of the decoded-segment cache.

    Raises:
        KerasnucError: unreadable or corrupt file, unsupported layout, greyscale with
            ``grey="error"``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        mpp: float | None = None,
        grey: GreyPolicy = "error",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        import tifffile

        _check_grey(grey)
        self.path = Path(path)
        self.name = str(path)
        self._tif = None
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._cache_bytes = 0
        self._convert: _Conversion | None = None
        self.cache_limit = int(cache_bytes)
        if not self.path.is_file():
            raise KerasnucError(f"{self.name}: file not found")
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            levels = list(series.levels)
            self._pages = [self._level_page(level) for level in levels]
        except _UnsupportedLayout:
            self.close()
            raise
        except Exception as exc:  # tifffile raises many exception types for corrupt files
            self.close()
            raise KerasnucError(f"{self.name}: cannot read TIFF ({exc})") from exc
        self._keys = [page.keyframe for page in self._pages]
        key0 = self._keys[0]
        self._init_levels([(k.imagelength, k.imagewidth) for k in self._keys])
        photometric = int(key0.photometric)
        found = (
            _ome_mpp(self._tif.ome_metadata if self._tif.is_ome else None, self.name)
            or _svs_mpp(key0.description, self.name)
            or _tag_mpp(key0, self.name)
        )
        self.mpp = _resolve_mpp(mpp, found, self.name)
        sep, _, _, _, contig = key0.shaped
        self._samples = sep * contig
        try:
            premultiplied = _tiff_alpha(self._samples, photometric, key0.extrasamples, self.name)
            max_value = self._max_value(key0.dtype)
            self._convert = _Conversion(
                self._samples,
                key0.dtype,
                max_value,
                grey,
                self.name,
                invert=photometric == 0,
                premultiplied=premultiplied,
            )
        except Exception:
            self.close()
            raise

    def _level_page(self, level: Any) -> Any:
        pages = [p for p in level.pages if p is not None]
        if len(pages) != 1:
            raise _UnsupportedLayout(f"{self.name}: {len(pages)} pages per level")
        page = pages[0]
        key = page.keyframe
        sep, depth, _, _, contig = key.shaped
        if depth != 1 or (sep > 1 and contig > 1):
            raise _UnsupportedLayout(f"{self.name}: volumetric or mixed planar layout")
        if int(key.photometric) not in (0, 1, 2, 6):
            raise _UnsupportedLayout(f"{self.name}: photometric {key.photometric!r}")
        if int(key.photometric) == 6 and int(key.compression) not in (6, 7, 33007, 34892):
            raise _UnsupportedLayout(f"{self.name}: YCbCr without JPEG")
        if key.dtype is None:
            raise _UnsupportedLayout(f"{self.name}: unsupported sample format")
        return page

    def _max_value(self, dtype: np.dtype) -> float:
        """Largest stored value, from the coarsest level (only needed for non-uint8 data)."""
        if np.dtype(dtype) == np.uint8:
            return 255.0
        level = self.level_count - 1
        h, w = self.level_shapes[level]
        step = max(1, math.ceil(max(h, w) / 2048))
        values = []
        for y in range(0, h, 2048 * step):
            for x in range(0, w, 2048 * step):
                values.append(
                    float(self._raw(level, y, x, min(h, y + 2048), min(w, x + 2048)).max())
                )
        return math.nan if any(math.isnan(v) for v in values) else max(values)

    def _segment(self, level: int, index: int) -> np.ndarray | None:
        """Decoded segment ``(rows, cols, samples)`` (None for a segment absent from the file)."""
        key = (level, index)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            page, keyframe = self._pages[level], self._keys[level]
            offset = page.dataoffsets[index]
            count = page.databytecounts[index]
            seg = None
            if count > 0:
                fh = self._tif.filehandle
                kwargs: dict[str, Any] = {"_fullsize": keyframe.is_tiled}
                if int(keyframe.compression) in (6, 7, 33007, 34892):  # JPEG variants
                    kwargs["jpegtables"] = page.jpegtables
                    kwargs["jpegheader"] = keyframe.jpegheader
                try:
                    with fh.lock:
                        fh.seek(offset)
                        data = fh.read(count)
                    seg, _, _ = keyframe.decode(data, index, **kwargs)
                except Exception as exc:  # codec errors come in many types
                    raise KerasnucError(
                        f"{self.name}: cannot decode segment {index} of level {level} ({exc})"
                    ) from exc
                if seg is not None:
                    seg = seg[0]
            self._cache[key] = seg
            self._cache_bytes += 0 if seg is None else seg.nbytes
            while self._cache_bytes > self.cache_limit and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= 0 if old is None else old.nbytes
            return seg

    def _raw(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Stored pixels ``(y1 - y0, x1 - x0, samples)`` of a region inside ``level``."""
        key = self._keys[level]
        sep, _, height, width, contig = key.shaped
        if key.is_tiled:
            seg_h, seg_w = key.tilelength, key.tilewidth
        else:
            seg_h, seg_w = min(key.rowsperstrip, height), width
        across = math.ceil(width / seg_w)
        per_plane = across * math.ceil(height / seg_h)
        out = np.empty((y1 - y0, x1 - x0, sep * contig), dtype=key.dtype)
        white = None if self._convert is None else self._convert.white
        for plane in range(sep):
            channels = slice(plane, plane + 1) if sep > 1 else slice(None)
            for row in range(y0 // seg_h, (y1 - 1) // seg_h + 1):
                for col in range(x0 // seg_w, (x1 - 1) // seg_w + 1):
                    seg = self._segment(level, plane * per_plane + row * across + col)
                    sy, sx = row * seg_h, col * seg_w
                    a0, a1 = max(y0, sy), min(y1, sy + seg_h)
                    b0, b1 = max(x0, sx), min(x1, sx + seg_w)
                    dst = out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0, channels]
                    if seg is None:
                        dst[...] = 0 if white is None else white[channels]
                    else:
                        dst[...] = seg[a0 - sy : a1 - sy, b0 - sx : b1 - sx]
        return out

    def _read(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        return self._convert(self._raw(level, y0, x0, y1, x1))

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        self._cache.clear()
        self._cache_bytes = 0


class OpenSlideSource(ImageSource):
    """A whole-slide image read with OpenSlide (SVS, NDPI, MRXS, SCN, VMS, BIF, ...).

    OpenSlide is optional and imported only here. Regions come back as premultiplied RGBA,
    which is composited on white (areas outside the scanned region read as white).

    Args:
        path: slide file.
        mpp: micrometres per pixel; overrides ``openslide.mpp-x``.

    Raises:
        KerasnucError: OpenSlide is missing, or cannot open the file.
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None) -> None:
        openslide = import_openslide(path)
        self.path = Path(path)
        self.name = str(path)
        self._slide = None
        if not self.path.exists():
            raise KerasnucError(f"{self.name}: file not found")
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except Exception as exc:  # OpenSlideError, OpenSlideUnsupportedFormatError, OSError
            raise KerasnucError(f"{self.name}: OpenSlide cannot open it ({exc})") from exc
        slide = self._slide
        self._init_levels([(h, w) for w, h in slide.level_dimensions])
        self.level_downsamples = [float(d) for d in slide.level_downsamples]
        found = None
        try:
            found = float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X, "nan"))
        except ValueError:
            found = None
        self.mpp = _resolve_mpp(mpp, _plausible_mpp(found, "openslide.mpp-x", self.name), self.name)

    def _read(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        location = (round(x0 * ds), round(y0 * ds))
        try:
            rgba = np.asarray(self._slide.read_region(location, level, (x1 - x0, y1 - y0)))
        except Exception as exc:  # OpenSlideError on corrupt tiles
            raise KerasnucError(f"{self.name}: OpenSlide cannot read a region ({exc})") from exc
        color = rgba[:, :, :3].astype(np.uint32)
        alpha = rgba[:, :, 3:].astype(np.uint32)
        return ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def openslide_available() -> bool:
    """Whether ``openslide`` (openslide-python with its library) can be imported."""
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def import_openslide(path: str | os.PathLike | None = None) -> Any:
    """Import :mod:`openslide`, or raise a :class:`KerasnucError` explaining how to install it."""
    try:
        import openslide
    except (ImportError, OSError) as exc:
        where = f"{path}: " if path is not None else ""
        raise KerasnucError(
            f"{where}reading this slide format needs OpenSlide "
            f"(pip install openslide-python openslide-bin) ({exc})"
        ) from exc
    return openslide


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in (".ome.tiff", ".ome.tif"):
        if name.endswith(ext):
            return ".tif"
    return path.suffix.lower()


def open_image(
    path: str | os.PathLike,
    mpp: float | None = None,
    grey: GreyPolicy = "error",
) -> ImageSource:
    """Open an image or whole-slide image for region reading.

    Args:
        path: image file (see the module docstring for the formats).
        mpp: micrometres per level-0 pixel; overrides what the file says.
        grey: ``"error"`` (default) rejects greyscale images with a :class:`KerasnucError`,
            ``"convert"`` repeats the grey value in R, G and B.

    Returns:
        An :class:`ImageSource` (use it as a context manager, or call ``close()``).

    Raises:
        KerasnucError: missing, corrupt or unsupported file.
    """
    _check_grey(grey)
    check_mpp(mpp)
    path = Path(path)
    if not path.is_file():
        raise KerasnucError(f"{path}: file not found")
    suffix = _suffix(path)
    if suffix in OPENSLIDE_SUFFIXES:
        if openslide_available():
            return OpenSlideSource(path, mpp=mpp)
        if suffix not in TIFF_BASED_SLIDE_SUFFIXES:
            import_openslide(path)
        logger.info("%s: OpenSlide is not installed; reading it with tifffile", path)
        suffix = ".tif"
    if suffix in TIFF_SUFFIXES:
        try:
            return TiffSource(path, mpp=mpp, grey=grey)
        except _UnsupportedLayout as exc:
            return _small_tiff(path, mpp, grey, exc)
    if suffix in IMAGE_SUFFIXES:
        return ArraySource(read_image(path), mpp=mpp, name=str(path), grey=grey)
    raise KerasnucError(
        f"{path}: unsupported image format {suffix!r} (expected one of "
        f"{', '.join(IMAGE_SUFFIXES + TIFF_SUFFIXES + OPENSLIDE_SUFFIXES)})"
    )


def _small_tiff(path: Path, mpp: float | None, grey: GreyPolicy, why: Exception) -> ImageSource:
    """Decode a TIFF whose layout cannot be read lazily, if it is small enough."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            pixels = math.prod(series.shape) // max(1, series.shape[-1] if series.ndim > 2 else 1)
            if pixels > _FALLBACK_PIXELS:
                raise KerasnucError(f"{path}: unsupported TIFF layout for a large image ({why})")
            arr = np.squeeze(series.asarray())
            key = series.keyframe
            found = _tag_mpp(key, str(path))
            photometric, extrasamples = int(key.photometric), tuple(key.extrasamples)
            samples = int(key.samplesperpixel)
    except KerasnucError:
        raise
    except Exception as exc:  # corrupt file
        raise KerasnucError(f"{path}: cannot read TIFF ({exc})") from exc
    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[2] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    channels = arr.shape[2] if arr.ndim == 3 else 1
    pages = channels if samples == 1 and channels > 1 else 0
    premultiplied = _tiff_alpha(channels, photometric, extrasamples, str(path), pages=pages)
    if photometric == 5:  # CMYK with 3 or 5+ channels: not RGB either
        raise KerasnucError(f"{path}: CMYK (photometric SEPARATED) TIFF; save it as RGB first")
    return ArraySource(
        arr,
        mpp=_resolve_mpp(mpp, found, str(path)),
        name=str(path),
        grey=grey,
        premultiplied=premultiplied,
    )
