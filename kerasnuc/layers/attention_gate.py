"""Additive attention gate of Attention U-Net (Oktay et al. 2018, "Attention U-Net: Learning
Where to Look for the Pancreas"), as used on the skip connections of U-Net# (Stagys et al.).

Also holds :func:`resize_bilinear_like`, a bilinear resize to the (possibly unknown) spatial size
of another tensor written with ``keras.ops`` only: ``keras.ops.image.resize`` needs a static
size with the TensorFlow backend, so it cannot follow inputs whose ``H``/``W`` are ``None``.
"""

from __future__ import annotations

import keras
from keras import ops


def _source_coordinates(out_size, in_size, dtype):
    """Half-pixel bilinear sampling positions of ``out_size`` outputs on ``in_size`` inputs."""
    scale = ops.cast(in_size, dtype) / ops.cast(out_size, dtype)
    src = (ops.cast(ops.arange(out_size), dtype) + 0.5) * scale - 0.5
    src = ops.clip(src, 0.0, ops.cast(in_size - 1, dtype))
    low = ops.floor(src)
    frac = src - low
    low = ops.cast(low, "int32")
    high = ops.minimum(low + 1, in_size - 1)
    return low, high, frac


def resize_bilinear_like(images, reference):
    """Bilinearly resizes ``images`` to the spatial size of ``reference`` (channels last).

    Same sampling as ``tf.image.resize(..., "bilinear")`` / ``keras.ops.image.resize`` without
    antialiasing (half-pixel centres, edge clamping), but the target size is read from
    ``ops.shape(reference)`` at run time, so ``H`` and ``W`` may be unknown when tracing.
    Resizing to the same size returns ``images`` unchanged (up to float rounding).

    Args:
        images: ``(B, h, w, C)`` float tensor.
        reference: ``(B, H, W, ...)`` tensor; only its spatial size is used.

    Returns:
        ``(B, H, W, C)`` tensor of the dtype of ``images``.
    """
    in_shape = ops.shape(images)
    out_shape = ops.shape(reference)
    low, high, frac = _source_coordinates(out_shape[1], in_shape[1], images.dtype)
    frac = ops.reshape(frac, (1, -1, 1, 1))
    images = ops.take(images, low, axis=1) * (1.0 - frac) + ops.take(images, high, axis=1) * frac
    low, high, frac = _source_coordinates(out_shape[2], in_shape[2], images.dtype)
    frac = ops.reshape(frac, (1, 1, -1, 1))
    return ops.take(images, low, axis=2) * (1.0 - frac) + ops.take(images, high, axis=2) * frac


@keras.saving.register_keras_serializable(package="kerasnuc")
class AttentionGate(keras.layers.Layer):
    """Additive attention gate on a skip connection (Oktay et al. 2018, Eq. 1-2).

    ``alpha = sigmoid(psi(relu(W_x(x) + up(W_g(g)))))`` and the output is ``x * alpha``, where
    ``W_x`` (no bias), ``W_g`` and ``psi`` (with bias) are 1x1 convolutions to ``inter_channels``,
    ``inter_channels`` and 1 channel.

    Resampling choice: Oktay et al. compute ``W_x`` with a stride-2 convolution on the gating
    grid and upsample ``alpha`` afterwards. Here the projected gating signal ``W_g(g)`` is
    resized bilinearly to the size of ``x`` instead and the gate is computed at full skip
    resolution. This accepts a gating signal of any coarser (or equal) size, including the
    arbitrary scale ratios of U-Net 3+ full-scale skips and unknown ``H``/``W``, and gives a
    full-resolution ``alpha`` without a second resampling.
    The output 1x1 conv + BN (``W`` in Oktay's code) is left to the decoder.

    Args:
        inter_channels: Channels ``F_int`` of the intermediate (``W_x``, ``W_g``) projections.
        batch_norm: Adds batch norm after ``W_x``, ``W_g`` and ``psi`` (the variant popular in
            Attention U-Net re-implementations). Default ``False`` as in Oktay et al.
        kernel_initializer: Initializer of the three 1x1 kernels.
        **kwargs: Base ``Layer`` arguments (``name``, ``dtype``, ``trainable``).

    Call arguments:
        x: Skip features ``(B, H, W, F_x)``.
        gating: Gating features from the decoder ``(B, H_g, W_g, F_g)``, usually ``H_g = H / 2``.
        return_attention: If ``True``, also returns ``alpha``.
        training: Passed to the batch norms.

    Returns:
        ``(B, H, W, F_x)`` gated features (dtype of ``x``); with ``return_attention=True`` the
        tuple ``(gated, alpha)`` where ``alpha`` is ``(B, H, W, 1)`` in ``[0, 1]``.
    """

    def __init__(
        self,
        inter_channels,
        batch_norm=False,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if (
            isinstance(inter_channels, bool)
            or not isinstance(inter_channels, int)
            or inter_channels < 1
        ):
            raise ValueError(
                "`inter_channels` must be a positive int. "
                f"Received: inter_channels={inter_channels!r}"
            )
        self.inter_channels = inter_channels
        self.batch_norm = bool(batch_norm)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

        def conv(filters, use_bias, name):
            return keras.layers.Conv2D(
                filters,
                1,
                use_bias=use_bias,
                kernel_initializer=self.kernel_initializer,
                dtype=self.dtype_policy,
                name=name,
            )

        self.theta_x = conv(inter_channels, False, "theta_x")
        self.phi_g = conv(inter_channels, True, "phi_g")
        self.psi = conv(1, True, "psi")
        if self.batch_norm:
            self.theta_x_bn = keras.layers.BatchNormalization(
                dtype=self.dtype_policy, name="theta_x_bn"
            )
            self.phi_g_bn = keras.layers.BatchNormalization(
                dtype=self.dtype_policy, name="phi_g_bn"
            )
            self.psi_bn = keras.layers.BatchNormalization(dtype=self.dtype_policy, name="psi_bn")

    def build(self, x_shape, gating_shape):
        if x_shape[-1] is None or gating_shape[-1] is None:
            raise ValueError(
                "The channel counts of `x` and `gating` must be known. "
                f"Received: x_shape={tuple(x_shape)}, gating_shape={tuple(gating_shape)}"
            )
        inter_x = (*x_shape[:-1], self.inter_channels)
        inter_g = (*gating_shape[:-1], self.inter_channels)
        self.theta_x.build(x_shape)
        self.phi_g.build(gating_shape)
        self.psi.build(inter_x)
        if self.batch_norm:
            self.theta_x_bn.build(inter_x)
            self.phi_g_bn.build(inter_g)
            self.psi_bn.build((*x_shape[:-1], 1))

    def call(self, x, gating, return_attention=False, training=None):
        theta = self.theta_x(x)
        phi = self.phi_g(gating)
        if self.batch_norm:
            theta = self.theta_x_bn(theta, training=training)
            phi = self.phi_g_bn(phi, training=training)
        phi = resize_bilinear_like(phi, x)
        logits = self.psi(ops.relu(theta + phi))
        if self.batch_norm:
            logits = self.psi_bn(logits, training=training)
        alpha = ops.sigmoid(logits)
        gated = x * ops.cast(alpha, x.dtype)
        if return_attention:
            return gated, alpha
        return gated

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "inter_channels": self.inter_channels,
                "batch_norm": self.batch_norm,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
