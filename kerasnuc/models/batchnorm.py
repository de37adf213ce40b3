"""Batch-norm statistics re-estimated from data with the weights fixed.

Why: a ``BatchNormalization`` layer normalises with the statistics of the current batch in
training mode but with its moving averages in inference mode. The averages follow the batch
statistics with ``momentum`` (Keras default 0.99: a memory of about 100 steps), so while the
weights still move fast (the first few hundred steps of a short CPU run) they describe an older
network, and the inference-mode output of the model can be far from the training-mode one that
the loss saw (``unet_sharp`` after 25-50 steps on two CoNSeP crops: background / nucleus IoU
0.36 / 0.07 in inference mode against 0.68 / 0.50 in training mode). Recomputing the averages
from a few training batches with the current weights removes the lag (Ioffe & Szegedy 2015,
section 3.1: population statistics after training; the "precise BN" / ``update_bn`` practice).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import keras
import numpy as np

from kerasnuc.models.freeze import batchnorm_layers

logger = logging.getLogger(__name__)


def reestimated_layers(model: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    """The batch norms of ``model`` that use batch statistics in training mode.

    Those are the trainable ones: a frozen ``BatchNormalization`` (``trainable=False``) runs in
    inference mode also during training in Keras 3, so its moving statistics are part of the
    function the other weights were trained with and must not change.
    """
    return [bn for bn in batchnorm_layers(model) if bn.trainable]


def reestimate_batch_norm(
    model: keras.layers.Layer,
    batches: Iterable[np.ndarray],
    layers: Sequence[keras.layers.BatchNormalization] | None = None,
) -> int:
    """Replace the moving statistics of batch norms by their averages over ``batches``.

    Every batch goes through ``model`` once in training mode (the weights are not changed);
    afterwards each layer's ``moving_mean`` is the mean over the batches of the per-channel mean
    of its input, and ``moving_variance`` the mean over the batches of the per-channel (biased)
    variance of its input, i.e. the statistics the layer normalised those batches with. This is
    the cumulative average the moving average approximates: batch ``k`` (1-based) is blended in
    with ``momentum = (k - 1) / k``. Each layer sees the inputs that the training-mode model
    gives it (every earlier batch norm normalising with batch statistics, dropout active), as in
    a training step. ``gamma``, ``beta`` and every other weight stay as they are; the layers'
    ``momentum`` is restored afterwards.

    Args:
        model: a Keras model (or layer) whose ``call`` accepts one batch, e.g. ``(B, H, W, 3)``
            float32 images.
        batches: input batches (numpy arrays or tensors); consumed once.
        layers: the batch norms to re-estimate (default: :func:`reestimated_layers`), frozen
            ones included (e.g. to calibrate a randomly initialised encoder that then stays
            frozen); the other batch norms of the model are left as they were.

    Returns:
        The number of batches used.

    Raises:
        ValueError: ``batches`` is empty (the statistics are then left unchanged).
    """
    layers = reestimated_layers(model) if layers is None else list(layers)
    for bn in layers:
        if not isinstance(bn, keras.layers.BatchNormalization):
            raise ValueError(
                f"`layers` must be BatchNormalization layers. Received: {type(bn).__name__}"
            )
    targets = {id(bn) for bn in layers}
    others = [bn for bn in batchnorm_layers(model) if bn.trainable and id(bn) not in targets]
    saved = [(bn, bn.trainable, bn.momentum) for bn in layers]
    before = [(bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in others]
    count = 0
    try:
        for bn in layers:  # a frozen layer uses its moving statistics even in training mode
            bn.trainable = True
        for batch in batches:
            count += 1
            for bn in layers:
                bn.momentum = (count - 1) / count
            if not isinstance(batch, Mapping):
                batch = keras.ops.convert_to_tensor(batch, "float32")
            model(batch, training=True)
    finally:
        for bn, trainable, momentum in saved:
            bn.trainable = trainable
            bn.momentum = momentum
        for bn, (mean, var) in zip(others, before, strict=True):
            bn.moving_mean.assign(mean)
            bn.moving_variance.assign(var)
    if count == 0:
        raise ValueError("`batches` is empty: no batch to re-estimate the statistics from")
    logger.debug("re-estimated %d batch norms from %d batches", len(layers), count)
    return count
