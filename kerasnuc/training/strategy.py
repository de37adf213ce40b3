"""Distribution strategy and precision policy of a training run (``TrainConfig.strategy``).

The strategy decides where the model's variables live: the model, its losses and its optimizer
must be created inside ``strategy.scope()``; ``keras.Model.fit`` then splits every global batch
of the tf.data pipeline across the replicas and averages the gradients.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import keras
import tensorflow as tf

logger = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multiworker")


def get_strategy(name: str = "default") -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy called ``name``.

    Args:
        name: ``"default"`` (one device, no distribution), ``"mirrored"`` (synchronous data
            parallelism over the local GPUs, or the logical CPU devices when there is no GPU)
            or ``"multiworker"`` (``MultiWorkerMirroredStrategy``, configured by the
            ``TF_CONFIG`` environment variable).

    Returns:
        The strategy; its ``num_replicas_in_sync`` replicas share each global batch.

    Raises:
        ValueError: unknown ``name``.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif name == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        raise ValueError(
            f"`strategy` must be one of {list(STRATEGIES)}. Received: strategy={name!r}"
        )
    logger.info("%s strategy with %d replicas", name, strategy.num_replicas_in_sync)
    return strategy


@contextlib.contextmanager
def precision_policy(mixed_precision: bool) -> Iterator[None]:
    """Set the global Keras dtype policy for the block and restore the previous one after it.

    Args:
        mixed_precision: ``"mixed_float16"`` (float16 compute, float32 variables; the conic heads
            compute their softmax in float32, so model outputs stay float32) instead of
            ``"float32"``. ``compile`` then wraps the optimizer in a
            ``keras.optimizers.LossScaleOptimizer``.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16" if mixed_precision else "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
