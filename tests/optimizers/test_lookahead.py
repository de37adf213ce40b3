"""Lookahead and Ranger against hand-stepped NumPy references (Zhang et al. 2019, Algorithm 1)."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest

from kerasnuc.optimizers.lookahead import Lookahead, ranger
from kerasnuc.optimizers.radam import RAdam
from tests.optimizers.test_radam import radam_step, run_optimizer

# Quadratic f(theta) = 0.5 * sum(A * theta^2), gradient A * theta. Learning rates are powers of 2
# (Keras keeps them in float32).
A = np.array([1.0, 3.0, 0.5, 2.0])
THETA0 = np.array([1.0, -2.0, 3.0, 0.5])


def lookahead_reference(theta0, grad_fn, steps, inner_step, k, alpha):
    """Hand-stepped Lookahead: `inner_step(theta, g, t) -> theta` updates the fast weights.

    Returns the fast-weight trajectory (steps + 1, n) and the slow weights after the last step.
    """
    theta = np.array(theta0, dtype=np.float64)
    phi = theta.copy()
    trajectory = [theta.copy()]
    for t in range(1, steps + 1):
        theta = inner_step(theta, grad_fn(theta), t)
        if t % k == 0:
            phi = phi + alpha * (theta - phi)
            theta = phi.copy()
        trajectory.append(theta.copy())
    return np.stack(trajectory), phi


def sgd_inner(lr):
    return lambda theta, g, t: theta - lr * g


def sgd_momentum_inner(lr, momentum):
    """Keras' SGD with momentum: velocity = momentum * velocity - lr * g; theta += velocity."""
    state = {"velocity": 0.0}

    def step(theta, g, t):
        state["velocity"] = momentum * state["velocity"] - lr * g
        return theta + state["velocity"]

    return step


def radam_inner(lr, **kwargs):
    state = {"m": 0.0, "v": 0.0}

    def step(theta, g, t):
        theta, state["m"], state["v"], _ = radam_step(
            theta, g, state["m"], state["v"], t, lr, **kwargs
        )
        return theta

    return step


def test_reference_by_hand_sgd_k2():
    # f = 0.5 theta^2, SGD lr 0.5: theta halves each fast step. k = 2, alpha = 0.5:
    # t1: theta 1 -> 0.5; t2: theta -> 0.25, phi = 1 + 0.5 (0.25 - 1) = 0.625, theta = 0.625.
    traj, phi = lookahead_reference([1.0], lambda th: th, 2, sgd_inner(0.5), k=2, alpha=0.5)
    np.testing.assert_allclose(traj[:, 0], [1.0, 0.5, 0.625])
    np.testing.assert_allclose(phi, [0.625])


def test_sgd_inner_matches_reference_and_syncs_at_k():
    steps, k, alpha = 11, 3, 0.5
    expected, phi = lookahead_reference(
        THETA0, lambda th: A * th, steps, sgd_inner(0.125), k, alpha
    )
    opt = Lookahead(keras.optimizers.SGD(0.125), sync_period=k, slow_step_size=alpha)
    got = run_optimizer(opt, THETA0, lambda th: A * th, steps)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # After step 9 (a sync) the fast weights equal the slow ones; after 11 they have moved on.
    np.testing.assert_allclose(opt.slow_weights[0].numpy(), phi, rtol=0, atol=1e-12)
    assert not np.allclose(got[-1], phi)
    assert int(opt.iterations.numpy()) == steps
    assert int(opt.inner_optimizer.iterations.numpy()) == steps


def test_sgd_momentum_inner_matches_reference():
    steps, k, alpha = 10, 4, 0.75
    expected, _ = lookahead_reference(
        THETA0, lambda th: A * th, steps, sgd_momentum_inner(0.0625, 0.5), k, alpha
    )
    opt = Lookahead(keras.optimizers.SGD(0.0625, momentum=0.5), sync_period=k, slow_step_size=alpha)
    got = run_optimizer(opt, THETA0, lambda th: A * th, steps)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_ranger_matches_reference_float64():
    # Ranger defaults: RAdam(beta_1 0.95, eps 1e-5, threshold 5), k = 6, alpha = 0.5. The first
    # sync (t = 6) coincides with the first rectified RAdam step.
    steps = 13
    kwargs = {"beta_1": 0.95, "eps": 1e-5, "threshold": 5.0}
    expected, _ = lookahead_reference(
        THETA0, lambda th: A * th, steps, radam_inner(0.125, **kwargs), k=6, alpha=0.5
    )
    got = run_optimizer(ranger(learning_rate=0.125), THETA0, lambda th: A * th, steps)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_ranger_matches_reference_float32():
    steps = 13
    kwargs = {"beta_1": 0.95, "eps": 1e-5, "threshold": 5.0}
    expected, _ = lookahead_reference(
        THETA0, lambda th: A * th, steps, radam_inner(0.0625, **kwargs), k=6, alpha=0.5
    )
    got = run_optimizer(
        ranger(learning_rate=0.0625), THETA0, lambda th: A * th, steps, dtype="float32"
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_slow_weights_start_from_the_weights_at_the_first_step():
    var = keras.Variable(np.zeros(4), dtype="float64")
    opt = Lookahead(keras.optimizers.SGD(0.125), sync_period=2, slow_step_size=0.5)
    opt.build([var])
    var.assign(THETA0)  # e.g. pretrained weights loaded after compile
    for _ in range(4):
        opt.apply([keras.ops.convert_to_tensor(A * var.numpy())], [var])
    expected, _ = lookahead_reference(THETA0, lambda th: A * th, 4, sgd_inner(0.125), 2, 0.5)
    np.testing.assert_allclose(var.numpy(), expected[-1], rtol=0, atol=1e-12)


def test_fit_in_graph_mode_matches_reference():
    # Linear model, full-batch MSE: gradient 2/N X^T (X w - y); each epoch is one step.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    w0 = np.array([[0.5], [-1.0], [0.25]], dtype="float32")
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )
    model.layers[0].kernel.assign(w0)
    k, steps = 3, 7
    model.compile(optimizer=Lookahead(keras.optimizers.SGD(0.125), sync_period=k), loss="mse")
    model.fit(x, y, batch_size=8, epochs=steps, shuffle=False, verbose=0)

    xd, yd = x.astype(np.float64), y.astype(np.float64)
    grad_fn = lambda w: (2.0 / 8.0 * xd.T @ (xd @ w.reshape(3, 1) - yd)).ravel()  # noqa: E731
    expected, _ = lookahead_reference(w0.ravel(), grad_fn, steps, sgd_inner(0.125), k, 0.5)
    np.testing.assert_allclose(model.layers[0].kernel.numpy().ravel(), expected[-1], atol=1e-6)


def test_fit_with_ranger_reduces_loss():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 0.3).astype("float32")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=ranger(learning_rate=0.2), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=8, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]


def test_keras_file_round_trip_restores_slow_weights_and_continues_identically(tmp_path):
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4, "tanh"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=ranger(learning_rate=0.01, sync_period=3), loss="mse")
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # 4 steps: one sync
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: registered classes

    assert isinstance(loaded.optimizer, Lookahead)
    assert isinstance(loaded.optimizer.inner_optimizer, RAdam)
    assert loaded.optimizer.sync_period == 3
    assert loaded.optimizer.inner_optimizer.beta_1 == 0.95
    assert int(loaded.optimizer.iterations.numpy()) == 4
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Slow weights are not the fast weights mid-cycle, and both were restored.
    assert not np.allclose(model.optimizer.slow_weights[0].numpy(), model.weights[0].numpy())

    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-7)


def test_serialize_deserialize_round_trip():
    opt = Lookahead(keras.optimizers.Adam(0.003, beta_1=0.8), sync_period=7, slow_step_size=0.25)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, Lookahead)
    assert restored.sync_period == 7
    assert restored.slow_step_size == 0.25
    assert isinstance(restored.inner_optimizer, keras.optimizers.Adam)
    assert restored.inner_optimizer.beta_1 == 0.8
    assert float(restored.learning_rate.numpy()) == pytest.approx(0.003)
    assert keras.saving.get_registered_name(Lookahead) == "kerasnuc>Lookahead"


def test_learning_rate_is_the_inner_one():
    opt = Lookahead("adam")
    assert isinstance(opt.inner_optimizer, keras.optimizers.Adam)
    opt.learning_rate = 0.25
    assert float(opt.inner_optimizer.learning_rate.numpy()) == 0.25
    assert float(opt.learning_rate.numpy()) == 0.25


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sync_period": 0}, "`sync_period` must be an int >= 1. Received: sync_period=0"),
        ({"slow_step_size": 1.5}, "`slow_step_size` must be a float in (0, 1]."),
        ({"slow_step_size": 0.0}, "Received: slow_step_size=0.0"),
        ({"clipnorm": 1.0}, "Lookahead does not take `clipnorm`: set it on the inner optimizer"),
    ],
)
def test_argument_checks(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Lookahead(keras.optimizers.SGD(0.1), **kwargs)


def test_rejects_inner_gradient_accumulation():
    with pytest.raises(ValueError, match="gradient accumulation"):
        Lookahead(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2))
