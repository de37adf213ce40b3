"""Full training state for ``--resume``: ``RUN_DIR/checkpoint/``, rewritten every epoch.

Layout (the folder is replaced atomically, so an interruption leaves the previous epoch's
state intact)::

    checkpoint/variables.npz   every model variable (weights, batch-norm statistics, the EMA class
                               prior of the conic loss, dropout seed-generator states) as
                               ``model/<i>`` and every optimizer variable (iteration counter,
                               moments, loss scale) as ``optimizer/<i>``, in creation order
    checkpoint/state.json      {"epoch": completed epochs, "best_score", "best_epoch",
                                "history": [rows so far]}

Variables are matched by position and checked by shape: the model and optimizer of a resumed
run are rebuilt from the same ``config.json``, so they create the same variables in the same
order.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.fileutil import KerasnucError, atomic_dir

VARIABLES_FILE = "variables.npz"
STATE_FILE = "state.json"


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _from_json_number(value: Any) -> Any:
    if value in ("inf", "-inf"):
        return float(value)
    return math.nan if value is None else value


def has_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a ``checkpoint/`` folder) holds a complete training state."""
    path = Path(path)
    return (path / VARIABLES_FILE).is_file() and (path / STATE_FILE).is_file()


def save_training_state(
    path: str | os.PathLike, model: Any, optimizer: Any, state: dict[str, Any]
) -> None:
    """Write the variables of ``model`` and ``optimizer`` and ``state`` into the folder ``path``.

    Args:
        path: the checkpoint folder (replaced atomically).
        model: the Keras model.
        optimizer: its (built) optimizer.
        state: JSON-ready dict; non-finite floats in ``history`` rows and ``best_score`` are
            stored as null / "inf" / "-inf".
    """
    arrays = {f"model/{i}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)}
    arrays.update(
        {f"optimizer/{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
    )
    state = dict(state)
    state["best_score"] = _json_number(state.get("best_score"))
    state["history"] = [
        {k: _json_number(v) for k, v in row.items()} for row in state.get("history", [])
    ]
    with atomic_dir(path, overwrite=True) as tmp:
        np.savez(tmp / VARIABLES_FILE, **arrays)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def _assign(prefix: str, variables: list, data: Any, path: Path) -> None:
    keys = sorted(
        (k for k in data.files if k.startswith(prefix + "/")),
        key=lambda k: int(k[len(prefix) + 1 :]),
    )
    if len(keys) != len(variables):
        raise KerasnucError(
            f"{path}: holds {len(keys)} {prefix} variables but the rebuilt {prefix} has "
            f"{len(variables)} (was config.json changed?)"
        )
    for key, var in zip(keys, variables, strict=True):
        value = data[key]
        if tuple(value.shape) != tuple(var.shape):
            raise KerasnucError(
                f"{path}: {prefix} variable {var.path} has shape {tuple(var.shape)} in the rebuilt "
                f"{prefix} but {tuple(value.shape)} in the checkpoint"
            )
        var.assign(value)


def restore_training_state(path: str | os.PathLike, model: Any, optimizer: Any) -> dict[str, Any]:
    """Load a folder written by :func:`save_training_state` into ``model`` and ``optimizer``.

    The optimizer must be built (``optimizer.build(model.trainable_variables)``).

    Returns:
        The ``state`` dict (non-finite numbers restored as floats).

    Raises:
        KerasnucError: missing files, or variables that do not fit the rebuilt model.
    """
    path = Path(path)
    if not has_checkpoint(path):
        raise KerasnucError(f"{path}: no training checkpoint to resume from")
    with np.load(path / VARIABLES_FILE) as data:
        _assign("model", list(model.variables), data, path)
        _assign("optimizer", list(optimizer.variables), data, path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise KerasnucError(f"{path / STATE_FILE}: invalid JSON ({exc})") from exc
    state["best_score"] = _from_json_number(state.get("best_score"))
    state["history"] = [
        {k: _from_json_number(v) if k != "epoch" else v for k, v in row.items()}
        for row in state.get("history", [])
    ]
    return state
