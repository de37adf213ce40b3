"""ResNet-50 encoder returning the feature dict ``{"P1": ..., "P5": ...}``.

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (ResNet-50:
bottleneck blocks ``(3, 4, 6, 3)``, expansion 4). The `weak` method (Chamanzar & Nie,
"Weakly Supervised Multi-Task Learning for Cell Detection and Segmentation", ISBI 2020) uses it
as the encoder of its U-Net.

* ``width=64`` (the real ResNet-50) is ``keras.applications.ResNet50`` without its top, so a
  local Keras ImageNet weights file (``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5``)
  loads into it unchanged.
* Any other ``width`` builds the same layout (same blocks and strides, ResNet v1 as in
  ``keras.applications``: stride 2 on the first 1x1 convolution of a stage) with base width
  ``width`` instead of 64; meant for tests and for small CPU runs, never with pretrained weights.

Features (strides 2..32 of the input): ``P1`` = the stem's ReLU output (before max pooling),
``P2`` .. ``P5`` = the outputs of stages 2 .. 5 (``4 w``, ``8 w``, ``16 w``, ``32 w`` channels).
"""

from __future__ import annotations

import os

import keras

#: Bottleneck blocks per stage of ResNet-50.
RESNET50_BLOCKS: tuple[int, ...] = (3, 4, 6, 3)

# Layer names of keras.applications.ResNet50 whose outputs are P1..P5.
_KERAS_FEATURES = {
    "P1": "conv1_relu",
    "P2": "conv2_block3_out",
    "P3": "conv3_block4_out",
    "P4": "conv4_block6_out",
    "P5": "conv5_block3_out",
}


def _check_args(width: int, weights, input_shape) -> None:
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"`width` must be a positive int. Received: width={width!r}")
    if weights is not None and width != 64:
        raise ValueError(
            "`weights` (a pretrained file) needs the full ResNet-50, `width=64`. "
            f"Received: width={width}, weights={weights!r}"
        )
    if weights is not None and not os.path.isfile(weights):
        raise ValueError(f"`weights` must be an existing .h5 file. Received: weights={weights!r}")
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(
            f"`input_shape` must be (height, width, 3). Received: input_shape={input_shape!r}"
        )


def _bottleneck(x, filters: int, stride: int, shortcut_conv: bool, name: str):
    """ResNet v1 bottleneck: 1x1 (stride) -> 3x3 -> 1x1 (4 filters), BN after each conv."""
    bn = {"axis": -1, "epsilon": 1.001e-5}
    if shortcut_conv:
        shortcut = keras.layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = keras.layers.BatchNormalization(**bn, name=f"{name}_0_bn")(shortcut)
    else:
        shortcut = x
    x = keras.layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = keras.layers.BatchNormalization(**bn, name=f"{name}_1_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = keras.layers.Conv2D(filters, 3, padding="same", name=f"{name}_2_conv")(x)
    x = keras.layers.BatchNormalization(**bn, name=f"{name}_2_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = keras.layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = keras.layers.BatchNormalization(**bn, name=f"{name}_3_bn")(x)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def _narrow_resnet50(inputs, width: int) -> dict:
    bn = {"axis": -1, "epsilon": 1.001e-5}
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = keras.layers.Conv2D(width, 7, strides=2, name="conv1_conv")(x)
    x = keras.layers.BatchNormalization(**bn, name="conv1_bn")(x)
    x = keras.layers.Activation("relu", name="conv1_relu")(x)
    features = {"P1": x}
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, blocks in enumerate(RESNET50_BLOCKS, start=2):
        filters = width * 2 ** (stage - 2)
        for block in range(1, blocks + 1):
            stride = 2 if block == 1 and stage > 2 else 1
            x = _bottleneck(x, filters, stride, block == 1, name=f"conv{stage}_block{block}")
        features[f"P{stage}"] = x
    return features


def build_resnet50_encoder(
    weights: str | os.PathLike | None = None,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    width: int = 64,
    model_name: str = "encoder",
) -> keras.Model:
    """Build a ResNet-50 feature encoder.

    Args:
        weights: None (random initialisation) or the path of a local Keras ImageNet
            ``*_notop.h5`` file of ResNet-50 (only with ``width=64``).
        input_shape: ``(height, width, 3)``, ``None`` for any size (a multiple of 32 at call
            time keeps the skip connections aligned).
        width: base width (64 = ResNet-50; smaller for tests and cheap runs).
        model_name: name of the returned model (nested as one layer in the U-Net).

    Returns:
        A ``keras.Model`` mapping ``(B, H, W, 3)`` float32 (already normalised) to
        ``{"P1": (B, H/2, W/2, w), "P2": (B, H/4, W/4, 4w), "P3": (B, H/8, W/8, 8w),
        "P4": (B, H/16, W/16, 16w), "P5": (B, H/32, W/32, 32w)}`` with ``w = width``.

    Raises:
        ValueError: bad arguments, e.g. ``weights`` with ``width != 64``.
    """
    weights = os.fspath(weights) if weights is not None else None
    _check_args(width, weights, input_shape)
    inputs = keras.Input(shape=tuple(input_shape), name="encoder_input")
    if width == 64:
        base = keras.applications.ResNet50(
            include_top=False, weights=weights, input_tensor=inputs, name="resnet50"
        )
        features = {key: base.get_layer(name).output for key, name in _KERAS_FEATURES.items()}
    else:
        features = _narrow_resnet50(inputs, width)
    return keras.Model(inputs, features, name=model_name)
