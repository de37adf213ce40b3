"""``kerasnuc train --method unet_sharp`` end to end on 64x64 CoNSeP crops, then ``--resume``
across the frozen-encoder boundary, ``predict``, ``evaluate`` and ``export`` (dynamic shapes).

One module-scoped run (tiny ResNeXt-50: width scale 0.25, 4 groups, one block per stage; 4-8
channel decoder; 1 frozen epoch): ``train --epochs 1`` (phase 1: frozen encoder), then its
``config.json`` is extended to 2 epochs and ``train --resume`` runs epoch 2 (phase 2: encoder
unfrozen except batch norm). Tracing the train step dominates the runtime (~1 min per phase).
"""

from __future__ import annotations

import csv
import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from skimage.segmentation import relabel_sequential

from kerasnuc.cli import main
from kerasnuc.data.dataset import Dataset, DatasetWriter
from kerasnuc.data.stain import fit_macenko_reference
from kerasnuc.fileutil import read_image
from kerasnuc.models.freeze import batchnorm_layers
from kerasnuc.models.maps import predict_maps_batch
from kerasnuc.runs import build_model, load_config, load_run

pytestmark = pytest.mark.slow

TINY_MODEL = {
    "encoder": "resnext50",
    "encoder_width_scale": 0.25,
    "encoder_groups": 4,
    "encoder_blocks": [1, 1, 1, 1],
    "skip_filters": 4,
    "decoder_filters": 8,
    "head_filters": 4,
    "aspp_filters": 8,
    "freeze_encoder_epochs": 1,
}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _consep_crops(shared_data, root):
    """4 train + 2 val 64x64 crops of CoNSeP patches with nuclei of several classes."""
    src = Dataset(shared_data / "consep")
    meta = json.loads((shared_data / "consep" / "meta.json").read_text())
    meta = {"name": "consep_tiny", "mpp": meta["mpp"], "classes": meta["classes"]}
    picked = []
    for id in src.split("train"):
        inst = src.instances(id)[96:160, 96:160]
        cls = src.classes(id)[96:160, 96:160]
        if len(np.unique(cls)) >= 3 and len(np.unique(inst)) > 6:
            picked.append(id)
        if len(picked) == 6:
            break
    with DatasetWriter(root, meta) as w:
        for k, id in enumerate(picked):
            inst, _, _ = relabel_sequential(src.instances(id)[96:160, 96:160])
            w.add(
                f"c{k}",
                src.image(id)[96:160, 96:160],
                inst.astype(np.int32),
                src.classes(id)[96:160, 96:160],
                split="train" if k < 4 else "val",
            )
    return root


def _variables(run_dir, names):
    with np.load(run_dir / "checkpoint" / "variables.npz") as data:
        return {name: data[f"model/{i}"] for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def run(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unet_sharp")
    data = _consep_crops(shared_data, tmp / "consep_tiny")
    cfg = tmp / "tiny.json"
    cfg.write_text(json.dumps({"model": TINY_MODEL, "pipeline": {"deterministic": True}}))
    out = tmp / "run"
    res = invoke(
        "train", "--method", "unet_sharp", "--data", data, "--out", out, "--config", cfg,
        "--epochs", "1", "--batch-size", "2", "--crop", "64", "--steps-per-epoch", "2",
        "--seed", "3", "--no-importance-sampling",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    config = load_config(out)
    keras.utils.set_random_seed(config.train.seed)
    model = build_model(config)  # the initial weights of the run (same seed, same order)
    names = [v.path for v in model.variables]
    initial = {name: v.numpy() for name, v in zip(names, model.variables, strict=True)}
    encoder = model.get_layer("encoder")
    enc_names = {v.path for v in encoder.variables}
    bn_names = {v.path for bn in batchnorm_layers(encoder) for v in bn.variables}
    after_1 = _variables(out, names)
    shutil.copytree(out, tmp / "after_epoch_1")

    # Extend the run to 2 epochs and resume across the phase boundary.
    saved = json.loads((out / "config.json").read_text())
    saved["train"]["epochs"] = 2
    (out / "config.json").write_text(json.dumps(saved))
    res = invoke("train", "--resume", "--out", out)
    assert res.exit_code == 0, res.output
    after_2 = _variables(out, names)
    return {
        "data": data,
        "out": out,
        "config": config,
        "initial": initial,
        "after_1": after_1,
        "after_2": after_2,
        "enc": enc_names,
        "bn": bn_names,
    }


def test_config_defaults_and_stain_reference(run):
    config = run["config"]
    assert config.method == "unet_sharp"
    assert config.train.optimizer == "adabound" and config.train.learning_rate == 1e-4
    assert config.train.weight_decay == 0.0
    assert config.model["num_classes"] == 4 and config.model["encoder"] == "resnext50"
    # The reference fitted on the training images when the run started travels in config.json.
    expected = fit_macenko_reference([Dataset(run["data"])], "train", seed=3)
    np.testing.assert_allclose(
        config.model["stain_reference"]["stain_matrix"], expected.stain_matrix, atol=1e-12
    )
    loaded = load_run(run["out"])
    assert "macenko" in [layer.name for layer in loaded.model.layers]


def test_frozen_encoder_then_all_but_batchnorm(run):
    initial, after_1, after_2 = run["initial"], run["after_1"], run["after_2"]
    enc, bn = run["enc"], run["bn"]
    changed_1 = {k for k in initial if not np.array_equal(initial[k], after_1[k])}
    changed_2 = {k for k in initial if not np.array_equal(after_1[k], after_2[k])}
    dec = set(initial) - enc
    moving = {k for k in bn if "moving_" in k}
    # Before the first step the random encoder's BN statistics were calibrated on training
    # batches (no longer the initial mean 0 / variance 1); epoch 1 then trains the decoder only:
    # the rest of the encoder is bit-identical.
    assert moving and moving <= changed_1
    assert not changed_1 & (enc - moving)
    assert any("dec1_fuse_conv" in k for k in changed_1) and any("aspp" in k for k in changed_1)
    # Epoch 2 (resumed run): every encoder convolution kernel learns, no batch norm variable.
    enc_kernels = {k for k in enc - bn if k.endswith("kernel")}
    assert enc_kernels and enc_kernels <= changed_2
    assert not changed_2 & bn
    assert changed_2 & dec


def test_history_has_semantic_metrics(run):
    with open(run["out"] / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for key in ("loss", "val_pq", "val_aji", "val_mpq_plus", "val_miou_pooled", "val_mdice_pooled"):
        assert key in rows[1], key
    for c in range(1, 5):
        iou, dice = float(rows[1][f"val_iou_pooled_c{c}"]), float(rows[1][f"val_dice_pooled_c{c}"])
        assert np.isnan(iou) or 0 <= iou <= dice <= 1


def test_predict_evaluate_export(run, tmp_path):
    data, out = run["data"], run["out"]
    pred = tmp_path / "pred"
    res = invoke(
        "predict", data / "images", "--model", out, "--out", pred, "--tile", "64", "--margin", "0"
    )
    assert res.exit_code == 0, res.output
    res = invoke("evaluate", pred, data, "--split", "val")
    assert res.exit_code == 0, res.output
    assert "Semantic (pooled pixels, classes 1..C): mIoU" in res.output
    assert "IoU" in res.output and "Dice" in res.output

    base = tmp_path / "saved_models"
    res = invoke("export", out, "--name", "unet_sharp_tiny", "--base", base, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["method"] == "unet_sharp" and summary["outputs"] == {"semantic": 5}
    served = tf.saved_model.load(str(base / "unet_sharp_tiny" / "1"))
    model = load_run(out).model
    image = read_image(data / "images" / "c0.png")
    large = np.pad(image, ((0, 64), (0, 64), (0, 0)), mode="reflect")
    for shape in ((1, 64, 64, 3), (2, 45, 70, 3)):
        images = np.stack([large[: shape[1], : shape[2]]] * shape[0])
        images[-1] = images[-1][::-1]
        got = served.signatures["serving_default"](images=tf.constant(images))["semantic"]
        expected = predict_maps_batch(model, images)["semantic"]
        assert tuple(got.shape) == (*shape[:3], 5)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)


def test_init_from_a_model_without_cell_types_keeps_all_but_the_classifier(shared_data, tmp_path):
    # The same CoNSeP crops, once with cell types and once as nuclei only.
    typed = _consep_crops(shared_data, tmp_path / "typed")
    src = Dataset(typed)
    meta = {"name": "nuclei_only", "mpp": json.loads((typed / "meta.json").read_text())["mpp"]}
    with DatasetWriter(tmp_path / "plain", meta) as w:
        for split in ("train", "val"):
            for id in src.split(split):
                w.add(id, src.image(id), src.instances(id), split=split)
    cfg = tmp_path / "tiny.json"
    model = {**TINY_MODEL, "freeze_encoder_epochs": 0}
    train = {"optimizer": "adamw", "bn_reestimation_batches": 0}
    cfg.write_text(
        json.dumps({"model": model, "pipeline": {"deterministic": True}, "train": train})
    )
    common = ("--epochs", "1", "--batch-size", "2", "--crop", "64", "--steps-per-epoch", "1",
              "--seed", "3", "--no-importance-sampling", "--config", cfg)  # fmt: skip
    res = invoke("train", "--method", "unet_sharp", "--data", tmp_path / "plain", "--out",
                 tmp_path / "nuclei", *common)  # fmt: skip
    assert res.exit_code == 0, res.output
    # A learning rate far too small to move the weights: what comes out is what was loaded.
    res = invoke("train", "--init-from", tmp_path / "nuclei", "--data", typed, "--out",
                 tmp_path / "types", *common, "--lr", "1e-12")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "has no cell types; everything but its classifier is taken over" in res.output
    assert "1 other, 2 inflammatory, 3 epithelial, 4 spindle" in res.output
    nuclei, types = load_run(tmp_path / "nuclei"), load_run(tmp_path / "types")
    assert types.config.data.class_names == src.class_names
    assert types.config.model["num_classes"] == 4 and nuclei.config.model["num_classes"] == 1
    compared = 0
    for layer in types.model.layers:
        theirs = nuclei.model.get_layer(layer.name)
        if layer.name == "semantic_logits":
            assert tuple(layer.kernel.shape)[-1] == 5 and tuple(theirs.kernel.shape)[-1] == 2
            continue
        for mine, their in zip(layer.trainable_weights, theirs.trainable_weights, strict=True):
            np.testing.assert_allclose(np.asarray(mine), np.asarray(their), atol=1e-6)
            compared += 1
    assert compared > 50
    # Without --init-from the same seed gives other weights: the comparison can fail.
    fresh = build_model(types.config)
    enc = fresh.get_layer("encoder").trainable_weights[0]
    loaded = nuclei.model.get_layer("encoder").trainable_weights[0]
    assert np.abs(np.asarray(enc) - np.asarray(loaded)).max() > 1e-3
