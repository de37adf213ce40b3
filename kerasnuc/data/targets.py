"""Training targets derived from an instance map (and a class map), computed once per image.

The targets of the ``conic`` method (Rumberger, Baumann, Hirsch et al., "Panoptic segmentation
with highly imbalanced semantic labels", CoNIC challenge, ISBI 2022):

* **three-label map** (Section II.C of the paper, after Caicedo et al.): 0 background,
  1 nucleus interior, 2 nucleus boundary;
* **centre vectors** (auxiliary regression task, after Lee et al.): for every nucleus pixel the
  2-D vector ``(dy, dx)`` from the pixel to the centroid of its nucleus;
* the class map itself is the semantic target.

and of the ``panoptic`` method (Liu et al., IJCAI 2019): ground-truth boxes and their classes
(:func:`panoptic_box_targets`). :func:`conic_targets_numpy` and :func:`panoptic_box_targets` are
the per-crop functions :mod:`kerasnuc.data.pipeline` runs; :func:`panoptic_targets` stacks them
for a batch of crops outside tf.data (tests, benchmarks).

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

from kerasnuc.instances import check_instances, compact_ids, label_centroids

VectorUnits = Literal["pixels", "scale", "instance"]

#: Semantic label of nucleus pixels whose cell type is unknown (e.g. a dataset without types
#: trained together with one that has them); the semantic loss ignores them.
UNKNOWN_CLASS = -1

THREE_LABEL_BACKGROUND = 0
THREE_LABEL_INTERIOR = 1
THREE_LABEL_BOUNDARY = 2


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
    instances = check_instances(instances)
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
    labels, ids = compact_ids(instances)
    n = ids.size
    area, centroids = label_centroids(labels, n)
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
    instances = check_instances(instances)
    if units not in ("pixels", "scale", "instance"):
        raise ValueError(
            f"`units` must be 'pixels', 'scale' or 'instance'. Received: units={units!r}"
        )
    if units == "scale" and not scale > 0:
        raise ValueError(f"`scale` must be > 0. Received: scale={scale}")
    labels, ids = compact_ids(instances)
    _, centroids = label_centroids(labels, ids.size)
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


# ----------------------------------------------------------------------------------------------
# Targets of each method for one crop (the tf.data pipeline wraps them with tf.numpy_function)


def conic_targets_numpy(
    instances: np.ndarray, boundary_width: int, vector_units: str, vector_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Three-label map ``(S, S)`` int32 and ``(dy, dx, fg)`` vectors ``(S, S, 3)`` of a crop."""
    three = three_label_map(instances, boundary_width).astype(np.int32)
    vec = centre_vectors(instances, vector_units, vector_scale)
    fg = (instances > 0).astype(np.float32)[..., None]
    return three, np.concatenate([vec, fg], axis=-1).astype(np.float32)


def panoptic_box_targets(
    instances: np.ndarray, classes: np.ndarray, max_instances: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground-truth boxes of a crop for the ``panoptic`` detector (numpy).

    Args:
        instances: ``(S, S)`` int instance map of the crop.
        classes: ``(S, S)`` int class map (``UNKNOWN_CLASS`` or 0 inside a nucleus: class 1).
        max_instances: number of box slots; when the crop holds more nuclei, the largest
            ``max_instances`` are kept (the others stay foreground in ``semantic``).

    Returns:
        ``(instances, boxes, box_classes)``: the instance map relabelled so that box ``k``
        covers the nucleus with id ``k + 1`` (dropped nuclei become 0), ``(max_instances, 4)``
        float32 boxes ``(y1, x1, y2, x2)`` (pixel edges: a nucleus on rows 3..5 has ``y1 = 3,
        y2 = 6``; zeros for empty slots) and ``(max_instances,)`` int32 classes (0 = empty
        slot), the most frequent class of each nucleus's pixels.
    """
    ids, inverse, areas = np.unique(instances, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(instances.shape)
    fg = ids > 0
    order = np.flatnonzero(fg)[np.argsort(-areas[fg], kind="stable")][:max_instances]
    order = np.sort(order)  # keep id order among the kept nuclei
    lookup = np.zeros(len(ids), np.int32)
    lookup[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    relabelled = lookup[inverse]
    boxes = np.zeros((max_instances, 4), np.float32)
    box_classes = np.zeros(max_instances, np.int32)
    n = len(order)
    for k, sl in enumerate(ndi.find_objects(relabelled, max_label=n)):
        boxes[k] = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
    if n:
        # Most frequent class per nucleus: a (nucleus, class) histogram over the pixels.
        cls = np.maximum(classes.astype(np.int64), 0)  # unknown (-1) -> 0 -> class 1 below
        width = int(cls.max()) + 1
        hist = np.bincount(
            (relabelled.astype(np.int64) * width + cls).ravel(), minlength=(n + 1) * width
        ).reshape(n + 1, width)[1:]
        hist[:, 0] = 0  # no typed pixel at all: argmax 0 -> class 1
        box_classes[:n] = np.maximum(np.argmax(hist, axis=1), 1)
    return relabelled, boxes, box_classes


def panoptic_targets(
    instances: np.ndarray, max_instances: int, semantic: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The targets :func:`panoptic_dataset` yields, for a stack of crops (numpy).

    Args:
        instances: ``(B, S, S)`` int instance maps.
        max_instances: box slots per crop (:func:`panoptic_box_targets`).
        semantic: ``(B, S, S)`` int class maps; None: ``1`` inside nuclei.

    Returns:
        ``{"instances", "semantic", "boxes", "classes"}`` stacked over the crops.
    """
    instances = np.asarray(instances)
    semantic = (instances > 0).astype(np.int32) if semantic is None else np.asarray(semantic)
    parts = [
        panoptic_box_targets(i, c, max_instances) for i, c in zip(instances, semantic, strict=True)
    ]
    return {
        "instances": np.stack([p[0] for p in parts]),
        "semantic": semantic.astype(np.int32),
        "boxes": np.stack([p[1] for p in parts]),
        "classes": np.stack([p[2] for p in parts]),
    }
