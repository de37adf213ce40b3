"""int8 graphs: integer convolutions, the float graph's metadata, close maps; calibration crops."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kerasnuc.fileutil import KerasnucError
from tests.serving.tiny_models import tiny_conic_model

onnx = pytest.importorskip("onnx", reason="quantization needs the onnx package")
ort = pytest.importorskip("onnxruntime", reason="quantization needs onnxruntime")

from kerasnuc.serving.onnx import WEIGHTS_DIGEST_KEY, export_onnx  # noqa: E402
from kerasnuc.serving.quantize import calibration_crops, quantize_graph  # noqa: E402


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": x}), strict=True))


@pytest.fixture(scope="module")
def float_graph(tmp_path_factory):
    model = tiny_conic_model(randomise=False)
    path = tmp_path_factory.mktemp("q") / "model.onnx"
    return export_onnx(model, path, metadata={WEIGHTS_DIGEST_KEY: "abc"})


def _smooth_images(n, rng, size=64):
    """Images with structure (blurred noise), as calibration and test inputs."""
    x = rng.random((n, size // 8, size // 8, 3)).astype(np.float32)
    return np.repeat(np.repeat(x, 8, axis=1), 8, axis=2)


def test_int8_graph_has_integer_convolutions_and_close_maps(float_graph, tmp_path):
    rng = np.random.default_rng(0)
    crops = [c[None] for c in _smooth_images(6, rng)]
    path = quantize_graph(float_graph, tmp_path / "model.int8.onnx", crops)
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 10  # the convolution kernels are stored as int8
    assert {p.key: p.value for p in proto.metadata_props} == {WEIGHTS_DIGEST_KEY: "abc"}
    x = _smooth_images(2, np.random.default_rng(1))
    exact, rounded = _run(float_graph, x), _run(path, x)
    for name in ("semantic", "three_label"):
        # softmax outputs of a random-init model (near 1 / K): the rounding moves them by far
        # less than their range (the trained model's nuclei: tests/inference)
        diff = np.abs(exact[name] - rounded[name])
        assert diff.mean() < 0.05, (name, diff.mean())
    with pytest.raises(KerasnucError, match="at least one calibration crop"):
        quantize_graph(float_graph, tmp_path / "none.onnx", [])


def test_calibration_crops_are_seeded_crops_of_the_train_split(shared_data, tmp_path):
    consep = shared_data / "consep"
    a = calibration_crops([consep], crops_per_dataset=3, size=64, seed=5)
    b = calibration_crops([consep], crops_per_dataset=3, size=64, seed=5)
    c = calibration_crops([consep], crops_per_dataset=3, size=64, seed=6)
    assert len(a) == 3 and all(x.shape == (1, 64, 64, 3) and x.dtype == np.float32 for x in a)
    assert all(0.0 <= x.min() and x.max() <= 1.0 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "meta.json").write_text(json.dumps({"name": "empty"}))
    (empty / "splits.csv").write_text("id,split\n")
    with pytest.raises(KerasnucError, match="no images in split 'train'"):
        calibration_crops([empty])
