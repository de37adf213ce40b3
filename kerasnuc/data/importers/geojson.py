"""QuPath GeoJSON importer: polygons exported by QuPath (or any GeoJSON in pixel coordinates).

Layout::

    SRC/images/<stem>.<png|tif|tiff|jpg|jpeg>
    SRC/annotations/<stem>.geojson   (or .json): a FeatureCollection, a list of features (as
                                     QuPath's "Export as GeoJSON" writes) or a single Feature

Every ``Polygon``/``MultiPolygon`` feature is one nucleus (all parts of a MultiPolygon share its
id); other geometries are skipped and reported. For cell objects the ``nucleusGeometry`` is used
when present. The object type is ``properties.objectType`` (QuPath >= 0.3) or derived from the
older ``id`` field (``PathDetectionObject`` -> detection, ...); ``object_types`` keeps only the
listed ones. The class is ``properties.classification.name``; ids 1..C go to the names in sorted
order, or in the order given by ``classes``. When no feature is classified the dataset has no
classes; when some are, an unclassified feature is an error.

Coordinates (QuPath convention): pixel units, ``(0, 0)`` at the top-left corner of the top-left
pixel, so pixel ``(row r, col c)`` covers ``[c, c + 1) x [r, r + 1)`` and has its centre at
``(x, y) = (c + 0.5, r + 0.5)``. A pixel belongs to a polygon when its centre lies inside (or on
the boundary of) the polygon: ``skimage.draw.polygon(rows=y - 0.5, cols=x - 0.5)``. A square with
corners ``(2, 1)`` and ``(5, 4)`` therefore fills rows 1..3 and columns 2..4 (9 pixels = its
area). Holes (inner rings) are removed; later features overwrite earlier ones; rings with fewer
than 3 distinct vertices and empty geometries (``"coordinates": []``) are skipped and reported; so
are polygons that cover no pixel of the image, and a file whose polygons all miss the image is an
error (the annotations of another image, or coordinates that are not full-image pixels).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.data.importers.base import (
    IMAGE_EXTENSIONS,
    ImportItem,
    ImportPlan,
    LoadedSample,
    files_by_stem,
    parse_class_names,
    read_rgb,
    require_dir,
)
from kerasnuc.fileutil import KerasnucError
from kerasnuc.io.geojson import polygon_pixels, polygon_rings, read_features

logger = logging.getLogger(__name__)

ANNOTATION_EXTENSIONS = (".geojson", ".json")
_QUPATH_IDS = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "PathTMACoreObject": "tma_core",
}


def object_type(feature: dict[str, Any]) -> str | None:
    """QuPath object type of a feature (``"detection"``, ``"annotation"``, ``"cell"``, ...)."""
    props = feature.get("properties") or {}
    value = props.get("objectType") if isinstance(props, dict) else None
    if isinstance(value, str):
        return value.lower()
    return _QUPATH_IDS.get(feature.get("id")) if isinstance(feature.get("id"), str) else None


def class_name(feature: dict[str, Any]) -> str | None:
    """``properties.classification.name`` (or its ``names`` joined by ``": "``), else None."""
    props = feature.get("properties") or {}
    cls = props.get("classification") if isinstance(props, dict) else None
    if isinstance(cls, dict):
        if isinstance(cls.get("name"), str) and cls["name"]:
            return cls["name"]
        names = cls.get("names")
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return ": ".join(names)
    return None


def _keep(feature: dict[str, Any], object_types: set[str] | None) -> bool:
    return object_types is None or object_type(feature) in object_types


def _distinct_vertices(ring: np.ndarray) -> int:
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    return len(np.unique(ring, axis=0))


def rasterise_features(
    features: Sequence[dict[str, Any]],
    shape: tuple[int, int],
    path: Path,
    class_ids: dict[str, int] | None,
    object_types: set[str] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Draw the polygon features of one file (QuPath pixel-corner convention).

    Args:
        features: GeoJSON features in file order.
        shape: ``(H, W)`` of the image.
        path: the file named in errors.
        class_ids: ``{class name: id}``, or None for a dataset without classes.
        object_types: object types to keep (None: all).

    Returns:
        ``(instances, classes, problems)``: ``(H, W)`` int32 instance map (feature k drawn
        gets id k), ``(H, W)`` int32 class map (None without classes) and report lines.
    """
    inst = np.zeros(shape, dtype=np.int32)
    cls = np.zeros(shape, dtype=np.int32) if class_ids is not None else None
    skipped_geom: dict[str, int] = {}
    n_small = n_empty = n_outside = n_drawn = 0
    k = 0
    for index, feature in enumerate(features):
        if not _keep(feature, object_types):
            continue
        geometry = feature.get("nucleusGeometry") or feature.get("geometry")
        polys = polygon_rings(geometry, path, index)
        if polys is None:
            kind = geometry.get("type") if isinstance(geometry, dict) else "null"
            skipped_geom[str(kind)] = skipped_geom.get(str(kind), 0) + 1
            continue
        polys = [rings for rings in polys if rings]
        if not polys:  # "coordinates": [] (an empty geometry, RFC 7946)
            n_empty += 1
            continue
        class_id = 0
        if class_ids is not None:
            name = class_name(feature)
            if name is None:
                raise KerasnucError(f"{path}: feature {index} has no classification")
            if name not in class_ids:
                raise KerasnucError(
                    f"{path}: feature {index} class {name!r} not in the class names "
                    f"{list(class_ids)}"
                )
            class_id = class_ids[name]
        k += 1
        pixels = 0
        drawable = False
        for rings in polys:
            if _distinct_vertices(rings[0]) < 3:
                n_small += 1
                continue
            drawable = True
            pix_rings = [
                (r[:, 1] - 0.5, r[:, 0] - 0.5) for r in rings if _distinct_vertices(r) >= 3
            ]
            rr, cc = polygon_pixels(pix_rings, shape)
            pixels += rr.size
            inst[rr, cc] = k
            if cls is not None:
                cls[rr, cc] = class_id
        if drawable and pixels == 0:
            n_outside += 1
        n_drawn += pixels > 0
    problems = []
    height, width = shape
    if n_outside and not n_drawn:
        raise KerasnucError(
            f"{path}: none of its {n_outside} polygons covers a pixel of the {width}x{height} "
            "image (annotations of another image, or coordinates not in full-image pixels?)"
        )
    if n_empty and not n_drawn:
        raise KerasnucError(f"{path}: no polygon with coordinates ({n_empty} empty geometries)")
    if n_outside:
        problems.append(
            f"{path}: {n_outside} polygon(s) outside the {width}x{height} image skipped"
        )
    if n_empty:
        problems.append(f"{path}: skipped {n_empty} empty geometry/geometries (no coordinates)")
    if skipped_geom:
        problems.append(f"{path}: skipped non-polygon features {skipped_geom}")
    if n_small:
        problems.append(f"{path}: skipped {n_small} polygon(s) with fewer than 3 vertices")
    return inst, cls, problems


def _load(
    ann_path: Path,
    image_path: Path,
    class_ids: dict[str, int] | None,
    object_types: set[str] | None,
) -> LoadedSample:
    image = read_rgb(image_path)
    features = read_features(ann_path)
    inst, cls, problems = rasterise_features(
        features, image.shape[:2], ann_path, class_ids, object_types
    )
    return LoadedSample(image, inst, cls, problems)


def scan_geojson(
    src: str | Path,
    classes: str | Sequence[str] | None = None,
    object_types: str | Sequence[str] | None = None,
) -> ImportPlan:
    """Pair GeoJSON annotation files with their images and fix the class ids.

    Args:
        src: folder with ``images/`` and ``annotations/``.
        classes: class names for ids 1, 2, ... (``"a,b"`` or a list); default: every name
            found, sorted.
        object_types: keep only these QuPath object types (``"detection,cell"`` or a list);
            default: all.

    Returns:
        An :class:`ImportPlan` (mpp unknown unless given to :func:`write_plan`).

    Raises:
        KerasnucError: missing folders, an annotation file without image, unreadable GeoJSON,
            or a class name not in ``classes``.
    """
    src = Path(src)
    if not src.is_dir():
        raise KerasnucError(f"{src}: not a folder")
    layout = "images/<stem>.png and annotations/<stem>.geojson"
    images_dir = require_dir(src, "images", layout)
    ann_dir = require_dir(src, "annotations", layout)
    names = parse_class_names(classes)
    types: set[str] | None = None
    if object_types is not None:
        parsed = object_types.split(",") if isinstance(object_types, str) else list(object_types)
        types = {t.strip().lower() for t in parsed if t.strip()}
        if not types:
            raise ValueError(
                f"`object_types` must name at least one type. Received: {object_types!r}"
            )
    anns = files_by_stem(ann_dir, ANNOTATION_EXTENSIONS)
    if not anns:
        raise KerasnucError(f"{ann_dir}: no .geojson files")
    images = files_by_stem(images_dir, IMAGE_EXTENSIONS)
    found_names: set[str] = set()
    pairs = []
    for stem, ann in anns.items():
        image = images.get(stem)
        if image is None:
            raise KerasnucError(f"{ann}: no image {stem}.<png|tif|jpg> in {images_dir}")
        for index, feature in enumerate(read_features(ann)):
            if not _keep(feature, types):
                continue
            name = class_name(feature)
            if name is None:
                continue
            if names is not None and name not in names:
                raise KerasnucError(
                    f"{ann}: feature {index} class {name!r} not in the class names {names}"
                )
            found_names.add(name)
        pairs.append((stem, image, ann))
    if names is None and found_names:
        names = sorted(found_names)
    class_ids = {n: i for i, n in enumerate(names, start=1)} if names else None
    items = [
        ImportItem(stem, str(ann), lambda a=ann, i=image: _load(a, i, class_ids, types))
        for stem, image, ann in pairs
    ]
    problems = [
        f"{path}: image without annotation file (skipped)"
        for stem, path in images.items()
        if stem not in anns
    ]
    meta = {
        "source": [str(src.resolve())],
        "license": None,
        "stain": None,
        "magnification": None,
        "mpp": None,
        "classes": {i: n for n, i in class_ids.items()} if class_ids else None,
        "notes": (
            "Imported by `kerasnuc data import geojson` (QuPath GeoJSON, pixel coordinates with "
            "(0, 0) at the top-left corner of the top-left pixel): a pixel belongs to a polygon "
            "when its centre lies inside it (skimage.draw.polygon(y - 0.5, x - 0.5)); holes "
            "removed; later features overwrite earlier ones; nucleusGeometry used for cells"
            + (f"; object types kept: {sorted(types)}" if types else "")
            + (f"; classes from properties.classification.name: {names}" if names else "")
            + "; ids relabelled 1..N."
        ),
    }
    return ImportPlan("geojson", src, items, meta, problems)
