"""SavedModel export: layout, versions, signatures, XLA-free graph, TF1 session load, warm-up."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from kerasnuc import __version__
from kerasnuc.config import DataConfig, RunConfig
from kerasnuc.fileutil import KerasnucError
from kerasnuc.models.maps import predict_maps_batch
from kerasnuc.postprocess.conic import ConicPostprocConfig
from kerasnuc.runs import build_model, load_run, save_config
from kerasnuc.serving import warmup
from kerasnuc.serving.export import (
    export_run,
    list_versions,
    pad_images,
    read_metadata,
)

pytestmark = pytest.mark.slow
TOL = 1e-4


def make_tiny_run(run_dir: Path) -> Path:
    """A conic run directory with a tiny random model (2 classes, 8-wide decoder).

    Lite0 (no squeeze-excitation) traces faster than B0; every export traces the model again.
    """
    config = RunConfig(
        method="conic",
        model={"encoder": "efficientnet_lite0", "num_classes": 2, "decoder_filters": [8] * 5},
        data=DataConfig(mpp=0.5, class_names={1: "a", 2: "b"}),
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    build_model(config).save_weights(run_dir / "model.weights.h5")
    save_config(config, run_dir)
    ConicPostprocConfig().save(run_dir / "postproc.json")
    return run_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export into a base that already holds versions 1 and 3 of the model."""
    root = tmp_path_factory.mktemp("export")
    run_dir = make_tiny_run(root / "run")
    base = root / "saved_models"
    (base / "tiny" / "1").mkdir(parents=True)
    (base / "tiny" / "3").mkdir()
    result = export_run(run_dir, "tiny", base=base, warmup_shapes=[(1, 64, 64), (2, 40, 50)])
    return {"run": load_run(run_dir), "base": base, "result": result}


@pytest.fixture(scope="module")
def session(exported):
    """The export loaded with the TF1 C++-backed loader: (session, {name: SignatureDef})."""
    graph = tf.Graph()
    sess = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        meta_graph = tf.compat.v1.saved_model.loader.load(
            sess, ["serve"], str(exported["result"].path)
        )
    yield sess, dict(meta_graph.signature_def)
    sess.close()


def _run_signature(session, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess, signatures = session
    sig = signatures[name]
    feed = {sig.inputs[k].name: v for k, v in inputs.items()}
    names = sorted(sig.outputs)
    values = sess.run([sig.outputs[k].name for k in names], feed_dict=feed)
    return dict(zip(names, values, strict=True))


def _images(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_version_layout_and_models_config(exported):
    base, result = exported["base"], exported["result"]
    # Versions 1 and 3 exist: the next one is 4 (max + 1), written in place of a temp folder.
    assert result.version == 4
    assert result.path == base / "tiny" / "4"
    assert (result.path / "saved_model.pb").is_file()
    assert (result.path / "variables" / "variables.index").is_file()
    assert sorted(p.name for p in (base / "tiny").iterdir()) == ["1", "3", "4"]
    assert list_versions(base / "tiny") == [1, 3, 4]
    expected = (
        "model_config_list {\n"
        "  config {\n"
        '    name: "tiny"\n'
        '    base_path: "/models/tiny"\n'
        '    model_platform: "tensorflow"\n'
        "    model_version_policy {\n"
        "      latest {\n"
        "        num_versions: 2\n"
        "      }\n"
        "    }\n"
        "  }\n"
        "}\n"
    )
    assert (base / "models.config").read_text() == expected


def test_existing_version_and_bad_names_fail_fast(exported, tmp_path):
    base = exported["base"]
    before = sorted(p.name for p in (base / "tiny").iterdir())
    with pytest.raises(KerasnucError, match="version 3 of 'tiny' already exists"):
        export_run(exported["run"].run_dir, "tiny", base=base, version=3)
    for name in ("a/b", "", "../x", " x"):
        with pytest.raises(KerasnucError, match="invalid model name"):
            export_run(exported["run"].run_dir, name, base=base)
    with pytest.raises(KerasnucError, match="version must be a positive integer"):
        export_run(exported["run"].run_dir, "tiny", base=base, version=0)
    assert sorted(p.name for p in (base / "tiny").iterdir()) == before
    with pytest.raises(KerasnucError, match="config.json: missing"):
        export_run(tmp_path, "other", base=base)
    assert not (base / "other" / "1").exists()


def test_graph_has_no_xla_must_compile(exported):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((exported["result"].path / "saved_model.pb").read_bytes())
    functions = [f for g in proto.meta_graphs for f in g.graph_def.library.function]
    assert len(functions) > 10
    assert [f.signature.name for f in functions if "_XlaMustCompile" in f.attr] == []
    assert sorted(proto.meta_graphs[0].signature_def) == [
        "__saved_model_init_op",
        "kerasnuc_metadata",
        "serving_default",
        "serving_float",
    ]


def test_saved_model_cli_show(exported):
    cli = shutil.which("saved_model_cli")
    cmd = [cli] if cli else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    proc = subprocess.run(
        [*cmd, "show", "--dir", str(exported["result"].path), "--all"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    default = out.split("signature_def['serving_default']")[1].split("signature_def[")[0]
    assert "inputs['images'] tensor_info:" in default
    assert "dtype: DT_UINT8" in default
    assert "shape: (-1, -1, -1, 3)" in default
    for name, channels in (("semantic", 3), ("three_label", 3), ("vectors", 2)):
        assert f"outputs['{name}'] tensor_info:" in default
        assert f"shape: (-1, -1, -1, {channels})" in default
    floating = out.split("signature_def['serving_float']")[1].split("signature_def[")[0]
    assert "dtype: DT_FLOAT" in floating and "DT_UINT8" not in floating


@pytest.mark.parametrize("shape", [(2, 45, 70, 3), (1, 64, 96, 3)])
def test_session_matches_keras_model(exported, session, shape):
    images = _images(shape, seed=shape[1])
    expected = predict_maps_batch(exported["run"].model, images)
    out = _run_signature(session, "serving_default", {"images": images})
    assert sorted(out) == ["semantic", "three_label", "vectors"]
    for name, ref in expected.items():
        assert out[name].shape == shape[:3] + (ref.shape[-1],)
        np.testing.assert_allclose(out[name], ref, atol=TOL, rtol=0)
    # Softmax maps sum to one over channels: the crop kept whole pixels.
    np.testing.assert_allclose(out["three_label"].sum(-1), 1.0, atol=1e-5)
    # Deterministic: MC dropout is off in the export.
    again = _run_signature(session, "serving_default", {"images": images})
    np.testing.assert_array_equal(again["semantic"], out["semantic"])


def test_float_signature_and_edge_fallback(exported, session):
    # 10 rows need 22 rows of padding (> 10): numpy's rule falls back to edge padding.
    for shape in [(1, 10, 40, 3), (2, 33, 31, 3)]:
        images = _images(shape, seed=3).astype(np.float32) / 255.0
        expected = predict_maps_batch(exported["run"].model, images)
        out = _run_signature(session, "serving_float", {"images": images})
        for name, ref in expected.items():
            np.testing.assert_allclose(out[name], ref, atol=TOL, rtol=0)


def test_predict_request_protos_through_session(exported, session):
    from tensorflow_serving.apis import model_pb2, predict_pb2

    images = _images((2, 40, 36, 3), seed=7)
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name="tiny", signature_name="serving_default")
    )
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    wire = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    inputs = {k: tf.make_ndarray(v) for k, v in wire.inputs.items()}
    assert inputs["images"].dtype == np.uint8
    outputs = _run_signature(session, wire.model_spec.signature_name, inputs)
    response = predict_pb2.PredictResponse(model_spec=wire.model_spec)
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    decoded = predict_pb2.PredictResponse.FromString(response.SerializeToString())
    expected = predict_maps_batch(exported["run"].model, images)
    assert sorted(decoded.outputs) == sorted(expected)
    for name, ref in expected.items():
        np.testing.assert_allclose(tf.make_ndarray(decoded.outputs[name]), ref, atol=TOL, rtol=0)


def test_pad_images_matches_numpy_pad():
    x = np.arange(2 * 5 * 7 * 1, dtype=np.float32).reshape(2, 5, 7, 1)
    # 5 -> 8 rows (pad 3 < 5), 7 -> 8 columns (pad 1 < 7): reflect.
    want = np.pad(x, [(0, 0), (0, 3), (0, 1), (0, 0)], mode="reflect")
    np.testing.assert_array_equal(pad_images(tf.constant(x), 4, "reflect").numpy(), want)
    want = np.pad(x, [(0, 0), (0, 3), (0, 1), (0, 0)], mode="edge")
    np.testing.assert_array_equal(pad_images(tf.constant(x), 4, "edge").numpy(), want)
    # 5 -> 16 rows needs 11 > 5 rows: reflect falls back to edge (both axes).
    want = np.pad(x, [(0, 0), (0, 11), (0, 9), (0, 0)], mode="edge")
    np.testing.assert_array_equal(pad_images(tf.constant(x), 16, "reflect").numpy(), want)
    # Already a multiple: unchanged.
    y = x[:, :4, :4]
    np.testing.assert_array_equal(pad_images(tf.constant(y), 4, "reflect").numpy(), y)
    # Four rows of [1, 2, 3]: the columns are mirrored without repeating the last one.
    rows = np.tile(np.array([1.0, 2.0, 3.0], np.float32)[None, None, :, None], (1, 4, 1, 1))
    padded = pad_images(tf.constant(rows), 4, "reflect").numpy()
    np.testing.assert_array_equal(padded[0, :, :, 0], [[1, 2, 3, 2]] * 4)
    # One row of [1, 2, 3] to 4 x 4: a single row cannot be mirrored, so edge padding.
    padded = pad_images(tf.constant(rows[:, :1]), 4, "reflect").numpy()
    np.testing.assert_array_equal(padded[0, :, :, 0], [[1, 2, 3, 3]] * 4)


def test_metadata_asset_and_signature(exported, session):
    meta = read_metadata(exported["result"].path)
    assert meta["format"] == "kerasnuc-savedmodel"
    assert meta["kerasnuc_version"] == __version__
    assert (meta["name"], meta["version"], meta["method"]) == ("tiny", 4, "conic")
    assert meta["outputs"] == {"semantic": 3, "three_label": 3, "vectors": 2}
    assert meta["mpp"] == 0.5
    assert meta["class_names"] == {"1": "a", "2": "b"}
    assert meta["class_colours"] == {"1": [255, 215, 0], "2": [220, 20, 60]}
    assert ConicPostprocConfig.from_dict(meta["postproc"]) == ConicPostprocConfig()
    assert meta["padding"] == "reflect" and meta["stride"] == 32
    assert RunConfig.from_dict(meta["run_config"]) == exported["run"].config
    assert meta["signatures"]["serving_default"]["inputs"] == {
        "images": "uint8 (batch, height, width, 3) RGB 0..255"
    }
    out = _run_signature(session, "kerasnuc_metadata", {"request": np.zeros(3, np.int32)})
    assert out["metadata"].shape == (3,)
    assert json.loads(out["metadata"][2].decode()) == meta


def test_warmup_records_parse_and_run(exported, session):
    from tensorflow_serving.apis import prediction_log_pb2

    path = exported["result"].path / "assets.extra" / "tf_serving_warmup_requests"
    records = list(warmup.read_warmup_records(path))
    assert len(records) == 2
    shapes = []
    for record in records:
        log = prediction_log_pb2.PredictionLog.FromString(record)
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        assert request.model_spec.name == "tiny"
        assert request.model_spec.signature_name == "serving_default"
        image = tf.make_ndarray(request.inputs["images"])
        assert image.dtype == np.uint8 and np.all(image == 128)
        shapes.append(image.shape)
        out = _run_signature(session, "serving_default", {"images": image})
        assert out["semantic"].shape == image.shape[:3] + (3,)
    assert shapes == [(1, 64, 64, 3), (2, 40, 50, 3)]


def test_handmade_prediction_log_equals_protos():
    from tensorflow_serving.apis import prediction_log_pb2

    inputs = {"images": np.arange(24, dtype=np.uint8).reshape(1, 2, 4, 3), "b": np.ones(2)}
    protos = {k: tf.make_tensor_proto(v) for k, v in inputs.items()}
    handmade = warmup._encode_prediction_log("m", "serving_float", protos)
    official = warmup.prediction_log_bytes("m", "serving_float", inputs)
    parse = prediction_log_pb2.PredictionLog.FromString
    assert parse(handmade) == parse(official)
    assert parse(handmade).predict_log.request.model_spec.signature_name == "serving_float"
    with pytest.raises(ValueError, match="`shapes` must be"):
        warmup.write_warmup_requests("/nonexistent", "m", shapes=[(1, 0, 4)])
