"""Post-processing of ``unet_sharp``: semantic softmax -> nuclei instances with cell types.

U-Net# (Stagys et al.) is a semantic segmentation model and reports pixel metrics only; to
compare it with the other methods on instance metrics (PQ, AJI, ...) its class map is turned
into instances:

1. foreground = pixels whose nucleus probability ``1 - P(background)`` is ``> fg_threshold``
   (``foreground="threshold"``), or whose most probable class is a nucleus class
   (``foreground="argmax"``, the class map U-Net# itself outputs; the same as a threshold of 0.5
   with one cell type);
2. connected components of the foreground; with ``split_touching`` each component is split by a
   marker watershed on its distance transform (markers: local maxima of the Gaussian-smoothed
   distance at least ``min_distance`` pixels apart, the usual way to separate touching round
   objects); components without a marker stay whole;
3. the shared stages of :mod:`kerasnuc.postprocess.conic`: connected pieces get their own id,
   holes are filled, each instance takes the cell type maximising its summed softmax (types
   1..C), and instances outside ``[min_size, max_size]`` or below ``min_solidity`` are removed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from kerasnuc.postprocess.common import PerClass, PostprocResult, SettingsFile, Stage, grid_search

# The refine / select stages are shared with the conic post-processing.
from kerasnuc.postprocess.conic import ConicPostprocConfig, refine_stage, select_stage

#: How a pixel becomes foreground (``UnetSharpPostprocConfig.foreground``).
FOREGROUND_RULES: tuple[str, ...] = ("threshold", "argmax")


@dataclass(frozen=True)
class UnetSharpPostprocConfig(SettingsFile):
    """Settings of :func:`postprocess_unet_sharp` (``postproc.json`` of a unet_sharp run).

    Attributes:
        foreground: ``"threshold"``: a pixel is nucleus when ``1 - P(background) >
            fg_threshold``; ``"argmax"``: when its most probable class is not background
            (``fg_threshold`` is not used).
        fg_threshold: a pixel is nucleus when ``1 - P(background) > fg_threshold``.
        split_touching: split touching nuclei by a distance-transform watershed.
        min_distance: smallest distance (px) between two watershed markers; about a nucleus
            radius at the model's resolution (default 6 px: CoNSeP/MoNuSeg nuclei at 0.25 um/px
            have radii of 6-12 px).
        sigma: Gaussian smoothing (px) of the distance transform before finding markers.
        connectivity: 1 (4-neighbours) or 2 (8-neighbours).
        fill_holes: fill the holes of every instance.
        min_size: remove instances with fewer pixels (a number, or ``{class_id: number}``;
            classes missing from a mapping get 0, the shared stage's default).
        max_size: remove instances with more pixels (None: no limit).
        min_solidity: remove instances with a lower area / convex-hull area.
    """

    fg_threshold: float = 0.5
    foreground: str = "threshold"
    split_touching: bool = True
    min_distance: int = 6
    sigma: float = 1.0
    connectivity: int = 1
    fill_holes: bool = True
    min_size: PerClass = 10
    max_size: PerClass = None
    min_solidity: PerClass = 0.0

    def __post_init__(self) -> None:
        if self.foreground not in FOREGROUND_RULES:
            raise ValueError(
                f"`foreground` must be one of {list(FOREGROUND_RULES)}. "
                f"Received: foreground={self.foreground!r}"
            )
        if not isinstance(self.fg_threshold, int | float) or not 0 <= self.fg_threshold < 1:
            raise ValueError(
                "`fg_threshold` must be a float in [0, 1). "
                f"Received: fg_threshold={self.fg_threshold!r}"
            )
        if (
            isinstance(self.min_distance, bool)
            or not isinstance(self.min_distance, int)
            or (self.min_distance < 1)
        ):
            raise ValueError(
                f"`min_distance` must be an int >= 1. Received: min_distance={self.min_distance!r}"
            )
        if not isinstance(self.sigma, int | float) or self.sigma < 0:
            raise ValueError(f"`sigma` must be a float >= 0. Received: sigma={self.sigma!r}")
        for name in ("split_touching", "fill_holes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"`{name}` must be a bool. Received: {name}={getattr(self, name)!r}"
                )
        # Validates connectivity and the per-class filters.
        self.conic_config()

    def conic_config(self) -> ConicPostprocConfig:
        """The settings of the shared refine / select stages as a conic ``ConicPostprocConfig``."""
        return ConicPostprocConfig(
            connectivity=self.connectivity,
            split_components=True,
            fill_holes=self.fill_holes,
            min_size=self.min_size,
            max_size=self.max_size,
            min_solidity=self.min_solidity,
        )

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> UnetSharpPostprocConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        data = cls.checked_dict(config)
        for key in ("min_size", "max_size", "min_solidity"):
            if isinstance(data.get(key), Mapping):
                data[key] = {int(k): v for k, v in data[key].items()}
        return cls(**data)


def split_touching_nuclei(
    foreground: np.ndarray, min_distance: int, sigma: float = 1.0, connectivity: int = 1
) -> np.ndarray:
    """Label a foreground mask, splitting touching round objects by a distance watershed.

    Args:
        foreground: ``(H, W)`` bool mask.
        min_distance: smallest distance (px) between two markers.
        sigma: Gaussian smoothing of the distance transform (0: none).
        connectivity: 1 or 2.

    Returns:
        ``(H, W)`` int32 instance map (ids not necessarily consecutive).
    """
    structure = ndi.generate_binary_structure(2, connectivity)
    components, n = ndi.label(foreground, structure=structure)
    if n == 0:
        return components.astype(np.int32)
    distance = ndi.distance_transform_edt(foreground)
    if sigma > 0:
        distance = ndi.gaussian_filter(distance, sigma)
    peaks = peak_local_max(
        distance, min_distance=min_distance, labels=components, exclude_border=False
    )
    markers = np.zeros(foreground.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    instances = watershed(-distance, markers, mask=foreground, connectivity=connectivity)
    instances = instances.astype(np.int32, copy=False)
    rest = foreground & (instances == 0)  # components without a marker
    if rest.any():
        extra, _ = ndi.label(rest, structure=structure)
        instances = np.where(rest, extra + len(peaks), instances).astype(np.int32)
    return instances


def postprocess_unet_sharp(
    semantic: np.ndarray, config: UnetSharpPostprocConfig | None = None
) -> PostprocResult:
    """Nuclei with cell types from the semantic softmax of the ``unet_sharp`` model.

    Args:
        semantic: ``(H, W, C + 1)`` float softmax, channel 0 = background.
        config: settings; default :class:`UnetSharpPostprocConfig()`.

    Returns:
        :class:`~kerasnuc.postprocess.common.PostprocResult` (ids 1..N, classes 1..C, table).

    Raises:
        ValueError: ``semantic`` is not an ``(H, W, K >= 2)`` float array.
    """
    config = UnetSharpPostprocConfig() if config is None else config
    semantic = _check(semantic)
    return _select(_refine(_pixels(semantic, config), semantic, config), config)


def _check(semantic: np.ndarray) -> np.ndarray:
    semantic = np.asarray(semantic)
    if semantic.ndim != 3 or semantic.shape[-1] < 2:
        raise ValueError(
            "`semantic` must have shape (H, W, C + 1) with C >= 1. "
            f"Received: shape={semantic.shape}"
        )
    if not np.issubdtype(semantic.dtype, np.floating):
        raise ValueError(f"`semantic` must be float. Received: dtype={semantic.dtype}")
    return semantic.astype(np.float32, copy=False)


def _pixels(semantic: np.ndarray, config: UnetSharpPostprocConfig) -> np.ndarray:
    """Foreground -> raw instance map (watershed split of touching nuclei)."""
    if config.foreground == "argmax":
        foreground = semantic.argmax(axis=-1) != 0
    else:
        foreground = (1.0 - semantic[..., 0]) > config.fg_threshold
    if config.split_touching:
        return split_touching_nuclei(
            foreground, config.min_distance, config.sigma, config.connectivity
        )
    structure = ndi.generate_binary_structure(2, config.connectivity)
    return ndi.label(foreground, structure=structure)[0].astype(np.int32)


def _refine(raw: np.ndarray, semantic: np.ndarray, config: UnetSharpPostprocConfig):
    return refine_stage(raw, semantic, config.conic_config())


def _select(candidates, config: UnetSharpPostprocConfig) -> PostprocResult:
    return select_stage(candidates, config.conic_config())


#: The settings each stage of :func:`tune_unet_sharp` reads.
_PIXEL_FIELDS = ("foreground", "fg_threshold", "split_touching", "min_distance", "sigma",
                 "connectivity")  # fmt: skip
_REFINE_FIELDS = ("fill_holes",)
_SELECT_FIELDS = ("min_size", "max_size", "min_solidity")


def tune_unet_sharp(
    semantics: Sequence[np.ndarray],
    grid: Mapping[str, Sequence[Any]],
    score_fn: Callable[[list[np.ndarray], list[np.ndarray]], float],
    base_config: UnetSharpPostprocConfig | None = None,
) -> tuple[UnetSharpPostprocConfig, list[dict[str, Any]]]:
    """Grid search of the post-processing settings on the model's softmax maps.

    :func:`~kerasnuc.postprocess.common.grid_search` in stages: the watershed runs once per
    image and distinct foreground / marker setting, hole filling and the shape table once per
    watershed result, and configurations that differ only in the size / solidity filters reuse
    them. With ``"foreground"`` in the grid, its ``"argmax"`` value is searched without
    ``fg_threshold`` (which it does not read; its table rows show ``fg_threshold`` null).

    Args:
        semantics: per image the ``(H, W, C + 1)`` softmax.
        grid: setting name -> candidate values.
        score_fn: ``score_fn(pred_instances, pred_classes) -> float`` over the whole set.
        base_config: settings not in ``grid``; default :class:`UnetSharpPostprocConfig()`.

    Returns:
        ``(best_config, table)``: the best configuration (the first on ties) and one row per
        configuration searched.

    Raises:
        ValueError: no image, a bad grid or a bad value.
    """
    base = UnetSharpPostprocConfig() if base_config is None else base_config
    maps = [_check(s) for s in semantics]
    stages = (
        Stage(_PIXEL_FIELDS, lambda semantic, _, config: _pixels(semantic, config)),
        Stage(_REFINE_FIELDS, lambda raw, semantic, config: _refine(raw, semantic, config)),
        Stage(_SELECT_FIELDS, lambda candidates, _, config: _select(candidates, config)),
    )
    rules = list(grid.get("foreground", [base.foreground]))
    if "foreground" not in grid or "argmax" not in rules or "fg_threshold" not in grid:
        return grid_search(maps, grid, None, base, score_fn, stages=stages)
    results = []
    for rule in dict.fromkeys(rules):  # in grid order, once each
        sub = dict(grid, foreground=[rule])
        if rule == "argmax":
            del sub["fg_threshold"]
        best, table = grid_search(maps, sub, None, base, score_fn, stages=stages)
        if rule == "argmax":
            table = [{n: row.get(n) for n in grid} | {"score": row["score"]} for row in table]
        results.append((best, table))
    table = [row for _, t in results for row in t]
    scores = [max((r["score"] for r in t if not math.isnan(r["score"])), default=math.nan)
              for _, t in results]  # fmt: skip
    finite = [i for i, sc in enumerate(scores) if not math.isnan(sc)]
    pick = max(finite, key=lambda i: scores[i]) if finite else 0
    return results[pick][0], table


#: Default ``kerasnuc tune`` grid (96 configurations): foreground by probability threshold
#: (7 values) or by argmax, marker distance, minimum size. The thresholds reach 0.9 because
#: Focal Tversky training (beta 0.7 weighs missed pixels over false ones, per class) makes
#: the nucleus probability overshoot, most with several cell types (CoNSeP, short CPU runs:
#: 43-69 % of pixels above 0.5 where 30 % are nuclei).
DEFAULT_GRID: dict[str, list[Any]] = {
    "foreground": ["threshold", "argmax"],
    "fg_threshold": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
    "min_distance": [4, 6, 8, 12],
    "min_size": [0, 10, 30],
}
