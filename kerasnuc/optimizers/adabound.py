"""AdaBound / AMSBound optimizer (Luo et al. 2019, "Adaptive Gradient Methods with Dynamic Bound
of Learning Rate", ICLR), the optimizer of U-Net# (Stagys et al., Table I: lr 1e-4, betas
(0.9, 0.999), final lr 0.1, gamma 1e-3, eps 1e-8, weight decay 0).

Step ``t`` (1-based) of the reference PyTorch implementation (``Luolc/AdaBound``,
``adabound.AdaBound``), which this class reproduces:

    g     = grad + weight_decay * w                       (coupled L2, as the reference)
    m     = beta_1 * m + (1 - beta_1) * g
    v     = beta_2 * v + (1 - beta_2) * g**2              (AMSBound: v_hat = max(v_hat, v))
    step  = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)    (Adam's bias correction, folded into
                                                           the step size; eps is added to the
                                                           uncorrected sqrt(v))
    final = final_lr * lr / base_lr                       (a learning-rate schedule also scales
                                                           the SGD limit)
    lower = final * (1 - 1 / (gamma * t + 1))
    upper = final * (1 + 1 / (gamma * t))
    w     = w - clip(step / (sqrt(v) + eps), lower, upper) * m

The bounds start at ``[0, inf)`` (Adam) and both converge to ``final`` (SGD with learning rate
``final``) at a speed set by ``gamma``.
"""

from __future__ import annotations

import keras
from keras import ops


def _initial_learning_rate(learning_rate) -> float:
    """The value of a float, schedule (at step 0) or callable learning rate."""
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        return float(ops.convert_to_numpy(learning_rate(0)))
    if callable(learning_rate):
        return float(ops.convert_to_numpy(learning_rate()))
    return float(learning_rate)


@keras.saving.register_keras_serializable(package="kerasnuc")
class AdaBound(keras.optimizers.Optimizer):
    """AdaBound (Luo et al. 2019): Adam with per-parameter step sizes clipped to bounds that
    converge to an SGD learning rate ``final_lr``. The update is spelled out in the module
    docstring.

    Args:
        learning_rate: Float, ``LearningRateSchedule`` or callable. Default 1e-4 (U-Net#).
        final_lr: The SGD learning rate the bounds converge to. Default 0.1.
        beta_1: Decay of the first moment. Default 0.9.
        beta_2: Decay of the second moment. Default 0.999.
        gamma: Convergence speed of the bounds. Default 1e-3.
        epsilon: Added to ``sqrt(v)``. Default 1e-8.
        weight_decay: L2 coefficient added to the gradient (coupled, as the reference
            ``AdaBound``; not Keras' decoupled decay). ``exclude_from_weight_decay`` applies.
            Default 0 (U-Net#).
        amsbound: Use the running maximum of ``v`` (AMSBound).
        base_learning_rate: The learning rate that ``final_lr`` refers to (the reference's
            ``base_lr``); the SGD limit is ``final_lr * lr / base_learning_rate``. Default: the
            initial value of ``learning_rate``.
        **kwargs: Other ``keras.optimizers.Optimizer`` arguments (``clipnorm``, ``use_ema``,
            ``gradient_accumulation_steps``, ``name``, ...).
    """

    def __init__(
        self,
        learning_rate=1e-4,
        final_lr=0.1,
        beta_1=0.9,
        beta_2=0.999,
        gamma=1e-3,
        epsilon=1e-8,
        weight_decay=0.0,
        amsbound=False,
        base_learning_rate=None,
        name="adabound",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs
        )
        for key, value, valid, expected in (
            ("final_lr", final_lr, lambda x: x > 0, "> 0"),
            ("beta_1", beta_1, lambda x: 0 <= x < 1, "in [0, 1)"),
            ("beta_2", beta_2, lambda x: 0 <= x < 1, "in [0, 1)"),
            ("gamma", gamma, lambda x: x > 0, "> 0"),
            ("epsilon", epsilon, lambda x: x >= 0, ">= 0"),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not valid(value):
                raise ValueError(f"`{key}` must be a float {expected}. Received: {key}={value!r}")
        if weight_decay is not None and (
            isinstance(weight_decay, bool)
            or not isinstance(weight_decay, int | float)
            or weight_decay < 0
        ):
            raise ValueError(
                f"`weight_decay` must be a float >= 0. Received: weight_decay={weight_decay!r}"
            )
        if base_learning_rate is None:
            base_learning_rate = _initial_learning_rate(learning_rate)
        if not base_learning_rate > 0:
            raise ValueError(
                "`base_learning_rate` must be > 0. "
                f"Received: base_learning_rate={base_learning_rate!r}"
            )
        self.final_lr = float(final_lr)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.gamma = float(gamma)
        self.epsilon = float(epsilon)
        self.amsbound = bool(amsbound)
        self.base_learning_rate = float(base_learning_rate)

    def build(self, var_list):
        """Creates the first and second moment slots (and the AMSBound maximum)."""
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )
        if self.amsbound:
            self._velocity_hats = self.add_optimizer_variables(var_list, "velocity_hat")

    def _apply_weight_decay(self, variables):
        # The reference AdaBound adds weight decay to the gradient (see `update_step`) instead
        # of Keras' decoupled decay applied here by the base class.
        return

    def update_step(self, gradient, variable, learning_rate):
        """One AdaBound step on ``variable`` (see the module docstring)."""
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        v = self._velocities[index]

        if self.weight_decay and self._use_weight_decay(variable):
            gradient = gradient + ops.convert_to_tensor(self.weight_decay, dtype) * variable

        self.assign(m, self.beta_1 * m + (1.0 - self.beta_1) * gradient)
        self.assign(v, self.beta_2 * v + (1.0 - self.beta_2) * ops.square(gradient))
        if self.amsbound:
            v_hat = self._velocity_hats[index]
            self.assign(v_hat, ops.maximum(v_hat, v))
            v = v_hat
        denom = ops.sqrt(v) + self.epsilon

        # convert_to_tensor(value, dtype), not cast: a cast would round 0.999 to float32 first.
        bias_1 = 1.0 - ops.power(ops.convert_to_tensor(self.beta_1, dtype), step)
        bias_2 = 1.0 - ops.power(ops.convert_to_tensor(self.beta_2, dtype), step)
        step_size = lr * ops.sqrt(bias_2) / bias_1

        final_lr = self.final_lr * lr / self.base_learning_rate
        lower = final_lr * (1.0 - 1.0 / (self.gamma * step + 1.0))
        upper = final_lr * (1.0 + 1.0 / (self.gamma * step))
        bounded = ops.minimum(ops.maximum(step_size / denom, lower), upper)
        self.assign_sub(variable, bounded * m)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "final_lr": self.final_lr,
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "gamma": self.gamma,
                "epsilon": self.epsilon,
                "amsbound": self.amsbound,
                "base_learning_rate": self.base_learning_rate,
            }
        )
        return config
