"""Instance maps: the per-nucleus quantities several stages share, in one convention.

An instance map is ``(H, W)`` integer, 0 = background, any positive ids (not necessarily
consecutive). Per-nucleus results are returned for the ids present, in increasing id order:
``(ids, values)`` with ``values[k]`` belonging to ``ids[k]``. Pixel ``(r, c)`` has its centre at
``(row, col) = (r, c)``.

* :func:`compact_ids`: relabel to 1..N (order kept) and the original ids;
* :func:`label_centroids`: areas and centroids of a map labelled 0..N;
* :func:`majority_class`: the class on most of each label's pixels (stitched tiles, the type
  metrics);
* :func:`instance_centroids`: the centroid of every nucleus (training targets, point labels,
  detection metrics and the post-processing tables all use it);
* :func:`composition_counts`: nuclei per cell type in the central window (CoNIC task 2; the
  CoNIC importer checks ``counts.csv`` with it).
"""

from __future__ import annotations

import numpy as np

from kerasnuc.checks import is_int


def check_instances(instances: np.ndarray) -> np.ndarray:
    """``instances`` as an array if it is a 2-D non-negative integer map (ValueError otherwise)."""
    instances = np.asarray(instances)
    if instances.ndim != 2 or not np.issubdtype(instances.dtype, np.integer):
        raise ValueError(
            "`instances` must be a 2-D integer array. "
            f"Received: shape={instances.shape}, dtype={instances.dtype}"
        )
    if instances.size and instances.min() < 0:
        raise ValueError(f"`instances` ids must be >= 0. Received: min={instances.min()}")
    return instances


def compact_ids(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel an instance map with any positive ids to 1..N, keeping the order of the ids.

    Args:
        instances: ``(H, W)`` non-negative integer map.

    Returns:
        ``(labels, ids)``: ``(H, W)`` int32 map with labels 1..N (0 = background) and ``(N,)``
        int64 original id of each label (``ids[k - 1]`` is label ``k``), increasing.
    """
    instances = np.asarray(instances)
    flat = instances.ravel()
    max_id = int(flat.max(initial=0))
    if max_id <= 4 * flat.size + 1024:
        present = np.bincount(flat, minlength=max_id + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present).astype(np.int64)
        lut = np.zeros(max_id + 1, dtype=np.int32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
        return lut[instances], ids
    uniq, inverse = np.unique(flat, return_inverse=True)
    if uniq[0] != 0:
        uniq = np.concatenate([[0], uniq])
        inverse = inverse + 1
    return inverse.reshape(instances.shape).astype(np.int32), uniq[1:].astype(np.int64)


def label_centroids(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Areas ``(n + 1,)`` and centroids ``(n + 1, 2)`` (row, col) of labels ``0..n`` (0 unused)."""
    rows, cols = np.indices(labels.shape, dtype=np.float64)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    safe = np.maximum(area, 1.0)
    cy = np.bincount(flat, weights=rows.ravel(), minlength=n + 1) / safe
    cx = np.bincount(flat, weights=cols.ravel(), minlength=n + 1) / safe
    return area, np.stack([cy, cx], axis=1)


def majority_class(labels: np.ndarray, classes: np.ndarray, n: int) -> np.ndarray:
    """Most frequent non-zero class of each label of a map labelled 0..n.

    Args:
        labels: ``(H, W)`` labels 0..n (0 = background).
        classes: ``(H, W)`` non-negative integer class map.
        n: the largest label.

    Returns:
        ``(n + 1,)`` int64 indexed by label: the class on most of the label's pixels (ties: the
        smaller class), 0 where it has no pixel of a non-zero class, and 0 for label 0.
    """
    n_cls = int(classes.max()) + 1 if classes.size else 1
    fg = labels > 0
    keys = labels[fg].astype(np.int64) * n_cls + classes[fg].astype(np.int64)
    counts = np.bincount(keys, minlength=(n + 1) * n_cls).reshape(n + 1, n_cls)
    counts[:, 0] = 0
    best = counts.argmax(axis=1)
    best[counts.max(axis=1) == 0] = 0
    return best


def instance_centroids(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid of every nucleus of an instance map (mean pixel position).

    Args:
        instances: ``(H, W)`` integer instance map, 0 = background.

    Returns:
        ``(ids, centroids)``: ``(N,)`` int64 instance ids in increasing order and ``(N, 2)``
        float64 centroids ``(row, col)``. A non-convex nucleus may have its centroid outside its
        own pixels.
    """
    instances = check_instances(instances)
    labels, ids = compact_ids(instances)
    _, centroids = label_centroids(labels, ids.size)
    return ids, centroids[1:]


def composition_counts(
    instance_map: np.ndarray, class_map: np.ndarray, num_classes: int, crop: int | None = 224
) -> np.ndarray:
    """Number of nuclei per cell type in the central ``crop x crop`` window (CoNIC task 2).

    As in the challenge's reference code (TissueImageAnalytics/CoNIC, ``process_composition``)
    and in the paper ("center-cropping the masks to 224 x 224 and count the number of
    instances per class"): the label maps are cropped first, so a nucleus counts when **any**
    of its pixels lies in the window, whatever its centroid. The window starts at
    ``((H - crop) // 2, (W - crop) // 2)``, i.e. rows/cols 16..239 of a 256 x 256 tile.

    Args:
        instance_map: ``(H, W)`` integer, 0 = background.
        class_map: ``(H, W)`` integer, 0 = background, 1..C; one class per nucleus.
        num_classes: number of cell types C.
        crop: window side in pixels, or None for the whole map.

    Returns:
        ``(C,)`` int64, entry ``c - 1`` = number of nuclei of class ``c``.

    Raises:
        ValueError: shapes differ, the crop does not fit, or a nucleus has no single class in
            1..C.
    """
    instance_map = np.asarray(instance_map)
    class_map = np.asarray(class_map)
    if instance_map.ndim != 2 or instance_map.shape != class_map.shape:
        raise ValueError(
            "`instance_map` and `class_map` must be 2-D with the same shape. "
            f"Received: {instance_map.shape} and {class_map.shape}"
        )
    if not is_int(num_classes) or num_classes < 1:
        raise ValueError(f"`num_classes` must be an int >= 1. Received: num_classes={num_classes}")
    if crop is not None:
        h, w = instance_map.shape
        if not is_int(crop) or not 0 < crop <= min(h, w):
            raise ValueError(
                f"`crop` must be None or an int in 1..{min(h, w)} for a {h}x{w} map. "
                f"Received: crop={crop}"
            )
        r0, c0 = (h - crop) // 2, (w - crop) // 2
        instance_map = instance_map[r0 : r0 + crop, c0 : c0 + crop]
        class_map = class_map[r0 : r0 + crop, c0 : c0 + crop]
    fg = instance_map > 0
    pairs = np.unique(np.stack([instance_map[fg], class_map[fg]], axis=1), axis=0)
    ids, classes = pairs[:, 0], pairs[:, 1]
    if np.unique(ids).size != ids.size:
        raise ValueError("every nucleus must have a single class in `class_map`")
    if classes.size and (classes.min() < 1 or classes.max() > num_classes):
        raise ValueError(
            f"nucleus classes must lie in 1..{num_classes}. Received classes {np.unique(classes)}"
        )
    return np.bincount(classes.astype(np.int64), minlength=num_classes + 1)[1:].astype(np.int64)
