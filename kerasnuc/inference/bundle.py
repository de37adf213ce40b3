"""Named models: pack a trained run into a small, weights-only folder with a model card.

A packed model is a run directory that :func:`kerasnuc.registry.load_run` reads like any other::

    <name>/
      config.json          the run's RunConfig (unchanged)
      postproc.json        its tuned post-processing thresholds
      model.weights.h5     model variables only (no optimizer state), float16 by default
      model.json           the model card (:data:`CARD_FILE`): what it is and how good it is

float16 storage halves the file; Keras casts the values back to the float32 variables when it
loads them, so inference runs in float32 (rounding changes the probability maps by ~1e-3, which
:func:`pack_run` measures and records in the card as ``float16_max_abs_diff``).

The models shipped with the package live in ``kerasnuc/models_bundled/<name>/`` (see
:func:`kerasnuc.inference.run.bundled_models`); ``kerasnuc models`` lists them from their cards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.config import BEST_WEIGHTS, POSTPROC, RUN_CONFIG
from kerasnuc.fileutil import KerasnucError, atomic_dir

CARD_FILE = "model.json"
"""Model card of a packed model: name, description, data, licence, resolution, classes, scores."""

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
    from kerasnuc.config import RunConfig

    config = RunConfig.load(model_dir)
    return {
        "name": model_dir.name,
        "description": f"{config.method} run",
        "method": config.method,
        "mpp": config.data.mpp,
        "classes": {str(k): v for k, v in config.data.class_names.items()},
        "training_data": list(config.data.datasets),
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
    from kerasnuc.registry import load_run

    run_dir, dst = Path(run_dir), Path(dst)
    run = load_run(run_dir)
    base = read_card(run_dir)
    base["name"] = dst.name
    base.update(card or {})
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        shutil.copyfile(run_dir / RUN_CONFIG, tmp / RUN_CONFIG)
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
    from kerasnuc.registry import build_model

    if image is None:
        image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    h, w = (s - s % 32 for s in image.shape[:2])
    batch = image[None, :h, :w].astype(np.float32) / 255.0
    packed = build_model(run.config)
    packed.load_weights(packed_dir / BEST_WEIGHTS)
    ref = run.model(batch, training=False)
    out = packed(batch, training=False)
    return float(max(np.abs(np.asarray(ref[k]) - np.asarray(out[k])).max() for k in ref))
