"""The ``weak`` method end to end through the CLI on a tiny synthetic dataset.

train (points derived from the instance maps, and points from ``--points`` CSV files) -> predict
-> evaluate -> export (dynamic image sizes), at 64x64 with a 4-wide ResNet-50.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from kerasnuc.cli import main
from kerasnuc.config import DataConfig, RunConfig
from kerasnuc.data.dataset import Dataset
from kerasnuc.data.points import points_from_instances
from kerasnuc.models.maps import predict_maps_batch
from kerasnuc.optimizers.lookahead import Lookahead
from kerasnuc.optimizers.radam import RAdam
from kerasnuc.postprocess.weak import WeakPostprocConfig
from kerasnuc.registry import get_method
from kerasnuc.runs import load_config, load_run
from tests.integration.test_cli_train import write_discs

TINY = {
    "model": {"encoder_width": 4, "decoder_filters": [8, 8, 8, 8, 8]},
    "pipeline": {"deterministic": True},
}
FLAGS = ["--epochs", "1", "--batch-size", "2", "--crop", "64", "--steps-per-epoch", "3",
         "--seed", "3", "--no-importance-sampling"]  # fmt: skip


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_point_csvs(data, folder, ids):
    """One ``<id>.csv`` (x, y) per image, the instance centroids."""
    folder.mkdir()
    ds = Dataset(data)
    for id in ids:
        pts, _ = points_from_instances(ds.instances(id))
        with open(folder / f"{id}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["x", "y"])
            writer.writerows([(c, r) for r, c in pts])
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("weak")
    data = write_discs(root / "discs", classes=False)
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    run = root / "run"
    result = invoke("train", "--method", "weak", "--data", data, "--out", run, "--config", cfg,
                    *FLAGS)  # fmt: skip
    return {"root": root, "data": data, "cfg": cfg, "run": run, "train": result}


def test_weak_registry_hooks():
    method = get_method("weak")
    assert method.losses(1) is None and method.outputs == ("seg",)
    config = RunConfig(method="weak", model={})
    config = RunConfig.from_dict({**config.to_dict(), "train": {"optimizer": "ranger"}})
    opt = method.optimizer(config.train, 100)
    # Ranger = Lookahead(RAdam): lr 1e-3 (paper), the 2019 release's other settings.
    assert isinstance(opt, Lookahead) and isinstance(opt.inner_optimizer, RAdam)
    assert opt.sync_period == 6 and opt.slow_step_size == 0.5
    inner = opt.inner_optimizer
    assert float(np.asarray(inner.learning_rate)) == pytest.approx(1e-3)
    assert (inner.beta_1, inner.beta_2, inner.epsilon) == (0.95, 0.999, 1e-5)
    assert method.new_postproc(config) == WeakPostprocConfig(mpp=None)


def test_lite0_encoder_is_not_standardised_by_the_training_images(tmp_path):
    # The ImageNet EfficientNet-Lite0 encoder scales its own input; resnet50 gets the
    # training-set mean / std of the paper.
    method = get_method("weak")
    data = write_discs(tmp_path / "discs", classes=False)
    ds = Dataset(data)
    for encoder, fitted in (("efficientnet_lite0", False), ("resnet50", True)):
        config = RunConfig(method="weak", model={"encoder": encoder},
                           data=DataConfig(datasets=(str(data),)))  # fmt: skip
        prepared = method.prepare_config(config, [ds])
        assert (prepared.model["input_mean"] is not None) == fitted, encoder


@pytest.mark.slow
def test_train_with_derived_points(setup):
    result, run = setup["train"], setup["run"]
    assert result.exit_code == 0, result.output
    config = load_config(run)
    assert config.method == "weak" and config.train.optimizer == "ranger"
    assert config.data.points is None and config.data.mpp == 0.5
    assert config.model["encoder_width"] == 4 and len(config.model["input_mean"]) == 3
    # The 2.5 um detection distance is converted with the run's 0.5 um/px.
    postproc = WeakPostprocConfig.load(run / "postproc.json")
    assert postproc.mpp == 0.5 and postproc.min_distance_px == 5
    with open(run / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1
    for key in ("loss", "voronoi_loss", "repel_loss", "cluster_loss", "val_pq", "val_aji"):
        assert np.isfinite(float(rows[0][key])), key
    loaded = load_run(run)
    assert loaded.model.loss_mode == "cyclic" and loaded.postproc == postproc


@pytest.mark.slow
def test_train_with_points_files(setup, tmp_path):
    data, cfg = setup["data"], setup["cfg"]
    ds = Dataset(data)
    points = write_point_csvs(data, tmp_path / "points", ds.split("train"))
    run = tmp_path / "run"
    result = invoke("train", "--method", "weak", "--data", data, "--out", run, "--config", cfg,
                    "--points", points, *FLAGS)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert load_config(run).data.points == str(points)
    assert get_method("weak").dataset_options(load_config(run))["points"].keys() == set(
        ds.split("train")
    )

    # Errors are one line: a training image without points, --points for another method.
    (points / "im0.csv").unlink()
    result = invoke("train", "--method", "weak", "--data", data, "--out", tmp_path / "r2",
                    "--config", cfg, "--points", points, *FLAGS)  # fmt: skip
    assert result.exit_code == 1 and "no point annotations for this image" in result.output
    result = invoke("train", "--data", data, "--out", tmp_path / "r3", "--points", points)
    assert result.exit_code == 1 and "--points is for point-supervised methods" in result.output
    result = invoke("train", "--method", "weak", "--data", data, "--out", tmp_path / "r4",
                    "--points", tmp_path / "nowhere")  # fmt: skip
    assert result.exit_code == 1 and "nowhere: point annotations not found" in result.output


@pytest.mark.slow
def test_predict_evaluate_export(setup, tmp_path):
    data, run = setup["data"], setup["run"]
    assert setup["train"].exit_code == 0, setup["train"].output
    ds = Dataset(data)
    images = [ds.image_path(id) for id in ds.split("val")]
    out = tmp_path / "pred"
    result = invoke(*["predict", *images], "--model", run, "--out", out, "--mpp", "0.5",
                    "--format", "tiff,csv")  # fmt: skip
    assert result.exit_code == 0, result.output
    scores = tmp_path / "scores.json"
    result = invoke("evaluate", out, data, "--split", "val", "--out", scores)
    assert result.exit_code == 0, result.output
    assert "CCC of counts" in result.output and "pixel accuracy (mean)" in result.output
    summary = json.loads(scores.read_text())["summary"]
    assert summary["n_images"] == 2
    for key in ("det_precision_pooled", "det_recall_pooled", "det_f1_pooled", "ccc", "aji",
                "pixel_f1", "pixel_acc", "obj_dice"):  # fmt: skip
        assert key in summary, key

    base = tmp_path / "saved_models"
    result = invoke("export", run, "--name", "weak_tiny", "--base", base, "--warmup", "64,40x56",
                    "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["method"] == "weak" and summary["outputs"] == {"seg": 2}
    loaded = tf.saved_model.load(str(base / "weak_tiny" / "1"))
    model = load_run(run).model
    for shape in ((1, 64, 64, 3), (2, 40, 56, 3)):  # any size: padded in the graph
        x = np.random.default_rng(shape[1]).random(shape).astype(np.float32)
        got = loaded.signatures["serving_float"](images=tf.constant(x))["seg"].numpy()
        ref = predict_maps_batch(model, x)["seg"]
        assert got.shape == shape[:3] + (2,)
        np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.slow
def test_tune_weak_run(setup, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"peak_threshold": [0.5, 0.9], "min_size": [0, 10**6]}))
    result = invoke("tune", run, "--data", setup["data"], "--grid", grid)
    assert result.exit_code == 0, result.output
    assert "4 configurations on 2 images" in result.output
    tuned = WeakPostprocConfig.load(run / "postproc.json")
    # min_size 10^6 removes every nucleus (PQ 0): never better than keeping them.
    assert tuned.min_size == 0 and tuned.mpp == 0.5
