"""Generic helpers on instance maps shared by the post-processors (numpy / scipy / OpenCV).

All functions take an instance map ``(H, W)`` integer, 0 = background, positive = nucleus id.
Per-instance results are returned as arrays **indexed by instance id** (length ``max_id + 1``,
entry 0 belongs to the background), so that ``values[instances]`` paints them onto the image.
Everything is vectorised over instances except the convex hulls of :func:`instance_solidity`
(one OpenCV call per instance).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as _sk_label

from kerasnuc.config import check_field_types
from kerasnuc.fileutil import KerasnucError, write_json_atomic
from kerasnuc.instances import instance_centroids

PerClass = float | int | Mapping[int, float | int | None] | None


@dataclass(frozen=True)
class PostprocResult:
    """Output of a post-processor.

    Attributes:
        instances: ``(H, W)`` int32, 0 = background, nuclei numbered consecutively 1..N.
        classes: ``(H, W)`` int32, 0 = background, 1..C = cell type of the covering nucleus.
        table: per-instance arrays, row ``k`` describes instance ``k + 1``:

            * ``"id"``: ``(N,)`` int32, 1..N;
            * ``"class"``: ``(N,)`` int32, 1..C;
            * ``"probabilities"``: ``(N, C + 1)`` float32, mean semantic softmax over the
              instance's pixels (column 0 = background, rows sum to 1);
            * ``"area"``: ``(N,)`` int64, pixels;
            * ``"centroid"``: ``(N, 2)`` float64, ``(row, col)`` in pixels;
            * ``"solidity"``: ``(N,)`` float64, area / convex-hull area (see
              :func:`instance_solidity`).
    """

    instances: np.ndarray
    classes: np.ndarray
    table: dict[str, np.ndarray]

    @property
    def num_instances(self) -> int:
        """Number of instances N."""
        return int(self.table["id"].shape[0])


class SettingsFile:
    """Mixin of the post-processing settings dataclasses: dict round trip and ``postproc.json``.

    ``to_dict`` writes per-class mappings with string keys (JSON); ``from_dict`` refuses unknown
    keys (missing keys take the defaults); ``save`` / ``load`` write and read the JSON file
    atomically, ``load`` failing with one :class:`~kerasnuc.fileutil.KerasnucError` line.
    """

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (per-class mappings get string keys)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Mapping):
                value = {str(k): v for k, v in value.items()}
            out[field.name] = value
        return out

    @classmethod
    def checked_dict(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """``dict(config)`` after checking that every key is a field and every value has the
        field's type (ValueError naming the key if not)."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(
                f"Unknown post-processing setting(s) {unknown}; "
                f"expected a subset of {sorted(names)}"
            )
        check_field_types(cls, config)
        return dict(config)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]):
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        return cls(**cls.checked_dict(config))

    def save(self, path: str | os.PathLike) -> None:
        """Write the settings to a JSON file atomically (e.g. ``postproc.json``)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a file written by :meth:`save`.

        Raises:
            KerasnucError: the file is missing, not JSON, or holds invalid settings.
        """
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, Mapping):
                raise ValueError("the file must hold a JSON object")
            return cls.from_dict(data)
        except (OSError, ValueError, TypeError) as err:
            raise KerasnucError(f"{path}: cannot read post-processing settings ({err})") from err


def per_class_table(value: PerClass, num_classes: int, default: float, name: str) -> np.ndarray:
    """Expand a scalar or per-class setting into a lookup table indexed by class id.

    Args:
        value: a number (same for every class), ``None`` (meaning "no limit", stored as
            ``+inf``), or a mapping ``{class_id: number or None}``; classes missing from the
            mapping take ``default``.
        num_classes: number of cell types C; class ids run 0..C (0 = pixels or instances the
            semantic head calls background, only meaningful for pixel thresholds).
        default: value for classes missing from a mapping.
        name: setting name for error messages.

    Returns:
        ``(C + 1,)`` float64 table.

    Raises:
        ValueError: a mapping names a class outside 0..C.
    """
    table = np.full(num_classes + 1, np.inf if default is None else float(default))
    if isinstance(value, Mapping):
        bad = sorted(k for k in value if not 0 <= int(k) <= num_classes)
        if bad:
            raise ValueError(
                f"`{name}` names class id(s) {bad} but the maps have classes 0..{num_classes}. "
                f"Received: {name}={dict(value)}"
            )
        for k, v in value.items():
            table[int(k)] = np.inf if v is None else float(v)
    else:
        table[:] = np.inf if value is None else float(value)
    return table


def relabel_by_lut(instances: np.ndarray, keep: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Renumber the kept instances 1..N in the order of their old ids, drop the rest.

    Args:
        instances: ``(H, W)`` non-negative integer instance map.
        keep: ``(max_id + 1,)`` bool indexed by old id, or None to keep every id present.

    Returns:
        ``(instances, N)``: ``(H, W)`` int32 map with ids 1..N, and N.
    """
    instances = np.asarray(instances)
    size = int(instances.max(initial=0)) + 1
    if keep is None:
        keep = np.bincount(instances.ravel(), minlength=size) > 0
    keep = np.asarray(keep, dtype=bool).copy()
    keep[0] = False
    lut = np.zeros(keep.shape[0], dtype=np.int32)
    n = int(keep.sum())
    lut[keep] = np.arange(1, n + 1, dtype=np.int32)
    return lut[instances], n


def split_instance_components(instances: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Give every connected piece of every instance its own id (splits distant false merges).

    ``skimage.measure.label`` already separates neighbouring pixels with different values, so a
    single call labels the connected components of all instances at once.

    Args:
        instances: ``(H, W)`` integer instance map.
        connectivity: 1 (4-neighbours) or 2 (8-neighbours).

    Returns:
        ``(H, W)`` int32, pieces numbered 1..M in raster order of their first pixel.
    """
    if connectivity not in (1, 2):
        raise ValueError(f"`connectivity` must be 1 or 2. Received: connectivity={connectivity}")
    return _sk_label(np.asarray(instances), background=0, connectivity=connectivity).astype(
        np.int32, copy=False
    )


_SHIFTS = (
    (np.s_[1:, :], np.s_[:-1, :]),
    (np.s_[:-1, :], np.s_[1:, :]),
    (np.s_[:, 1:], np.s_[:, :-1]),
    (np.s_[:, :-1], np.s_[:, 1:]),
)


def fill_instance_holes(instances: np.ndarray, max_hole_size: int | None = None) -> np.ndarray:
    """Fill the holes of every instance with its id.

    A hole of instance ``i`` is a 4-connected background region that does not touch the image
    border and whose 4-neighbours all belong to ``i`` (the definition of
    ``scipy.ndimage.binary_fill_holes`` applied to ``instances == i``, restricted to background
    pixels). Background enclosed jointly by several instances is not a hole of any of them, and
    other instances are never overwritten. Vectorised: one labelling of the background.

    Args:
        instances: ``(H, W)`` integer instance map.
        max_hole_size: fill only holes of at most this many pixels (None: all holes).

    Returns:
        ``(H, W)`` map of the same dtype.
    """
    instances = np.asarray(instances)
    background = instances == 0
    comp, n = ndi.label(background)
    if n == 0:
        return instances.copy()
    touches_border = np.zeros(n + 1, dtype=bool)
    for edge in (comp[0, :], comp[-1, :], comp[:, 0], comp[:, -1]):
        touches_border[edge] = True
    big = np.iinfo(np.int64).max
    low = np.full(n + 1, big, dtype=np.int64)
    high = np.zeros(n + 1, dtype=np.int64)
    for here, there in _SHIFTS:
        c = comp[here]
        v = instances[there]
        m = (c > 0) & (v > 0)
        np.minimum.at(low, c[m], v[m].astype(np.int64))
        np.maximum.at(high, c[m], v[m].astype(np.int64))
    hole = ~touches_border & (high > 0) & (low == high)
    if max_hole_size is not None:
        hole &= np.bincount(comp.ravel(), minlength=n + 1) <= max_hole_size
    hole[0] = False
    if not hole.any():
        return instances.copy()
    lut = np.where(hole, high, 0).astype(instances.dtype)
    return np.where(background, lut[comp], instances)


def instance_areas(instances: np.ndarray) -> np.ndarray:
    """``(max_id + 1,)`` int64 pixel counts indexed by instance id."""
    return np.bincount(np.asarray(instances).ravel(), minlength=1).astype(np.int64)


def centroids_by_id(instances: np.ndarray, n: int) -> np.ndarray:
    """``(n, 2)`` float64 ``(row, col)`` centroids of ids 1..n, row ``k - 1`` for id ``k`` (NaN
    for absent ids): the table layout of the post-processors, from
    :func:`kerasnuc.instances.instance_centroids`."""
    out = np.full((n, 2), np.nan)
    ids, centroids = instance_centroids(instances)
    out[ids - 1] = centroids
    return out


def instance_sums(instances: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sum per instance of a per-pixel vector, e.g. the semantic softmax.

    Args:
        instances: ``(H, W)`` integer instance map.
        values: ``(H, W, K)`` float per-pixel values.

    Returns:
        ``(max_id + 1, K)`` float64, row 0 = sum over the background.
    """
    flat = np.asarray(instances).ravel()
    size = int(flat.max(initial=0)) + 1
    fg = np.flatnonzero(flat)
    ids = flat[fg]
    vals = np.asarray(values).reshape(flat.shape[0], -1)[fg]
    out = np.zeros((size, vals.shape[1]), dtype=np.float64)
    for k in range(vals.shape[1]):
        out[:, k] = np.bincount(ids, weights=vals[:, k], minlength=size)
    return out


def _outline_mask(instances: np.ndarray) -> np.ndarray:
    """Instance pixels with a 4-neighbour of another value (or outside the image)."""
    padded = np.pad(instances, 1)
    centre = padded[1:-1, 1:-1]
    edge = (
        (centre != padded[:-2, 1:-1])
        | (centre != padded[2:, 1:-1])
        | (centre != padded[1:-1, :-2])
        | (centre != padded[1:-1, 2:])
    )
    return edge & (centre > 0)


def instance_solidity(instances: np.ndarray) -> np.ndarray:
    """Solidity = area / convex-hull area of every instance (Rumberger et al. 2022, II.G).

    The convex-hull area is the number of pixel centres inside or on the convex hull of the
    instance's pixel centres; it is counted exactly with Pick's theorem
    (``A + B / 2 + 1`` for a polygon with lattice vertices, area ``A`` and ``B`` lattice points
    on its edges), so a digitally convex shape (rectangle, digital disc) has solidity 1 and a
    single pixel or a straight line of pixels too. Only the outline pixels of each instance are
    passed to ``cv2.convexHull``.

    Args:
        instances: ``(H, W)`` integer instance map.

    Returns:
        ``(max_id + 1,)`` float64 indexed by id; 0 for the background and absent ids.
    """
    instances = np.asarray(instances)
    size = int(instances.max(initial=0)) + 1
    out = np.zeros(size, dtype=np.float64)
    rows, cols = np.nonzero(_outline_mask(instances))
    if rows.size == 0:
        return out
    ids = instances[rows, cols]
    order = np.argsort(ids, kind="stable")
    points = np.ascontiguousarray(np.stack([cols[order], rows[order]], axis=1), dtype=np.int32)
    counts = np.bincount(ids, minlength=size)
    present = np.flatnonzero(counts)
    present = present[present > 0]
    ends = np.cumsum(counts)[present]
    starts = ends - counts[present]
    hulls = [cv2.convexHull(points[s:e]).reshape(-1, 2) for s, e in zip(starts, ends, strict=True)]
    lengths = np.array([h.shape[0] for h in hulls])
    vertices = np.concatenate(hulls).astype(np.int64)
    group_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    index = np.arange(vertices.shape[0])
    following = np.where(
        index + 1 == group_start + np.repeat(lengths, lengths), group_start, index + 1
    )
    x, y = vertices[:, 0], vertices[:, 1]
    xn, yn = x[following], y[following]
    group = np.repeat(np.arange(present.size), lengths)
    twice_area = np.abs(np.bincount(group, weights=(x * yn - xn * y).astype(np.float64)))
    on_edges = np.bincount(group, weights=np.gcd(np.abs(xn - x), np.abs(yn - y)).astype(np.float64))
    hull_pixels = (twice_area + on_edges) / 2.0 + 1.0
    area = instance_areas(instances)
    out[present] = area[present] / hull_pixels
    return out


@dataclass(frozen=True)
class Stage:
    """One step of a post-processor split into stages, for :func:`grid_search`.

    Attributes:
        fields: the settings this step reads; configurations that agree on them (and on the
            fields of every earlier stage) share its output.
        run: ``run(state, input, config) -> state``: ``state`` is the previous stage's output
            (the input itself for the first stage); the last stage returns the
            :class:`PostprocResult`.
    """

    fields: tuple[str, ...]
    run: Callable[[Any, Any, Any], Any]


def grid_search(
    inputs: Sequence[Any],
    grid: Mapping[str, Sequence[Any]],
    postprocess: Callable[[Any, Any], PostprocResult] | None,
    base_config: Any,
    score_fn: Callable[[list[np.ndarray], list[np.ndarray]], float],
    stages: Sequence[Stage] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Grid search of the settings of a post-processor (a frozen dataclass config).

    The one grid search of kerasnuc: every registry method tunes its ``postproc.json`` with it.
    A post-processor given as ``stages`` is evaluated depth first with its intermediate results
    shared: each stage but the last runs once per image and distinct setting of its fields (and
    those of the stages before it), so e.g. a watershed is not repeated for configurations that
    differ only in a size filter applied after it; the last stage and ``score_fn`` run once per
    configuration. Memory holds one result per stage and image at a time.

    Args:
        inputs: per image what ``postprocess`` takes (e.g. the model's output maps).
        grid: setting name -> candidate values; every combination is tried (grid order, the last
            name varying fastest).
        postprocess: ``(input, config) -> PostprocResult``; ignored when ``stages`` is given.
        base_config: the settings not in ``grid`` (a dataclass instance).
        score_fn: ``score_fn(pred_instances, pred_classes) -> float`` over the whole set, higher
            is better (e.g. PQ or mPQ+ of the set).
        stages: the post-processor as :class:`Stage` steps (None: one step, ``postprocess``).

    Returns:
        ``(best_config, table)``: the best configuration (the first on ties; NaN never wins) and
        one row per configuration: the grid values (their JSON form for settings files) and
        ``"score"``.

    Raises:
        ValueError: an unknown setting, an empty value list, a bad value (from the config's own
            checks) or no image.
    """
    if not inputs:
        raise ValueError("tuning needs at least one image")
    names = list(grid)
    known = {f.name for f in dataclasses.fields(base_config)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(
            f"Unknown post-processing setting(s) {unknown} in the grid (`grid` names an unknown "
            f"setting; expected a subset of {sorted(known)})"
        )
    for name in names:
        values = grid[name]
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise ValueError(
                f"every grid entry must be a non-empty list of values. "
                f"Received: grid[{name!r}]={values!r}"
            )
    configs = [
        dataclasses.replace(base_config, **dict(zip(names, values, strict=True)))
        for values in itertools.product(*(grid[n] for n in names))
    ]
    if stages is None:
        stages = (Stage(tuple(sorted(known)), lambda state, x, config: postprocess(x, config)),)
    scores: dict[int, float] = {}

    def key(config: Any, stage: Stage) -> str:
        values = _json_form(config)
        return json.dumps({n: values[n] for n in stage.fields}, sort_keys=True, default=str)

    def run(indices: list[int], level: int, states: list[Any]) -> None:
        stage = stages[level]
        if level + 1 == len(stages):  # the last stage runs (and is scored) per configuration
            for index in indices:
                out = [
                    stage.run(state, x, configs[index])
                    for state, x in zip(states, inputs, strict=True)
                ]
                scores[index] = float(
                    score_fn([r.instances for r in out], [r.classes for r in out])
                )
            return
        groups: dict[str, list[int]] = {}
        for index in indices:
            groups.setdefault(key(configs[index], stage), []).append(index)
        for group in groups.values():
            config = configs[group[0]]
            out = [stage.run(state, x, config) for state, x in zip(states, inputs, strict=True)]
            run(group, level + 1, out)

    run(list(range(len(configs))), 0, list(inputs))
    table = []
    for index, config in enumerate(configs):
        values = _json_form(config)
        table.append({n: values[n] for n in names} | {"score": scores[index]})
    finite = [i for i, row in enumerate(table) if not math.isnan(row["score"])]
    best = max(finite, key=lambda i: table[i]["score"]) if finite else 0
    return configs[best], table


def _json_form(config: Any) -> dict[str, Any]:
    """The settings of a config as in its JSON file (``to_dict``) or as they are."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
