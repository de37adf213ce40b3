"""``fit`` wiring of a training run: config -> data, model, optimizer, callbacks -> run folder.

One entry point, :func:`train_run`, used by ``kerasnuc train``. For ``conic`` (Rumberger et al.,
CoNIC 2022): the method's pipeline with importance sampling and augmentation, AdamW with weight
decay and a cosine-annealed learning rate over all steps, the three losses summed, and the
checkpoint with the best validation mPQ+ (PQ for class-agnostic data) computed with the real
post-processing on the validation split.

Choices where the paper is silent:

* One epoch is ``steps_per_epoch`` batches (default ``ceil(train images / batch size)``) and the
  pipeline draws ``steps_per_epoch * batch_size`` crops per epoch, so that the pipeline's epochs
  and Keras' epochs coincide and a resumed run continues the data stream exactly where it
  stopped (``start_epoch``).
* The full training state is saved after every epoch; resuming restores it and calls ``fit``
  with ``initial_epoch``. With ``PipelineConfig.deterministic=True`` and one thread per op a
  resumed run reproduces the history of an uninterrupted one; with the default parallel,
  non-deterministic pipeline only the order of the crops inside a batch window may differ.
* Validation uses the run's ``postproc.json`` (defaults until ``kerasnuc tune`` writes tuned
  thresholds), so that checkpoint selection and final inference agree.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import keras

from kerasnuc.config import DataConfig, RunConfig
from kerasnuc.data.dataset import Dataset
from kerasnuc.fileutil import KerasnucError
from kerasnuc.optimizers.schedules import build_optimizer, set_clip_norm
from kerasnuc.runs import (
    BEST_WEIGHTS,
    CHECKPOINT_DIR,
    HISTORY,
    LOG_DIR,
    POSTPROC,
    RUN_CONFIG,
    load_config,
    load_initial_weights,
    save_config,
)
from kerasnuc.training.callbacks import (
    BestCheckpoint,
    EpochScalars,
    EpochWeights,
    TrainingState,
)
from kerasnuc.training.checkpoint import has_checkpoint, restore_training_state
from kerasnuc.training.strategy import get_strategy, precision_policy
from kerasnuc.training.validation import val_items

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train_run` did.

    Attributes:
        run_dir: the run folder.
        config: the resolved run config written to ``config.json``.
        history: one dict per epoch (``epoch``, losses, ``lr``, ``val_*``).
        best_score: best validation score (NaN: never validated).
        best_epoch: epoch (1-based) of the weights in ``model.weights.h5``.
        initial_epoch: epochs already done when this call started (resuming).
        model: the trained Keras model (weights of the last epoch).
    """

    run_dir: Path
    config: RunConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = math.nan
    best_epoch: int = 0
    initial_epoch: int = 0
    model: Any = None


def open_datasets(
    paths: Sequence[str | os.PathLike], data: DataConfig | None = None
) -> list[Dataset]:
    """Open the dataset folders of a run (KerasnucError naming a missing one).

    Args:
        paths: dataset folders.
        data: the run's data config; its ``dataset_mpp`` gives assumed pixel sizes.
    """
    if not paths:
        raise KerasnucError("no training dataset given (--data DIR)")
    out = []
    for p in paths:
        if not Path(p).is_dir():
            raise KerasnucError(f"{p}: dataset folder not found")
        out.append(Dataset(p, mpp=data.assumed_mpp(p) if data is not None else None))
    return out


def resolve_config(config: RunConfig, datasets: Sequence[Dataset]) -> RunConfig:
    """Fill in what depends on the data: steps per epoch and samples per epoch.

    ``train.steps_per_epoch`` defaults to ``ceil(train images / batch size)``; the pipeline's
    ``samples_per_epoch`` becomes ``steps_per_epoch * batch_size`` (see the module docstring).

    Raises:
        KerasnucError: the training split is empty.
    """
    split = config.data.train_split
    n_train = sum(len(ds.split(split)) for ds in datasets)
    if n_train == 0:
        roots = ", ".join(str(ds.root) for ds in datasets)
        raise KerasnucError(f"no images in split {split!r} of {roots}")
    batch = int(config.pipeline.get("batch_size", 8))
    steps = config.train.steps_per_epoch or max(1, math.ceil(n_train / batch))
    pipeline = dict(config.pipeline)
    pipeline["samples_per_epoch"] = steps * batch
    return replace(config, pipeline=pipeline, train=replace(config.train, steps_per_epoch=steps))


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Check ``run_dir`` for a new run (empty or absent) or a resumed one (has a checkpoint).

    Raises:
        KerasnucError: resuming without a checkpoint, or a non-empty folder without ``resume``
            or ``overwrite``.
    """
    if resume:
        if not has_checkpoint(run_dir / CHECKPOINT_DIR):
            raise KerasnucError(f"{run_dir}: no training checkpoint to resume (not started?)")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise KerasnucError(
                f"{run_dir}: already exists (use --resume to continue it or --overwrite)"
            )
        for name in (RUN_CONFIG, HISTORY, BEST_WEIGHTS, POSTPROC):
            (run_dir / name).unlink(missing_ok=True)
        import shutil

        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
        shutil.rmtree(run_dir / LOG_DIR, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def train_run(
    config: RunConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    verbose: int | str = "auto",
    callbacks: Sequence[keras.callbacks.Callback] = (),
    tensorboard: bool = True,
) -> TrainResult:
    """Train the model of ``config`` into ``run_dir``.

    Args:
        config: run config; ``data.datasets`` names the dataset folders; the ``model`` section
            must have ``num_classes = max(1, C)`` of the data. Ignored when resuming (the run's
            ``config.json`` is used).
        run_dir: output folder (see :mod:`kerasnuc.runs` for its files).
        resume: continue the run from ``run_dir/checkpoint``.
        overwrite: replace the outputs of an existing run folder.
        verbose: Keras ``fit`` verbosity (1: progress bar).
        callbacks: extra Keras callbacks, run after the kerasnuc ones.
        tensorboard: write TensorBoard logs to ``run_dir/logs``.

    Returns:
        :class:`TrainResult`.

    Raises:
        KerasnucError: bad data or run folder (one-line messages for the CLI).
    """
    from kerasnuc.data.pipeline import shared_classes
    from kerasnuc.registry import get_method

    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume, overwrite)
    if resume:
        config = load_config(run_dir)
    method = get_method(config.method)
    datasets = open_datasets(config.data.datasets, config.data)
    num_classes, _ = shared_classes(datasets)
    model_cfg = method.model_config.from_dict(config.model)
    if getattr(model_cfg, "num_classes", None) != max(1, num_classes):
        raise KerasnucError(
            f"the model has num_classes={getattr(model_cfg, 'num_classes', None)} but the data "
            f"has {num_classes} classes (use {max(1, num_classes)})"
        )
    if not resume:
        config = resolve_config(config, datasets)
        if method.prepare_config is not None:
            config = method.prepare_config(config, datasets)
        save_config(config, run_dir)
        if not (run_dir / POSTPROC).is_file():
            method.new_postproc(config).save(run_dir / POSTPROC)
    pipeline_cfg = _pipeline_config(config)
    train_cfg = config.train
    postproc = method.postproc_config.load(run_dir / POSTPROC)
    try:
        items, _ = val_items(
            datasets, config.data.val_split, config.data.mpp, train_cfg.val_max_images
        )
    except KerasnucError as exc:
        logger.warning("no validation (%s): the last epoch's weights are kept", exc)
        items = []

    with precision_policy(train_cfg.mixed_precision):
        keras.utils.set_random_seed(train_cfg.seed)
        strategy = get_strategy(train_cfg.strategy)
        steps = int(train_cfg.steps_per_epoch)
        with strategy.scope():
            model = method.build(method.model_config.from_dict(config.model))
            make_optimizer = method.optimizer or build_optimizer
            optimizer = make_optimizer(train_cfg, train_cfg.epochs * steps)
            set_clip_norm(optimizer, train_cfg.clip_norm)
            model.compile(
                optimizer=optimizer,
                loss=method.losses(max(1, num_classes)),
                jit_compile=train_cfg.jit_compile,
            )
            # The optimizer's variables are made here, eagerly, on every trainable variable of the
            # model as built: left to Keras they are made inside the traced train step, where each
            # one is lifted out of the graph (a fifth of the tracing time of a B0 conic model).
            model.optimizer.build(model.trainable_variables)
            state = {"epoch": 0, "best_score": math.nan, "best_epoch": 0, "history": []}
            if train_cfg.init_from and not resume:
                path = load_initial_weights(model, train_cfg.init_from)
                logger.info("starting from the weights of %s", path)
            if resume:
                state = restore_training_state(run_dir / CHECKPOINT_DIR, model, model.optimizer)
        start = int(state["epoch"])
        result = TrainResult(run_dir, config, initial_epoch=start, model=model)
        if start >= train_cfg.epochs:
            logger.info("%s: all %d epochs already done", run_dir, train_cfg.epochs)
            result.history = state["history"]
            result.best_score, result.best_epoch = state["best_score"], state["best_epoch"]
            return result

        options = method.dataset_options(config) if method.dataset_options is not None else {}
        data = method.dataset(
            datasets,
            config.data.train_split,
            pipeline_cfg,
            training=True,
            start_epoch=start,
            target_mpp=config.data.mpp,
            **options,
        )
        if method.initialize is not None and start == 0 and not train_cfg.init_from:
            with strategy.scope():
                method.initialize(model, config, data)
        if train_cfg.strategy == "multiworker":
            import tensorflow as tf

            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.DATA
            )
            data = data.with_options(options)
        best = BestCheckpoint(
            run_dir,
            items,
            num_classes,
            method.postprocess,
            postproc,
            val_every=train_cfg.val_every,
            epochs=train_cfg.epochs,
            best_score=state["best_score"],
            best_epoch=state["best_epoch"],
        )
        record = TrainingState(run_dir, best, state["history"])
        all_callbacks: list[keras.callbacks.Callback] = []
        if method.callbacks is not None:
            all_callbacks.extend(method.callbacks(config, model))
        all_callbacks.extend([best, record])
        if train_cfg.keep_epoch_weights:
            all_callbacks.append(EpochWeights(run_dir))
        if tensorboard:
            all_callbacks.append(EpochScalars(run_dir / LOG_DIR))
        all_callbacks.extend(callbacks)
        logger.info(
            "training %s: epochs %d..%d, %d steps per epoch, %d validation images",
            config.method,
            start + 1,
            train_cfg.epochs,
            steps,
            len(items),
        )
        model.fit(
            data,
            epochs=train_cfg.epochs,
            initial_epoch=start,
            steps_per_epoch=steps,
            callbacks=all_callbacks,
            verbose=verbose,
        )
    result.history = record.history
    result.best_score, result.best_epoch = best.best_score, best.best_epoch
    return result


def _pipeline_config(config: RunConfig):
    from kerasnuc.data.pipeline import PipelineConfig

    try:
        return PipelineConfig.from_dict(config.pipeline)
    except (TypeError, ValueError) as exc:
        raise KerasnucError(
            f"invalid pipeline config {json.dumps(config.pipeline)} ({exc})"
        ) from exc
