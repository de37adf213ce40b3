"""Run summary as JSON: nucleus counts and densities per class, runtime, model and settings.

Layout of :func:`build_summary`'s dict (all keys always present; ``null`` when unknown)::

    {
      "kerasnuc_version": "0.1.0",
      "created": "2025-01-31T12:00:00+00:00",     # UTC, ISO 8601
      "model_id": "conic-efficientnet_b0-v3",
      "runtime_s": 12.5,
      "mpp": 0.25,                                 # micrometres per pixel
      "tissue_area_px": 1000000,
      "tissue_area_mm2": 0.0625,                   # tissue_area_px * mpp^2 / 1e6
      "total": 120,                                # nuclei
      "density_per_mm2": 1920.0,                   # total / tissue_area_mm2
      "counts": {"neutrophil": 3, ...},            # per class name (every named class, even 0)
      "fractions": {"neutrophil": 0.025, ...},     # count / total (null when total is 0)
      "densities_per_mm2": {"neutrophil": 48.0, ...},
      "settings": {...},                           # the caller's settings, made JSON-safe
      ...extra keys
    }

Densities need both the tissue area (in full-resolution pixels, measured by the caller, e.g.
from a tissue mask) and ``mpp``; otherwise they are ``null``. Without class information
``counts``, ``fractions`` and ``densities_per_mm2`` are empty. Nuclei of class 0 (no class) are
counted under ``"unclassified"`` when there are any.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.fileutil import write_json_atomic
from kerasnuc.postprocess.measure import NucleusTable
from kerasnuc.version import __version__

UNCLASSIFIED = "unclassified"


def jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, paths, tuples, sets and dataclasses to JSON types.

    Non-finite floats become None (JSON has no NaN/inf).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


def class_counts(table: NucleusTable) -> dict[int, int]:
    """``{class id: number of nuclei}`` of a table (empty without a ``class`` column)."""
    if "class" not in table:
        return {}
    ids, counts = np.unique(np.asarray(table["class"], dtype=np.int64), return_counts=True)
    return {int(k): int(n) for k, n in zip(ids, counts, strict=True)}


def build_summary(
    counts: NucleusTable | Mapping[int, int] | int,
    class_names: Mapping[int, str] | None = None,
    tissue_area_px: float | None = None,
    mpp: float | None = None,
    runtime_s: float | None = None,
    model_id: str | None = None,
    settings: Mapping[str, Any] | None = None,
    created: datetime.datetime | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Summary of one image or slide (layout in the module docstring).

    Args:
        counts: the measurement table, ``{class id: count}`` (for slides, summed over tiles
            with :func:`class_counts`), or the total count of an unclassified run.
        class_names: ``{class id: name}``; classes without a name are named by their id; with a
            table, its own ``class_names`` are used when this is None.
        tissue_area_px: tissue area in full-resolution pixels (e.g. the sum of a tissue mask,
            or H x W for a tile).
        mpp: micrometres per pixel.
        runtime_s: wall-clock time of the run in seconds.
        model_id: name/version of the model.
        settings: run settings (post-processing thresholds, tile size, ...).
        created: timestamp; None: now (UTC).
        **extra: further top-level keys.

    Returns:
        JSON-safe dict.

    Raises:
        ValueError: negative counts, area or runtime, or a non-positive mpp.
    """
    if isinstance(counts, NucleusTable):
        if class_names is None:
            class_names = counts.class_names
        by_class = class_counts(counts) if "class" in counts else None
        total = len(counts)
    elif isinstance(counts, Mapping):
        by_class = {int(k): int(v) for k, v in counts.items()}
        total = sum(by_class.values())
    else:
        by_class = None
        total = int(counts)
    if total < 0 or (by_class and min(by_class.values()) < 0):
        raise ValueError(f"Counts must be >= 0. Received: counts={counts}")
    for name, value in (("tissue_area_px", tissue_area_px), ("runtime_s", runtime_s)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"`{name}` must be a number >= 0 or None. Received: {name}={value}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"`mpp` must be a positive number or None. Received: mpp={mpp}")

    names = {int(k): str(v) for k, v in (class_names or {}).items() if int(k) > 0}
    area_mm2 = None
    if tissue_area_px is not None and mpp is not None:
        area_mm2 = float(tissue_area_px) * float(mpp) ** 2 / 1e6

    def density(n: int) -> float | None:
        return n / area_mm2 if area_mm2 else None

    per_class: dict[str, int] = {}
    if by_class is not None:
        for k in sorted(set(names) | {k for k in by_class if k > 0}):
            per_class[names.get(k, str(k))] = by_class.get(k, 0)
        if by_class.get(0, 0) > 0:
            per_class[UNCLASSIFIED] = by_class[0]
    summary: dict[str, Any] = {
        "kerasnuc_version": __version__,
        "created": (created or datetime.datetime.now(datetime.UTC)).isoformat(),
        "model_id": model_id,
        "runtime_s": None if runtime_s is None else float(runtime_s),
        "mpp": None if mpp is None else float(mpp),
        "tissue_area_px": None if tissue_area_px is None else float(tissue_area_px),
        "tissue_area_mm2": area_mm2,
        "total": total,
        "density_per_mm2": density(total),
        "counts": per_class,
        "fractions": {k: (n / total if total else None) for k, n in per_class.items()},
        "densities_per_mm2": {k: density(n) for k, n in per_class.items()},
        "settings": jsonable(dict(settings or {})),
    }
    for key, value in extra.items():
        if key in summary:
            raise ValueError(f"Extra key {key!r} collides with a summary field.")
        summary[key] = jsonable(value)
    return summary


def write_summary(path: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """Write a summary dict as indented JSON, atomically. Returns the path."""
    path = Path(path)
    write_json_atomic(path, jsonable(summary))
    return path
