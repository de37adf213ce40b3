"""Anchor boxes over the FPN levels ``P2 .. P6`` (Lin et al. 2017, FPN; Ren et al. 2015).

Defaults are sized for nuclei of about 8-40 px at 40x (0.25 um/px):

* base sizes ``8, 16, 32, 64, 128`` px on ``P2 .. P6`` (strides ``4 .. 64``): each level covers one
  octave, starting at the smallest nucleus (8 px, twice the ``P2`` stride so that neighbouring
  anchors overlap); ``P5``/``P6`` keep the large anchors of FPN for clumps and large tumour nuclei.
* 2 scales per octave (``1`` and ``sqrt(2)``): with one scale per octave an object half-way
  between two sizes (e.g. a 11 px or a 23 px nucleus) reaches an IoU of only 0.5 with the best
  centred anchor, so most nuclei would never pass the RPN positive threshold of 0.7 and only get
  the single "low-quality" match; with a factor ``sqrt(2)`` between sizes the worst centred IoU is
  ``0.71``.
* aspect ratios (height / width) ``0.5, 1, 2``: nuclei are round to elongated (fibroblasts).

That gives 6 anchors per location, ``6 * 21824 = 130944`` anchors for a 512 x 512 image.

Ordering: levels are concatenated ``P2 .. P6``; within a level, positions are row-major and the
anchors of one position are contiguous with index ``a = scale_index * len(aspect_ratios) +
ratio_index``. This is the order of an RPN output ``(B, h, w, A * k)`` reshaped to
``(B, h * w * A, k)``. Anchor centres are at ``((i + 0.5) * stride, (j + 0.5) * stride)`` for the
feature pixel ``(i, j)``; a level of stride ``s`` has ``ceil(H / s) x ceil(W / s)`` positions by
default (the size of a ``"same"``-padded strided backbone), or the sizes passed explicitly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from keras import ops


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    """Anchor layout.

    Attributes:
        levels: level names, one per stride (default ``P2 .. P6``).
        strides: feature stride of each level in pixels.
        sizes: base anchor size (sqrt of the area, pixels) of each level.
        aspect_ratios: anchor height / width ratios.
        scales_per_octave: ``n`` scales ``2 ** (k / n)``, ``k = 0 .. n - 1``, per base size.
    """

    levels: tuple[str, ...] = ("P2", "P3", "P4", "P5", "P6")
    strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    sizes: tuple[float, ...] = (8.0, 16.0, 32.0, 64.0, 128.0)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    scales_per_octave: int = 2

    def __post_init__(self) -> None:
        for name in ("levels", "strides", "sizes", "aspect_ratios"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.levels)
        if n == 0 or len(self.strides) != n or len(self.sizes) != n:
            raise ValueError(
                "`levels`, `strides` and `sizes` must be non-empty and of equal length. Received: "
                f"levels={self.levels}, strides={self.strides}, sizes={self.sizes}"
            )
        if any(int(s) != s or s < 1 for s in self.strides):
            raise ValueError(f"`strides` must be positive ints. Received: strides={self.strides}")
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        if any(s <= 0 for s in self.sizes):
            raise ValueError(f"`sizes` must be positive. Received: sizes={self.sizes}")
        if not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios):
            raise ValueError(
                "`aspect_ratios` must be a non-empty list of positive floats. "
                f"Received: aspect_ratios={self.aspect_ratios}"
            )
        if (
            not isinstance(self.scales_per_octave, int)
            or isinstance(self.scales_per_octave, bool)
            or self.scales_per_octave < 1
        ):
            raise ValueError(
                "`scales_per_octave` must be a positive int. "
                f"Received: scales_per_octave={self.scales_per_octave!r}"
            )

    @property
    def scales(self) -> tuple[float, ...]:
        """Multipliers of the base size, ``2 ** (k / scales_per_octave)``."""
        return tuple(2.0 ** (k / self.scales_per_octave) for k in range(self.scales_per_octave))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists instead of tuples)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AnchorConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"Unknown AnchorConfig keys {unknown}. Expected a subset of {sorted(names)}"
            )
        return cls(**dict(d))


def anchors_per_location(config: AnchorConfig | None = None) -> int:
    """Number of anchors per feature position (``scales_per_octave * len(aspect_ratios)``)."""
    config = config or AnchorConfig()
    return config.scales_per_octave * len(config.aspect_ratios)


def base_anchors(size: float, config: AnchorConfig | None = None) -> list[tuple[float, ...]]:
    """The anchors of one position centred at ``(0, 0)``, ``[(y1, x1, y2, x2), ...]``.

    Order: ``scale_index * len(aspect_ratios) + ratio_index``; an anchor of scale ``s`` and ratio
    ``r`` has height ``size * s * sqrt(r)`` and width ``size * s / sqrt(r)`` (area ``(size s)^2``).
    """
    config = config or AnchorConfig()
    out = []
    for scale in config.scales:
        for ratio in config.aspect_ratios:
            h = size * scale * math.sqrt(ratio)
            w = size * scale / math.sqrt(ratio)
            out.append((-h / 2, -w / 2, h / 2, w / 2))
    return out


def feature_sizes(height, width, config: AnchorConfig | None = None) -> list[tuple[Any, Any]]:
    """Default ``(ceil(height / stride), ceil(width / stride))`` of each level.

    ``height``/``width`` may be Python ints or int scalar tensors (dynamic shapes).
    """
    config = config or AnchorConfig()
    return [((height + s - 1) // s, (width + s - 1) // s) for s in config.strides]


def level_anchor_counts(
    height,
    width,
    config: AnchorConfig | None = None,
    sizes: Sequence[tuple[Any, Any]] | None = None,
) -> list[Any]:
    """Number of anchors of each level (ints, or scalar tensors for dynamic sizes).

    Args:
        height: image height.
        width: image width.
        config: anchor layout.
        sizes: optional explicit ``(h, w)`` of each feature level (default :func:`feature_sizes`).
    """
    config = config or AnchorConfig()
    sizes = sizes if sizes is not None else feature_sizes(height, width, config)
    a = anchors_per_location(config)
    return [h * w * a for h, w in sizes]


def generate_anchors(
    height,
    width,
    config: AnchorConfig | None = None,
    sizes: Sequence[tuple[Any, Any]] | None = None,
):
    """All anchors of an image, concatenated over the levels.

    Args:
        height: image height in pixels (Python int or int scalar tensor).
        width: image width in pixels.
        config: anchor layout (default :class:`AnchorConfig`).
        sizes: optional ``(h, w)`` of each feature level; pass the shapes of the actual FPN maps
            (``ops.shape(p)[1:3]``) when they differ from ``ceil(H / stride)``.

    Returns:
        ``(A, 4)`` float32 anchors ``(y1, x1, y2, x2)`` in image pixels, ordered as described in
        the module docstring; ``A = sum(level_anchor_counts(...))``.
    """
    config = config or AnchorConfig()
    sizes = sizes if sizes is not None else feature_sizes(height, width, config)
    if len(sizes) != len(config.strides):
        raise ValueError(
            f"`sizes` must have one (h, w) per level ({len(config.strides)}). Received: "
            f"{len(sizes)} sizes"
        )
    out = []
    for (h, w), stride, size in zip(sizes, config.strides, config.sizes, strict=True):
        base = ops.convert_to_tensor(base_anchors(size, config), "float32")  # (a, 4)
        cy = (ops.cast(ops.arange(h), "float32") + 0.5) * stride
        cx = (ops.cast(ops.arange(w), "float32") + 0.5) * stride
        gy, gx = ops.meshgrid(cy, cx, indexing="ij")  # (h, w)
        centres = ops.stack([gy, gx, gy, gx], axis=-1)  # (h, w, 4)
        anchors = ops.expand_dims(centres, 2) + base[None, None]  # (h, w, a, 4)
        out.append(ops.reshape(anchors, (-1, 4)))
    return ops.concatenate(out, axis=0)


__all__ = [
    "AnchorConfig",
    "anchors_per_location",
    "base_anchors",
    "feature_sizes",
    "generate_anchors",
    "level_anchor_counts",
]
