"""Predicting on a Dask cluster (kerasnuc.inference.cluster) with a TensorFlow-free predictor.

Two real worker processes (a ``LocalCluster``) run the tasks; the fake predictor of
``test_job`` finds the six discs of the synthetic image, so every figure is known by hand.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

from kerasnuc.fileutil import KerasnucError, write_png
from kerasnuc.inference.cluster import default_local_workers, parse_cluster
from kerasnuc.inference.job import PredictOptions
from tests.inference.test_job import DISCS, FakePredictor, disc_image

distributed = pytest.importorskip("distributed", reason="needs kerasnuc[cluster] (dask)")

from kerasnuc.inference.cluster import predict_on_cluster  # noqa: E402

OPTIONS = PredictOptions(tile_size=64, margin=16, formats=frozenset({"csv", "summary"}))


@dataclass(frozen=True)
class CountingFactory:
    """Builds a FakePredictor and leaves one file per build in ``folder`` (named by the pid)."""

    folder: str

    def __call__(self) -> FakePredictor:
        Path(self.folder, f"{os.getpid()}-{uuid.uuid4().hex}").touch()
        return FakePredictor()


class _DyingPredictor(FakePredictor):
    """Kills its worker process in the middle of the process's 2nd input (once in the run).

    With :data:`ONE_TILE` options an input is one ``predict_instances_batch`` call, so the 2nd
    call of a process is its 2nd task; the marker file makes it happen only once.
    """

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def predict_instances_batch(self, tiles):
        if self.calls == 1:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(3)
        return super().predict_instances_batch(tiles)


@dataclass(frozen=True)
class DyingFactory:
    marker: str

    def __call__(self) -> FakePredictor:
        return _DyingPredictor(self.marker)


# One 256-px tile takes a whole 180 x 200 disc image: one predictor call per input.
ONE_TILE = PredictOptions(tile_size=256, margin=16, formats=frozenset({"csv", "tiff", "summary"}))


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit=0,
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(4):
        write_png(folder / f"img{k}.png", disc_image())
    (folder / "bad.png").write_bytes(b"not a png at all")
    return sorted(folder.iterdir())


def _rows(folder: Path, name: str) -> int:
    lines = (folder / name / f"{name}.csv").read_text().splitlines()
    return len(lines) - 1


def test_parse_cluster_forms(tmp_path):
    assert parse_cluster("local") == ("local", None)
    assert parse_cluster("local:3") == ("local", 3)
    assert parse_cluster("tcp://10.0.0.5:8786") == ("address", "tcp://10.0.0.5:8786")
    scheduler = tmp_path / "scheduler.json"
    scheduler.write_text("{}")
    assert parse_cluster(str(scheduler)) == ("file", str(scheduler))
    for bad in ("local:0", "local:x", "nowhere.json"):
        with pytest.raises(KerasnucError, match="--cluster"):
            parse_cluster(bad)


def test_default_local_workers_follow_cores_and_threads():
    cores = len(os.sched_getaffinity(0))
    assert 1 <= default_local_workers(1) <= cores
    assert default_local_workers(cores) == 1
    assert default_local_workers(10 * cores) == 1


def test_one_task_per_input_bad_input_reported_model_loaded_once_per_worker(
    client, images, tmp_path
):
    builds = tmp_path / "builds"
    builds.mkdir()
    out = tmp_path / "out"
    seen = []
    reports = predict_on_cluster(
        client, images, out, CountingFactory(str(builds)), OPTIONS, on_report=seen.append
    )
    assert [r.name for r in reports] == ["bad", "img0", "img1", "img2", "img3"]
    assert [r.status for r in reports] == ["failed", "done", "done", "done", "done"]
    assert "bad.png" in reports[0].reason
    assert sorted(r.name for r in seen) == ["bad", "img0", "img1", "img2", "img3"]
    for k in range(4):  # six discs in every image
        assert _rows(out, f"img{k}") == len(DISCS)
        summary = json.loads((out / f"img{k}" / f"img{k}.summary.json").read_text())
        assert summary["total"] == len(DISCS)
        assert summary["counts"] == {"blue": 3, "red": 3}
    assert not (out / "bad").exists()
    # one build per worker process that ran a task (at most 2), never one per input
    pids = {p.name.split("-")[0] for p in builds.iterdir()}
    assert len(list(builds.iterdir())) == len(pids) <= 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    again = predict_on_cluster(
        client, images, out, CountingFactory(str(builds)), PredictOptions(
            tile_size=64, margin=16, formats=frozenset({"csv", "summary"}), resume=True
        )
    )  # fmt: skip
    assert [r.status for r in again] == ["failed", "complete", "complete", "complete", "complete"]


def test_a_worker_killed_on_its_second_task_still_gives_all_six_folders_once(client, tmp_path):
    from kerasnuc.inference.job import predict_inputs

    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for k in range(6):
        image = disc_image()
        image[k * 10 : k * 10 + 4, 150:154] = 20  # one extra 4x4 nucleus at a place per image
        write_png(folder / f"x{k}.png", image)
        paths.append(folder / f"x{k}.png")
    out = tmp_path / "out"
    marker = tmp_path / "died"
    reports = predict_on_cluster(client, paths, out, DyingFactory(str(marker)), ONE_TILE)
    assert marker.exists()  # a worker did die, in its 2nd task
    assert [r.status for r in reports] == ["done"] * 6
    names = [f"x{k}" for k in range(6)]
    assert sorted(p.name for p in out.iterdir()) == names  # no temp or duplicate folder
    serial = predict_inputs(paths, FakePredictor(), tmp_path / "serial", ONE_TILE)
    assert [r.n_nuclei for r in serial] == [r.n_nuclei for r in reports] == [len(DISCS) + 1] * 6
    for name in names:
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(
            p.name for p in (tmp_path / "serial" / name).iterdir()
        )
        a = tifffile.imread(out / name / f"{name}.instances.ome.tif")
        b = tifffile.imread(tmp_path / "serial" / name / f"{name}.instances.ome.tif")
        np.testing.assert_array_equal(a, b)
        assert _rows(out, name) == len(DISCS) + 1
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the dead worker


def test_results_equal_the_local_run(client, tmp_path):
    from kerasnuc.inference.job import predict_inputs

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    image = disc_image()
    image[rng.random(image.shape[:2]) < 0.01] = 30  # isolated dark pixels: extra small nuclei
    write_png(folder / "noisy.png", image)
    local = predict_inputs([folder / "noisy.png"], FakePredictor(), tmp_path / "a", OPTIONS)
    remote = predict_on_cluster(
        client, [folder / "noisy.png"], tmp_path / "b", CountingFactory(str(tmp_path)), OPTIONS
    )
    assert remote[0].n_nuclei == local[0].n_nuclei > len(DISCS)
    a = (tmp_path / "a" / "noisy" / "noisy.csv").read_text()
    b = (tmp_path / "b" / "noisy" / "noisy.csv").read_text()
    assert a == b


def test_the_cli_without_cluster_imports_no_dask():
    import subprocess
    import sys

    code = (
        "import sys, kerasnuc.cli, kerasnuc.cli.predict, kerasnuc.inference.job;"
        "print(sorted(m for m in ('dask', 'distributed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
