"""Post-processing of the ``weak`` model: detection by local maxima, instances by watershed.

Chamanzar & Nie, "Weakly Supervised Multi-Task Learning for Cell Detection and Segmentation",
ISBI 2020: "binary segmentation masks using an argmax
function applied on the output probability maps" and cells detected "by finding the location of
local maxima, with minimum distance of 2.5 um, in the nuclei output probability map using the
maximum filter" (scipy's, through ``skimage.feature.peak_local_max``). The paper scores AJI, so
instances are needed; it does not say how it gets them. Our choice: a marker watershed from the
detected points on the inverted nucleus probability, restricted to the argmax mask.

Pipeline of :func:`postprocess_weak`, with the settings of :class:`WeakPostprocConfig`:

1. ``P = seg[..., 1]`` (optionally Gaussian-smoothed by ``smooth_sigma`` pixels);
2. detections = local maxima of ``P`` at least ``min_distance_um / mpp`` pixels apart (rounded,
   at least 1) with ``P >= peak_threshold``; with the default 0.5 every detection lies in the
   argmax foreground;
3. foreground = ``seg[..., 1] > seg[..., 0]`` (argmax);
4. markers = one label per detection; ``watershed(1 - P, markers, mask=foreground)``;
5. foreground components without a detection become instances of their own when
   ``keep_unseeded`` (the argmax says "nucleus" there), else background;
6. instances smaller than ``min_size`` pixels are removed; ids renumbered 1..N in raster order of
   the markers / components.

Every nucleus gets class 1 (the method is class-agnostic).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from kerasnuc.checks import is_number
from kerasnuc.postprocess.common import (
    PostprocResult,
    SettingsFile,
    centroids_by_id,
    grid_search,
    instance_areas,
    instance_solidity,
    instance_sums,
    relabel_by_lut,
)

logger = logging.getLogger(__name__)

#: Pixel size assumed when neither the settings nor the run give one: the paper's 20x images
#: (2.5 um = 5 px at 0.5 um/px).
DEFAULT_MPP = 0.5


@dataclasses.dataclass(frozen=True)
class WeakPostprocConfig(SettingsFile):
    """Settings of :func:`postprocess_weak` (``postproc.json`` of a weak run).

    Attributes:
        min_distance_um: smallest distance between two detections, micrometres (paper: 2.5).
        mpp: micrometres per pixel of the maps (the model's resolution; ``kerasnuc train`` writes
            the run's ``data.mpp`` here). None: :data:`DEFAULT_MPP`.
        peak_threshold: a local maximum is a detection when ``P(nucleus) >= peak_threshold``.
        smooth_sigma: Gaussian smoothing of ``P`` before the peak search, pixels (0: none, as the
            paper).
        keep_unseeded: keep foreground components without a detection as instances.
        min_size: remove instances with fewer pixels (0: keep all).
    """

    min_distance_um: float = 2.5
    mpp: float | None = None
    peak_threshold: float = 0.5
    smooth_sigma: float = 0.0
    keep_unseeded: bool = True
    min_size: int = 0

    def __post_init__(self) -> None:
        if not is_number(self.min_distance_um) or not self.min_distance_um > 0:
            raise ValueError(
                "`min_distance_um` must be a number > 0. "
                f"Received: min_distance_um={self.min_distance_um!r}"
            )
        if self.mpp is not None and (not is_number(self.mpp) or not self.mpp > 0):
            raise ValueError(f"`mpp` must be None or a number > 0. Received: mpp={self.mpp!r}")
        if not is_number(self.peak_threshold) or not 0 <= self.peak_threshold <= 1:
            raise ValueError(
                "`peak_threshold` must be a number in [0, 1]. "
                f"Received: peak_threshold={self.peak_threshold!r}"
            )
        sigma = self.smooth_sigma
        if not is_number(sigma) or sigma < 0:
            raise ValueError(
                f"`smooth_sigma` must be a number >= 0. Received: smooth_sigma={sigma!r}"
            )
        if not isinstance(self.keep_unseeded, bool):
            raise ValueError(
                f"`keep_unseeded` must be a bool. Received: keep_unseeded={self.keep_unseeded!r}"
            )
        size = self.min_size
        if not isinstance(size, int | np.integer) or isinstance(size, bool) or size < 0:
            raise ValueError(f"`min_size` must be an int >= 0. Received: min_size={size!r}")

    @property
    def min_distance_px(self) -> int:
        """``min_distance_um / mpp`` rounded to whole pixels (at least 1)."""
        mpp = DEFAULT_MPP if self.mpp is None else float(self.mpp)
        return max(1, int(math.floor(self.min_distance_um / mpp + 0.5)))


def _check_seg(seg: Any) -> np.ndarray:
    seg = np.asarray(seg, dtype=np.float32)
    if seg.ndim != 3 or seg.shape[-1] != 2:
        raise ValueError(
            f"`seg` must be (H, W, 2) probabilities (background, nucleus). Received: {seg.shape}"
        )
    return seg


def detect_nuclei(
    probability: np.ndarray,
    min_distance: int,
    threshold: float = 0.5,
    smooth_sigma: float = 0.0,
) -> np.ndarray:
    """Nucleus centres as local maxima of a probability map (Chamanzar & Nie 2020).

    Args:
        probability: ``(H, W)`` float nucleus probability.
        min_distance: smallest distance between two detections, pixels (>= 1): a detection is
            the maximum of its ``(2 d + 1) x (2 d + 1)`` window, and of two maxima closer than
            that the larger is kept.
        threshold: detections have ``probability >= threshold``.
        smooth_sigma: Gaussian smoothing (pixels) before the search; 0 = none.

    Returns:
        ``(K, 2)`` int64 ``(row, col)`` of the detections, in decreasing probability.
    """
    prob = np.asarray(probability, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError(f"`probability` must be (H, W). Received: shape={prob.shape}")
    if not isinstance(min_distance, int | np.integer) or min_distance < 1:
        raise ValueError(f"`min_distance` must be an int >= 1. Received: {min_distance!r}")
    if smooth_sigma > 0:
        prob = ndi.gaussian_filter(prob, smooth_sigma)
    if prob.size == 0 or float(prob.max(initial=0.0)) < threshold:
        return np.zeros((0, 2), dtype=np.int64)
    peaks = peak_local_max(
        prob,
        min_distance=int(min_distance),
        threshold_abs=float(threshold),
        threshold_rel=None,
        exclude_border=False,
    )
    return np.asarray(peaks, dtype=np.int64).reshape(-1, 2)


def instances_from_points(
    probability: np.ndarray, foreground: np.ndarray, points: np.ndarray, keep_unseeded: bool = True
) -> np.ndarray:
    """Marker watershed from detected points inside a foreground mask.

    Args:
        probability: ``(H, W)`` float nucleus probability; the relief is ``1 - probability``.
        foreground: ``(H, W)`` bool mask (the argmax segmentation).
        points: ``(K, 2)`` integer ``(row, col)`` markers; points outside ``foreground`` seed
            nothing.
        keep_unseeded: foreground components without a point become instances of their own.

    Returns:
        ``(H, W)`` int32 instance map, ids 1..N (marker ``k`` has id ``k + 1`` if it kept
        pixels; unseeded components follow), renumbered consecutively.
    """
    prob = np.asarray(probability, dtype=np.float32)
    fg = np.asarray(foreground, dtype=bool)
    if prob.shape != fg.shape or prob.ndim != 2:
        raise ValueError(
            "`probability` and `foreground` must be (H, W) arrays of the same shape. "
            f"Received: {prob.shape} and {fg.shape}"
        )
    pts = np.asarray(points, dtype=np.int64).reshape(-1, 2)
    markers = np.zeros(prob.shape, dtype=np.int32)
    if len(pts):
        inside = (
            (pts[:, 0] >= 0)
            & (pts[:, 0] < prob.shape[0])
            & (pts[:, 1] >= 0)
            & (pts[:, 1] < prob.shape[1])
        )
        pts = pts[inside]
        markers[pts[:, 0], pts[:, 1]] = np.arange(1, len(pts) + 1, dtype=np.int32)
        markers[~fg] = 0
    instances = np.zeros(prob.shape, dtype=np.int32)
    if markers.any():
        instances = watershed(1.0 - prob, markers, mask=fg).astype(np.int32)
    if keep_unseeded:
        rest = fg & (instances == 0)
        comps, n = ndi.label(rest)
        if n:
            offset = int(instances.max(initial=0))
            instances = np.where(comps > 0, comps + offset, instances).astype(np.int32)
    instances, _ = relabel_by_lut(instances)
    return instances


def postprocess_weak(seg: np.ndarray, config: WeakPostprocConfig | None = None) -> PostprocResult:
    """Turn the ``seg`` map of the weak model into nuclei (see the module docstring).

    Args:
        seg: ``(H, W, 2)`` float softmax, channel 0 = background, 1 = nucleus.
        config: settings; default :class:`WeakPostprocConfig()`.

    Returns:
        :class:`~kerasnuc.postprocess.common.PostprocResult`: ``instances`` ``(H, W)`` int32
        (ids 1..N), ``classes`` ``(H, W)`` int32 (1 on nuclei), ``table`` with per-instance
        ``id``, ``class`` (all 1), ``probabilities`` ``(N, 2)`` (mean softmax), ``area``,
        ``centroid`` ``(row, col)``, ``solidity``.
    """
    config = WeakPostprocConfig() if config is None else config
    seg = _check_seg(seg)
    prob = seg[..., 1]
    points = detect_nuclei(prob, config.min_distance_px, config.peak_threshold, config.smooth_sigma)
    foreground = seg[..., 1] > seg[..., 0]
    instances = instances_from_points(prob, foreground, points, config.keep_unseeded)
    if config.min_size > 0 and instances.any():
        keep = instance_areas(instances) >= config.min_size
        instances, _ = relabel_by_lut(instances, keep)
    n = int(instances.max(initial=0))
    areas = instance_areas(instances)[1:]
    sums = instance_sums(instances, seg)[1:]
    probs = (sums / np.maximum(areas, 1)[:, None]).astype(np.float32)
    table = {
        "id": np.arange(1, n + 1, dtype=np.int32),
        "class": np.ones(n, dtype=np.int32),
        "probabilities": probs.reshape(n, 2),
        "area": areas.astype(np.int64),
        "centroid": centroids_by_id(instances, n),
        "solidity": instance_solidity(instances)[1:],
    }
    classes = (instances > 0).astype(np.int32)
    logger.debug("weak post-processing: %d detections, %d instances", len(points), n)
    return PostprocResult(instances, classes, table)


#: Default grid of ``kerasnuc tune`` for weak runs (32 configurations).
#: ``min_size`` 40 px (2.5 um2 at 0.25 um/px) removes the fragments between two peaks: on
#: the Kumar train points it raised the detection F1 of an ImageNet-Lite0 weak run from 0.594 to
#: 0.802 (README, point supervision).
DEFAULT_GRID: dict[str, list[Any]] = {
    "peak_threshold": [0.5, 0.6, 0.7],
    "min_distance_um": [2.5, 3.5, 5.0],
    "smooth_sigma": [0.0, 1.0],
    "min_size": [0, 40],
}


def tune_weak_postproc(
    seg_list: Sequence[np.ndarray],
    grid: Mapping[str, Sequence[Any]],
    score_fn: Callable[[list[np.ndarray], list[np.ndarray]], float],
    base_config: WeakPostprocConfig | None = None,
) -> tuple[WeakPostprocConfig, list[dict[str, Any]]]:
    """Grid search of :class:`WeakPostprocConfig` settings.

    Args:
        seg_list: per image the ``(H, W, 2)`` ``seg`` map.
        grid: setting name -> candidate values; every combination is tried (grid order, the
            last name varying fastest).
        score_fn: ``score_fn(pred_instances, pred_classes) -> float`` over the whole set, higher
            is better (e.g. PQ or detection F1 of the set).
        base_config: settings not in ``grid`` (default :class:`WeakPostprocConfig()`).

    Returns:
        ``(best_config, table)``: the best configuration (first on ties; NaN never wins) and one
        row per configuration: the grid values and ``"score"``.

    Raises:
        ValueError: an unknown setting, an empty value list, a bad value or no image.
    """
    if not seg_list:
        raise ValueError("`seg_list` must hold at least one image")
    base = WeakPostprocConfig() if base_config is None else base_config
    segs = [_check_seg(s) for s in seg_list]
    best, table = grid_search(segs, grid, postprocess_weak, base, score_fn)
    logger.info("tune_weak_postproc: best %s", best)
    return best, table
