"""ServingClient against local stand-ins of TF Serving (REST over http.server, gRPC servicer)."""

from __future__ import annotations

import json
import socket
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import tensorflow as tf

from kerasnuc.fileutil import KerasnucError
from kerasnuc.models.maps import predict_maps_batch
from kerasnuc.postprocess.conic import ConicPostprocConfig
from kerasnuc.runs import load_run
from kerasnuc.serving.client import ServingClient
from kerasnuc.serving.export import read_metadata, save_serving_model
from tests.serving.test_export import make_tiny_run

pytestmark = pytest.mark.slow
TOL = 1e-4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny run exported once, its Keras model and the loaded SavedModel signatures."""
    root = tmp_path_factory.mktemp("client")
    run = load_run(make_tiny_run(root / "run"))
    path = save_serving_model(
        run.model, root / "tiny" / "1", {"name": "tiny", "method": "conic"}, warmup_shapes=None
    )
    loaded = tf.saved_model.load(str(path))
    return {"model": run.model, "path": path, "loaded": loaded, "lock": threading.Lock()}


def _run(served, signature: str, inputs: dict) -> dict[str, np.ndarray]:
    fn = served["loaded"].signatures[signature]
    specs = fn.structured_input_signature[1]
    tensors = {k: tf.constant(np.asarray(v), dtype=specs[k].dtype) for k, v in inputs.items()}
    with served["lock"]:
        return {k: v.numpy() for k, v in fn(**tensors).items()}


def _jsonable(value: np.ndarray):
    if value.dtype.kind in "SO":
        return [v.decode() if isinstance(v, bytes) else v for v in value.tolist()]
    return value.tolist()


class _Handler(BaseHTTPRequestHandler):
    """TF Serving's REST predict / metadata API for the model ``tiny`` (versions: 1)."""

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _model_path(self, suffix: str) -> bool:
        return self.path in (f"/v1/models/tiny{suffix}", f"/v1/models/tiny/versions/1{suffix}")

    def do_GET(self):
        server = self.server
        server.requests.append(self.path)
        if not self._model_path("/metadata"):
            self._send(404, {"error": f"Servable not found for request: {self.path}"})
            return
        sigs = {
            name: {
                "inputs": {
                    k: {"dtype": s.dtype.name} for k, s in fn.structured_input_signature[1].items()
                }
            }
            for name, fn in server.served["loaded"].signatures.items()
        }
        self._send(
            200,
            {
                "model_spec": {"name": "tiny", "signature_name": "", "version": "1"},
                "metadata": {"signature_def": {"signature_def": sigs}},
            },
        )

    def do_POST(self):
        server = self.server
        server.requests.append(self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if server.fail_next > 0:
            server.fail_next -= 1
            self._send(503, {"error": "Too many requests, try again later"})
            return
        if not self._model_path(":predict"):
            self._send(404, {"error": "Servable not found for request: Latest(nope)"})
            return
        signature = body.get("signature_name", "serving_default")
        loaded = server.served["loaded"]
        if signature not in loaded.signatures:
            self._send(400, {"error": f'Serving signature name: "{signature}" not found'})
            return
        names = list(loaded.signatures[signature].structured_input_signature[1])
        if "instances" in body:
            rows = body["instances"]
            if rows and isinstance(rows[0], dict):
                inputs = {k: [r[k] for r in rows] for k in names}
            else:
                inputs = {names[0]: rows}
        else:
            inputs = body["inputs"]
            inputs = inputs if isinstance(inputs, dict) else {names[0]: inputs}
        try:
            out = _run(server.served, signature, inputs)
        except (ValueError, TypeError, tf.errors.OpError) as exc:
            self._send(400, {"error": f"Invalid argument: {exc}"})
            return
        if "instances" in body:
            n = len(next(iter(out.values())))
            if len(out) == 1:
                preds = _jsonable(next(iter(out.values())))
            else:
                preds = [{k: _jsonable(v[i : i + 1])[0] for k, v in out.items()} for i in range(n)]
            self._send(200, {"predictions": preds})
        else:
            cols = {k: _jsonable(v) for k, v in out.items()}
            self._send(200, {"outputs": cols if len(cols) > 1 else next(iter(cols.values()))})


@pytest.fixture(scope="module")
def rest_server(served):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.served, server.requests, server.fail_next = served, [], 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _images(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _assert_maps_equal(got, expected):
    assert sorted(got) == sorted(expected)
    for name, ref in expected.items():
        assert got[name].dtype == np.float32 and got[name].shape == ref.shape
        np.testing.assert_allclose(got[name], ref, atol=TOL, rtol=0)


def test_rest_columnar_uint8_matches_keras(served, rest_server):
    server, url = rest_server
    server.requests.clear()
    images = _images((3, 45, 70, 3), seed=1)
    client = ServingClient(url, "tiny", retries=0)
    got = client.predict_maps_batch(images, batch_size=2)
    _assert_maps_equal(got, predict_maps_batch(served["model"], images))
    assert server.requests == ["/v1/models/tiny:predict"] * 2
    one = client.predict_maps(images[2])
    np.testing.assert_allclose(one["semantic"], got["semantic"][2], atol=TOL, rtol=0)


def test_rest_row_format_float_and_version(served, rest_server):
    server, url = rest_server
    server.requests.clear()
    images = _images((2, 33, 40, 3), seed=2).astype(np.float32) / 255.0
    client = ServingClient(url, "tiny", version=1, request_format="row", retries=0)
    got = client.predict_maps_batch(images)
    _assert_maps_equal(got, predict_maps_batch(served["model"], images))
    assert server.requests == ["/v1/models/tiny/versions/1:predict"]


def test_rest_metadata(served, rest_server):
    _, url = rest_server
    client = ServingClient(url, "tiny", retries=0)
    assert client.metadata() == read_metadata(served["path"]) == {"name": "tiny", "method": "conic"}
    sig = client.signature_metadata()
    assert sig["model_spec"]["name"] == "tiny"
    assert sig["metadata"]["signature_def"]["signature_def"]["serving_default"] == {
        "inputs": {"images": {"dtype": "uint8"}}
    }


def test_postproc_config_from_metadata(rest_server, monkeypatch):
    _, url = rest_server
    client = ServingClient(url, "tiny", retries=0)
    custom = ConicPostprocConfig(fg_threshold=0.3)
    monkeypatch.setattr(
        client, "_metadata", {"method": "conic", "postproc": custom.to_dict()}, raising=True
    )
    assert client.postproc_config() == custom


def test_rest_server_error_is_one_line_and_not_retried(rest_server):
    server, url = rest_server
    server.requests.clear()
    client = ServingClient(url, "nope", retries=3, backoff=0.01)
    with pytest.raises(KerasnucError) as info:
        client.predict_maps_batch(_images((1, 32, 32, 3), seed=0))
    message = str(info.value)
    assert "\n" not in message
    assert "HTTP 404" in message and "Servable not found for request: Latest(nope)" in message
    assert f"{url}/v1/models/nope:predict" in message
    assert server.requests == ["/v1/models/nope:predict"]
    with pytest.raises(KerasnucError, match=r"HTTP 400: Serving signature name: \"bad\""):
        ServingClient(url, "tiny", signature="bad").predict_maps_batch(_images((1, 8, 8, 3), 0))


def test_rest_retries_overloaded_server(served, rest_server):
    server, url = rest_server
    server.requests.clear()
    server.fail_next = 2
    images = _images((1, 32, 32, 3), seed=4)
    got = ServingClient(url, "tiny", retries=2, backoff=0.01).predict_maps_batch(images)
    _assert_maps_equal(got, predict_maps_batch(served["model"], images))
    assert len(server.requests) == 3
    server.fail_next = 5
    with pytest.raises(KerasnucError, match=r"HTTP 503: Too many .* \(gave up after 2 attempts\)"):
        ServingClient(url, "tiny", retries=1, backoff=0.01).predict_maps_batch(images)
    server.fail_next = 0


def test_unreachable_server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ServingClient(f"http://127.0.0.1:{port}", "tiny", retries=1, backoff=0.01)
    with pytest.raises(KerasnucError) as info:
        client.predict_maps_batch(_images((1, 32, 32, 3), seed=0))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"TF Serving http://127.0.0.1:{port}/v1/models/tiny:predict")
    assert "unreachable" in message and "refused" in message.lower()
    assert message.endswith("(gave up after 2 attempts)")


def test_bad_arguments():
    for url in ("localhost:8501", "ftp://host:1", "http://"):
        with pytest.raises(KerasnucError, match="invalid server URL"):
            ServingClient(url, "tiny")
    with pytest.raises(KerasnucError, match="version must be a positive integer"):
        ServingClient("http://h:1", "tiny", version=0)
    with pytest.raises(ValueError, match="`request_format` must be one of"):
        ServingClient("http://h:1", "tiny", request_format="rows")
    with pytest.raises(ValueError, match=r"`images` must have shape \(B, H, W, 3\)"):
        ServingClient("http://h:1", "tiny").predict_maps_batch(np.zeros((4, 4, 3), np.uint8))


@pytest.fixture(scope="module")
def grpc_server(served):
    grpc = pytest.importorskip("grpc")
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            if request.model_spec.name != "tiny":
                context.abort(grpc.StatusCode.NOT_FOUND, "Servable not found for request")
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            out = _run(served, request.model_spec.signature_name or "serving_default", inputs)
            response = predict_pb2.PredictResponse(model_spec=request.model_spec)
            for key, value in out.items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
            return response

        def GetModelMetadata(self, request, context):
            response = get_model_metadata_pb2.GetModelMetadataResponse(
                model_spec=request.model_spec
            )
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            sig_map.signature_def["serving_default"].method_name = "tensorflow/serving/predict"
            response.metadata["signature_def"].Pack(sig_map)
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"grpc://127.0.0.1:{port}"
    server.stop(None)


def test_grpc_maps_metadata_and_errors(served, grpc_server):
    images = _images((2, 40, 36, 3), seed=5)
    client = ServingClient(grpc_server, "tiny", version=1, retries=0)
    _assert_maps_equal(
        client.predict_maps_batch(images), predict_maps_batch(served["model"], images)
    )
    assert client.metadata() == {"name": "tiny", "method": "conic"}
    sig = client.signature_metadata()
    assert sig["model_spec"]["name"] == "tiny"
    assert sig["metadata"]["signature_def"]["signatureDef"]["serving_default"] == {
        "methodName": "tensorflow/serving/predict"
    }
    with pytest.raises(KerasnucError, match="gRPC NOT_FOUND: Servable not found"):
        ServingClient(grpc_server, "nope", retries=0).predict_maps_batch(images)
