"""ResNeXt encoders (Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural
Networks") returning ``{"P1".."P5"}`` feature dicts.

The layout follows torchvision's ``ResNet`` with ``groups`` / ``width_per_group`` (the layout of
the SWSL ResNeXt-101 32x4d weights that U-Net# uses, Yalniz et al. 2019):

* stem: 7x7/2 convolution (64 filters, no bias) -> batch norm -> ReLU (= ``P1``, stride 2)
  -> 3x3/2 max pool;
* four stages of bottleneck blocks, ``[3, 4, 6, 3]`` blocks (ResNeXt-50) or ``[3, 4, 23, 3]``
  (ResNeXt-101), with ``planes = 64, 128, 256, 512``. A block is 1x1 conv (``width`` filters)
  -> BN -> ReLU -> grouped 3x3 conv (``width`` filters, ``groups`` groups, carries the stride)
  -> BN -> ReLU -> 1x1 conv (``4 * planes`` filters) -> BN, plus the shortcut, -> ReLU, with
  ``width = int(planes * width_per_group / 64) * groups``. The first block of every stage has a
  projection shortcut (1x1 conv with the block's stride -> BN). Stage outputs are ``P2..P5``
  (strides 4, 8, 16, 32).

Convolutions have no bias; batch norm uses torchvision's ``epsilon=1e-5`` and momentum 0.1
(``momentum=0.9`` in Keras). Padding is explicit and symmetric as in PyTorch (``ZeroPadding2D`` +
``"valid"``), so weights ported from torchvision/timm give the same outputs; the max pool pads
with zeros, which equals PyTorch's ``-inf`` padding because it follows a ReLU.

Grouped convolutions use :class:`kerasnuc.layers.group_conv.GroupConv2D` (split -> per-group
``Conv2D`` -> concat), not ``Conv2D(groups=...)``.

Layer names follow the torchvision module names (``conv1``, ``bn1``, ``layer3_5_conv2``,
``layer1_0_downsample_bn``, ...) to make weight porting a name-to-name mapping.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import keras

from kerasnuc.checks import check_positive_int
from kerasnuc.fileutil import KerasnucError
from kerasnuc.layers.group_conv import GroupConv2D

logger = logging.getLogger(__name__)

#: Blocks per stage for the standard depths.
RESNEXT_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}
#: ImageNet mean/std of RGB images in [0, 1] (the preprocessing of torchvision/SWSL weights).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9


def _kernel_initializer(seed: int | None) -> keras.initializers.Initializer:
    """torchvision's ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal", seed=seed
    )


class _Seeds:
    """Hands out consecutive integer seeds (or ``None``) to the layers of one model."""

    def __init__(self, seed: int | None) -> None:
        self._next = seed

    def __call__(self) -> int | None:
        if self._next is None:
            return None
        self._next += 1000
        return self._next


def _conv_bn(
    x,
    filters: int,
    kernel_size: int,
    strides: int,
    name: str,
    seeds: _Seeds,
    groups: int = 1,
    relu: bool = True,
    bn_name: str | None = None,
):
    """Conv (PyTorch-style symmetric padding, no bias) -> BN (-> ReLU)."""
    pad = kernel_size // 2
    if pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    if groups == 1:
        x = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            use_bias=False,
            kernel_initializer=_kernel_initializer(seeds()),
            name=name,
        )(x)
    else:
        x = GroupConv2D(
            filters,
            kernel_size,
            groups=groups,
            strides=strides,
            use_bias=False,
            kernel_initializer=_kernel_initializer(seeds()),
            name=name,
        )(x)
    x = keras.layers.BatchNormalization(
        epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=bn_name or f"{name}_bn"
    )(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def _bottleneck(
    x,
    planes: int,
    width: int,
    groups: int,
    strides: int,
    project: bool,
    name: str,
    seeds: _Seeds,
):
    """ResNeXt bottleneck block (torchvision ``Bottleneck``, stride on the 3x3 conv)."""
    out_channels = 4 * planes
    shortcut = x
    if project:
        shortcut = _conv_bn(
            x,
            out_channels,
            1,
            strides,
            f"{name}_downsample_conv",
            seeds,
            relu=False,
            bn_name=f"{name}_downsample_bn",
        )
    y = _conv_bn(x, width, 1, 1, f"{name}_conv1", seeds, bn_name=f"{name}_bn1")
    y = _conv_bn(y, width, 3, strides, f"{name}_conv2", seeds, groups, bn_name=f"{name}_bn2")
    y = _conv_bn(y, out_channels, 1, 1, f"{name}_conv3", seeds, relu=False, bn_name=f"{name}_bn3")
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def build_resnext_encoder(
    depth: int = 50,
    groups: int = 32,
    width_per_group: int = 4,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    weights: str | os.PathLike | None = None,
    width_scale: float = 1.0,
    blocks: Sequence[int] | None = None,
    input_normalization: str | None = "imagenet",
    seed: int | None = None,
    name: str | None = None,
) -> keras.Model:
    """Builds a ResNeXt encoder as a functional model with outputs ``{"P1": .., "P5": ..}``.

    ``build_resnext_encoder(101)`` is ResNeXt-101 32x4d, the U-Net# encoder: 42,128,704 trainable
    parameters, the torchvision/timm count (44.18 M) less the 1000-class classifier (2,049,000);
    batch norm adds 137,856 non-trainable moving statistics (buffers in PyTorch).
    ``build_resnext_encoder(50)`` is ResNeXt-50 32x4d: 22,979,904 trainable parameters.

    Args:
        depth: 50 or 101 (selects ``blocks``); ignored when ``blocks`` is given.
        groups: Cardinality ``C`` (32 in "32x4d").
        width_per_group: Bottleneck width per group at ``planes=64`` (4 in "32x4d").
        input_shape: ``(H, W, C)``; ``H`` and ``W`` may be ``None``. Inputs whose sides are
            multiples of 32 give exact stride-2^n feature maps; other sizes are rounded up per
            stride-2 layer (``ceil(H / 2^n)``).
        weights: Optional path to a Keras weights file (``.weights.h5``) saved from a model built
            with the same arguments; loaded with ``model.load_weights``.
        width_scale: Multiplies the stem filters (64) and the stage ``planes`` (64..512), e.g.
            ``0.25`` with ``groups=4`` for tiny test models. Standard ResNeXt: 1.0.
        blocks: Blocks per stage (4 positive ints); overrides ``depth``, e.g. ``(1, 1, 1, 1)``.
        input_normalization: ``"imagenet"`` subtracts the ImageNet mean and divides by its std
            inside the model (expects RGB in ``[0, 1]``); ``None`` feeds the input unchanged.
        seed: Optional integer seed for the kernel initialisers (reproducible random init).
        name: Model name; default ``"resnext{depth}_{groups}x{width_per_group}d"``.

    Returns:
        A ``keras.Model`` mapping ``(B, H, W, 3) float32`` to a dict of ``float32`` feature maps
        ``P1`` ``(B, H/2, W/2, s*64)``, ``P2`` ``(B, H/4, W/4, 4*s*64)``, ``P3`` ``(B, H/8, W/8,
        4*s*128)``, ``P4`` ``(B, H/16, W/16, 4*s*256)`` and ``P5`` ``(B, H/32, W/32, 4*s*512)``
        with ``s = width_scale``.

    Raises:
        ValueError: On invalid arguments.
        KerasnucError: If ``weights`` is given and is not a file.
    """
    if blocks is None:
        if depth not in RESNEXT_BLOCKS:
            raise ValueError(
                f"`depth` must be one of {sorted(RESNEXT_BLOCKS)}. Received: depth={depth!r}"
            )
        blocks = RESNEXT_BLOCKS[depth]
    blocks = tuple(blocks)
    if len(blocks) != 4 or any(
        isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks
    ):
        raise ValueError(f"`blocks` must be a list of 4 positive ints. Received: blocks={blocks}")
    check_positive_int("groups", groups)
    check_positive_int("width_per_group", width_per_group)
    if not width_scale > 0:
        raise ValueError(f"`width_scale` must be > 0. Received: width_scale={width_scale!r}")
    if input_normalization not in ("imagenet", None):
        raise ValueError(
            "`input_normalization` must be 'imagenet' or None. "
            f"Received: input_normalization={input_normalization!r}"
        )
    if len(input_shape) != 3:
        raise ValueError(
            f"`input_shape` must be (H, W, C). Received: input_shape={tuple(input_shape)}"
        )
    if input_normalization == "imagenet" and input_shape[-1] != 3:
        raise ValueError(
            "`input_normalization='imagenet'` needs 3 input channels. "
            f"Received: input_shape={tuple(input_shape)}"
        )
    stem_filters = round(64 * width_scale)
    planes = [round(64 * 2**i * width_scale) for i in range(4)]
    widths = [int(p * width_per_group / 64) * groups for p in planes]
    if stem_filters < 1 or min(widths) < 1:
        raise ValueError(
            "`width_scale` and `width_per_group` give an empty layer: "
            f"stem={stem_filters}, widths={widths}. Received: width_scale={width_scale}, "
            f"width_per_group={width_per_group}"
        )
    if weights is not None and not os.path.isfile(weights):
        raise KerasnucError(f"ResNeXt weights file not found: {weights}")
    if name is None:
        name = f"resnext{sum(blocks) * 3 + 2}_{groups}x{width_per_group}d"
    seeds = _Seeds(seed)

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    if input_normalization == "imagenet":
        x = keras.layers.Normalization(
            mean=IMAGENET_MEAN, variance=[s**2 for s in IMAGENET_STD], name="imagenet_norm"
        )(x)

    # Stem
    p1 = _conv_bn(x, stem_filters, 7, 2, "conv1", seeds, bn_name="bn1")
    x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(p1)
    x = keras.layers.MaxPooling2D(3, strides=2, name="maxpool")(x)

    # Stages
    features = {"P1": p1}
    for stage, (num_blocks, stage_planes, width) in enumerate(
        zip(blocks, planes, widths, strict=True)
    ):
        for block in range(num_blocks):
            strides = 2 if (stage > 0 and block == 0) else 1
            x = _bottleneck(
                x,
                stage_planes,
                width,
                groups,
                strides,
                project=block == 0,
                name=f"layer{stage + 1}_{block}",
                seeds=seeds,
            )
        features[f"P{stage + 2}"] = x

    model = keras.Model(inputs, features, name=name)
    if weights is not None:
        logger.info("Loading ResNeXt weights from %s", weights)
        model.load_weights(weights)
    return model
