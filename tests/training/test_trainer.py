"""End-to-end training runs on tiny models: exact resume, MirroredStrategy, ``init_from``.

Tiny settings: 64x64 crops, batch 2, 2 steps per epoch, a 6-image synthetic dataset of discs
(4 train, 2 val). The runs use the narrow ``tiny_conic`` stand-in
(:mod:`tests.training.tiny_method`: the conic method with a two-convolution model), whose train
step traces in a second or two instead of ~30 s for an EfficientNet-B0 conic model; the
MirroredStrategy check trains a small ``ConicModel`` in a subprocess (two logical CPUs).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from kerasnuc import registry
from kerasnuc.config import DataConfig, RunConfig, TrainConfig
from kerasnuc.data.dataset import DatasetWriter
from kerasnuc.data.pipeline import PipelineConfig
from kerasnuc.runs import BEST_WEIGHTS, HISTORY, POSTPROC, load_run
from kerasnuc.training.trainer import train_run
from tests.training.tiny_method import NAME, TinyConicConfig, build_tiny_conic

CLASSES = {"1": "dark", "2": "pale"}


def write_discs(root, n_train=4, n_val=2, size=64, seed=0):
    """Dataset of noisy images with 5 discs each (class 1 / 2 alternating), seeded."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    with DatasetWriter(root, {"name": "discs", "mpp": 0.5, "classes": CLASSES}) as w:
        for k in range(n_train + n_val):
            img = np.full((size, size, 3), 230.0)
            inst = np.zeros((size, size), np.int32)
            cls = np.zeros_like(inst)
            for i in range(1, 6):
                cy, cx = rng.integers(8, size - 8, 2)
                r = rng.integers(4, 7)
                m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (inst == 0)
                inst[m], cls[m] = i, 1 + i % 2
                img[m] = (120, 40, 160) if i % 2 else (60, 20, 120)
            img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            w.add(f"im{k}", img, inst, cls, split="train" if k < n_train else "val")
    return root


@pytest.fixture(scope="module")
def small_discs(tmp_path_factory):
    return write_discs(tmp_path_factory.mktemp("data") / "discs")


class StopAfterEpoch(keras.callbacks.Callback):
    """Stops training after the checkpoint of epoch ``epoch`` was written (an interruption)."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            self.model.stop_training = True


def test_resume_reproduces_uninterrupted_run_exactly(small_discs, tmp_path, tiny_method):
    """3 epochs x 2 steps straight, or stopped after epoch 1 and resumed: bit-identical.

    The pipeline keeps its defaults (parallel maps, importance sampling, augmentation), so this
    also covers the order of the crops; the tiny model has batch norm, MC dropout and channel
    dropout, and the conic losses' EMA class prior.
    """
    config = RunConfig(
        NAME,
        TinyConicConfig(num_classes=2).to_dict(),
        DataConfig(datasets=(str(small_discs),), class_names=CLASSES, mpp=0.5),
        PipelineConfig(crop_size=64, batch_size=2).to_dict(),
        TrainConfig(epochs=3, steps_per_epoch=2, seed=3),
    )
    full = train_run(config, tmp_path / "full", verbose=0)
    part = tmp_path / "part"
    first = train_run(config, part, verbose=0, callbacks=[StopAfterEpoch(1)])
    assert [r["epoch"] for r in first.history] == [1]
    resumed = train_run(config, part, resume=True, verbose=0)
    assert resumed.initial_epoch == 1

    # Same rows, to the bit: epoch, the losses, the learning rate and the validation metrics.
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == b[key], key
    with open(tmp_path / "full" / HISTORY) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"loss", "semantic_loss", "three_label_loss", "vectors_loss", "lr", "val_mpq_plus"} <= (
        set(rows[0])
    )
    # lr logged at the end of epoch 3 = end of the cosine schedule: 0.01 * 1e-3.
    assert float(rows[2]["lr"]) == pytest.approx(1e-5, rel=1e-4)

    # Final weights (incl. the EMA class prior and dropout seed states) and optimizer state.
    for va, vb in zip(full.model.variables, resumed.model.variables, strict=True):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)
    for va, vb in zip(
        full.model.optimizer.variables, resumed.model.optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)
    prior = resumed.model.class_frequency.numpy()
    assert not np.allclose(prior, 1 / 3)  # updated by the 6 training steps

    # The run folder is loadable.
    for name in ("config.json", BEST_WEIGHTS, POSTPROC, "checkpoint/state.json"):
        assert (part / name).is_file(), name
    assert any((part / "logs").iterdir())
    saved = json.loads((part / "config.json").read_text())
    assert saved["pipeline"]["samples_per_epoch"] == 4
    assert saved["data"]["class_names"] == CLASSES
    run = load_run(part)
    assert run.model.count_params() == full.model.count_params()

    # Nothing left to do: a second resume returns at once.
    again = train_run(config, part, resume=True, verbose=0)
    assert len(again.history) == 3


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from kerasnuc.config import TrainConfig
    from kerasnuc.losses.conic import conic_losses
    from kerasnuc.models.conic import ConicModel
    from kerasnuc.optimizers.schedules import build_optimizer
    from kerasnuc.training.strategy import get_strategy

    def build():
        # A small ConicModel (the class of build_conic, with its class prior) with the same
        # outputs: conv + batch norm (per-replica batch statistics) feeding the three heads.
        image = keras.Input((None, None, 3), name="image")
        x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(image)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
        x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(x)
        x = keras.layers.UpSampling2D(2)(x)
        sem = keras.layers.Conv2D(3, 1)(x)
        three = keras.layers.Conv2D(3, 1)(x)
        vec = keras.layers.Conv2D(2, 1)(x)
        return ConicModel(image, {
            "semantic": keras.layers.Activation("softmax", name="semantic")(sem),
            "three_label": keras.layers.Activation("softmax", name="three_label")(three),
            "vectors": keras.layers.Activation("linear", name="vectors")(vec),
        })

    keras.utils.set_random_seed(0)
    init = build().get_weights()
    rng = np.random.default_rng(0)
    img = rng.random((1, 64, 64, 3), np.float32)
    sem = rng.integers(0, 3, (1, 64, 64)).astype(np.int32)
    vec = rng.normal(size=(1, 64, 64, 3)).astype(np.float32)
    vec[..., 2] = sem[0] > 0
    # Two identical samples: each replica sees one, so batch statistics and loss
    # normalisations equal those of the single-device batch.
    x = np.repeat(img, 2, 0)
    y = {"semantic": np.repeat(sem, 2, 0), "three_label": np.repeat(np.minimum(sem, 2), 2, 0),
         "vectors": np.repeat(vec, 2, 0)}

    out = {}
    for name in ("default", "mirrored"):
        keras.utils.set_random_seed(0)
        strategy = get_strategy(name)
        with strategy.scope():
            model = build()
            model.set_weights(init)
            model.compile(optimizer=build_optimizer(TrainConfig(epochs=1), 2),
                          loss=conic_losses(2))
        data = tf.data.Dataset.from_tensors((x, y)).repeat()
        hist = model.fit(data, epochs=2, steps_per_epoch=1, verbose=0)
        out[name] = {"loss": hist.history["loss"], "replicas": strategy.num_replicas_in_sync,
                     "prior": model.class_frequency.numpy().tolist()}
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_mirrored_strategy_matches_single_device(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT") :])
    assert out["default"]["replicas"] == 1 and out["mirrored"]["replicas"] == 2
    single, mirrored = out["default"]["loss"], out["mirrored"]["loss"]
    assert mirrored[0] == pytest.approx(single[0], rel=1e-5)
    # Step 2 follows one AdamW update; Adam's first step is ~lr * sign(g), so float round-off
    # in near-zero gradients of the all-reduce shows up at the 1e-4 level.
    assert mirrored[1] == pytest.approx(single[1], rel=2e-4)
    np.testing.assert_allclose(out["mirrored"]["prior"], out["default"]["prior"], rtol=1e-6)


def test_init_from_starts_from_the_weights_of_another_run(small_discs, tmp_path, tiny_method):
    # A source run folder: a model of the same architecture with other (seed 11) weights.
    source = tmp_path / "source"
    source.mkdir()
    keras.utils.set_random_seed(11)
    donor = build_tiny_conic(TinyConicConfig(num_classes=2))
    donor.save_weights(source / BEST_WEIGHTS)
    # A learning rate of 1e-12 keeps one AdamW step (and its decay) far below 1e-6.
    config = RunConfig(
        NAME,
        TinyConicConfig(num_classes=2).to_dict(),
        DataConfig(datasets=(str(small_discs),), class_names=CLASSES, mpp=0.5),
        PipelineConfig(crop_size=64, batch_size=2, deterministic=True, parallel_calls=1).to_dict(),
        TrainConfig(
            epochs=1, steps_per_epoch=1, seed=3, learning_rate=1e-12, init_from=str(source)
        ),
    )
    result = train_run(config, tmp_path / "run", verbose=0, tensorboard=False)
    # The weights the run would have started from without init_from (its seed).
    keras.utils.set_random_seed(3)
    fresh = build_tiny_conic(TinyConicConfig(num_classes=2))
    kernels = [
        (w.path, np.asarray(w), np.asarray(d), np.asarray(f))
        for w, d, f in zip(result.model.weights, donor.weights, fresh.weights, strict=True)
        if w.path.endswith("kernel")
    ]
    assert len(kernels) == 5
    for path, got, want, _ in kernels:
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=path)
    assert max(np.abs(got - other).max() for _, got, _, other in kernels) > 1e-2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["init_from"] == str(source)


def test_init_from_a_run_starts_a_new_learning_rate_schedule(small_discs, tmp_path, tiny_method):
    """A run's weights file also holds its optimizer (step count, moments): a run started from
    it must not inherit them, or its cosine schedule starts where the source's ended."""

    def config(steps, init_from=None):
        return RunConfig(
            NAME,
            TinyConicConfig(num_classes=2).to_dict(),
            DataConfig(datasets=(str(small_discs),), class_names=CLASSES, mpp=0.5),
            PipelineConfig(
                crop_size=64, batch_size=2, deterministic=True, parallel_calls=1
            ).to_dict(),
            TrainConfig(epochs=1, steps_per_epoch=steps, seed=3, init_from=init_from),
        )

    source = train_run(config(3), tmp_path / "source", verbose=0, tensorboard=False)
    assert int(source.model.optimizer.iterations.numpy()) == 3
    result = train_run(
        config(2, str(tmp_path / "source")), tmp_path / "run", verbose=0, tensorboard=False
    )
    assert int(result.model.optimizer.iterations.numpy()) == 2  # its own 2 steps, not 3 + 2


def test_init_from_a_missing_or_foreign_weights_file_fails_in_one_line(tmp_path):
    from kerasnuc.fileutil import KerasnucError
    from kerasnuc.runs import load_initial_weights

    model = build_tiny_conic(TinyConicConfig(num_classes=2))
    with pytest.raises(KerasnucError, match="not found"):
        load_initial_weights(model, tmp_path / "nowhere")
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.save_weights(tmp_path / "other.weights.h5")
    with pytest.raises(KerasnucError, match="cannot start from these weights"):
        load_initial_weights(model, tmp_path / "other.weights.h5")


def test_train_only_trains_the_matching_layers_and_keeps_the_others(
    small_discs, tmp_path, tiny_method
):
    """``"train": {"train_only": ["batch_normalization*"]}`` on the tiny model (convs + one batch
    norm): after 3 steps every convolution equals the weights it started from (init_from), the
    batch norm moved, and the optimizer holds slots for gamma and beta only."""
    source = tmp_path / "source"
    source.mkdir()
    keras.utils.set_random_seed(11)
    donor = build_tiny_conic(TinyConicConfig(num_classes=2))
    donor.save_weights(source / BEST_WEIGHTS)
    train = TrainConfig.from_dict(
        {"epochs": 1, "steps_per_epoch": 3, "seed": 3, "learning_rate": 1e-2,
         "init_from": str(source), "train_only": ["batch_normalization*"]}
    )  # fmt: skip
    assert train.train_only == ("batch_normalization*",)
    assert TrainConfig.from_dict(train.to_dict()) == train
    config = RunConfig(
        NAME,
        TinyConicConfig(num_classes=2).to_dict(),
        DataConfig(datasets=(str(small_discs),), class_names=CLASSES, mpp=0.5),
        PipelineConfig(crop_size=64, batch_size=2, deterministic=True, parallel_calls=1).to_dict(),
        train,
    )
    result = train_run(config, tmp_path / "run", verbose=0, tensorboard=False)
    pairs = list(zip(result.model.weights, donor.weights, strict=True))
    convs = [(w.path, np.asarray(w), np.asarray(d)) for w, d in pairs if "conv2d" in w.path]
    assert len(convs) == 9  # 5 kernels, 4 biases (the first conv has none)
    for path, got, want in convs:
        np.testing.assert_array_equal(got, want, err_msg=path)
    bn = [(w.path, np.asarray(w), np.asarray(d)) for w, d in pairs if "batch_norm" in w.path]
    assert len(bn) == 4 and all(np.abs(got - want).max() > 1e-4 for _, got, want in bn)
    assert [v.path.split("/")[-1] for v in result.model.trainable_variables] == ["gamma", "beta"]


def test_train_only_checks(small_discs, tmp_path, tiny_method):
    for bad in ([], [""], "semantic_*"):
        with pytest.raises(ValueError, match="train_only"):
            TrainConfig.from_dict({"train_only": bad})
    config = RunConfig(
        NAME,
        TinyConicConfig(num_classes=2).to_dict(),
        DataConfig(datasets=(str(small_discs),), class_names=CLASSES, mpp=0.5),
        PipelineConfig(crop_size=64, batch_size=2, deterministic=True, parallel_calls=1).to_dict(),
        TrainConfig(epochs=1, steps_per_epoch=1, train_only=("semantic",)),
    )
    # "semantic" is the name of the softmax activation: a layer without weights.
    with pytest.raises(ValueError, match="pattern 'semantic' matches no layer with weights"):
        train_run(config, tmp_path / "run", verbose=0, tensorboard=False)
    # A method with its own freeze schedule (unet_sharp's callbacks) refuses train_only.
    scheduled = dataclasses.replace(tiny_method, callbacks=lambda config, model: [])
    registry.METHODS[NAME] = scheduled  # the fixture's monkeypatch restores the entry
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, train_only=("batch_normalization*",))
    )
    with pytest.raises(ValueError, match="`train_only` is not available for tiny_conic"):
        train_run(config, tmp_path / "run2", verbose=0, tensorboard=False)
