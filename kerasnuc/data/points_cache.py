"""On-disk cache of the point encodings of :mod:`kerasnuc.data.points`, so that the ``weak``
pipeline encodes each image once (one compressed ``.npz`` per image, keyed by a hash of the
image, the points, the parameters and :data:`ENCODING_VERSION`)."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.data.points import KEYS, encode_points
from kerasnuc.fileutil import atomic_path

logger = logging.getLogger(__name__)

ENCODING_VERSION = 1
"""Part of the cache key: bump it whenever an encoding changes its output."""


_ENCODE_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(encode_points).parameters.items()
    if name not in ("image", "points")
}


def encoding_params(**overrides: Any) -> dict[str, Any]:
    """The full parameter set of :func:`encode_points`: its defaults updated with ``overrides``."""
    params = dict(_ENCODE_DEFAULTS)
    unknown = set(overrides) - set(params)
    if unknown:
        raise ValueError(
            f"Unknown encoding parameters {sorted(unknown)}. Expected some of: {sorted(params)}"
        )
    params.update(overrides)
    return params


def cache_path(
    cache_dir: str | os.PathLike,
    image_id: str,
    image: np.ndarray,
    points: np.ndarray,
    params: Mapping[str, Any],
) -> Path:
    """Cache file of one encoding: ``<cache_dir>/<image_id>.<hash>.npz``.

    The hash (SHA-256, 16 hex digits) covers :data:`ENCODING_VERSION`, the parameters, the
    points and the image pixels, so a changed input never reads a stale file.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": ENCODING_VERSION, **params}, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(np.asarray(points, dtype=np.float64)).tobytes())
    image = np.ascontiguousarray(image)
    digest.update(f"{image.shape}{image.dtype}".encode())
    digest.update(image.tobytes())
    safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", str(image_id))
    return Path(cache_dir) / f"{safe_id}.{digest.hexdigest()[:16]}.npz"


def cached_encode_points(
    cache_dir: str | os.PathLike,
    image_id: str,
    image: np.ndarray,
    points: np.ndarray,
    **params: Any,
) -> dict[str, np.ndarray]:
    """:func:`encode_points` with an on-disk cache (one compressed ``.npz`` per encoding).

    The file name is given by :func:`cache_path`; it is written atomically
    (:func:`kerasnuc.fileutil.atomic_path`), so concurrent workers and interrupted runs never
    leave a partial file. An unreadable cache file is recomputed and replaced.

    Args:
        cache_dir: folder of the cache files (created when missing).
        image_id: image id (file stem), the readable part of the file name.
        image: ``(H, W, 3)`` RGB image.
        points: ``(K, 2)`` float ``(row, col)``.
        **params: keyword arguments of :func:`encode_points`.

    Returns:
        The dict of :func:`encode_points`.
    """
    full = encoding_params(**params)
    path = cache_path(cache_dir, image_id, image, points, full)
    if path.is_file():
        try:
            with np.load(path) as data:
                return {key: data[key] for key in KEYS}
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("%s: unreadable cache file, recomputing (%s)", path, exc)
    encoded = encode_points(image, points, **full)
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **encoded)
    return encoded
