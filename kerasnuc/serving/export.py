"""Export a trained run as a TensorFlow Serving SavedModel: ``BASE/NAME/VERSION/``.

The layout is TF Serving's model base path (``saved_models/<name>/<version>/``, integer
versions; the server serves the newest ones according to its version policy). A version is
written to a hidden temporary folder next to its final place and renamed when complete, so a
server polling the base path never sees a half-written model, and an existing version is never
overwritten.

Signatures (all take a batch of same-size images, any batch size, height and width):

``serving_default``
    input ``images``: ``(batch, height, width, 3)`` uint8 RGB. The graph divides by 255, pads
    the bottom/right to a multiple of 32 (:data:`kerasnuc.models.maps.STRIDE`; reflect
    padding, or edge where a side is shorter than its padding, as
    :func:`kerasnuc.models.maps.pad_to_multiple`), runs the model with ``training=False``
    and MC dropout off, and crops every output back to ``(batch, height, width, K)`` float32
    (``semantic``, ``three_label``, ``vectors`` for the ``conic`` method).
``serving_float``
    the same with ``images`` float32 RGB in ``[0, 1]``.
``kerasnuc_metadata``
    input ``request``: ``(n,)`` int32 (any values); output ``metadata``: ``(n,)`` string, each
    the JSON document of ``assets.extra/kerasnuc.json``. It lets a client that only talks to the
    server fetch the classes, colours, resolution and post-processing thresholds.

Files besides the graph: ``assets.extra/kerasnuc.json`` (that metadata) and
``assets.extra/tf_serving_warmup_requests`` (:mod:`kerasnuc.serving.warmup`). ``BASE/models.config``
(TF Serving ``--model_config_file``) is rewritten to list every model under ``BASE``.

The graph holds no XLA-only functions (no ``_XlaMustCompile`` attribute, checked after
writing), so the stock ``tensorflow/serving`` CPU and GPU images and the TF1 session loader can
run it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from kerasnuc.fileutil import KerasnucError, write_text_atomic
from kerasnuc.layers.dropout import set_mc_dropout
from kerasnuc.models.maps import STRIDE
from kerasnuc.runs import LoadedRun, load_run, resolve_model, shareable_config
from kerasnuc.serving.warmup import DEFAULT_WARMUP_SHAPES, write_warmup_requests
from kerasnuc.version import __version__

logger = logging.getLogger(__name__)

SIGNATURE_UINT8 = "serving_default"
SIGNATURE_FLOAT = "serving_float"
SIGNATURE_METADATA = "kerasnuc_metadata"
INPUT_NAME = "images"
METADATA_INPUT = "request"
METADATA_OUTPUT = "metadata"
METADATA_FILE = "kerasnuc.json"
MODELS_CONFIG = "models.config"
FORMAT = "kerasnuc-savedmodel"
FORMAT_VERSION = 1
PADDING_MODES = ("reflect", "edge")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ExportResult:
    """Where an export went.

    Attributes:
        path: the version folder ``BASE/NAME/VERSION``.
        name: model name.
        version: version number.
        metadata: the document written to ``assets.extra/kerasnuc.json``.
    """

    path: Path
    name: str
    version: int
    metadata: dict[str, Any]


def pad_images(images: tf.Tensor, multiple: int = STRIDE, mode: str = "reflect") -> tf.Tensor:
    """Pad ``(B, H, W, C)`` at the bottom/right to multiples of ``multiple`` inside the graph.

    Same result as :func:`kerasnuc.models.maps.pad_to_multiple`: ``"reflect"`` mirrors
    without repeating the edge row/column and falls back to ``"edge"`` (repeat the last
    row/column) when the height or width is not larger than its padding. Implemented as a
    gather with computed indices so it works for unknown ``H, W`` without control flow.

    Args:
        images: ``(B, H, W, C)`` tensor.
        multiple: the network stride.
        mode: ``"reflect"`` or ``"edge"``.

    Returns:
        ``(B, ceil(H / m) * m, ceil(W / m) * m, C)`` tensor.
    """
    if mode not in PADDING_MODES:
        raise ValueError(f"`mode` must be one of {PADDING_MODES}. Received: mode={mode!r}")
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    ph, pw = (-h) % multiple, (-w) % multiple
    reflect = tf.logical_and(tf.greater(h, ph), tf.greater(w, pw))
    if mode == "edge":
        reflect = tf.constant(False)

    def indices(size: tf.Tensor, pad: tf.Tensor) -> tf.Tensor:
        i = tf.range(size + pad)
        mirrored = tf.where(i < size, i, 2 * (size - 1) - i)
        return tf.clip_by_value(tf.where(reflect, mirrored, i), 0, size - 1)

    images = tf.gather(images, indices(h, ph), axis=1)
    return tf.gather(images, indices(w, pw), axis=2)


def _maps_fn(model: keras.Model, padding: str):
    """``float32 (B, H, W, 3) in [0, 1] -> {name: (B, H, W, K) float32}`` graph function."""

    def maps(images: tf.Tensor) -> dict[str, tf.Tensor]:
        h, w = tf.shape(images)[1], tf.shape(images)[2]
        outputs = model(pad_images(images, STRIDE, padding), training=False)
        if not isinstance(outputs, Mapping):
            raise KerasnucError("only models with a dict of named outputs can be exported")
        return {k: tf.cast(v, tf.float32)[:, :h, :w, :] for k, v in outputs.items()}

    return maps


def _output_channels(model: keras.Model) -> dict[str, int]:
    outputs = model.output
    if not isinstance(outputs, Mapping):
        raise KerasnucError("only models with a dict of named outputs can be exported")
    return {k: int(v.shape[-1]) for k, v in outputs.items()}


def export_metadata(
    run: LoadedRun, name: str, version: int, padding: str = "reflect"
) -> dict[str, Any]:
    """The ``kerasnuc.json`` document of an export.

    Keys: ``format``, ``format_version``, ``kerasnuc_version``, ``name``, ``version``,
    ``exported_at`` (UTC ISO 8601), ``method``, ``outputs`` ``{name: channels}``,
    ``signatures`` (inputs/outputs of each signature as text), ``stride``, ``padding``, ``mpp``,
    ``class_names`` ``{"1": name}``, ``class_colours`` ``{"1": [r, g, b]}``, ``postproc`` (the
    method's post-processing config dict), ``run_config`` (the run's ``config.json`` without local
    paths, :func:`~kerasnuc.runs.shareable_config`) and ``source_run`` (the run folder's name).
    """
    channels = _output_channels(run.model)
    maps_out = {k: f"float32 (batch, height, width, {c})" for k, c in channels.items()}
    data = run.config.data.to_dict()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kerasnuc_version": __version__,
        "name": name,
        "version": int(version),
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "method": run.config.method,
        "outputs": channels,
        "signatures": {
            SIGNATURE_UINT8: {
                "inputs": {INPUT_NAME: "uint8 (batch, height, width, 3) RGB 0..255"},
                "outputs": maps_out,
            },
            SIGNATURE_FLOAT: {
                "inputs": {INPUT_NAME: "float32 (batch, height, width, 3) RGB in [0, 1]"},
                "outputs": maps_out,
            },
            SIGNATURE_METADATA: {
                "inputs": {METADATA_INPUT: "int32 (n,)"},
                "outputs": {METADATA_OUTPUT: "string (n,) this JSON document"},
            },
        },
        "stride": STRIDE,
        "padding": padding,
        "mpp": run.config.data.mpp,
        "class_names": data["class_names"],
        "class_colours": data["class_colours"],
        "postproc": run.postproc.to_dict(),
        "run_config": shareable_config(run.config),
        "source_run": Path(run.run_dir).resolve().name,
    }


def save_serving_model(
    model: keras.Model,
    export_dir: str | os.PathLike,
    metadata: Mapping[str, Any],
    padding: str = "reflect",
    warmup_shapes: Sequence[tuple[int, int, int]] | None = DEFAULT_WARMUP_SHAPES,
) -> Path:
    """Write ``model`` as a SavedModel with the serving signatures to a new folder.

    Args:
        model: a Keras model with a dict of named ``(B, H, W, K)`` outputs taking
            ``(B, H, W, 3)`` float32 in ``[0, 1]`` with ``H, W`` multiples of 32. Its MC dropout
            is switched off (and stays off afterwards).
        export_dir: folder to create (must not exist).
        metadata: JSON-serialisable document for ``assets.extra/kerasnuc.json`` and the
            ``kerasnuc_metadata`` signature (``name`` is used in the warm-up requests).
        padding: ``"reflect"`` or ``"edge"`` (see :func:`pad_images`).
        warmup_shapes: ``(batch, height, width)`` of the warm-up requests, or None for none.

    Returns:
        ``Path(export_dir)``.

    Raises:
        KerasnucError: the graph needs XLA (``_XlaMustCompile``), which TF Serving may not run.
    """
    if padding not in PADDING_MODES:
        raise ValueError(f"`padding` must be one of {PADDING_MODES}. Received: padding={padding!r}")
    export_dir = Path(export_dir)
    set_mc_dropout(model, False)
    maps = _maps_fn(model, padding)
    document = json.dumps(metadata, sort_keys=True)

    def serve_uint8(images):
        return maps(tf.cast(images, tf.float32) / 255.0)

    def serve_float(images):
        return maps(tf.cast(images, tf.float32))

    def serve_metadata(request):
        return {METADATA_OUTPUT: tf.fill(tf.shape(request)[:1], tf.constant(document))}

    image_spec = (None, None, None, 3)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SIGNATURE_UINT8, serve_uint8, [tf.TensorSpec(image_spec, tf.uint8, name=INPUT_NAME)]
    )
    archive.add_endpoint(
        SIGNATURE_FLOAT, serve_float, [tf.TensorSpec(image_spec, tf.float32, name=INPUT_NAME)]
    )
    archive.add_endpoint(
        SIGNATURE_METADATA,
        serve_metadata,
        [tf.TensorSpec((None,), tf.int32, name=METADATA_INPUT)],
    )
    archive.write_out(os.fspath(export_dir), verbose=False)

    flagged = xla_functions(export_dir)
    if flagged:
        raise KerasnucError(
            f"{export_dir}: the exported graph requires XLA (_XlaMustCompile in {flagged[:3]}); "
            "TF Serving cannot run it"
        )
    extra = export_dir / "assets.extra"
    extra.mkdir(exist_ok=True)
    (extra / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    if warmup_shapes:
        write_warmup_requests(
            export_dir, str(metadata.get("name", "")), SIGNATURE_UINT8, INPUT_NAME, warmup_shapes
        )
    return export_dir


def xla_functions(export_dir: str | os.PathLike) -> list[str]:
    """Names of the functions of ``saved_model.pb`` marked ``_XlaMustCompile = true``."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(export_dir) / "saved_model.pb").read_bytes())
    flagged = []
    for graph in proto.meta_graphs:
        for fdef in graph.graph_def.library.function:
            attr = fdef.attr.get("_XlaMustCompile")
            if attr is not None and attr.b:
                flagged.append(fdef.signature.name)
    return flagged


def list_versions(model_dir: str | os.PathLike) -> list[int]:
    """Sorted integer version folders of ``BASE/NAME`` (hidden and other folders ignored)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def check_model_name(name: str) -> str:
    """Return ``name`` if it can be a TF Serving model name and a folder name."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise KerasnucError(
            f"invalid model name {name!r}: use letters, digits, '_', '-', '.' "
            "(starting with a letter or digit)"
        )
    return name


def export_run(
    run_dir: str | os.PathLike,
    name: str,
    base: str | os.PathLike = "saved_models",
    version: int | None = None,
    weights: str | os.PathLike | None = None,
    padding: str = "reflect",
    warmup_shapes: Sequence[tuple[int, int, int]] | None = DEFAULT_WARMUP_SHAPES,
    update_models_config: bool = True,
) -> ExportResult:
    """Export a run directory to ``BASE/NAME/VERSION`` for TF Serving.

    Args:
        run_dir: folder written by ``kerasnuc train`` (``config.json``, weights, ``postproc.json``).
        name: model name (the URL path ``/v1/models/NAME``).
        base: TF Serving model base folder.
        version: version number (positive int); default: one more than the highest existing.
        weights: weights file (default ``RUN_DIR/model.weights.h5``).
        padding: in-graph padding mode, ``"reflect"`` or ``"edge"``.
        warmup_shapes: ``(batch, height, width)`` of the warm-up requests (None: no file).
        update_models_config: rewrite ``BASE/models.config`` to list every model under ``BASE``.

    Returns:
        :class:`ExportResult`.

    Raises:
        KerasnucError: bad name or version, version already present, unreadable run.
    """
    check_model_name(name)
    if padding not in PADDING_MODES:
        raise KerasnucError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    model_dir = Path(base) / name
    if version is None:
        version = max(list_versions(model_dir), default=0) + 1
    elif isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise KerasnucError(f"version must be a positive integer, got {version!r}")
    final = model_dir / str(version)
    if final.exists():
        raise KerasnucError(f"{final}: version {version} of {name!r} already exists")

    run = load_run(resolve_model(run_dir), weights)
    metadata = export_metadata(run, name, version, padding)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    try:
        save_serving_model(run.model, tmp / "export", metadata, padding, warmup_shapes)
        if final.exists():
            raise KerasnucError(f"{final}: version {version} of {name!r} already exists")
        os.rename(tmp / "export", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s as %s version %d to %s", run.run_dir, name, version, final)
    if update_models_config:
        write_models_config(base)
    return ExportResult(final, name, version, metadata)


def read_metadata(export_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``assets.extra/kerasnuc.json`` document of an export folder.

    Raises:
        KerasnucError: missing or malformed file.
    """
    path = Path(export_dir) / "assets.extra" / METADATA_FILE
    if not path.is_file():
        raise KerasnucError(f"{path}: missing (not a kerasnuc export?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise KerasnucError(f"{path}: invalid JSON ({exc})") from exc


def models_config_text(
    names: Sequence[str], container_base: str = "/models", num_versions: int = 2
) -> str:
    """A TF Serving ``--model_config_file`` (``ModelServerConfig`` text proto).

    Every model ``NAME`` gets ``base_path: "<container_base>/NAME"`` and the version policy
    ``latest { num_versions: N }`` (the newest ``N`` versions are served; clients pick one with
    ``/versions/V``, the newest otherwise).
    """
    if num_versions < 1:
        raise ValueError(f"`num_versions` must be >= 1. Received: num_versions={num_versions}")
    lines = ["model_config_list {"]
    for name in names:
        check_model_name(name)
        lines += [
            "  config {",
            f'    name: "{name}"',
            f'    base_path: "{container_base.rstrip("/")}/{name}"',
            '    model_platform: "tensorflow"',
            "    model_version_policy {",
            "      latest {",
            f"        num_versions: {int(num_versions)}",
            "      }",
            "    }",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_models_config(
    base: str | os.PathLike, container_base: str = "/models", num_versions: int = 2
) -> Path:
    """Write ``BASE/models.config`` listing every model folder under ``BASE`` with a version.

    Returns:
        The path of the file.
    """
    base = Path(base)
    names = sorted(
        p.name for p in base.iterdir() if p.is_dir() and _NAME_RE.match(p.name) and list_versions(p)
    )
    path = base / MODELS_CONFIG
    write_text_atomic(path, models_config_text(names, container_base, num_versions))
    return path
