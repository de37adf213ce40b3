"""Training targets derived from an instance map (and a class map), computed once per image.

The targets of the ``conic`` method (Rumberger et al., CoNIC 2022, METHODS.md section 1):

* **three-label map** (Section II.C of the paper, after Caicedo et al.): 0 background,
  1 nucleus interior, 2 nucleus boundary;
* **centre vectors** (auxiliary regression task, after Lee et al.): for every nucleus pixel the
  2-D vector ``(dy, dx)`` from the pixel to the centroid of its nucleus;
* optionally the **HoVer-Net horizontal/vertical maps** (Graham et al., Medical Image Analysis
  2019): per nucleus, the x and y offsets from the centroid scaled to ``[-1, 1]``;
* **semantic** class map (or its one-hot encoding with background as channel 0) and the per-image
  class pixel frequencies ``X_{c,n}`` used by the loss weighting and importance sampling (Eq. 1).

Everything here is plain numpy/scipy working on one ``(H, W)`` image, so the tf.data pipeline can
wrap it with ``tf.numpy_function``. Nothing loops over nuclei in Python: per-nucleus statistics
(areas, centroids, extrema) use ``np.bincount`` and labelled ``scipy.ndimage`` reductions.

Conventions: rows are ``y`` and columns are ``x``; a pixel ``(r, c)`` has its centre at
``(y, x) = (r, c)``; instance ids need not be consecutive (``0`` = background).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from kerasnuc.data.sampling import class_pixel_frequencies

VectorUnits = Literal["pixels", "scale", "instance"]

#: Semantic label of nucleus pixels whose cell type is unknown (e.g. a dataset without types
#: trained together with one that has them); the semantic loss ignores them.
UNKNOWN_CLASS = -1

THREE_LABEL_BACKGROUND = 0
THREE_LABEL_INTERIOR = 1
THREE_LABEL_BOUNDARY = 2


def _check_instances(instances: np.ndarray) -> np.ndarray:
    instances = np.asarray(instances)
    if instances.ndim != 2 or not np.issubdtype(instances.dtype, np.integer):
        raise ValueError(
            "`instances` must be a 2-D integer array. "
            f"Received: shape={instances.shape}, dtype={instances.dtype}"
        )
    if instances.size and instances.min() < 0:
        raise ValueError(f"`instances` ids must be >= 0. Received: min={instances.min()}")
    return instances


def _compact_labels(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel an instance map to ``0..N`` (order of the original ids kept).

    Returns:
        ``(labels, ids)``: ``(H, W)`` int64 map with values ``0..N`` and the ``(N,)`` original ids,
        ``ids[k - 1]`` being the id of compact label ``k``.
    """
    flat = instances.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size + 1024:
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[instances], ids
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids.size and ids[0] == 0:
        ids = ids[1:]
    else:
        inverse = inverse + 1
    return inverse.reshape(instances.shape).astype(np.int64), ids


def _centroids_compact(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Areas ``(n + 1,)`` and centroids ``(n + 1, 2)`` (row, col) of labels ``0..n`` (0 unused)."""
    rows, cols = np.indices(labels.shape, dtype=np.float64)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    safe = np.maximum(area, 1.0)
    cy = np.bincount(flat, weights=rows.ravel(), minlength=n + 1) / safe
    cx = np.bincount(flat, weights=cols.ravel(), minlength=n + 1) / safe
    return area, np.stack([cy, cx], axis=1)


def instance_centroids(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid of every nucleus of an instance map (mean pixel position).

    Args:
        instances: ``(H, W)`` integer instance map, 0 = background.

    Returns:
        ``(ids, centroids)``: ``(N,)`` int64 instance ids in increasing order and ``(N, 2)``
        float64 centroids ``(row, col)``. A non-convex nucleus may have its centroid outside its
        own pixels.
    """
    instances = _check_instances(instances)
    labels, ids = _compact_labels(instances)
    _, centroids = _centroids_compact(labels, ids.size)
    return ids, centroids[1:]


def label_boundaries(labels: np.ndarray, width: int = 1, connectivity: int = 1) -> np.ndarray:
    """Pixels with a differently labelled pixel within ``width`` steps (a ``2 * width`` px band).

    A pixel is marked when the neighbourhood ``N_width`` (``connectivity=1``: the diamond of
    city-block radius ``width``, i.e. ``width`` steps between 4-neighbours; ``connectivity=2``: the
    ``(2 * width + 1)`` square, 8-neighbours) holds a label different from its own. Both sides of
    every label change are marked. Computed as ``max_filter(labels) != min_filter(labels)``.
    Outside the image the border pixels are repeated, so the image border itself is not a
    boundary (a nucleus cut by a tile edge continues outside the tile).

    Args:
        labels: ``(H, W)`` integer label map (0 is an ordinary label here).
        width: neighbourhood radius in pixels, >= 1.
        connectivity: 1 (4-neighbours) or 2 (8-neighbours).

    Returns:
        ``(H, W)`` bool.
    """
    if not isinstance(width, int | np.integer) or width < 1:
        raise ValueError(f"`width` must be a positive int. Received: width={width}")
    if connectivity not in (1, 2):
        raise ValueError(f"`connectivity` must be 1 or 2. Received: connectivity={connectivity}")
    footprint = ndi.iterate_structure(ndi.generate_binary_structure(2, connectivity), int(width))
    high = ndi.maximum_filter(labels, footprint=footprint, mode="nearest")
    low = ndi.minimum_filter(labels, footprint=footprint, mode="nearest")
    return high != low


def three_label_map(
    instances: np.ndarray,
    boundary_width: int = 1,
    connectivity: int = 1,
    keep_seed: bool = True,
) -> np.ndarray:
    """Three-label target: 0 background, 1 nucleus interior, 2 nucleus boundary.

    A pixel of nucleus A is boundary when a pixel of another nucleus or of the background lies
    within ``boundary_width`` steps of it (see :func:`label_boundaries`), so touching nuclei are
    separated by boundary on both sides and the boundary band is ``boundary_width`` px thick
    inside each nucleus. With ``connectivity=1`` the interiors of two different nuclei are never
    8-adjacent (seed pixels of tiny nuclei, below, excepted). The image border is not a
    boundary.

    Tiny nuclei (our choice, the paper is silent): a nucleus thinner than ``2 * boundary_width``
    has no interior left. With ``keep_seed=True`` (default) exactly one of its pixels is set to
    interior, so that every nucleus keeps a seed for the watershed post-processing: the pixel
    farthest (Euclidean) from the nucleus' 1-px boundary, ties broken by the distance to the
    centroid and then by raster order. With ``keep_seed=False`` such nuclei are all boundary.

    Args:
        instances: ``(H, W)`` integer instance map, 0 = background.
        boundary_width: boundary thickness in pixels inside each nucleus, >= 1.
        connectivity: 1 (4-neighbours, default, as ``skimage.segmentation.find_boundaries``) or
            2 (8-neighbours) for the neighbourhood that defines "adjacent".
        keep_seed: give every nucleus at least one interior pixel.

    Returns:
        ``(H, W)`` uint8 with values in {0, 1, 2}.
    """
    instances = _check_instances(instances)
    fg = instances > 0
    boundary = fg & label_boundaries(instances, boundary_width, connectivity)
    out = np.zeros(instances.shape, dtype=np.uint8)
    out[fg] = THREE_LABEL_INTERIOR
    out[boundary] = THREE_LABEL_BOUNDARY
    if keep_seed and fg.any():
        _add_missing_seeds(instances, out, connectivity)
    return out


def _add_missing_seeds(instances: np.ndarray, out: np.ndarray, connectivity: int) -> None:
    """Mark one interior pixel in every nucleus that has none (in place, see three_label_map)."""
    labels, ids = _compact_labels(instances)
    n = ids.size
    area, centroids = _centroids_compact(labels, n)
    interior = np.bincount(labels[out == THREE_LABEL_INTERIOR], minlength=n + 1)
    missing = (area > 0) & (interior == 0)
    missing[0] = False
    if not missing.any():
        return
    rows, cols = np.nonzero(missing[labels])
    lab = labels[rows, cols]
    # Depth: Euclidean distance to the nearest 1-px boundary pixel (0 on that boundary).
    thin = (labels > 0) & label_boundaries(labels, 1, connectivity)
    depth = ndi.distance_transform_edt(~thin)[rows, cols]
    to_centre = np.hypot(rows - centroids[lab, 0], cols - centroids[lab, 1])
    order = np.lexsort((cols, rows, to_centre, -depth, lab))
    _, first = np.unique(lab[order], return_index=True)
    pick = order[first]
    out[rows[pick], cols[pick]] = THREE_LABEL_INTERIOR


def centre_vectors(
    instances: np.ndarray,
    units: VectorUnits = "pixels",
    scale: float = 1.0,
) -> np.ndarray:
    """Vector from every nucleus pixel to the centroid of its nucleus.

    The auxiliary regression target of Rumberger et al. (CoNIC 2022, Section II.C): for a pixel
    ``(r, c)`` of nucleus ``k`` with centroid ``(cy_k, cx_k)`` (mean pixel position),
    ``v = (cy_k - r, cx_k - c)``; ``v = 0`` on background.

    Units (the paper does not state them):

    * ``"pixels"``: raw offsets in pixels;
    * ``"scale"``: offsets divided by ``scale`` (e.g. a typical nucleus radius in pixels, to keep
      the regression targets near ``[-1, 1]`` at any magnification);
    * ``"instance"``: offsets divided, per nucleus, by the largest vector length in that nucleus,
      so every nucleus spans the unit disc (single-pixel nuclei give 0).

    Args:
        instances: ``(H, W)`` integer instance map, 0 = background.
        units: ``"pixels"``, ``"scale"`` or ``"instance"``.
        scale: divisor for ``units="scale"``, > 0.

    Returns:
        ``(H, W, 2)`` float32, channel 0 = ``dy`` (rows), channel 1 = ``dx`` (columns).
    """
    instances = _check_instances(instances)
    if units not in ("pixels", "scale", "instance"):
        raise ValueError(
            f"`units` must be 'pixels', 'scale' or 'instance'. Received: units={units!r}"
        )
    if units == "scale" and not scale > 0:
        raise ValueError(f"`scale` must be > 0. Received: scale={scale}")
    labels, ids = _compact_labels(instances)
    _, centroids = _centroids_compact(labels, ids.size)
    rows, cols = np.indices(instances.shape, dtype=np.float64)
    dy = centroids[labels, 0] - rows
    dx = centroids[labels, 1] - cols
    bg = labels == 0
    dy[bg] = 0.0
    dx[bg] = 0.0
    if units == "scale":
        dy /= scale
        dx /= scale
    elif units == "instance" and ids.size:
        norm = np.hypot(dy, dx)
        longest = np.zeros(ids.size + 1)
        longest[1:] = ndi.maximum(norm, labels=labels, index=np.arange(1, ids.size + 1))
        div = longest[labels]
        div[div == 0] = 1.0
        dy /= div
        dx /= div
    return np.stack([dy, dx], axis=-1).astype(np.float32)


def hover_maps(instances: np.ndarray) -> np.ndarray:
    """HoVer-Net horizontal and vertical distance maps (Graham et al., 2019).

    Per nucleus with centroid ``(cy, cx)``: ``h = x - cx`` and ``v = y - cy`` (pixel minus
    centre, the opposite sign of :func:`centre_vectors`); negative values are divided by the
    largest negative magnitude and positive values by the largest positive value found in that
    nucleus, separately for ``h`` and ``v``, so each map spans ``[-1, 1]`` inside every nucleus
    (a side without any pixel stays unscaled: its values are 0). Background is 0. Unlike the
    reference implementation, the centroid is not rounded to a pixel, so the centre pixel is not
    necessarily exactly 0.

    Args:
        instances: ``(H, W)`` integer instance map, 0 = background.

    Returns:
        ``(H, W, 2)`` float32, channel 0 = horizontal (x), channel 1 = vertical (y), the
        HoVer-Net channel order.
    """
    instances = _check_instances(instances)
    labels, ids = _compact_labels(instances)
    n = ids.size
    _, centroids = _centroids_compact(labels, n)
    rows, cols = np.indices(instances.shape, dtype=np.float64)
    fg = labels > 0
    index = np.arange(1, n + 1)
    out = np.zeros(instances.shape + (2,), dtype=np.float32)
    for channel, (coord, centre) in enumerate(((cols, centroids[:, 1]), (rows, centroids[:, 0]))):
        offset = np.where(fg, coord - centre[labels], 0.0)
        if n == 0:
            continue
        pos = np.ones(n + 1)
        neg = np.ones(n + 1)
        pos[1:] = ndi.maximum(offset, labels=labels, index=index)
        neg[1:] = -ndi.minimum(offset, labels=labels, index=index)
        pos[pos <= 0] = 1.0
        neg[neg <= 0] = 1.0
        scaled = np.where(offset > 0, offset / pos[labels], offset / neg[labels])
        out[..., channel] = scaled
    return out


def semantic_map(
    instances: np.ndarray, classes: np.ndarray | None = None, num_classes: int = 0
) -> np.ndarray:
    """The class map used as semantic target.

    Args:
        instances: ``(H, W)`` integer instance map, 0 = background.
        classes: ``(H, W)`` integer class map (0 = background, 1..C) or None. Without classes the
            nuclei form class 1 (foreground).
        num_classes: C. With ``classes`` it must be >= every class id; without classes it must be
            0 or 1.

    Returns:
        ``(H, W)`` int32 with values in ``0..max(C, 1)``.
    """
    instances = _check_instances(instances)
    if classes is None:
        if num_classes not in (0, 1):
            raise ValueError(
                "Without `classes` the nuclei form a single class, so `num_classes` must be 0 "
                f"or 1. Received: num_classes={num_classes}"
            )
        return (instances > 0).astype(np.int32)
    classes = np.asarray(classes)
    if classes.shape != instances.shape or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(
            "`classes` must be an integer array shaped like `instances`. "
            f"Received: shape={classes.shape}, dtype={classes.dtype}, "
            f"instances shape={instances.shape}"
        )
    if classes.size and (classes.min() < 0 or classes.max() > num_classes):
        raise ValueError(
            f"`classes` values must lie in [0, num_classes={num_classes}]. "
            f"Received: min={classes.min()}, max={classes.max()}"
        )
    return classes.astype(np.int32)


def one_hot(semantic: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot encoding with background as channel 0.

    Args:
        semantic: ``(H, W)`` int class map with values ``0..num_classes``.
        num_classes: C (cell types, background excluded).

    Returns:
        ``(H, W, C + 1)`` float32.
    """
    semantic = np.asarray(semantic)
    if semantic.size and (semantic.min() < 0 or semantic.max() > num_classes):
        raise ValueError(
            f"`semantic` values must lie in [0, num_classes={num_classes}]. "
            f"Received: min={semantic.min()}, max={semantic.max()}"
        )
    return np.eye(num_classes + 1, dtype=np.float32)[semantic]


def make_targets(
    instances: np.ndarray,
    classes: np.ndarray | None = None,
    num_classes: int = 0,
    boundary_width: int = 1,
    connectivity: int = 1,
    keep_seed: bool = True,
    vector_units: VectorUnits = "pixels",
    vector_scale: float = 1.0,
    hover: bool = False,
    semantic_one_hot: bool = False,
) -> dict[str, np.ndarray]:
    """All training targets of one image, keyed like the outputs of the ``conic`` model.

    Args:
        instances: ``(H, W)`` integer instance map, 0 = background (ids need not be consecutive).
        classes: ``(H, W)`` integer class map (0 = background, 1..C) or None (nuclei = class 1).
        num_classes: C, the number of cell types (``Dataset.num_classes``; 0 without classes).
        boundary_width: thickness of the boundary band inside each nucleus in pixels.
        connectivity: 1 or 2, neighbourhood of the boundary test (:func:`three_label_map`).
        keep_seed: give every nucleus at least one interior pixel (:func:`three_label_map`).
        vector_units: ``"pixels"``, ``"scale"`` or ``"instance"`` (:func:`centre_vectors`).
        vector_scale: divisor for ``vector_units="scale"``.
        hover: also return the HoVer-Net maps under ``"hover"``.
        semantic_one_hot: return ``"semantic"`` one-hot instead of as class indices.

    Returns:
        A dict with

        * ``"semantic"``: ``(H, W)`` int32 class indices ``0..C'`` or, with
          ``semantic_one_hot``, ``(H, W, C' + 1)`` float32, background = channel 0, where
          ``C' = max(num_classes, 1)``;
        * ``"three_label"``: ``(H, W)`` uint8, 0 background / 1 interior / 2 boundary;
        * ``"vectors"``: ``(H, W, 2)`` float32 ``(dy, dx)`` to the nucleus centroid, 0 on
          background;
        * ``"foreground"``: ``(H, W)`` uint8, 1 on nucleus pixels (the mask of the vector loss);
        * ``"class_frequencies"``: ``(C' + 1,)`` float32 ``X_{c,n}``, the mean over pixels of the
          one-hot mask (background included, sums to 1; Rumberger et al. Eq. 1);
        * ``"hover"`` (only with ``hover=True``): ``(H, W, 2)`` float32 (h, v) in ``[-1, 1]``.
    """
    semantic = semantic_map(instances, classes, num_classes)
    n_cls = max(int(num_classes), 1)
    targets: dict[str, np.ndarray] = {
        "semantic": one_hot(semantic, n_cls) if semantic_one_hot else semantic,
        "three_label": three_label_map(instances, boundary_width, connectivity, keep_seed),
        "vectors": centre_vectors(instances, vector_units, vector_scale),
        "foreground": (np.asarray(instances) > 0).astype(np.uint8),
        "class_frequencies": class_pixel_frequencies(semantic, n_cls).astype(np.float32),
    }
    if hover:
        targets["hover"] = hover_maps(instances)
    return targets
