"""Post-processing of the ``conic`` method: probability maps -> instance map, class map, table.

Paper: Rumberger, Baumann, Hirsch et al., "Panoptic segmentation with highly imbalanced semantic
labels", CoNIC challenge, ISBI 2022, Section II.G. The paper draws
per-class seeds from the predicted nucleus interior, delineates instances with a watershed
(after Hirsch & Kainmueller, MIDL 2020), splits distant false merges with connected components
inside each instance, removes instances outside class-specific size limits or below a
class-specific solidity, fills holes, and gives each instance the cell type that maximises the
summed softmax over its pixels. Every threshold is tuned by grid search on validation data
(:func:`tune_postproc`).

Inputs (both ``float32``, same ``H, W``):

* ``semantic``: ``(H, W, C + 1)`` softmax of the semantic decoder, channel 0 = background,
  channels 1..C = cell types;
* ``three_label``: ``(H, W, 3)`` softmax of the instance decoder, channel 0 = background,
  1 = nucleus interior, 2 = nucleus boundary.

How "per-class seeds" and "per-class foreground thresholds" are implemented (the paper gives no
formula; this follows the authors' released challenge code, Kainmueller-Lab/lizard_challenge):
every pixel gets the class ``k = argmax`` of the full semantic softmax (``k = 0`` where the
semantic head says background) and is

* foreground when ``1 - P_three(background) > fg_threshold[k]``;
* a seed pixel when ``P_three(interior) > seed_threshold[k]`` (and it is foreground).

The seed pixels of all classes are pooled and labelled into connected components, so a nucleus
whose interior straddles two predicted classes still gets one seed. Pipeline order (ours where
the paper is silent): seeded watershed -> connected components per instance -> fill holes ->
class by summed softmax -> size and solidity filters (class-specific, using that class) ->
renumber 1..N. Holes are filled before the filters so that area, solidity, class and the
output table all describe the final mask (a hole is not a concavity).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import disk
from skimage.segmentation import watershed

from kerasnuc.checks import is_int, is_number
from kerasnuc.postprocess.common import (
    PerClass,
    PostprocResult,
    SettingsFile,
    Stage,
    centroids_by_id,
    fill_instance_holes,
    grid_search,
    instance_areas,
    instance_solidity,
    instance_sums,
    per_class_table,
    relabel_by_lut,
    split_instance_components,
)

logger = logging.getLogger(__name__)

SURFACES = ("interior", "boundary")
_PER_CLASS_FIELDS = ("fg_threshold", "seed_threshold", "min_size", "max_size", "min_solidity")
# Fields each pipeline stage depends on (the grid search shares a stage's output per key).
_PIXEL_FIELDS = (
    "fg_threshold",
    "seed_threshold",
    "seed_erosion",
    "seed_min_size",
    "surface",
    "flood_background",
    "keep_unseeded",
    "connectivity",
)
_REFINE_FIELDS = ("split_components", "fill_holes", "max_hole_size")
_SELECT_FIELDS = ("min_size", "max_size", "min_solidity")


def _normalise_per_class(name: str, value: Any, allow_none: bool) -> PerClass:
    """Scalar stays scalar; list -> {index: value}; mapping -> {int(key): value}."""
    if isinstance(value, list | tuple):
        value = dict(enumerate(value))
    if isinstance(value, Mapping):
        out: dict[int, Any] = {}
        for key, item in value.items():
            try:
                class_id = int(key)
            except (TypeError, ValueError):
                class_id = -1
            if class_id < 0 or isinstance(key, bool):
                raise ValueError(
                    f"`{name}` keys must be class ids >= 0. Received: {name}={dict(value)}"
                )
            out[class_id] = item
        return dict(sorted(out.items()))
    if value is None and not allow_none:
        raise ValueError(f"`{name}` must not be None. Received: {name}=None")
    return value


def _check_values(name: str, value: PerClass, check: Callable[[Any], bool], expected: str) -> None:
    items = value.values() if isinstance(value, Mapping) else [value]
    for item in items:
        if not check(item):
            raise ValueError(f"`{name}` must be {expected}. Received: {name}={value!r}")


@dataclass(frozen=True)
class ConicPostprocConfig(SettingsFile):
    """Thresholds of the ``conic`` post-processing (Rumberger et al. 2022, Section II.G).

    Per-class fields (``fg_threshold``, ``seed_threshold``, ``min_size``, ``max_size``,
    ``min_solidity``) take a number for all classes, or a mapping ``{class_id: value}`` (a list
    is read as ``{index: value}``); classes missing from a mapping use the field's default.
    For the pixel thresholds the class of a pixel is the argmax of the full semantic softmax and
    key 0 applies where it is background; for the instance filters the class is the instance's
    class (1..C) and key 0 is never used.

    Attributes:
        fg_threshold: a pixel is foreground when ``1 - P_three(background)`` (interior +
            boundary probability) is ``>`` this, per pixel class.
        seed_threshold: a foreground pixel is a seed pixel when ``P_three(interior)`` is ``>``
            this, per pixel class.
        seed_erosion: radius (px) of a disc that erodes the seed mask before labelling; 0 = off.
        seed_min_size: seed components with fewer pixels are dropped; 0 = off.
        surface: watershed relief: ``"interior"`` floods ``1 - P_three(interior)`` (default),
            ``"boundary"`` floods ``P_three(boundary)``.
        flood_background: False (default): the watershed is restricted to the foreground mask.
            True: flood the whole image from the seeds and cut the result to the foreground
            afterwards, as the authors' code does; then basins can reach across background and
            the connected-components step splits them again.
        keep_unseeded: with the masked watershed, foreground components that hold no seed
            become instances of their own (True, default; what the unmasked variant yields) or
            are dropped (False).
        connectivity: 1 (4-neighbours) or 2 (8-neighbours) for seed labelling, watershed
            flooding, unseeded components and the connected-components split.
        split_components: give each connected piece of an instance its own id.
        fill_holes: fill the holes of every instance (see
            :func:`kerasnuc.postprocess.common.fill_instance_holes`).
        max_hole_size: fill only holes up to this many pixels; None = all holes.
        min_size: remove instances with fewer pixels, per instance class (inclusive limit).
        max_size: remove instances with more pixels, per class; None = no upper limit.
        min_solidity: remove instances whose solidity (area / convex-hull area, see
            :func:`kerasnuc.postprocess.common.instance_solidity`) is below this, per class.
    """

    fg_threshold: PerClass = 0.5
    seed_threshold: PerClass = 0.5
    seed_erosion: int = 0
    seed_min_size: int = 0
    surface: str = "interior"
    flood_background: bool = False
    keep_unseeded: bool = True
    connectivity: int = 1
    split_components: bool = True
    fill_holes: bool = True
    max_hole_size: int | None = None
    min_size: PerClass = 0
    max_size: PerClass = None
    min_solidity: PerClass = 0.0

    def __post_init__(self) -> None:
        for name in _PER_CLASS_FIELDS:
            value = _normalise_per_class(name, getattr(self, name), allow_none=name == "max_size")
            object.__setattr__(self, name, value)
        for name in ("fg_threshold", "seed_threshold", "min_solidity"):
            _check_values(
                name,
                getattr(self, name),
                lambda v: is_number(v) and 0.0 <= v <= 1.0,
                "a number in [0, 1] or a mapping {class_id: number in [0, 1]}",
            )
        _check_values(
            "min_size",
            self.min_size,
            lambda v: is_int(v) and v >= 0,
            "an int >= 0 or a mapping {class_id: int >= 0}",
        )
        _check_values(
            "max_size",
            self.max_size,
            lambda v: v is None or (is_int(v) and v >= 0),
            "None, an int >= 0 or a mapping {class_id: int >= 0 or None}",
        )
        for name in ("seed_erosion", "seed_min_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"`{name}` must be an int >= 0. Received: {name}={value!r}")
        if self.max_hole_size is not None and (
            not is_int(self.max_hole_size) or self.max_hole_size < 0
        ):
            raise ValueError(
                "`max_hole_size` must be None or an int >= 0. "
                f"Received: max_hole_size={self.max_hole_size!r}"
            )
        if self.surface not in SURFACES:
            raise ValueError(
                f"`surface` must be one of {SURFACES}. Received: surface={self.surface!r}"
            )
        if self.connectivity not in (1, 2) or isinstance(self.connectivity, bool):
            raise ValueError(
                f"`connectivity` must be 1 or 2. Received: connectivity={self.connectivity!r}"
            )
        for name in ("flood_background", "keep_unseeded", "split_components", "fill_holes"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be a bool. Received: {name}={value!r}")

    def __hash__(self) -> int:
        return hash(self.to_json())

    def to_json(self) -> str:
        """Canonical JSON text (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ConicPostprocConfig:
        """Parse :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------------
# Pipeline stages


def _check_maps(
    semantic: np.ndarray | None, three_label: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    three_label = np.asarray(three_label)
    if three_label.ndim != 3 or three_label.shape[-1] != 3:
        raise ValueError(
            f"`three_label` must have shape (H, W, 3). Received: shape={three_label.shape}"
        )
    if not np.issubdtype(three_label.dtype, np.floating):
        raise ValueError(f"`three_label` must be float. Received: dtype={three_label.dtype}")
    three_label = three_label.astype(np.float32, copy=False)
    if semantic is None:
        background = three_label[..., 0]
        return np.stack([background, 1.0 - background], axis=-1), three_label
    semantic = np.asarray(semantic)
    if semantic.ndim != 3 or semantic.shape[-1] < 2:
        raise ValueError(
            "`semantic` must have shape (H, W, C + 1) with C >= 1. "
            f"Received: shape={semantic.shape}"
        )
    if semantic.shape[:2] != three_label.shape[:2]:
        raise ValueError(
            "`semantic` and `three_label` must have the same height and width. "
            f"Received: {semantic.shape[:2]} and {three_label.shape[:2]}"
        )
    if not np.issubdtype(semantic.dtype, np.floating):
        raise ValueError(f"`semantic` must be float. Received: dtype={semantic.dtype}")
    return semantic.astype(np.float32, copy=False), three_label


class _Timer:
    """Adds the seconds spent in each named stage to ``timings`` (when given)."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings = timings
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


def _pixel_threshold(
    name: str, value: PerClass, num_classes: int, pixel_class: Callable[[], np.ndarray]
) -> np.ndarray | float:
    """Scalar threshold, or a per-pixel ``(H, W)`` threshold looked up by pixel class."""
    if not isinstance(value, Mapping):
        return float(value)
    default = ConicPostprocConfig.__dataclass_fields__[name].default
    table = per_class_table(value, num_classes, default, name).astype(np.float32)
    return table[pixel_class()]


def _pixel_stage(
    semantic: np.ndarray,
    three_label: np.ndarray,
    config: ConicPostprocConfig,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """Seeded watershed: ``(H, W)`` int32 instance map, ids not consecutive, not split yet."""
    timer = _Timer(timings)
    num_classes = semantic.shape[-1] - 1
    cache: list[np.ndarray] = []

    def pixel_class() -> np.ndarray:
        if not cache:
            cache.append(np.argmax(semantic, axis=-1))
        return cache[0]

    fg_thr = _pixel_threshold("fg_threshold", config.fg_threshold, num_classes, pixel_class)
    seed_thr = _pixel_threshold("seed_threshold", config.seed_threshold, num_classes, pixel_class)
    foreground = (1.0 - three_label[..., 0]) > fg_thr
    interior = three_label[..., 1]
    seeds = (interior > seed_thr) & foreground
    timer("thresholds")

    structure = ndi.generate_binary_structure(2, config.connectivity)
    if config.seed_erosion > 0:
        seeds = ndi.binary_erosion(seeds, structure=disk(config.seed_erosion))
    markers, n_seeds = ndi.label(seeds, structure=structure)
    if config.seed_min_size > 0 and n_seeds:
        keep = np.bincount(markers.ravel(), minlength=n_seeds + 1) >= config.seed_min_size
        markers, n_seeds = relabel_by_lut(markers, keep)
    timer("seeds")

    if n_seeds == 0:
        instances = np.zeros(foreground.shape, dtype=np.int32)
    else:
        relief = 1.0 - interior if config.surface == "interior" else three_label[..., 2]
        if config.flood_background:
            instances = watershed(relief, markers, connectivity=config.connectivity)
            instances[~foreground] = 0
        else:
            instances = watershed(
                relief, markers, mask=foreground, connectivity=config.connectivity
            )
        instances = instances.astype(np.int32, copy=False)
    timer("watershed")

    if config.keep_unseeded:
        rest = foreground & (instances == 0)
        if rest.any():
            extra, _ = ndi.label(rest, structure=structure)
            instances = np.where(rest, extra + n_seeds, instances).astype(np.int32)
    timer("unseeded")
    return instances


@dataclass(frozen=True)
class Candidates:
    """Instances after splitting and hole filling, before the filters (ids 1..M)."""

    instances: np.ndarray  # (H, W) int32
    classes: np.ndarray  # (M,) int32 in 1..C
    probabilities: np.ndarray  # (M, C + 1) float32 mean softmax
    area: np.ndarray  # (M,) int64
    centroid: np.ndarray  # (M, 2) float64
    solidity: np.ndarray  # (M,) float64
    num_classes: int


def refine_stage(
    raw: np.ndarray,
    semantic: np.ndarray,
    config: ConicPostprocConfig,
    timings: dict[str, float] | None = None,
) -> Candidates:
    """Refine stage: split components, fill holes, class by summed softmax, area and shape.

    Args:
        raw: ``(H, W)`` int32 instance map of the watershed stage.
        semantic: ``(H, W, C + 1)`` float32 softmax.
        config: the settings (``split_components``, ``connectivity``, ``fill_holes``,
            ``max_hole_size``).
        timings: collects the seconds per step when given.
    """
    timer = _Timer(timings)
    if config.split_components:
        instances = split_instance_components(raw, config.connectivity)
    else:
        instances, _ = relabel_by_lut(raw)
    timer("split")
    if config.fill_holes:
        instances = fill_instance_holes(instances, config.max_hole_size)
    timer("fill_holes")
    num_classes = semantic.shape[-1] - 1
    sums = instance_sums(instances, semantic)[1:]
    area = instance_areas(instances)[1:]
    # Class = argmax over cell types 1..C of the summed softmax (background excluded).
    classes = (np.argmax(sums[:, 1:], axis=1) + 1).astype(np.int32)
    with np.errstate(invalid="ignore", divide="ignore"):
        probabilities = (sums / area[:, None]).astype(np.float32)
    timer("classes")
    centroid = centroids_by_id(instances, area.shape[0])
    solidity = instance_solidity(instances)[1:]
    timer("shape")
    return Candidates(instances, classes, probabilities, area, centroid, solidity, num_classes)


def select_stage(
    candidates: Candidates, config: ConicPostprocConfig, timings: dict[str, float] | None = None
) -> PostprocResult:
    """Select stage: the class-specific size and solidity filters, then the result table."""
    timer = _Timer(timings)
    c = candidates
    k = c.num_classes
    fields = ConicPostprocConfig.__dataclass_fields__
    low = per_class_table(config.min_size, k, fields["min_size"].default, "min_size")
    high = per_class_table(config.max_size, k, fields["max_size"].default, "max_size")
    solid = per_class_table(config.min_solidity, k, fields["min_solidity"].default, "min_solidity")
    keep = (c.area >= low[c.classes]) & (c.area <= high[c.classes])
    keep &= c.solidity >= solid[c.classes]
    instances, n = relabel_by_lut(c.instances, np.concatenate([[False], keep]))
    classes_kept = c.classes[keep]
    class_lut = np.concatenate([[0], classes_kept]).astype(np.int32)
    table = {
        "id": np.arange(1, n + 1, dtype=np.int32),
        "class": classes_kept,
        "probabilities": c.probabilities[keep].reshape(n, k + 1),
        "area": c.area[keep],
        "centroid": c.centroid[keep].reshape(n, 2),
        "solidity": c.solidity[keep],
    }
    result = PostprocResult(instances, class_lut[instances], table)
    timer("select")
    return result


def postprocess_conic(
    semantic: np.ndarray | None,
    three_label: np.ndarray,
    config: ConicPostprocConfig | None = None,
    timings: dict[str, float] | None = None,
) -> PostprocResult:
    """Turn the two softmax maps of the ``conic`` model into nuclei (Rumberger et al. 2022).

    Args:
        semantic: ``(H, W, C + 1)`` float32 semantic softmax, channel 0 = background; or None
            for a class-agnostic run (then ``C = 1`` with ``P(nucleus) = 1 - P_three(bg)``).
        three_label: ``(H, W, 3)`` float32 softmax: background, nucleus interior, boundary.
        config: thresholds; default :class:`ConicPostprocConfig()`.
        timings: optional dict that receives the seconds spent per stage (``thresholds``,
            ``seeds``, ``watershed``, ``unseeded``, ``split``, ``fill_holes``, ``classes``,
            ``shape``, ``select``).

    Returns:
        :class:`~kerasnuc.postprocess.common.PostprocResult`: ``instances`` ``(H, W)`` int32
        (ids 1..N), ``classes`` ``(H, W)`` int32 (0 = background, 1..C), ``table`` with
        per-instance ``id``, ``class``, ``probabilities`` ``(N, C + 1)`` (mean softmax),
        ``area``, ``centroid`` ``(row, col)``, ``solidity``.
    """
    config = ConicPostprocConfig() if config is None else config
    semantic, three_label = _check_maps(semantic, three_label)
    raw = _pixel_stage(semantic, three_label, config, timings)
    candidates = refine_stage(raw, semantic, config, timings)
    result = select_stage(candidates, config, timings)
    logger.debug("conic post-processing: %d instances", result.num_instances)
    return result


# ---------------------------------------------------------------------------------------------
# Tuning: the stages for the shared grid search

#: Default ``kerasnuc tune`` grid (60 configurations): foreground / seed thresholds and the
#: minimum size.
DEFAULT_GRID: dict[str, list[Any]] = {
    "fg_threshold": [0.3, 0.4, 0.5, 0.6],
    "seed_threshold": [0.4, 0.5, 0.6, 0.7, 0.8],
    "min_size": [0, 10, 30],
}

ScoreFn = Callable[[Any, Any, Any, Any], float]


def tuning_stages() -> tuple[Stage, ...]:
    """:func:`postprocess_conic` as :class:`~kerasnuc.postprocess.common.Stage` steps on
    ``(semantic, three_label)`` inputs checked by :func:`tune_conic`: the watershed, the
    refine stage, the filters."""
    return (
        Stage(_PIXEL_FIELDS, lambda maps, _, config: _pixel_stage(maps[0], maps[1], config)),
        Stage(_REFINE_FIELDS, lambda raw, maps, config: refine_stage(raw, maps[0], config)),
        Stage(_SELECT_FIELDS, lambda candidates, _, config: select_stage(candidates, config)),
    )


def tune_conic(
    maps_list: Sequence[tuple[np.ndarray | None, np.ndarray]],
    grid: Mapping[str, Sequence[Any]],
    score_fn: Callable[[list[np.ndarray], list[np.ndarray]], float],
    base_config: ConicPostprocConfig | None = None,
) -> tuple[ConicPostprocConfig, list[dict[str, Any]]]:
    """Grid search of the post-processing thresholds on validation maps (paper Section II.G).

    :func:`~kerasnuc.postprocess.common.grid_search` over :func:`tuning_stages`: the watershed
    runs once per image and distinct setting of its fields, hole filling and the shape table
    once per distinct refine setting, and configurations that differ only in the size /
    solidity filters reuse them.

    Args:
        maps_list: per image ``(semantic, three_label)`` as for :func:`postprocess_conic`.
        grid: setting name -> list of candidate values (a per-class value is one entry, e.g.
            ``{"min_size": [{1: 10, 2: 30}, {1: 20, 2: 30}]}``).
        score_fn: ``score_fn(pred_instances, pred_classes) -> float`` over the whole set.
        base_config: settings not in ``grid``; default :class:`ConicPostprocConfig()`.

    Returns:
        ``(best_config, table)`` of :func:`~kerasnuc.postprocess.common.grid_search`.
    """
    if not maps_list:
        raise ValueError("`maps_list` must hold at least one image")
    base = ConicPostprocConfig() if base_config is None else base_config
    maps = [_check_maps(semantic, three_label) for semantic, three_label in maps_list]
    best, table = grid_search(maps, grid, None, base, score_fn, stages=tuning_stages())
    logger.info("tune_conic: best %s", best)
    return best, table


def tune_postproc(
    maps_list: Sequence[tuple[np.ndarray | None, np.ndarray]],
    gt_list: Sequence[tuple[np.ndarray, np.ndarray | None]],
    grid: Mapping[str, Sequence[Any]],
    score_fn: ScoreFn,
    *,
    base_config: ConicPostprocConfig | None = None,
    batched: bool = False,
) -> tuple[ConicPostprocConfig, list[dict[str, Any]]]:
    """:func:`tune_conic` with a score computed against ground truth.

    Args:
        maps_list: per image ``(semantic, three_label)`` as for :func:`postprocess_conic`.
        gt_list: per image ``(gt_instances, gt_classes)``; passed to ``score_fn`` as given.
        grid: setting name -> list of candidate values.
        score_fn: higher is better. ``batched=False``: ``score_fn(pred_inst, pred_cls, gt_inst,
            gt_cls) -> float`` per image, averaged over images. ``batched=True``: called once
            per configuration with four lists (e.g. for mPQ+ accumulated over the whole set).
        base_config: settings not in ``grid``; default :class:`ConicPostprocConfig()`.
        batched: see ``score_fn``.

    Returns:
        ``(best_config, table)``: the best configuration (first one on ties; NaN scores never
        win) and one row per configuration in grid order: the grid values (JSON form) and
        ``"score"``.
    """
    if len(maps_list) != len(gt_list):
        raise ValueError(
            f"`maps_list` and `gt_list` must have the same length. "
            f"Received: {len(maps_list)} and {len(gt_list)}"
        )
    gt_instances = [g[0] for g in gt_list]
    gt_classes = [g[1] for g in gt_list]

    def score(pred_instances: list[np.ndarray], pred_classes: list[np.ndarray]) -> float:
        if batched:
            return float(score_fn(pred_instances, pred_classes, gt_instances, gt_classes))
        values = [
            float(score_fn(*args))
            for args in zip(pred_instances, pred_classes, gt_instances, gt_classes, strict=True)
        ]
        return float(np.mean(values))

    return tune_conic(maps_list, grid, score, base_config)
