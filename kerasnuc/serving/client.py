"""Client of a TensorFlow Serving server running a ``kerasnuc export`` model.

:class:`ServingClient` is a drop-in for running the model locally:
:meth:`ServingClient.predict_maps_batch` has the contract of
:func:`kerasnuc.models.maps.predict_maps_batch` (images in, ``{name: (B, H, W, K) float32}``
probability maps at the input size out), so the existing post-processing consumes its output,
and :meth:`ServingClient.metadata` returns the export's ``kerasnuc.json`` (method, classes,
colours, resolution, post-processing thresholds), so no run directory is needed.

Protocols (picked by the URL scheme):

* ``http://host:8501`` / ``https://...``: the REST API (TF Serving "RESTful API" guide).
  ``POST /v1/models/NAME[/versions/N]:predict`` with the columnar body
  ``{"signature_name": S, "inputs": {"images": [...]}}`` (answer ``{"outputs": ...}``) or the row
  body ``{"signature_name": S, "instances": [...]}`` (answer ``{"predictions": [...]}``);
  ``GET /v1/models/NAME[/versions/N]/metadata`` for the signatures; errors come as an HTTP
  status with ``{"error": "..."}``. Only the standard library is used.
* ``grpc://host:8500``: the gRPC ``PredictionService`` (needs ``tensorflow-serving-api`` and
  ``grpcio``: ``pip install kerasnuc[serving]``). Message size limits are lifted, since one
  ``1000 x 1000`` image gives about 50 MB of float32 maps.

Failures to connect, timeouts and HTTP 502/503/504 (gRPC ``UNAVAILABLE``,
``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``) are retried ``retries`` times with exponential
backoff (``backoff * 2**attempt`` seconds); then, and for every other server error, a
one-line :class:`~kerasnuc.fileutil.KerasnucError` names the server, the HTTP status (or gRPC
code) and the server's message.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from kerasnuc.fileutil import KerasnucError

logger = logging.getLogger(__name__)

SIGNATURE_UINT8 = "serving_default"
SIGNATURE_FLOAT = "serving_float"
SIGNATURE_METADATA = "kerasnuc_metadata"
INPUT_NAME = "images"
REQUEST_FORMATS = ("columnar", "row")
_RETRY_HTTP = (502, 503, 504)
_RETRY_GRPC = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
_T = TypeVar("_T")


class _Retryable(Exception):
    """An attempt failed in a way worth retrying (carries the final error message)."""


def _decode_value(value: Any) -> Any:
    """Undo TF Serving's JSON encoding of binary strings (``{"b64": ...}``)."""
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    return value


def _as_array(value: Any) -> np.ndarray:
    value = _decode_value(value)
    array = np.asarray(value)
    if array.dtype.kind in "iuf":
        return array.astype(np.float32)
    return array


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ServingClient:
    """Probability maps and metadata from a TF Serving model over REST or gRPC.

    Args:
        url: server address with scheme: ``http://host:8501`` (REST) or ``grpc://host:8500``.
        model_name: TF Serving model name (``kerasnuc export --name``).
        version: model version (None: the newest one the server has loaded).
        signature: signature of uint8 images (``serving_default``).
        float_signature: signature of float32 images in ``[0, 1]`` (``serving_float``).
        timeout: seconds per request.
        retries: extra attempts after a connection failure or an overloaded server.
        backoff: seconds before the first retry; doubles after every attempt.
        request_format: REST body, ``"columnar"`` (``{"inputs": ...}``) or ``"row"``
            (``{"instances": ...}``); ignored for gRPC.

    Raises:
        KerasnucError: bad URL, or gRPC requested without ``tensorflow-serving-api``.
    """

    def __init__(
        self,
        url: str,
        model_name: str,
        version: int | None = None,
        signature: str = SIGNATURE_UINT8,
        float_signature: str = SIGNATURE_FLOAT,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        request_format: str = "columnar",
    ):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https", "grpc") or not parsed.netloc:
            raise KerasnucError(
                f"invalid server URL {url!r}: expected http://HOST:PORT (REST) or "
                "grpc://HOST:PORT (gRPC)"
            )
        if version is not None and (isinstance(version, bool) or int(version) < 1):
            raise KerasnucError(f"version must be a positive integer, got {version!r}")
        if request_format not in REQUEST_FORMATS:
            raise ValueError(
                f"`request_format` must be one of {REQUEST_FORMATS}. "
                f"Received: request_format={request_format!r}"
            )
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(
                "`timeout` must be > 0 and `retries`, `backoff` >= 0. Received: "
                f"timeout={timeout}, retries={retries}, backoff={backoff}"
            )
        self.url = url.rstrip("/")
        self.protocol = "grpc" if parsed.scheme == "grpc" else "rest"
        self.model_name = model_name
        self.version = None if version is None else int(version)
        self.signature = signature
        self.float_signature = float_signature
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.request_format = request_format
        self._target = parsed.netloc
        self._stub = None
        self._metadata: dict[str, Any] | None = None
        if self.protocol == "grpc":
            self._stub = self._grpc_stub()

    # -- public API -----------------------------------------------------------------------

    def predict(
        self, inputs: Mapping[str, np.ndarray], signature: str | None = None
    ) -> dict[str, np.ndarray]:
        """Run one signature on named input arrays.

        Args:
            inputs: ``{input name: array}`` (batch-major).
            signature: signature name (default: the client's uint8 signature).

        Returns:
            ``{output name: array}`` (numbers as float32, strings as ``bytes``/``str``).

        Raises:
            KerasnucError: the server is unreachable or answers with an error.
        """
        signature = signature or self.signature
        inputs = {k: np.asarray(v) for k, v in inputs.items()}
        if self.protocol == "grpc":
            return self._with_retries(lambda: self._grpc_predict(inputs, signature))
        return self._with_retries(lambda: self._rest_predict(inputs, signature))

    def predict_maps_batch(self, images: np.ndarray, batch_size: int = 4) -> dict[str, np.ndarray]:
        """Probability maps of a batch of same-size images (one request per ``batch_size``).

        Same contract as :func:`kerasnuc.models.maps.predict_maps_batch`; the padding to a
        multiple of 32 and the crop happen in the served graph.

        Args:
            images: ``(B, H, W, 3)`` uint8 (sent to ``signature``), or float in ``[0, 1]`` (sent
                as float32 to ``float_signature``).
            batch_size: images per request.

        Returns:
            ``{output name: (B, H, W, K) float32}`` at the input size.
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"`images` must have shape (B, H, W, 3). Received: shape={images.shape}"
            )
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
        if images.dtype == np.uint8:
            signature = self.signature
        else:
            images, signature = images.astype(np.float32), self.float_signature
        h, w = images.shape[1:3]
        parts: dict[str, list[np.ndarray]] = {}
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            out = self.predict({INPUT_NAME: chunk}, signature)
            for name, value in out.items():
                value = np.asarray(value, dtype=np.float32)
                if value.ndim != 4 or value.shape[0] != len(chunk):
                    raise KerasnucError(
                        f"{self._endpoint('predict')}: output {name!r} has shape {value.shape}, "
                        f"expected ({len(chunk)}, {h}, {w}, K)"
                    )
                # A batching server may pad inputs to a common size: crop back to ours.
                parts.setdefault(name, []).append(value[:, :h, :w, :])
        return {k: np.concatenate(v) for k, v in parts.items()}

    def predict_maps(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Probability maps ``{name: (H, W, K) float32}`` of one ``(H, W, 3)`` image."""
        out = self.predict_maps_batch(np.asarray(image)[None], batch_size=1)
        return {k: v[0] for k, v in out.items()}

    def metadata(self) -> dict[str, Any]:
        """The export's ``kerasnuc.json`` (from the ``kerasnuc_metadata`` signature; cached).

        Keys include ``method``, ``outputs``, ``class_names``, ``class_colours``, ``mpp``,
        ``postproc`` and ``run_config`` (see :func:`kerasnuc.serving.export.export_metadata`).
        """
        if self._metadata is None:
            out = self.predict({"request": np.zeros((1,), np.int32)}, SIGNATURE_METADATA)
            value = np.asarray(out["metadata"]).reshape(-1)[0]
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            try:
                self._metadata = json.loads(text)
            except json.JSONDecodeError as exc:
                raise KerasnucError(
                    f"{self._endpoint('predict')}: invalid kerasnuc metadata ({exc})"
                ) from exc
        return self._metadata

    def signature_metadata(self) -> dict[str, Any]:
        """The server's model metadata (``GET /v1/models/NAME[/versions/N]/metadata``).

        Returns:
            The JSON answer as a dict (``{"model_spec": ..., "metadata": {"signature_def":
            ...}}``); for gRPC the ``GetModelMetadataResponse`` converted to the same shape.
        """
        if self.protocol == "grpc":
            return self._with_retries(self._grpc_metadata)
        return self._with_retries(lambda: self._rest_call("metadata", None))

    def postproc_config(self):
        """The post-processing config of the served model (its method's config class)."""
        from kerasnuc.registry import get_method

        meta = self.metadata()
        return get_method(meta["method"]).postproc_config.from_dict(meta["postproc"])

    # -- retries --------------------------------------------------------------------------

    def _with_retries(self, attempt: Callable[[], _T]) -> _T:
        for i in range(self.retries + 1):
            try:
                return attempt()
            except _Retryable as exc:
                if i == self.retries:
                    tries = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
                    raise KerasnucError(f"{exc} (gave up after {tries})") from None
                delay = self.backoff * 2**i
                logger.warning("%s; retrying in %.2f s", exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- REST -----------------------------------------------------------------------------

    def _endpoint(self, verb: str) -> str:
        path = f"/v1/models/{urllib.parse.quote(self.model_name, safe='')}"
        if self.version is not None:
            path += f"/versions/{self.version}"
        if self.protocol == "grpc":
            return f"{self.url} ({self.model_name}, {verb})"
        return self.url + path + (f":{verb}" if verb == "predict" else f"/{verb}")

    def _rest_call(self, verb: str, body: dict[str, Any] | None) -> dict[str, Any]:
        url = self._endpoint(verb)
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(
            url,
            data=data,
            method="GET" if data is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            message = self._error_message(exc)
            text = f"TF Serving {url}: HTTP {exc.code}: {message}"
            if exc.code in _RETRY_HTTP:
                raise _Retryable(text) from None
            raise KerasnucError(text) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(f"TF Serving {url}: unreachable ({_one_line(reason)})") from None
        try:
            return json.loads(payload)
        except json.JSONDecodeError as exc:
            raise KerasnucError(f"TF Serving {url}: answer is not JSON ({exc})") from None

    @staticmethod
    def _error_message(exc: urllib.error.HTTPError) -> str:
        try:
            raw = exc.read().decode("utf-8", "replace")
        except OSError:
            raw = ""
        try:
            parsed = json.loads(raw)
            if isinstance(parsed, dict) and "error" in parsed:
                return _one_line(parsed["error"])
        except json.JSONDecodeError:
            pass
        return _one_line(raw or exc.reason)

    def _rest_predict(self, inputs: dict[str, np.ndarray], signature: str) -> dict[str, Any]:
        if self.request_format == "columnar":
            body = {
                "signature_name": signature,
                "inputs": {k: v.tolist() for k, v in inputs.items()},
            }
        elif len(inputs) == 1:
            body = {"signature_name": signature, "instances": next(iter(inputs.values())).tolist()}
        else:
            n = len(next(iter(inputs.values())))
            rows = [{k: v[i].tolist() for k, v in inputs.items()} for i in range(n)]
            body = {"signature_name": signature, "instances": rows}
        answer = self._rest_call("predict", body)
        if "outputs" in answer:
            outputs = answer["outputs"]
            if not isinstance(outputs, dict):
                outputs = {self._single_output(signature): outputs}
            return {k: _as_array(v) for k, v in outputs.items()}
        if "predictions" in answer:
            rows = answer["predictions"]
            if rows and isinstance(rows[0], dict):
                return {k: _as_array([row[k] for row in rows]) for k in rows[0]}
            return {self._single_output(signature): _as_array(rows)}
        raise KerasnucError(
            f"TF Serving {self._endpoint('predict')}: answer has neither 'outputs' nor "
            f"'predictions' (keys: {sorted(answer)})"
        )

    @staticmethod
    def _single_output(signature: str) -> str:
        # TF Serving drops the output name when a signature has a single output.
        return "metadata" if signature == SIGNATURE_METADATA else "output"

    # -- gRPC -----------------------------------------------------------------------------

    def _grpc_stub(self):
        try:
            import grpc
            from tensorflow_serving.apis import prediction_service_pb2_grpc
        except ImportError as exc:
            raise KerasnucError(
                f"gRPC needs tensorflow-serving-api and grpcio (pip install kerasnuc[serving]): "
                f"{exc}"
            ) from exc
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        channel = grpc.insecure_channel(self._target, options=options)
        return prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def _model_spec(self, spec, signature: str | None) -> None:
        spec.name = self.model_name
        if signature is not None:
            spec.signature_name = signature
        if self.version is not None:
            spec.version.value = self.version

    def _grpc_error(self, exc, verb: str):
        code = exc.code().name if hasattr(exc, "code") and exc.code() else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        text = f"TF Serving {self._endpoint(verb)}: gRPC {code}: {_one_line(details)}"
        if code in _RETRY_GRPC:
            return _Retryable(text)
        return KerasnucError(text)

    def _grpc_predict(self, inputs: dict[str, np.ndarray], signature: str) -> dict[str, Any]:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec, signature)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        try:
            response = self._stub.Predict(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._grpc_error(exc, "predict") from None
        out = {}
        for key, proto in response.outputs.items():
            array = tf.make_ndarray(proto)
            out[key] = array.astype(np.float32) if array.dtype.kind in "iuf" else array
        return out

    def _grpc_metadata(self) -> dict[str, Any]:
        import grpc
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._model_spec(request.model_spec, None)
        try:
            response = self._stub.GetModelMetadata(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._grpc_error(exc, "metadata") from None
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {
            "model_spec": json_format.MessageToDict(response.model_spec),
            "metadata": {"signature_def": json_format.MessageToDict(signature_map)},
        }
