"""``weak``: point-supervised multi-task U-Net for cell detection and segmentation.

Chamanzar & Nie, "Weakly supervised multi-task learning for cell detection and segmentation",
ISBI 2020: a U-Net with a ResNet-50 encoder and **two output channels**
(background / nucleus probability), trained from point labels only through three pixel-level
encodings (Voronoi labels, local-clustering labels, filtered repel code; see
:mod:`kerasnuc.data.points`) and a multi-task scheduler: iteration ``i`` uses only the Voronoi
loss if ``i % 3 == 0``, the repel loss if ``i % 3 == 1`` and the clustering loss if
``i % 3 == 2`` (Eq. 4); plain summation and uncertainty weighting are the alternatives
(:class:`~kerasnuc.losses.scheduler.MultiTaskLoss`).

Choices where the paper is silent (configurable where it matters):

* **No extra head for the repel code.** The paper compares "the nuclei and background probability
  maps, which are two output channels of the model" with all three targets, the repel code by MSE
  (Eq. 3, ``o`` = the output probability map). So the model has one output ``"seg"``
  ``(B, H, W, 2)`` softmax, and :class:`~kerasnuc.losses.weak.RepelLoss` regresses the filtered
  repel code with the nucleus channel. This is what makes the nucleus probability peak at cell
  centres, which the detection (local maxima) relies on.
* **Input normalisation**: "mean subtraction and division by the standard deviation of the RGB
  channels" of the training set: a fixed ``Normalization`` layer with ``input_mean`` /
  ``input_std`` of the config (``kerasnuc train`` fits them on the training images before the run
  starts, :func:`fit_input_normalisation`). ``None``: the inputs are used as they are.
* **Encoder**: :func:`~kerasnuc.backbones.resnet.build_resnet50_encoder` (``keras.applications``
  ResNet-50, optional local ImageNet weights; ``encoder_width < 64`` gives the same layout with
  narrower stages), the paper's. No ImageNet ResNet-50 installs offline, so
  ``encoder="efficientnet_lite0"`` offers the EfficientNet-Lite0 encoder of the ``conic`` models
  (``"blocks"`` features, the same ``P1 .. P5`` strides) with ``encoder_weights="imagenet"``
  from the ``pretrained`` extra: a CPU run from points starts from features that already
  separate stained structures. That encoder brings its own ImageNet input scaling, so the
  training-set standardisation below is not fitted for it.
* **Decoder**: the five-level U-Net decoder of :mod:`kerasnuc.models.conic` (nearest upsampling x2,
  concatenated skip ``P4 .. P1``, two ``3x3 conv -> BN -> ReLU``; widths ``(256, 128, 64, 32,
  16)`` as segmentation_models_pytorch's U-Net), without dropout.
* **Iteration index** of the scheduler: the optimizer's step counter read before the update
  (``optimizer.iterations``: 0, 1, 2, ... across epochs and resumed runs).
* **Logging**: every step computes all three losses (the forward pass is shared; only the
  scheduled one receives a gradient) and logs them as ``voronoi_loss``, ``repel_loss``,
  ``cluster_loss`` next to the combined ``loss``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from kerasnuc.backbones.efficientnet_lite import build_efficientnet_lite_encoder
from kerasnuc.backbones.resnet import build_resnet50_encoder
from kerasnuc.checks import is_int
from kerasnuc.config import builder_kwargs, config_to_dict, strict_from_dict
from kerasnuc.losses.scheduler import MODES, WEAK_TASKS, MultiTaskLoss
from kerasnuc.losses.weak import ClusterLoss, RepelLoss, VoronoiLoss
from kerasnuc.models.common import check_input_shape

logger = logging.getLogger(__name__)

#: Output names of the weak model.
OUTPUT_NAMES: tuple[str, ...] = ("seg",)
#: Encoders of the weak model.
ENCODERS: tuple[str, ...] = ("resnet50", "efficientnet_lite0")

_SKIPS = ("P4", "P3", "P2", "P1", None)


def _check_triple(name: str, value: Any, positive: bool) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(np.isfinite(out)) or (positive and min(out) <= 0):
        kind = "positive floats" if positive else "floats"
        raise ValueError(f"`{name}` must be None or 3 {kind} (R, G, B). Received: {name}={value!r}")
    return out


def _check_weak_args(
    encoder: str,
    encoder_width: int,
    decoder_filters: tuple[int, ...],
    input_shape: tuple[int | None, int | None, int],
    loss_mode: str,
) -> None:
    if encoder not in ENCODERS:
        raise ValueError(
            f"`encoder` must be one of {list(ENCODERS)}. Received: encoder={encoder!r}"
        )
    if not is_int(encoder_width) or encoder_width < 1:
        raise ValueError(
            f"`encoder_width` must be a positive int. Received: encoder_width={encoder_width!r}"
        )
    if encoder != "resnet50" and encoder_width != 64:
        raise ValueError(
            "`encoder_width` narrows the resnet50 encoder only; leave it at 64 for "
            f"{encoder!r}. Received: encoder_width={encoder_width!r}"
        )
    filters = tuple(decoder_filters)
    if len(filters) != 5 or not all(is_int(f) and f > 0 for f in filters):
        raise ValueError(
            "`decoder_filters` must be a list of 5 positive ints. "
            f"Received: decoder_filters={decoder_filters!r}"
        )
    check_input_shape(input_shape)
    if loss_mode not in MODES:
        raise ValueError(f"`loss_mode` must be one of {MODES}. Received: loss_mode={loss_mode!r}")


@keras.saving.register_keras_serializable(package="kerasnuc")
class WeakModel(keras.Model):
    """Functional model of :func:`build_weak` that computes its own multi-task loss.

    Built like any functional model (``WeakModel(inputs, outputs, loss_mode=...)``) with an
    output ``"seg"`` ``(B, H, W, 2)`` softmax. Compile it with ``loss=None``: ``compute_loss``
    evaluates :class:`~kerasnuc.losses.weak.VoronoiLoss`, :class:`~kerasnuc.losses.weak.RepelLoss`
    and :class:`~kerasnuc.losses.weak.ClusterLoss` on the targets
    ``{"voronoi": (B, H, W) int, "repel": (B, H, W) float, "cluster": (B, H, W) int}`` and
    combines them with :attr:`multitask` (a :class:`~kerasnuc.losses.scheduler.MultiTaskLoss`;
    its ``"uncertainty"`` log-variances are trainable weights of this model). The iteration of
    the ``"cyclic"`` scheduler is ``optimizer.iterations`` while training, 0 otherwise.

    Args:
        *args, **kwargs: those of a functional ``keras.Model``.
        loss_mode: ``"cyclic"`` (paper), ``"sum"`` or ``"uncertainty"``.
    """

    def __init__(self, *args, loss_mode: str = "cyclic", **kwargs):
        super().__init__(*args, **kwargs)
        if loss_mode not in MODES:
            raise ValueError(
                f"`loss_mode` must be one of {MODES}. Received: loss_mode={loss_mode!r}"
            )
        self.loss_mode = loss_mode
        self.multitask = MultiTaskLoss(mode=loss_mode, tasks=WEAK_TASKS, name="multitask")
        self.task_losses = {
            "voronoi": VoronoiLoss(),
            "repel": RepelLoss(),
            "cluster": ClusterLoss(),
        }
        self.loss_trackers = [keras.metrics.Mean(name=f"{task}_loss") for task in WEAK_TASKS]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not isinstance(y, dict) or any(task not in y for task in WEAK_TASKS):
            raise ValueError(
                f"WeakModel needs the targets {list(WEAK_TASKS)} as a dict. "
                f"Received: {sorted(y) if isinstance(y, dict) else type(y).__name__}"
            )
        seg = y_pred["seg"] if isinstance(y_pred, dict) else y_pred
        seg = ops.cast(seg, "float32")
        losses = {
            task: self.task_losses[task](y[task], seg, sample_weight=sample_weight)
            for task in WEAK_TASKS
        }
        iteration = 0
        if training and self.optimizer is not None:
            iteration = self.optimizer.iterations
        total = self.multitask(losses, iteration=iteration)
        for task, tracker in zip(WEAK_TASKS, self.loss_trackers, strict=True):
            tracker.update_state(losses[task])
        if self.losses:
            total = total + ops.cast(ops.sum(self.losses), total.dtype)
        return total

    def get_config(self):
        config = super().get_config()
        config["loss_mode"] = self.loss_mode
        return config


def _conv_bn_relu(x, filters: int, name: str):
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_weak(
    encoder: str = "resnet50",
    encoder_width: int = 64,
    decoder_filters: Sequence[int] = (256, 128, 64, 32, 16),
    encoder_weights: str | os.PathLike | None = None,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    input_mean: Sequence[float] | None = None,
    input_std: Sequence[float] | None = None,
    loss_mode: str = "cyclic",
) -> WeakModel:
    """Build the weak U-Net.

    Args:
        encoder: ``"resnet50"`` (paper) or ``"efficientnet_lite0"``.
        encoder_width: base width of the ResNet-50 (64 = the real one; smaller = narrower); 64
            for ``efficientnet_lite0``.
        decoder_filters: widths of the five decoder levels, from stride 16 to full resolution.
        encoder_weights: None, or for ResNet-50 a local Keras ImageNet ``*_notop.h5`` file, for
            EfficientNet-Lite0 ``"imagenet"`` or the path of the ``.pth`` checkpoint (see
            :func:`~kerasnuc.backbones.efficientnet_lite.build_efficientnet_lite_encoder`).
        input_shape: ``(height, width, 3)``; height and width None or multiples of 32.
        input_mean, input_std: per-channel (R, G, B) mean and standard deviation of the training
            images in ``[0, 1]``; the model standardises its input with them (None: no
            standardisation).
        loss_mode: multi-task combination, ``"cyclic"``, ``"sum"`` or ``"uncertainty"``.

    Returns:
        A :class:`WeakModel` mapping ``(B, H, W, 3)`` float32 RGB in ``[0, 1]`` to
        ``{"seg": (B, H, W, 2) float32 softmax}``, channel 0 = background, 1 = nucleus.

    Raises:
        ValueError: a bad argument.
    """
    decoder_filters = tuple(decoder_filters)
    input_shape = tuple(input_shape)
    _check_weak_args(encoder, encoder_width, decoder_filters, input_shape, loss_mode)
    mean = _check_triple("input_mean", input_mean, positive=False)
    std = _check_triple("input_std", input_std, positive=True)
    if (mean is None) != (std is None):
        raise ValueError(
            "`input_mean` and `input_std` must be given together. "
            f"Received: input_mean={input_mean!r}, input_std={input_std!r}"
        )

    # Encoder
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if mean is not None:
        x = keras.layers.Normalization(
            mean=list(mean), variance=[s * s for s in std], name="standardise"
        )(x)
    if encoder == "resnet50" and encoder_weights == "imagenet":
        raise ValueError(
            "`encoder_weights='imagenet'` is for encoder 'efficientnet_lite0' (no ImageNet "
            "ResNet-50 installs offline); for resnet50 pass a local Keras *_notop.h5 file"
        )
    if encoder == "efficientnet_lite0":
        backbone = build_efficientnet_lite_encoder(
            encoder, input_shape=input_shape, weights=encoder_weights, model_name="encoder"
        )
    else:
        backbone = build_resnet50_encoder(
            weights=encoder_weights, input_shape=input_shape, width=encoder_width
        )
    features = backbone(x)

    # Decoder
    x = features["P5"]
    for level, (filters, skip) in enumerate(zip(decoder_filters, _SKIPS, strict=True), start=1):
        name = f"decoder_level{level}"
        x = keras.layers.UpSampling2D(2, interpolation="nearest", name=f"{name}_up")(x)
        if skip is not None:
            x = keras.layers.Concatenate(name=f"{name}_concat")([x, features[skip]])
        x = _conv_bn_relu(x, filters, name=f"{name}_block1")
        x = _conv_bn_relu(x, filters, name=f"{name}_block2")

    # Heads
    seg = keras.layers.Conv2D(2, 1, name="seg_logits")(x)
    seg = keras.layers.Activation("softmax", dtype="float32", name="seg")(seg)
    model = WeakModel(inputs, {"seg": seg}, loss_mode=loss_mode, name=f"weak_{encoder}")
    logger.debug("built %s with %d parameters", model.name, model.count_params())
    return model


@dataclasses.dataclass(frozen=True)
class WeakModelConfig:
    """Architecture and loss combination of a weak model; saved as JSON next to the weights.

    Attributes:
        encoder: ``"resnet50"`` (paper) or ``"efficientnet_lite0"``.
        encoder_width: base width of the ResNet-50 (64 = the paper's network).
        decoder_filters: widths of the five decoder levels.
        encoder_weights: ImageNet weights file used to initialise the encoder, or None
            (replaced by None to rebuild a trained model; the file need not exist then).
        input_shape: ``(height, width, 3)`` with None for any multiple of 32.
        input_mean, input_std: input standardisation (R, G, B) in ``[0, 1]`` units, fitted on
            the training images when a run starts (None: not standardised).
        loss_mode: ``"cyclic"`` (paper's scheduler), ``"sum"`` or ``"uncertainty"``.
        num_classes: cell types of the training data, recorded for the trainer's consistency
            check; the model itself is class-agnostic (every nucleus gets class 1).
    """

    encoder: str = "resnet50"
    encoder_width: int = 64
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    encoder_weights: str | None = None
    input_shape: tuple[int | None, int | None, int] = (None, None, 3)
    input_mean: tuple[float, float, float] | None = None
    input_std: tuple[float, float, float] | None = None
    loss_mode: str = "cyclic"
    num_classes: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder_filters", tuple(self.decoder_filters))
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "input_mean", _check_triple("input_mean", self.input_mean, False))
        object.__setattr__(self, "input_std", _check_triple("input_std", self.input_std, True))
        if self.encoder_weights is not None:
            object.__setattr__(self, "encoder_weights", os.fspath(self.encoder_weights))
        _check_weak_args(
            self.encoder,
            self.encoder_width,
            self.decoder_filters,
            self.input_shape,
            self.loss_mode,
        )
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("`input_mean` and `input_std` must be given together.")
        if not is_int(self.num_classes) or self.num_classes < 1:
            raise ValueError(
                f"`num_classes` must be a positive int. Received: num_classes={self.num_classes!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeakModelConfig:
        """Inverse of :meth:`to_dict`; missing keys take the defaults.

        Raises:
            ValueError: unknown keys or bad values.
        """
        return strict_from_dict(cls, data)


def build_weak_from_config(config: WeakModelConfig) -> WeakModel:
    """Build the model described by ``config`` (see :func:`build_weak`)."""
    return build_weak(**builder_kwargs(build_weak, config))


def fit_input_normalisation(images: Sequence[np.ndarray]) -> tuple[tuple, tuple]:
    """Per-channel mean and standard deviation of RGB images, in ``[0, 1]`` units.

    Args:
        images: ``(H, W, 3)`` uint8 images (any sizes); every pixel counts once.

    Returns:
        ``(mean, std)``: two ``(R, G, B)`` tuples of floats (std floored at ``1e-3``).

    Raises:
        ValueError: no image, or an image that is not ``(H, W, 3)``.
    """
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for image in images:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"images must be (H, W, 3). Received: shape={arr.shape}")
        px = arr.reshape(-1, 3).astype(np.float64) / 255.0
        total += px.sum(axis=0)
        total_sq += np.square(px).sum(axis=0)
        count += px.shape[0]
    if count == 0:
        raise ValueError("`images` must hold at least one non-empty image.")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)
