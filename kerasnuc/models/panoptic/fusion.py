"""Semantic feature fusion of the ``panoptic`` instance branch (Liu et al., IJCAI 2019, Eq. 1-3).

``F_0`` is the finest FPN level ``P2`` upsampled x4 and projected to 2 channels (background /
nucleus logits). Every predicted mask ``M_i`` is resized to its predicted box ``B_i`` and
replaces that box region of the map, in turn: ``F_i = replace(resize(M_i, B_i), F_{i-1}[B_i])``;
``F_N`` is trained with a semantic cross-entropy (``L_semseg2``).

Implementation (batched, differentiable, ``keras.ops`` only), :func:`paste_masks`:

* **Resize into the box** as two separable linear maps: for ROI ``i`` the image row ``y``
  (centre ``y + 0.5``) reads mask row ``u = (y + 0.5 - y1) / (y2 - y1) M - 0.5`` (half-pixel
  centres, clamped to ``[0, M - 1]``, i.e. ``cv2.resize`` / ``tf.image.resize`` bilinear with
  edge replication), with weights ``max(0, 1 - |u - r|)`` for mask rows ``r``; the same for
  columns. The pasted map of every ROI over the whole image is then
  ``P_i = W_y,i @ M_i @ W_x,i^T`` (two einsums), so gradients reach every mask logit.
  A pixel belongs to box ``i`` when its centre lies in ``[y1, y2) x [x1, x2)``.
* **Replacement in turn** is a per-pixel selection: ROIs are ranked by score (ascending; ties by
  index), so that pasting "in turn" from the lowest to the highest score leaves at each pixel the
  covering ROI of highest rank. That ROI is selected with a one-hot over ``[F_0, P_1 .. P_N]``,
  which equals the sequential overwrite exactly and is differentiable in ``F_0`` and the masks.
* Boxes are constants of the fusion (``stop_gradient``), as proposals are in Mask R-CNN.

Cost: ``O(N H W M)`` multiply-adds and an ``(B, N, H, W, C)`` intermediate; keep ``N`` (ROIs
fused per image) to the few hundred a nucleus crop holds.
"""

from __future__ import annotations

import keras
from keras import ops

from kerasnuc.checks import check_positive_int


def _axis_weights(lo, hi, size, mask_size: int):
    """Bilinear weights ``(B, N, size, M)`` of image rows (or columns) on mask rows, and the
    ``(B, N, size)`` indicator of image rows inside ``[lo, hi)``."""
    centres = ops.cast(ops.arange(size), "float32") + 0.5  # (size,)
    lo = ops.expand_dims(lo, -1)
    hi = ops.expand_dims(hi, -1)
    extent = ops.maximum(hi - lo, 1e-6)
    u = (centres - lo) / extent * mask_size - 0.5  # (B, N, size)
    u = ops.clip(u, 0.0, float(mask_size - 1))
    r = ops.cast(ops.arange(mask_size), "float32")
    weights = ops.maximum(1.0 - ops.abs(ops.expand_dims(u, -1) - r), 0.0)
    inside = ops.logical_and(centres >= lo, centres < hi)
    return weights * ops.expand_dims(ops.cast(inside, "float32"), -1), inside


def paste_masks(base, masks, boxes, scores, valid):
    """Paste ROI masks into a dense map in score order (Liu et al. 2019, Eq. 2-3).

    Args:
        base: ``(B, H, W, C)`` float map ``F_0``.
        masks: ``(B, N, M, M, C)`` float mask maps (e.g. logits) of the ROIs.
        boxes: ``(B, N, 4)`` ``(y1, x1, y2, x2)`` boxes in pixels of ``base`` (constants).
        scores: ``(B, N)`` scores: masks are pasted from the lowest to the highest, so the
            highest-scoring covering ROI wins at every pixel.
        valid: ``(B, N)`` bool; invalid ROIs are not pasted.

    Returns:
        ``(B, H, W, C)`` the fused map ``F_N``: ``base`` outside every valid box, else the
        bilinearly resized mask of the highest-scoring valid box containing the pixel centre.
    """
    base = ops.convert_to_tensor(base)
    masks = ops.cast(masks, base.dtype)
    boxes = ops.stop_gradient(ops.cast(boxes, "float32"))
    scores = ops.stop_gradient(ops.cast(scores, "float32"))
    valid = ops.cast(valid, "bool")
    shape = ops.shape(base)
    h, w = shape[1], shape[2]
    m = int(masks.shape[2])
    wy, in_y = _axis_weights(boxes[..., 0], boxes[..., 2], h, m)  # (B, N, H, M)
    wx, in_x = _axis_weights(boxes[..., 1], boxes[..., 3], w, m)  # (B, N, W, M)
    wy = ops.cast(wy, base.dtype)
    wx = ops.cast(wx, base.dtype)
    rows = ops.einsum("bnhr,bnrsc->bnhsc", wy, masks)
    pasted = ops.einsum("bnhsc,bnws->bnhwc", rows, wx)  # (B, N, H, W, C)

    # Rank of each ROI in the pasting order (0 = pasted first); ties broken by index.
    n = ops.shape(scores)[1]
    idx = ops.arange(n)
    s_i = ops.expand_dims(scores, -1)
    s_j = ops.expand_dims(scores, -2)
    before = ops.logical_or(
        s_j < s_i, ops.logical_and(s_j == s_i, ops.expand_dims(idx, 1) > ops.expand_dims(idx, 0))
    )  # before[b, i, j]: j is pasted before i
    before = ops.logical_and(before, ops.expand_dims(valid, -2))
    rank = ops.sum(ops.cast(before, "int32"), axis=-1) + 1  # (B, N), 1-based
    rank = ops.where(valid, rank, 0)

    inside = ops.logical_and(ops.expand_dims(in_y, -1), ops.expand_dims(in_x, -2))  # (B,N,H,W)
    priority = ops.where(inside, ops.reshape(rank, (-1, n, 1, 1)), 0)
    best = ops.max(priority, axis=1)  # (B, H, W)
    winner = ops.logical_and(priority == ops.expand_dims(best, 1), priority > 0)
    winner = ops.cast(ops.expand_dims(winner, -1), base.dtype)
    keep = ops.cast(ops.expand_dims(best == 0, -1), base.dtype)
    return base * keep + ops.sum(winner * pasted, axis=1)


@keras.saving.register_keras_serializable(package="kerasnuc")
class FeatureFusion(keras.layers.Layer):
    """``F_0`` from ``P2`` and the fusion of predicted masks into it (Liu et al. 2019, Fig. 3).

    ``F_0 = up4(conv1x1(P2))`` with ``num_classes`` channels and nearest-neighbour upsampling.
    The paper applies the convolution after the x4 upsampling; for a 1x1 convolution and
    nearest upsampling both orders give the same map, and convolving first is 16x cheaper.

    Args:
        num_classes: channels of the map (2: background / nucleus logits).
        upsample: factor from ``P2`` to the input resolution (4).
        **kwargs: base ``Layer`` arguments.

    Call arguments:
        p2: ``(B, h, w, C)`` finest pyramid level.
        masks, boxes, scores, valid: as :func:`paste_masks` (``masks`` with ``num_classes``
            channels, boxes in input pixels). When ``masks`` is None, ``F_0`` is returned.

    Returns:
        ``(B, upsample h, upsample w, num_classes)`` logits.
    """

    def __init__(self, num_classes: int = 2, upsample: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.upsample = check_positive_int("upsample", upsample)
        self.conv = keras.layers.Conv2D(num_classes, 1, name="conv")

    def build(self, p2_shape, *args, **kwargs):
        self.conv.build(p2_shape)
        self.built = True

    def call(self, p2, masks=None, boxes=None, scores=None, valid=None):
        f0 = self.conv(p2)
        f0 = ops.repeat(ops.repeat(f0, self.upsample, axis=1), self.upsample, axis=2)
        if masks is None:
            return f0
        return paste_masks(f0, masks, boxes, scores, valid)

    def compute_output_shape(self, p2_shape, *args, **kwargs):
        b, h, w, _ = p2_shape
        u = self.upsample
        return (b, None if h is None else h * u, None if w is None else w * u, self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, upsample=self.upsample)
        return config


__all__ = ["FeatureFusion", "paste_masks"]
