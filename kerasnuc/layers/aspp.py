"""Atrous spatial pyramid pooling (ASPP) of DeepLabV3 (Chen et al. 2017, "Rethinking Atrous
Convolution for Semantic Image Segmentation", Sec. 3.3), the encoder-decoder bridge of U-Net#
(Stagys et al.: "one 1x1 convolution and three 3x3 convolutions with dilation rates 6, 12 and 18").
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kerasnuc")
class ASPP(keras.layers.Layer):
    """Atrous spatial pyramid pooling with an image-pooling branch (DeepLabV3).

    Parallel branches, each ``filters`` channels, conv (no bias) -> batch norm -> activation:

    * a 1x1 convolution;
    * one 3x3 convolution with dilation ``r`` ("same" padding) per rate in ``rates``;
    * image pooling: global average pool -> 1x1 conv -> BN -> activation, broadcast back to
      ``H x W`` (bilinear upsampling of a 1x1 map is a constant, so broadcasting is exact and
      works with unknown ``H``/``W``).

    The ``(2 + len(rates)) * filters`` concatenated channels are projected by a 1x1 conv -> BN
    -> activation -> dropout to ``filters`` channels.

    Choices where the papers are silent: the activation defaults to Mish (U-Net# uses Mish in
    the decoder, DeepLabV3 uses ReLU); dropout after the projection defaults to 0.1
    (torchvision's DeepLabV3 head uses 0.5, configurable); batch norm uses Keras defaults.

    Args:
        filters: Channels of every branch and of the output.
        rates: Dilation rates of the 3x3 branches, positive ints. Default ``(6, 12, 18)``.
        activation: Name of a Keras activation. Default ``"mish"``.
        dropout: Dropout rate after the projection, in ``[0, 1)``.
        kernel_initializer: Initializer of all convolution kernels.
        **kwargs: Base ``Layer`` arguments (``name``, ``dtype``, ``trainable``).

    Input shape:
        ``(B, H, W, C)``; ``H`` and ``W`` may be unknown.

    Output shape:
        ``(B, H, W, filters)``.
    """

    def __init__(
        self,
        filters=256,
        rates=(6, 12, 18),
        activation="mish",
        dropout=0.1,
        kernel_initializer="he_normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
            raise ValueError(f"`filters` must be a positive int. Received: filters={filters!r}")
        if (
            not isinstance(rates, list | tuple)
            or not rates
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates)
        ):
            raise ValueError(f"`rates` must be a list of positive ints. Received: rates={rates!r}")
        if not isinstance(activation, str):
            raise ValueError(
                f"`activation` must be the name of a Keras activation. "
                f"Received: activation={activation!r}"
            )
        try:
            self._activation_fn = keras.activations.get(activation)
        except ValueError:
            raise ValueError(
                f"`activation` must be the name of a Keras activation. "
                f"Received: activation={activation!r}"
            ) from None
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, int | float)
            or not 0 <= dropout < 1
        ):
            raise ValueError(f"`dropout` must be a float in [0, 1). Received: dropout={dropout!r}")
        self.filters = filters
        self.rates = list(rates)
        self.activation = activation
        self.dropout = float(dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

        def conv(kernel_size, dilation_rate, name):
            return keras.layers.Conv2D(
                filters,
                kernel_size,
                padding="same",
                dilation_rate=dilation_rate,
                use_bias=False,
                kernel_initializer=self.kernel_initializer,
                dtype=self.dtype_policy,
                name=name,
            )

        def bn(name):
            return keras.layers.BatchNormalization(dtype=self.dtype_policy, name=name)

        names = ["conv1x1"] + [f"atrous_{r}" for r in self.rates] + ["pool_conv"]
        self.branch_convs = [conv(1, 1, names[0])]
        self.branch_convs += [
            conv(3, r, name) for r, name in zip(self.rates, names[1:-1], strict=True)
        ]
        self.branch_convs.append(conv(1, 1, names[-1]))
        self.branch_bns = [bn(f"{name}_bn") for name in names]
        self.project_conv = conv(1, 1, "project")
        self.project_bn = bn("project_bn")
        self.project_dropout = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="project_dropout"
        )

    def build(self, input_shape):
        if input_shape[-1] is None:
            raise ValueError(
                f"The input channel count must be known. Received: input_shape={input_shape}"
            )
        branch_shape = (*input_shape[:-1], self.filters)
        for conv, bn in zip(self.branch_convs[:-1], self.branch_bns[:-1], strict=True):
            conv.build(input_shape)
            bn.build(branch_shape)
        pooled_shape = (input_shape[0], 1, 1, input_shape[-1])
        self.branch_convs[-1].build(pooled_shape)
        self.branch_bns[-1].build((input_shape[0], 1, 1, self.filters))
        self.project_conv.build((*input_shape[:-1], self.filters * len(self.branch_convs)))
        self.project_bn.build(branch_shape)

    def call(self, inputs, training=None):
        branches = []
        for conv, bn in zip(self.branch_convs[:-1], self.branch_bns[:-1], strict=True):
            branches.append(self._activation_fn(bn(conv(inputs), training=training)))
        pooled = ops.mean(inputs, axis=(1, 2), keepdims=True)
        pooled = self._activation_fn(
            self.branch_bns[-1](self.branch_convs[-1](pooled), training=training)
        )
        branches.append(pooled + ops.zeros_like(branches[0]))
        x = self.project_conv(ops.concatenate(branches, axis=-1))
        x = self._activation_fn(self.project_bn(x, training=training))
        return self.project_dropout(x, training=training)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "rates": self.rates,
                "activation": self.activation,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
