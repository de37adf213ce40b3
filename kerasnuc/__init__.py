"""kerasnuc: nuclei segmentation, classification and measurement for histopathology images.

The public API is :func:`segment` (an image -> nuclei, cell types and the per-nucleus table,
as ``kerasnuc predict`` finds them) with its result :class:`Segmentation`; see
:mod:`kerasnuc.api`. They are imported on first use, so that ``import kerasnuc`` (and
``kerasnuc --help``) does not load TensorFlow.
"""

from __future__ import annotations

from typing import Any

from kerasnuc.version import __version__

_API = ("Segmentation", "load_predictor", "segment")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from kerasnuc import api

        return getattr(api, name)
    raise AttributeError(f"module 'kerasnuc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
