"""The run folder (kerasnuc.runs): named models, packing a run into a weights-only float16 model
with a card."""

from __future__ import annotations

import json

import h5py
import keras
import numpy as np
import pytest

from kerasnuc import model_dirs, runs
from kerasnuc.config import DataConfig, RunConfig, TrainConfig
from kerasnuc.fileutil import KerasnucError
from kerasnuc.runs import (
    BEST_WEIGHTS,
    CARD_FILE,
    CARD_KEYS,
    build_model,
    load_run,
    pack_run,
    read_card,
    resolve_model,
    save_config,
)

CLASSES = {1: "tumour", 2: "immune"}


def _float_dtypes(path):
    found = set()
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda n, o: (
                found.add(o.dtype.name)
                if isinstance(o, h5py.Dataset) and o.dtype.kind == "f"
                else None
            )
        )
    return found


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    config = RunConfig(
        method="conic",
        model={"encoder": "efficientnet_b0", "num_classes": 2, "decoder_filters": [8] * 5},
        data=DataConfig(datasets=("a", "b"), mpp=0.25, class_names=CLASSES),
    )
    keras.utils.set_random_seed(0)
    model = build_model(config)
    path = tmp_path_factory.mktemp("run")
    model.save_weights(path / BEST_WEIGHTS)
    save_config(config, path)
    return path


def test_pack_run_writes_float16_weights_that_load_and_predict_alike(run_dir, tmp_path):
    card = {"description": "test model", "licence": "CC0", "scores": {"x": {"pq": 0.5}}}
    out = pack_run(run_dir, tmp_path / "tiny", card=card)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "postproc.json", BEST_WEIGHTS, CARD_FILE]
    )
    assert _float_dtypes(out / BEST_WEIGHTS) == {"float16"}
    assert _float_dtypes(run_dir / BEST_WEIGHTS) == {"float32"}
    # Half the bytes of the float32 file, give or take the HDF5 headers.
    ratio = (out / BEST_WEIGHTS).stat().st_size / (run_dir / BEST_WEIGHTS).stat().st_size
    assert 0.4 < ratio < 0.6
    written = json.loads((out / CARD_FILE).read_text())
    assert set(CARD_KEYS) <= set(written)
    assert written["name"] == "tiny" and written["licence"] == "CC0"
    assert written["method"] == "conic" and written["mpp"] == 0.25
    assert written["classes"] == {"1": "tumour", "2": "immune"}
    assert written["weights_dtype"] == "float16"
    # The packed folder is a run folder: same maps up to float16 rounding (~1e-3 relative).
    original, packed = load_run(run_dir), load_run(out)
    x = np.random.default_rng(1).random((1, 64, 64, 3), dtype=np.float32)
    a, b = original.model(x, training=False), packed.model(x, training=False)
    diff = max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in a)
    assert 0 < diff < 2e-2
    assert 0 < written["float16_max_abs_diff"] < 2e-2
    # Every float16 weight is the float32 weight rounded to nearest.
    for w16, w32 in zip(packed.model.weights, original.model.weights, strict=True):
        np.testing.assert_array_equal(
            np.asarray(w16), np.asarray(w32).astype(np.float16).astype(np.float32)
        )


def test_pack_run_float32_copy_is_exact_and_existing_destination_is_kept(run_dir, tmp_path):
    out = pack_run(run_dir, tmp_path / "f32", float16=False)
    assert _float_dtypes(out / BEST_WEIGHTS) == {"float32"}
    for a, b in zip(load_run(out).model.weights, load_run(run_dir).model.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(KerasnucError, match="already exists"):
        pack_run(run_dir, out)


def test_values_beyond_float16_range_are_refused(run_dir, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    run = load_run(run_dir)
    weights = run.model.weights[0]
    weights.assign(np.full(weights.shape, 1e6, np.float32))
    run.model.save_weights(big / BEST_WEIGHTS)
    save_config(run.config, big)
    with pytest.raises(KerasnucError, match="float16 range"):
        pack_run(big, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_read_card_of_a_plain_run_comes_from_its_config(run_dir):
    card = read_card(run_dir)
    assert card["method"] == "conic" and card["mpp"] == 0.25
    assert card["classes"] == {"1": "tumour", "2": "immune"}
    assert card["training_data"] == ["a", "b"]


def test_resolve_model(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    bundled_dir = tmp_path / "bundled"
    bundled_dir.mkdir()
    monkeypatch.setattr(model_dirs, "BUNDLED_DIR", bundled_dir)
    assert resolve_model(run_dir) == run_dir
    with pytest.raises(KerasnucError, match="pass --model"):
        resolve_model(None)
    with pytest.raises(KerasnucError, match="nuclei-v1: no such run directory"):
        resolve_model("nuclei-v1")
    (bundled_dir / "nuclei-v1").symlink_to(run_dir, target_is_directory=True)
    assert resolve_model("nuclei-v1").resolve() == run_dir
    bundled = bundled_dir / "default"
    bundled.mkdir()
    (bundled / "config.json").write_text("{}")
    assert resolve_model(None) == bundled


# --- classes matched by name, bundled models as run folders, no local paths ------------------


def test_class_order_matches_names():
    model = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle"}
    assert runs.class_order(model, dict(model), "m") is None
    assert runs.class_order({1: "A"}, {1: " a "}, "m") is None  # case and spaces ignored
    alphabetical = {1: "epithelial", 2: "inflammatory", 3: "other", 4: "spindle"}
    # data class k is the model's class order[k - 1]
    assert runs.class_order(model, alphabetical, "m") == [3, 2, 1, 4]
    assert runs.class_order({}, {}, "m") is None
    for data in ({1: "tumour", 2: "stroma"}, {}, {1: "other", 2: "inflammatory"}):
        with pytest.raises(KerasnucError, match="m: its classes") as err:
            runs.class_order(model, data, "m")
        assert "1 other, 2 inflammatory, 3 epithelial, 4 spindle" in str(err.value)
        assert "\n" not in str(err.value)


def test_init_from_permutes_the_classifier_and_the_thresholds(run_dir, tmp_path):
    from kerasnuc.postprocess.conic import ConicPostprocConfig
    from kerasnuc.registry import get_method

    source = tmp_path / "source"
    source.mkdir()
    for name in ("config.json", BEST_WEIGHTS):
        (source / name).write_bytes((run_dir / name).read_bytes())
    ConicPostprocConfig(min_size={1: 10, 2: 30}, fg_threshold=0.3).save(source / "postproc.json")
    donor = load_run(source).model
    donor.class_frequency.assign(np.array([0.7, 0.2, 0.1], np.float32))
    donor.save_weights(source / BEST_WEIGHTS)
    swapped = {1: "immune", 2: "tumour"}  # the source's classes in the other order
    model = build_model(runs.load_config(source))
    runs.load_initial_weights(model, source, swapped, ("semantic_logits",))
    for got, want in zip(
        model.get_layer("semantic_logits").get_weights(),
        donor.get_layer("semantic_logits").get_weights(),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want[..., [0, 2, 1]])
    np.testing.assert_allclose(np.asarray(model.class_frequency), [0.7, 0.1, 0.2])
    # The same order: loaded as they are.
    same = build_model(runs.load_config(source))
    runs.load_initial_weights(same, source, dict(CLASSES), ("semantic_logits",))
    np.testing.assert_array_equal(
        same.get_layer("semantic_logits").get_weights()[0],
        donor.get_layer("semantic_logits").get_weights()[0],
    )
    with pytest.raises(KerasnucError, match="classes are matched by name"):
        runs.load_initial_weights(same, source, {1: "a", 2: "b"}, ("semantic_logits",))
    # The tuned thresholds come along, per-class values following their class.
    config = runs.load_config(source)
    new = RunConfig(
        "conic",
        config.model,
        DataConfig(class_names=swapped),
        train=TrainConfig(init_from=str(source)),
    )
    postproc = runs.initial_postproc(get_method("conic"), new)
    assert postproc.min_size == {2: 10, 1: 30} and postproc.fg_threshold == 0.3
    plain = RunConfig("conic", config.model, DataConfig(class_names=swapped))
    assert runs.initial_postproc(get_method("conic"), plain) == ConicPostprocConfig()


def test_no_local_paths_in_packed_models_cards_and_exports(run_dir, tmp_path, monkeypatch):
    from kerasnuc.serving.export import export_metadata

    local = tmp_path / "local_run"
    local.mkdir()
    (local / BEST_WEIGHTS).write_bytes((run_dir / BEST_WEIGHTS).read_bytes())
    config = runs.load_config(run_dir)
    data = DataConfig(
        datasets=(str(tmp_path / "data" / "consep"), "../shared/data/monuseg_kumar"),
        mpp=0.25,
        class_names=CLASSES,
        points=str(tmp_path / "points"),
    )
    config = RunConfig("conic", config.model, data, train=TrainConfig(init_from="/x/runs/y"))
    save_config(config, local)
    shared = runs.shareable_config(config)
    assert shared["data"]["datasets"] == ["consep", "monuseg_kumar"]
    assert shared["data"]["points"] == "points" and shared["train"]["init_from"] == "y"
    assert read_card(local)["training_data"] == ["consep", "monuseg_kumar"]
    packed = pack_run(local, tmp_path / "packed", float16=False)
    for name in ("config.json", CARD_FILE):
        text = (packed / name).read_text()
        assert str(tmp_path) not in text and "/x/runs" not in text, name
    metadata = json.dumps(export_metadata(load_run(local), "m", 1))
    assert str(tmp_path) not in metadata and '"source_run": "local_run"' in metadata

    # A bundled model is a run folder for tune (with --out: the package is never rewritten),
    # models pack and export.
    from click.testing import CliRunner

    from kerasnuc.cli import main

    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / "tiny").symlink_to(local, target_is_directory=True)
    monkeypatch.setattr(model_dirs, "BUNDLED_DIR", bundled)
    assert runs.is_bundled(resolve_model("tiny")) and not runs.is_bundled(local)
    result = CliRunner().invoke(main, ["tune", "tiny", "--data", "demo"])
    assert result.exit_code == 1 and "tiny is a bundled model: pass --out DIR" in result.output
    result = CliRunner().invoke(main, ["models", "pack", "tiny", str(tmp_path / "p2"), "--float32"])
    assert result.exit_code == 0, result.output
    assert runs.load_config(tmp_path / "p2").data.class_names == CLASSES
    result = CliRunner().invoke(main, ["export", "nowhere", "--name", "m"])
    assert (
        result.exit_code == 1 and "nowhere: no such run directory, nor a bundled" in result.output
    )
    # tune --out writes a new run folder: the model, the new thresholds, no card.
    from kerasnuc.postprocess.conic import ConicPostprocConfig

    tuned = ConicPostprocConfig(fg_threshold=0.2)
    copy = runs.copy_run(resolve_model("tiny"), tmp_path / "copy", postproc=tuned)
    assert sorted(p.name for p in copy.iterdir()) == sorted(
        [BEST_WEIGHTS, "config.json", "postproc.json"]
    )
    assert load_run(copy).postproc == tuned
