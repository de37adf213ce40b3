import json

import numpy as np
import pytest

from kerasnuc.config import DataConfig, InferenceConfig, RunConfig, TrainConfig
from kerasnuc.fileutil import KerasnucError
from kerasnuc.runs import load_config, save_config


def test_run_config_round_trip(tmp_path):
    cfg = RunConfig(
        method="conic",
        model={"encoder": "efficientnet_b0", "num_classes": 2},
        data=DataConfig(datasets=("a", "b"), mpp=0.5, class_names={1: "tumour", 2: "immune"}),
        pipeline={"crop_size": 128},
        train=TrainConfig(epochs=3, learning_rate=2e-3),
        inference=InferenceConfig(views=4, onnx_precision="int8"),
    )
    save_config(cfg, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["inference"] == {"views": 4, "onnx_precision": "int8"}
    assert raw["data"]["class_names"] == {"1": "tumour", "2": "immune"}
    assert raw["data"]["class_colours"]["1"] == [255, 215, 0]  # default colour of class 1
    back = load_config(tmp_path)
    assert back == cfg
    assert back.data.num_classes == 2


def test_bad_configs():
    with pytest.raises(ValueError, match="`views` must be one of 1, 2, 4, 8. Received: views=3"):
        InferenceConfig.from_dict({"views": 3})
    with pytest.raises(ValueError, match="`onnx_precision` must be one of float32, int8"):
        InferenceConfig(onnx_precision="float16")
    with pytest.raises(ValueError, match="Unknown InferenceConfig keys"):
        InferenceConfig.from_dict({"tta": 2})
    assert RunConfig.from_dict({"method": "conic", "model": {}}).inference.views == 1  # old runs
    with pytest.raises(ValueError, match="Unknown TrainConfig keys"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="tpu")


def test_wrong_types_name_the_key():
    """Issue 20, item 9: wrong-typed values fail at once, naming the key and the expected type."""
    from kerasnuc.data.pipeline import PipelineConfig
    from kerasnuc.models.conic import ConicModelConfig
    from kerasnuc.postprocess.conic import ConicPostprocConfig

    cases = [
        (TrainConfig.from_dict, {"clip_norm": "ten"}, "`clip_norm` must be a number or null"),
        (TrainConfig.from_dict, {"learning_rate": "1e-3"}, "`learning_rate` must be a number"),
        (TrainConfig.from_dict, {"epochs": 2.5}, "`epochs` must be an integer"),
        (TrainConfig.from_dict, {"mixed_precision": "yes"}, "must be true or false"),
        (TrainConfig.from_dict, {"steps_per_epoch": 0}, "`steps_per_epoch` must be >= 1"),
        (TrainConfig.from_dict, {"learning_rate": -1}, "`learning_rate` must be > 0"),
        (PipelineConfig.from_dict, {"crop_size": "256"}, "`crop_size` must be an integer"),
        (
            PipelineConfig.from_dict,
            {"dataset_weights": [1, "a"]},
            "`dataset_weights` must be a list of numbers or null",
        ),
        (
            ConicModelConfig.from_dict,
            {"decoder_filters": "eight"},
            "`decoder_filters` must be a list of integers",
        ),
        (
            ConicModelConfig.from_dict,
            {"input_shape": [None, None, "3"]},
            r"`input_shape` must be a list of 3 values \(an integer or null, an integer or null",
        ),
        (DataConfig.from_dict, {"class_names": ["a"]}, "`class_names` must be an object"),
        (ConicPostprocConfig.from_dict, {"min_size": "10"}, "`min_size` must be a number"),
    ]
    for from_dict, data, message in cases:
        with pytest.raises(ValueError, match=message):
            from_dict(data)
    # JSON spellings of the right types pass: lists for tuples, string keys for class ids.
    assert DataConfig.from_dict({"class_names": {"1": "a"}}).class_names == {1: "a"}
    assert ConicModelConfig.from_dict({"input_shape": [64, 64, 3]}).input_shape == (64, 64, 3)
    assert TrainConfig.from_dict({"learning_rate": 1}).learning_rate == 1


def test_load_errors(tmp_path):
    with pytest.raises(KerasnucError, match="config.json: missing"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"method": "conic", "model": {}, "train": {"x": 1}}')
    with pytest.raises(KerasnucError, match="invalid run config"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"method": "conic", "model": {"dropout": "high"}}')
    with pytest.raises(KerasnucError, match=r"config.json: invalid run config \(`dropout` must"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"method": "nope", "model": {}}')
    with pytest.raises(KerasnucError, match="config.json: unknown method 'nope'"):
        load_config(tmp_path)


def test_load_run_restores_weights_and_postproc(tmp_path):
    import keras

    from kerasnuc.postprocess.conic import ConicPostprocConfig
    from kerasnuc.runs import build_model, load_run

    cfg = RunConfig(
        method="conic",
        model={"encoder": "efficientnet_b0", "num_classes": 1, "decoder_filters": [8, 8, 8, 8, 8]},
    )
    save_config(cfg, tmp_path)
    keras.utils.set_random_seed(0)
    model = build_model(cfg)
    model.save_weights(tmp_path / "model.weights.h5")
    ConicPostprocConfig(fg_threshold=0.3).save(tmp_path / "postproc.json")
    x = np.random.default_rng(0).uniform(size=(1, 64, 64, 3)).astype("float32")
    run = load_run(tmp_path)
    assert run.postproc.fg_threshold == 0.3
    a, b = model.predict(x, verbose=0), run.model.predict(x, verbose=0)
    for k in ("semantic", "three_label", "vectors"):
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)
    with pytest.raises(KerasnucError, match="nope.h5: weights file not found"):
        load_run(tmp_path, weights=tmp_path / "nope.h5")
    # Issue 20, item 9: a config that does not match the weights is one short line, not the
    # 87 KB of tensors in Keras' message.
    other = RunConfig("conic", {**cfg.model, "decoder_filters": [16, 8, 8, 8, 8]})
    save_config(other, tmp_path)
    with pytest.raises(KerasnucError) as info:
        load_run(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: the architecture in config.json (conic) does not ")
    assert "\n" not in message and len(message) < 400


def test_old_run_configs_store_the_model_resolution_once():
    """pipeline.target_mpp (kerasnuc 0.1.0) becomes data.mpp when that is unset."""
    from pathlib import Path

    from kerasnuc.config import migrate_model_mpp
    from kerasnuc.runs import load_config

    old = {"method": "conic", "model": {}, "pipeline": {"target_mpp": 0.5, "crop_size": 64}}
    cfg = RunConfig.from_dict(old)
    assert cfg.data.mpp == 0.5 and cfg.pipeline == {"crop_size": 64}
    kept = {**old, "data": {"mpp": 0.5}}
    assert RunConfig.from_dict(kept) == cfg
    unresampled = {**old, "pipeline": {"target_mpp": None}, "data": {"mpp": 0.25}}
    assert RunConfig.from_dict(unresampled).data.mpp == 0.25
    with pytest.raises(ValueError, match="differ"):
        migrate_model_mpp({**old, "data": {"mpp": 0.25}})
    root = Path(__file__).resolve().parent.parent
    # Two folders written by kerasnuc 0.1.0 (the first bundled default and its reference run).
    for run in (root / "reference_runs" / "default_v1_b0", root / "reference_runs" / "conic_b0"):
        raw = json.loads((run / "config.json").read_text())
        assert "target_mpp" in raw["pipeline"]  # the files themselves are not rewritten
        config = load_config(run)
        assert config.data.mpp == 0.25 and "target_mpp" not in config.pipeline
