"""``conic``: HoVer-Net-like dual-decoder U-Net for imbalanced cell types.

Rumberger, Baumann, Hirsch et al., "Panoptic segmentation with highly imbalanced semantic labels",
CoNIC challenge 2022 (section II-D): the first five levels of an EfficientNet encoder feed two
U-Net decoders with five levels, concatenated skip connections and 20 % dropout per decoder level.
One decoder predicts the cell type of every pixel (softmax over background + ``C`` types); the
other predicts the three labels background / nucleus interior / nucleus boundary (softmax) and,
as an auxiliary task, the vector from each nucleus pixel to its nucleus centre.

Choices where the paper is silent (all configurable through the arguments where it matters):

* Decoder level ``i`` (``i = 1..5``, from stride 32 up to full resolution): nearest-neighbour
  ``UpSampling2D(2)``; concatenation with the encoder feature of the same stride (``P4 .. P1``;
  level 5 has no skip); :class:`~kerasnuc.layers.dropout.MCDropout` with ``dropout``; two
  ``Conv2D(3x3, decoder_filters[i-1], no bias) -> BatchNormalization -> ReLU`` (the U-Net block of
  segmentation_models_pytorch, whose default widths ``(256, 128, 64, 32, 16)`` we use).
* Heads: ``1x1`` convolutions on the last decoder level, softmax / linear activations computed in
  float32 (safe under mixed precision).
* Encoder: :func:`~kerasnuc.backbones.efficientnet.build_efficientnet_encoder` with its own
  stochastic depth ("encoder dropout as per EfficientNet definition"), nested as the layer
  ``"encoder"``. Only the decoder dropout is MC dropout (switch with
  :func:`~kerasnuc.layers.dropout.set_mc_dropout`).
* The model is a :class:`ConicModel`: a functional ``keras.Model`` that also owns the class prior
  of the semantic loss (see :class:`ConicModel`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import keras

from kerasnuc.backbones.efficientnet import EFFICIENTNET_NAMES, build_efficientnet_encoder
from kerasnuc.backbones.efficientnet_lite import (
    EFFICIENTNET_LITE_NAMES,
    build_efficientnet_lite_encoder,
)
from kerasnuc.config import builder_kwargs, config_to_dict, strict_from_dict
from kerasnuc.layers.dropout import MCDropout
from kerasnuc.models.common import check_input_shape

logger = logging.getLogger(__name__)

#: Output names of the conic model, also the keys of its losses and targets.
OUTPUT_NAMES: tuple[str, ...] = ("semantic", "three_label", "vectors")

_SKIPS = ("P4", "P3", "P2", "P1", None)

#: Encoders of the conic model: EfficientNet B0..B7 and EfficientNet-Lite0.
ENCODER_NAMES: tuple[str, ...] = EFFICIENTNET_NAMES + EFFICIENTNET_LITE_NAMES


def _check_conic_args(
    encoder: str,
    num_classes: int,
    decoder_filters: tuple[int, ...],
    dropout: float,
    input_shape: tuple[int | None, int | None, int],
) -> None:
    if encoder not in ENCODER_NAMES:
        raise ValueError(
            f"`encoder` must be one of {list(ENCODER_NAMES)}. Received: encoder={encoder!r}"
        )
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(
            f"`num_classes` must be a positive int. Received: num_classes={num_classes!r}"
        )
    filters = tuple(decoder_filters)
    if len(filters) != 5 or not all(
        isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in filters
    ):
        raise ValueError(
            "`decoder_filters` must be a list of 5 positive ints. "
            f"Received: decoder_filters={decoder_filters!r}"
        )
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be a float in [0, 1). Received: dropout={dropout!r}")
    check_input_shape(input_shape)


@keras.saving.register_keras_serializable(package="kerasnuc")
class ConicModel(keras.Model):
    """Functional model of :func:`build_conic`, holding the class prior of the semantic loss.

    Built like any functional model (``ConicModel(inputs, outputs)``). If it has an output named
    ``"semantic"`` with ``K`` channels it owns the non-trainable ``(K,)`` float32 variable
    :attr:`class_frequency`, initialised to ``1 / K``: the moving class pixel frequency ``X_c``
    used by ``kerasnuc.losses.conic.WeightedSemanticLoss``. Being a model variable, it is saved
    with the weights and checkpoints and is part of the training state on every backend.

    ``compute_loss`` binds every compiled loss that has a ``bind_class_frequency`` method (the
    ``loss`` given to ``compile``) to this variable and sets the loss's ``update_frequency`` to its
    ``training`` flag while the loss is traced, so the prior is updated in the compiled train step
    and left alone by ``evaluate`` and by the validation pass of ``fit``. ``compile`` itself is
    not overridden, so a ``.keras`` file restores the compiled state as usual.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_frequency = None
        if "semantic" in self.output_names:
            k = int(self.get_layer("semantic").output.shape[-1])
            self.class_frequency = self.add_weight(
                shape=(k,),
                initializer=keras.initializers.Constant(1.0 / k),
                dtype="float32",
                trainable=False,
                autocast=False,
                aggregation="mean",  # replicas' updates averaged: one global prior
                name="class_frequency",
            )

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        losses = []
        if self.class_frequency is not None:
            losses = [
                loss
                for loss in keras.tree.flatten(self.loss)
                if hasattr(loss, "bind_class_frequency")
            ]
        previous = []
        for loss in losses:
            if loss.class_frequency is not self.class_frequency:
                loss.bind_class_frequency(self.class_frequency)
            previous.append(loss.update_frequency)
            loss.update_frequency = bool(training)
        try:
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        finally:
            for loss, value in zip(losses, previous, strict=True):
                loss.update_frequency = value


def _conv_bn_relu(x, filters: int, name: str):
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _unet_decoder(features: dict, decoder_filters: tuple[int, ...], dropout: float, prefix: str):
    """Five-level U-Net decoder from ``P5`` (stride 32) to full resolution."""
    x = features["P5"]
    for level, (filters, skip) in enumerate(zip(decoder_filters, _SKIPS, strict=True), start=1):
        name = f"{prefix}_level{level}"
        x = keras.layers.UpSampling2D(2, interpolation="nearest", name=f"{name}_up")(x)
        if skip is not None:
            x = keras.layers.Concatenate(name=f"{name}_concat")([x, features[skip]])
        x = MCDropout(dropout, name=f"{name}_dropout")(x)
        x = _conv_bn_relu(x, filters, name=f"{name}_block1")
        x = _conv_bn_relu(x, filters, name=f"{name}_block2")
    return x


def build_conic(
    encoder: str = "efficientnet_b0",
    num_classes: int = 6,
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16),
    dropout: float = 0.2,
    encoder_weights: str | os.PathLike | None = None,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    encoder_features: str = "expand",
) -> ConicModel:
    """Build the conic dual-decoder U-Net.

    Args:
        encoder: EfficientNet of the encoder, ``"efficientnet_b0"`` .. ``"efficientnet_b7"``
            (paper: B5, B7) or ``"efficientnet_lite0"`` (no squeeze-excitation, ReLU6: faster
            on a CPU).
        num_classes: number of cell types ``C`` (background excluded; CoNIC: 6).
        decoder_filters: widths of the five decoder levels, from stride 16 to full resolution.
        dropout: MC dropout rate of every decoder level (paper: 0.2).
        encoder_weights: ``None`` or the path of a local Keras ImageNet ``*_notop.h5`` file of the
            encoder (see ``build_efficientnet_encoder``); for ``efficientnet_lite0``
            ``"imagenet"`` (the weights of the ``pretrained`` extra) or a ``.pth`` file.
        input_shape: ``(height, width, 3)``; height and width ``None`` (any multiple of 32 at
            call time) or fixed multiples of 32.
        encoder_features: skip features of the encoder, ``"expand"`` (wide expanded
            activations) or ``"blocks"`` (block outputs: a decoder several times cheaper, the
            better choice on a CPU; see ``build_efficientnet_encoder``).

    Returns:
        A :class:`ConicModel` mapping ``(B, H, W, 3)`` float32 RGB in ``[0, 1]`` to the dict
        ``{"semantic": (B, H, W, C + 1) softmax, "three_label": (B, H, W, 3) softmax
        (background, interior, boundary), "vectors": (B, H, W, 2) linear (dy, dx)}``.

    Raises:
        ValueError: a bad argument, e.g. a fixed height or width not divisible by 32.
    """
    decoder_filters = tuple(decoder_filters)
    input_shape = tuple(input_shape)
    _check_conic_args(encoder, num_classes, decoder_filters, dropout, input_shape)

    # Encoder
    inputs = keras.Input(shape=input_shape, name="image")
    build_encoder = (
        build_efficientnet_lite_encoder
        if encoder in EFFICIENTNET_LITE_NAMES
        else build_efficientnet_encoder
    )
    backbone = build_encoder(
        encoder,
        input_shape=input_shape,
        weights=encoder_weights,
        model_name="encoder",
        features=encoder_features,
    )
    features = backbone(inputs)

    # Decoder: semantic
    x_semantic = _unet_decoder(features, decoder_filters, dropout, prefix="semantic_decoder")

    # Decoder: instance
    x_instance = _unet_decoder(features, decoder_filters, dropout, prefix="instance_decoder")

    # Heads
    semantic = keras.layers.Conv2D(num_classes + 1, 1, name="semantic_logits")(x_semantic)
    semantic = keras.layers.Activation("softmax", dtype="float32", name="semantic")(semantic)
    three_label = keras.layers.Conv2D(3, 1, name="three_label_logits")(x_instance)
    three_label = keras.layers.Activation("softmax", dtype="float32", name="three_label")(
        three_label
    )
    vectors = keras.layers.Conv2D(2, 1, name="vectors_linear")(x_instance)
    vectors = keras.layers.Activation("linear", dtype="float32", name="vectors")(vectors)

    outputs = {"semantic": semantic, "three_label": three_label, "vectors": vectors}
    model = ConicModel(inputs, outputs, name=f"conic_{encoder}")
    logger.debug("built %s with %d parameters", model.name, model.count_params())
    return model


@dataclasses.dataclass(frozen=True)
class ConicModelConfig:
    """Architecture of a conic model; saved as JSON next to the weights.

    Attributes:
        encoder: EfficientNet name, ``"efficientnet_b0"`` .. ``"efficientnet_b7"``.
        num_classes: number of cell types ``C`` (background excluded).
        decoder_filters: widths of the five decoder levels.
        dropout: MC dropout rate of the decoder levels.
        encoder_weights: ImageNet weights file used to initialise the encoder, or ``None``. To
            rebuild a trained model before loading its weights, replace it with ``None``
            (``dataclasses.replace(cfg, encoder_weights=None)``): the file need not exist there.
        input_shape: ``(height, width, 3)`` with ``None`` for any multiple of 32.
        encoder_features: ``"expand"`` or ``"blocks"`` skip features (see :func:`build_conic`).
    """

    encoder: str = "efficientnet_b0"
    num_classes: int = 6
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    dropout: float = 0.2
    encoder_weights: str | None = None
    input_shape: tuple[int | None, int | None, int] = (None, None, 3)
    encoder_features: str = "expand"

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder_filters", tuple(self.decoder_filters))
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        if self.encoder_weights is not None:
            object.__setattr__(self, "encoder_weights", os.fspath(self.encoder_weights))
        _check_conic_args(
            self.encoder, self.num_classes, self.decoder_filters, self.dropout, self.input_shape
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConicModelConfig:
        """Inverse of :meth:`to_dict`; missing keys take the defaults.

        Raises:
            ValueError: unknown keys or bad values.
        """
        return strict_from_dict(cls, data)


def build_conic_from_config(config: ConicModelConfig) -> ConicModel:
    """Build the model described by ``config`` (see :func:`build_conic`)."""
    return build_conic(**builder_kwargs(build_conic, config))
