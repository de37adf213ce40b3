"""Per-nucleus measurements: position, size, shape, stain and class confidence (numpy / scipy).

:func:`measure_instances` turns an instance map into a :class:`NucleusTable`, one row per
nucleus, with the columns pathologists export (QuPath-style detection measurements). Every
column is computed for all nuclei at once from ``np.bincount`` sums over the foreground
pixels; only the convex hulls behind the solidity (:func:`~kerasnuc.postprocess.common.
instance_solidity`) and the bounding boxes (``scipy.ndimage.find_objects``) loop over nuclei, in
compiled code.

Conventions:

* **Coordinates** are in pixels of the full image (slide): ``offset = (row0, col0)`` is where the
  measured map's top-left pixel lies, so tiles of a slide get slide coordinates.
* **Centroids** use the pixel-*index* convention of numpy / ``skimage.measure.regionprops``:
  the centre of pixel ``(r, c)`` is ``(x, y) = (c, r)``. (QuPath puts the centre at
  ``(c + 0.5, r + 0.5)``, see :mod:`kerasnuc.io.geojson`; add 0.5 to compare.)
* **Bounding boxes** ``(x0, y0, x1, y1)`` are half-open pixel ranges, ``instances[y0:y1, x0:x1]``;
  the same numbers are the box's corners in QuPath's pixel-corner convention.
* **Micrometres**: with ``mpp`` (micrometres per pixel, square pixels) every length column gets a
  ``_um`` twin (areas ``_um2``), and ``centroid_*_um`` = pixel centroid x ``mpp``.
* **Second moments** (Hu 1962; as ``regionprops``): with the central moments of the pixel
  coordinates normalised by the area, ``mu_rr``, ``mu_cc``, ``mu_rc``, the covariance
  eigenvalues are ``l1 >= l2``; ``major_axis = 4 sqrt(l1)``, ``minor_axis = 4 sqrt(l2)`` (the
  axes of the ellipse with the same second moments) and ``eccentricity = sqrt(1 - l2 / l1)``
  (0 for a disc, -> 1 for a line; 0 for a single pixel).
* **Perimeter**: the estimator of ``skimage.measure.perimeter(mask, neighborhood=4)`` (Benkrid &
  Crookes, "Design and FPGA implementation of a perimeter estimator", 2000), which
  ``regionprops(...).perimeter`` reports: the 4-connected inner border pixels are classified by
  the configuration of their border neighbours and contribute 1, sqrt(2) or (1 + sqrt(2)) / 2.
  It follows the line through the border pixel *centres* (a 4 x 6 rectangle measures 16, not
  the 20 of its pixel-edge outline) and does not overestimate round shapes the way the
  staircase pixel-edge length does (by up to 4/pi). Computed for every nucleus at once;
  neighbours of another nucleus do not count.
* **Solidity**: :func:`kerasnuc.postprocess.common.instance_solidity` (area over the number of
  pixel centres in the convex hull; 1 for digitally convex shapes).
* **Haematoxylin optical density**: the mean over the nucleus of the haematoxylin channel of
  ``skimage.color.rgb2hed`` (Ruifrok & Johnston colour deconvolution, "Quantification of
  histochemical staining by color deconvolution", Anal. Quant. Cytol. Histol. 23(4), 2001):
  ``H = max(0, (ln(max(rgb, 1e-6)) / ln(1e-6)) @ hed_from_rgb[:, 0])`` per pixel with ``rgb`` in
  [0, 1]; i.e. the haematoxylin optical density ``-ln(rgb)`` deconvolved and divided by
  ``-ln(1e-6) ~= 13.8``. (``kerasnuc.data.stain.rgb_to_hed`` implements the same convention
  with TensorFlow ops; this module stays numpy-only.)
* **Class**: the majority value of the class map over the nucleus (ties -> smaller id) when a
  class map is given, else the argmax over the foreground classes 1..C of the probabilities.
  ``class_probability`` is the probability of that class; ``prob_<name>`` columns hold the whole
  ``(N, C + 1)`` probability row (see :meth:`NucleusTable.flat_columns`).

A column exists only when its input was given (``_um`` columns need ``mpp``,
``hematoxylin_od_mean`` the image, class columns a class map or probabilities, ``uncertainty``
the uncertainty), so every table of one run has the same columns, even an empty one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed_from_rgb

from kerasnuc.instances import compact_ids
from kerasnuc.postprocess.common import (
    centroids_by_id,
    instance_areas,
    instance_solidity,
)

# Benkrid & Crookes border-pixel codes -> perimeter weight, exactly as skimage.measure.perimeter.
_PERIMETER_WEIGHTS = np.zeros(50, dtype=np.float64)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = math.sqrt(2.0)
_PERIMETER_WEIGHTS[[13, 23]] = (1.0 + math.sqrt(2.0)) / 2.0
_EDGE_SHIFTS = ((-1, 0), (1, 0), (0, -1), (0, 1))
_CORNER_SHIFTS = ((-1, -1), (-1, 1), (1, -1), (1, 1))
# skimage's rgb2hed floor and log normalisation.
_RGB_FLOOR = 1e-6
_HEMATOXYLIN_FROM_RGB = np.asarray(hed_from_rgb, dtype=np.float64)[:, 0]

# Columns holding lengths in pixels (a `_um` twin is added with mpp) and their order.
_LENGTH_COLUMNS = ("perimeter", "major_axis", "minor_axis")


@dataclass(frozen=True)
class NucleusTable:
    """Per-nucleus measurements, one row per nucleus (increasing id from ``measure_instances``).

    Attributes:
        columns: ordered ``{name: (N,) array}``; numbers are int64 or float64, ``class_name`` is
            an object array of str. Always ``id`` (int64, the id in the instance map), then
            ``class``/``class_name`` (with class information), ``centroid_x_px``,
            ``centroid_y_px`` (+ ``_um``), ``bbox_x0``, ``bbox_y0``, ``bbox_x1``, ``bbox_y1``,
            ``area_px`` (+ ``area_um2``), ``perimeter_px`` (+ ``_um``), ``major_axis_px``,
            ``minor_axis_px`` (+ ``_um``), ``eccentricity``, ``solidity``, and when given
            ``hematoxylin_od_mean``, ``class_probability``, ``uncertainty``. See the module
            docstring for the definitions.
        probabilities: ``(N, C + 1)`` float64 class probabilities (column 0 = background), or
            None.
        class_names: ``{class id: name}`` used for ``class_name`` and the ``prob_<name>``
            columns.
        mpp: micrometres per pixel, or None.
    """

    columns: dict[str, np.ndarray]
    probabilities: np.ndarray | None = None
    class_names: dict[int, str] = field(default_factory=dict)
    mpp: float | None = None

    def __len__(self) -> int:
        return int(self.columns["id"].shape[0])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    @property
    def ids(self) -> np.ndarray:
        """``(N,)`` int64 nucleus ids."""
        return self.columns["id"]

    def probability_names(self) -> list[str]:
        """Names of the ``prob_<class>`` columns, one per probability column (empty without)."""
        if self.probabilities is None:
            return []
        names = []
        for k in range(self.probabilities.shape[1]):
            label = self.class_names.get(k, "background" if k == 0 else str(k))
            names.append(f"prob_{label}")
        return names

    def flat_columns(self) -> dict[str, np.ndarray]:
        """All columns, with the probability matrix expanded to ``prob_<class name>`` columns."""
        out = dict(self.columns)
        for k, name in enumerate(self.probability_names()):
            if name in out:
                raise ValueError(
                    f"Probability column {name!r} collides with a measurement column; rename "
                    f"the class. Received: class_names={self.class_names}"
                )
            out[name] = self.probabilities[:, k]
        return out

    def rows(self) -> Iterator[dict[str, Any]]:
        """Yield one ``{column: python scalar}`` dict per nucleus (flat columns)."""
        flat = self.flat_columns()
        lists = {name: col.tolist() for name, col in flat.items()}
        for i in range(len(self)):
            yield {name: values[i] for name, values in lists.items()}

    @staticmethod
    def concat(tables: Sequence[NucleusTable]) -> NucleusTable:
        """Stack tables with the same columns (e.g. the tiles of a slide) row-wise."""
        if not tables:
            raise ValueError("`tables` must hold at least one NucleusTable. Received: []")
        first = tables[0]
        for t in tables[1:]:
            if list(t.columns) != list(first.columns) or (t.probabilities is None) != (
                first.probabilities is None
            ):
                raise ValueError(
                    "All tables must have the same columns. Received: "
                    f"{list(first.columns)} and {list(t.columns)}"
                )
        columns = {k: np.concatenate([t.columns[k] for t in tables]) for k in first.columns}
        probs = (
            None
            if first.probabilities is None
            else np.concatenate([t.probabilities for t in tables], axis=0)
        )
        return NucleusTable(columns, probs, dict(first.class_names), first.mpp)


def _check_map(arr: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"`{name}` must be a (H, W) integer array. Received: shape={arr.shape}, "
            f"dtype={arr.dtype}"
        )
    if shape is not None and arr.shape != shape:
        raise ValueError(
            f"`{name}` must have the shape of `instances` {shape}. Received: shape={arr.shape}"
        )
    if arr.size and int(arr.min()) < 0:
        raise ValueError(f"`{name}` must be non-negative. Received: min={int(arr.min())}")
    return arr


def _second_moments(
    labels: np.ndarray, n: int, centroids: np.ndarray, fg: np.ndarray, lab: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenvalues ``l1 >= l2`` of the coordinate covariance and eccentricity, per label."""
    rows, cols = np.divmod(fg, labels.shape[1])
    dr = rows - centroids[lab, 0]
    dc = cols - centroids[lab, 1]
    area = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    mrr = np.bincount(lab, weights=dr * dr, minlength=n + 1)[1:] / area
    mcc = np.bincount(lab, weights=dc * dc, minlength=n + 1)[1:] / area
    mrc = np.bincount(lab, weights=dr * dc, minlength=n + 1)[1:] / area
    half_trace = (mrr + mcc) / 2.0
    root = np.sqrt(((mrr - mcc) / 2.0) ** 2 + mrc**2)
    l1 = half_trace + root
    l2 = np.maximum(half_trace - root, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1.0 - l2 / np.where(l1 > 0, l1, 1.0), 0, 1)), 0.0)
    return l1, l2, ecc


def _perimeters(labels: np.ndarray, n: int) -> np.ndarray:
    """``skimage.measure.perimeter(labels == k, 4)`` for every label k = 1..n at once."""
    padded = np.pad(labels, 1)
    h, w = labels.shape

    def shifted(arr: np.ndarray, dr: int, dc: int) -> np.ndarray:
        return arr[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]

    interior = labels > 0
    for dr, dc in _EDGE_SHIFTS:
        interior &= shifted(padded, dr, dc) == labels
    border = (labels > 0) & ~interior
    border_padded = np.pad(border, 1)
    code = border.astype(np.int32)
    for shifts, weight in ((_EDGE_SHIFTS, 2), (_CORNER_SHIFTS, 10)):
        for dr, dc in shifts:
            same = shifted(border_padded, dr, dc) & (shifted(padded, dr, dc) == labels)
            code += weight * (same & border)
    rr, cc = np.nonzero(border)
    return np.bincount(labels[rr, cc], weights=_PERIMETER_WEIGHTS[code[rr, cc]], minlength=n + 1)[
        1:
    ]


def _hematoxylin(image: np.ndarray, fg: np.ndarray, lab: np.ndarray, n: int) -> np.ndarray:
    """Mean haematoxylin channel of ``skimage.color.rgb2hed`` over each label's pixels."""
    rgb = image.reshape(-1, image.shape[-1])[fg].astype(np.float64)
    if np.issubdtype(image.dtype, np.integer):
        rgb /= float(np.iinfo(image.dtype).max)
    np.maximum(rgb, _RGB_FLOOR, out=rgb)
    h = np.maximum((np.log(rgb) / math.log(_RGB_FLOOR)) @ _HEMATOXYLIN_FROM_RGB, 0.0)
    area = np.bincount(lab, minlength=n + 1)[1:]
    return np.bincount(lab, weights=h, minlength=n + 1)[1:] / np.maximum(area, 1)


def _majority_class(classes: np.ndarray, fg: np.ndarray, lab: np.ndarray, n: int) -> np.ndarray:
    cls = classes.ravel()[fg].astype(np.int64)
    num = int(cls.max(initial=0)) + 1
    votes = np.bincount(lab.astype(np.int64) * num + cls, minlength=(n + 1) * num)
    return votes.reshape(n + 1, num)[1:].argmax(axis=1).astype(np.int64)


def measure_instances(
    instances: np.ndarray,
    image: np.ndarray | None = None,
    classes: np.ndarray | None = None,
    probabilities: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    mpp: float | None = None,
    offset: tuple[int, int] = (0, 0),
    class_names: Mapping[int, str] | None = None,
) -> NucleusTable:
    """Measure every nucleus of an instance map (definitions in the module docstring).

    Args:
        instances: ``(H, W)`` non-negative integer map, 0 = background, any positive ids (need
            not be consecutive).
        image: ``(H, W, 3)`` RGB, uint8 (or float in [0, 1]), for ``hematoxylin_od_mean``.
        classes: ``(H, W)`` integer class map (0 = background, 1..C cell types).
        probabilities: ``(N, C + 1)`` per-nucleus class probabilities, rows in increasing id
            order (``PostprocResult.table["probabilities"]``).
        uncertainty: ``(N,)`` per-nucleus uncertainty, rows in increasing id order.
        mpp: micrometres per pixel (square pixels), or None for pixel units only.
        offset: ``(row0, col0)`` of the map's top-left pixel in the full image; added to
            centroids and bounding boxes.
        class_names: ``{class id: name}`` for the ``class_name`` column (missing ids: the id
            as text).

    Returns:
        :class:`NucleusTable` with one row per nucleus in increasing id order.

    Raises:
        ValueError: bad shapes, dtypes or values.
    """
    instances = _check_map(instances, "instances")
    shape = instances.shape
    if classes is not None:
        classes = _check_map(classes, "classes", shape)
    if image is not None:
        image = np.asarray(image)
        if image.shape != (*shape, 3):
            raise ValueError(
                f"`image` must be (H, W, 3) with the shape of `instances` {shape}. "
                f"Received: shape={image.shape}"
            )
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"`mpp` must be a positive number or None. Received: mpp={mpp}")
    if len(offset) != 2 or any(int(o) != o for o in offset):
        raise ValueError(f"`offset` must be two ints (row0, col0). Received: offset={offset}")
    row0, col0 = int(offset[0]), int(offset[1])

    labels, ids = compact_ids(instances)
    n = int(ids.size)
    if probabilities is not None:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.ndim != 2 or probabilities.shape[0] != n or probabilities.shape[1] < 2:
            raise ValueError(
                f"`probabilities` must be (N, C + 1) with N = {n} nuclei and C >= 1. "
                f"Received: shape={probabilities.shape}"
            )
    if uncertainty is not None:
        uncertainty = np.asarray(uncertainty, dtype=np.float64)
        if uncertainty.shape != (n,):
            raise ValueError(
                f"`uncertainty` must be (N,) with N = {n} nuclei. "
                f"Received: shape={uncertainty.shape}"
            )
    names = {int(k): str(v) for k, v in (class_names or {}).items()}

    fg = np.flatnonzero(labels)
    lab = labels.ravel()[fg]
    area = instance_areas(labels)[1:]
    centroids = np.vstack([np.full((1, 2), np.nan), centroids_by_id(labels, n)])
    l1, l2, ecc = _second_moments(labels, n, centroids, fg, lab)
    centroids = centroids[1:]
    boxes = np.zeros((n, 4), dtype=np.int64)
    for k, sl in enumerate(ndi.find_objects(labels)):
        boxes[k] = (sl[1].start + col0, sl[0].start + row0, sl[1].stop + col0, sl[0].stop + row0)

    cols: dict[str, np.ndarray] = {"id": ids}
    if classes is not None or probabilities is not None:
        if classes is not None:
            cls = _majority_class(classes, fg, lab, n)
        else:
            cls = probabilities[:, 1:].argmax(axis=1).astype(np.int64) + 1
        cols["class"] = cls
        cols["class_name"] = np.array([names.get(int(k), str(int(k))) for k in cls], dtype=object)
    cols["centroid_x_px"] = centroids[:, 1] + col0
    cols["centroid_y_px"] = centroids[:, 0] + row0
    if mpp is not None:
        cols["centroid_x_um"] = cols["centroid_x_px"] * mpp
        cols["centroid_y_um"] = cols["centroid_y_px"] * mpp
    for j, name in enumerate(("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")):
        cols[name] = boxes[:, j]
    cols["area_px"] = area
    if mpp is not None:
        cols["area_um2"] = area * mpp**2
    lengths = {
        "perimeter": _perimeters(labels, n),
        "major_axis": 4.0 * np.sqrt(l1),
        "minor_axis": 4.0 * np.sqrt(l2),
    }
    for name in _LENGTH_COLUMNS:
        cols[f"{name}_px"] = lengths[name]
        if mpp is not None:
            cols[f"{name}_um"] = lengths[name] * mpp
    cols["eccentricity"] = ecc
    cols["solidity"] = instance_solidity(labels)[1:]
    if image is not None:
        cols["hematoxylin_od_mean"] = _hematoxylin(image, fg, lab, n)
    if probabilities is not None:
        cols["class_probability"] = probabilities[np.arange(n), cols["class"]]
    if uncertainty is not None:
        cols["uncertainty"] = uncertainty
    return NucleusTable(cols, probabilities, names, None if mpp is None else float(mpp))
