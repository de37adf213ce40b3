"""The run folder (kerasnuc.runs): named models, packing a run into a weights-only float16 model
with a card."""

from __future__ import annotations

import json

import h5py
import keras
import numpy as np
import pytest

from kerasnuc import runs
from kerasnuc.config import DataConfig, RunConfig
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
    monkeypatch.setattr(runs, "BUNDLED_DIR", bundled_dir)
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
