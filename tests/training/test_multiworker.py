"""``kerasnuc train --strategy multiworker`` with two real worker processes on 127.0.0.1.

The workers run the ``kerasnuc train`` command with the narrow ``tiny_conic`` stand-in method
registered (:mod:`tests.training.tiny_method`: the conic method's losses with the EMA class prior,
pipeline and optimizer, on a two-convolution model with batch norm and dropout), so the strategy,
not the tracing of an EfficientNet, is what the two processes spend their time on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from kerasnuc.training.strategy import worker_role
from tests.integration.test_cli_train import write_discs


def test_worker_role_from_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert worker_role() == ("worker", 0, True)
    two = {"worker": ["a:1", "b:2"]}
    for task, chief in ((("worker", 0), True), (("worker", 1), False)):
        monkeypatch.setenv(
            "TF_CONFIG", json.dumps({"cluster": two, "task": {"type": task[0], "index": task[1]}})
        )
        assert worker_role() == (task[0], task[1], chief)
    with_chief = {"chief": ["c:0"], "worker": ["a:1"]}
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": with_chief, "task": {"type": "worker", "index": 0}})
    )
    assert worker_role() == ("worker", 0, False)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        worker_role()


ROOT = Path(__file__).resolve().parents[2]
#: ``python -c`` program of a worker: ``kerasnuc ARGS`` with ``tiny_conic`` registered.
WORKER = (
    "from kerasnuc import registry; "
    "from tests.training.tiny_method import NAME, TINY_METHOD; "
    "registry.METHODS[NAME] = TINY_METHOD; "
    "from kerasnuc.cli import main; main()"
)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _weights(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:
        f.visititems(
            lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None
        )
    return out


def _launch(args: list[str], tmp_path: Path, tag: str) -> list[tuple[int, str, Path | None]]:
    """Run ``kerasnuc train ARGS`` as worker 0 and 1; (exit code, log, scratch folder)."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    before = set(tmp_path.glob("tmp*/kerasnuc-worker1-*"))
    for index in range(2):
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            KERASNUC_KEEP_WORKER_DIR="1",
            TMPDIR=str(tmp_path / f"tmp{index}"),
            TF_CPP_MIN_LOG_LEVEL="3",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        (tmp_path / f"tmp{index}").mkdir(exist_ok=True)
        log = open(tmp_path / f"{tag}_worker{index}.log", "w")  # noqa: SIM115
        cmd = [sys.executable, "-c", WORKER, "train", "--verbose", *args]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log, index))
    results = []
    for proc, log, index in procs:
        code = proc.wait(timeout=900)
        log.close()
        text = (tmp_path / f"{tag}_worker{index}.log").read_text()
        scratch = sorted(set((tmp_path / f"tmp{index}").glob("kerasnuc-worker1-*")) - before)
        results.append((code, text, scratch[0] if len(scratch) == 1 else None))
    return results


@pytest.mark.slow
def test_two_workers_train_resume_and_end_with_identical_weights(tmp_path):
    data = write_discs(tmp_path / "discs", classes=False)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"pipeline": {"deterministic": True}}))
    out = tmp_path / "run"  # the same --out for both workers, as on shared storage
    args = ["--method", "tiny_conic", "--data", str(data), "--out", str(out), "--config",
            str(config), "--strategy", "multiworker", "--epochs", "1", "--steps-per-epoch",
            "2", "--batch-size", "2", "--crop", "64", "--val-max-images", "1", "--seed",
            "5"]  # fmt: skip
    (code0, log0, none), (code1, log1, scratch) = _launch(args, tmp_path, "first")
    assert code0 == 0 and code1 == 0, log0[-2000:] + log1[-2000:]
    assert none is None and scratch is not None and f"{scratch}" in log1
    # Only the chief wrote into --out; worker 1 wrote the same files into its scratch folder.
    names = {"config.json", "postproc.json", "history.csv", "model.weights.h5", "checkpoint"}
    assert names <= {p.name for p in out.iterdir()}
    assert names <= {p.name for p in scratch.iterdir()}
    a, b = _weights(out / "model.weights.h5"), _weights(scratch / "model.weights.h5")
    assert a.keys() == b.keys()
    # Batch-norm statistics (synchronized batch norm) and the class prior (mean-aggregated) are
    # what would differ between workers that saw different crops; the weights too.
    assert {f"layers/batch_normalization/vars/{i}" for i in range(4)} | {"vars/0"} <= a.keys()
    assert [k for k in a if not np.array_equal(a[k], b[k])] == []
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 2  # header + epoch 1

    # An interrupted 2-epoch run looks like this one with epochs = 2 in its config: resume it.
    run_config = json.loads((out / "config.json").read_text())
    run_config["train"]["epochs"] = 2
    (out / "config.json").write_text(json.dumps(run_config))
    resume = ["--out", str(out), "--resume"]
    (code0, log0, _), (code1, log1, scratch2) = _launch(resume, tmp_path, "resume")
    assert code0 == 0 and code1 == 0, log0[-2000:] + log1[-2000:]
    assert scratch2 is not None and scratch2 != scratch
    history = (out / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2"]
    ca = np.load(out / "checkpoint" / "variables.npz")
    cb = np.load(scratch2 / "checkpoint" / "variables.npz")
    assert sorted(ca.files) == sorted(cb.files)
    assert [k for k in ca.files if not np.array_equal(ca[k], cb[k])] == []
