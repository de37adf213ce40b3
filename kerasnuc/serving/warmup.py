"""TF Serving warm-up requests: ``assets.extra/tf_serving_warmup_requests``.

TensorFlow Serving replays the records of this file (a TFRecord of ``PredictionLog`` protos)
when it loads a version, before it marks the version available, so the first client request
does not pay for graph initialisation and memory allocation (TF Serving guide "SavedModel
Warmup"). Each record holds a ``PredictLog`` whose ``PredictRequest`` feeds the ``images``
input of a signature with a blank image.

The records are built with the ``tensorflow-serving-api`` protos when that package is installed
(``pip install kerasnuc[serving]``); otherwise they are encoded here field by field from the
same ``.proto`` definitions (``prediction_log.proto``, ``predict.proto``, ``model.proto``), so
an export never depends on the optional package. Both paths give the same bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

#: File name TF Serving looks for under ``<version>/assets.extra/``.
WARMUP_FILE = "tf_serving_warmup_requests"
#: ``(batch, height, width)`` of the default warm-up requests.
DEFAULT_WARMUP_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 256, 256),)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _encode_prediction_log(model_name: str, signature_name: str, inputs: dict[str, Any]) -> bytes:
    """Serialise ``PredictionLog{predict_log{request{model_spec, inputs}}}`` by hand.

    Field numbers: ``PredictionLog.predict_log = 6``, ``PredictLog.request = 1``,
    ``PredictRequest.model_spec = 1``, ``PredictRequest.inputs = 2`` (map entries with
    ``key = 1``, ``value = 2``), ``ModelSpec.name = 1``, ``ModelSpec.signature_name = 3``.
    """
    spec = _field(1, model_name.encode()) + _field(3, signature_name.encode())
    request = _field(1, spec)
    for key in sorted(inputs):
        entry = _field(1, key.encode()) + _field(2, inputs[key].SerializeToString())
        request += _field(2, entry)
    return _field(6, _field(1, request))


def prediction_log_bytes(
    model_name: str, signature_name: str, inputs: dict[str, np.ndarray]
) -> bytes:
    """One serialised ``PredictionLog`` holding a predict request.

    Args:
        model_name: ``ModelSpec.name`` (TF Serving ignores it for warm-up; informative).
        signature_name: signature the request runs.
        inputs: ``{input name: array}``; each becomes a ``TensorProto``.

    Returns:
        The serialised proto.
    """
    protos = {k: tf.make_tensor_proto(np.asarray(v)) for k, v in inputs.items()}
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
    except ImportError:
        return _encode_prediction_log(model_name, signature_name, protos)
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature_name)
    )
    for key in sorted(protos):
        request.inputs[key].CopyFrom(protos[key])
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    return log.SerializeToString(deterministic=True)


def write_warmup_requests(
    export_dir: str | os.PathLike,
    model_name: str,
    signature_name: str = "serving_default",
    input_name: str = "images",
    shapes: Sequence[tuple[int, int, int]] = DEFAULT_WARMUP_SHAPES,
    dtype: str = "uint8",
) -> str:
    """Write ``EXPORT_DIR/assets.extra/tf_serving_warmup_requests``.

    Args:
        export_dir: a SavedModel version folder.
        model_name: model name recorded in the requests.
        signature_name: signature to warm up.
        input_name: the signature's image input.
        shapes: ``(batch, height, width)`` of each request; the images are mid-grey
            ``(batch, height, width, 3)`` arrays of ``dtype``.
        dtype: ``"uint8"`` (0..255) or ``"float32"`` ([0, 1]).

    Returns:
        The path of the written file.
    """
    if not shapes or not all(len(s) == 3 and all(int(d) > 0 for d in s) for s in shapes):
        raise ValueError(
            "`shapes` must be a non-empty list of (batch, height, width) positive ints. "
            f"Received: shapes={shapes!r}"
        )
    if dtype not in ("uint8", "float32"):
        raise ValueError(f"`dtype` must be 'uint8' or 'float32'. Received: dtype={dtype!r}")
    folder = os.path.join(os.fspath(export_dir), "assets.extra")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, WARMUP_FILE)
    fill = 128 if dtype == "uint8" else 0.5
    with tf.io.TFRecordWriter(path) as writer:
        for batch, height, width in shapes:
            image = np.full((int(batch), int(height), int(width), 3), fill, dtype=dtype)
            writer.write(prediction_log_bytes(model_name, signature_name, {input_name: image}))
    logger.debug("wrote %d warm-up request(s) to %s", len(shapes), path)
    return path


def read_warmup_records(path: str | os.PathLike) -> Iterable[bytes]:
    """The serialised ``PredictionLog`` records of a warm-up file (parse them with the protos)."""
    for record in tf.data.TFRecordDataset(os.fspath(path)).as_numpy_iterator():
        yield bytes(record)
