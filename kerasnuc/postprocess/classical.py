"""A classical baseline without learning: colour deconvolution + Otsu + distance watershed.

The reference point a trained model must clearly beat (issue: bundled default model). Steps,
all with sizes in micrometres so the baseline works at any resolution:

1. Haematoxylin optical density by colour deconvolution (Ruifrok & Johnston 2001, the
   ``skimage.color.rgb2hed`` stain matrix), smoothed with a Gaussian of ``smooth_um``.
2. Foreground = haematoxylin above Otsu's threshold of the image (computed over all pixels),
   holes filled, objects smaller than ``min_area_um2`` removed.
3. Touching nuclei split by a watershed on the negative distance transform, seeded at its
   local maxima at least ``min_distance_um`` apart (the usual "distance transform +
   watershed" recipe of e.g. CellProfiler / QuPath's cell detection, simplified).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class ClassicalConfig:
    """Parameters of :func:`classical_nuclei` (sizes in micrometres).

    Attributes:
        smooth_um: Gaussian sigma of the haematoxylin channel.
        min_area_um2: smallest nucleus kept.
        min_distance_um: smallest distance between two seeds (about a nucleus radius).
        threshold_scale: multiplies Otsu's threshold (< 1 keeps fainter nuclei).
    """

    smooth_um: float = 0.25
    min_area_um2: float = 6.0
    min_distance_um: float = 2.0
    threshold_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("smooth_um", "min_area_um2", "min_distance_um", "threshold_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"`{name}` must be a positive number. Received: {name}={value!r}")


def haematoxylin(image: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density of an RGB image, ``(H, W)`` float64 (>= 0 where stained)."""
    from skimage.color import rgb2hed

    return rgb2hed(np.asarray(image)[..., :3])[..., 0]


def classical_nuclei(
    image: np.ndarray, mpp: float = 0.25, config: ClassicalConfig | None = None
) -> np.ndarray:
    """Nuclei of an H&E image by colour deconvolution, Otsu and watershed (no model).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mpp: pixel size in um/px.
        config: parameters (defaults: :class:`ClassicalConfig`).

    Returns:
        ``(H, W)`` int32 instance map, 0 = background, 1..N nuclei.
    """
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    if not (isinstance(mpp, (int, float)) and mpp > 0):
        raise ValueError(f"`mpp` must be a positive number. Received: mpp={mpp!r}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f"`image` must have shape (H, W, 3). Received: shape={image.shape}")
    cfg = config or ClassicalConfig()
    h = ndi.gaussian_filter(haematoxylin(image), cfg.smooth_um / mpp)
    if float(h.max() - h.min()) < 1e-12:
        return np.zeros(image.shape[:2], np.int32)
    fg = h > threshold_otsu(h) * cfg.threshold_scale
    fg = ndi.binary_fill_holes(fg)
    components, _ = ndi.label(fg)
    areas = np.bincount(components.ravel())
    keep = areas >= cfg.min_area_um2 / mpp**2
    keep[0] = False
    fg = keep[components]
    if not fg.any():
        return np.zeros(image.shape[:2], np.int32)
    dist = ndi.distance_transform_edt(fg)
    min_dist = max(1, int(round(cfg.min_distance_um / mpp)))
    components, _ = ndi.label(fg)
    peaks = peak_local_max(dist, min_distance=min_dist, labels=components, exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    # Components without a peak (flat plateaus) keep their own label.
    missing = fg & (labels == 0)
    if missing.any():
        extra, n = ndi.label(missing)
        labels = np.where(missing, extra + labels.max(), labels)
    return _relabel(labels)


def _relabel(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[labels]
