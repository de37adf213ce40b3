"""Tests for kerasnuc.optimizers.adabound.AdaBound against a hand-stepped NumPy reference."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasnuc.optimizers.adabound import AdaBound

# Quadratic f(w) = 0.5 * sum(a * w**2) + sum(b * w); gradient a * w + b. The curvatures span six
# orders of magnitude so that some coordinates hit the lower and others the upper bound.
A = np.array([50.0, 1.0, 1e-2, 1e-6, 3.0])
B = np.array([1.0, -0.5, 1e-3, 0.0, 0.0])
W0 = np.array([1.0, -2.0, 0.5, 3.0, 0.25])


def _grad(w):
    return A * w + B


def adabound_reference(
    w,
    steps,
    lr=1e-4,
    final_lr=0.1,
    betas=(0.9, 0.999),
    gamma=1e-3,
    eps=1e-8,
    weight_decay=0.0,
    amsbound=False,
    lrs=None,
    grads=None,
):
    """AdaBound, Algorithm 2 of Luo et al. 2019 with the step size of their PyTorch code.

    ``lrs`` gives the learning rate of each step (a schedule), ``grads`` fixed gradients per step
    instead of those of the quadratic. Returns the iterates and, per step, whether any coordinate
    hit the lower / upper bound.
    """
    beta1, beta2 = betas
    w = np.array(w, dtype=np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    v_max = np.zeros_like(w)
    iterates, hit_lower, hit_upper = [], [], []
    for t in range(1, steps + 1):
        lr_t = lr if lrs is None else lrs[t - 1]
        g = (_grad(w) if grads is None else grads[t - 1]) + weight_decay * w
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_max = np.maximum(v_max, v)
        denom = np.sqrt(v_max if amsbound else v) + eps
        step_size = lr_t * np.sqrt(1 - beta2**t) / (1 - beta1**t)
        final = final_lr * lr_t / lr
        lower = final * (1 - 1 / (gamma * t + 1))
        upper = final * (1 + 1 / (gamma * t))
        eta = step_size / denom
        hit_lower.append(bool(np.any(eta < lower)))
        hit_upper.append(bool(np.any(eta > upper)))
        w = w - np.clip(eta, lower, upper) * m
        iterates.append(w.copy())
    return iterates, hit_lower, hit_upper


def _run_keras(optimizer, steps, dtype, grads=None):
    w = keras.Variable(W0.astype(dtype), dtype=dtype)
    out = []
    for t in range(steps):
        g = _grad(keras.ops.convert_to_numpy(w).astype(np.float64)) if grads is None else grads[t]
        g = g.astype(dtype)
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), w)])
        out.append(keras.ops.convert_to_numpy(w).astype(np.float64))
    return out


# Learning rates other than the paper's are powers of two: Keras stores the learning rate in a
# float32 variable, and these are exact there, so float64 runs can be compared tightly.
CASES = {
    "paper_defaults": {},
    "fast_bounds": {"lr": 2**-4, "final_lr": 0.02, "gamma": 0.5},
    "amsbound": {"lr": 2**-4, "final_lr": 0.02, "gamma": 0.5, "amsbound": True},
    "weight_decay": {"lr": 2**-7, "final_lr": 0.1, "gamma": 0.1, "weight_decay": 0.3},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_numpy_reference(case, dtype):
    kwargs = CASES[case]
    steps = 5
    expected, _, _ = adabound_reference(W0, steps, **kwargs)
    optimizer = AdaBound(
        learning_rate=kwargs.get("lr", 1e-4),
        final_lr=kwargs.get("final_lr", 0.1),
        gamma=kwargs.get("gamma", 1e-3),
        weight_decay=kwargs.get("weight_decay", 0.0),
        amsbound=kwargs.get("amsbound", False),
    )
    got = _run_keras(optimizer, steps, dtype)
    # float64: the paper's lr 1e-4 is rounded to float32 by Keras (relative error ~1e-9).
    tol = 1e-8 if dtype == "float64" else 1e-6
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(g, e, rtol=tol, atol=tol, err_msg=f"step {step + 1}")


def test_reference_cases_exercise_both_bounds():
    # Guards the test above: the bound clipping is really active in the compared runs.
    _, lower, upper = adabound_reference(W0, 5)
    assert any(lower) and any(upper)
    _, lower, upper = adabound_reference(W0, 5, **CASES["fast_bounds"])
    assert any(lower) and any(upper)


def test_amsbound_with_shrinking_gradients():
    # v only decreases (and AMSBound's running max only matters) when gradients shrink fast.
    grads = [np.full(5, 1.0), *[np.full(5, 1e-3)] * 4]
    kwargs = {"lr": 2**-4, "final_lr": 0.1, "gamma": 1e-3}
    plain, _, _ = adabound_reference(W0, 5, grads=grads, **kwargs)
    ams, _, _ = adabound_reference(W0, 5, grads=grads, amsbound=True, **kwargs)
    assert not np.allclose(plain[-1], ams[-1], rtol=1e-4)
    optimizer = AdaBound(learning_rate=2**-4, final_lr=0.1, gamma=1e-3, amsbound=True)
    got = _run_keras(optimizer, 5, "float64", grads=grads)
    np.testing.assert_allclose(got, ams, rtol=1e-12, atol=1e-12)


def test_schedule_scales_final_lr():
    high, low = 2**-4, 2**-6
    lrs = [high, high, high, low, low]  # the schedule sees the 0-based iteration count
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [high, low])
    expected, _, _ = adabound_reference(W0, 5, lr=high, final_lr=0.02, gamma=0.5, lrs=lrs)
    optimizer = AdaBound(learning_rate=schedule, final_lr=0.02, gamma=0.5)
    assert optimizer.base_learning_rate == high
    got = _run_keras(optimizer, 5, "float64")
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_weight_decay_is_coupled_not_decoupled():
    # Keras' decoupled decay would subtract lr * wd * w outside the bounded step; AdaBound's
    # reference adds wd * w to the gradient. The NumPy reference has the coupled form.
    expected, _, _ = adabound_reference(W0, 1, lr=2**-7, weight_decay=0.3)
    got = _run_keras(AdaBound(learning_rate=2**-7, weight_decay=0.3), 1, "float64")
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-12)


def test_trains_tiny_model(rng):
    keras.utils.set_random_seed(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.5).astype("float32")[:, None]
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=AdaBound(learning_rate=1e-2, final_lr=0.1), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=20, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]


def test_config_round_trip_and_save(tmp_path, rng):
    optimizer = AdaBound(learning_rate=3e-4, final_lr=0.05, gamma=2e-3, amsbound=True)
    config = optimizer.get_config()
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, AdaBound)
    assert restored.get_config() == config
    assert config["base_learning_rate"] == pytest.approx(3e-4)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(rng.normal(size=(8, 3)), rng.normal(size=(8, 1)), epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, AdaBound)
    assert int(loaded.optimizer.iterations) == 1
    assert loaded.optimizer.amsbound


def test_argument_checks():
    with pytest.raises(ValueError, match="`final_lr` must be a float > 0. Received: final_lr=0"):
        AdaBound(final_lr=0)
    with pytest.raises(ValueError, match=r"`beta_2` must be a float in \[0, 1\)"):
        AdaBound(beta_2=1.0)
    with pytest.raises(ValueError, match="`gamma` must be a float > 0"):
        AdaBound(gamma=-1e-3)
    with pytest.raises(ValueError, match="`weight_decay` must be a float >= 0"):
        AdaBound(weight_decay=-0.1)
