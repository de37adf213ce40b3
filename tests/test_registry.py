"""Tests for the ``unet_sharp`` entry of kerasnuc.registry (hooks, defaults, reference fitting)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kerasnuc.cli.train import build_run_config
from kerasnuc.config import DataConfig, RunConfig, TrainConfig
from kerasnuc.data.dataset import Dataset, DatasetWriter
from kerasnuc.data.stain import RGB_FROM_HED, fit_macenko_reference
from kerasnuc.fileutil import KerasnucError
from kerasnuc.losses.focal_tversky import FocalTversky
from kerasnuc.models.freeze import EncoderFreezeSchedule
from kerasnuc.models.unet_sharp import UnetSharpModelConfig
from kerasnuc.optimizers.adabound import AdaBound
from kerasnuc.postprocess.unet_sharp import UnetSharpPostprocConfig
from kerasnuc.registry import METHODS, get_method

STAINS = RGB_FROM_HED[:2] / np.linalg.norm(RGB_FROM_HED[:2], axis=1, keepdims=True)


@pytest.fixture
def stained(tmp_path):
    """6 images (4 train) of two known stains; nuclei are irrelevant here (one per image)."""
    rng = np.random.default_rng(0)
    meta = {"name": "stained", "mpp": 0.5, "classes": {"1": "a"}}
    with DatasetWriter(tmp_path / "stained", meta) as w:
        for k in range(6):
            conc = rng.uniform([0.3, 2.2], [1.5, 3.0], (32 * 32, 2))
            kind = rng.integers(0, 4, 32 * 32)
            conc[kind == 0, 1] = 0.0
            conc[kind == 1, 0] = 0.0
            conc[kind == 3] = 0.0
            img = np.round(255 * np.exp(-conc @ STAINS)).reshape(32, 32, 3).astype(np.uint8)
            inst = np.zeros((32, 32), np.int32)
            inst[10:15, 10:15] = 1
            w.add(f"s{k}", img, inst, inst.copy(), split="train" if k < 4 else "val")
    return tmp_path / "stained"


def test_entry_and_hooks():
    method = get_method("unet_sharp")
    assert method is METHODS["unet_sharp"] and method.outputs == ("semantic",)
    losses = method.losses(4)
    assert list(losses) == ["semantic"] and isinstance(losses["semantic"], FocalTversky)
    loss = losses["semantic"]
    assert (loss.beta, loss.gamma, loss.sparse) == (0.7, pytest.approx(4 / 3), True)

    train = TrainConfig(**method.train_defaults)
    assert (train.optimizer, train.learning_rate, train.weight_decay, train.epochs) == (
        "adabound",
        1e-4,
        0.0,
        50,
    )
    opt = method.optimizer(train, 100)
    assert isinstance(opt, AdaBound)
    assert (opt.final_lr, opt.gamma, opt.beta_1, opt.beta_2, opt.epsilon) == (
        0.1,
        1e-3,
        0.9,
        0.999,
        1e-8,
    )
    assert float(np.asarray(opt.learning_rate)) == pytest.approx(1e-4)
    assert type(method.optimizer(dataclasses.replace(train, optimizer="adamw"), 10)).__name__ == (
        "AdamW"
    )
    with pytest.raises(KerasnucError, match="not 'sgd'"):
        method.optimizer(dataclasses.replace(train, optimizer="sgd"), 10)

    cfg = UnetSharpModelConfig(freeze_encoder_epochs=3, freeze_encoder_batchnorm=False)
    (schedule,) = method.callbacks(RunConfig("unet_sharp", cfg.to_dict()), None)
    assert isinstance(schedule, EncoderFreezeSchedule)
    assert (schedule.frozen_epochs, schedule.freeze_batchnorm) == (3, False)
    assert method.postproc_config is UnetSharpPostprocConfig
    semantic = np.zeros((16, 16, 3), np.float32)
    semantic[..., 0] = 1.0
    semantic[4:10, 4:10] = [0.1, 0.2, 0.7]
    result = method.postprocess({"semantic": semantic}, UnetSharpPostprocConfig(min_size=0))
    assert result.num_instances == 1 and result.table["class"].tolist() == [2]


def test_cli_config_defaults(stained):
    config = build_run_config("unet_sharp", [stained], {}, {"train": {"learning_rate": None}})
    assert config.train.optimizer == "adabound" and config.train.learning_rate == 1e-4
    assert config.model["num_classes"] == 1 and config.model["stain_reference"] is None
    config = build_run_config("unet_sharp", [stained], {"train": {"learning_rate": 0.01}}, {})
    assert config.train.learning_rate == 0.01
    # conic keeps the shared defaults.
    assert build_run_config("conic", [stained], {}, {}).train.optimizer == "adamw"


def test_fit_reference_and_prepare_config(stained):
    ds = Dataset(stained)
    norm = fit_macenko_reference([ds], "train", seed=0)
    cosine = np.sum(norm.stain_matrix * STAINS, axis=1)
    assert cosine.min() > 0.999
    # Only the 4 training images are pooled: the maxima are their pooled 99th percentiles.
    pooled = np.concatenate([ds.image(id).reshape(-1, 3) for id in ds.split("train")])
    od = np.maximum(-np.log(np.maximum(pooled / 255.0, 1 / 255.0)), 0.0)
    conc = np.linalg.lstsq(norm.stain_matrix.T, od.T, rcond=None)[0].T
    np.testing.assert_allclose(norm.max_concentrations, np.percentile(conc, 99, axis=0))
    few = fit_macenko_reference([ds], "train", max_pixels=3000, seed=1)
    assert np.sum(few.stain_matrix * STAINS, axis=1).min() > 0.99
    with pytest.raises(KerasnucError, match="no images in split 'test'"):
        fit_macenko_reference([ds], "test")

    method = get_method("unet_sharp")
    config = RunConfig(
        "unet_sharp",
        UnetSharpModelConfig(num_classes=1).to_dict(),
        DataConfig(datasets=(str(stained),)),
    )
    prepared = method.prepare_config(config, [ds])
    assert prepared.model["stain_reference"] == norm.to_dict()
    assert method.prepare_config(prepared, [ds]) is prepared  # already fitted: kept
    off = dataclasses.replace(config, model={**config.model, "stain_normalization": False})
    assert method.prepare_config(off, [ds]) is off


def test_every_method_has_a_default_grid_of_its_own_settings():
    for name, method in METHODS.items():
        settings = {f.name for f in dataclasses.fields(method.postproc_config)}
        assert method.tune_grid and set(method.tune_grid) <= settings, name


def test_unet_sharp_tunes_its_post_processing():
    """Two touching discs 14 px apart: markers >= 4 px apart split them, >= 20 px apart not."""
    yy, xx = np.mgrid[:32, :48]
    fg = ((yy - 16) ** 2 + (xx - 16) ** 2 <= 64) | ((yy - 16) ** 2 + (xx - 30) ** 2 <= 64)
    semantic = np.stack([1.0 - fg, fg], axis=-1).astype(np.float32)
    maps = [{"semantic": semantic}]

    def score(instances, classes):  # 0 is best: two nuclei
        return -abs(int(instances[0].max()) - 2)

    method = get_method("unet_sharp")
    base = UnetSharpPostprocConfig(sigma=0.0, min_size=0)
    best, table = method.tune(maps, {"min_distance": [20, 4]}, score, base)
    assert [row["min_distance"] for row in table] == [20, 4]
    assert best == dataclasses.replace(base, min_distance=4)
    assert [row["score"] for row in table] == [-1.0, 0.0]


def test_init_from_run_gives_its_augmentation_unless_the_config_says_otherwise(stained):
    from kerasnuc.data.augment import AugmentConfig

    strong = AugmentConfig.preset("stain").to_dict()
    init = RunConfig(
        "conic",
        build_run_config("conic", [stained], {}, {}).model,
        data=DataConfig(datasets=[str(stained)], mpp=0.5, class_names={1: "a"}),
        pipeline={"augment": strong, "crop_size": 512},
    )
    config = build_run_config(None, [stained], {}, {}, init_config=init, init_name="run")
    assert config.pipeline["augment"] == strong and config.pipeline["augment"]["stain_prob"] == 0.5
    assert config.pipeline["crop_size"] == 256  # only the augmentation is taken over
    # --config replaces it; a run without --init-from keeps the mild defaults (no stain change)
    own = {"pipeline": {"augment": {"stain_prob": 0.2}}}
    config = build_run_config(None, [stained], own, {}, init_config=init, init_name="run")
    assert config.pipeline["augment"]["stain_prob"] == 0.2
    assert config.pipeline["augment"]["jpeg_prob"] == 0.0
    assert build_run_config("conic", [stained], {}, {}).pipeline["augment"]["stain_prob"] == 0.0
