"""Rectified Adam (RAdam).

Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020
(arXiv:1908.03265), Algorithm 2. Used by the `weak` method (Chamanzar & Nie, ISBI 2020) inside
Ranger (RAdam + Lookahead, see :mod:`kerasnuc.optimizers.lookahead`).

At step ``t = 1, 2, ...`` with gradient ``g_t``::

    m_t     = beta_1 m_{t-1} + (1 - beta_1) g_t
    v_t     = beta_2 v_{t-1} + (1 - beta_2) g_t^2
    m_hat   = m_t / (1 - beta_1^t)
    rho_inf = 2 / (1 - beta_2) - 1
    rho_t   = rho_inf - 2 t beta_2^t / (1 - beta_2^t)
    if rho_t > rectify_threshold:                       (variance is tractable: adaptive step)
        r_t   = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
        theta = theta - lr r_t m_hat sqrt(1 - beta_2^t) / (sqrt(v_t) + epsilon)
    else:                                               (un-adapted momentum step)
        theta = theta - lr m_hat

Our choices where the paper leaves room:

* ``rectify_threshold`` defaults to 5 with a strict ``>``, as in the authors' released code, in
  ``torch.optim.RAdam`` and in Ranger (the optimiser of the `weak` paper); Algorithm 2 of the paper
  writes 4, the smallest value for which ``r_t`` is defined. With ``beta_2 = 0.999`` the first 5
  steps are un-rectified with threshold 5 (``rho_5 = 4.996``), the first 4 with threshold 4.
* ``epsilon`` is added to ``sqrt(v_t)`` (the "epsilon hat" convention of Keras' Adam); the paper's
  ``l_t = sqrt((1 - beta_2^t) / v_t)`` has no epsilon.
* Weight decay is Keras' built-in decoupled decay (``theta <- theta - lr * weight_decay * theta``
  before the step, as in AdamW and ``torch.optim.RAdam(decoupled_weight_decay=True)``).
* ``1 - beta_2^t`` is computed as ``-expm1(t log beta_2)`` so that ``rho_t`` keeps about 4 correct
  decimals in float32 (a plain ``1 - beta_2**t`` can move ``rho_5`` across the threshold).
"""

from __future__ import annotations

import math

import keras
from keras import ops


def _check_float(name: str, value: object, low: float, high: float, low_open: bool = True) -> float:
    """Returns ``value`` as a float after checking ``low < value < high`` (``<=`` if not open)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (value > low if low_open else value >= low) and value < high
    if not ok:
        left = "(" if low_open else "["
        raise ValueError(
            f"`{name}` must be a float in {left}{low}, {high}). Received: {name}={value!r}"
        )
    return value


def _constant(value: float, dtype: str):
    """A Python float as a tensor of ``dtype``, without a float32 detour (exact in float64)."""
    return ops.convert_to_tensor(value, dtype=dtype)


@keras.saving.register_keras_serializable(package="kerasnuc")
class RAdam(keras.optimizers.Optimizer):
    """Rectified Adam optimizer (Liu et al. 2020), see the module docstring for the update.

    Args:
        learning_rate: float, ``LearningRateSchedule`` or callable; the step size ``alpha_t``.
            Defaults to ``1e-3``.
        beta_1: float in ``[0, 1)``, decay of the first moment. Defaults to ``0.9``.
        beta_2: float in ``(0, 1)``, decay of the second moment. Defaults to ``0.999``.
        epsilon: float ``>= 0`` added to ``sqrt(v_t)``. Defaults to ``1e-7`` (Keras' Adam).
        rectify_threshold: float ``>= 4``; the adaptive (rectified) step is used when
            ``rho_t > rectify_threshold``, otherwise the momentum step. Defaults to ``5.0``.
        weight_decay: float or None; decoupled weight decay (Keras' base optimizer argument).
        **kwargs: the other base optimizer arguments (``clipnorm``, ``global_clipnorm``,
            ``use_ema``, ``gradient_accumulation_steps``, ``name``, ...).
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        rectify_threshold=5.0,
        weight_decay=None,
        name=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs
        )
        self.beta_1 = _check_float("beta_1", beta_1, 0.0, 1.0, low_open=False)
        self.beta_2 = _check_float("beta_2", beta_2, 0.0, 1.0)
        self.epsilon = _check_float("epsilon", epsilon, 0.0, math.inf, low_open=False)
        self.rectify_threshold = _check_float(
            "rectify_threshold", rectify_threshold, 4.0, math.inf, low_open=False
        )

    @property
    def rho_inf(self) -> float:
        """Maximum length of the approximated simple moving average, ``2 / (1 - beta_2) - 1``."""
        return 2.0 / (1.0 - self.beta_2) - 1.0

    def build(self, var_list):
        """Creates the first and second moment slots (``m``, ``v``) for ``var_list``."""
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )

    def update_step(self, gradient, variable, learning_rate):
        """One RAdam step for one variable (see the module docstring)."""
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        t = ops.cast(self.iterations + 1, dtype)
        beta_1 = _constant(self.beta_1, dtype)
        beta_2 = _constant(self.beta_2, dtype)

        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1.0 - beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1.0 - beta_2))

        # Scalars of step t: bias corrections, rho_t, rectification r_t.
        t_log_beta_2 = ops.multiply(t, _constant(math.log(self.beta_2), dtype))
        one_minus_beta_2_t = ops.negative(ops.expm1(t_log_beta_2))
        beta_2_t = ops.exp(t_log_beta_2)
        one_minus_beta_1_t = ops.subtract(1.0, ops.power(beta_1, t))
        rho_inf = self.rho_inf
        rho_t = ops.subtract(
            _constant(rho_inf, dtype),
            ops.divide(ops.multiply(2.0 * t, beta_2_t), one_minus_beta_2_t),
        )
        rectified = ops.greater(rho_t, _constant(self.rectify_threshold, dtype))
        # rho_inf / ((rho_inf - 4)(rho_inf - 2)); 0 when rho_inf never passes the threshold.
        if rho_inf > self.rectify_threshold:
            r_const = rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0))
        else:
            r_const = 0.0
        r_sq = ops.divide(
            ops.multiply(ops.subtract(rho_t, 4.0), ops.subtract(rho_t, 2.0)), rho_t
        ) * _constant(r_const, dtype)
        r_t = ops.sqrt(ops.maximum(r_sq, 0.0))

        adaptive_step = ops.divide(
            ops.multiply(lr, ops.multiply(r_t, ops.sqrt(one_minus_beta_2_t))), one_minus_beta_1_t
        )
        momentum_step = ops.divide(lr, one_minus_beta_1_t)
        step = ops.where(rectified, adaptive_step, momentum_step)
        denom = ops.where(rectified, ops.add(ops.sqrt(v), _constant(self.epsilon, dtype)), 1.0)
        self.assign_sub(variable, ops.divide(ops.multiply(m, step), denom))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "rectify_threshold": self.rectify_threshold,
            }
        )
        return config
