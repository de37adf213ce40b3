"""Multi-task loss combination: the paper's cyclic scheduler (Eq. 4), sum, task uncertainty."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasnuc.losses.scheduler import MODES, WEAK_TASKS, MultiTaskLoss
from kerasnuc.losses.weak import ClusterLoss, RepelLoss, VoronoiLoss

LOSSES = {"voronoi": 0.7, "repel": 0.05, "cluster": 0.4}


def as_tensors(losses):
    return {k: keras.ops.convert_to_tensor(v, "float32") for k, v in losses.items()}


def test_constants():
    assert MODES == ("cyclic", "sum", "uncertainty")
    assert WEAK_TASKS == ("voronoi", "repel", "cluster")


@pytest.mark.parametrize(
    ("iteration", "task"),
    [(0, "voronoi"), (1, "repel"), (2, "cluster"), (3, "voronoi"), (4, "repel"), (5, "cluster")],
)
def test_cyclic_selects_the_papers_task(iteration, task):
    combiner = MultiTaskLoss("cyclic")
    total = combiner.combine(as_tensors(LOSSES), iteration)
    assert float(total) == np.float32(LOSSES[task])
    expected_weights = [1.0 if t == task else 0.0 for t in WEAK_TASKS]
    np.testing.assert_array_equal(combiner.weights_for(iteration).numpy(), expected_weights)


def test_cyclic_in_a_compiled_function_with_a_tensor_counter():
    combiner = MultiTaskLoss("cyclic")
    counter = tf.Variable(0, dtype=tf.int64)
    traces = []

    @tf.function
    def step(losses):
        traces.append(1)
        total = combiner(losses, iteration=counter)
        counter.assign_add(1)
        return total

    got = [float(step(as_tensors(LOSSES))) for _ in range(6)]
    expected = [LOSSES[t] for t in ("voronoi", "repel", "cluster") * 2]
    np.testing.assert_allclose(got, expected, rtol=1e-7)
    assert len(traces) == 1  # one trace: the selection is not a Python branch


def test_cyclic_gradient_reaches_only_the_selected_loss():
    combiner = MultiTaskLoss("cyclic")
    values = {k: keras.Variable(v, dtype="float32") for k, v in LOSSES.items()}
    for iteration, task in enumerate(("voronoi", "repel", "cluster")):
        with tf.GradientTape() as tape:
            total = combiner({k: 2.0 * v for k, v in values.items()}, iteration=iteration)
        grads = tape.gradient(total, [values[t].value for t in WEAK_TASKS])
        got = [0.0 if g is None else float(tf.convert_to_tensor(g)) for g in grads]
        assert got == [2.0 if t == task else 0.0 for t in WEAK_TASKS]


def test_custom_task_order():
    combiner = MultiTaskLoss("cyclic", tasks=("cluster", "voronoi"), regression_tasks=())
    got = [float(combiner(as_tensors(LOSSES), iteration=i)) for i in range(3)]
    np.testing.assert_allclose(got, [0.4, 0.7, 0.4], rtol=1e-7)


def test_sum_mode():
    combiner = MultiTaskLoss("sum")
    for iteration in (0, 1, 2):
        assert float(combiner(as_tensors(LOSSES), iteration=iteration)) == pytest.approx(
            0.7 + 0.05 + 0.4
        )
    assert combiner.trainable_weights == []


def test_uncertainty_value_by_hand():
    combiner = MultiTaskLoss("uncertainty")
    assert len(combiner.trainable_weights) == 1
    assert tuple(combiner.log_variances.shape) == (3,)
    np.testing.assert_array_equal(combiner.log_variances.numpy(), 0.0)
    # At s = 0: classification weight 1, regression (repel) weight 0.5, no s term.
    assert float(combiner(as_tensors(LOSSES))) == pytest.approx(0.7 + 0.5 * 0.05 + 0.4)

    s_vor, s_rep, s_clu = 0.3, -0.2, 0.5
    combiner.log_variances.assign([s_vor, s_rep, s_clu])
    expected = (
        math.exp(-s_vor) * 0.7
        + 0.5 * s_vor
        + 0.5 * math.exp(-s_rep) * 0.05
        + 0.5 * s_rep
        + math.exp(-s_clu) * 0.4
        + 0.5 * s_clu
    )
    assert float(combiner(as_tensors(LOSSES), iteration=7)) == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(
        combiner.weights_for(0).numpy(),
        [math.exp(-s_vor), 0.5 * math.exp(-s_rep), math.exp(-s_clu)],
        rtol=1e-6,
    )


def test_uncertainty_gradients_by_hand():
    combiner = MultiTaskLoss("uncertainty")
    s = np.array([0.3, -0.2, 0.5])
    combiner.log_variances.assign(s)
    with tf.GradientTape() as tape:
        total = combiner(as_tensors(LOSSES))
    grad = tape.gradient(total, combiner.log_variances.value).numpy()
    # d/ds_k [f_k exp(-s_k) L_k + 0.5 s_k] = -f_k exp(-s_k) L_k + 0.5
    f = np.array([1.0, 0.5, 1.0])
    loss = np.array([LOSSES[t] for t in WEAK_TASKS])
    np.testing.assert_allclose(grad, -f * np.exp(-s) * loss + 0.5, rtol=1e-6)


class TinyWeakModel(keras.Model):
    """A 2-channel softmax conv net whose train step combines the three weak losses."""

    def __init__(self, mode):
        super().__init__()
        self.conv = keras.layers.Conv2D(2, 3, padding="same", activation="softmax")
        self.combiner = MultiTaskLoss(mode)
        self.voronoi_loss = VoronoiLoss()
        self.repel_loss = RepelLoss()
        self.cluster_loss = ClusterLoss()

    def call(self, x):
        return self.conv(x)

    def train_step(self, data):
        x, targets = data
        iteration = self.optimizer.iterations
        with tf.GradientTape() as tape:
            seg = self(x, training=True)
            losses = {
                "voronoi": self.voronoi_loss(targets["voronoi"], seg),
                "repel": self.repel_loss(targets["repel"], seg),
                "cluster": self.cluster_loss(targets["cluster"], seg),
            }
            total = self.combiner.combine(losses, iteration)
        grads = tape.gradient(total, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return {"loss": total, **losses}


def _weak_batch():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2, 8, 8, 3)).astype("float32")
    vor = np.full((2, 8, 8), 255, np.uint8)
    vor[:, 2, 2] = 1
    vor[:, 5, :] = 0
    cluster = (x[..., 0] > 0.5).astype(np.uint8)
    repel = (cluster * rng.uniform(size=(2, 8, 8))).astype("float32")
    return x, {"voronoi": vor, "repel": repel, "cluster": cluster}


def test_cyclic_inside_fit_reports_the_selected_loss():
    keras.utils.set_random_seed(0)
    model = TinyWeakModel("cyclic")
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    x, targets = _weak_batch()
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(logs)

    model.fit(x, targets, batch_size=2, epochs=6, verbose=0, callbacks=[Record()])
    for i, logs in enumerate(seen):
        task = WEAK_TASKS[i % 3]
        assert logs["loss"] == pytest.approx(logs[task], rel=1e-6)


def test_uncertainty_weights_train_with_the_model():
    keras.utils.set_random_seed(0)
    model = TinyWeakModel("uncertainty")
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    x, targets = _weak_batch()
    model(x)  # builds the conv
    assert any(v is model.combiner.log_variances for v in model.trainable_variables)
    model.fit(x, targets, batch_size=2, epochs=2, verbose=0)
    assert np.all(model.combiner.log_variances.numpy() != 0.0)


def test_config_round_trip():
    combiner = MultiTaskLoss("uncertainty", tasks=("a", "b"), regression_tasks=("b",), name="mt")
    restored = MultiTaskLoss.from_config(combiner.get_config())
    assert restored.mode == "uncertainty"
    assert restored.tasks == ("a", "b")
    assert restored.regression_tasks == ("b",)
    assert restored.name == "mt"
    restored = keras.layers.deserialize(keras.layers.serialize(combiner))
    assert isinstance(restored, MultiTaskLoss)
    assert keras.saving.get_registered_name(MultiTaskLoss) == "kerasnuc>MultiTaskLoss"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "scheduler"}, "`mode` must be one of"),
        ({"tasks": ()}, "`tasks` must be a non-empty list of distinct strings"),
        ({"tasks": ("a", "a")}, "distinct strings"),
        ({"regression_tasks": ("depth",)}, "`regression_tasks` must be a subset of `tasks`"),
    ],
)
def test_argument_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskLoss(**kwargs)


def test_missing_loss_raises():
    with pytest.raises(ValueError, match=r"`losses` lacks the task\(s\) \['cluster'\]"):
        MultiTaskLoss("sum")(as_tensors({"voronoi": 1.0, "repel": 1.0}))
