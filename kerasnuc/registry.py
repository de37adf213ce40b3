"""METHODS: method name -> model builder, config types, losses, pipeline, post-processor, tuner.

Importing this module imports Keras and TensorFlow (command bodies do it, never ``--help``).
Every entry refers to real functions, so renaming one breaks at import time, not at run time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from kerasnuc.config import RunConfig
from kerasnuc.data.pipeline import conic_dataset, panoptic_dataset, unet_sharp_dataset, weak_dataset
from kerasnuc.fileutil import KerasnucError
from kerasnuc.io.points import read_points_path
from kerasnuc.losses.conic import conic_losses
from kerasnuc.losses.focal_tversky import FocalTversky
from kerasnuc.models.conic import OUTPUT_NAMES as CONIC_OUTPUTS
from kerasnuc.models.conic import ConicModelConfig, build_conic_from_config
from kerasnuc.models.panoptic.model import OUTPUT_NAMES as PANOPTIC_OUTPUTS
from kerasnuc.models.panoptic.model import PanopticModelConfig, build_panoptic_from_config
from kerasnuc.models.unet_sharp import OUTPUT_NAMES as UNET_SHARP_OUTPUTS
from kerasnuc.models.unet_sharp import UnetSharpModelConfig, build_unet_sharp_from_config
from kerasnuc.models.weak import OUTPUT_NAMES as WEAK_OUTPUTS
from kerasnuc.models.weak import WeakModelConfig, build_weak_from_config, fit_input_normalisation
from kerasnuc.optimizers.lookahead import ranger
from kerasnuc.postprocess.common import PostprocResult, grid_search
from kerasnuc.postprocess.conic import DEFAULT_GRID as CONIC_GRID
from kerasnuc.postprocess.conic import ConicPostprocConfig, postprocess_conic, tune_conic
from kerasnuc.postprocess.panoptic import DEFAULT_GRID as PANOPTIC_GRID
from kerasnuc.postprocess.panoptic import (
    PanopticPostprocConfig,
    postprocess_panoptic,
    tune_panoptic_postproc,
)
from kerasnuc.postprocess.unet_sharp import DEFAULT_GRID as UNET_SHARP_GRID
from kerasnuc.postprocess.unet_sharp import (
    UnetSharpPostprocConfig,
    postprocess_unet_sharp,
    tune_unet_sharp,
)
from kerasnuc.postprocess.weak import DEFAULT_GRID as WEAK_GRID
from kerasnuc.postprocess.weak import WeakPostprocConfig, postprocess_weak, tune_weak_postproc

logger = logging.getLogger(__name__)


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
            cosine schedule (:func:`kerasnuc.optimizers.schedules.build_optimizer`).
        callbacks: ``(RunConfig, model) -> [keras callbacks]`` run before kerasnuc's own ones in
            training (e.g. a frozen-encoder phase); None: none.
        prepare_config: ``(RunConfig, [Dataset]) -> RunConfig`` called once when a new run
            starts, before ``config.json`` is written (e.g. to fit a stain reference that then
            travels in the model config); None: the config is used as it is.
        dense_outputs: whether every output is a dense ``(B, H, W, K)`` map that test-time
            augmentation may flip, rotate and average (False for detection outputs, e.g.
            ``panoptic``: the Predictor then refuses TTA).
        train_defaults: ``TrainConfig`` fields that differ from the shared defaults for this
            method (e.g. its optimizer and learning rate); ``kerasnuc train`` starts from them.
        dataset_options: ``RunConfig -> {keyword: value}`` extra keyword arguments of
            ``dataset`` taken from the run config (e.g. the point annotations of ``weak``);
            None: none.
        default_postproc: ``RunConfig -> postproc config`` written as ``postproc.json`` when a
            run starts, and used by :func:`kerasnuc.runs.load_run` when a run folder has none
            (e.g. settings in micrometres that need the run's pixel size); None:
            ``postproc_config()``.
        initialize: ``(model, RunConfig, training tf.data.Dataset) -> None`` called once before
            the first step of a run that starts from scratch (not resumed, no ``init_from``),
            for data-dependent initialisation (e.g. the frozen batch-norm statistics of a
            ``panoptic`` ResNet without ImageNet weights); None: nothing.
        tune_grid: the default grid of ``kerasnuc tune``: post-processing setting -> values.
        tuner: ``(maps list, grid, score_fn, base config) -> (best config, table)``, the grid
            search of the post-processing settings on the model outputs of a labelled set
            (``score_fn(pred_instances, pred_classes) -> float`` over the set); None:
            :func:`~kerasnuc.postprocess.common.grid_search` of ``postprocess``. See
            :meth:`tune`.
        class_agnostic: the post-processing gives every nucleus class 1 whatever the data's
            cell types (e.g. ``weak``): tuned by PQ, and the model's ``num_classes`` is not
            compared with the data's by ``kerasnuc tune``.
        class_layers: names of the layers whose output channels are background + the C cell
            types in class-id order (the classifier): ``train --init-from`` a model whose
            classes are the data's in another order permutes their channels
            (:func:`kerasnuc.runs.permute_class_channels`).
        tune_tile: the default ``--tile`` of ``kerasnuc tune`` (predict and score tiles of at
            most this many pixels), None: whole images. ``panoptic``: 512, because one forward
            pass has ``max_detections`` slots (dense whole images fill them) and settings tuned
            on 512 px tiles scored better on Kumar ``val`` than those tuned on whole images
            (``benchmarks/panoptic_results.md``).

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
    train_defaults: Mapping[str, Any] | None = None
    dataset_options: Callable[[RunConfig], dict[str, Any]] | None = None
    default_postproc: Callable[[RunConfig], Any] | None = None
    initialize: Callable[[keras.Model, RunConfig, Any], None] | None = None
    tune_grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    tuner: Callable[..., tuple[Any, list[dict[str, Any]]]] | None = None
    class_agnostic: bool = False
    class_layers: tuple[str, ...] = ()
    tune_tile: int | None = None

    def tune(
        self,
        maps: Sequence[Mapping[str, np.ndarray]],
        grid: Mapping[str, Sequence[Any]] | None,
        score_fn: Callable[[list[np.ndarray], list[np.ndarray]], float],
        base_config: Any,
    ) -> tuple[Any, list[dict[str, Any]]]:
        """Grid-search the post-processing settings on model outputs of a labelled set.

        Args:
            maps: per image the model outputs ``{name: (H, W, K) float32}``.
            grid: setting -> candidate values (None: :attr:`tune_grid`).
            score_fn: ``score_fn(pred_instances, pred_classes) -> float`` over the whole set,
                higher is better.
            base_config: the settings not in the grid.

        Returns:
            ``(best_config, table)`` of :func:`~kerasnuc.postprocess.common.grid_search`.

        Raises:
            ValueError: a bad grid or no image.
        """
        grid = self.tune_grid if grid is None else grid
        if self.tuner is not None:
            return self.tuner(list(maps), grid, score_fn, base_config)
        return grid_search(list(maps), grid, self.postprocess, base_config, score_fn)

    def new_postproc(self, config: RunConfig) -> Any:
        """The post-processing settings of a new run of ``config`` (see ``default_postproc``)."""
        if self.default_postproc is not None:
            return self.default_postproc(config)
        return self.postproc_config()


def _conic_postprocess(
    maps: Mapping[str, np.ndarray], config: ConicPostprocConfig
) -> PostprocResult:
    return postprocess_conic(maps.get("semantic"), maps["three_label"], config)


def _conic_tune(
    maps: list[Mapping[str, np.ndarray]],
    grid: Mapping[str, Sequence[Any]],
    score_fn: Callable[[list[np.ndarray], list[np.ndarray]], float],
    base_config: ConicPostprocConfig,
) -> tuple[ConicPostprocConfig, list[dict[str, Any]]]:
    pairs = [(m.get("semantic"), m["three_label"]) for m in maps]
    return tune_conic(pairs, grid, score_fn, base_config)


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


#: Training batches whose images calibrate the frozen batch norms of a ResNet from scratch.
PANOPTIC_CALIBRATION_BATCHES = 4


def _panoptic_initialize(model: keras.Model, config: RunConfig, data: Any) -> None:
    """ResNet encoders without ImageNet weights: batch-norm statistics from the first training
    batches (:func:`kerasnuc.models.panoptic.backbone.calibrate_frozen_batch_norm`)."""
    from kerasnuc.models.panoptic.backbone import calibrate_frozen_batch_norm

    cfg = PanopticModelConfig.from_dict(config.model)
    if cfg.encoder == "tiny" or cfg.encoder_weights is not None:
        return
    images = np.concatenate(
        [np.asarray(x) for x, _ in data.take(PANOPTIC_CALIBRATION_BATCHES).as_numpy_iterator()]
    )
    n = calibrate_frozen_batch_norm(model.encoder, images)
    logger.info("%s: %d batch norms calibrated on %d training crops", cfg.encoder, n, len(images))


def _panoptic_optimizer(train_cfg, total_steps: int):
    from kerasnuc.optimizers.schedules import build_sgd_warmup_step

    return build_sgd_warmup_step(train_cfg, total_steps)


#: AdaBound settings of U-Net# (Stagys et al., Table I) besides lr, betas, eps and weight decay.
UNET_SHARP_FINAL_LR = 0.1
UNET_SHARP_GAMMA = 1e-3


def _unet_sharp_losses(num_classes: int) -> dict[str, Any]:
    """Focal Tversky loss (beta 0.7, gamma 4/3, background included) on the class ids."""
    return {"semantic": FocalTversky(beta=0.7, gamma=4.0 / 3.0, sparse=True)}


def _unet_sharp_optimizer(train: Any, total_steps: int) -> keras.optimizers.Optimizer:
    """AdaBound (lr ``train.learning_rate``, final lr 0.1, gamma 1e-3); ``"adamw"``: the default."""
    from kerasnuc.optimizers.adabound import AdaBound
    from kerasnuc.optimizers.schedules import build_optimizer

    if train.optimizer == "adamw":
        return build_optimizer(train, total_steps)
    if train.optimizer != "adabound":
        raise KerasnucError(
            f"unet_sharp trains with 'adabound' (or 'adamw'), not {train.optimizer!r}"
        )
    return AdaBound(
        learning_rate=train.learning_rate,
        final_lr=UNET_SHARP_FINAL_LR,
        gamma=UNET_SHARP_GAMMA,
        weight_decay=train.weight_decay,
    )


def _unet_sharp_callbacks(config: RunConfig, model: keras.Model) -> list:
    from kerasnuc.models.freeze import EncoderFreezeSchedule

    cfg = UnetSharpModelConfig.from_dict(config.model)
    return [EncoderFreezeSchedule(cfg.freeze_encoder_epochs, cfg.freeze_encoder_batchnorm)]


#: Training batches whose statistics calibrate the batch norms of a randomly initialised
#: unet_sharp encoder before the first step.
UNET_SHARP_CALIBRATION_BATCHES = 4


def _unet_sharp_initialize(model: keras.Model, config: RunConfig, data: Any) -> None:
    """A ResNeXt encoder without weights: batch-norm statistics from the first training batches.

    Freshly initialised batch norms hold mean 0 / variance 1, which a random encoder's
    activations are far from (reduced-width ResNeXt-50 on CoNSeP crops: feature std 10.8 at
    ``P4`` and 18.3 at ``P5`` instead of about 1.5 with the data's statistics), and the encoder's
    batch norms are frozen during ``freeze_encoder_epochs`` (and afterwards with
    ``freeze_encoder_batchnorm``), so without this they would never normalise.
    """
    from kerasnuc.models.batchnorm import reestimate_batch_norm
    from kerasnuc.models.freeze import batchnorm_layers

    cfg = UnetSharpModelConfig.from_dict(config.model)
    if cfg.encoder_weights is not None:
        return
    layers = batchnorm_layers(model.get_layer("encoder"))
    batches = (x for x, _ in data.take(UNET_SHARP_CALIBRATION_BATCHES))
    n = reestimate_batch_norm(model, batches, layers=layers)
    logger.info("%s: %d encoder batch norms calibrated on %d training batches", cfg.encoder,
                len(layers), n)  # fmt: skip


def _unet_sharp_prepare(config: RunConfig, datasets: list) -> RunConfig:
    """Fit the Macenko reference on the training images and store it in the model config."""
    from kerasnuc.data.stain import fit_macenko_reference

    cfg = UnetSharpModelConfig.from_dict(config.model)
    if not cfg.stain_normalization or cfg.stain_reference is not None:
        return config
    norm = fit_macenko_reference(datasets, config.data.train_split, seed=config.train.seed)
    cfg = dataclasses.replace(cfg, stain_reference=norm.to_dict())
    return dataclasses.replace(config, model=cfg.to_dict())


def _unet_sharp_postprocess(
    maps: Mapping[str, np.ndarray], config: UnetSharpPostprocConfig
) -> PostprocResult:
    return postprocess_unet_sharp(maps["semantic"], config)


def _unet_sharp_tune(
    maps: list[Mapping[str, np.ndarray]],
    grid: Mapping[str, Sequence[Any]],
    score_fn: Callable[[list[np.ndarray], list[np.ndarray]], float],
    base_config: UnetSharpPostprocConfig,
) -> tuple[UnetSharpPostprocConfig, list[dict[str, Any]]]:
    return tune_unet_sharp([m["semantic"] for m in maps], grid, score_fn, base_config)


def _weak_postprocess(maps: Mapping[str, np.ndarray], config: WeakPostprocConfig) -> PostprocResult:
    return postprocess_weak(maps["seg"], config)


def _weak_tune(
    maps: list[Mapping[str, np.ndarray]],
    grid: Mapping[str, Sequence[Any]],
    score_fn: Callable[[list[np.ndarray], list[np.ndarray]], float],
    base_config: WeakPostprocConfig,
) -> tuple[WeakPostprocConfig, list[dict[str, Any]]]:
    return tune_weak_postproc([m["seg"] for m in maps], grid, score_fn, base_config)


def _weak_losses(num_classes: int) -> None:
    """The weak model computes its own scheduled multi-task loss (``WeakModel.compute_loss``)."""
    return None


def _weak_optimizer(train: Any, total_steps: int) -> keras.optimizers.Optimizer:
    """Ranger = Lookahead(RAdam) at a constant ``train.learning_rate`` (paper: 1e-3).

    The other settings are those of Ranger's 2019 release (:func:`kerasnuc.optimizers.lookahead.
    ranger`: beta_1 0.95, epsilon 1e-5, k = 6, alpha = 0.5); the paper names no schedule and no
    weight decay, so ``train.weight_decay`` is not used.
    """
    if train.optimizer != "ranger":
        raise KerasnucError(
            f"the weak method trains with 'ranger', not {train.optimizer!r} (train.optimizer)"
        )
    return ranger(learning_rate=train.learning_rate)


def _weak_prepare_config(config: RunConfig, datasets: list) -> RunConfig:
    """Ranger as the optimizer, and the input standardisation fitted on the training images.

    The paper normalises "by mean subtraction and division by the standard deviation of the RGB
    channels" of the training set: mean and std are computed once over every pixel of the
    training split (at the data's own resolution) and travel in the model config.
    """
    model = WeakModelConfig.from_dict(config.model)
    # An ImageNet EfficientNet-Lite0 encoder scales its input itself (ImageNet statistics).
    if model.input_mean is None and model.encoder == "resnet50":
        split = config.data.train_split
        images = (ds.image(id) for ds in datasets for id in ds.split(split))
        mean, std = fit_input_normalisation(images)
        model = dataclasses.replace(model, input_mean=mean, input_std=std)
    train = config.train
    if train.optimizer == "adamw":  # the package-wide default: weak's is Ranger
        train = dataclasses.replace(train, optimizer="ranger")
    return dataclasses.replace(config, model=model.to_dict(), train=train)


def _weak_dataset_options(config: RunConfig) -> dict[str, Any]:
    """``points`` for :func:`weak_dataset` from ``data.points`` (None: from the instance maps)."""
    if config.data.points is None:
        return {}
    return {"points": read_points_path(config.data.points)}


def _weak_default_postproc(config: RunConfig) -> WeakPostprocConfig:
    """Default detection settings at the run's pixel size (2.5 um -> ``2.5 / mpp`` pixels)."""
    return WeakPostprocConfig(mpp=config.data.mpp)


METHODS: dict[str, Method] = {
    "conic": Method(
        name="conic",
        description="dual-decoder U-Net, EfficientNet encoder (Rumberger et al. 2022)",
        model_config=ConicModelConfig,
        build=build_conic_from_config,
        losses=conic_losses,
        dataset=conic_dataset,
        outputs=CONIC_OUTPUTS,
        postproc_config=ConicPostprocConfig,
        postprocess=_conic_postprocess,
        tune_grid=CONIC_GRID,
        tuner=_conic_tune,
        class_layers=("semantic_logits",),
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
        initialize=_panoptic_initialize,
        tune_grid=PANOPTIC_GRID,
        tuner=tune_panoptic_postproc,
        tune_tile=512,
        class_layers=("class_logits",),
        # A ResNet from scratch diverges within a few SGD steps without clipping (Kumar, lr
        # 0.005 and 0.001); matterport's Mask R-CNN clips at 5.
        train_defaults={"clip_norm": 10.0},
    ),
    "unet_sharp": Method(
        name="unet_sharp",
        description="U-Net#: ResNeXt encoder, full-scale skips, attention, ASPP (Stagys et al.)",
        model_config=UnetSharpModelConfig,
        build=build_unet_sharp_from_config,
        losses=_unet_sharp_losses,
        dataset=unet_sharp_dataset,
        outputs=UNET_SHARP_OUTPUTS,
        postproc_config=UnetSharpPostprocConfig,
        postprocess=_unet_sharp_postprocess,
        optimizer=_unet_sharp_optimizer,
        callbacks=_unet_sharp_callbacks,
        prepare_config=_unet_sharp_prepare,
        initialize=_unet_sharp_initialize,
        tune_grid=UNET_SHARP_GRID,
        tuner=_unet_sharp_tune,
        class_layers=("semantic_logits",),
        # Table I of the paper: lr 1e-4, no weight decay; 50 epochs. Batch-norm statistics
        # re-estimated before validation and saving: a short CPU run's moving averages lag the
        # weights (inference mode collapsed: benchmarks/unet_sharp_bn_probe.py).
        train_defaults={
            "optimizer": "adabound",
            "learning_rate": 1e-4,
            "weight_decay": 0.0,
            "epochs": 50,
            "bn_reestimation_batches": 8,
        },
    ),
    "weak": Method(
        name="weak",
        description="point-supervised multi-task U-Net, ResNet-50 encoder (Chamanzar & Nie 2020)",
        model_config=WeakModelConfig,
        build=build_weak_from_config,
        losses=_weak_losses,
        dataset=weak_dataset,
        outputs=WEAK_OUTPUTS,
        postproc_config=WeakPostprocConfig,
        postprocess=_weak_postprocess,
        optimizer=_weak_optimizer,
        prepare_config=_weak_prepare_config,
        dataset_options=_weak_dataset_options,
        default_postproc=_weak_default_postproc,
        tune_grid=WEAK_GRID,
        tuner=_weak_tune,
        class_agnostic=True,
    ),
}


def get_method(name: str) -> Method:
    """The registry entry of ``name`` (KerasnucError naming the known methods otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise KerasnucError(f"unknown method {name!r} (available: {sorted(METHODS)})") from None
