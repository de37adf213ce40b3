"""Units of kerasnuc.training: schedule, optimizer, strategy, checkpoint, history, validation."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from kerasnuc.config import DataConfig, RunConfig, TrainConfig
from kerasnuc.data.dataset import Dataset, DatasetWriter
from kerasnuc.fileutil import KerasnucError
from kerasnuc.optimizers.schedules import build_optimizer, cosine_learning_rate
from kerasnuc.training.callbacks import write_history_csv
from kerasnuc.training.checkpoint import (
    has_checkpoint,
    restore_training_state,
    save_training_state,
)
from kerasnuc.training.run_folder import prepare_run_dir, resume_dir
from kerasnuc.training.strategy import get_strategy, precision_policy
from kerasnuc.training.trainer import resolve_config
from kerasnuc.training.validation import ValItem, score_predictions, score_summary


def test_cosine_schedule_by_hand():
    sched = cosine_learning_rate(TrainConfig(learning_rate=1e-3, min_lr_fraction=0.01), 10)
    # lr(t) = 1e-3 * (0.99 * 0.5 * (1 + cos(pi t / 10)) + 0.01)
    assert float(sched(0)) == pytest.approx(1e-3, rel=1e-6)
    assert float(sched(5)) == pytest.approx(1e-3 * (0.495 + 0.01), rel=1e-6)
    assert float(sched(10)) == pytest.approx(1e-5, rel=1e-5)
    assert float(sched(20)) == pytest.approx(1e-5, rel=1e-5)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_learning_rate(TrainConfig(), 0)


def test_build_optimizer():
    opt = build_optimizer(TrainConfig(weight_decay=1e-4), 100)
    assert isinstance(opt, keras.optimizers.AdamW)
    assert opt.weight_decay == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(TrainConfig(optimizer="sgd"), 100)


def test_strategy_and_precision():
    assert get_strategy("default").num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="strategy"):
        get_strategy("tpu")
    before = keras.config.dtype_policy().name
    with precision_policy(True):
        assert keras.config.dtype_policy().name == "mixed_float16"
    assert keras.config.dtype_policy().name == before


def _tiny_model():
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4)(inputs)
    x = keras.layers.Dropout(0.5, seed=1)(x)
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="mse")
    return model


def test_checkpoint_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    x = np.arange(24, dtype="float32").reshape(8, 3) / 24
    model.fit(x, x[:, :1], epochs=1, batch_size=4, verbose=0)
    saved_model = [v.numpy().copy() for v in model.variables]
    saved_opt = [v.numpy().copy() for v in model.optimizer.variables]
    history = [{"epoch": 1, "loss": 0.5, "val_pq": math.nan}]
    path = tmp_path / "checkpoint"
    save_training_state(
        path,
        model,
        model.optimizer,
        {"epoch": 1, "best_score": -math.inf, "best_epoch": 0, "history": history},
    )
    assert has_checkpoint(path)

    other = _tiny_model()
    other.optimizer.build(other.trainable_variables)
    state = restore_training_state(path, other, other.optimizer)
    assert state["epoch"] == 1 and state["best_score"] == -math.inf
    assert state["history"][0]["loss"] == 0.5 and math.isnan(state["history"][0]["val_pq"])
    for a, v in zip(saved_model, other.variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy())
    for a, v in zip(saved_opt, other.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy())
    assert int(other.optimizer.iterations.numpy()) == 2  # 8 samples / batch 4

    wrong = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    wrong.compile(optimizer="adamw", loss="mse")
    wrong.optimizer.build(wrong.trainable_variables)
    with pytest.raises(KerasnucError, match="variables"):
        restore_training_state(path, wrong, wrong.optimizer)
    with pytest.raises(KerasnucError, match="no training checkpoint"):
        restore_training_state(tmp_path / "missing", other, other.optimizer)


def test_history_csv(tmp_path):
    rows = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25, "val_pq": math.nan}]
    write_history_csv(tmp_path / "history.csv", rows)
    assert (tmp_path / "history.csv").read_text() == "epoch,loss,val_pq\n1,0.5,\n2,0.25,nan\n"


def _squares(classes: bool):
    inst = np.zeros((16, 16), np.int32)
    inst[1:5, 1:5] = 1
    inst[8:14, 8:14] = 2
    cls = np.where(inst == 1, 1, np.where(inst == 2, 2, 0)).astype(np.int32)
    return ValItem("a", np.zeros((16, 16, 3), np.uint8), inst, cls if classes else None)


def test_score_predictions_by_definition():
    item = _squares(True)
    perfect = score_predictions([item.instances], [item.classes], [item], num_classes=2)
    assert perfect["mpq_plus"] == pytest.approx(1.0) and score_summary(perfect, 2) == 1.0
    # Predict only the first square: class 1 PQ 1, class 2 PQ 0 -> mPQ+ 0.5;
    # binary PQ: tp 1, fn 1 -> DQ = 1 / (1 + 0.5) = 2/3, SQ = 1.
    half = np.where(item.instances == 1, 1, 0).astype(np.int32)
    summary = score_predictions([half], [half], [item], num_classes=2)
    assert summary["mpq_plus"] == pytest.approx(0.5)
    agnostic = _squares(False)
    summary = score_predictions([half], [half], [agnostic], num_classes=0)
    assert score_summary(summary, 0) == pytest.approx(2 / 3)


def _write_dataset(root, n_train=3, n_val=1):
    meta = {"name": "sq", "mpp": 0.5, "classes": {"1": "a"}}
    inst = np.zeros((32, 32), np.int32)
    inst[4:12, 4:12] = 1
    with DatasetWriter(root, meta) as w:
        for k in range(n_train + n_val):
            w.add(
                f"i{k}",
                np.zeros((32, 32, 3), np.uint8),
                inst,
                inst.copy(),
                split="train" if k < n_train else "val",
            )
    return Dataset(root)


def test_resolve_config_steps_and_samples(tmp_path):
    ds = _write_dataset(tmp_path / "ds")
    cfg = RunConfig("conic", {}, DataConfig(), {"batch_size": 2}, TrainConfig(epochs=1))
    out = resolve_config(cfg, [ds])
    assert out.train.steps_per_epoch == 2  # ceil(3 train images / batch 2)
    assert out.pipeline["samples_per_epoch"] == 4
    cfg = RunConfig("conic", {}, DataConfig(), {"batch_size": 2}, TrainConfig(steps_per_epoch=5))
    assert resolve_config(cfg, [ds]).pipeline["samples_per_epoch"] == 10
    empty = RunConfig("conic", {}, DataConfig(train_split="none"), {"batch_size": 2})
    with pytest.raises(KerasnucError, match="no images in split 'none'"):
        resolve_config(empty, [ds])


def test_prepare_run_dir(tmp_path):
    run = tmp_path / "run"
    assert prepare_run_dir(run, overwrite=False) == (run, True)
    assert run.is_dir()
    assert prepare_run_dir(run, overwrite=False) == (run, False)  # empty: reused
    (run / "config.json").write_text("{}")
    with pytest.raises(KerasnucError, match="already exists"):
        prepare_run_dir(run, overwrite=False)
    with pytest.raises(KerasnucError, match="no run to resume"):
        resume_dir(run)
    # --overwrite: the new run trains aside; nothing of the old one is deleted yet.
    pending = tmp_path / ".run.pending"
    assert prepare_run_dir(run, overwrite=True) == (pending, True)
    assert pending.is_dir() and (run / "config.json").is_file()


def test_validation_scores_each_dataset_on_its_own():
    """Typed dataset: mPQ+; untyped dataset: PQ; the score is their mean."""
    from kerasnuc.training.validation import ValItem, score_predictions, score_summary

    inst = np.zeros((10, 10), np.int32)
    inst[0:4, 0:4] = 1
    inst[6:10, 6:10] = 2
    cls = np.where(inst > 0, 1, 0).astype(np.int32)
    typed = ValItem("consep/a", np.zeros((10, 10, 3), np.uint8), inst, cls)
    untyped = ValItem("kumar/b", np.zeros((10, 10, 3), np.uint8), inst, None)
    half = np.where(inst == 1, 1, 0).astype(np.int32)  # second nucleus missed
    summary = score_predictions([inst, half], [cls, cls], [typed, untyped], num_classes=2)
    # consep: perfect (mPQ+ over the present class 1 = 1); kumar: TP 1, FN 1 -> PQ 1/1.5
    assert summary["consep_score"] == pytest.approx(1.0)
    assert summary["kumar_pq"] == pytest.approx(1 / 1.5)
    assert summary["score"] == pytest.approx((1.0 + 1 / 1.5) / 2)
    assert summary["pq"] == pytest.approx((1.0 + 1 / 1.5) / 2)
    assert summary["mpq_plus"] == pytest.approx(1.0)
    assert score_summary(summary, 2) == summary["score"]


def test_tile_items_grid_by_hand():
    from kerasnuc.training.validation import tile_items

    image = np.arange(10 * 7 * 3, dtype=np.uint8).reshape(10, 7, 3)
    inst = np.arange(70, dtype=np.int32).reshape(10, 7)
    items = [ValItem("kumar/a", image, inst, None), ValItem("kumar/b", image, inst, inst % 3)]
    tiles = tile_items(items, 4)
    # 10 rows -> 3 tiles at rows 0, 3, 7 (round(10/3), round(20/3)); 7 cols -> 2 at cols 0, 4
    starts = [(0, 0), (0, 4), (3, 0), (3, 4), (7, 0), (7, 4)]
    assert [t.id for t in tiles[:6]] == [f"kumar/a@{y},{x}" for y, x in starts]
    assert all(t.group == "kumar" for t in tiles) and len(tiles) == 12
    np.testing.assert_array_equal(tiles[3].instances, inst[3:7, 4:7])
    np.testing.assert_array_equal(tiles[3].image, image[3:7, 4:7])
    assert tiles[3].classes is None
    np.testing.assert_array_equal(tiles[10].classes, (inst % 3)[7:10, 0:4])
    # the tiles cover every pixel exactly once
    assert sum(t.instances.size for t in tiles[:6]) == 70
    assert len(tile_items(items, 64)) == 2
