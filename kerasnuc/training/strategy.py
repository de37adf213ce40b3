"""Distribution strategy and precision policy of a training run (``TrainConfig.strategy``).

The strategy decides where the model's variables live: the model, its losses and its optimizer
must be created inside ``strategy.scope()``; ``keras.Model.fit`` then splits every global batch
of the tf.data pipeline across the replicas and averages the gradients.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator

import keras
import tensorflow as tf

logger = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multiworker")


class _MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """``MultiWorkerMirroredStrategy`` whose ``reduce`` accepts nested values.

    Keras 3 (``fit`` on the TensorFlow backend) reduces the first distributed batch, an
    ``(inputs, {target name: tensor})`` structure, with one ``strategy.reduce`` call to build the
    model symbolically; the collective implementation only takes a single value and fails with
    "Attempt to convert a value (PerReplica...)". Reducing leaf by leaf gives what Keras expects;
    every worker makes the same calls in the same order, as collectives require. Keras also
    reduces its scalar logs (losses, metrics) with ``axis=0``, which a scalar does not have:
    for a scalar, the mean over the replicas is the reduction without an axis.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super()

        def leaf(v):
            local = self.experimental_local_results(v)[0]
            rank = getattr(getattr(local, "shape", None), "rank", None)
            return parent.reduce(reduce_op, v, None if rank == 0 else axis)

        return tf.nest.map_structure(leaf, value)


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
        strategy = _MultiWorkerStrategy()
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


def worker_role() -> tuple[str, int, bool]:
    """``(task type, task index, is chief)`` of this process in ``TF_CONFIG``.

    The chief is the ``chief`` task, or worker 0 when the cluster has no ``chief`` (TensorFlow's
    multi-worker convention). Without ``TF_CONFIG`` the process is a single chief worker.

    Raises:
        ValueError: ``TF_CONFIG`` is not JSON with a ``task`` of ``type`` and ``index``.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return "worker", 0, True
    try:
        tf_config = json.loads(raw)
        task = tf_config["task"]
        kind, index = str(task["type"]), int(task["index"])
        cluster = tf_config.get("cluster", {})
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"TF_CONFIG is not valid ({exc}): {raw[:200]}") from exc
    chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)
    return kind, index, chief


def synchronize_batch_norm(model: keras.Model) -> int:
    """Make every ``BatchNormalization`` layer of ``model`` use the global batch statistics.

    With data parallelism each replica sees part of the global batch; synchronized layers
    all-reduce the batch moments across replicas (and workers), so training matches one device
    with the whole batch and every worker ends with the same moving statistics. Call it inside
    the strategy's scope, before the first training step is traced.

    Returns:
        The number of layers changed.
    """
    changed = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized:
            layer.synchronized = True
            changed += 1
    return changed
