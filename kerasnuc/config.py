"""Configuration that travels with the weights: one frozen dataclass per concern.

:class:`RunConfig` is the ``config.json`` of a run folder (the folder itself, its other files and
their reading and writing are :mod:`kerasnuc.runs`): :class:`DataConfig` (what the model was
trained on, at which resolution), :class:`TrainConfig` (optimisation) and the method-specific
model and pipeline sections. Each has a JSON round trip (``to_dict`` / ``from_dict``) that
refuses unknown keys.

The model and pipeline sections are method-specific dicts (e.g. ``ConicModelConfig.to_dict()``,
``PipelineConfig.to_dict()``) so that reading a config never imports TensorFlow;
:mod:`kerasnuc.registry` turns them back into objects.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.checks import MPP_RANGE, check_mpp, is_int, is_number, is_plausible_mpp
from kerasnuc.version import __version__

#: Default colours of cell types 1..6 (RGB), reused cyclically.
DEFAULT_COLOURS = (
    (255, 215, 0),
    (220, 20, 60),
    (30, 144, 255),
    (50, 205, 50),
    (255, 0, 255),
    (255, 140, 0),
)


def strict_from_dict(cls, data: dict[str, Any]):
    """``cls(**data)`` for a config dataclass, refusing keys that are not fields and values of
    the wrong type (ValueError naming them, see :func:`check_field_types`); missing keys take
    the defaults."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"Unknown {cls.__name__} keys {unknown}. Expected a subset of {sorted(known)}"
        )
    check_field_types(cls, data)
    return cls(**data)


def check_field_types(cls, data: Mapping[str, Any]) -> None:
    """Check the values of ``data`` against the type hints of the dataclass ``cls``.

    JSON spellings are accepted: lists for tuples, objects for nested dataclasses, string keys
    for ``dict[int, ...]`` (``"1"``), integers for floats. Keys that are not fields are ignored.

    Raises:
        ValueError: ``"`clip_norm` must be a number or null. Received: clip_norm='ten'"``.
    """
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        hint = hints.get(key)
        if hint is not None and not _matches(value, hint):
            raise ValueError(f"`{key}` must be {_describe(hint)}. Received: {key}={value!r}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as read from JSON or given in Python) fits the type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if _is_union(hint):
        return any(_matches(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool | np.bool_)
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_number(value)
    if hint is str:
        return isinstance(value, str | os.PathLike)
    if origin in (tuple, list):
        if not isinstance(value, tuple | list):
            return False
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return all(_matches(v, args[0]) for v in value) if args else True
        return len(value) == len(args) and all(map(_matches, value, args))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            return False
        key_hint, value_hint = args if args else (Any, Any)

        def key_ok(k: Any) -> bool:
            if key_hint is int and isinstance(k, str):
                return k.strip().lstrip("-").isdigit()
            return _matches(k, key_hint)

        return all(key_ok(k) and _matches(v, value_hint) for k, v in value.items())
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint | Mapping | str)
    return True


def _describe(hint: Any) -> str:
    """A type hint in words, as a JSON user would say it (``"a list of integers"``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if _is_union(hint):
        parts = [_describe(a) for a in args if a is not type(None)]
        if len(args) > len(parts):
            parts.append("null")
        return " or ".join(parts)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if origin in (tuple, list):
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            plural = {int: "integers", float: "numbers", str: "strings"}
            item = args[0] if args else Any
            if item in plural:
                return f"a list of {plural[item]}"
            return f"a list of ({_describe(item)})"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin in (dict, Mapping):
        return "an object"
    if dataclasses.is_dataclass(hint):
        return f"an object ({hint.__name__})"
    return str(hint)


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass: its fields, tuples as lists (also inside dicts)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def builder_kwargs(builder: Callable[..., Any], config: Any) -> dict[str, Any]:
    """The keyword arguments of a model builder taken from the same-named fields of its config.

    A method's hyperparameters are written twice: as the builder's keyword arguments (what the
    model needs) and as the fields of its config dataclass (what ``config.json`` stores, with
    the same defaults; ``tests/models/test_hyperparameters.py`` checks both agree). Config fields
    that are not builder arguments (training schedule, bookkeeping) are left out.
    """
    names = inspect.signature(builder).parameters
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in names}


@dataclass(frozen=True)
class DataConfig:
    """What the model was trained on and at which resolution.

    Attributes:
        datasets: dataset folders used for training (as given).
        train_split, val_split: split names.
        mpp: the model's resolution in micrometres per pixel, stored only here: training
            resamples every dataset to it, ``tune`` resamples the validation images to it and
            ``predict`` the inputs (None: unknown; images are used as they are).
        class_names: cell types ``{id: name}`` (ids 1..C); empty for class-agnostic models.
        class_colours: ``{id: (r, g, b)}`` for overlays and QuPath.
        dataset_mpp: assumed pixel size ``{dataset folder name: um/px}`` for datasets whose
            ``meta.json`` states none (or states a wrong one); used when resampling to ``mpp``.
        points: point annotations used instead of the instance maps by point-supervised methods
            (``weak``): a folder of ``<image id>.csv`` / ``.geojson`` files or one such file
            (see ``kerasnuc.io.points.read_points_path``); None: points derived from the
            instance maps.
    """

    datasets: tuple[str, ...] = ()
    train_split: str = "train"
    val_split: str = "val"
    mpp: float | None = None
    class_names: dict[int, str] = field(default_factory=dict)
    class_colours: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    dataset_mpp: dict[str, float] = field(default_factory=dict)
    points: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(os.fspath(d) for d in self.datasets))
        names = {int(k): str(v) for k, v in dict(self.class_names).items()}
        colours = {int(k): tuple(int(c) for c in v) for k, v in dict(self.class_colours).items()}
        for k in names:
            colours.setdefault(k, DEFAULT_COLOURS[(k - 1) % len(DEFAULT_COLOURS)])
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "class_colours", colours)
        check_mpp(self.mpp, "mpp")
        assumed = dict(self.dataset_mpp)
        bad = {k: v for k, v in assumed.items() if not is_plausible_mpp(v)}
        if bad:
            low, high = MPP_RANGE
            raise ValueError(
                f"`dataset_mpp` values must be pixel sizes in {low:g}..{high:g} um/px. "
                f"Received: {bad}"
            )
        assumed = {str(k): float(v) for k, v in assumed.items()}
        object.__setattr__(self, "dataset_mpp", assumed)
        if self.points is not None:
            object.__setattr__(self, "points", os.fspath(self.points))

    @property
    def num_classes(self) -> int:
        return max(self.class_names) if self.class_names else 0

    def assumed_mpp(self, dataset_dir: str | os.PathLike) -> float | None:
        """The assumed pixel size of a dataset folder (:attr:`dataset_mpp`, by folder name)."""
        return self.dataset_mpp.get(Path(dataset_dir).resolve().name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "datasets": list(self.datasets),
            "train_split": self.train_split,
            "val_split": self.val_split,
            "mpp": self.mpp,
            "class_names": {str(k): v for k, v in sorted(self.class_names.items())},
            "class_colours": {str(k): list(v) for k, v in sorted(self.class_colours.items())},
            "dataset_mpp": dict(sorted(self.dataset_mpp.items())),
            "points": self.points,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        return strict_from_dict(cls, data)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes:
        epochs: number of epochs.
        steps_per_epoch: train steps per epoch (default: images / batch size).
        learning_rate: peak learning rate, cosine-annealed to ``min_lr_fraction`` of it.
        min_lr_fraction: final learning rate as a fraction of ``learning_rate``.
        weight_decay: decoupled weight decay (AdamW).
        optimizer: optimizer name of the method (``"adamw"`` for conic).
        val_every: validate (post-processing + metrics) every this many epochs.
        val_max_images: cap on validation images per evaluation (None: all).
        seed: seed of weights, pipeline and dropout.
        mixed_precision: train with ``mixed_float16``.
        strategy: ``"default"``, ``"mirrored"`` or ``"multiworker"`` (tf.distribute).
        jit_compile: XLA-compile the train step (slow to compile on CPU).
        init_from: start from the weights of this run folder (or ``.weights.h5`` file) of the
            same architecture instead of random/ImageNet init (fine-tuning); None: no.
        clip_norm: clip the gradient of every variable to this L2 norm (Keras ``clipnorm``; on the
            inner optimizer of a Lookahead); None: no clipping.
        keep_epoch_weights: also save the weights after every epoch as
            ``epochs/epoch_NNN.weights.h5`` (learning curves, picking an epoch by hand).
        bn_reestimation_batches: before every validation and every save of the weights,
            recompute the moving statistics of the batch norms that train (not the frozen
            ones) from this many training batches with the weights fixed
            (:func:`kerasnuc.models.batchnorm.reestimate_batch_norm`), so that inference mode
            matches training mode also while the weights still move fast; 0: off (the moving
            averages as trained).
        lr_decay_at: for the step-decay schedule (``panoptic``): the fractions of the run at
            which the learning rate is multiplied by 0.1, increasing, in (0, 1). The default
            (1/2, 3/4) is the paper's; short CPU runs gain from a longer high-rate phase.
        train_only: train only the model's top-level layers whose names match one of these
            ``fnmatch`` patterns (e.g. ``["semantic_*"]`` for the cell-type decoder and head of
            ``conic``; the encoder is the one layer ``"encoder"``); every other layer is frozen
            (no gradient, batch norms in inference mode). None: every layer trains.
    """

    epochs: int = 50
    steps_per_epoch: int | None = None
    learning_rate: float = 1e-3
    min_lr_fraction: float = 0.01
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    val_every: int = 1
    val_max_images: int | None = None
    seed: int = 0
    mixed_precision: bool = False
    strategy: str = "default"
    jit_compile: bool = False
    init_from: str | None = None
    clip_norm: float | None = None
    keep_epoch_weights: bool = False
    bn_reestimation_batches: int = 0
    lr_decay_at: tuple[float, ...] = (0.5, 0.75)
    train_only: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_field_types(type(self), dataclasses.asdict(self))
        object.__setattr__(self, "lr_decay_at", tuple(float(f) for f in self.lr_decay_at))
        if self.train_only is not None:
            object.__setattr__(self, "train_only", tuple(self.train_only))
            if not self.train_only or not all(self.train_only):
                raise ValueError(
                    "`train_only` must be None or a non-empty list of non-empty layer-name "
                    f"patterns. Received: train_only={list(self.train_only)}"
                )
        fractions = self.lr_decay_at
        if any(not 0 < f < 1 for f in fractions) or list(fractions) != sorted(set(fractions)):
            raise ValueError(
                "`lr_decay_at` must be increasing fractions in (0, 1). "
                f"Received: lr_decay_at={list(fractions)}"
            )
        if self.bn_reestimation_batches < 0:
            raise ValueError(
                "`bn_reestimation_batches` must be >= 0. "
                f"Received: bn_reestimation_batches={self.bn_reestimation_batches}"
            )
        if self.epochs < 1:
            raise ValueError(f"`epochs` must be >= 1. Received: epochs={self.epochs}")
        for name in ("steps_per_epoch", "val_max_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 or null. Received: {name}={value}")
        if self.val_every < 1:
            raise ValueError(f"`val_every` must be >= 1. Received: val_every={self.val_every}")
        if not self.learning_rate > 0:
            raise ValueError(
                f"`learning_rate` must be > 0. Received: learning_rate={self.learning_rate}"
            )
        if not 0 <= self.min_lr_fraction <= 1:
            raise ValueError(
                "`min_lr_fraction` must lie in [0, 1]. "
                f"Received: min_lr_fraction={self.min_lr_fraction}"
            )
        if not self.weight_decay >= 0:
            raise ValueError(
                f"`weight_decay` must be >= 0. Received: weight_decay={self.weight_decay}"
            )
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(
                f"`clip_norm` must be None or > 0. Received: clip_norm={self.clip_norm}"
            )
        if self.strategy not in ("default", "mirrored", "multiworker"):
            raise ValueError(
                "`strategy` must be one of 'default', 'mirrored', 'multiworker'. "
                f"Received: strategy={self.strategy!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return strict_from_dict(cls, data)


#: Numbers of views :class:`InferenceConfig` accepts (see ``kerasnuc.models.views``).
VIEW_COUNTS = (1, 2, 4, 8)
#: Graphs the onnxruntime engine can run (``model.onnx``, ``model.int8.onnx``).
ONNX_PRECISIONS = ("float32", "int8")


@dataclass(frozen=True)
class InferenceConfig:
    """How the model is run on images by default (``kerasnuc predict``, ``tune``, the API).

    Attributes:
        views: deterministic flips / rotations of every tile whose maps are mapped back and
            averaged: 1 (the tile as it is), 2 (and its mirror image), 4 (and the up-down
            flip and the half turn), 8 (every flip and quarter turn). Each view costs one
            forward pass; ``kerasnuc predict --views`` overrides it.
        onnx_precision: the graph the onnxruntime engine runs: ``"float32"`` (``model.onnx``)
            or ``"int8"`` (``model.int8.onnx``, ``kerasnuc.serving.quantize``; used only where
            the folder has it); ``kerasnuc predict --precision`` overrides it. The Keras engine
            always computes in float32.
    """

    views: int = 1
    onnx_precision: str = "float32"

    def __post_init__(self) -> None:
        check_views(self.views)
        check_onnx_precision(self.onnx_precision)

    def to_dict(self) -> dict[str, Any]:
        return {"views": self.views, "onnx_precision": self.onnx_precision}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InferenceConfig:
        return strict_from_dict(cls, data)


def check_onnx_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`ONNX_PRECISIONS`, else a ValueError saying so."""
    if precision not in ONNX_PRECISIONS:
        raise ValueError(
            f"`onnx_precision` must be one of {', '.join(ONNX_PRECISIONS)}. "
            f"Received: onnx_precision={precision!r}"
        )
    return str(precision)


def check_views(views: Any) -> int:
    """``views`` if it is one of :data:`VIEW_COUNTS`, else a ValueError saying so."""
    if isinstance(views, bool) or views not in VIEW_COUNTS:
        raise ValueError(
            f"`views` must be one of {', '.join(map(str, VIEW_COUNTS))}. Received: views={views!r}"
        )
    return int(views)


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to rebuild a trained model and run it like it was trained.

    Attributes:
        method: method name (a key of ``kerasnuc.registry.METHODS``).
        model: method-specific model config dict (e.g. ``ConicModelConfig.to_dict()``).
        data: :class:`DataConfig`.
        pipeline: ``PipelineConfig.to_dict()`` of the training pipeline.
        train: :class:`TrainConfig`.
        inference: :class:`InferenceConfig` (how ``predict`` runs the model by default).
        kerasnuc_version: version that wrote the run.
    """

    method: str
    model: dict[str, Any]
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    kerasnuc_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "kerasnuc_version": self.kerasnuc_version,
            "model": self.model,
            "data": self.data.to_dict(),
            "pipeline": self.pipeline,
            "train": self.train.to_dict(),
            "inference": self.inference.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; older files are migrated (:func:`migrate_model_mpp`)."""
        data = migrate_model_mpp(data)
        data["data"] = DataConfig.from_dict(data.get("data", {}))
        data["train"] = TrainConfig.from_dict(data.get("train", {}))
        data["inference"] = InferenceConfig.from_dict(data.get("inference", {}))
        return strict_from_dict(cls, data)


def migrate_model_mpp(config: dict[str, Any]) -> dict[str, Any]:
    """A run-config dict with the model's resolution stored once, as ``data.mpp``.

    Run folders of kerasnuc 0.1.0 (the bundled ``default`` model, ``reference_runs/conic_b0``)
    and ``--config`` files may also hold ``pipeline.target_mpp``, the pixel size the training
    images were resampled to (None: not resampled, i.e. trained at the data's own resolution,
    which ``data.mpp`` then records when the datasets agree on it). It is removed; when
    ``data.mpp`` is unset it takes its value.

    Raises:
        ValueError: both are set and differ (say the resolution once, as ``data.mpp``).
    """
    pipeline = config.get("pipeline")
    if not isinstance(pipeline, dict) or "target_mpp" not in pipeline:
        return dict(config)
    pipeline = dict(pipeline)
    target = pipeline.pop("target_mpp")
    data = dict(config.get("data") or {})
    if target is None:
        pass
    elif data.get("mpp") is None:
        data["mpp"] = target
    elif float(target) != float(data["mpp"]):
        raise ValueError(
            f"`pipeline.target_mpp` ({target}) and `data.mpp` ({data['mpp']}) differ; the "
            "model's resolution is `data.mpp` only"
        )
    return {**config, "pipeline": pipeline, "data": data}
