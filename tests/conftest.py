"""Shared fixtures. Real data is found through KERASNUC_DATA (default: ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_ENV = "KERASNUC_DATA"


def shared_data_root() -> Path:
    return Path(os.environ.get(DATA_ENV, REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder holding monuseg_kumar/, consep/, dsb2018_histology/ (skips when absent)."""
    root = shared_data_root()
    if not (root / "monuseg_kumar" / "meta.json").is_file():
        pytest.skip(f"shared datasets not found at {root} (set {DATA_ENV} to their folder)")
    return root


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def pytest_configure(config):
    """Under pytest-xdist, one TensorFlow thread pool per worker's share of the cores.

    Each xdist worker (``-n N``) is its own TensorFlow process, and by default each sizes its
    intra-op and inter-op pools to every core of the machine: N workers on a 2-core CI machine
    would run 2 N spinning pool threads on 2 cores. ``TF_NUM_INTRAOP_THREADS`` /
    ``TF_NUM_INTEROP_THREADS`` (read when TensorFlow starts) give each worker cores / N; the
    processes a test starts (CLI subprocesses, Dask and multi-worker training workers) inherit
    them. A value set by the caller wins. Without xdist nothing changes.
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = str(max(1, (cores or 1) // int(workers)))
    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(name, threads)


def pytest_collection_modifyitems(config, items):
    """Run the modules that hold ``slow`` tests first (stable: each keeps its order inside).

    With ``pytest -n 2 --dist loadfile --no-loadscope-reorder`` (README, ``.ci/run``) the two
    workers take whole modules in this order, so the long modules start early and the many short
    ones even out the end of the run.
    """
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)
