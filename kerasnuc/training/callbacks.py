"""Keras callbacks of ``kerasnuc train``: validation-based best checkpoint, history and state.

They run in :meth:`on_epoch_end`, in this order (the order of the callback list):

0. :class:`BatchNormReestimation` (runs with ``train.bn_reestimation_batches > 0``) recomputes
   the moving statistics of the training batch norms from training batches whenever the next
   callbacks validate or save weights, so that what they score and save is the network the
   loss saw.
1. :class:`BestCheckpoint` validates every ``val_every`` epochs (and after the last epoch) with
   the real post-processing and metrics (:func:`kerasnuc.training.validation.validate`), adds
   ``val_*`` entries to the epoch's logs and writes ``model.weights.h5`` atomically when the score
   (mPQ+ with classes, PQ without) beats the best so far.
2. :class:`TrainingState` adds the learning rate to the logs, appends the epoch's row to the
   history, rewrites ``history.csv`` atomically and saves the full training state into
   ``checkpoint/`` (:mod:`kerasnuc.training.checkpoint`).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kerasnuc.fileutil import atomic_path, write_text_atomic
from kerasnuc.models.batchnorm import reestimate_batch_norm
from kerasnuc.runs import BEST_WEIGHTS, CHECKPOINT_DIR, EPOCH_WEIGHTS_DIR, HISTORY
from kerasnuc.training.checkpoint import save_training_state
from kerasnuc.training.validation import ValItem, validate

logger = logging.getLogger(__name__)

#: Keys of a validation summary that go into the logs / history (as ``val_<key>``).
VAL_KEYS = (
    "score",
    "pq",
    "dq",
    "sq",
    "aji",
    "pixel_f1",
    "mpq_plus",
    "r2",
    "miou_pooled",
    "mdice_pooled",
)
#: Prefixes of per-class validation entries that also go into the logs (semantic IoU / Dice of
#: every cell type, pooled over the validation images).
VAL_CLASS_PREFIXES = ("iou_pooled_c", "dice_pooled_c")


def save_weights_atomic(model: keras.Model, path: str | os.PathLike) -> None:
    """``model.save_weights(path)`` through a temporary file renamed onto ``path``."""
    with atomic_path(path, suffix=".weights.h5") as tmp:
        model.save_weights(tmp)


def write_history_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Write history rows as CSV atomically; columns in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return value


def _better(score: float, best: float) -> bool:
    return not math.isnan(score) and (math.isnan(best) or score > best)


class BestCheckpoint(keras.callbacks.Callback):
    """Validate with post-processing and metrics; keep the weights with the best score.

    Args:
        run_dir: run folder; the best weights go to ``run_dir/model.weights.h5``.
        items: validation images (see :func:`kerasnuc.training.validation.val_items`); empty:
            no validation, the weights of the last epoch are kept instead.
        num_classes: C (0: class-agnostic, the score is PQ).
        postprocess: ``(maps, config) -> PostprocResult`` of the method.
        postproc_config: post-processing settings used for validation.
        val_every: validate every this many epochs.
        epochs: total epochs (the last epoch is always validated).
        best_score: best score so far (resuming; NaN: none).
        best_epoch: epoch (1-based) of ``best_score`` (0: none).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        items: Sequence[ValItem],
        num_classes: int,
        postprocess: Any,
        postproc_config: Any,
        val_every: int = 1,
        epochs: int = 1,
        best_score: float = math.nan,
        best_epoch: int = 0,
    ):
        super().__init__()
        if val_every < 1:
            raise ValueError(f"`val_every` must be >= 1. Received: val_every={val_every}")
        self.run_dir = Path(run_dir)
        self.items = list(items)
        self.num_classes = num_classes
        self.postprocess = postprocess
        self.postproc_config = postproc_config
        self.val_every = val_every
        self.epochs = epochs
        self.best_score = float(best_score)
        self.best_epoch = int(best_epoch)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        done = epoch + 1
        path = self.run_dir / BEST_WEIGHTS
        if not self.items:
            save_weights_atomic(self.model, path)
            self.best_epoch = done
            return
        if done % self.val_every and done != self.epochs:
            return
        summary = validate(
            self.model, self.items, self.num_classes, self.postprocess, self.postproc_config
        )
        for key in VAL_KEYS:
            if key in summary:
                logs[f"val_{key}"] = float(summary[key])
        for prefix in VAL_CLASS_PREFIXES:
            for key, value in summary.items():
                if key.startswith(prefix) and key[len(prefix) :].isdigit():
                    logs[f"val_{key}"] = float(value)
        score = float(summary["score"])
        if _better(score, self.best_score) or not path.is_file():
            if _better(score, self.best_score):
                self.best_score, self.best_epoch = score, done
            save_weights_atomic(self.model, path)
            logger.info("epoch %d: validation score %.4f, weights saved to %s", done, score, path)
        else:
            logger.info(
                "epoch %d: validation score %.4f (best %.4f at epoch %d)",
                done,
                score,
                self.best_score,
                self.best_epoch,
            )


class BatchNormReestimation(keras.callbacks.Callback):
    """Re-estimate the batch-norm statistics before :class:`BestCheckpoint` validates or saves.

    Runs at the end of every epoch that :class:`BestCheckpoint` validates (every ``val_every``
    epochs and the last one), or of every epoch with ``every_epoch`` (no validation images: the
    weights are saved every epoch; ``keep_epoch_weights``). The batch norms that train (the
    frozen ones keep their statistics, see :func:`kerasnuc.models.batchnorm.
    reestimated_layers`) get the average statistics of ``batches()`` under the current weights.
    Training itself does not read the moving statistics, so the steps that follow are
    unchanged; the moving averages continue from the re-estimated values.

    Args:
        batches: returns a fresh iterable of model input batches each time it is called (the
            same batches every time keeps a resumed run identical to an uninterrupted one).
        val_every: validation interval of :class:`BestCheckpoint`.
        epochs: total epochs (the last one is always validated).
        every_epoch: re-estimate after every epoch.
    """

    def __init__(
        self,
        batches: Callable[[], Iterable[Any]],
        val_every: int = 1,
        epochs: int = 1,
        every_epoch: bool = False,
    ):
        super().__init__()
        if val_every < 1:
            raise ValueError(f"`val_every` must be >= 1. Received: val_every={val_every}")
        self.batches = batches
        self.val_every = val_every
        self.epochs = epochs
        self.every_epoch = every_epoch

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if not self.every_epoch and done % self.val_every and done != self.epochs:
            return
        n = reestimate_batch_norm(self.model, self.batches())
        logger.info("epoch %d: batch-norm statistics re-estimated from %d batches", done, n)


class TrainingState(keras.callbacks.Callback):
    """Record the history and save the full training state at the end of every epoch.

    Args:
        run_dir: run folder (``history.csv`` and ``checkpoint/`` go there).
        best: the :class:`BestCheckpoint` whose best score is part of the state.
        history: rows of the epochs done before (resuming).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        best: BestCheckpoint,
        history: Sequence[dict[str, Any]] = (),
    ):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.best = best
        self.history = [dict(row) for row in history]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        optimizer = self.model.optimizer
        logs["lr"] = float(np.asarray(keras.ops.convert_to_numpy(optimizer.learning_rate)))
        row: dict[str, Any] = {"epoch": epoch + 1}
        row.update({k: float(np.asarray(v)) for k, v in logs.items()})
        self.history.append(row)
        write_history_csv(self.run_dir / HISTORY, self.history)
        save_training_state(
            self.run_dir / CHECKPOINT_DIR,
            self.model,
            optimizer,
            {
                "epoch": epoch + 1,
                "best_score": self.best.best_score,
                "best_epoch": self.best.best_epoch,
                "history": self.history,
            },
        )


def epoch_weights_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    """``run_dir/epochs/epoch_NNN.weights.h5`` of 1-based ``epoch``."""
    return Path(run_dir) / EPOCH_WEIGHTS_DIR / f"epoch_{epoch:03d}.weights.h5"


class EpochWeights(keras.callbacks.Callback):
    """Save the weights after every epoch (:func:`epoch_weights_path`, written atomically)."""

    def __init__(self, run_dir: str | os.PathLike):
        super().__init__()
        self.run_dir = Path(run_dir)

    def on_epoch_end(self, epoch, logs=None):
        path = epoch_weights_path(self.run_dir, epoch + 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights_atomic(self.model, path)


class EpochScalars(keras.callbacks.Callback):
    """Write every numeric entry of the epoch logs as a TensorBoard scalar (step = epoch).

    A minimal stand-in for ``keras.callbacks.TensorBoard``, whose scalar summaries need the
    ``tensorboard`` package at training time; this one uses only ``tf.summary.write`` with the
    scalars plugin's metadata, so the event files read in TensorBoard as usual.

    Args:
        log_dir: folder of the event files (``RUN_DIR/logs``).
    """

    def __init__(self, log_dir: str | os.PathLike):
        super().__init__()
        self.log_dir = os.fspath(log_dir)
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        metadata = summary_pb2.SummaryMetadata()
        metadata.plugin_data.plugin_name = "scalars"
        with self._writer.as_default(step=epoch + 1):
            for key, value in (logs or {}).items():
                tf.summary.write(
                    f"epoch_{key}",
                    tf.constant(float(np.asarray(value)), tf.float32),
                    metadata=metadata,
                )
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
