"""``kerasnuc train/predict/evaluate/export`` end to end for the ``panoptic`` method (tiny)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from kerasnuc.cli import main
from kerasnuc.data.dataset import Dataset
from kerasnuc.metrics import MetricAccumulator
from kerasnuc.models.maps import predict_maps
from kerasnuc.models.panoptic.model import LOSS_NAMES
from kerasnuc.postprocess.panoptic import PanopticPostprocConfig, postprocess_panoptic
from kerasnuc.runs import load_config
from tests.integration.test_cli_train import write_discs

TINY = {
    "model": {
        "encoder": "tiny",
        "tiny_widths": [8, 8, 16, 16],
        "fpn_filters": 8,
        "box_fc_units": 16,
        "mask_conv_filters": 8,
        "mask_fc_filters": 4,
        "mask_up_filters": 4,
        "rpn_batch": 64,
        "rpn_pre_nms": 200,
        "rpn_post_nms": 50,
        "rpn_pre_nms_test": 200,
        "rpn_post_nms_test": 50,
        "roi_batch": 32,
        "max_mask_rois": 8,
        "max_detections": 16,
    },
    "pipeline": {"deterministic": True, "max_instances": 8},
}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
def test_panoptic_train_predict_evaluate_export(tmp_path):
    data = write_discs(tmp_path / "discs", classes=False)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    run = tmp_path / "run"
    res = invoke(
        "train", "--method", "panoptic", "--data", data, "--out", run, "--config", cfg,
        "--epochs", "1", "--batch-size", "2", "--crop", "64", "--steps-per-epoch", "2",
        "--val-max-images", "1", "--lr", "0.005", "--keep-epoch-weights",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    config = load_config(run)
    assert config.method == "panoptic" and config.model["encoder"] == "tiny"
    assert config.train.optimizer == "sgd"  # the method's optimizer
    assert config.train.keep_epoch_weights
    # the epoch-1 snapshot holds the weights of epoch 1, which is also the best (only) epoch
    import h5py

    with (
        h5py.File(run / "epochs" / "epoch_001.weights.h5") as a,
        h5py.File(run / "model.weights.h5") as b,
    ):
        names_a, names_b = [], []
        a.visit(names_a.append)
        b.visit(names_b.append)
        assert names_a == names_b
        arrays = [n for n in names_a if isinstance(a[n], h5py.Dataset)]
        assert len(arrays) > 50
        for n in arrays:
            np.testing.assert_array_equal(a[n][()], b[n][()], err_msg=n)
    assert config.pipeline["augment"]["emboss_prob"] > 0  # the paper's augmentations
    assert config.pipeline["augment"]["elastic_prob"] == 0
    assert json.loads((run / "postproc.json").read_text())["score_threshold"] == 0.5
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    for name in ("loss", *LOSS_NAMES, "val_aji", "val_pixel_f1", "lr"):
        assert name in rows[0], name
        assert np.isfinite(float(rows[0][name])), name

    # predict, with tiling (32 px tiles + 8 px margins on the 64 px images)
    out = tmp_path / "pred"
    images = data / "images"
    res = invoke("predict", images, "--model", run, "--out", out, "--tile", "32", "--margin", "8")
    assert res.exit_code == 0, res.output
    ids = sorted(p.stem for p in images.iterdir())
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ids
    assert (out / ids[0] / f"{ids[0]}.instances.ome.tif").is_file()

    # TTA is refused with one line
    res = invoke("predict", images, "--model", run, "--out", tmp_path / "p2", "--tta", "4")
    assert res.exit_code == 1 and "not available for the 'panoptic' method" in res.output

    # evaluate the predictions against the dataset
    res = invoke("evaluate", out, data, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)["summary"]
    assert "aji" in summary and "pixel_f1" in summary

    # export with dynamic image sizes; the SavedModel agrees with the Keras model
    base = tmp_path / "saved_models"
    res = invoke("export", run, "--name", "pan", "--base", base, "--warmup", "none", "--json")
    assert res.exit_code == 0, res.output
    meta = json.loads(res.output)
    assert meta["method"] == "panoptic"

    import tensorflow as tf

    from kerasnuc.models.maps import predict_maps_batch
    from kerasnuc.runs import load_run

    loaded = tf.saved_model.load(str(base / "pan" / "1"))
    serve = loaded.signatures["serving_float"]
    model = load_run(run).model
    rng = np.random.default_rng(0)
    for shape in ((1, 64, 64, 3), (2, 50, 80, 3)):
        x = rng.uniform(size=shape).astype("float32")
        got = {k: v.numpy() for k, v in serve(images=tf.constant(x)).items()}
        want = predict_maps_batch(model, x)
        assert got["semantic"].shape == (*shape[:3], 2)
        assert got["masks"].shape == (shape[0], 28, 28, 16)
        for k in ("boxes", "scores", "masks", "semantic"):
            np.testing.assert_allclose(got[k], want[k], atol=1e-4, err_msg=k)

    # tune the post-processing on the labelled data: the default grid, then a grid file
    res = invoke("tune", run, "--data", data, "--split", "val", "--max-images", "2")
    assert res.exit_code == 0, res.output
    # panoptic tunes on tiles of at most 512 px by default: one per 64 px image
    assert "72 configurations on 2 tiles" in res.output
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"score_threshold": [0.05, 0.95], "min_size": [3]}))
    res = invoke("tune", run, "--data", data, "--split", "val", "--grid", grid, "--tile", "0")
    assert res.exit_code == 0, res.output
    assert "2 configurations on 2 images" in res.output  # --tile 0: whole images
    res = invoke("tune", run, "--data", data, "--grid", grid, "--tile", "16")
    assert res.exit_code == 1 and "--tile 16: tiles must be at least 32 px" in res.output
    base = PanopticPostprocConfig.load(run / "postproc.json")
    res = invoke("tune", run, "--data", data, "--grid", grid, "--tile", "32")
    assert res.exit_code == 0, res.output
    assert "2 configurations on 8 tiles" in res.output  # 2 val images of 64 px, 4 tiles each
    tuned = json.loads((run / "postproc.json").read_text())
    assert tuned["min_size"] == 3
    # The tuned threshold is the one a brute-force evaluation of the grid picks (first best),
    # on the same 32 px tiles.
    ds = Dataset(data)
    tiles = [
        (ds.instances(i)[y : y + 32, x : x + 32], ds.image(i)[y : y + 32, x : x + 32])
        for i in ds.split("val")
        for y in (0, 32)
        for x in (0, 32)
    ]
    maps = [(gt, predict_maps(model, image)) for gt, image in tiles]
    scores = []
    for threshold in (0.05, 0.95):
        config = dataclasses.replace(base, score_threshold=threshold, min_size=3)
        acc = MetricAccumulator(num_classes=0, hausdorff=False)
        for gt, m in maps:
            acc.add(gt, postprocess_panoptic(m, config).instances)
        scores.append(acc.summary()["pq"])
    top = max(v for v in scores if not math.isnan(v))
    assert tuned["score_threshold"] == (0.05, 0.95)[scores.index(top)]
    grid.write_text(json.dumps({"fg_threshold": [0.5]}))
    res = invoke("tune", run, "--data", data, "--grid", grid)
    assert res.exit_code == 1 and "Unknown post-processing setting" in res.output
