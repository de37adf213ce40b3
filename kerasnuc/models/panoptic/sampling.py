"""Training targets of the RPN and the ROI heads (Ren et al. 2015; He et al. 2017), ``keras.ops``.

All functions take **padded** ground truth: ``gt_boxes (B, G, 4)`` with a boolean ``gt_valid
(B, G)`` (padded boxes are never matched), so batches keep static shapes. ``G`` must be >= 1
(pad with one invalid box when an image has no nucleus). Random choices use ``seed``: an int
(deterministic; the same draw at every call inside a compiled graph) or a
``keras.random.SeedGenerator`` (a new draw per call: owned by the layer/model that calls these
functions during training).

Choices for nuclei-dense images (a 512 x 512 crop at 40x holds 100-400 nuclei):

* RPN: ``256`` anchors per image, at most half positive (Faster R-CNN), IoU ``>= 0.7`` positive,
  ``< 0.3`` negative, plus every anchor with the highest IoU of a ground-truth box (low-quality
  matches) so that each nucleus gets at least one positive anchor.
* ROI heads: ``512`` proposals per image (Detectron2's default; the 128 of Mask R-CNN's paper would
  give at most 32 positive nuclei per crop and leave most nuclei of a crop without a mask loss),
  at most 25 % positive (IoU ``>= 0.5``), background IoU in ``[0, 0.5)``; ground-truth boxes are
  added to the proposals (Detectron2), so positives exist from the first step.
* Box-head deltas use :data:`ROI_BOX_WEIGHTS` ``(10, 10, 5, 5)`` (Detectron2).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from kerasnuc.models.panoptic.boxes import box_iou, encode_boxes
from kerasnuc.models.panoptic.roi_align import sample_grid

#: Weights of the box-head deltas (Detectron2 ``ROI_BOX_HEAD.BBOX_REG_WEIGHTS``); decode the box
#: head's predictions with the same weights.
ROI_BOX_WEIGHTS: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)


def _batched(x, rank: int):
    """Add a batch axis when ``x`` has ``rank - 1`` dims; returns ``(x, was_unbatched)``."""
    x = ops.convert_to_tensor(x)
    if len(x.shape) == rank - 1:
        return x[None], True
    if len(x.shape) != rank:
        raise ValueError(f"Expected a tensor of rank {rank - 1} or {rank}. Received: {x.shape}")
    return x, False


def _gather(x, index):
    """``x (B, N, ...)`` gathered along axis 1 at ``index (B, M)`` -> ``(B, M, ...)``."""
    index = ops.cast(index, "int32")
    extra = len(x.shape) - 2
    idx = ops.reshape(index, (*ops.shape(index), *([1] * extra)))
    return ops.take_along_axis(x, idx, axis=1)


def match_boxes(
    anchors,
    gt_boxes,
    gt_valid,
    pos_iou: float = 0.7,
    neg_iou: float = 0.3,
    allow_low_quality: bool = True,
    chunk_size: int | None = 16384,
):
    """Label anchors by their IoU with the ground truth (RPN matching).

    Args:
        anchors: ``(A, 4)`` anchors (or ``(B, A, 4)``).
        gt_boxes: ``(B, G, 4)`` padded ground-truth boxes (or ``(G, 4)`` for one image).
        gt_valid: ``(B, G)`` bool, ``False`` for padding.
        pos_iou: anchors with best IoU ``>= pos_iou`` are positive.
        neg_iou: anchors with best IoU ``< neg_iou`` are negative; in between ignored.
        allow_low_quality: also make positive every anchor whose IoU with some valid gt equals
            that gt's highest IoU over all anchors (``> 0``), so each gt has a positive anchor.
        chunk_size: when the number of anchors is static, the ``(B, A, G)`` IoU matrix is
            computed in chunks of this many anchors (two passes with low-quality matches), which
            bounds memory (a single pass holds several ``(B, A, G)`` float32 arrays: about
            2 GB for 2 x 512 x 512 crops with 300 gt boxes). ``None``: one pass.

    Returns:
        ``(labels, matched_gt_index)``: ``(B, A)`` int32 in ``{1, 0, -1}`` and ``(B, A)`` int32
        index of the best-overlapping valid gt (meaningful where ``labels == 1``). Without any
        valid gt every anchor is negative. Unbatched inputs give ``(A,)`` outputs.
    """
    gt_boxes, unbatched = _batched(ops.cast(gt_boxes, "float32"), 3)
    gt_valid, _ = _batched(ops.cast(gt_valid, "bool"), 2)
    anchors = ops.convert_to_tensor(anchors, "float32")
    if len(anchors.shape) == 2:
        anchors = anchors[None]
    n = anchors.shape[1]
    if chunk_size and n is not None and n > chunk_size:
        chunks = [anchors[:, s : s + chunk_size] for s in range(0, n, chunk_size)]
    else:
        chunks = [anchors]

    def masked_iou(chunk):
        return ops.where(gt_valid[:, None, :], box_iou(chunk, gt_boxes), -1.0)  # (B, a, G)

    best, matched, gt_best = [], [], None
    for chunk in chunks:
        iou = masked_iou(chunk)
        best.append(ops.max(iou, axis=2))
        matched.append(ops.cast(ops.argmax(iou, axis=2), "int32"))
        chunk_best = ops.max(iou, axis=1, keepdims=True)  # (B, 1, G)
        gt_best = chunk_best if gt_best is None else ops.maximum(gt_best, chunk_best)
    best = ops.concatenate(best, axis=1)
    matched = ops.concatenate(matched, axis=1)
    labels = ops.where(best >= pos_iou, 1, ops.where(best < neg_iou, 0, -1))
    if allow_low_quality:
        # Second pass (same arithmetic, so equality with gt_best is exact).
        low = [
            ops.any(ops.logical_and(ops.equal(masked_iou(c), gt_best), gt_best > 0.0), axis=2)
            for c in chunks
        ]
        labels = ops.where(ops.concatenate(low, axis=1), 1, labels)
    labels = ops.cast(labels, "int32")
    if unbatched:
        return labels[0], matched[0]
    return labels, matched


def _random_uniform(shape, seed):
    return keras.random.uniform(shape, 0.0, 1.0, dtype="float32", seed=seed)


def sample_balanced(
    labels,
    num_samples: int = 256,
    positive_fraction: float = 0.5,
    seed: int | keras.random.SeedGenerator | None = None,
):
    """Randomly keep at most ``num_samples`` labelled entries per row, positives first.

    Up to ``int(num_samples * positive_fraction)`` positives (``1``) are drawn uniformly; the rest
    of the ``num_samples`` are negatives (``0``), so a row with few positives is filled with more
    negatives (Faster R-CNN). Entries not drawn become ``-1`` (ignored).

    Args:
        labels: ``(B, N)`` or ``(N,)`` int labels in ``{1, 0, -1}`` (``N`` may be dynamic).
        num_samples: samples per row.
        positive_fraction: maximum fraction of positives.
        seed: int or ``keras.random.SeedGenerator``.

    Returns:
        Labels of the same shape, int32, with unsampled entries set to ``-1``.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive int. Received: {num_samples!r}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(
            "`positive_fraction` must be in [0, 1]. "
            f"Received: positive_fraction={positive_fraction}"
        )
    labels, unbatched = _batched(ops.cast(labels, "int32"), 2)
    n = labels.shape[1]
    dynamic_n = None
    if n is None:  # dynamic row length: pad with ignored entries so that top_k is defined
        dynamic_n = ops.shape(labels)[1]
        pad = -ops.ones((ops.shape(labels)[0], num_samples), "int32")
        labels = ops.concatenate([labels, pad], axis=1)
        n = num_samples
    shape = ops.shape(labels)
    batch = shape[0]
    rand = _random_uniform(shape, seed)
    rows = ops.arange(batch, dtype="int32")[:, None]
    selected = ops.zeros(shape, "bool")

    def pick(key, k, limit=None):
        vals, idx = ops.top_k(key, k)
        take = vals >= 0.0
        if limit is not None:
            take = ops.logical_and(take, ops.arange(k, dtype="int32")[None, :] < limit[:, None])
        coords = ops.stack([ops.broadcast_to(rows, ops.shape(idx)), ops.cast(idx, "int32")], -1)
        hits = ops.scatter(
            ops.reshape(coords, (-1, 2)), ops.reshape(ops.cast(take, "int32"), (-1,)), shape
        )
        return hits > 0

    max_pos = min(int(num_samples * positive_fraction), n)
    if max_pos > 0:
        pos_key = ops.where(labels == 1, rand, -1.0)
        selected = pick(pos_key, max_pos)
    n_pos = ops.sum(ops.cast(selected, "int32"), axis=1)
    neg_key = ops.where(labels == 0, rand, -1.0)
    selected_neg = pick(neg_key, min(num_samples, n), num_samples - n_pos)
    out = ops.where(selected, 1, ops.where(selected_neg, 0, -1))
    out = ops.cast(out, "int32")
    if dynamic_n is not None:
        out = out[:, :dynamic_n]
    return out[0] if unbatched else out


def rpn_targets(
    anchors,
    gt_boxes,
    gt_valid,
    num_samples: int = 256,
    positive_fraction: float = 0.5,
    pos_iou: float = 0.7,
    neg_iou: float = 0.3,
    seed: int | keras.random.SeedGenerator | None = None,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
):
    """RPN targets: :func:`match_boxes`, :func:`sample_balanced` and the box deltas.

    Returns:
        ``(labels (B, A) int32 in {1, 0, -1}, deltas (B, A, 4) float32)``; deltas are
        :func:`~kerasnuc.models.panoptic.boxes.encode_boxes` of each anchor's matched gt with
        ``weights`` where ``labels == 1`` and ``0`` elsewhere.
    """
    labels, matched = match_boxes(anchors, gt_boxes, gt_valid, pos_iou, neg_iou)
    labels = sample_balanced(labels, num_samples, positive_fraction, seed)
    gt_boxes, unbatched = _batched(ops.cast(gt_boxes, "float32"), 3)
    if unbatched:
        labels, matched = labels[None], matched[None]
    anchors = ops.convert_to_tensor(anchors, "float32")
    target = _gather(gt_boxes, matched)
    deltas = encode_boxes(anchors if len(anchors.shape) == 3 else anchors[None], target, weights)
    deltas = ops.where((labels == 1)[..., None], deltas, 0.0)
    if unbatched:
        return labels[0], deltas[0]
    return labels, deltas


def sample_proposals(
    proposals,
    gt_boxes,
    gt_classes,
    gt_valid,
    num_samples: int = 512,
    positive_fraction: float = 0.25,
    fg_iou: float = 0.5,
    bg_iou: tuple[float, float] = (0.0, 0.5),
    seed: int | keras.random.SeedGenerator | None = None,
    proposal_valid=None,
    add_gt: bool = True,
    weights: Sequence[float] = ROI_BOX_WEIGHTS,
):
    """Sample the ROIs trained by the box and mask heads, with their targets.

    Proposals (plus the valid gt boxes when ``add_gt``) with best IoU ``>= fg_iou`` are
    foreground, those with ``bg_iou[0] <= IoU < bg_iou[1]`` background (an image without valid gt
    has only background); :func:`sample_balanced` draws ``num_samples`` of them. The outputs list
    the sampled positives first, then the negatives, then padding (``valid == False``) when there
    were not enough candidates.

    Args:
        proposals: ``(B, P, 4)`` boxes (e.g. the RPN's post-NMS proposals, gradient-stopped).
        gt_boxes: ``(B, G, 4)`` padded ground-truth boxes.
        gt_classes: ``(B, G)`` int class of each gt in ``1 .. C``.
        gt_valid: ``(B, G)`` bool.
        num_samples: ROIs per image ``S``.
        positive_fraction: maximum fraction of foreground ROIs.
        fg_iou: foreground IoU threshold.
        bg_iou: ``(low, high)`` background IoU range.
        seed: int or ``keras.random.SeedGenerator``.
        proposal_valid: optional ``(B, P)`` bool, ``False`` for padded proposals (e.g. NMS slots
            with index ``-1``).
        add_gt: append the gt boxes to the candidates.
        weights: delta weights of :func:`~kerasnuc.models.panoptic.boxes.encode_boxes`.

    Returns:
        dict of
        ``"rois"`` ``(B, S, 4)`` float32 (gradient-stopped),
        ``"class_targets"`` ``(B, S)`` int32: gt class for foreground, ``0`` for background,
        ``-1`` for padding;
        ``"box_targets"`` ``(B, S, 4)`` float32 deltas to the matched gt (``0`` unless positive);
        ``"matched_gt_index"`` ``(B, S)`` int32 index into ``G`` (meaningful for positives; use it
        to pick the instance id of each ROI for :func:`mask_targets`);
        ``"positive"`` ``(B, S)`` bool; ``"valid"`` ``(B, S)`` bool.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive int. Received: {num_samples!r}")
    proposals = ops.convert_to_tensor(proposals, "float32")
    gt_boxes = ops.convert_to_tensor(gt_boxes, "float32")
    gt_valid = ops.cast(gt_valid, "bool")
    gt_classes = ops.cast(gt_classes, "int32")
    shape = ops.shape(proposals)
    if proposal_valid is None:
        proposal_valid = ops.ones(shape[:2], "bool")
    proposal_valid = ops.cast(proposal_valid, "bool")
    cand, cand_valid = proposals, proposal_valid
    if add_gt:
        cand = ops.concatenate([cand, gt_boxes], axis=1)
        cand_valid = ops.concatenate([cand_valid, gt_valid], axis=1)
    n = cand.shape[1]
    if n is None:
        raise ValueError("`proposals` and `gt_boxes` must have static sizes (P and G).")
    if n < num_samples:  # pad so that num_samples slots exist
        batch = ops.shape(cand)[0]
        cand = ops.concatenate([cand, ops.zeros((batch, num_samples - n, 4))], axis=1)
        cand_valid = ops.concatenate(
            [cand_valid, ops.zeros((batch, num_samples - n), "bool")], axis=1
        )
    cand = ops.stop_gradient(cand)
    iou = ops.where(gt_valid[:, None, :], box_iou(cand, gt_boxes), -1.0)  # (B, N, G)
    best = ops.maximum(ops.max(iou, axis=2), 0.0)  # no valid gt -> IoU 0 -> background
    matched = ops.cast(ops.argmax(iou, axis=2), "int32")
    fg = ops.logical_and(cand_valid, best >= fg_iou)
    bg = ops.logical_and(cand_valid, ops.logical_and(best >= bg_iou[0], best < bg_iou[1]))
    labels = ops.where(fg, 1, ops.where(bg, 0, -1))
    labels = sample_balanced(labels, num_samples, positive_fraction, seed)
    # Sampled positives first (priority 2), then negatives (1), then the rest (0); top_k keeps
    # the lower index first among equal priorities.
    priority = ops.cast(labels + 1, "float32")
    _, order = ops.top_k(priority, num_samples)
    order = ops.cast(order, "int32")
    lab = ops.take_along_axis(labels, order, axis=1)
    rois = _gather(cand, order)
    matched = ops.take_along_axis(matched, order, axis=1)
    positive = lab == 1
    valid = lab >= 0
    cls = ops.take_along_axis(gt_classes, matched, axis=1)
    cls = ops.where(positive, cls, ops.where(valid, 0, -1))
    box_targets = encode_boxes(rois, _gather(gt_boxes, matched), weights)
    box_targets = ops.where(positive[..., None], box_targets, 0.0)
    return {
        "rois": ops.stop_gradient(rois),
        "class_targets": ops.cast(cls, "int32"),
        "box_targets": ops.stop_gradient(box_targets),
        "matched_gt_index": matched,
        "positive": positive,
        "valid": valid,
    }


def mask_targets(
    instance_map,
    rois,
    roi_instance_ids,
    size: int = 28,
    sampling_ratio: int = 2,
    threshold: float = 0.5,
):
    """Binary mask target of each ROI, cropped from a per-image instance map.

    The mask of instance ``id`` (``instance_map == id``) is ROI-Aligned (``aligned=True``,
    ``size x size`` bins, ``sampling_ratio`` bilinear samples per axis and bin) inside each ROI and
    thresholded at ``threshold`` (Detectron2 crops bitmasks the same way). Only the labels at the
    sample points are gathered, so memory is ``O(R * size^2)``, not one full mask per nucleus.

    Args:
        instance_map: ``(B, H, W)`` (or ``(B, H, W, 1)``) int instance ids, ``0`` = background.
        rois: ``(B, S, 4)`` ROIs in image pixels (those of :func:`sample_proposals`).
        roi_instance_ids: ``(B, S)`` int id of the instance each ROI is matched to, e.g.
            ``take_along_axis(gt_instance_ids, matched_gt_index, axis=1)``; ids ``<= 0`` give
            empty masks (use them for negative/padded ROIs, which get no mask loss anyway).
        size: output side (28 in Mask R-CNN).
        sampling_ratio: samples per bin and axis.
        threshold: a target pixel is ``1`` where the bin's mask coverage is ``>= threshold``.

    Returns:
        ``(B, S, size, size)`` float32 in ``{0, 1}``.
    """
    instance_map = ops.convert_to_tensor(instance_map)
    if len(instance_map.shape) == 4:
        instance_map = instance_map[..., 0]
    instance_map = ops.cast(instance_map, "int32")
    rois = ops.convert_to_tensor(rois, "float32")
    shape = ops.shape(instance_map)
    height, width = shape[1], shape[2]
    n_rois = ops.shape(rois)[1]
    batch = ops.shape(rois)[0]
    flat_rois = ops.reshape(rois, (-1, 4))
    image_index = ops.repeat(ops.arange(batch, dtype="int32"), n_rois)
    base = image_index * ops.cast(height * width, "int32")
    corners = sample_grid(
        flat_rois, base, height, width, (size, size), sampling_ratio, aligned=True
    )
    table = ops.reshape(instance_map, (-1,))
    ids = ops.reshape(ops.cast(roi_instance_ids, "int32"), (-1,))[:, None, None]
    cover = None
    for idx, w in corners:
        hit = ops.logical_and(ops.equal(ops.take(table, idx, axis=0), ids), ids > 0)
        term = ops.cast(hit, "float32") * w
        cover = term if cover is None else cover + term
    s = sampling_ratio
    cover = ops.mean(ops.reshape(cover, (-1, size, s, size, s)), axis=(2, 4))
    masks = ops.cast(cover >= threshold, "float32")
    return ops.stop_gradient(ops.reshape(masks, (batch, n_rois, size, size)))


__all__ = [
    "ROI_BOX_WEIGHTS",
    "mask_targets",
    "match_boxes",
    "rpn_targets",
    "sample_balanced",
    "sample_proposals",
]
