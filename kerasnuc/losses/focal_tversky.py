"""Tversky index and focal Tversky loss for multi-class segmentation.

Sources: Tversky loss, Salehi et al. 2017 ("Tversky loss function for image segmentation using 3D
fully convolutional deep networks"); focal Tversky loss, Abraham & Khan 2019 ("A novel focal
Tversky loss function with improved attention U-Net for lesion segmentation"); used by U-Net#
(Stagys et al.) with ``beta = 0.7`` and ``gamma = 4/3``.

Conventions chosen here (the papers disagree on notation):

* **FN/FP weighting.** ``TI_c = (TP_c + smooth) / (TP_c + beta * FN_c + (1 - beta) * FP_c +
  smooth)`` with soft counts ``TP_c = sum p*g``, ``FN_c = sum (1-p)*g``, ``FP_c = sum p*(1-g)``
  (``g`` ground truth, ``p`` predicted probability of class ``c``). ``beta`` weights the false
  negatives, as in Salehi et al. (beta on ``|G \\ P|``, best at 0.7) and Abraham & Khan (their
  0.7 weight multiplies ``g * (1 - p)``): ``beta > 0.5`` favours recall on small structures.
  U-Net#'s Eq. (2) literally puts ``beta`` on the false-positive term; we follow the two source
  papers, whose intent U-Net# cites. ``beta = 0.5`` gives the soft Dice coefficient.
* **Exponent.** ``FTL = sum_c (1 - TI_c) ** (1 / gamma)`` as in Abraham & Khan (Eq. 4,
  ``gamma`` in [1, 3]); U-Net# writes ``** gamma``. With ``gamma = 4/3`` the exponent is 0.75.
  ``gamma = 1`` gives the plain Tversky loss ``sum_c (1 - TI_c)``.
* **Smooth term** ``smooth`` (default 1, as in Abraham & Khan's code) is added to numerator and
  denominator, so a class absent from both truth and prediction has ``TI = 1`` (no loss).
* **Reduction over classes**: ``"sum"`` as in the formula (default) or ``"mean"`` (loss in [0, 1]
  independent of the class count).
* **Pixels pooled over the batch** by default (``per_image=False``): the counts are summed over
  the batch and spatial axes, the loss is one scalar, as in Abraham & Khan's implementation.
  ``per_image=True`` sums over spatial axes only and returns one loss per image, which Keras then
  averages (and weights by ``sample_weight``).
"""

from __future__ import annotations

import keras
from keras import ops

_CLASS_REDUCTIONS = ("sum", "mean")


def _prepare(y_true, y_pred, from_logits: bool, sparse: bool):
    """Returns float ``(y_true_one_hot, probabilities)`` of the same shape ``(B, ..., C)``."""
    y_pred = ops.convert_to_tensor(y_pred)
    if not keras.backend.is_float_dtype(y_pred.dtype):
        y_pred = ops.cast(y_pred, "float32")
    num_classes = y_pred.shape[-1]
    if num_classes is None:
        raise ValueError(
            f"The class axis of `y_pred` must be known. Received: y_pred.shape={y_pred.shape}"
        )
    if from_logits:
        y_pred = ops.sigmoid(y_pred) if num_classes == 1 else ops.softmax(y_pred, axis=-1)
    y_true = ops.convert_to_tensor(y_true)
    if sparse:
        if len(y_true.shape) == len(y_pred.shape):
            y_true = ops.squeeze(y_true, axis=-1)
        y_true = ops.one_hot(ops.cast(y_true, "int32"), num_classes, dtype=y_pred.dtype)
    else:
        y_true = ops.cast(y_true, y_pred.dtype)
    return y_true, y_pred


def tversky_index(
    y_true,
    y_pred,
    beta: float = 0.7,
    smooth: float = 1.0,
    per_image: bool = False,
):
    """Soft Tversky index per class (Salehi et al. 2017; FN weighted by ``beta``).

    Args:
        y_true: One-hot (or soft) ground truth ``(B, ..., C)``.
        y_pred: Probabilities ``(B, ..., C)`` in ``[0, 1]``.
        beta: Weight of the false negatives; false positives get ``1 - beta``.
        smooth: Added to numerator and denominator.
        per_image: Sum over spatial axes only (``(B, C)`` result) instead of batch and spatial
            axes (``(C,)`` result).

    Returns:
        Float tensor ``(C,)`` or ``(B, C)`` of Tversky indices in ``[0, 1]``.
    """
    rank = len(y_pred.shape)
    axes = tuple(range(1 if per_image else 0, rank - 1))
    tp = ops.sum(y_true * y_pred, axis=axes)
    fn = ops.sum(y_true * (1.0 - y_pred), axis=axes)
    fp = ops.sum((1.0 - y_true) * y_pred, axis=axes)
    return (tp + smooth) / (tp + beta * fn + (1.0 - beta) * fp + smooth)


def focal_tversky_loss(
    y_true,
    y_pred,
    beta: float = 0.7,
    gamma: float = 4.0 / 3.0,
    smooth: float = 1.0,
    include_background: bool = True,
    class_reduction: str = "sum",
    per_image: bool = False,
    from_logits: bool = False,
    sparse: bool = False,
):
    """Focal Tversky loss ``reduce_c (1 - TI_c) ** (1 / gamma)`` (Abraham & Khan 2019).

    See the module docstring for the conventions. Arguments as in :class:`FocalTversky`.

    Returns:
        Scalar float tensor, or ``(B,)`` with ``per_image=True``.
    """
    y_true, y_pred = _prepare(y_true, y_pred, from_logits, sparse)
    if not include_background:
        if y_pred.shape[-1] == 1:
            raise ValueError(
                "`include_background=False` needs at least 2 classes (channel 0 is the "
                f"background). Received: y_pred.shape={y_pred.shape}"
            )
        y_true = y_true[..., 1:]
        y_pred = y_pred[..., 1:]
    ti = tversky_index(y_true, y_pred, beta=beta, smooth=smooth, per_image=per_image)
    miss = 1.0 - ti
    positive = miss > 0
    # (1 - TI) ** (1/gamma) has an infinite slope at 0 when gamma > 1; the `where` keeps the
    # gradient of a perfectly predicted class at 0 instead of NaN.
    safe = ops.where(positive, miss, ops.ones_like(miss))
    focal = ops.where(positive, ops.power(safe, 1.0 / gamma), ops.zeros_like(miss))
    if class_reduction == "sum":
        return ops.sum(focal, axis=-1)
    return ops.mean(focal, axis=-1)


@keras.saving.register_keras_serializable(package="kerasnuc")
class FocalTversky(keras.losses.Loss):
    """Focal Tversky loss over softmax (or sigmoid) segmentation outputs (U-Net#).

    ``FTL = reduce_c (1 - TI_c) ** (1 / gamma)``, ``TI_c = (TP + s) / (TP + beta FN +
    (1 - beta) FP + s)``; conventions and sources in the module docstring.

    Args:
        beta: Weight of false negatives (false positives get ``1 - beta``), in ``[0, 1]``.
            Default 0.7 (U-Net#, Abraham & Khan).
        gamma: Focal parameter, ``> 0``; the exponent is ``1 / gamma``. Default 4/3.
        smooth: Smoothing term ``s >= 0``. Default 1.
        include_background: If ``False``, channel 0 (background) is left out of the sum.
        class_reduction: ``"sum"`` (formula of the papers) or ``"mean"`` over classes.
        per_image: Tversky index per image (loss ``(B,)``) instead of over the whole batch
            (scalar loss).
        from_logits: Apply softmax (sigmoid for one channel) to ``y_pred`` first.
        sparse: ``y_true`` holds integer class ids ``(B, H, W)`` or ``(B, H, W, 1)`` instead of
            one-hot ``(B, H, W, C)``.
        reduction: Keras reduction over the (per-image) losses.
        name: Loss name.
        dtype: Loss dtype.

    Call arguments:
        y_true: One-hot ``(B, H, W, C)`` (or class ids with ``sparse=True``).
        y_pred: Probabilities (or logits with ``from_logits=True``) ``(B, H, W, C)`` float.
    """

    def __init__(
        self,
        beta=0.7,
        gamma=4.0 / 3.0,
        smooth=1.0,
        include_background=True,
        class_reduction="sum",
        per_image=False,
        from_logits=False,
        sparse=False,
        reduction="sum_over_batch_size",
        name="focal_tversky",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta <= 1:
            raise ValueError(f"`beta` must be a float in [0, 1]. Received: beta={beta!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not gamma > 0:
            raise ValueError(f"`gamma` must be a float > 0. Received: gamma={gamma!r}")
        if isinstance(smooth, bool) or not isinstance(smooth, int | float) or smooth < 0:
            raise ValueError(f"`smooth` must be a float >= 0. Received: smooth={smooth!r}")
        if class_reduction not in _CLASS_REDUCTIONS:
            raise ValueError(
                f"`class_reduction` must be one of {_CLASS_REDUCTIONS}. "
                f"Received: class_reduction={class_reduction!r}"
            )
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.smooth = float(smooth)
        self.include_background = bool(include_background)
        self.class_reduction = class_reduction
        self.per_image = bool(per_image)
        self.from_logits = bool(from_logits)
        self.sparse = bool(sparse)

    def call(self, y_true, y_pred):
        return focal_tversky_loss(
            y_true,
            y_pred,
            beta=self.beta,
            gamma=self.gamma,
            smooth=self.smooth,
            include_background=self.include_background,
            class_reduction=self.class_reduction,
            per_image=self.per_image,
            from_logits=self.from_logits,
            sparse=self.sparse,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta": self.beta,
                "gamma": self.gamma,
                "smooth": self.smooth,
                "include_background": self.include_background,
                "class_reduction": self.class_reduction,
                "per_image": self.per_image,
                "from_logits": self.from_logits,
                "sparse": self.sparse,
            }
        )
        return config
