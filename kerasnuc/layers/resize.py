"""Layer form of :func:`kerasnuc.layers.attention_gate.resize_bilinear_like`, for functional
models whose feature maps have unknown ``H``/``W`` (``UpSampling2D(interpolation="bilinear")``
and ``keras.ops.image.resize`` need static sizes with the TensorFlow backend).
"""

from __future__ import annotations

import keras
from keras import ops

from kerasnuc.layers.attention_gate import resize_bilinear_like


@keras.saving.register_keras_serializable(package="kerasnuc")
class ResizeLike(keras.layers.Layer):
    """Bilinearly resizes ``x`` to the spatial size of ``reference`` (half-pixel centres).

    Call arguments:
        x: ``(B, h, w, C)`` float tensor.
        reference: ``(B, H, W, ...)`` tensor; only its run-time spatial size is used.

    Returns:
        ``(B, H, W, C)`` tensor of the dtype of ``x``. The sampling positions and weights are
        computed in float32 also for float16 inputs (mixed precision): in float16 the positions
        of a few hundred pixels lose their fractional part.
    """

    def call(self, x, reference):
        out = resize_bilinear_like(ops.cast(x, "float32"), reference)
        return ops.cast(out, x.dtype)

    def compute_output_shape(self, x_shape, reference_shape):
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[-1])
