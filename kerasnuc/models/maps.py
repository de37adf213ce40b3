"""Run a model on whole images: pad to a multiple of the network stride, predict, crop back.

This is the one place where images meet the model outside the training pipeline; validation
during training, the :mod:`~kerasnuc.inference.predictor` (TTA) and tiling all call it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping

import numpy as np

from kerasnuc.models.views import average_views

STRIDE = 32


def pad_to_multiple(
    image: np.ndarray, multiple: int = STRIDE, mode: str = "reflect"
) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad ``(H, W, C)`` (or ``(B, H, W, C)``) at the bottom/right to a multiple of ``multiple``.

    Args:
        image: the array to pad.
        multiple: the network stride (32 for five 2x downsamplings).
        mode: ``np.pad`` mode; ``"reflect"`` keeps tissue statistics at the border (falls back to
            ``"edge"`` for sides shorter than the padding).

    Returns:
        ``(padded, (H, W))`` with the original height and width for :func:`crop_maps`.
    """
    image = np.asarray(image)
    h, w = image.shape[-3], image.shape[-2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return image, (h, w)
    pad = [(0, 0)] * image.ndim
    pad[-3], pad[-2] = (0, ph), (0, pw)
    use = mode if (mode != "reflect" or (h > ph and w > pw)) else "edge"
    return np.pad(image, pad, mode=use), (h, w)


def crop_maps(maps: Mapping[str, np.ndarray], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Crop every ``(..., H', W', K)`` map back to ``size = (H, W)``."""
    h, w = size
    return {k: np.asarray(v)[..., :h, :w, :] for k, v in maps.items()}


_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forward_function(model) -> Callable:
    """``model(x, training=False)`` as one traced graph, cached per model.

    On the TensorFlow backend the forward pass is a ``tf.function`` whose input signature is
    ``(None, None, None, 3)`` float32, so every batch size and tile shape reuses one trace (no
    retracing) and the graph optimiser fuses convolution, batch norm and activation. Run eagerly
    instead, the same model is 1.4-1.9x slower per tile on a CPU. Other backends call the model.
    """
    import keras  # here, not at the top: padding and cropping are used without Keras

    fn = _FORWARD.get(model)
    if fn is None:
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            fn = tf.function(
                lambda x: model(x, training=False),
                input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
            )
        else:

            def fn(x):
                return model(x, training=False)

        _FORWARD[model] = fn
    return fn


def predict_maps_batch(
    model, images: np.ndarray, batch_size: int = 4, views: int = 1
) -> dict[str, np.ndarray]:
    """Probability maps of a batch of same-size images.

    Args:
        model: a Keras model with a dict of named outputs taking ``(B, H, W, 3)`` float32 in
            ``[0, 1]`` for any ``H, W`` divisible by :data:`STRIDE`.
        images: ``(B, H, W, 3)`` uint8, or float32 in ``[0, 1]``.
        batch_size: images per forward pass.
        views: flips / rotations averaged (:func:`kerasnuc.models.views.average_views`); each
            view is padded and cropped on its own.

    Returns:
        ``{output name: (B, H, W, K) float32}`` at the input size.
    """
    images = np.asarray(images)
    x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    forward = forward_function(model)

    def padded_forward(batch: np.ndarray) -> dict[str, np.ndarray]:
        batch, size = pad_to_multiple(batch)
        parts: dict[str, list[np.ndarray]] = {}
        for i in range(0, len(batch), batch_size):
            out = forward(batch[i : i + batch_size])
            for k, v in out.items():
                parts.setdefault(k, []).append(np.asarray(v, dtype=np.float32))
        return crop_maps({k: np.concatenate(v) for k, v in parts.items()}, size)

    return average_views(padded_forward, x, views)


def predict_maps(model, image: np.ndarray, views: int = 1) -> dict[str, np.ndarray]:
    """Probability maps ``{name: (H, W, K) float32}`` of one ``(H, W, 3)`` image (no TTA;
    ``views`` as for :func:`predict_maps_batch`)."""
    out = predict_maps_batch(model, np.asarray(image)[None], batch_size=1, views=views)
    return {k: v[0] for k, v in out.items()}
