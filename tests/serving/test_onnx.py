"""Keras -> ONNX: the graph computes what the Keras model computes, or refuses to be written."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasnuc.fileutil import KerasnucError
from kerasnuc.layers.resize import ResizeLike
from kerasnuc.models.conic import build_conic
from tests.serving.tiny_models import randomise_batch_norm, tiny_conic_model

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
ort = pytest.importorskip("onnxruntime", reason="running the graphs needs onnxruntime")

from kerasnuc.serving.onnx import (  # noqa: E402 - after the skips
    WEIGHTS_DIGEST_KEY,
    export_onnx,
    keras_to_onnx,
    weights_digest,
)


def _run(proto, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": x}), strict=True))


@pytest.fixture(scope="module")
def tiny_conic():
    return tiny_conic_model()


@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 96, 160)])
def test_graph_matches_the_keras_model_at_any_size(tiny_conic, shape):
    # Dynamic height and width: one graph, two sizes; stride-2 "same" convolutions, ReLU6,
    # depthwise convolutions, batch norm, nearest upsampling and the bilinear ResizeLike.
    x = np.random.default_rng(2).random((*shape, 3), dtype=np.float32)
    expected = {k: np.asarray(v) for k, v in tiny_conic(x, training=False).items()}
    got = _run(keras_to_onnx(tiny_conic), x)
    assert set(got) == {"semantic", "three_label", "vectors"}
    for name, value in expected.items():
        assert got[name].shape == value.shape
        np.testing.assert_allclose(got[name], value, atol=2e-5, rtol=0)
    np.testing.assert_allclose(got["semantic"].sum(-1), 1.0, atol=1e-5)  # softmax on channels


def test_efficientnet_b0_encoder_with_squeeze_excitation():
    # B0: input normalisation, asymmetric zero padding, SiLU, squeeze-and-excitation (global
    # pooling, reshape, multiply): the default encoder of `kerasnuc train --method conic`.
    keras.utils.set_random_seed(0)
    model = build_conic("efficientnet_b0", num_classes=2, decoder_filters=(8, 8, 8, 8, 8))
    rng = np.random.default_rng(4)
    randomise_batch_norm(model, rng)
    norms = [l for l in model._flatten_layers() if isinstance(l, keras.layers.Normalization)]
    assert norms and np.abs(keras.ops.convert_to_numpy(norms[0].mean)).max() > 0.1  # ImageNet
    x = rng.random((1, 96, 64, 3), dtype=np.float32)
    expected = {k: np.asarray(v) for k, v in model(x, training=False).items()}
    got = _run(keras_to_onnx(model), x)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=2e-5, rtol=0)


def test_float16_weights_are_the_model_with_weights_rounded_to_float16(tiny_conic, tmp_path):
    x = np.random.default_rng(3).random((1, 64, 96, 3), dtype=np.float32)
    path = export_onnx(tiny_conic, tmp_path / "m.onnx", float16_weights=True, metadata={"k": "v"})
    proto = onnx.load(str(path))
    big = [t for t in proto.graph.initializer if np.prod(t.dims) > 1]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert {p.key: p.value for p in proto.metadata_props} == {"k": "v"}
    rounded = keras.models.clone_model(tiny_conic)
    rounded.set_weights([w.astype(np.float16).astype(np.float32) for w in tiny_conic.get_weights()])
    expected = {k: np.asarray(v) for k, v in rounded(x, training=False).items()}
    got = _run(proto, x)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=2e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left


def test_resize_like_is_half_pixel_bilinear():
    # A 2x2 map resized to 4x4 with half-pixel centres: the source coordinate of output
    # pixel i is (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
    image = keras.Input((None, None, 1))
    model = keras.Model([image], ResizeLike()(image, keras.layers.UpSampling2D(2)(image)))
    x = np.array([0.0, 4.0, 8.0, 12.0], np.float32).reshape(1, 2, 2, 1)
    got = _run(keras_to_onnx(model), x)["output"][0, ..., 0]
    row = np.array([0.0, 1.0, 3.0, 4.0])  # 0, 4 interpolated at 0, .25, .75, 1
    expected = row[None, :] + 2 * row[:, None]  # rows step by 8 between source rows
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_unsupported_layers_are_refused_by_name():
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.LayerNormalization(name="ln")(x))
    with pytest.raises(KerasnucError, match="ln"):
        keras_to_onnx(model)
    model = keras.Model(
        inputs, keras.layers.UpSampling2D(2, interpolation="bilinear", name="up")(x)
    )
    with pytest.raises(KerasnucError, match="up"):
        keras_to_onnx(model)
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, activation="elu", name="elu_conv")(x))
    with pytest.raises(KerasnucError, match="elu"):
        keras_to_onnx(model)


def test_weights_digest_is_the_sha256_of_the_file(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    # SHA-256("abc"), FIPS 180-2 appendix B.1.
    assert weights_digest(path) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert WEIGHTS_DIGEST_KEY == "kerasnuc_weights_sha256"
