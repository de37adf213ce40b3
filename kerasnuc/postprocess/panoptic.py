"""Post-processing of the ``panoptic`` method: detections -> instance and class maps (numpy).

The model (:class:`kerasnuc.models.panoptic.model.PanopticModel`) returns, per image, ``N``
detection slots: boxes, nucleus probabilities, classes and ``28 x 28`` mask probabilities in the
frame of each box, plus the GCN semantic map (background / nucleus softmax at full resolution).
Liu et al. 2019 use the instance branch alone at inference; kerasnuc can also let the instances
grow into the pixels the semantic branch calls nucleus (step 4, off by default).
:func:`postprocess_panoptic`:

1. keeps the detections with ``score >= score_threshold``;
2. optionally suppresses more with a greedy box NMS at ``nms_iou`` (the model already ran one at
   its own ``detection_nms_iou``; a lower value here removes more, 1.0 none);
3. pastes each mask into its box (bilinear resize with half-pixel centres, the same sampling as
   the training-time feature fusion; pixels whose centre lies inside the box), thresholds it at
   ``mask_threshold`` and paints it into the instance map so that a pixel claimed by several
   nuclei goes to the highest-scoring one; with ``min_visible > 0`` a detection of which less
   than that fraction of its own mask is still unclaimed by higher-scoring ones is dropped
   instead of leaving a sliver (the overlap rule of Kirillov et al. 2019, Panoptic Feature
   Pyramid Networks, Sec. 4: duplicates of a nucleus become false positives and spurious area);
4. with ``grow > 0``: every unclaimed pixel whose semantic nucleus probability is ``>=
   semantic_threshold`` and which lies within ``grow`` pixels (Euclidean) of an instance joins the
   nearest instance. The ``28 x 28`` masks of a small box are coarse and tend to miss a nucleus'
   rim, which the full-resolution semantic map still sees;
5. drops instances smaller than ``min_size`` pixels and renumbers them ``1 .. N``.

Steps 1-3 read ``score_threshold``, ``mask_threshold``, ``nms_iou`` and ``min_visible``, steps
4-5 the rest, so that :func:`tune_panoptic_postproc` pastes the masks once per setting of those
four.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from kerasnuc.fileutil import KerasnucError
from kerasnuc.postprocess.common import (
    PostprocResult,
    SettingsFile,
    Stage,
    centroids_by_id,
    grid_search,
    instance_areas,
    instance_solidity,
    relabel_by_lut,
)


@dataclasses.dataclass(frozen=True)
class PanopticPostprocConfig(SettingsFile):
    """Settings of :func:`postprocess_panoptic` (saved as ``postproc.json`` with a run).

    Attributes:
        score_threshold: minimum nucleus probability of a detection.
        mask_threshold: a pixel belongs to a nucleus where its mask probability is ``>=`` this.
        nms_iou: extra greedy box NMS (suppress IoU ``>`` this); 1.0 disables it.
        min_size: instances with fewer pixels (after overlaps are resolved) are dropped.
        grow: unclaimed semantic-nucleus pixels within this many pixels of an instance join the
            nearest one (0: the instance masks alone, as in the paper).
        semantic_threshold: a pixel is nucleus for ``grow`` where the semantic branch's nucleus
            probability is ``>=`` this.
        min_visible: a detection is dropped when less than this fraction of its thresholded
            mask is left after the higher-scoring ones took their pixels (0: none dropped, as
            in the paper).
    """

    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    nms_iou: float = 0.5
    min_size: int = 0
    grow: int = 0
    semantic_threshold: float = 0.5
    min_visible: float = 0.0

    def __post_init__(self) -> None:
        names = (
            "score_threshold",
            "mask_threshold",
            "nms_iou",
            "semantic_threshold",
            "min_visible",
        )
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValueError(f"`{name}` must be a number in [0, 1]. Received: {name}={value!r}")
        for name in ("min_size", "grow"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an int >= 0. Received: {name}={value!r}")


def _axis_weights(lo: float, hi: float, start: int, stop: int, m: int) -> np.ndarray:
    """``(stop - start, m)`` bilinear weights of pixel rows ``start..stop-1`` on mask rows."""
    centres = np.arange(start, stop, dtype=np.float64) + 0.5
    u = np.clip((centres - lo) / max(hi - lo, 1e-6) * m - 0.5, 0.0, m - 1.0)
    return np.maximum(1.0 - np.abs(u[:, None] - np.arange(m)[None, :]), 0.0)


def paste_mask(mask: np.ndarray, box: np.ndarray, height: int, width: int):
    """Resize a square mask into its box on an ``height x width`` image.

    Args:
        mask: ``(M, M)`` float mask in the box frame.
        box: ``(y1, x1, y2, x2)`` in pixels (edges; pixel ``i`` spans ``[i, i + 1)``).
        height, width: image size.

    Returns:
        ``(rows, cols, values)``: the slices of the image covered by the box (pixel centres
        inside ``[y1, y2) x [x1, x2)``) and the ``(len(rows), len(cols))`` resized values
        (half-pixel-centre bilinear sampling with edge clamping).
    """
    y1, x1, y2, x2 = (float(v) for v in box)
    r0, r1 = max(int(np.ceil(y1 - 0.5)), 0), min(int(np.ceil(y2 - 0.5)), height)
    c0, c1 = max(int(np.ceil(x1 - 0.5)), 0), min(int(np.ceil(x2 - 0.5)), width)
    if r1 <= r0 or c1 <= c0:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0))
    m = mask.shape[0]
    wy = _axis_weights(y1, y2, r0, r1, m)
    wx = _axis_weights(x1, x2, c0, c1, m)
    return slice(r0, r1), slice(c0, c1), wy @ mask.astype(np.float64) @ wx.T


def _box_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS (suppress IoU ``> iou``), in decreasing score order."""
    order = np.argsort(-scores, kind="stable")
    area = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    keep: list[int] = []
    for i in order:
        if keep:
            k = np.asarray(keep)
            ih = np.minimum(boxes[k, 2], boxes[i, 2]) - np.maximum(boxes[k, 0], boxes[i, 0])
            iw = np.minimum(boxes[k, 3], boxes[i, 3]) - np.maximum(boxes[k, 1], boxes[i, 1])
            inter = np.maximum(ih, 0) * np.maximum(iw, 0)
            union = area[k] + area[i] - inter
            overlap = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
            if np.any(overlap > iou):
                continue
        keep.append(int(i))
    return np.asarray(keep, dtype=np.int64)


def detections_from_maps(maps: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Unpack the model outputs of one image into ``(N, ...)`` detection arrays.

    Args:
        maps: ``{"boxes": (1, 4, N), "scores": (1, 1, N), "classes": (1, 1, N),
            "masks": (M, M, N), "semantic": (H, W, 2)}`` (one image of
            :func:`kerasnuc.models.maps.predict_maps`).

    Returns:
        ``{"boxes": (N, 4), "scores": (N,), "classes": (N,) int, "masks": (N, M, M),
        "size": (H, W), "nucleus": (H, W)}`` (the semantic branch's nucleus probability).

    Raises:
        KerasnucError: outputs of another method or shape.
    """
    missing = [k for k in ("boxes", "scores", "masks", "semantic") if k not in maps]
    if missing:
        raise KerasnucError(f"panoptic post-processing needs the outputs {missing} of the model")
    boxes = np.asarray(maps["boxes"], np.float64)
    scores = np.asarray(maps["scores"], np.float64).reshape(-1)
    n = scores.shape[0]
    if boxes.size != 4 * n:
        raise KerasnucError(f"panoptic outputs disagree: boxes {boxes.shape}, scores {n} slots")
    masks = np.asarray(maps["masks"], np.float64)
    classes = np.asarray(maps.get("classes", np.ones_like(scores)), np.float64).reshape(-1)
    semantic = np.asarray(maps["semantic"], np.float32)
    if semantic.ndim != 3 or semantic.shape[-1] != 2:
        raise KerasnucError(
            "panoptic outputs: semantic must be (H, W, 2) (background, nucleus), "
            f"got {semantic.shape}"
        )
    return {
        "boxes": boxes.reshape(4, n).T,
        "scores": scores,
        "classes": np.rint(classes).astype(np.int32),
        "masks": np.moveaxis(masks.reshape(masks.shape[0], masks.shape[1], n), -1, 0),
        "size": semantic.shape[:2],
        "nucleus": semantic[..., 1],
    }


_PASTE_FIELDS = ("score_threshold", "mask_threshold", "nms_iou", "min_visible")
_FINISH_FIELDS = ("grow", "semantic_threshold", "min_size")


def _paste(det: Mapping[str, Any], config: PanopticPostprocConfig):
    """Steps 1-3: ``(raw, keep)``: the painted map (``k`` = ``keep[k - 1]``) and the slots."""
    height, width = det["size"]
    keep = np.flatnonzero(det["scores"] >= config.score_threshold)
    if config.nms_iou < 1.0 and keep.size:
        keep = keep[_box_nms(det["boxes"][keep], det["scores"][keep], config.nms_iou)]
    keep = keep[np.argsort(det["scores"][keep], kind="stable")]  # lowest score first
    raw = np.zeros((height, width), np.int32)
    # Highest score first, each taking only the pixels still free: a pixel goes to the
    # highest-scoring mask that covers it (ties: the later slot, as painting in ``keep``
    # order would give). Label ``k`` stays ``keep[k - 1]``; a dropped detection has no pixels.
    for k in range(len(keep), 0, -1):
        i = keep[k - 1]
        rows, cols, values = paste_mask(det["masks"][i], det["boxes"][i], height, width)
        if not values.size:
            continue
        region = raw[rows, cols]
        own = values >= config.mask_threshold
        free = own & (region == 0)
        if config.min_visible > 0 and free.sum() < config.min_visible * own.sum():
            continue
        region[free] = k
    return raw, keep


def grow_into_foreground(raw: np.ndarray, foreground: np.ndarray, distance: int) -> np.ndarray:
    """Unlabelled ``foreground`` pixels within ``distance`` px of a label take the nearest label.

    Args:
        raw: ``(H, W)`` int label map (0 = none).
        foreground: ``(H, W)`` bool, where labels may grow.
        distance: the largest Euclidean distance (pixel centres) a label grows.

    Returns:
        A new label map; labelled pixels keep their label. Ties between two equally near labels
        go to the one ``scipy.ndimage.distance_transform_edt`` reports.
    """
    if distance <= 0 or not raw.any():
        return raw
    to_label, (iy, ix) = ndimage.distance_transform_edt(raw == 0, return_indices=True)
    take = (raw == 0) & foreground & (to_label <= distance)
    out = raw.copy()
    out[take] = raw[iy[take], ix[take]]
    return out


def _finish(
    pasted: tuple[np.ndarray, np.ndarray],
    det: Mapping[str, Any],
    config: PanopticPostprocConfig,
) -> PostprocResult:
    """Steps 4-5 and the instance table."""
    raw, keep = pasted
    if config.grow > 0:
        foreground = det["nucleus"] >= config.semantic_threshold
        raw = grow_into_foreground(raw, foreground, config.grow)
    num_classes = max(1, int(det["classes"].max(initial=1)))
    area_raw = instance_areas(raw)
    ok = np.zeros(len(keep) + 1, bool)
    ok[1 : len(area_raw)] = area_raw[1:] >= max(config.min_size, 1)
    instances, n = relabel_by_lut(raw, ok[: max(len(area_raw), 1)])
    kept = keep[ok[1 : len(area_raw)].nonzero()[0]] if n else np.zeros(0, np.int64)
    classes = np.maximum(det["classes"][kept], 1).astype(np.int32)
    scores = det["scores"][kept]
    probabilities = np.zeros((n, num_classes + 1), np.float32)
    probabilities[np.arange(n), classes] = scores
    probabilities[:, 0] = 1.0 - scores
    table = {
        "id": np.arange(1, n + 1, dtype=np.int32),
        "class": classes,
        "probabilities": probabilities,
        "area": instance_areas(instances)[1:].astype(np.int64),
        "centroid": centroids_by_id(instances, n),
        "solidity": instance_solidity(instances)[1:],
    }
    class_lut = np.concatenate([[0], classes]).astype(np.int32)
    return PostprocResult(instances, class_lut[instances], table)


def postprocess_panoptic(
    maps: Mapping[str, np.ndarray], config: PanopticPostprocConfig | None = None
) -> PostprocResult:
    """Instance and class maps from the panoptic model's detections (see the module docstring).

    Args:
        maps: one image's model outputs (:func:`detections_from_maps`).
        config: thresholds (default :class:`PanopticPostprocConfig`).

    Returns:
        :class:`~kerasnuc.postprocess.common.PostprocResult`; ``table["probabilities"]`` holds
        the detection score in the instance's class column and ``1 - score`` in column 0.
    """
    config = config or PanopticPostprocConfig()
    det = detections_from_maps(maps)
    return _finish(_paste(det, config), det, config)


#: Default ``kerasnuc tune`` grid (72 configurations): detection score, mask threshold, extra
#: NMS. Tuned on Kumar train tiles (Lite0 recipe), NMS 0.2 was best by PQ and by AJI; score 0.2
#: never won, ``min_visible`` 0.5 moved the best PQ and AJI by less than 0.001, and ``grow`` 2
#: cost PQ (0.471 against 0.482) while moving val AJI by < 0.003: give those in a grid file.
DEFAULT_GRID: dict[str, list[Any]] = {
    "score_threshold": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "mask_threshold": [0.4, 0.5, 0.6],
    "nms_iou": [0.2, 0.3, 0.5, 1.0],
}


def tune_panoptic_postproc(
    maps_list: Sequence[Mapping[str, np.ndarray]],
    grid: Mapping[str, Sequence[Any]],
    score_fn: Callable[[list[np.ndarray], list[np.ndarray]], float],
    base_config: PanopticPostprocConfig | None = None,
) -> tuple[PanopticPostprocConfig, list[dict[str, Any]]]:
    """Grid search of :class:`PanopticPostprocConfig` settings on the model outputs of a set.

    In two :class:`~kerasnuc.postprocess.common.Stage` steps: the masks are pasted once per image
    and setting of ``score_threshold`` / ``mask_threshold`` / ``nms_iou``; growth and the size
    filter run per configuration.

    Args:
        maps_list: per image the model outputs (:func:`detections_from_maps`).
        grid: setting name -> candidate values (every combination, the last name fastest).
        score_fn: ``score_fn(pred_instances, pred_classes) -> float`` over the whole set.
        base_config: the settings not in ``grid`` (default :class:`PanopticPostprocConfig()`).

    Returns:
        ``(best_config, table)`` of :func:`~kerasnuc.postprocess.common.grid_search`.
    """
    base = PanopticPostprocConfig() if base_config is None else base_config
    detections = [detections_from_maps(maps) for maps in maps_list]
    stages = (
        Stage(_PASTE_FIELDS, lambda det, _, config: _paste(det, config)),
        Stage(_FINISH_FIELDS, lambda pasted, det, config: _finish(pasted, det, config)),
    )
    return grid_search(detections, grid, None, base, score_fn, stages=stages)


__all__ = [
    "DEFAULT_GRID",
    "PanopticPostprocConfig",
    "detections_from_maps",
    "grow_into_foreground",
    "paste_mask",
    "postprocess_panoptic",
    "tune_panoptic_postproc",
]
