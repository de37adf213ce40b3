"""Combining the task losses of a multi-task model: the cyclic scheduler and its alternatives.

`weak` method (Chamanzar & Nie, "Weakly Supervised Multi-Task Learning for Cell Detection and
Segmentation", ISBI 2020, Eq. 4). Three modes, chosen by name for ablations:

* ``"cyclic"`` (the paper's multi-task scheduler): training iteration ``i`` uses only the loss of
  task ``tasks[i % len(tasks)]``. With the default ``tasks = ("voronoi", "repel", "cluster")``
  this is Eq. 4: Voronoi if ``i % 3 == 0``, repel if ``i % 3 == 1``, clustering if ``i % 3 == 2``.
* ``"sum"``: the plain sum of all task losses (Qu et al. 2019, the paper's baseline).
* ``"uncertainty"``: homoscedastic task-uncertainty weighting, Kendall, Gal & Cipolla, CVPR 2018,
  Eq. 7 and 10, with one trainable log-variance ``s_k = log sigma_k^2`` per task::

      total = sum_{k regression}     0.5 exp(-s_k) L_k + 0.5 s_k
            + sum_{k classification}     exp(-s_k) L_k + 0.5 s_k

  i.e. ``1 / (2 sigma^2) L + log sigma`` for a Gaussian likelihood (the repel MSE) and
  ``1 / sigma^2 L + log sigma`` for a softmax likelihood (the two cross-entropies). The
  ``s_k`` start at 0 and are learned with the model; they are the layer's trainable weights, so
  the layer must be tracked by the model (e.g. as an attribute of a ``keras.Model`` subclass) or
  its ``trainable_variables`` passed to the optimizer.

The iteration index may be a tensor (``optimizer.iterations`` inside a compiled train step): the
selection uses ``keras.ops`` (``take`` on ``i % n``), never a Python ``if`` on a tensor, and only
the selected loss receives a gradient.
"""

from __future__ import annotations

import keras
from keras import ops

MODES = ("cyclic", "sum", "uncertainty")
"""Names accepted by :class:`MultiTaskLoss`'s ``mode``."""
WEAK_TASKS = ("voronoi", "repel", "cluster")
"""Task order of the `weak` paper's scheduler (Eq. 4)."""


@keras.saving.register_keras_serializable(package="kerasnuc")
class MultiTaskLoss(keras.layers.Layer):
    """Combines named task losses into one training loss.

    Args:
        mode: ``"cyclic"`` (paper), ``"sum"`` or ``"uncertainty"`` (see the module docstring).
        tasks: task names in scheduling order; the keys of the loss dict. Defaults to
            ``WEAK_TASKS = ("voronoi", "repel", "cluster")``.
        regression_tasks: tasks whose loss is a regression (Gaussian likelihood, factor 0.5 on
            ``exp(-s_k) L_k``) in ``"uncertainty"`` mode; the others count as classification.
            Defaults to ``("repel",)``.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``; the dtype defaults to
            ``"float32"`` whatever the global policy, losses are combined in float32).

    Call arguments:
        losses: dict ``{task: scalar float tensor}`` holding every task of ``tasks``.
        iteration: 0-based training iteration, int scalar (Python int or tensor, e.g.
            ``optimizer.iterations`` read before the update), passed by keyword when calling
            the layer (Keras takes only tensors positionally; :meth:`combine` takes it either
            way). Only used by ``"cyclic"``.

    Returns:
        Scalar float tensor, the total loss.

    Weights:
        ``log_variances``: ``(len(tasks),)`` float32, trainable, zeros at start, present only in
        ``"uncertainty"`` mode.
    """

    def __init__(
        self,
        mode="cyclic",
        tasks=WEAK_TASKS,
        regression_tasks=("repel",),
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
        tasks = tuple(tasks)
        if not tasks or not all(isinstance(t, str) for t in tasks) or len(set(tasks)) != len(tasks):
            raise ValueError(
                f"`tasks` must be a non-empty list of distinct strings. Received: tasks={tasks!r}"
            )
        regression_tasks = tuple(regression_tasks)
        unknown = [t for t in regression_tasks if t not in tasks]
        if unknown:
            raise ValueError(
                f"`regression_tasks` must be a subset of `tasks` {tasks}. "
                f"Received: regression_tasks={regression_tasks!r}"
            )
        self.mode = mode
        self.tasks = tasks
        self.regression_tasks = regression_tasks
        self.log_variances = None
        if mode == "uncertainty":
            self.log_variances = self.add_weight(
                shape=(len(tasks),),
                initializer="zeros",
                trainable=True,
                name="log_variances",
            )
        self.built = True

    def call(self, losses, iteration=0):
        missing = [t for t in self.tasks if t not in losses]
        if missing:
            raise ValueError(
                f"`losses` lacks the task(s) {missing}. Received keys: {sorted(losses)}"
            )
        stacked = ops.stack(
            [ops.cast(ops.reshape(losses[t], ()), self.compute_dtype) for t in self.tasks]
        )
        if self.mode == "sum":
            return ops.sum(stacked)
        if self.mode == "cyclic":
            return ops.take(stacked, self._index(iteration))
        s = ops.cast(self.log_variances, self.compute_dtype)
        return ops.sum(self._factors() * ops.exp(-s) * stacked + 0.5 * s)

    def _factors(self):
        """0.5 for regression tasks, 1 for classification tasks (Kendall et al. Eq. 7)."""
        return ops.convert_to_tensor(
            [0.5 if t in self.regression_tasks else 1.0 for t in self.tasks], self.compute_dtype
        )

    def _index(self, iteration):
        """``iteration % len(tasks)`` as an int32 scalar tensor."""
        return ops.cast(ops.mod(iteration, len(self.tasks)), "int32")

    def combine(self, losses, iteration=0):
        """Same as calling the layer: ``total = combine({task: loss}, iteration)``."""
        return self(losses, iteration=iteration)

    def weights_for(self, iteration=0):
        """Effective weight of each task's loss at ``iteration``.

        Returns:
            ``(len(tasks),)`` float tensor: the one-hot of ``iteration % len(tasks)`` for
            ``"cyclic"``, ones for ``"sum"``, ``factor_k * exp(-s_k)`` for ``"uncertainty"``.
        """
        n = len(self.tasks)
        if self.mode == "sum":
            return ops.ones((n,), self.compute_dtype)
        if self.mode == "cyclic":
            return ops.one_hot(self._index(iteration), n, dtype=self.compute_dtype)
        return self._factors() * ops.exp(-ops.cast(self.log_variances, self.compute_dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "mode": self.mode,
                "tasks": list(self.tasks),
                "regression_tasks": list(self.regression_tasks),
            }
        )
        return config
