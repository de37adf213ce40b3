"""Point annotations importer: one point per nucleus (QuPath points or CSV) -> a points dataset.

Layout::

    SRC/images/<stem>.<png|tif|tiff|jpg|jpeg>
    SRC/points/<stem>.geojson   (or .json, or .csv; the folder may also be called annotations/)

* GeoJSON (QuPath's "Export as GeoJSON" of objects drawn with the Points tool): ``Point`` and
  ``MultiPoint`` geometries, QuPath's corner origin (``(x, y) = (c + 0.5, r + 0.5)`` is the
  centre of pixel ``(r, c)``); other geometries (a region polygon) are skipped and reported.
  The class is ``properties.classification.name``.
* CSV: a header with ``x,y`` (or ``row,col``) in pixel indices (the centre of pixel ``(r, c)`` is
  ``(x, y) = (c, r)``) and an optional ``class`` column.

Classes: ``class_map`` renames labels first (``{"Lymphocyte": "inflammatory"}``; a label mapped
to ``""`` becomes unclassified); ids 1..C then go to the names in the order of ``classes``, else
to every name found, sorted (numbers numerically). Points without a class stay unclassified
(class 0). Points off the image are dropped and reported; images without a point file are
skipped and reported.

The result is a points dataset (:mod:`kerasnuc.data.dataset`): ``images/``, ``points/<id>.csv``
(``x,y,class``), ``meta.json`` with ``"annotations": "points"``, ``splits.csv``. It trains the
``weak`` method directly (``kerasnuc train --method weak --data DST``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kerasnuc.data.importers.base import (
    IMAGE_EXTENSIONS,
    ImportItem,
    ImportPlan,
    LoadedSample,
    files_by_stem,
    parse_class_names,
    read_rgb,
    subdir,
)
from kerasnuc.fileutil import KerasnucError
from kerasnuc.io.points import POINT_SUFFIXES, read_point_labels_csv, read_point_labels_geojson

POINT_FOLDERS = ("points", "annotations")


def parse_class_map(value: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"Tumor=epithelial,Lymphocyte=inflammatory"`` (or a dict) -> ``{old: new}``.

    Raises:
        ValueError: an entry without ``=`` or with an empty old name.
    """
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in value.items()}
    out: dict[str, str] = {}
    for part in value.split(","):
        old, sep, new = part.partition("=")
        if not sep or not old.strip():
            raise ValueError(
                "`class_map` must be OLD=NEW pairs, e.g. 'Lymphocyte=inflammatory'. "
                f"Received: {value!r}"
            )
        out[old.strip()] = new.strip()
    return out


def _sort_key(name: str) -> tuple[int, float, str]:
    return (0, float(name), "") if re.fullmatch(r"\d+", name) else (1, 0.0, name)


def _read(path: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """``(points (K, 2) (row, col), labels, problems)`` of one point file."""
    problems = []
    if path.suffix.lower() == ".csv":
        points, labels = read_point_labels_csv(path)
        labels = labels if labels is not None else [""] * len(points)
    else:
        points, labels, skipped = read_point_labels_geojson(path)
        if skipped:
            problems.append(f"{path}: skipped non-point features {skipped}")
    return points, labels, problems


def _load(
    path: Path,
    image_path: Path,
    class_map: dict[str, str],
    class_ids: dict[str, int] | None,
) -> LoadedSample:
    image = read_rgb(image_path)
    points, labels, problems = _read(path)
    h, w = image.shape[:2]
    on_image = (
        (points[:, 0] >= -0.5)
        & (points[:, 0] <= h - 0.5)
        & (points[:, 1] >= -0.5)
        & (points[:, 1] <= w - 0.5)
    )
    if not on_image.all():
        problems.append(f"{path}: {int((~on_image).sum())} point(s) off the {h}x{w} image dropped")
    classes = None
    if class_ids is not None:
        names = [class_map.get(v, v) for v in labels]
        classes = np.asarray([class_ids.get(n, 0) if n else 0 for n in names], dtype=np.int32)
        classes = classes[on_image]
    return LoadedSample(image, None, None, problems, points=points[on_image], point_classes=classes)


def scan_points(
    src: str | Path,
    classes: str | Sequence[str] | None = None,
    class_map: str | Mapping[str, str] | None = None,
) -> ImportPlan:
    """Pair point files with their images and fix the class ids (see the module docstring).

    Args:
        src: folder with ``images/`` and ``points/`` (or ``annotations/``).
        classes: class names for ids 1, 2, ... (``"a,b"`` or a list; after ``class_map``);
            default: every name found, sorted.
        class_map: ``{label in the files: class name}`` (or ``"OLD=NEW,..."``).

    Returns:
        An :class:`~kerasnuc.data.importers.base.ImportPlan` of a points dataset.

    Raises:
        KerasnucError: missing folders, a point file without image, an unreadable file, or a
            class name not in ``classes`` (the message names the file).
    """
    src = Path(src)
    if not src.is_dir():
        raise KerasnucError(f"{src}: not a folder")
    layout = "images/<stem>.png and points/<stem>.geojson or .csv"
    images_dir = subdir(src, "images")
    points_dir = next((d for d in (subdir(src, n) for n in POINT_FOLDERS) if d), None)
    if images_dir is None or points_dir is None:
        missing = "images" if images_dir is None else "points"
        raise KerasnucError(f"{src}: no {missing}/ folder (expected {layout})")
    names = parse_class_names(classes)
    mapping = parse_class_map(class_map)
    files = files_by_stem(points_dir, POINT_SUFFIXES)
    if not files:
        raise KerasnucError(f"{points_dir}: no point files (<stem>.geojson, .json or .csv)")
    images = files_by_stem(images_dir, IMAGE_EXTENSIONS)
    found: set[str] = set()
    pairs = []
    for stem, path in files.items():
        image = images.get(stem)
        if image is None:
            raise KerasnucError(f"{path}: no image {stem}.<png|tif|jpg> in {images_dir}")
        _, labels, _ = _read(path)
        for label in labels:
            name = mapping.get(label, label)
            if not name:
                continue
            if names is not None and name not in names:
                raise KerasnucError(
                    f"{path}: class {label!r} is not one of the class names {names}"
                    + (f" (after --class-map: {name!r})" if name != label else "")
                )
            found.add(name)
        pairs.append((stem, image, path))
    if names is None and found:
        names = sorted(found, key=_sort_key)
    class_ids = {n: i for i, n in enumerate(names, start=1)} if names else None
    items = [
        ImportItem(stem, str(path), lambda p=path, i=image: _load(p, i, mapping, class_ids))
        for stem, image, path in pairs
    ]
    problems = [
        f"{path}: image without point file (skipped)"
        for stem, path in images.items()
        if stem not in files
    ]
    meta = {
        "source": [str(src.resolve())],
        "license": None,
        "stain": None,
        "magnification": None,
        "mpp": None,
        "classes": {i: n for n, i in class_ids.items()} if class_ids else None,
        "notes": (
            "Imported by `kerasnuc data import points`: one point per nucleus, "
            "points/<id>.csv with x,y pixel indices (QuPath GeoJSON's corner origin converted: "
            "x - 0.5, y - 0.5) and the class id"
            + (f"; classes renamed: {mapping}" if mapping else "")
            + (f"; classes: {names}" if names else "")
            + "."
        ),
    }
    return ImportPlan("points", src, items, meta, problems, annotations="points")
