"""Where models live: the bundled models and the resolution of a ``--model`` argument.

Kept free of Keras and TensorFlow, so that the prediction path that runs without them
(:mod:`kerasnuc.inference.onnx_predictor`) can find a model; :mod:`kerasnuc.runs` re-exports
these names.
"""

from __future__ import annotations

import os
from pathlib import Path

from kerasnuc.fileutil import KerasnucError

RUN_CONFIG = "config.json"
"""The run config of a run folder (``kerasnuc.runs.RUN_CONFIG``)."""

BUNDLED_DIR = Path(__file__).resolve().parent / "models_bundled"
"""Folder of the models shipped with the package: ``models_bundled/<name>/`` run folders."""

DEFAULT_MODEL = "default"
"""Name of the bundled model used when no model is given."""


def bundled_models() -> dict[str, Path]:
    """``{name: run directory}`` of the named models shipped in :data:`BUNDLED_DIR`."""
    found: dict[str, Path] = {}
    if BUNDLED_DIR.is_dir():
        for child in sorted(BUNDLED_DIR.iterdir()):
            if (child / RUN_CONFIG).is_file():
                found[child.name] = child
    return found


def resolve_model(name_or_path: str | os.PathLike | None) -> Path:
    """The run directory of a model argument.

    Args:
        name_or_path: an existing run directory (a folder written by ``kerasnuc train``), the
            name of a bundled model, or None for the bundled :data:`DEFAULT_MODEL`.

    Returns:
        The run directory.

    Raises:
        KerasnucError: nothing matches (the message says what is available).
    """
    named = bundled_models()
    if name_or_path is None:
        if DEFAULT_MODEL in named:
            return named[DEFAULT_MODEL]
        raise KerasnucError(
            "no model given and no bundled default model is installed: pass --model RUN_DIR "
            "(a folder written by kerasnuc train)"
        )
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if str(name_or_path) in named:
        return named[str(name_or_path)]
    available = ", ".join(sorted(named)) or "none installed"
    raise KerasnucError(
        f"{name_or_path}: no such run directory, nor a bundled model (bundled: {available})"
    )


__all__ = ["BUNDLED_DIR", "DEFAULT_MODEL", "RUN_CONFIG", "bundled_models", "resolve_model"]
