"""Point labels and their pixel-level encodings for the point-supervised ``weak`` method.

Chamanzar & Nie, "Weakly supervised multi-task learning for cell detection and segmentation"
(ISBI 2020) turn one point per nucleus into three pixel-level targets:

* **Voronoi label** (after Qu et al., MIDL 2019): Voronoi partition lines = background (0), a small
  disc at each point = nucleus (1), every other pixel = :data:`IGNORE`;
* **local pixel clustering**: k-means with k = 2 inside each Voronoi cell on RGB concatenated with
  the distance to the cell's point; the cluster closer to the point = nucleus (1), the other =
  background (0);
* **repel code** (Liang et al. 2019, alpha = 0.05, r = 70) and the "filtered repel" = repel code
  times the clustering mask.

All three come from :func:`encode_points`;
:func:`kerasnuc.data.points_cache.cached_encode_points` stores the result on disk so that the
pipeline encodes each image once. Point labels are read from CSV or QuPath GeoJSON files by
:mod:`kerasnuc.io.points`, or derived from an instance map (:func:`points_from_instances`) so
that every dataset can train ``weak``.

Conventions: points are ``(K, 2)`` float arrays of ``(row, col)``; a pixel ``(r, c)`` has its
centre at ``(row, col) = (r, c)``, and the encodings snap every point to its nearest pixel centre
(:func:`snap_points`). Everything is vectorised numpy/scipy; no function loops over points or
cells in Python.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from kerasnuc.data.targets import label_boundaries
from kerasnuc.instances import instance_centroids

logger = logging.getLogger(__name__)

IGNORE = 255
"""Label value of pixels left out of the Voronoi loss (uint8 maps)."""

KEYS = ("voronoi", "cluster", "repel", "filtered_repel")


# ----------------------------------------------------------------------------------------------
# Points


def snap_points(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Round points to pixel indices and drop duplicates (first occurrence kept, order kept).

    Rounding is half-up (``floor(x + 0.5)``); points on the outer pixel edge are clipped into the
    image.

    Args:
        points: ``(K, 2)`` float ``(row, col)``; every point must lie in
            ``[-0.5, H - 0.5] x [-0.5, W - 0.5]`` (inside the image, pixel edges included).
        shape: ``(H, W)`` of the image.

    Returns:
        ``(K', 2)`` int64 pixel indices, ``K' <= K``.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"`points` must have shape (K, 2). Received: shape={points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("`points` must be finite.")
    h, w = int(shape[0]), int(shape[1])
    outside = ((points[:, 0] < -0.5) | (points[:, 0] > h - 0.5) | (points[:, 1] < -0.5)) | (
        points[:, 1] > w - 0.5
    )
    if outside.any():
        raise ValueError(
            f"`points` must lie inside the {h}x{w} image. "
            f"Received: {int(outside.sum())} outside, e.g. {points[outside][0].tolist()}"
        )
    snapped = np.floor(points + 0.5).astype(np.int64)
    snapped[:, 0] = np.clip(snapped[:, 0], 0, h - 1)
    snapped[:, 1] = np.clip(snapped[:, 1], 0, w - 1)
    _, first = np.unique(snapped, axis=0, return_index=True)
    if first.size < snapped.shape[0]:
        logger.debug("dropped %d duplicate points", snapped.shape[0] - first.size)
    return snapped[np.sort(first)]


def points_from_instances(
    instances: np.ndarray, classes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Point labels from an instance map: the centroid of every nucleus.

    Args:
        instances: ``(H, W)`` integer instance map, 0 = background.
        classes: optional ``(H, W)`` integer class map; each point takes the most frequent class
            of its nucleus' pixels (ties: the smallest class id).

    Returns:
        ``(points, point_classes)``: ``(N, 2)`` float64 centroids ``(row, col)`` in increasing
        instance-id order, and ``(N,)`` int32 classes (None without ``classes``). A non-convex
        nucleus may have its centroid outside its own pixels.
    """
    ids, centroids = instance_centroids(instances)
    if classes is None:
        return centroids, None
    instances = np.asarray(instances)
    classes = np.asarray(classes)
    if classes.shape != instances.shape or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(
            "`classes` must be an integer array shaped like `instances`. "
            f"Received: shape={classes.shape}, dtype={classes.dtype}"
        )
    if ids.size == 0:
        return centroids, np.zeros(0, dtype=np.int32)
    fg = instances > 0
    n_cls = int(classes.max()) + 1
    index = np.searchsorted(ids, instances[fg])
    counts = np.bincount(
        index * n_cls + classes[fg].astype(np.int64), minlength=ids.size * n_cls
    ).reshape(ids.size, n_cls)
    return centroids, counts.argmax(axis=1).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Encodings


def voronoi_cells(shape: tuple[int, int], points_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi partition of the pixel grid: the nearest point of every pixel.

    Computed with one Euclidean distance transform of the point raster
    (``scipy.ndimage.distance_transform_edt(..., return_indices=True)``); pixels equidistant
    from two points go to either of them (as the transform decides, deterministically).

    Args:
        shape: ``(H, W)``.
        points_px: ``(K, 2)`` int pixel indices without duplicates (:func:`snap_points`).

    Returns:
        ``(cells, d1)``: ``(H, W)`` int32 cell ids ``1..K`` (cell ``k`` belongs to
        ``points_px[k - 1]``; all 0 when ``K = 0``) and ``(H, W)`` float64 distance ``d1`` to the
        nearest point (``inf`` when ``K = 0``).
    """
    h, w = int(shape[0]), int(shape[1])
    points_px = np.asarray(points_px, dtype=np.int64).reshape(-1, 2)
    if points_px.shape[0] == 0:
        return np.zeros((h, w), dtype=np.int32), np.full((h, w), np.inf)
    raster = np.zeros((h, w), dtype=np.int32)
    raster[points_px[:, 0], points_px[:, 1]] = np.arange(1, points_px.shape[0] + 1)
    d1, (iy, ix) = ndi.distance_transform_edt(raster == 0, return_indices=True)
    return raster[iy, ix], d1


def voronoi_lines(cells: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Voronoi partition lines: pixels with a 4- (or 8-) neighbour in another cell.

    Both sides of every cell border are marked, so the lines are 2 px thick (``connectivity=1``).

    Args:
        cells: ``(H, W)`` int Voronoi cell ids (:func:`voronoi_cells`).
        connectivity: 1 (4-neighbours) or 2 (8-neighbours).

    Returns:
        ``(H, W)`` bool.
    """
    return label_boundaries(np.asarray(cells), 1, connectivity)


def voronoi_label(
    cells: np.ndarray, d1: np.ndarray, disc_radius: float = 2.0, connectivity: int = 1
) -> np.ndarray:
    """Voronoi label of Qu et al. (2019) as used by Chamanzar & Nie: lines 0, discs 1, rest ignored.

    Pixels within ``disc_radius`` (Euclidean, inclusive) of their nearest point are 1; Voronoi
    lines (:func:`voronoi_lines`) are 0 and win over discs, so two points closer than
    ``2 * disc_radius`` still stay separated; all other pixels are :data:`IGNORE`. Without points
    every pixel is :data:`IGNORE`.

    Args:
        cells: ``(H, W)`` int cell ids from :func:`voronoi_cells`.
        d1: ``(H, W)`` distance to the nearest point from :func:`voronoi_cells`.
        disc_radius: radius of the foreground disc at each point in pixels, >= 0.
        connectivity: neighbourhood of the line test.

    Returns:
        ``(H, W)`` uint8 in {0, 1, IGNORE}.
    """
    if not disc_radius >= 0:
        raise ValueError(f"`disc_radius` must be >= 0. Received: disc_radius={disc_radius}")
    out = np.full(np.shape(cells), IGNORE, dtype=np.uint8)
    out[d1 <= disc_radius] = 1
    out[voronoi_lines(cells, connectivity)] = 0
    return out


def cluster_label(
    image: np.ndarray,
    cells: np.ndarray,
    d1: np.ndarray,
    dist_clip: float = 20.0,
    dist_weight: float = 1.0,
    init_radius: float = 2.0,
    max_iter: int = 10,
) -> np.ndarray:
    """Local pixel clustering of Chamanzar & Nie: 2-means inside every Voronoi cell at once.

    Features per pixel (our scaling; the paper gives none): ``R, G, B`` divided by 255 (uint8
    images; float images are taken as already in ``[0, 1]``) and the distance to the cell's point
    ``dist_weight * min(d1, dist_clip) / dist_clip``, so that all four lie in ``[0, 1]``
    and pixels beyond ``dist_clip`` px differ only by colour.

    Vectorised Lloyd iterations for all cells together: the cell id is a segment id, each
    pixel's two candidate centres are gathered by its cell, and centres are updated with
    ``np.bincount`` over ``2 * cell + cluster``. Deterministic initialisation: the nucleus centre
    is the mean feature of the cell's pixels within ``init_radius`` of its point (at least the
    point pixel), the background centre the mean of the cell's pixels farther from the point than
    the cell's mean distance. Iterations stop when no assignment changes or after ``max_iter``.
    A cluster that empties keeps its previous centre; a pixel equidistant from both centres goes
    to the nucleus cluster. The nucleus is the cluster with the smaller mean distance to the
    point (the cluster around the point).

    Args:
        image: ``(H, W, 3)`` RGB, uint8 or float in ``[0, 1]``.
        cells: ``(H, W)`` int cell ids ``1..K`` from :func:`voronoi_cells`.
        d1: ``(H, W)`` distance to the nearest point from :func:`voronoi_cells`.
        dist_clip: distance in pixels at which the distance feature saturates, > 0.
        dist_weight: weight of the distance feature relative to the colour channels, > 0.
        init_radius: radius of the pixels that initialise the nucleus centre, >= 0.
        max_iter: maximum number of Lloyd iterations, >= 1.

    Returns:
        ``(H, W)`` uint8: 1 nucleus, 0 background (all 0 when there is no point).
    """
    image = np.asarray(image)
    cells = np.asarray(cells)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != cells.shape:
        raise ValueError(
            "`image` must be (H, W, 3) matching `cells`. "
            f"Received: image shape={image.shape}, cells shape={cells.shape}"
        )
    if not dist_clip > 0 or not dist_weight > 0:
        raise ValueError(
            "`dist_clip` and `dist_weight` must be > 0. "
            f"Received: dist_clip={dist_clip}, dist_weight={dist_weight}"
        )
    if not isinstance(max_iter, int | np.integer) or max_iter < 1:
        raise ValueError(f"`max_iter` must be a positive int. Received: max_iter={max_iter}")
    k = int(cells.max()) if cells.size else 0
    if k == 0:
        return np.zeros(cells.shape, dtype=np.uint8)

    scale = 1.0 / 255.0 if image.dtype == np.uint8 else 1.0
    flat = image.reshape(-1, 3)
    feats = [flat[:, i].astype(np.float32) * np.float32(scale) for i in range(3)]
    dist = np.minimum(d1.ravel(), dist_clip).astype(np.float32)
    feats.append(dist * np.float32(dist_weight / dist_clip))
    seg = cells.ravel().astype(np.int64) - 1

    def centres(
        key: np.ndarray, n_bins: int, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-bin feature means and counts (``mask`` selects the pixels)."""
        if mask is not None:
            key = key[mask]
        count = np.bincount(key, minlength=n_bins).astype(np.float64)
        sums = np.stack(
            [
                np.bincount(key, weights=f if mask is None else f[mask], minlength=n_bins)
                for f in feats
            ],
            axis=1,
        )
        return sums / np.maximum(count, 1.0)[:, None], count

    # Initialisation (cluster 0 = nucleus near the point, cluster 1 = far background).
    d1_flat = d1.ravel()
    c_near, n_near = centres(seg, k, d1_flat <= init_radius)
    n_cell = np.bincount(seg, minlength=k).astype(np.float64)
    mean_d = np.bincount(seg, weights=d1_flat, minlength=k) / np.maximum(n_cell, 1.0)
    c_far, n_far = centres(seg, k, d1_flat > mean_d[seg])
    c0 = np.where(n_near[:, None] > 0, c_near, c_far)
    c1 = np.where(n_far[:, None] > 0, c_far, c0)

    assign = np.zeros(seg.size, dtype=bool)
    for it in range(int(max_iter)):
        # |x - c1|^2 < |x - c0|^2  <=>  x . 2 (c0 - c1) < |c0|^2 - |c1|^2
        w = (2.0 * (c0 - c1)).astype(np.float32)
        b = ((c0**2).sum(axis=1) - (c1**2).sum(axis=1)).astype(np.float32)
        score = feats[0] * w[seg, 0]
        for i in range(1, 4):
            score += feats[i] * w[seg, i]
        new_assign = score < b[seg]
        if it > 0 and np.array_equal(new_assign, assign):
            break
        assign = new_assign
        both, count = centres(seg * 2 + assign, 2 * k)
        count = count.reshape(k, 2)
        both = both.reshape(k, 2, 4)
        c0 = np.where(count[:, 0:1] > 0, both[:, 0], c0)
        c1 = np.where(count[:, 1:2] > 0, both[:, 1], c1)

    # The nucleus is the cluster with the smaller mean distance to the point.
    nucleus_is_1 = c1[:, 3] < c0[:, 3]
    return (assign == nucleus_is_1[seg]).reshape(cells.shape).astype(np.uint8)


def nearest_two_distances(
    shape: tuple[int, int], points_px: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from every pixel to its nearest and second-nearest point.

    One ``scipy.spatial.cKDTree`` query with ``k = 2`` over all pixel centres.

    Args:
        shape: ``(H, W)``.
        points_px: ``(K, 2)`` int pixel indices without duplicates.

    Returns:
        ``(d1, d2)``: ``(H, W)`` float64 each; ``inf`` where there is no such point.
    """
    h, w = int(shape[0]), int(shape[1])
    points_px = np.asarray(points_px).reshape(-1, 2)
    if points_px.shape[0] == 0:
        return np.full((h, w), np.inf), np.full((h, w), np.inf)
    rows, cols = np.indices((h, w))
    grid = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)
    dist, _ = cKDTree(points_px.astype(np.float64)).query(grid, k=2)
    return dist[:, 0].reshape(h, w), dist[:, 1].reshape(h, w)


def repel_code(d1: np.ndarray, d2: np.ndarray, alpha: float = 0.05, r: float = 70.0) -> np.ndarray:
    """Repel code of Liang et al. (2019, Eq. 4), used by Chamanzar & Nie with alpha=0.05, r=70.

    The Chamanzar paper cites the formula without writing it out; Liang et al., "Enhanced
    Center Coding for Cell Detection with Convolutional Neural Networks" (arXiv:1904.08864)
    define, with ``d1`` and ``d2`` the distances of a pixel to its nearest and second-nearest
    point::

        D = d1 * (1 + d1 / d2)
        C = 1 / (1 + alpha * D)   if D <= r
        C = 0                     otherwise

    ``C = 1`` at every point and decays faster towards a close neighbour (``d1 / d2`` near 1)
    than away from it. With a single point ``d2 = inf`` and ``D = d1``; without points ``C = 0``.

    Args:
        d1: ``(H, W)`` distance to the nearest point (:func:`nearest_two_distances`).
        d2: ``(H, W)`` distance to the second-nearest point.
        alpha: decay rate, > 0.
        r: cut-off on ``D`` in pixels, > 0.

    Returns:
        ``(H, W)`` float32 in ``[0, 1]``.
    """
    if not alpha > 0 or not r > 0:
        raise ValueError(f"`alpha` and `r` must be > 0. Received: alpha={alpha}, r={r}")
    d1 = np.asarray(d1, dtype=np.float64)
    d2 = np.asarray(d2, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.isinf(d2), 0.0, d1 / d2)
        big_d = d1 * (1.0 + ratio)
        code = np.where(big_d <= r, 1.0 / (1.0 + alpha * big_d), 0.0)
    return code.astype(np.float32)


def encode_points(
    image: np.ndarray,
    points: np.ndarray,
    disc_radius: float = 2.0,
    line_connectivity: int = 1,
    dist_clip: float = 20.0,
    dist_weight: float = 1.0,
    init_radius: float = 2.0,
    max_iter: int = 10,
    lines_background: bool = True,
    alpha: float = 0.05,
    r: float = 70.0,
) -> dict[str, np.ndarray]:
    """All point-label encodings of one image (Chamanzar & Nie, Section 2.3).

    Args:
        image: ``(H, W, 3)`` RGB, uint8 or float in ``[0, 1]``.
        points: ``(K, 2)`` float ``(row, col)`` nucleus centres, snapped to pixels
            (:func:`snap_points`).
        disc_radius: foreground disc radius of the Voronoi label (:func:`voronoi_label`).
        line_connectivity: neighbourhood of the Voronoi line test.
        dist_clip, dist_weight, init_radius, max_iter: local clustering settings
            (:func:`cluster_label`).
        lines_background: set the Voronoi lines to background in the clustering label (our
            choice, default on: keeps the clusters of touching nuclei apart, consistent with the
            Voronoi label; the paper's clustering loss has no ignored pixels, so lines are not
            set to :data:`IGNORE`).
        alpha, r: repel code parameters (:func:`repel_code`).

    Returns:
        ``{"voronoi": (H, W) uint8 {0, 1, IGNORE}, "cluster": (H, W) uint8 {0, 1},
        "repel": (H, W) float32, "filtered_repel": (H, W) float32 = repel * cluster}``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"`image` must have shape (H, W, 3). Received: shape={image.shape}")
    shape = image.shape[:2]
    pts = snap_points(points, shape)
    cells, d1 = voronoi_cells(shape, pts)
    voronoi = voronoi_label(cells, d1, disc_radius, line_connectivity)
    cluster = cluster_label(image, cells, d1, dist_clip, dist_weight, init_radius, max_iter)
    if lines_background:
        cluster[voronoi == 0] = 0
    repel = repel_code(*nearest_two_distances(shape, pts), alpha=alpha, r=r)
    return {
        "voronoi": voronoi,
        "cluster": cluster,
        "repel": repel,
        "filtered_repel": repel * cluster,
    }
