"""Importers that convert public nuclei datasets into the kerasnuc interchange layout.

One module per source format; each has a ``scan_<format>(src, ...)`` function returning an
:class:`ImportPlan`, written by :func:`write_plan` through
:class:`~kerasnuc.data.dataset.DatasetWriter` (atomic: on any error the destination is not
created). :func:`import_dataset` does both::

    from kerasnuc.data.importers import import_dataset
    report = import_dataset("consep", "CoNSeP/Train", "data/consep", val_fraction=0.2, seed=0)

Formats:

* ``monuseg``: MoNuSeg XML polygons + images (:mod:`.monuseg`).
* ``consep``: CoNSeP / HoVer-Net ``.mat`` labels + PNG images (:mod:`.consep`).
* ``lizard`` (or ``conic``): the CoNIC challenge release of Lizard, ``images.npy`` +
  ``labels.npy`` (:mod:`.lizard`; a dataset, not the ``conic`` method).
* ``pannuke``: one PanNuke fold, ``images.npy`` + ``masks.npy`` (:mod:`.pannuke`).
* ``masks``: folders of images and instance / binary masks (:mod:`.masks`).
* ``geojson``: QuPath GeoJSON polygons + images (:mod:`.geojson`).
* ``points``: one point per nucleus (QuPath points or ``x,y[,class]`` CSV) + images, written as
  a points dataset (:mod:`.points`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kerasnuc.data.importers.base import (
    ImportItem,
    ImportPlan,
    ImportReport,
    LoadedSample,
    assign_splits,
    check_destination,
    write_plan,
)
from kerasnuc.data.importers.consep import scan_consep
from kerasnuc.data.importers.geojson import scan_geojson
from kerasnuc.data.importers.lizard import scan_lizard
from kerasnuc.data.importers.masks import scan_masks
from kerasnuc.data.importers.monuseg import scan_monuseg
from kerasnuc.data.importers.pannuke import scan_pannuke
from kerasnuc.data.importers.points import scan_points

FORMATS: dict[str, Callable[..., ImportPlan]] = {
    "monuseg": scan_monuseg,
    "consep": scan_consep,
    "lizard": scan_lizard,
    "conic": scan_lizard,  # the CoNIC challenge release of Lizard: the same arrays
    "pannuke": scan_pannuke,
    "masks": scan_masks,
    "geojson": scan_geojson,
    "points": scan_points,
}

# Keyword options each format accepts besides ``src``.
FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "monuseg": (),
    "consep": ("merge_classes",),
    "lizard": (),
    "conic": (),
    "pannuke": (),
    "masks": ("classes", "mask_type"),
    "geojson": ("classes", "object_types", "exclude_classes"),
    "points": ("classes", "class_map"),
}


def scan(format: str, src: str | os.PathLike, **options: Any) -> ImportPlan:
    """Run the scanner of ``format`` on ``src`` with its format-specific ``options``.

    Raises:
        ValueError: unknown format, or an option the format does not take.
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {sorted(FORMATS)}. Received: format={format!r}")
    unknown = sorted(set(options) - set(FORMAT_OPTIONS[format]))
    if unknown:
        raise ValueError(
            f"Format {format!r} takes the options {list(FORMAT_OPTIONS[format])}. "
            f"Received: {unknown}"
        )
    return FORMATS[format](Path(src), **options)


def import_dataset(
    format: str,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    mpp: float | None = None,
    name: str | None = None,
    split: str = "train",
    val_fraction: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> ImportReport:
    """Import ``src`` (in ``format``) into a new dataset folder ``dst``.

    Args:
        format: one of :data:`FORMATS`.
        src: source folder.
        dst: destination folder (created atomically).
        mpp: microns per pixel (overrides the format's default or file value).
        name: dataset name in ``meta.json`` (default: ``dst``'s folder name).
        split: split name of the images (those not drawn for ``val``).
        val_fraction: fraction of images drawn at random (``seed``) for the ``val`` split.
        seed: seed of that draw.
        overwrite: replace an existing ``dst``.
        progress: called with 1 after each written image.
        **options: format-specific options (:data:`FORMAT_OPTIONS`).

    Returns:
        An :class:`ImportReport`.

    Raises:
        KerasnucError: bad input (the message names the file); ``dst`` is not created.
    """
    check_destination(dst, overwrite)
    plan = scan(format, src, **options)
    return write_plan(
        plan,
        dst,
        mpp=mpp,
        name=name,
        split=split,
        val_fraction=val_fraction,
        seed=seed,
        overwrite=overwrite,
        progress=progress,
    )


__all__ = [
    "FORMATS",
    "FORMAT_OPTIONS",
    "ImportItem",
    "ImportPlan",
    "ImportReport",
    "LoadedSample",
    "assign_splits",
    "check_destination",
    "import_dataset",
    "scan",
    "scan_consep",
    "scan_geojson",
    "scan_lizard",
    "scan_masks",
    "scan_monuseg",
    "scan_pannuke",
    "scan_points",
    "write_plan",
]
