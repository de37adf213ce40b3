"""Lookahead wrapper optimizer and Ranger (RAdam + Lookahead).

Lookahead: Zhang, Lucas, Hinton, Ba, "Lookahead Optimizer: k steps forward, 1 step back",
NeurIPS 2019 (arXiv:1907.08610), Algorithm 1. Ranger: L. Wright (2019), RAdam wrapped in
Lookahead; the `weak` method (Chamanzar & Nie, "Weakly Supervised Multi-Task Learning for Cell
Detection and Segmentation", ISBI 2020) trains with Ranger, lr 1e-3.

The inner optimizer updates the "fast" weights ``theta`` (the model's variables) at every step.
The wrapper keeps one "slow" copy ``phi`` per variable, set to ``theta`` before the first step.
After every ``sync_period``-th step (``t % k == 0``, ``t = 1, 2, ...``)::

    phi   <- phi + slow_step_size * (theta - phi)
    theta <- phi

Implementation notes:

* The slow weights are optimizer variables (saved in ``.keras`` files and checkpoints together with
  the inner optimizer's slots); ``variables`` lists the wrapper's own variables first, then the
  inner optimizer's.
* The sync is computed every step with ``keras.ops.where`` on the iteration counter, not with a
  Python ``if`` or ``ops.cond``: it runs unchanged in ``model.fit``'s compiled train step and in
  JAX's stateless ``stateless_apply``. The cost is a few element-wise operations per weight.
* Slow weights are copied from the model at the wrapper's first step (not at ``build``), so weights
  loaded after ``compile``/``build`` (e.g. a pretrained encoder) are the starting point.
* Learning rate, loss scaling and ``finalize_variable_values`` (EMA) are those of the inner
  optimizer; clipping and weight decay belong on the inner optimizer too.
* Checked by hand (not in the test suite): ``model.fit`` under ``tf.distribute.MirroredStrategy``
  on 2 logical CPUs gives the same weights as one device; the JAX backend (eager and jitted
  ``stateless_apply``) matches the NumPy reference.
"""

from __future__ import annotations

import keras
from keras import ops

from kerasnuc.optimizers.radam import RAdam

_BASE_ARGS = (
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)


@keras.saving.register_keras_serializable(package="kerasnuc")
class Lookahead(keras.optimizers.Optimizer):
    """Lookahead around any Keras optimizer (Zhang et al. 2019).

    Example:
        ``Lookahead(keras.optimizers.Adam(1e-3), sync_period=5, slow_step_size=0.5)``

    Args:
        inner_optimizer: the optimizer of the fast weights, a ``keras.optimizers.Optimizer``
            instance or anything ``keras.optimizers.get`` accepts (``"adam"``, a config dict).
            It must not use ``gradient_accumulation_steps`` (the sync would count calls, not
            updates).
        sync_period: int ``k >= 1``, fast steps between two syncs. Defaults to ``5`` (paper).
        slow_step_size: float ``alpha`` in ``(0, 1]``. Defaults to ``0.5`` (paper).
        name: optional name.
    """

    def __init__(
        self,
        inner_optimizer,
        sync_period=5,
        slow_step_size=0.5,
        name=None,
        **kwargs,
    ):
        unsupported = sorted(set(kwargs) & set(_BASE_ARGS))
        if unsupported:
            raise ValueError(
                f"Lookahead does not take `{unsupported[0]}`: set it on the inner optimizer. "
                f"Received: {unsupported[0]}={kwargs[unsupported[0]]!r}"
            )
        if kwargs:
            raise ValueError(f"Argument(s) not recognized: {kwargs}")
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            inner_optimizer = keras.optimizers.get(inner_optimizer)
        if inner_optimizer.gradient_accumulation_steps:
            raise ValueError(
                "`inner_optimizer` must not use gradient accumulation. Received: "
                f"gradient_accumulation_steps={inner_optimizer.gradient_accumulation_steps}"
            )
        if isinstance(sync_period, bool) or not isinstance(sync_period, int) or sync_period < 1:
            raise ValueError(
                f"`sync_period` must be an int >= 1. Received: sync_period={sync_period!r}"
            )
        valid_alpha = isinstance(slow_step_size, int | float) and not isinstance(
            slow_step_size, bool
        )
        if not valid_alpha or not 0.0 < slow_step_size <= 1.0:
            raise ValueError(
                "`slow_step_size` must be a float in (0, 1]. "
                f"Received: slow_step_size={slow_step_size!r}"
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.sync_period = sync_period
        self.slow_step_size = float(slow_step_size)

    def build(self, var_list):
        """Builds the inner optimizer and one slow weight per variable of ``var_list``."""
        if self.built:
            return
        super().build(var_list)
        self.inner_optimizer.build(var_list)
        self._slow_weights = self.add_optimizer_variables(var_list, "slow")

    @property
    def variables(self):
        return self._variables[:] + self.inner_optimizer.variables

    @property
    def slow_weights(self):
        """The slow weights ``phi``, one per variable the optimizer was built with (or None)."""
        return list(self._slow_weights)

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def apply(self, grads, trainable_variables=None):
        """Inner step on the fast weights, then the Lookahead sync every ``sync_period`` steps.

        Args:
            grads: gradients, one per variable (None entries are skipped by the inner step).
            trainable_variables: the variables; may be omitted once the optimizer is built.
        """
        if len(grads) == 0:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be "
                    "built on a list of variables. Call `optimizer.build(trainable_variables)`."
                )
            variables = self._trainable_variables
        else:
            variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(variables)
            self._check_variables_are_known(variables)
        pairs = [
            (var, self._slow_weights[self._get_variable_index(var)])
            for var in variables
            if self._slow_weights[self._get_variable_index(var)] is not None
        ]

        # Variables are read with convert_to_tensor: jnp.where does not take Keras variables.
        value = ops.convert_to_tensor
        first_step = ops.equal(value(self._iterations), 0)
        for var, slow in pairs:
            self.assign(slow, ops.where(first_step, value(var), value(slow)))

        self.inner_optimizer.apply(grads, trainable_variables)

        sync = ops.equal(ops.mod(value(self._iterations) + 1, self.sync_period), 0)
        for var, slow in pairs:
            fast, old_slow = value(var), value(slow)
            alpha = ops.convert_to_tensor(self.slow_step_size, dtype=fast.dtype)
            new_slow = ops.where(
                sync, ops.add(old_slow, ops.multiply(alpha, ops.subtract(fast, old_slow))), old_slow
            )
            self.assign(slow, new_slow)
            self.assign(var, ops.where(sync, new_slow, fast))
        self._iterations.assign_add(1)

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "sync_period": self.sync_period,
            "slow_step_size": self.slow_step_size,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)


def ranger(
    learning_rate=1e-3,
    beta_1=0.95,
    beta_2=0.999,
    epsilon=1e-5,
    rectify_threshold=5.0,
    weight_decay=None,
    sync_period=6,
    slow_step_size=0.5,
    name="ranger",
    **kwargs,
) -> Lookahead:
    """Ranger = ``Lookahead(RAdam(...))``, with the defaults of Ranger's 2019 release.

    The `weak` paper trains with Ranger [Wright 2019] at lr 1e-3 and gives no other setting; the
    other defaults are those of that release: ``beta_1 = 0.95``, ``epsilon = 1e-5``, RAdam
    threshold 5, Lookahead ``k = 6``, ``alpha = 0.5``.

    Args:
        learning_rate, beta_1, beta_2, epsilon, rectify_threshold, weight_decay: see
            :class:`~kerasnuc.optimizers.radam.RAdam`.
        sync_period, slow_step_size: see :class:`Lookahead`.
        name: name of the Lookahead wrapper.
        **kwargs: other arguments of the inner RAdam (``clipnorm``, ``global_clipnorm``, ...).

    Returns:
        A :class:`Lookahead` wrapping a :class:`~kerasnuc.optimizers.radam.RAdam`; it serializes
        as such (no separate Ranger class is needed to load it).
    """
    inner = RAdam(
        learning_rate=learning_rate,
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        rectify_threshold=rectify_threshold,
        weight_decay=weight_decay,
        **kwargs,
    )
    return Lookahead(inner, sync_period=sync_period, slow_step_size=slow_step_size, name=name)
