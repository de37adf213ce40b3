"""The run folder: what a trained model is on disk, and the one place that reads and writes it.

A run folder (StarDist's "model folder": configuration, weights and thresholds travel together)
is written by ``kerasnuc train --out RUN_DIR``::

    config.json        RunConfig: method, model, data (incl. the model's resolution), pipeline,
                       train (:func:`save_config` / :func:`load_config`)
    model.weights.h5   weights of the best checkpoint (by validation mPQ+ / PQ)
    postproc.json      post-processing thresholds tuned on validation data (``kerasnuc tune``)
    history.csv        one row per epoch
    checkpoint/        training state for --resume (last epoch: model, optimizer, counters)
    logs/              TensorBoard
    epochs/            per-epoch weights (``TrainConfig.keep_epoch_weights``)

A run that replaces an existing run folder (``train --overwrite``) trains in the hidden sibling
:func:`pending_run_dir` (``.<name>.pending/``, same layout) and is moved onto ``RUN_DIR`` only
when it has finished, so the old run stays usable until then and ``--resume`` continues an
interrupted replacement there.

This module:

* names those files (:data:`RUN_CONFIG`, :data:`BEST_WEIGHTS`, ...) and reads/writes
  ``config.json``;
* rebuilds the model of a config (:func:`build_model`) and loads a whole run
  (:func:`load_run`), or only its weights into another model (:func:`load_initial_weights`,
  ``train --init-from``);
* finds the named models shipped with the package (:func:`bundled_models`,
  :func:`resolve_model`);
* packs a run into a small named model with a model card (:func:`pack_run`, :func:`read_card`).

A packed (named) model is a run folder that :func:`load_run` reads like any other::

    <name>/
      config.json          the run's RunConfig (unchanged)
      postproc.json        its tuned post-processing thresholds
      model.weights.h5     model variables only (no optimizer state), float16 by default
      model.json           the model card (:data:`CARD_FILE`): what it is and how good it is

float16 storage halves the file; Keras casts the values back to the float32 variables when it
loads them, so inference runs in float32 (rounding changes the probability maps by ~1e-3, which
:func:`pack_run` measures and records in the card as ``float16_max_abs_diff``). The models
shipped with the package live in ``kerasnuc/models_bundled/<name>/``; ``kerasnuc models`` lists
them from their cards.

Importing this module imports Keras and TensorFlow (through the registry).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kerasnuc import model_dirs
from kerasnuc.config import RunConfig
from kerasnuc.fileutil import KerasnucError, atomic_dir, write_json_atomic
from kerasnuc.model_dirs import (  # noqa: F401 - re-exported: kerasnuc.runs.BUNDLED_DIR, ...
    BUNDLED_DIR,
    DEFAULT_MODEL,
    bundled_models,
    resolve_model,
)
from kerasnuc.registry import Method, get_method

RUN_CONFIG = "config.json"
BEST_WEIGHTS = "model.weights.h5"
POSTPROC = "postproc.json"
HISTORY = "history.csv"
CHECKPOINT_DIR = "checkpoint"
LOG_DIR = "logs"
#: Folder of the per-epoch weights (``TrainConfig.keep_epoch_weights``).
EPOCH_WEIGHTS_DIR = "epochs"
CARD_FILE = "model.json"
"""Model card of a packed model: name, description, data, licence, resolution, classes, scores."""

RUN_ENTRIES = frozenset(
    {
        RUN_CONFIG,
        BEST_WEIGHTS,
        POSTPROC,
        HISTORY,
        CHECKPOINT_DIR,
        LOG_DIR,
        EPOCH_WEIGHTS_DIR,
        CARD_FILE,
    }
)
"""Everything a run folder may hold; ``train --overwrite`` replaces only folders of these."""


def pending_run_dir(run_dir: str | os.PathLike) -> Path:
    """``<parent>/.<name>.pending``: where a run replacing ``run_dir`` trains until it is done."""
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.pending"


# --- config.json -----------------------------------------------------------------------------


def save_config(config: RunConfig, run_dir: str | os.PathLike) -> None:
    """Write ``RUN_DIR/config.json`` atomically."""
    write_json_atomic(Path(run_dir) / RUN_CONFIG, config.to_dict())


def load_config(run_dir: str | os.PathLike) -> RunConfig:
    """Read ``RUN_DIR/config.json`` (older files are migrated, see :meth:`RunConfig.from_dict`).

    Raises:
        KerasnucError: missing or malformed file.
    """
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise KerasnucError(f"{path}: missing (not a kerasnuc run directory?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("the run config must be a JSON object")
        config = RunConfig.from_dict(data)
        if not isinstance(config.model, dict):
            raise ValueError("section 'model' must be a JSON object")
        get_method(config.method).model_config.from_dict(config.model)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise KerasnucError(f"{path}: invalid run config ({exc})") from exc
    except KerasnucError as exc:  # unknown method
        raise KerasnucError(f"{path}: {exc}") from exc
    return config


def _first_line(exc: Exception, limit: int = 200) -> str:
    """The start of an exception's message: Keras puts whole tensors in some of them."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- model and weights ---------------------------------------------------------------------


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
    config = load_config(run_dir)
    method = get_method(config.method)
    model = build_model(config)
    path = Path(weights) if weights is not None else run_dir / BEST_WEIGHTS
    if not path.is_file():
        raise KerasnucError(f"{path}: weights file not found")
    try:
        model.load_weights(path)
    except OSError as exc:
        raise KerasnucError(f"{path}: cannot read the weights ({_first_line(exc)})") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise KerasnucError(
            f"{run_dir}: the architecture in {RUN_CONFIG} ({config.method}) does not match the "
            f"weights in {path.name} ({_first_line(exc)})"
        ) from exc
    pp_path = run_dir / POSTPROC
    postproc = (
        method.postproc_config.load(pp_path) if pp_path.is_file() else method.new_postproc(config)
    )
    return LoadedRun(run_dir, config, method, model, postproc)


def init_run_dir(source: str | os.PathLike) -> Path | None:
    """The run folder behind an ``--init-from`` value, or None for a ``.weights.h5`` file.

    Args:
        source: a run folder, the name of a bundled model (``"default"``) or a weights file.

    Raises:
        KerasnucError: nothing of that name (the message lists the bundled models).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return None
    if not path.is_dir() and str(source) not in bundled_models():
        available = ", ".join(sorted(bundled_models())) or "none installed"
        raise KerasnucError(
            f"{source}: run folder, bundled model or weights file to start from not found "
            f"(bundled: {available})"
        )
    return resolve_model(source)


def class_listing(names: dict[int, str]) -> str:
    """``{1: "other", 2: "spindle"}`` -> ``"1 other, 2 spindle"`` (for one-line messages)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(names.items())) or "none (no cell types)"


def class_order(
    model_names: dict[int, str], data_names: dict[int, str], source: str | os.PathLike
) -> list[int] | None:
    """Match the cell types of a model and of the data by name (case and spaces ignored).

    Args:
        model_names: ``{id: name}`` of the model (its run config).
        data_names: ``{id: name}`` of the data the model is trained on next.
        source: the model, named in the error.

    Returns:
        None when the ids already mean the same classes; else ``order`` with
        ``order[k - 1]`` = the model's id of the data's class ``k``.

    Raises:
        KerasnucError: the names are not the same set (one line listing both orders).
    """
    key = {int(k): str(v).strip().lower() for k, v in model_names.items()}
    data_key = {int(k): str(v).strip().lower() for k, v in data_names.items()}
    if key == data_key:
        return None
    by_name = {v: k for k, v in key.items()}
    same_set = (
        len(by_name) == len(key) == len(data_key)
        and set(by_name) == set(data_key.values())
        and sorted(data_key) == list(range(1, len(data_key) + 1))
        and sorted(key) == list(range(1, len(key) + 1))
    )
    if not same_set:
        raise KerasnucError(
            f"{source}: its classes ({class_listing(model_names)}) are not those of the data "
            f"({class_listing(data_names)}); classes are matched by name: import the data "
            f"with --classes-from {source} (or --classes in the model's order)"
        )
    return [by_name[data_key[k]] for k in range(1, len(data_key) + 1)]


def permute_class_channels(
    model: keras.Model, order: list[int], layer_names: tuple[str, ...]
) -> int:
    """Reorder the class channels of a model's classifier so that channel ``k`` is class ``k``.

    Every variable of a layer named in ``layer_names`` (for example the ``semantic_logits``
    convolution, the last axis holding background + C classes) and every variable named
    ``class_frequency`` whose last axis has ``C + 1`` entries is permuted along that axis:
    channel 0 (background) stays, channel ``k`` takes the old channel ``order[k - 1]``.

    Returns:
        The number of variables permuted.
    """
    index = np.asarray([0, *order], dtype=np.int64)
    n = 0
    for variable in model.weights:
        parts = variable.path.split("/")
        wanted = variable.name == "class_frequency" or (
            len(parts) >= 2 and parts[-2] in layer_names
        )
        if not wanted or not variable.shape or variable.shape[-1] != index.size:
            continue
        variable.assign(np.take(np.asarray(variable), index, axis=-1))
        n += 1
    return n


def learns_cell_types(model_names: dict[int, str], data_names: dict[int, str]) -> bool:
    """Whether a class-agnostic model (no cell types) is started on data with cell types: then
    everything but its classifier is taken over, and the classifier learns the types afresh."""
    return not model_names and bool(data_names)


def load_initial_weights(
    model: keras.Model,
    source: str | os.PathLike,
    class_names: dict[int, str] | None = None,
    class_layers: tuple[str, ...] = (),
) -> Path:
    """Load the weights of a run folder (its best weights), a bundled model or a ``.weights.h5``
    file into ``model`` (``train --init-from``).

    Classes are matched by name: with ``class_names`` (the data's) and a source that is a run
    folder or a bundled model, the source's classes must be the same names; when they come in
    another order, the class channels of ``class_layers`` are permuted after loading
    (:func:`permute_class_channels`), so no cell type is swapped silently. A source without cell
    types (trained on nuclei only) gives every layer but ``class_layers``, which keep their fresh
    initialisation (:func:`learns_cell_types`).

    Raises:
        KerasnucError: no such file, other class names (one line listing both orders), or
            weights of another architecture.
    """
    run_dir = init_run_dir(source)
    order = None
    source_config = None
    if run_dir is not None:
        path = run_dir / BEST_WEIGHTS
        if class_names is not None and (run_dir / RUN_CONFIG).is_file():
            source_config = load_config(run_dir)
            if not learns_cell_types(source_config.data.class_names, class_names):
                order = class_order(source_config.data.class_names, class_names, source)
                source_config = None
    else:
        path = Path(source)
    if not path.is_file():
        raise KerasnucError(f"{path}: weights to start from not found (train.init_from)")
    try:
        if source_config is not None:
            _load_all_but(model, source_config, path, class_layers)
        else:
            model.load_weights(path)
    except (ValueError, OSError, TypeError, KeyError) as exc:
        raise KerasnucError(
            f"{path}: cannot start from these weights: another architecture or not a weights "
            f"file ({_first_line(exc)})"
        ) from exc
    if order is not None and permute_class_channels(model, order, class_layers) == 0:
        raise KerasnucError(f"{source}: the model has no class channels to reorder by name")
    return path


def _load_all_but(
    model: keras.Model, source_config: RunConfig, path: Path, class_layers: tuple[str, ...]
) -> None:
    """Copy the weights of the class-agnostic run ``source_config`` (file ``path``) into
    ``model``, layer by layer, except the layers in ``class_layers`` and the per-class
    ``class_frequency`` statistics, whose sizes follow the number of classes."""
    source = build_model(source_config)
    source.load_weights(path)
    if not any(layer.name in class_layers for layer in model.layers):
        raise ValueError(f"the model has none of the classifier layers {list(class_layers)}")
    for layer in model.layers:
        if not layer.weights or layer.name in class_layers:
            continue
        theirs = source.get_layer(layer.name).weights
        if len(theirs) != len(layer.weights):
            raise ValueError(f"layer {layer.name!r} has another number of variables")
        for mine, their in zip(layer.weights, theirs, strict=True):
            if tuple(mine.shape) == tuple(their.shape):
                mine.assign(their)
            elif not mine.path.endswith("class_frequency"):
                raise ValueError(
                    f"{mine.path}: shape {tuple(mine.shape)} against {tuple(their.shape)}"
                )


def initial_postproc(method: Method, config: RunConfig) -> Any:
    """The post-processing settings a new run starts with.

    With ``train.init_from`` a run folder or bundled model: its tuned ``postproc.json`` (per-class
    values renumbered when the classes are matched by name in another order); else the
    method's defaults for the run (:meth:`~kerasnuc.registry.Method.new_postproc`).
    """
    source = config.train.init_from
    run_dir = init_run_dir(source) if source else None
    if run_dir is None or not all((run_dir / f).is_file() for f in (POSTPROC, RUN_CONFIG)):
        return method.new_postproc(config)
    postproc = method.postproc_config.load(run_dir / POSTPROC)
    if method.class_agnostic:
        return postproc
    source_names = load_config(run_dir).data.class_names
    if learns_cell_types(source_names, config.data.class_names):
        return method.new_postproc(config)  # its settings were tuned without cell types
    order = class_order(source_names, config.data.class_names, source)
    if order is None:
        return postproc
    return postproc.renumber_classes({old: new for new, old in enumerate(order, start=1)})


# --- named (bundled) models ----------------------------------------------------------------


def shareable_config(config: RunConfig) -> dict[str, Any]:
    """``config.to_dict()`` without local paths, for files that leave the machine (exports,
    packed models, model cards): dataset folders, the ``init_from`` run and the point files are
    reduced to their names (``../shared/data/consep`` -> ``consep``)."""
    out = config.to_dict()
    data = dict(out["data"])
    data["datasets"] = [Path(d).name for d in data["datasets"]]
    if data.get("points"):
        data["points"] = Path(data["points"]).name
    train = dict(out["train"])
    if train.get("init_from"):
        train["init_from"] = Path(train["init_from"]).name
    return {**out, "data": data, "train": train}


def is_bundled(run_dir: str | os.PathLike) -> bool:
    """Whether a run folder is one of the models shipped in the package (read-only).

    Links are followed both ways: an entry of :data:`BUNDLED_DIR` that links to a folder
    elsewhere is bundled, and so is a link elsewhere to a folder of :data:`BUNDLED_DIR`.
    """
    bundled = Path(model_dirs.BUNDLED_DIR).resolve()
    path = Path(os.path.abspath(Path(run_dir).expanduser()))
    return path.parent.resolve() == bundled or path.resolve().parent == bundled


def copy_run(
    run_dir: str | os.PathLike,
    dst: str | os.PathLike,
    postproc: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a new run folder ``dst`` with the model of ``run_dir`` (atomically).

    ``config.json`` and the weights are copied (not the model card: its scores were measured
    with other thresholds); ``postproc.json`` is ``postproc`` (e.g. thresholds just tuned) or
    ``run_dir``'s. Used by ``kerasnuc tune --out`` (a bundled model is never rewritten).

    Raises:
        KerasnucError: missing files, or ``dst`` exists without ``overwrite``.
    """
    run_dir, dst = Path(run_dir), Path(dst)
    config = load_config(run_dir)
    if not (run_dir / BEST_WEIGHTS).is_file():
        raise KerasnucError(f"{run_dir / BEST_WEIGHTS}: weights file not found")
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        save_config(config, tmp)
        (tmp / BEST_WEIGHTS).write_bytes((run_dir / BEST_WEIGHTS).read_bytes())
        if postproc is not None:
            postproc.save(tmp / POSTPROC)
        elif (run_dir / POSTPROC).is_file():
            (tmp / POSTPROC).write_bytes((run_dir / POSTPROC).read_bytes())
    return dst


# --- packing a run as a named model -----------------------------------------------------------


CARD_KEYS = (
    "name",
    "description",
    "method",
    "mpp",
    "classes",
    "training_data",
    "licence",
    "training_command",
    "scores",
)
"""Keys every model card has (others may follow)."""


def read_card(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The model card of a model folder; for a plain run folder, a card made from its config.

    Raises:
        KerasnucError: the card or the config is not valid JSON.
    """
    model_dir = Path(model_dir)
    path = model_dir / CARD_FILE
    if path.is_file():
        try:
            card = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KerasnucError(f"{path}: invalid JSON ({exc})") from exc
        if not isinstance(card, dict):
            raise KerasnucError(f"{path}: a model card must be a JSON object")
        return card
    config = load_config(model_dir)
    return {
        "name": model_dir.name,
        "description": f"{config.method} run",
        "method": config.method,
        "mpp": config.data.mpp,
        "classes": {str(k): v for k, v in config.data.class_names.items()},
        "training_data": shareable_config(config)["data"]["datasets"],
        "licence": None,
        "training_command": None,
        "scores": {},
    }


def _float16_copy(src: Path, dst: Path) -> int:
    """Copy the HDF5 weights file ``src`` to ``dst`` with float32 datasets stored as float16.

    Returns:
        The number of arrays converted.

    Raises:
        KerasnucError: a value does not fit float16 (|x| > 65504).
    """
    import h5py

    converted = 0
    with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:
        for key, value in fin.attrs.items():
            fout.attrs[key] = value

        def copy(name: str, obj: Any) -> None:
            nonlocal converted
            if isinstance(obj, h5py.Group):
                group = fout.require_group(name)
                for key, value in obj.attrs.items():
                    group.attrs[key] = value
                return
            data = np.asarray(obj[()])
            if data.dtype == np.float32:
                if data.size and float(np.abs(data).max()) > float(np.finfo(np.float16).max):
                    raise KerasnucError(f"{src}: {name} has values beyond the float16 range")
                data = data.astype(np.float16)
                converted += 1
            out = fout.create_dataset(name, data=data)
            for key, value in obj.attrs.items():
                out.attrs[key] = value

        fin.visititems(copy)
    return converted


def pack_run(
    run_dir: str | os.PathLike,
    dst: str | os.PathLike,
    card: dict[str, Any] | None = None,
    float16: bool = True,
    check_image: np.ndarray | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``run_dir`` as a weights-only named model folder ``dst`` (atomically).

    Args:
        run_dir: a run folder written by ``kerasnuc train`` (its ``model.weights.h5`` may hold
            optimizer state: only the model's variables are kept).
        dst: the new folder (its name is the model's name unless the card says otherwise).
        card: model-card fields (see :data:`CARD_KEYS`); missing ones come from the run config.
        float16: store the weights as float16.
        check_image: ``(H, W, 3)`` uint8 image on which the float16 copy is compared with the
            float32 model (the max abs difference of the maps goes into the card); None: a
            seeded random 128x128 image.
        overwrite: replace ``dst``.

    Returns:
        ``dst``.

    Raises:
        KerasnucError: missing files, weights that do not load, or ``dst`` exists.
    """
    run_dir, dst = Path(run_dir), Path(dst)
    run = load_run(run_dir)
    base = read_card(run_dir)
    base["name"] = dst.name
    base.update(card or {})
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        write_json_atomic(tmp / RUN_CONFIG, shareable_config(run.config))
        run.postproc.save(tmp / POSTPROC)
        plain = tmp / ".float32.weights.h5"
        run.model.save_weights(plain)
        if float16:
            _float16_copy(plain, tmp / BEST_WEIGHTS)
            plain.unlink()
            base["weights_dtype"] = "float16"
            base["float16_max_abs_diff"] = _max_abs_diff(run, tmp, check_image)
        else:
            plain.rename(tmp / BEST_WEIGHTS)
            base["weights_dtype"] = "float32"
        base["weights_bytes"] = (tmp / BEST_WEIGHTS).stat().st_size
        (tmp / CARD_FILE).write_text(json.dumps(base, indent=2) + "\n", encoding="utf-8")
    return dst


def _max_abs_diff(run: Any, packed_dir: Path, image: np.ndarray | None) -> float:
    """Largest difference of the output maps of the original and the packed weights."""
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    h, w = (s - s % 32 for s in image.shape[:2])
    batch = image[None, :h, :w].astype(np.float32) / 255.0
    packed = build_model(run.config)
    packed.load_weights(packed_dir / BEST_WEIGHTS)
    ref = run.model(batch, training=False)
    out = packed(batch, training=False)
    return float(max(np.abs(np.asarray(ref[k]) - np.asarray(out[k])).max() for k in ref))
