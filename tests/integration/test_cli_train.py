"""``kerasnuc train`` / ``kerasnuc tune`` end to end on tiny synthetic datasets."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner

from kerasnuc.cli import main
from kerasnuc.data.dataset import Dataset, DatasetWriter
from kerasnuc.metrics import MetricAccumulator
from kerasnuc.models.maps import predict_maps
from kerasnuc.postprocess.conic import ConicPostprocConfig, postprocess_conic
from kerasnuc.runs import load_config, load_run


def disc_sample(rng: np.random.Generator, size: int = 64):
    """A noisy H&E-like image with 4 discs: ``(image, instances, classes 1 / 2 alternating)``."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 230.0)
    inst = np.zeros((size, size), np.int32)
    for i in range(1, 5):
        cy, cx = rng.integers(8, size - 8, 2)
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 25) & (inst == 0)
        inst[m] = i
        img[m] = (90, 30, 140)
    cls = np.where(inst > 0, 1 + inst % 2, 0).astype(np.int32)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return img, inst, cls


def write_discs(root, classes: bool, n_train=2, n_val=2, size=64, seed=0):
    """Noisy images with 4 discs each (classes 1 / 2 alternating when ``classes``), seeded."""
    rng = np.random.default_rng(seed)
    meta = {"name": "discs", "mpp": 0.5, "classes": {"1": "a", "2": "b"} if classes else None}
    with DatasetWriter(root, meta) as w:
        for k in range(n_train + n_val):
            img, inst, cls = disc_sample(rng, size)
            split = "train" if k < n_train else "val"
            w.add(f"im{k}", img, inst, cls if classes else None, split=split)
    return root


#: Lite0 (no squeeze-excitation) traces its train step faster than the default B0.
TINY = {
    "model": {"encoder": "efficientnet_lite0", "decoder_filters": [8, 8, 8, 8, 8]},
    "pipeline": {"deterministic": True},
}


@pytest.fixture
def agnostic(tmp_path):
    return write_discs(tmp_path / "discs", classes=False)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_train_errors(tmp_path, agnostic):
    out = tmp_path / "run"
    res = invoke("train", "--data", tmp_path / "missing", "--out", out)
    assert res.exit_code == 1 and "missing: no such folder" in res.output
    res = invoke("train", "--method", "nope", "--data", agnostic, "--out", out)
    assert res.exit_code == 1 and "unknown method 'nope'" in res.output
    res = invoke("train", "--out", out)
    assert res.exit_code == 1 and "--data is required" in res.output
    res = invoke("train", "--resume", "--out", out)
    assert res.exit_code == 1 and "no run to resume" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"optimiser": {}}')
    res = invoke("train", "--data", agnostic, "--out", out, "--config", bad)
    assert res.exit_code == 1 and "unknown config section(s) ['optimiser']" in res.output
    bad.write_text('{"train": {"epochz": 3}}')
    res = invoke("train", "--data", agnostic, "--out", out, "--config", bad)
    assert res.exit_code == 1 and "invalid configuration" in res.output
    out.mkdir()
    (out / "config.json").write_text("{}")
    res = invoke("train", "--data", agnostic, "--out", out, "--epochs", "1")
    assert res.exit_code == 1 and "already exists" in res.output
    (tmp_path / "norun").mkdir()
    res = invoke("tune", tmp_path / "norun", "--data", agnostic)
    assert res.exit_code == 1 and "config.json: missing" in res.output
    res = invoke("tune", tmp_path / "nowhere", "--data", agnostic)
    assert res.exit_code == 1 and "nowhere: no such run directory, nor a bundled" in res.output
    for res in (invoke("train", "--help"), invoke("tune", "--help")):
        assert res.exit_code == 0 and "Usage" in res.output


@pytest.mark.slow
def test_train_then_tune_class_agnostic(tmp_path, agnostic):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({**TINY, "train": {"learning_rate": 0.002}}))
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"fg_threshold": [0.3, 0.5], "min_size": [0, 1000000]}))
    out = tmp_path / "run"
    res = invoke(
        "train", "--data", agnostic, "--out", out, "--config", cfg, "--epochs", "1",
        "--batch-size", "2", "--crop", "64", "--steps-per-epoch", "1", "--seed", "5",
        "--no-importance-sampling", "--val-max-images", "1",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    # Not a terminal (a log file): one line per epoch, no colour codes (issue 20, item 11).
    assert "\x1b[" not in res.output and "1/1 - " in res.output
    config = load_config(out)
    # defaults < file < flags
    assert config.model["num_classes"] == 1 and config.model["decoder_filters"] == [8] * 5
    assert config.model["encoder"] == "efficientnet_lite0"
    assert config.train.learning_rate == 0.002 and config.train.seed == 5
    assert config.train.val_max_images == 1 and config.train.steps_per_epoch == 1
    assert config.pipeline["importance_sampling"] is False and config.pipeline["seed"] == 5
    assert config.pipeline["crop_size"] == 64 and config.pipeline["samples_per_epoch"] == 2
    assert config.data.class_names == {} and config.data.mpp == 0.5
    assert not config.train.keep_epoch_weights and not (out / "epochs").exists()
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and "val_pq" in rows[0] and "val_mpq_plus" not in rows[0]

    base = ConicPostprocConfig.load(out / "postproc.json")
    res = invoke("tune", out, "--data", agnostic, "--grid", grid)
    assert res.exit_code == 0, res.output
    assert "4 configurations on 2 images" in res.output
    tuned = ConicPostprocConfig.load(out / "postproc.json")
    # min_size 10^6 removes every nucleus: PQ 0, never better than keeping them.
    assert tuned.min_size == 0
    # The tuned thresholds are those a brute-force evaluation of the grid picks (first best).
    model = load_run(out).model
    ds = Dataset(agnostic)
    val = [(ds.instances(i), predict_maps(model, ds.image(i))) for i in ds.split("val")]
    scores = {}
    for fg, min_size in itertools.product([0.3, 0.5], [0, 1000000]):
        config = dataclasses.replace(base, fg_threshold=fg, min_size=min_size)
        acc = MetricAccumulator(num_classes=0, hausdorff=False)
        for gt, maps in val:
            acc.add(
                gt, postprocess_conic(maps.get("semantic"), maps["three_label"], config).instances
            )
        scores[fg, min_size] = acc.summary()["pq"]
    best = max(scores, key=lambda k: (scores[k], -list(scores).index(k)))
    assert (tuned.fg_threshold, tuned.min_size) == best


def test_tune_a_classifying_model_on_masks_without_types(tmp_path, agnostic):
    # The bundled default (4 cell types) tuned on a user's masks without types: scored by PQ.
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"min_size": [1000000, 0]}))
    out = tmp_path / "tuned"
    res = invoke("tune", "default", "--data", agnostic, "--grid", grid, "--out", out)
    assert res.exit_code == 0, res.output
    assert "the data has no cell types: tuning by PQ" in res.output
    assert "best PQ" in res.output
    # min_size 10^6 removes every nucleus (PQ 0): the 4 discs per image are found with 0.
    assert ConicPostprocConfig.load(out / "postproc.json").min_size == 0
    # Data with other cell types than the model's is still refused in one line.
    typed = write_discs(tmp_path / "typed", classes=True)
    res = invoke("tune", "default", "--data", typed, "--grid", grid, "--out", tmp_path / "t2")
    assert res.exit_code == 1
    assert "the data has 2 classes but the model was trained for 4" in res.output


def test_tune_metric_aji_scores_by_aji(tmp_path, agnostic):
    """One 10x10 nucleus, predicted exactly plus a spurious 5x5 one: PQ = DQ x SQ =
    1 / (1 + 0.5 * 1) x 1 = 2/3 and AJI = 100 / (100 + 25) = 0.8 (Kumar et al. 2017)."""
    from types import SimpleNamespace

    from kerasnuc.cli.tune import _mask_scoring
    from kerasnuc.registry import get_method

    gt = np.zeros((32, 32), np.int32)
    gt[2:12, 2:12] = 1
    img = np.full((32, 32, 3), 200, np.uint8)
    with DatasetWriter(tmp_path / "one", {"name": "one", "mpp": 0.5}) as w:
        w.add("a", img, gt, None, split="val")
    pred = gt.copy()
    pred[20:25, 20:25] = 2
    run = SimpleNamespace(
        method=get_method("conic"),
        config=SimpleNamespace(data=SimpleNamespace(mpp=0.5), model={"num_classes": 1}),
    )
    ds = [Dataset(tmp_path / "one")]
    scores = {}
    for metric in ("auto", "pq", "aji"):
        items, score_fn, name = _mask_scoring(run, ds, "val", None, None, metric)
        scores[name] = score_fn([pred], [None])
    assert scores == {"PQ": pytest.approx(2 / 3), "AJI": pytest.approx(0.8)}
    # Two datasets, the second predicted exactly (PQ 1, AJI 1): each is scored on its own and
    # the printed score is the mean, (2/3 + 1) / 2 and (0.8 + 1) / 2, named as such.
    with DatasetWriter(tmp_path / "two", {"name": "two", "mpp": 0.5}) as w:
        w.add("b", img, gt, None, split="val")
    ds.append(Dataset(tmp_path / "two"))
    scores = {}
    for metric in ("auto", "aji"):
        items, score_fn, name = _mask_scoring(run, ds, "val", None, None, metric)
        scores[name] = score_fn([pred, gt], [None, None])
    assert scores == {"mean PQ": pytest.approx(5 / 6), "mean AJI": pytest.approx(0.9)}
    res = invoke("tune", "default", "--data", agnostic, "--metric", "aji", "--points")
    assert res.exit_code == 1 and "--metric aji and --points exclude each other" in res.output
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"min_size": [1000000, 0]}))
    out = tmp_path / "tuned"
    res = invoke("tune", "default", "--data", agnostic, "--grid", grid, "--out", out,
                 "--metric", "aji")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "best AJI" in res.output and "the data has no cell types" not in res.output
    # min_size 10^6 removes every nucleus (AJI 0): the discs are found with 0.
    assert ConicPostprocConfig.load(out / "postproc.json").min_size == 0
