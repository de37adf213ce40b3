"""EfficientNet B0..B7 encoders returning a ``{"P1".."P5"}`` feature pyramid.

The encoder is the ImageNet classifier of ``keras.applications`` without its top, rewired so that
it takes images in ``[0, 1]`` and returns the feature map of the last layer at each stride
2, 4, 8, 16 and 32. Used by the ``conic`` model (Rumberger et al., CoNIC 2022: "the first 5 levels
of an imagenet pre-trained EfficientNet encoder").

Reference: Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
ICML 2019.

Input scaling. ``keras.applications.EfficientNetB*`` (v1) has no ``include_preprocessing``
switch: its stem always applies ``Rescaling(1 / 255)`` and a ``Normalization`` layer, i.e. it
expects RGB in ``[0, 255]``. The ImageNet weight files store the ImageNet standard deviations
``(0.229, 0.224, 0.225)`` as the *variance* of that ``Normalization`` layer, which Keras only
compensates with an extra ``Rescaling`` when ``weights="imagenet"`` (a download), not when a
file path is given (tensorflow/tensorflow#49930). This module therefore

1. multiplies the ``[0, 1]`` input by 255 so that the stem's own ``Rescaling(1 / 255)`` brings it
   back to ``[0, 1]``, and
2. always sets the stem ``Normalization`` to the ImageNet mean and variance ``std ** 2``, after
   any weights are loaded, so the stem computes ``(x - mean) / std`` both for random
   initialisation and for a local ImageNet weights file.

Feature selection. The layer of each level is the *last* layer (in the application's layer
order) at that output stride, with strides read from the layers' ``strides`` attributes (no
probe model, so building an encoder draws exactly the random numbers of its own weights). No
layer names are hard-coded. For the Keras
EfficientNets this picks the expanded activation in front of each stride-2 depthwise convolution
(``block2a_expand_activation``, ``block3a_...``, ``block4a_...``, ``block6a_...``) and
``top_activation`` at stride 32; for B0 the channel counts are 96, 144, 240, 672 and 1280.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import keras
import numpy as np

from kerasnuc.fileutil import KerasnucError

logger = logging.getLogger(__name__)

_APPLICATIONS = {
    "efficientnet_b0": keras.applications.EfficientNetB0,
    "efficientnet_b1": keras.applications.EfficientNetB1,
    "efficientnet_b2": keras.applications.EfficientNetB2,
    "efficientnet_b3": keras.applications.EfficientNetB3,
    "efficientnet_b4": keras.applications.EfficientNetB4,
    "efficientnet_b5": keras.applications.EfficientNetB5,
    "efficientnet_b6": keras.applications.EfficientNetB6,
    "efficientnet_b7": keras.applications.EfficientNetB7,
}

#: Names accepted by :func:`build_efficientnet_encoder`.
EFFICIENTNET_NAMES: tuple[str, ...] = tuple(_APPLICATIONS)

#: Strides of the levels ``P1..P5``.
FEATURE_STRIDES: dict[str, int] = {"P1": 2, "P2": 4, "P3": 8, "P4": 16, "P5": 32}

#: ImageNet RGB statistics for images in ``[0, 1]`` (the values in the Keras weight files).
IMAGENET_MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _check_name(name: str) -> None:
    if name not in _APPLICATIONS:
        raise ValueError(
            f"`name` must be one of {list(EFFICIENTNET_NAMES)}. Received: name={name!r}"
        )


def _check_input_shape(input_shape: tuple) -> tuple[int | None, int | None, int]:
    shape = tuple(input_shape)
    ok = len(shape) == 3 and shape[2] == 3
    ok = ok and all(d is None or (isinstance(d, int) and d >= 32) for d in shape[:2])
    if not ok:
        raise ValueError(
            "`input_shape` must be (height, width, 3) with height and width None or ints >= 32. "
            f"Received: input_shape={input_shape}"
        )
    return shape


#: Feature choices: the last layer at each stride, or the last block output at each stride.
FEATURE_KINDS = ("expand", "blocks")
_BLOCK_OUTPUT = re.compile(r"^block\d+[a-z]_(add|project_bn)$")


def _layer_strides(model: keras.Model) -> dict[str, int]:
    """Output stride of every layer of a functional model, from the layers' ``strides``.

    Walks the layers in graph order: a layer's stride is the largest stride of its inputs
    times its own (``strides`` of convolutions and poolings; 1 for every other layer). Needs no
    forward pass and no probe model, so it draws no random numbers.
    """
    strides: dict[str, int] = {}
    for layer in model.layers:
        inputs = []
        for node in layer._inbound_nodes[:1]:
            inputs = [t._keras_history.operation.name for t in node.input_tensors]
        own = getattr(layer, "strides", None)
        own = int(own[0]) if isinstance(own, tuple | list) else int(own or 1)
        strides[layer.name] = max((strides.get(n, 1) for n in inputs), default=1) * own
    return strides


def _feature_layer_names(app: keras.Model, features: str = "expand") -> dict[str, str]:
    """Name of the feature layer at each stride of an EfficientNet application.

    ``features="expand"`` takes the last layer (in layer order) at each stride, padding layers
    excepted (they only prepare the next strided convolution);
    ``"blocks"`` only considers block outputs (``blockNx_add`` or ``blockNx_project_bn``), the
    narrow features segmentation_models_pytorch uses.
    """
    found: dict[str, str] = {}
    by_stride = {stride: level for level, stride in FEATURE_STRIDES.items()}
    for name, stride in _layer_strides(app).items():
        if stride not in by_stride or isinstance(app.get_layer(name), keras.layers.ZeroPadding2D):
            continue
        if features == "blocks" and not _BLOCK_OUTPUT.match(name):
            continue
        found[by_stride[stride]] = name
    missing = [level for level in FEATURE_STRIDES if level not in found]
    if missing:
        raise RuntimeError(f"{app.name}: no layer found at the stride of {missing}")
    return {level: found[level] for level in FEATURE_STRIDES}


def _set_imagenet_normalization(model: keras.Model) -> None:
    """Set the stem ``Normalization`` of an EfficientNet to ``(x - mean) / std`` (ImageNet)."""
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.Normalization)]
    if len(layers) != 1:
        raise RuntimeError(f"expected one Normalization layer in the stem, found {len(layers)}")
    norm = layers[0]
    norm.adapt_mean.assign(np.asarray(IMAGENET_MEAN_RGB, dtype="float32"))
    norm.adapt_variance.assign(np.square(np.asarray(IMAGENET_STD_RGB, dtype="float32")))
    norm.finalize_state()


def build_efficientnet_encoder(
    name: str = "efficientnet_b0",
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    weights: str | os.PathLike | None = None,
    model_name: str | None = None,
    features: str = "expand",
) -> keras.Model:
    """Build an EfficientNet encoder returning the features at strides 2, 4, 8, 16 and 32.

    Args:
        name: architecture, one of ``"efficientnet_b0"`` .. ``"efficientnet_b7"``.
        input_shape: ``(height, width, 3)``; height and width may be ``None`` (any size).
            Sizes divisible by 32 give feature maps of exactly ``size / stride``; other sizes
            give ``ceil(size / stride)``.
        weights: ``None`` (random initialisation) or the path of a local Keras ImageNet weights
            file without the top, as ``keras.applications`` downloads it
            (``efficientnetb0_notop.h5``; ``.weights.h5`` files saved from the same application
            load too). Nothing is ever downloaded.
        model_name: name of the returned model; defaults to ``name``.
        features: ``"expand"`` (the last layer at each stride: the wide expanded activations,
            96/144/240/672/1280 channels for B0) or ``"blocks"`` (the last block output at each
            stride: 16/24/40/112/320 channels for B0; a decoder on these is several times
            cheaper).

    Returns:
        A functional ``keras.Model`` mapping ``(B, H, W, 3)`` float32 RGB in ``[0, 1]`` to a dict
        ``{"P1": (B, H/2, W/2, C1), ..., "P5": (B, H/32, W/32, C5)}``.

    Raises:
        ValueError: unknown ``name`` or bad ``input_shape``.
        KerasnucError: ``weights`` is not an existing ``.h5`` file or does not fit ``name``.
    """
    _check_name(name)
    if features not in FEATURE_KINDS:
        raise ValueError(
            f"`features` must be one of {FEATURE_KINDS}. Received: features={features!r}"
        )
    input_shape = _check_input_shape(input_shape)
    weights_path = None
    if weights is not None:
        weights_path = Path(weights)
        if not weights_path.name.endswith(".h5"):
            raise KerasnucError(f"{weights_path}: encoder weights must be a .h5 file")
        if not weights_path.is_file():
            raise KerasnucError(f"{weights_path}: encoder weights file not found")

    inputs = keras.Input(shape=input_shape, name="image")
    # The application's stem divides by 255: undo that for inputs in [0, 1].
    scaled = keras.layers.Rescaling(255.0, name="to_0_255")(inputs)
    try:
        app = _APPLICATIONS[name](
            include_top=False,
            weights=None if weights_path is None else str(weights_path),
            input_tensor=scaled,
            input_shape=input_shape,
        )
    except ValueError as err:
        raise KerasnucError(f"{weights_path}: cannot load {name} weights: {err}") from err
    _set_imagenet_normalization(app)
    if weights_path is not None:
        logger.info("%s: loaded encoder weights from %s", name, weights_path)
    layer_names = _feature_layer_names(app, features)
    features = {level: app.get_layer(layer_names[level]).output for level in FEATURE_STRIDES}
    return keras.Model(inputs, features, name=model_name or name)
