"""The run folder survives failures: checks first, replacement last (issue 20, item 1).

``train --overwrite`` used to delete the old run before it looked at the new data, and a failed
run left ``config.json``/``postproc.json`` behind, so the rerun said "already exists" and
``--resume`` "no checkpoint". These tests use the narrow ``tiny_conic`` stand-in
(:mod:`tests.training.tiny_method`) so that a real training run takes seconds.
"""

from __future__ import annotations

import json
import os

import keras
import pytest

from kerasnuc.config import DataConfig, RunConfig, TrainConfig
from kerasnuc.data.pipeline import PipelineConfig
from kerasnuc.fileutil import KerasnucError
from kerasnuc.runs import BEST_WEIGHTS, HISTORY, pending_run_dir
from kerasnuc.training.run_folder import prepare_run_dir
from kerasnuc.training.trainer import train_run
from tests.training.test_trainer import CLASSES, write_discs
from tests.training.tiny_method import NAME, TinyConicConfig


@pytest.fixture(scope="module")
def discs(tmp_path_factory):
    return write_discs(tmp_path_factory.mktemp("data") / "discs", n_train=2, n_val=1)


def tiny_config(data, epochs=1, seed=3, **data_kwargs) -> RunConfig:
    return RunConfig(
        NAME,
        TinyConicConfig().to_dict(),
        DataConfig(datasets=(str(data),), class_names=CLASSES, mpp=0.5, **data_kwargs),
        PipelineConfig(crop_size=64, batch_size=2).to_dict(),
        TrainConfig(epochs=epochs, steps_per_epoch=1, seed=seed),
    )


class Boom(Exception):
    """The failure the callbacks below raise."""


class FailAtStart(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        raise Boom("failed before the first step")


class FailAfterEpoch(keras.callbacks.Callback):
    """Fails after the checkpoint of epoch ``epoch`` is written (a kill at that moment)."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise Boom(f"killed after epoch {self.epoch}")


def snapshot(folder):
    """``{relative path: bytes}`` of every file under ``folder``."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fake_run(folder):
    """A run folder's files (contents do not matter here)."""
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "config.json").write_text('{"method": "conic"}')
    (folder / BEST_WEIGHTS).write_bytes(b"trained weights")
    (folder / HISTORY).write_text("epoch,loss\n1,0.5\n")
    (folder / "checkpoint" / "state.json").write_text('{"epoch": 1}')
    return snapshot(folder)


def test_overwrite_checks_the_new_data_before_touching_the_old_run(discs, tmp_path, tiny_method):
    run = tmp_path / "run"
    before = fake_run(run)
    # A typo in the data: a split without images; a class count the model does not have.
    with pytest.raises(KerasnucError, match="no images in split 'trian'"):
        train_run(tiny_config(discs, train_split="trian"), run, overwrite=True)
    bad_model = RunConfig(
        "conic", {"num_classes": 5}, DataConfig(datasets=(str(discs),)), {}, TrainConfig()
    )
    with pytest.raises(KerasnucError, match="num_classes=5"):
        train_run(bad_model, run, overwrite=True)
    assert snapshot(run) == before
    assert not pending_run_dir(run).exists()


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "slide1.svs").write_bytes(b"x")
    with pytest.raises(KerasnucError, match=r"not part of a training run \(slide1.svs\)"):
        prepare_run_dir(folder, overwrite=True)
    assert (folder / "slide1.svs").read_bytes() == b"x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_an_unwritable_out_fails_before_training(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(KerasnucError, match="cannot write the run folder"):
            prepare_run_dir(parent / "run", overwrite=False)
    finally:
        parent.chmod(0o700)


def test_a_failed_run_leaves_nothing_that_blocks_a_rerun(discs, tmp_path, tiny_method):
    config = tiny_config(discs)
    absent, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for run in (absent, empty):
        with pytest.raises(Boom):
            train_run(config, run, verbose=0, callbacks=[FailAtStart()], tensorboard=False)
    assert not absent.exists()
    assert list(empty.iterdir()) == []
    # The rerun needs neither --overwrite nor --resume.
    result = train_run(config, absent, verbose=0, tensorboard=False)
    assert [row["epoch"] for row in result.history] == [1]
    assert (absent / "config.json").is_file() and (absent / "checkpoint").is_dir()
    with pytest.raises(KerasnucError, match="no run to resume"):
        train_run(config, empty, resume=True)


def test_overwrite_replaces_the_old_run_only_when_the_new_one_is_done(discs, tmp_path, tiny_method):
    run = tmp_path / "run"
    train_run(tiny_config(discs, epochs=1), run, verbose=0, tensorboard=False)
    old = snapshot(run)
    new_config = tiny_config(discs, epochs=2, seed=11)
    # Killed after the first of two epochs: the old run is untouched, the new one can resume.
    with pytest.raises(Boom):
        train_run(
            new_config,
            run,
            overwrite=True,
            verbose=0,
            tensorboard=False,
            callbacks=[FailAfterEpoch(1)],
        )
    assert snapshot(run) == old
    pending = pending_run_dir(run)
    assert json.loads((pending / "checkpoint" / "state.json").read_text())["epoch"] == 1
    with pytest.raises(KerasnucError, match="unfinished --overwrite run"):
        train_run(new_config, run, verbose=0)
    resumed = train_run(new_config, run, resume=True, verbose=0, tensorboard=False)
    assert resumed.initial_epoch == 1 and resumed.run_dir == run
    assert not pending.exists()
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 11
    assert json.loads((run / "checkpoint" / "state.json").read_text())["epoch"] == 2
    assert (run / HISTORY).read_text().count("\n") == 3  # header + 2 epochs
    assert (run / BEST_WEIGHTS).read_bytes() != old[BEST_WEIGHTS]
