"""Validation with the real post-processing: predict full images, post-process, score.

Used by the training callback (checkpoint selection by mPQ+ / PQ) and by ``kerasnuc tune``
(threshold grid search). Images are predicted whole (:func:`kerasnuc.models.maps.predict_maps`
pads them to a multiple of 32 and crops the maps back), never as training crops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kerasnuc.fileutil import KerasnucError
from kerasnuc.instances import instance_centroids
from kerasnuc.metrics import DetectionResult, MetricAccumulator, match_points
from kerasnuc.models.maps import predict_maps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValItem:
    """One validation image at the model's resolution.

    Attributes:
        id: ``dataset/id``.
        image: ``(H, W, 3)`` uint8 RGB.
        instances: ``(H, W)`` int32 ground-truth instance map.
        classes: ``(H, W)`` int32 ground-truth class map, or None for class-agnostic data.
    """

    id: str
    image: np.ndarray
    instances: np.ndarray
    classes: np.ndarray | None

    @property
    def group(self) -> str:
        """The dataset the image comes from (scored on its own)."""
        return self.id.split("/", 1)[0]


def val_items(
    datasets: Sequence[Any],
    split: str,
    target_mpp: float | None = None,
    max_images: int | None = None,
) -> tuple[list[ValItem], int]:
    """The images of ``split`` decoded (and resampled to ``target_mpp``) like the pipeline does.

    Args:
        datasets: :class:`kerasnuc.data.dataset.Dataset` objects with the same classes.
        split: split name.
        target_mpp: pixel size of the model (None: the data's own).
        max_images: keep the first this many images of each dataset.

    Returns:
        ``(items, num_classes)``; ``num_classes`` is 0 for class-agnostic data. Images of a
        dataset without cell types have ``classes=None`` also when others have types.

    Raises:
        KerasnucError: no image in the split, or datasets with different classes.
    """
    from kerasnuc.data.pipeline import load_items

    datasets = list(datasets)
    items, num_classes = load_items(datasets, split, target_mpp)
    if max_images is not None:
        kept: dict[int, int] = {}
        capped = []
        for it in items:
            kept[it.source] = kept.get(it.source, 0) + 1
            if kept[it.source] <= max_images:
                capped.append(it)
        items = capped
    out = [
        ValItem(
            it.id,
            it.image,
            it.labels[..., 0].astype(np.int32),
            it.labels[..., 1].astype(np.int32)
            if num_classes and datasets[it.source].has_classes
            else None,
        )
        for it in items
    ]
    return out, num_classes


@dataclass(frozen=True)
class PointItem:
    """One image with point annotations, at the model's resolution (``tune --points``).

    Attributes:
        id: ``dataset/id``.
        image: ``(H, W, 3)`` uint8 RGB.
        points: ``(K, 2)`` float64 ``(row, col)`` in pixels of ``image``.
    """

    id: str
    image: np.ndarray
    points: np.ndarray


def point_items(
    datasets: Sequence[Any],
    split: str,
    target_mpp: float | None = None,
    max_images: int | None = None,
    points: Mapping[str, np.ndarray] | None = None,
) -> list[PointItem]:
    """The images of ``split`` with one point per nucleus, resampled to ``target_mpp``.

    Args:
        datasets: :class:`kerasnuc.data.dataset.Dataset` objects.
        split: split name.
        target_mpp: pixel size of the model (None: the data's own).
        max_images: keep the first this many images of each dataset.
        points: ``{image id: (K, 2) (row, col)}`` (``--points DIR``) instead of the datasets'
            own: the points of a points dataset, else the centroids of the instance maps.

    Raises:
        KerasnucError: no image in the split, or an image without points in ``points``.
    """
    from kerasnuc.data.pipeline import dataset_scale, resample_image
    from kerasnuc.data.points import points_from_instances

    out = []
    for ds in datasets:
        ids = ds.split(split)
        for id in ids[:max_images] if max_images is not None else ids:
            image = ds.image(id)
            if points is not None:
                if id not in points:
                    raise KerasnucError(f"{ds.image_path(id)}: no point annotations for this image")
                pts = np.asarray(points[id], dtype=np.float64).reshape(-1, 2)
            elif ds.is_points:
                pts, _ = ds.points(id)
            else:
                pts, _ = points_from_instances(ds.instances(id))
            resized = resample_image(image, dataset_scale(ds, target_mpp))
            factor = np.asarray(resized.shape[:2], np.float64) / np.asarray(image.shape[:2])
            out.append(PointItem(f"{ds.name}/{id}", resized, (pts + 0.5) * factor - 0.5))
    return out


def detection_counts(
    instances: np.ndarray, points: np.ndarray, max_distance: float
) -> tuple[int, int, int]:
    """``(TP, FP, FN)`` of the nuclei of an instance map against point annotations: centroids
    and points paired one to one within ``max_distance`` px (:func:`kerasnuc.metrics.
    match_points`)."""
    _, centroids = instance_centroids(instances)
    pairs = match_points(np.asarray(points).reshape(-1, 2), centroids, max_distance)[0].size
    return pairs, len(centroids) - pairs, len(points) - pairs


def point_score_fn(
    items: Sequence[PointItem], max_distance: float
) -> Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], float]:
    """``score_fn(pred_instances, pred_classes)`` of the grid search: the pooled detection F1
    over ``items`` (counts summed over the images, then F1)."""

    def score(pred_instances: Sequence[np.ndarray], pred_classes: Sequence[np.ndarray]) -> float:
        tp = fp = fn = 0
        for inst, item in zip(pred_instances, items, strict=True):
            a, b, c = detection_counts(inst, item.points, max_distance)
            tp, fp, fn = tp + a, fp + b, fn + c
        return DetectionResult.from_counts(tp, fp, fn).f1

    return score


def tile_items(items: Sequence[ValItem], size: int) -> list[ValItem]:
    """Split every item into a grid of non-overlapping tiles of at most ``size`` px a side.

    An image of height ``H`` gets ``ceil(H / size)`` rows of tiles of (nearly) equal height, the
    same for the width; nuclei on a tile border are cut in the ground truth as in the prediction.
    Tile ids are ``<item id>@<row>,<col>`` (top-left pixel), in the same dataset group.
    """
    if size < 1:
        raise ValueError(f"`size` must be >= 1. Received: size={size}")
    out = []
    for it in items:
        h, w = it.instances.shape
        rows = np.round(np.linspace(0, h, -(-h // size) + 1)).astype(int)
        cols = np.round(np.linspace(0, w, -(-w // size) + 1)).astype(int)
        for y0, y1 in zip(rows[:-1], rows[1:], strict=True):
            for x0, x1 in zip(cols[:-1], cols[1:], strict=True):
                out.append(
                    ValItem(
                        f"{it.id}@{y0},{x0}",
                        it.image[y0:y1, x0:x1],
                        it.instances[y0:y1, x0:x1],
                        None if it.classes is None else it.classes[y0:y1, x0:x1],
                    )
                )
    return out


def predict_all(
    model: Any, items: Sequence[ValItem], views: int = 1
) -> list[dict[str, np.ndarray]]:
    """Probability maps ``{output: (H, W, K) float32}`` of every item (``views`` forward passes
    each, see :func:`kerasnuc.models.maps.predict_maps`)."""
    return [predict_maps(model, it.image, views=views) for it in items]


def score_summary(summary: Mapping[str, Any], num_classes: int) -> float:
    """The checkpoint score of a metrics summary: mPQ+ with classes, else the mean PQ.

    A summary of :func:`score_predictions` over several datasets carries its own ``"score"``:
    the mean over the datasets of their mPQ+ (datasets with cell types) or PQ (without).
    """
    if "score" in summary:
        return float(summary["score"])
    return float(summary["mpq_plus"] if num_classes else summary["pq"])


#: Scores averaged over the datasets of a multi-dataset validation.
_MEAN_KEYS = ("pq", "dq", "sq", "aji", "pixel_f1")


def score_predictions(
    pred_instances: Sequence[np.ndarray],
    pred_classes: Sequence[np.ndarray],
    items: Sequence[ValItem],
    num_classes: int,
) -> dict[str, Any]:
    """Dataset-level metrics (:func:`kerasnuc.metrics.aggregate`) of predictions on ``items``.

    Each dataset is scored on its own (mPQ+ and the other class metrics only where it has cell
    types). With one dataset the summary is that dataset's; with several, ``score`` and the
    instance metrics (PQ, DQ, SQ, AJI, pixel F1) are means over the datasets, the class metrics
    come from the datasets with types, and every dataset's metrics are added as
    ``<dataset>_<metric>``. The object-level Hausdorff distance is skipped (it dominates the
    cost and is not used to select checkpoints).
    """
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.group, []).append(i)
    summaries: dict[str, dict[str, Any]] = {}
    for name, idx in groups.items():
        typed = bool(num_classes) and items[idx[0]].classes is not None
        acc = MetricAccumulator(num_classes=num_classes if typed else 0, hausdorff=False)
        for i in idx:
            it = items[i]
            acc.add(
                it.instances,
                pred_instances[i],
                it.classes if typed else None,
                pred_classes[i] if typed else None,
                id=it.id,
            )
        summary = acc.summary()
        summary["score"] = float(summary["mpq_plus"] if typed else summary["pq"])
        summaries[name] = summary
    if len(summaries) == 1:
        return next(iter(summaries.values()))
    out: dict[str, Any] = {
        "score": float(np.mean([s["score"] for s in summaries.values()])),
    }
    for key in _MEAN_KEYS:
        out[key] = float(np.nanmean([s[key] for s in summaries.values()]))
    for name, summary in summaries.items():
        for key, value in summary.items():
            if isinstance(value, int | float):
                out[f"{name}_{key}"] = value
        if "mpq_plus" in summary:
            for key in ("mpq_plus", "r2", "miou_pooled", "mdice_pooled"):
                if key in summary:
                    out.setdefault(key, summary[key])
    return out


def validate(
    model: Any,
    items: Sequence[ValItem],
    num_classes: int,
    postprocess: Any,
    postproc_config: Any,
) -> dict[str, Any]:
    """Predict, post-process and score ``items``.

    Args:
        model: Keras model with a dict of named outputs.
        items: validation images.
        num_classes: C (0: score instances only).
        postprocess: ``(maps, postproc_config) -> PostprocResult`` (the registry's).
        postproc_config: post-processing settings.

    Returns:
        :func:`score_predictions` summary plus ``"score"`` (:func:`score_summary`).
    """
    insts, clss = [], []
    for it in items:
        result = postprocess(predict_maps(model, it.image), postproc_config)
        insts.append(result.instances)
        clss.append(result.classes)
    summary = score_predictions(insts, clss, items, num_classes)
    summary["score"] = score_summary(summary, num_classes)
    return summary
