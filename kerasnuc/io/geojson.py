"""GeoJSON nuclei that QuPath imports as detections, written tile by tile; and a rasterising reader.

File layout (RFC 7946 FeatureCollection, one feature per line)::

    {"type": "FeatureCollection", "features": [
    {"type": "Feature", "id": "<uuid>", "geometry": {"type": "Polygon", "coordinates": [...]},
     "properties": {"objectType": "detection",
                    "classification": {"name": "Tumour", "color": [255, 0, 0]},
                    "measurements": {"id": 7, "area_px": 24, ...}}},
    ...
    ]}

What QuPath (>= 0.4, ``PathObjectTypeAdapters``) reads from it: ``properties.objectType``
(``"detection"``), ``properties.classification`` (``name`` and an ``[r, g, b]`` ``color``),
``properties.measurements`` as an object ``{name: number}`` (QuPath 0.4 switched to this form;
0.3 wrote and read a list of ``{"name", "value"}``), and the feature ``id`` when it parses as a
UUID (anything else is ignored). Our ids are deterministic version-5 UUIDs of
``"<id_namespace>/<nucleus id>"`` (the namespace defaults to the output file name), so the same
run writes the same file; the nucleus id itself is the ``id`` measurement. Measurements are the
numeric columns of a :class:`~kerasnuc.postprocess.measure.NucleusTable` under their CSV names
(``prob_<class>`` included); non-finite values are left out (JSON has no NaN). Nuclei with class 0
(or without a table) have no classification.

Geometry (QuPath's pixel-corner convention): coordinates are pixels of the full image with
``(0, 0)`` at the top-left *corner* of the top-left pixel, so pixel ``(row r, col c)`` is the
square ``(c, r)-(c + 1, r + 1)``. Each polygon is the exact outline of the nucleus's pixels along
pixel edges (its shoelace area equals the pixel count; all vertices are integers), found with
``cv2.findContours`` on a twice-upsampled "corner lattice" of the mask (pixel centres, edge
midpoints and corners all become lattice points, a corner being set when any of its 4 pixels is
set) with the diagonal shortcuts OpenCV takes at concave corners replaced by the corner itself,
and collinear points dropped. Holes are inner rings; a nucleus with several 4-connected pieces
is a ``MultiPolygon`` (pieces touching only at a pixel corner share that vertex, which keeps the
geometry valid for JTS/QuPath). Rings are closed (first vertex repeated) and wound as RFC 7946
asks: exterior rings counter-clockwise, holes clockwise, *in the coordinate numbers* (positive
shoelace area for exteriors); on screen, where y points down, exteriors therefore look
clockwise. QuPath ignores the winding.

Reading: :func:`read_features` is the one GeoJSON parser (the polygon importer, the point
annotations and :func:`read_geojson_instances` use it); :func:`polygon_rings` takes the rings of
a Polygon/MultiPolygon and :func:`polygon_pixels` rasterises them, holes removed. A pixel belongs
to a polygon when its centre ``(c + 0.5, r + 0.5)`` lies inside (or on the boundary); for our
pixel-edge outlines the centres never lie on an edge, so a write/read round trip is exact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from kerasnuc.fileutil import KerasnucError, atomic_path
from kerasnuc.instances import compact_ids
from kerasnuc.postprocess.measure import NucleusTable

logger = logging.getLogger(__name__)

Color = tuple[int, int, int]
Polygon = list[np.ndarray]

_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/kerasnuc/detections")
_LATTICE_KERNEL = np.ones((3, 3), dtype=np.uint8)
_HEADER = '{"type": "FeatureCollection", "features": [\n'
_FOOTER = "\n]}\n"


def _signed_area2(ring: np.ndarray) -> int:
    """Twice the shoelace area of an open ring ``(K, 2)`` of ``(x, y)``."""
    x, y = ring[:, 0], ring[:, 1]
    return int(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _lattice_ring(points: np.ndarray) -> np.ndarray:
    """OpenCV contour on the corner lattice -> open ring of integer pixel-corner ``(x, y)``."""
    pts = points.reshape(-1, 2).astype(np.int64)
    following = np.roll(pts, -1, axis=0)
    step = following - pts
    diagonal = np.flatnonzero((np.abs(step[:, 0]) == 1) & (np.abs(step[:, 1]) == 1))
    if diagonal.size:
        # A diagonal step joins two edge midpoints around a concave corner; the two points that
        # complete the step axis-wise are that corner (odd x and y on the padded lattice) and a
        # pixel centre. Go through the corner.
        via_x = np.stack([following[diagonal, 0], pts[diagonal, 1]], axis=1)
        via_y = np.stack([pts[diagonal, 0], following[diagonal, 1]], axis=1)
        is_corner = (via_x[:, 0] % 2 == 1) & (via_x[:, 1] % 2 == 1)
        pts = np.insert(pts, diagonal + 1, np.where(is_corner[:, None], via_x, via_y), axis=0)
    incoming = np.sign(pts - np.roll(pts, 1, axis=0))
    outgoing = np.sign(np.roll(pts, -1, axis=0) - pts)
    pts = pts[np.any(incoming != outgoing, axis=1)]
    return (pts - 1) // 2


def _closed(ring: np.ndarray, counter_clockwise: bool) -> np.ndarray:
    if (_signed_area2(ring) > 0) != counter_clockwise:
        ring = ring[::-1]
    return np.concatenate([ring, ring[:1]], axis=0)


def _trace(mask: np.ndarray, shift: np.ndarray) -> list[Polygon]:
    """Polygons (exterior + holes) of the 8-connected pieces of a mask on the corner lattice."""
    h, w = mask.shape
    lattice = np.zeros((2 * h + 3, 2 * w + 3), dtype=np.uint8)
    lattice[2:-1:2, 2:-1:2] = mask
    lattice = cv2.dilate(lattice, _LATTICE_KERNEL)
    contours, hierarchy = cv2.findContours(lattice, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return []
    hierarchy = hierarchy.reshape(-1, 4)
    polygons = []
    for i in np.flatnonzero(hierarchy[:, 3] == -1):
        rings = [_closed(_lattice_ring(contours[i]) + shift, counter_clockwise=True)]
        j = hierarchy[i, 2]
        while j != -1:
            rings.append(_closed(_lattice_ring(contours[j]) + shift, counter_clockwise=False))
            j = hierarchy[j, 0]
        polygons.append(rings)
    return polygons


def mask_polygons(mask: np.ndarray, origin: tuple[int, int] = (0, 0)) -> list[Polygon]:
    """Exact pixel-edge outline of a binary mask as GeoJSON-ready polygons.

    Every 4-connected piece is its own polygon, so pieces that touch only at a pixel corner
    become separate polygons sharing that vertex (valid OGC/JTS geometry, which a single ring
    pinched at the corner would not be); a hole that touches its exterior ring at a corner is an
    inner ring sharing that vertex.

    Args:
        mask: ``(h, w)`` bool or 0/1 array.
        origin: ``(row0, col0)`` added to the coordinates (position of the mask in the image).

    Returns:
        One polygon per 4-connected piece (in raster order of their first pixel), each a list of
        closed rings ``(K, 2)`` int64 ``(x, y)`` in pixel-corner coordinates: the exterior
        (counter-clockwise in the numbers) then the holes (clockwise). Empty for an empty mask.
    """
    mask = np.asarray(mask).astype(bool)
    shift = np.array([origin[1], origin[0]], dtype=np.int64)
    pieces, n = ndi.label(mask)
    if n <= 1:
        return _trace(mask.view(np.uint8), shift)
    polygons = []
    for k, sl in enumerate(ndi.find_objects(pieces), start=1):
        piece = (pieces[sl] == k).view(np.uint8)
        offset = shift + np.array([sl[1].start, sl[0].start], dtype=np.int64)
        polygons.extend(_trace(piece, offset))
    return polygons


def _geometry(polygons: list[Polygon]) -> dict[str, Any]:
    coords = [[ring.tolist() for ring in poly] for poly in polygons]
    if len(coords) == 1:
        return {"type": "Polygon", "coordinates": coords[0]}
    return {"type": "MultiPolygon", "coordinates": coords}


def _number(value: Any) -> int | float | None:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if np.isfinite(value) else None


def _check_offset(offset: Sequence[int]) -> tuple[int, int]:
    if len(offset) != 2 or any(int(o) != o for o in offset):
        raise ValueError(f"`offset` must be two ints (row0, col0). Received: offset={offset}")
    return int(offset[0]), int(offset[1])


def _check_colors(class_colors: Mapping[int, Sequence[int]] | None) -> dict[int, list[int]]:
    out = {}
    for k, color in (class_colors or {}).items():
        rgb = [int(v) for v in color]
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise ValueError(
                "`class_colors` must map class ids to (r, g, b) in 0..255. "
                f"Received: {k}: {tuple(color)}"
            )
        out[int(k)] = rgb
    return out


def instance_features(
    instances: np.ndarray,
    table: NucleusTable | None = None,
    offset: tuple[int, int] = (0, 0),
    class_colors: Mapping[int, Sequence[int]] | None = None,
    id_namespace: str = "",
) -> Iterator[dict[str, Any]]:
    """GeoJSON features (QuPath detections) of the nuclei of an instance map, in id order.

    Args:
        instances: ``(H, W)`` integer map, 0 = background.
        table: measurements of the same map (from
            :func:`~kerasnuc.postprocess.measure.measure_instances` with the same ``offset``);
            when given, exactly its nuclei are written, with their class and measurements.
            None: every nucleus of the map, without class or measurements.
        offset: ``(row0, col0)`` of the map in the full image, added to the coordinates.
        class_colors: ``{class id: (r, g, b)}`` for the classification colour.
        id_namespace: text mixed into the feature UUIDs (e.g. the slide name).

    Yields:
        Feature dicts (coordinates as Python ints).

    Raises:
        ValueError: the table names a nucleus that is not in the map, or bad arguments.
    """
    instances = np.asarray(instances)
    if instances.ndim != 2 or not np.issubdtype(instances.dtype, np.integer):
        raise ValueError(
            f"`instances` must be a (H, W) integer array. Received: shape={instances.shape}, "
            f"dtype={instances.dtype}"
        )
    row0, col0 = _check_offset(offset)
    colors = _check_colors(class_colors)
    labels, ids = compact_ids(instances)
    boxes = ndi.find_objects(labels)
    columns: dict[str, list[Any]] = {}
    names: list[Any] | None = None
    if table is None:
        wanted = ids
    else:
        wanted = np.asarray(table.ids, dtype=np.int64)
        flat = table.flat_columns()
        columns = {k: v.tolist() for k, v in flat.items() if np.asarray(v).dtype.kind in "iubf"}
        names = flat["class_name"].tolist() if "class_name" in flat else None
    pos = np.searchsorted(ids, wanted)
    found = ids[np.minimum(pos, ids.size - 1)] == wanted if ids.size else np.zeros(0, bool)
    if found.size != wanted.size or not found.all():
        missing = wanted[~found] if found.size == wanted.size else wanted
        raise ValueError(
            "`table` lists nuclei that are not in `instances`: "
            f"{missing[:10].tolist()} (measure the same map)."
        )
    for i, nucleus_id in enumerate(wanted.tolist()):
        label = int(pos[i]) + 1
        sl = boxes[label - 1]
        crop = labels[sl] == label
        polygons = mask_polygons(crop, (sl[0].start + row0, sl[1].start + col0))
        properties: dict[str, Any] = {"objectType": "detection"}
        if table is not None:
            r = i
            class_id = int(columns["class"][r]) if "class" in columns else 0
            if class_id > 0 and names is not None:
                classification: dict[str, Any] = {"name": str(names[r])}
                if class_id in colors:
                    classification["color"] = colors[class_id]
                properties["classification"] = classification
            measurements = {}
            for name, values in columns.items():
                value = _number(values[r])
                if value is not None:
                    measurements[name] = value
            properties["measurements"] = measurements
        yield {
            "type": "Feature",
            "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{id_namespace}/{nucleus_id}")),
            "geometry": _geometry(polygons),
            "properties": properties,
        }


class GeoJSONWriter:
    """Streaming GeoJSON FeatureCollection writer for slides (tile by tile, atomic).

    Features go straight to a temporary file next to ``path`` (one line each, nothing kept in
    memory); leaving the ``with`` block normally closes the collection and renames the file onto
    ``path``; an exception deletes it. Usage::

        with GeoJSONWriter("slide.geojson", class_colors=colors) as writer:
            for tile in tiles:
                table = measure_instances(tile.instances, ..., offset=tile.offset)
                writer.add(tile.instances, table, offset=tile.offset)

    Args:
        path: output ``.geojson`` file.
        class_colors: ``{class id: (r, g, b)}`` for the classification colours.
        id_namespace: text mixed into the feature UUIDs; None: the file name.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        class_colors: Mapping[int, Sequence[int]] | None = None,
        id_namespace: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.class_colors = _check_colors(class_colors)
        self.id_namespace = self.path.name if id_namespace is None else id_namespace
        self.count = 0
        self._stack: contextlib.ExitStack | None = None
        self._file: IO[str] | None = None

    def __enter__(self) -> GeoJSONWriter:
        if self._stack is not None:
            raise RuntimeError("GeoJSONWriter is already open")
        stack = contextlib.ExitStack()
        try:
            tmp = stack.enter_context(atomic_path(self.path))
            self._file = stack.enter_context(open(tmp, "w", encoding="utf-8"))
            self._file.write(_HEADER)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def add(
        self,
        instances: np.ndarray,
        table: NucleusTable | None = None,
        offset: tuple[int, int] = (0, 0),
    ) -> int:
        """Append the nuclei of one map (see :func:`instance_features`). Returns their number."""
        if self._file is None:
            raise RuntimeError("Use GeoJSONWriter inside a `with` block")
        n = 0
        for feature in instance_features(
            instances, table, offset, self.class_colors, self.id_namespace
        ):
            text = json.dumps(feature, separators=(",", ":"), allow_nan=False)
            self._file.write(text if self.count == 0 else ",\n" + text)
            self.count += 1
            n += 1
        return n

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        if exc_type is None:
            self._file.write(_FOOTER)
            logger.info("wrote %d nuclei to %s", self.count, self.path)
        self._file = None
        stack.__exit__(exc_type, exc, tb)


def write_geojson(
    path: str | os.PathLike,
    instances: np.ndarray,
    table: NucleusTable | None = None,
    class_colors: Mapping[int, Sequence[int]] | None = None,
    offset: tuple[int, int] = (0, 0),
    id_namespace: str | None = None,
) -> int:
    """Write the nuclei of one instance map as a QuPath detection FeatureCollection, atomically.

    Args:
        path: output file.
        instances, table, offset: see :func:`instance_features`.
        class_colors: ``{class id: (r, g, b)}``.
        id_namespace: text mixed into the feature UUIDs; None: the file name.

    Returns:
        Number of features written.
    """
    with GeoJSONWriter(path, class_colors, id_namespace) as writer:
        writer.add(instances, table, offset)
    return writer.count


def read_features(
    path: str | os.PathLike, bare_geometries: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The features of a GeoJSON file: the one GeoJSON parser of kerasnuc.

    Accepted: a ``FeatureCollection``, a single ``Feature``, a JSON list of features (QuPath's
    older "Export as GeoJSON"), and a bare geometry object of one of the ``bare_geometries``
    types (read as one feature without properties).

    Args:
        path: the file (UTF-8, optional BOM).
        bare_geometries: geometry types accepted without a feature around them (e.g.
            ``("Point", "MultiPoint")`` for point annotations).

    Returns:
        The features (dicts) in file order.

    Raises:
        KerasnucError: missing file, invalid JSON, or not GeoJSON features (the message names
            the file).
    """
    path = Path(path)
    if not path.is_file():
        raise KerasnucError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise KerasnucError(f"{path}: cannot read GeoJSON ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise KerasnucError(f"{path}: invalid JSON ({exc})") from exc
    features: Any = None
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict):
        kind = data.get("type")
        if kind == "FeatureCollection":
            features = data.get("features")
        elif kind == "Feature":
            features = [data]
        elif kind in bare_geometries:
            features = [{"type": "Feature", "geometry": data, "properties": {}}]
    if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
        raise KerasnucError(f"{path}: not a GeoJSON FeatureCollection, Feature or list of features")
    return features


def polygon_rings(geometry: Any, path: Path, index: int) -> list[list[np.ndarray]] | None:
    """Rings of a Polygon/MultiPolygon as ``[[outer, hole, ...], ...]`` of ``(K, 2)`` x,y arrays.

    Returns None for other geometries (and no geometry); ``path`` and ``index`` (of the feature)
    name malformed coordinates in the KerasnucError.
    """
    if not isinstance(geometry, dict):
        return None
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        polys = [coords]
    elif kind == "MultiPolygon":
        polys = coords
    else:
        return None
    try:
        out = []
        for poly in polys:
            rings = [np.asarray(ring, dtype=np.float64) for ring in poly]
            for ring in rings:
                if ring.ndim != 2 or ring.shape[1] < 2 or not np.all(np.isfinite(ring)):
                    raise ValueError("bad ring")
            out.append([ring[:, :2] for ring in rings])
    except (TypeError, ValueError):
        raise KerasnucError(f"{path}: feature {index} has malformed {kind} coordinates") from None
    return out


def polygon_pixels(
    rings: Sequence[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of a polygon with optional holes, clipped to ``shape``.

    A pixel ``(r, c)`` belongs to a ring with vertex rows/cols ``(y, x)`` when the point
    ``(r, c)`` lies inside it or on its boundary (``skimage.draw.polygon``). The first ring is
    the outer boundary; later rings are holes and are removed.

    Args:
        rings: ``[(rows, cols), ...]`` float vertex coordinates in the pixel-index frame.
        shape: ``(H, W)`` of the image.

    Returns:
        ``(rr, cc)`` int arrays of the pixels.
    """
    from skimage.draw import polygon

    rr, cc = polygon(rings[0][0], rings[0][1], shape=shape)
    if len(rings) == 1 or rr.size == 0:
        return rr, cc
    r0, c0 = rr.min(), cc.min()
    mask = np.zeros((rr.max() - r0 + 1, cc.max() - c0 + 1), dtype=bool)
    mask[rr - r0, cc - c0] = True
    for hr, hc in rings[1:]:
        h_rr, h_cc = polygon(hr, hc, shape=shape)
        keep = (
            (h_rr >= r0) & (h_rr < r0 + mask.shape[0]) & (h_cc >= c0) & (h_cc < c0 + mask.shape[1])
        )
        mask[h_rr[keep] - r0, h_cc[keep] - c0] = False
    mr, mc = np.nonzero(mask)
    return mr + r0, mc + c0


def read_geojson_instances(
    path: str | os.PathLike, shape: tuple[int, int], offset: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Rasterise the Polygon/MultiPolygon features of a GeoJSON file into an instance map.

    Each feature gets the id in ``properties.measurements.id`` when it is a positive integer
    (files written by :class:`GeoJSONWriter`), else its 1-based position among the polygon
    features. A pixel belongs to a feature when its centre lies inside an exterior ring and
    outside that polygon's holes; later features overwrite earlier ones; other geometries are
    skipped.

    Args:
        path: a FeatureCollection (or a list of features) in pixel-corner coordinates.
        shape: ``(H, W)`` of the map to draw.
        offset: ``(row0, col0)`` of the map in the full image (subtracted from coordinates).

    Returns:
        ``(H, W)`` int32 instance map.

    Raises:
        KerasnucError: the file is missing or not GeoJSON.
    """
    path = Path(path)
    row0, col0 = _check_offset(offset)
    out = np.zeros(tuple(shape), dtype=np.int32)
    shift = np.array([col0, row0], dtype=np.float64)
    k = 0
    for index, feature in enumerate(read_features(path)):
        polys = polygon_rings(feature.get("geometry"), path, index)
        if polys is None:
            continue
        k += 1
        nucleus_id = ((feature.get("properties") or {}).get("measurements") or {}).get("id")
        if not (isinstance(nucleus_id, int) and nucleus_id > 0):
            nucleus_id = k
        for rings in polys:
            xy = [ring - shift for ring in rings]
            rr, cc = polygon_pixels([(r[:, 1] - 0.5, r[:, 0] - 0.5) for r in xy], out.shape)
            out[rr, cc] = nucleus_id
    return out
