"""METHODS: method name -> model builder, config types, losses, pipeline and post-processor.

Importing this module imports Keras and TensorFlow (command bodies do it, never ``--help``).
Every entry refers to real functions, so renaming one breaks at import time, not at run time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kerasnuc.config import BEST_WEIGHTS, POSTPROC, RunConfig
from kerasnuc.data.pipeline import conic_dataset, panoptic_dataset
from kerasnuc.fileutil import KerasnucError
from kerasnuc.losses.conic import conic_losses
from kerasnuc.models.conic import OUTPUT_NAMES as CONIC_OUTPUTS
from kerasnuc.models.conic import ConicModelConfig, build_conic_from_config
from kerasnuc.models.panoptic.model import OUTPUT_NAMES as PANOPTIC_OUTPUTS
from kerasnuc.models.panoptic.model import PanopticModelConfig, build_panoptic_from_config
from kerasnuc.postprocess.common import PostprocResult
from kerasnuc.postprocess.conic import PostprocConfig, postprocess_conic
from kerasnuc.postprocess.panoptic import PanopticPostprocConfig, postprocess_panoptic


@dataclass(frozen=True)
class Method:
    """Everything kerasnuc needs to train, run and post-process one method.

    Attributes:
        name: method name.
        description: one line for ``--help`` and ``kerasnuc models``.
        model_config: config dataclass of the model (``to_dict``/``from_dict``).
        build: ``model_config instance -> keras.Model`` with a dict of named outputs.
        losses: ``num_classes -> {output name: keras loss}``.
        dataset: pipeline function of :mod:`kerasnuc.data.pipeline`.
        outputs: names of the model outputs.
        postproc_config: post-processing config dataclass (``save``/``load``/``from_dict``).
        postprocess: ``(maps {output: (H, W, K) float32}, postproc config) -> PostprocResult``.
        optimizer: ``(TrainConfig, total steps) -> keras optimizer``; None: AdamW with the
            cosine schedule (:func:`kerasnuc.training.schedules.build_optimizer`).
        callbacks: ``(RunConfig, model) -> [keras callbacks]`` run before kerasnuc's own ones in
            training (e.g. a frozen-encoder phase); None: none.
        prepare_config: ``(RunConfig, [Dataset]) -> RunConfig`` called once when a new run
            starts, before ``config.json`` is written (e.g. to fit a stain reference that then
            travels in the model config); None: the config is used as it is.
        dense_outputs: whether every output is a dense ``(B, H, W, K)`` map that test-time
            augmentation may flip, rotate and average (False for detection outputs, e.g.
            ``panoptic``: the Predictor then refuses TTA).

    ``losses`` may return None for a model that computes its own loss (``compute_loss``).
    """

    name: str
    description: str
    model_config: type
    build: Callable[[Any], keras.Model]
    losses: Callable[[int], dict[str, Any]]
    dataset: Callable[..., Any]
    outputs: tuple[str, ...]
    postproc_config: type
    postprocess: Callable[[Mapping[str, np.ndarray], Any], PostprocResult]
    optimizer: Callable[[Any, int], Any] | None = None
    callbacks: Callable[[RunConfig, keras.Model], list] | None = None
    prepare_config: Callable[[RunConfig, list], RunConfig] | None = None
    dense_outputs: bool = True


def _conic_postprocess(maps: Mapping[str, np.ndarray], config: PostprocConfig) -> PostprocResult:
    return postprocess_conic(maps.get("semantic"), maps["three_label"], config)


def _panoptic_prepare(config: RunConfig, datasets: list) -> RunConfig:
    """SGD in the config; the paper's augmentations unless the run chose its own."""
    from kerasnuc.data.augment import AugmentConfig

    pipeline = dict(config.pipeline)
    if AugmentConfig.from_dict(pipeline.get("augment", {})) == AugmentConfig():
        pipeline["augment"] = AugmentConfig.panoptic().to_dict()
    train = config.train
    if train.optimizer == "adamw":  # the generic default
        train = dataclasses.replace(train, optimizer="sgd")
    return dataclasses.replace(config, pipeline=pipeline, train=train)


def _panoptic_optimizer(train_cfg, total_steps: int):
    from kerasnuc.training.schedules import build_sgd_warmup_step

    return build_sgd_warmup_step(train_cfg, total_steps)


METHODS: dict[str, Method] = {
    "conic": Method(
        name="conic",
        description="dual-decoder U-Net, EfficientNet encoder (Rumberger et al. 2022)",
        model_config=ConicModelConfig,
        build=build_conic_from_config,
        losses=conic_losses,
        dataset=conic_dataset,
        outputs=CONIC_OUTPUTS,
        postproc_config=PostprocConfig,
        postprocess=_conic_postprocess,
    ),
    "panoptic": Method(
        name="panoptic",
        description="Mask R-CNN + GCN semantic branch + feature fusion (Liu et al. 2019)",
        model_config=PanopticModelConfig,
        build=build_panoptic_from_config,
        losses=lambda num_classes: None,
        dataset=panoptic_dataset,
        outputs=PANOPTIC_OUTPUTS,
        postproc_config=PanopticPostprocConfig,
        postprocess=postprocess_panoptic,
        optimizer=_panoptic_optimizer,
        prepare_config=_panoptic_prepare,
        dense_outputs=False,
    ),
}


def get_method(name: str) -> Method:
    """The registry entry of ``name`` (KerasnucError naming the known methods otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise KerasnucError(f"unknown method {name!r} (available: {sorted(METHODS)})") from None


@dataclass
class LoadedRun:
    """A trained run directory, ready to predict.

    Attributes:
        run_dir: the folder.
        config: its :class:`~kerasnuc.config.RunConfig`.
        method: its registry entry.
        model: the Keras model with the chosen weights loaded.
        postproc: the post-processing config (``postproc.json``, else the method's defaults).
    """

    run_dir: Path
    config: RunConfig
    method: Method
    model: keras.Model
    postproc: Any


def build_model(config: RunConfig) -> keras.Model:
    """Build the model of a run config without any pretrained-encoder file."""
    method = get_method(config.method)
    model_cfg = method.model_config.from_dict(config.model)
    if getattr(model_cfg, "encoder_weights", None) is not None:
        model_cfg = dataclasses.replace(model_cfg, encoder_weights=None)
    return method.build(model_cfg)


def load_run(run_dir: str | os.PathLike, weights: str | os.PathLike | None = None) -> LoadedRun:
    """Rebuild the model of a run directory and load its weights and post-processing settings.

    Args:
        run_dir: a folder written by ``kerasnuc train``.
        weights: weights file (default ``RUN_DIR/model.weights.h5``).

    Raises:
        KerasnucError: missing or incompatible files.
    """
    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir)
    method = get_method(config.method)
    model = build_model(config)
    path = Path(weights) if weights is not None else run_dir / BEST_WEIGHTS
    if not path.is_file():
        raise KerasnucError(f"{path}: weights file not found")
    try:
        model.load_weights(path)
    except (ValueError, OSError) as exc:
        raise KerasnucError(
            f"{path}: cannot load weights into the {config.method} model ({exc})"
        ) from exc
    pp_path = run_dir / POSTPROC
    postproc = (
        method.postproc_config.load(pp_path) if pp_path.is_file() else method.postproc_config()
    )
    return LoadedRun(run_dir, config, method, model, postproc)
