"""RAdam against a NumPy transcription of Algorithm 2 of Liu et al. (2020)."""

from __future__ import annotations

import math
import re

import keras
import numpy as np
import pytest

from kerasnuc.optimizers.radam import RAdam

# Quadratic f(theta) = 0.5 * sum(A * theta^2), gradient A * theta.
A = np.array([1.0, 3.0, 0.5, 2.0])
THETA0 = np.array([1.0, -2.0, 3.0, 0.5])
# Learning rates and weight decays below are powers of 2: Keras keeps them in float32, so other
# values would differ from the float64 reference by ~1e-9.


def radam_step(theta, g, m, v, t, lr, beta_1=0.9, beta_2=0.999, eps=1e-7, threshold=5.0, wd=0.0):
    """One hand-written RAdam step (paper Algorithm 2, epsilon added to sqrt(v)), float64.

    Returns (theta, m, v, rectified).
    """
    theta = theta - lr * wd * theta  # decoupled weight decay, before the step
    m = beta_1 * m + (1.0 - beta_1) * g
    v = beta_2 * v + (1.0 - beta_2) * g * g
    m_hat = m / (1.0 - beta_1**t)
    rho_inf = 2.0 / (1.0 - beta_2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta_2**t / (1.0 - beta_2**t)
    if rho_t > threshold:
        r_t = math.sqrt(
            (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
        )
        l_t = math.sqrt(1.0 - beta_2**t) / (np.sqrt(v) + eps)
        return theta - lr * r_t * m_hat * l_t, m, v, True
    return theta - lr * m_hat, m, v, False


def radam_reference(theta0, grad_fn, steps, lr, **kwargs):
    """Runs `radam_step` on `grad_fn`; returns the trajectory (steps + 1, n) and the switches."""
    theta = np.array(theta0, dtype=np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    trajectory, rectified = [theta.copy()], []
    for t in range(1, steps + 1):
        theta, m, v, rect = radam_step(theta, grad_fn(theta), m, v, t, lr, **kwargs)
        trajectory.append(theta.copy())
        rectified.append(rect)
    return np.stack(trajectory), rectified


def run_optimizer(optimizer, theta0, grad_fn, steps, dtype="float64"):
    """Steps `optimizer` eagerly on one variable with gradients from `grad_fn`."""
    var = keras.Variable(np.asarray(theta0), dtype=dtype)
    trajectory = [np.array(var.numpy(), dtype=np.float64)]
    for _ in range(steps):
        grad = keras.ops.convert_to_tensor(grad_fn(np.array(var.numpy())), dtype=dtype)
        optimizer.apply([grad], [var])
        trajectory.append(np.array(var.numpy(), dtype=np.float64))
    return np.stack(trajectory)


def test_reference_switches_at_step_6_with_threshold_5_and_step_5_with_4():
    # rho_t for beta_2 = 0.999: rho_5 = 4.996, rho_6 = 5.995 (hand: rho_t ~ t - t(t-1)/2000).
    _, rect5 = radam_reference(THETA0, lambda th: A * th, 8, lr=0.125, threshold=5.0)
    _, rect4 = radam_reference(THETA0, lambda th: A * th, 8, lr=0.125, threshold=4.0)
    assert rect5 == [False] * 5 + [True] * 3
    assert rect4 == [False] * 4 + [True] * 4


@pytest.mark.parametrize("threshold", [5.0, 4.0])
def test_matches_reference_float64(threshold):
    steps = 12
    expected, _ = radam_reference(THETA0, lambda th: A * th, steps, lr=0.125, threshold=threshold)
    got = run_optimizer(
        RAdam(learning_rate=0.125, rectify_threshold=threshold), THETA0, lambda th: A * th, steps
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_first_steps_are_momentum_steps_by_hand():
    # Step 1: m_hat = g, so theta_1 = theta_0 - lr * A * theta_0 exactly.
    got = run_optimizer(RAdam(learning_rate=0.125), THETA0, lambda th: A * th, 1)
    np.testing.assert_allclose(got[1], THETA0 - 0.125 * A * THETA0, rtol=0, atol=1e-12)


def test_matches_reference_float32():
    steps = 10
    expected, _ = radam_reference(
        THETA0, lambda th: A * th, steps, lr=0.0625, beta_1=0.95, eps=1e-5
    )
    got = run_optimizer(
        RAdam(learning_rate=0.0625, beta_1=0.95, epsilon=1e-5),
        THETA0,
        lambda th: A * th,
        steps,
        dtype="float32",
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_decoupled_weight_decay_matches_reference():
    steps = 8
    expected, _ = radam_reference(THETA0, lambda th: A * th, steps, lr=0.125, wd=0.0078125)
    got = run_optimizer(
        RAdam(learning_rate=0.125, weight_decay=0.0078125), THETA0, lambda th: A * th, steps
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_small_beta_2_never_rectifies():
    # beta_2 = 0.6: rho_inf = 4 <= threshold, so every step is the momentum step.
    steps = 6
    expected, rect = radam_reference(THETA0, lambda th: A * th, steps, lr=0.125, beta_2=0.6)
    assert not any(rect)
    got = run_optimizer(RAdam(learning_rate=0.125, beta_2=0.6), THETA0, lambda th: A * th, steps)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_fit_reduces_loss():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 0.3).astype("float32")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=RAdam(learning_rate=0.05), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=8, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]


def test_serialization_round_trip():
    opt = RAdam(learning_rate=0.002, beta_1=0.8, epsilon=1e-6, rectify_threshold=4.0)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, RAdam)
    config = restored.get_config()
    assert config["beta_1"] == 0.8
    assert config["rectify_threshold"] == 4.0
    assert config["epsilon"] == 1e-6
    assert config["learning_rate"] == pytest.approx(0.002)
    assert keras.saving.get_registered_name(RAdam) == "kerasnuc>RAdam"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta_1": 1.0}, "`beta_1` must be a float in [0.0, 1.0)"),
        ({"beta_2": 0.0}, "`beta_2` must be a float in (0.0, 1.0)"),
        ({"epsilon": -1e-3}, "`epsilon`"),
        ({"rectify_threshold": 3.0}, "Received: rectify_threshold=3.0"),
    ],
)
def test_argument_checks(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RAdam(**kwargs)
