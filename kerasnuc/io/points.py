"""Point annotations on disk: one CSV or (QuPath) GeoJSON file per image.

Points are ``(K, 2)`` float64 ``(row, col)`` arrays in pixels of the image as stored, with the
pixel ``(r, c)`` centred at ``(row, col) = (r, c)`` (kerasnuc's convention; QuPath's corner origin
is converted). :func:`read_points_path` reads a folder of ``<image id>.csv`` / ``.geojson`` files
(``kerasnuc train --points``); :func:`read_points_file` one file by its suffix. Classes are
integer ids (0 = unclassified) or names mapped with the dataset's class names. What the points
become (targets of the ``weak`` method) is :mod:`kerasnuc.data.points`.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.fileutil import KerasnucError
from kerasnuc.io.geojson import read_features

logger = logging.getLogger(__name__)


def _class_id(value: Any, class_names: Mapping[int, str] | None, path: Path, where: str) -> int:
    """Class id of a CSV cell / GeoJSON classification (0 = unclassified)."""
    if value is None:
        return 0
    text = str(value).strip()
    if not text:
        return 0
    if re.fullmatch(r"[+]?\d+", text):
        return int(text)
    if class_names:
        lookup = {str(name).strip().lower(): int(k) for k, name in class_names.items()}
        if text.lower() in lookup:
            return lookup[text.lower()]
        known = ", ".join(sorted(str(v) for v in class_names.values()))
        raise KerasnucError(f"{path}: {where}: unknown class {text!r} (known: {known})")
    raise KerasnucError(
        f"{path}: {where}: class {text!r} is a name; pass the class names of the dataset to map "
        "it to an id"
    )


_CSV_COORDS = (("y", "x"), ("row", "col"), ("row", "column"))
_CSV_CLASS = ("class", "label", "type", "classification")


def read_point_labels_csv(path: str | os.PathLike) -> tuple[np.ndarray, list[str] | None]:
    """Points of a CSV file with their class cells as written (see :func:`read_points_csv`).

    Returns:
        ``(points, labels)``: ``(K, 2)`` float64 ``(row, col)`` and the ``K`` class cells
        (stripped; ``""`` = unclassified), or None without a class column.

    Raises:
        KerasnucError: as :func:`read_points_csv`.
    """
    pts, labels, _ = _read_csv(Path(path))
    return pts, labels


def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None, list[str]]:
    """:func:`read_point_labels_csv` plus where each point is (``"line N"``)."""
    if not path.is_file():
        raise KerasnucError(f"{path}: file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise KerasnucError(f"{path}: cannot read CSV ({exc})") from exc
    if not rows:
        raise KerasnucError(f"{path}: empty file, expected a header with x,y or row,col columns")
    header = [h.strip().lower() for h in rows[0]]
    pair = next((p for p in _CSV_COORDS if p[0] in header and p[1] in header), None)
    if pair is None:
        raise KerasnucError(
            f"{path}: header {rows[0]} has no coordinate columns (expected x,y or row,col)"
        )
    i_row, i_col = header.index(pair[0]), header.index(pair[1])
    cls_name = next((c for c in _CSV_CLASS if c in header), None)
    i_cls = header.index(cls_name) if cls_name else None
    points, labels, wheres = [], [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"line {line_no}"
        try:
            r, c = float(row[i_row]), float(row[i_col])
        except (IndexError, ValueError) as exc:
            raise KerasnucError(f"{path}: {where}: bad coordinates {row}") from exc
        if not (np.isfinite(r) and np.isfinite(c)):
            raise KerasnucError(f"{path}: {where}: non-finite coordinates {row}")
        points.append((r, c))
        wheres.append(where)
        if i_cls is not None:
            labels.append(row[i_cls].strip() if i_cls < len(row) else "")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts, labels if i_cls is not None else None, wheres


def _map_labels(
    labels: list[str] | None,
    class_names: Mapping[int, str] | None,
    path: Path,
    wheres: Sequence[str],
) -> np.ndarray | None:
    """Class ids of raw labels (None when there is no label or every point is unclassified)."""
    if labels is None:
        return None
    ids = [_class_id(v, class_names, path, w) for v, w in zip(labels, wheres, strict=True)]
    return np.asarray(ids, dtype=np.int32) if any(ids) else None


def read_points_csv(
    path: str | os.PathLike, class_names: Mapping[int, str] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read point labels from a CSV file with a header row.

    Accepted columns (case-insensitive, surrounding spaces ignored; other columns are ignored):

    * coordinates, first pair found in this order: ``x`` and ``y`` (pixel coordinates,
      ``x`` = column, ``y`` = row), ``row`` and ``col``, ``row`` and ``column``;
    * optional class, first found of ``class``, ``label``, ``type``, ``classification``: an
      integer id (0 = unclassified) or a class name looked up (case-insensitive) in
      ``class_names``; an empty cell means unclassified.

    Args:
        path: CSV file (UTF-8, optional BOM).
        class_names: ``{id: name}`` of the dataset (``Dataset.class_names``), to map names to ids.

    Returns:
        ``(points, classes)``: ``(K, 2)`` float64 ``(row, col)`` and ``(K,)`` int32 class ids,
        or None when the file has no class column or no row carries a class.

    Raises:
        KerasnucError: missing file, no header, no coordinate columns, a bad value (the message
            names the file and the line).
    """
    path = Path(path)
    pts, labels, wheres = _read_csv(path)
    return pts, _map_labels(labels, class_names, path, wheres)


def read_point_labels_geojson(
    path: str | os.PathLike, corner_origin: bool = True
) -> tuple[np.ndarray, list[str] | None, dict[str, int]]:
    """Points of a (QuPath) GeoJSON file with their classifications as written.

    See :func:`read_points_geojson` for what is read.

    Returns:
        ``(points, labels, skipped)``: ``(K, 2)`` float64 ``(row, col)``, the ``K`` class names
        (``""`` = unclassified; ints as text), and ``{geometry type: count}`` of the features
        that are not points (e.g. a region polygon).

    Raises:
        KerasnucError: as :func:`read_points_geojson`.
    """
    pts, labels, skipped, _ = _read_geojson(Path(path), corner_origin)
    return pts, labels, skipped


def _read_geojson(
    path: Path, corner_origin: bool
) -> tuple[np.ndarray, list[str], dict[str, int], list[str]]:
    """:func:`read_point_labels_geojson` plus where each point is (``"feature N"``)."""
    features = read_features(path, bare_geometries=("Point", "MultiPoint"))
    points: list[tuple[float, float]] = []
    labels: list[str] = []
    wheres: list[str] = []
    skipped: dict[str, int] = {}
    for i, feature in enumerate(features):
        where = f"feature {i}"
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if not isinstance(geometry, dict):
            raise KerasnucError(f"{path}: {where}: no geometry object")
        kind = geometry.get("type")
        if kind not in ("Point", "MultiPoint"):
            skipped[str(kind)] = skipped.get(str(kind), 0) + 1
            continue
        coords = geometry.get("coordinates")
        try:
            xy = np.asarray([coords] if kind == "Point" else coords, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise KerasnucError(f"{path}: {where}: bad {kind} coordinates {coords!r}") from exc
        if xy.size == 0 and kind == "MultiPoint":
            continue
        if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy).all():
            raise KerasnucError(f"{path}: {where}: bad {kind} coordinates {coords!r}")
        props = feature.get("properties") or {}
        classification = props.get("classification") if isinstance(props, dict) else None
        if isinstance(classification, dict):
            classification = classification.get("name")
        label = "" if classification is None else str(classification).strip()
        for x, y in xy[:, :2]:
            points.append((float(y), float(x)))
            labels.append(label)
            wheres.append(where)
    if skipped:
        logger.info("%s: skipped non-point features %s", path, skipped)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if corner_origin:
        pts -= 0.5
    return pts, labels, skipped, wheres


def read_points_geojson(
    path: str | os.PathLike,
    class_names: Mapping[int, str] | None = None,
    corner_origin: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read point annotations from a (QuPath) GeoJSON file.

    Accepted: a ``FeatureCollection``, a single ``Feature``, or a JSON list of features (the
    older QuPath export). ``Point`` and ``MultiPoint`` geometries give points with coordinates
    ``[x, y]`` in pixels (``x`` along columns, ``y`` along rows; see ``corner_origin``);
    features with other geometries (e.g. a region-of-interest polygon) are skipped. The class
    comes from ``properties.classification``, either QuPath's ``{"name": ...}`` object or a plain
    string/int, mapped like the CSV class column (:func:`read_points_csv`); features without it
    are unclassified (0).

    Args:
        path: GeoJSON file.
        class_names: ``{id: name}`` of the dataset, to map classification names to ids.
        corner_origin: the coordinates put ``(0, 0)`` at the top-left *corner* of the first
            pixel, so pixel ``(r, c)`` is centred at ``(x, y) = (c + 0.5, r + 0.5)``; 0.5 is
            subtracted to get kerasnuc's pixel-centre ``(row, col)``. On by default: this is
            QuPath's convention, also used by the polygon importer
            (``kerasnuc.data.importers.geojson``). False reads the coordinates as pixel centres
            (like :func:`read_points_csv`).

    Returns:
        ``(points, classes)`` as :func:`read_points_csv`.

    Raises:
        KerasnucError: missing file, invalid JSON, bad geometry (the message names the file).
    """
    path = Path(path)
    pts, labels, _, wheres = _read_geojson(path, corner_origin)
    return pts, _map_labels(labels, class_names, path, wheres)


def read_point_labels(path: str | os.PathLike) -> tuple[np.ndarray, list[str] | None]:
    """Points of one file by its suffix with their class labels as written (no mapping).

    Returns:
        ``(points, labels)``: ``(K, 2)`` float64 ``(row, col)`` (QuPath's corner origin
        converted) and the class labels (None: a CSV file without a class column).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_point_labels_csv(path)
    if suffix in (".geojson", ".json"):
        pts, labels, _ = read_point_labels_geojson(path)
        return pts, labels
    raise KerasnucError(f"{path}: not a point file (expected one of {', '.join(POINT_SUFFIXES)})")


#: File suffixes of point annotation files: CSV and (QuPath) GeoJSON.
POINT_SUFFIXES = (".csv", ".geojson", ".json")


def read_points_file(
    path: str | os.PathLike, class_names: Mapping[int, str] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one point file by its suffix: ``.csv`` (:func:`read_points_csv`), ``.geojson`` /
    ``.json`` (:func:`read_points_geojson`, QuPath's corner-origin convention).

    Raises:
        KerasnucError: another suffix, or a bad file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_points_csv(path, class_names)
    if suffix in (".geojson", ".json"):
        return read_points_geojson(path, class_names)
    raise KerasnucError(f"{path}: not a point file (expected one of {', '.join(POINT_SUFFIXES)})")


def read_points_path(
    path: str | os.PathLike,
    ids: Sequence[str] | None = None,
    class_names: Mapping[int, str] | None = None,
) -> dict[str, np.ndarray]:
    """Point annotations of several images, one file per image, named after the image id.

    Convention: ``path`` is a folder holding ``<image id>.csv``, ``<image id>.geojson`` or
    ``<image id>.json`` files (CSV: columns ``x,y`` or ``row,col`` in pixels of the image at its
    own resolution; GeoJSON: QuPath point annotations), or a single such file whose stem is the
    id of its image. Files of other types in the folder are ignored.

    Args:
        path: folder or file.
        ids: read only these image ids (None: every file).
        class_names: unused (kept for compatibility): the classes are not returned, so class
            names need no mapping.

    Returns:
        ``{image id: (K, 2) float64 (row, col)}``.

    Raises:
        KerasnucError: no such path, no point file in it, two files for one id, or a bad file.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in POINT_SUFFIXES
        )
        if not files:
            raise KerasnucError(
                f"{path}: no point files (<image id>{'/'.join(POINT_SUFFIXES)}) in this folder"
            )
    else:
        raise KerasnucError(f"{path}: point annotations not found")
    wanted = None if ids is None else set(ids)
    out: dict[str, np.ndarray] = {}
    seen: dict[str, Path] = {}
    for file in files:
        id = file.stem
        if wanted is not None and id not in wanted:
            continue
        if id in seen:
            raise KerasnucError(f"{file}: second point file for image {id!r} (also {seen[id]})")
        seen[id] = file
        out[id], _ = read_point_labels(file)
    return out
