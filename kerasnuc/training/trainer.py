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
* The full training state is saved after every epoch (model variables including batch-norm
  statistics, the conic class prior and the dropout seed generators; optimizer variables
  including the step that drives the schedule); resuming restores it and calls ``fit`` with
  ``initial_epoch``, and the pipeline restarts at ``start_epoch`` with the same per-element
  seeds. On a CPU, with ``PipelineConfig.deterministic`` (the default), a resumed run is
  bit-identical to an uninterrupted one. Not so with ``deterministic=False`` (crops of the
  parallel maps overtake each other, so batches differ from run to run), and on GPUs, whose
  kernels (e.g. cuDNN convolution gradients) are not deterministic unless TensorFlow's op
  determinism is enabled.
* Validation uses the run's ``postproc.json`` (the ``--init-from`` run's tuned thresholds, else
  the defaults, until ``kerasnuc tune`` writes tuned ones), so that checkpoint selection and
  final inference agree.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import keras

from kerasnuc.config import DataConfig, RunConfig
from kerasnuc.data.dataset import Dataset
from kerasnuc.data.info import check_labels
from kerasnuc.fileutil import KerasnucError
from kerasnuc.models.freeze import train_only
from kerasnuc.optimizers.schedules import build_optimizer, set_clip_norm
from kerasnuc.runs import (
    CHECKPOINT_DIR,
    LOG_DIR,
    POSTPROC,
    RUN_CONFIG,
    initial_postproc,
    load_config,
    load_initial_weights,
    save_config,
)
from kerasnuc.training.callbacks import (
    BatchNormReestimation,
    BestCheckpoint,
    EpochScalars,
    EpochWeights,
    TrainingState,
)
from kerasnuc.training.checkpoint import restore_training_state
from kerasnuc.training.run_folder import (
    discard_unstarted_run,
    finish_run_dir,
    prepare_run_dir,
    resume_dir,
)
from kerasnuc.training.strategy import (
    get_strategy,
    precision_policy,
    synchronize_batch_norm,
    worker_role,
)
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


class RunFiles(keras.callbacks.Callback):
    """Write ``config.json`` and ``postproc.json`` of a new run at the end of its first epoch.

    Until then the run folder stays empty, so a run that fails before it has anything to
    resume leaves nothing behind that would block a rerun.
    """

    def __init__(self, run_dir: Path, config: RunConfig, postproc: Any) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.config = config
        self.postproc = postproc

    def on_epoch_end(self, epoch, logs=None):
        if not (self.run_dir / RUN_CONFIG).is_file():
            save_config(self.config, self.run_dir)
        if not (self.run_dir / POSTPROC).is_file():
            self.postproc.save(self.run_dir / POSTPROC)


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

    Everything is checked (data, classes, config, the folder is writable) before anything is
    written or deleted. A new run writes its files from the end of its first epoch on; if it
    fails before that, what it wrote is removed again. With ``overwrite`` an existing run is
    replaced only when the new one has finished: until then the new one trains in
    :func:`~kerasnuc.runs.pending_run_dir`, where ``resume`` continues it.

    Args:
        config: run config; ``data.datasets`` names the dataset folders; the ``model`` section
            must have ``num_classes = max(1, C)`` of the data. Ignored when resuming (the run's
            ``config.json`` is used).
        run_dir: output folder (see :mod:`kerasnuc.runs` for its files).
        resume: continue the run from its checkpoint (see :func:`resume_dir`).
        overwrite: replace an existing run folder (once the new run has finished).
        verbose: Keras ``fit`` verbosity (1: progress bar).
        callbacks: extra Keras callbacks, run after the kerasnuc ones.
        tensorboard: write TensorBoard logs to ``run_dir/logs``.

    With ``train.strategy == "multiworker"`` every worker process calls this with the same
    arguments and its own ``TF_CONFIG``; only the chief writes into ``run_dir``, the others into
    a temporary folder (see :func:`_worker_scratch`), so ``run_dir`` may be shared storage.

    Returns:
        :class:`TrainResult`.

    Raises:
        KerasnucError: bad data or run folder (one-line messages for the CLI).
    """
    run_dir = Path(run_dir)
    source = resume_dir(run_dir) if resume else None
    if (load_config(source) if source else config).train.strategy == "multiworker":
        kind, index, chief = worker_role()
        if not chief:
            with _worker_scratch(source, f"{kind}{index}") as scratch:
                return _train_run(config, scratch, resume, True, verbose, callbacks, tensorboard)
    return _train_run(config, run_dir, resume, overwrite, verbose, callbacks, tensorboard)


# Keep the scratch folder of a non-chief worker (for tests and debugging); it is removed otherwise.
KEEP_WORKER_DIR_ENV = "KERASNUC_KEEP_WORKER_DIR"


@contextlib.contextmanager
def _worker_scratch(source: Path | None, task: str) -> Iterator[Path]:
    """A temporary run folder for a non-chief worker of a multi-worker run.

    Only the chief writes into the run folder (weights, checkpoint, history, logs); the other
    workers run the same steps and write their copies here, as TensorFlow's multi-worker
    guide prescribes. Resuming, the scratch folder starts as a copy of ``source``, the folder
    the chief resumes (:func:`resume_dir`), so every worker restores the same state.
    """
    scratch = Path(tempfile.mkdtemp(prefix=f"kerasnuc-{task}-"))
    logger.info("%s is not the chief: its run files go to %s", task, scratch)
    try:
        if source is not None:
            shutil.copytree(source, scratch, dirs_exist_ok=True)
        yield scratch
    finally:
        if os.environ.get(KEEP_WORKER_DIR_ENV) != "1":
            shutil.rmtree(scratch, ignore_errors=True)


def _train_run(
    config: RunConfig,
    run_dir: Path,
    resume: bool,
    overwrite: bool,
    verbose: int | str,
    callbacks: Sequence[keras.callbacks.Callback],
    tensorboard: bool,
) -> TrainResult:
    from kerasnuc.data.pipeline import shared_classes
    from kerasnuc.registry import get_method

    run_dir = Path(run_dir)
    if resume:
        folder = resume_dir(run_dir)
        config = load_config(folder)
        if folder != run_dir:
            logger.info("%s: continuing its unfinished replacement in %s", run_dir, folder)
    method = get_method(config.method)
    datasets = open_datasets(config.data.datasets, config.data)
    check_labels(datasets, (config.data.train_split, config.data.val_split))
    num_classes, data_class_names = shared_classes(datasets)
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
    pipeline_cfg = _pipeline_config(config)
    if resume and (folder / POSTPROC).is_file():
        postproc = method.postproc_config.load(folder / POSTPROC)
    else:  # the --init-from run's tuned settings (classes matched by name), else the defaults
        postproc = initial_postproc(method, config)
    try:
        items, _ = val_items(
            datasets, config.data.val_split, config.data.mpp, config.train.val_max_images
        )
    except KerasnucError as exc:
        logger.warning("no validation (%s): the last epoch's weights are kept", exc)
        items = []
    created = False
    if not resume:
        folder, created = prepare_run_dir(run_dir, overwrite)
    try:
        result = _fit(
            config,
            folder,
            method,
            datasets,
            num_classes,
            data_class_names,
            pipeline_cfg,
            postproc,
            items,
            resume,
            verbose,
            callbacks,
            tensorboard,
        )
    except BaseException:
        if not resume:
            discard_unstarted_run(folder, run_dir, created)
        raise
    finish_run_dir(folder, run_dir)
    result.run_dir = run_dir
    return result


def _build_train_state(model: keras.Model, data: Any) -> None:
    """Make the variables of the compiled loss and metrics before ``fit`` traces the train step.

    Without a distribution strategy Keras 3 leaves them (one loss tracker per output, the
    optimizer's slots) to the first trace of the train step; a ``tf.function`` that creates
    variables on its first trace is traced a second time, so every run started by tracing its
    whole train step twice. Keras builds them beforehand itself under a distribution strategy
    (``Trainer._symbolic_build``: a symbolic forward pass on the shapes of a batch); this does
    the same for every strategy, on the dataset's element spec (a Lite0 conic model starts
    ~30 % faster). Skipped if a later Keras drops that method (the train step is then traced
    twice again, nothing else changes).
    """
    symbolic_build = getattr(model, "_symbolic_build", None)
    if symbolic_build is not None:
        symbolic_build(data_batch=data.element_spec)


def _fit(
    config: RunConfig,
    run_dir: Path,
    method: Any,
    datasets: list[Dataset],
    num_classes: int,
    class_names: dict[int, str],
    pipeline_cfg: Any,
    postproc: Any,
    items: list,
    resume: bool,
    verbose: int | str,
    callbacks: Sequence[keras.callbacks.Callback],
    tensorboard: bool,
) -> TrainResult:
    """Build, restore and fit the model of ``config`` in the training folder ``run_dir``."""
    train_cfg = config.train
    with precision_policy(train_cfg.mixed_precision):
        keras.utils.set_random_seed(train_cfg.seed)
        strategy = get_strategy(train_cfg.strategy)
        steps = int(train_cfg.steps_per_epoch)
        with strategy.scope():
            model = method.build(method.model_config.from_dict(config.model))
            if train_cfg.init_from and not resume:
                # Before compile: a run's weights file also holds its optimizer's state (the
                # step count that drives the learning-rate schedule, the Adam moments); a model
                # without an optimizer takes the layer weights only, so the new run starts its
                # own schedule at step 0.
                path = load_initial_weights(
                    model,
                    train_cfg.init_from,
                    class_names=None if method.class_agnostic else class_names,
                    class_layers=method.class_layers,
                )
                logger.info("starting from the weights of %s", path)
            if train_cfg.train_only is not None:
                if method.callbacks is not None:
                    raise ValueError(
                        f"`train_only` is not available for {config.method}: its own schedule "
                        "decides which layers train (freeze_encoder_epochs)"
                    )
                train_only(model, train_cfg.train_only)
            if train_cfg.strategy == "multiworker":
                synchronize_batch_norm(model)
            make_optimizer = method.optimizer or build_optimizer
            optimizer = make_optimizer(train_cfg, train_cfg.epochs * steps)
            set_clip_norm(optimizer, train_cfg.clip_norm)
            model.compile(
                optimizer=optimizer,
                loss=method.losses(max(1, num_classes)),
                jit_compile=train_cfg.jit_compile,
            )
            # The optimizer's variables are made here, eagerly, on every trainable variable of the
            # model as built (see _build_train_state for why not inside the first train step).
            model.optimizer.build(model.trainable_variables)
            state = {"epoch": 0, "best_score": math.nan, "best_epoch": 0, "history": []}
            if resume:
                state = restore_training_state(run_dir / CHECKPOINT_DIR, model, model.optimizer)
        start = int(state["epoch"])
        result = TrainResult(run_dir, config, initial_epoch=start, model=model)
        if start >= train_cfg.epochs:
            logger.info("%s: all %d epochs already done", run_dir, train_cfg.epochs)
            result.history = state["history"]
            result.best_score, result.best_epoch = state["best_score"], state["best_epoch"]
            return result

        data = _train_dataset(method, datasets, config, pipeline_cfg, start_epoch=start)
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
        all_callbacks: list[keras.callbacks.Callback] = [RunFiles(run_dir, config, postproc)]
        if method.callbacks is not None:
            all_callbacks.extend(method.callbacks(config, model))
        if train_cfg.bn_reestimation_batches:
            all_callbacks.append(
                BatchNormReestimation(
                    _reestimation_batches(
                        method, datasets, config, pipeline_cfg, train_cfg.bn_reestimation_batches
                    ),
                    val_every=train_cfg.val_every,
                    epochs=train_cfg.epochs,
                    every_epoch=not items or train_cfg.keep_epoch_weights,
                )
            )
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
        with strategy.scope():
            _build_train_state(model, data)
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


def _train_dataset(
    method: Any, datasets: list[Dataset], config: RunConfig, pipeline_cfg: Any, start_epoch: int
):
    """The run's training ``tf.data`` pipeline (the method's targets and options), from
    ``start_epoch`` on."""
    options = method.dataset_options(config) if method.dataset_options is not None else {}
    return method.dataset(
        datasets,
        config.data.train_split,
        pipeline_cfg,
        training=True,
        start_epoch=start_epoch,
        target_mpp=config.data.mpp,
        **options,
    )


def _reestimation_batches(
    method: Any, datasets: list[Dataset], config: RunConfig, pipeline_cfg: Any, count: int
):
    """``() -> iterator over the images of the first count training batches`` of the run's own
    pipeline (sampling and augmentation included), always drawn from epoch 0 so that every
    re-estimation, also in a resumed run, sees the same batches."""
    data = _train_dataset(method, datasets, config, pipeline_cfg, start_epoch=0).take(count)

    def batches():
        return (x for x, _ in data)

    return batches


def _pipeline_config(config: RunConfig):
    from kerasnuc.data.pipeline import PipelineConfig

    try:
        return PipelineConfig.from_dict(config.pipeline)
    except (TypeError, ValueError) as exc:
        raise KerasnucError(
            f"invalid pipeline config {json.dumps(config.pipeline)} ({exc})"
        ) from exc
