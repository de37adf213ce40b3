"""Prediction with onnxruntime from a run's ``model.onnx``: no TensorFlow, no Keras.

A new ``kerasnuc predict`` process spent most of a small job before its first tile: importing
TensorFlow, building the Keras model and tracing its first call. A model folder that holds
``model.onnx`` (written by :func:`kerasnuc.serving.onnx.export_onnx`: ``kerasnuc models pack``,
``kerasnuc models onnx``; the bundled models have one) is run by onnxruntime instead:
the session loads in a fraction of a second and the forward pass gives the Keras model's maps
(equal within float rounding, see the tests). Everything after the model (tiling,
post-processing, measurements, writers) is the same code as with Keras.

The graph records the SHA-256 of the weights file it was made from; a folder whose weights
changed since (trained on, or copied with other weights) is refused with a message, never run
with stale weights. This path covers prediction of the ``conic`` method, with the run's
flip / rotation views (:mod:`kerasnuc.models.views`) but no stochastic test-time augmentation,
no ensembles and no MC dropout; the :class:`~kerasnuc.inference.predictor.Predictor` does the
rest.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.config import RunConfig, check_onnx_precision, check_views
from kerasnuc.fileutil import KerasnucError
from kerasnuc.models.maps import crop_maps, pad_to_multiple
from kerasnuc.models.views import average_views
from kerasnuc.postprocess.common import PostprocResult
from kerasnuc.postprocess.conic import ConicPostprocConfig, postprocess_conic
from kerasnuc.serving.onnx import ONNX_FILE, WEIGHTS_DIGEST_KEY, weights_digest
from kerasnuc.serving.quantize import INT8_FILE

WEIGHTS_FILE = "model.weights.h5"
POSTPROC_FILE = "postproc.json"

METHODS = ("conic",)
"""Methods whose models and post-processing this path runs."""

ENGINES = ("auto", "onnx", "keras")
"""What runs a model: onnxruntime where it can (auto), onnxruntime, or Keras/TensorFlow."""


def onnxruntime_available() -> bool:
    """Whether onnxruntime can be imported (it is a dependency; a broken install may lack it)."""
    return importlib.util.find_spec("onnxruntime") is not None


#: CPU flags (Linux ``/proc/cpuinfo``) of the int8 dot-product instructions.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX-512 VNNI, AVX-VNNI or AMX-INT8), read from
    ``/proc/cpuinfo``; False where that file is missing (other systems).

    Without VNNI, onnxruntime multiplies uint8 activations by int8 weights with instructions
    whose 16-bit pair sums can saturate (its quantization documentation), so a model's int8
    setting is applied only with VNNI; ``--precision int8`` forces it.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(VNNI_FLAGS & set(line.split(":", 1)[-1].split()))
    return False


def graph_file(run_dir: str | os.PathLike, precision: str | None = None) -> Path:
    """The graph onnxruntime runs for ``run_dir``: ``model.int8.onnx`` for ``"int8"``,
    ``model.onnx`` for ``"float32"``; None: the run's ``inference.onnx_precision``, where the
    folder has the int8 graph and the CPU has VNNI (:func:`cpu_has_vnni`), else ``model.onnx``."""
    run_dir = Path(run_dir)
    if precision is not None:
        check_onnx_precision(precision)
        return run_dir / (INT8_FILE if precision == "int8" else ONNX_FILE)
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        wanted = (config.get("inference") or {}).get("onnx_precision", "float32")
    except (OSError, ValueError, AttributeError):
        wanted = "float32"
    if wanted == "int8" and (run_dir / INT8_FILE).is_file() and cpu_has_vnni():
        return run_dir / INT8_FILE
    return run_dir / ONNX_FILE


def onnx_unusable_reason(
    run_dir: str | os.PathLike, tta: int = 0, precision: str | None = None
) -> str | None:
    """Why ``run_dir`` cannot be predicted with onnxruntime, or None when it can.

    Reads only small files (the run config, the graph's metadata is checked when loading).
    """
    run_dir = Path(run_dir)
    if tta > 1:
        return "test-time augmentation runs with Keras"
    graph = graph_file(run_dir, precision)
    if not graph.is_file():
        how = "kerasnuc models onnx RUN_DIR"
        if graph.name == INT8_FILE:
            how += " --int8-data DIR"
        return f"{graph} does not exist ({how} writes it)"
    if not (run_dir / POSTPROC_FILE).is_file():
        return f"{run_dir / POSTPROC_FILE} does not exist"
    try:
        method = json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("method")
    except (OSError, ValueError, AttributeError):
        return f"{run_dir / 'config.json'} is unreadable"
    if method not in METHODS:
        return f"method {method!r} runs with Keras"
    if not onnxruntime_available():
        return "onnxruntime is not installed"
    return None


class _ConicPostprocess:
    """The ``conic`` post-processing as the registry's ``Method.postprocess`` calls it."""

    name = "conic"

    @staticmethod
    def postprocess(maps: dict[str, np.ndarray], config: ConicPostprocConfig) -> PostprocResult:
        return postprocess_conic(maps.get("semantic"), maps["three_label"], config)


class OnnxPredictor:
    """A run folder's ``model.onnx`` + post-processing: the predictor of ``kerasnuc predict``
    without TensorFlow (the interface of :class:`~kerasnuc.inference.predictor.Predictor` that
    :mod:`kerasnuc.inference.job` uses).

    Args:
        session: an ``onnxruntime.InferenceSession`` of the graph.
        postproc: the post-processing settings.
        data_config: the run's :class:`~kerasnuc.config.DataConfig` (resolution, cell types).
        batch_size: tiles per call of :meth:`predict_maps_batch` as the job batches them (the
            graph itself runs one tile at a time).
        digest: SHA-256 of the graph file (the predictor's fingerprint).
        views: flips / rotations of each tile averaged (1, 2, 4 or 8; see
            :func:`kerasnuc.models.views.average_views`), as the Keras predictor's ``views``.
        precision: which graph the session holds (``"float32"`` or ``"int8"``), for the
            fingerprint.
    """

    tta = 0
    engine = "onnxruntime"

    def __init__(
        self,
        session: Any,
        postproc: ConicPostprocConfig,
        data_config: Any,
        batch_size: int = 8,
        digest: str = "",
        views: int = 1,
        precision: str = "float32",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
        self.session = session
        self.method = _ConicPostprocess()
        self.postproc = postproc
        self.data_config = data_config
        self.batch_size = int(batch_size)
        self.digest = digest
        self.views = check_views(views)
        self.precision = check_onnx_precision(precision)
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_name = session.get_inputs()[0].name

    @classmethod
    def from_run_dir(
        cls,
        run_dir: str | os.PathLike,
        batch_size: int = 8,
        threads: int | None = None,
        views: int | None = None,
        precision: str | None = None,
    ) -> OnnxPredictor:
        """Load ``run_dir/model.onnx`` with its run config and post-processing.

        Args:
            run_dir: a run or bundled-model folder with ``model.onnx``.
            batch_size: tiles per forward pass.
            threads: onnxruntime intra-op threads (None: onnxruntime's default, the cores).
            views: views averaged per tile; None: the run's ``inference.views``.
            precision: ``"float32"`` or ``"int8"`` (:func:`graph_file`); None: the run's
                ``inference.onnx_precision`` where its graph exists.

        Raises:
            KerasnucError: no usable graph (the message says why), or weights newer than it.
        """
        run_dir = Path(run_dir)
        reason = onnx_unusable_reason(run_dir, precision=precision)
        if reason is not None:
            raise KerasnucError(f"{run_dir}: cannot predict with onnxruntime: {reason}")
        import onnxruntime as ort

        path = graph_file(run_dir, precision)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: keep the terminal ours
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KerasnucError(f"{path}: not a readable ONNX graph ({first[:200]})") from exc
        recorded = session.get_modelmeta().custom_metadata_map.get(WEIGHTS_DIGEST_KEY)
        weights = run_dir / WEIGHTS_FILE
        if weights.is_file() and recorded != weights_digest(weights):
            raise KerasnucError(
                f"{path}: made from other weights than {weights} (write it again with "
                f"kerasnuc models onnx {run_dir}, or predict with --engine keras)"
            )
        config = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text("utf-8")))
        postproc = ConicPostprocConfig.load(run_dir / POSTPROC_FILE)
        views = config.inference.views if views is None else views
        used = "int8" if path.name == INT8_FILE else "float32"
        return cls(session, postproc, config.data, batch_size, weights_digest(path), views, used)

    @property
    def mpp(self) -> float | None:
        """The model's resolution in um/px (None: unknown)."""
        return self.data_config.mpp

    def fingerprint(self) -> dict[str, Any]:
        """What the results depend on (see ``Predictor.fingerprint``): the graph, the
        post-processing, the batch size and the model's resolution and cell types."""
        return {
            "engine": "onnxruntime",
            "method": self.method.name,
            "models": [self.digest],
            "postproc": self.postproc.to_dict(),
            "tta": 0,
            "views": self.views,
            "precision": self.precision,
            "batch_size": self.batch_size,
            "mpp": self.data_config.mpp,
            "class_names": {str(k): v for k, v in dict(self.data_config.class_names).items()},
        }

    def predict_maps_batch(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """``(B, H, W, 3)`` uint8 (or float in ``[0, 1]``) -> ``{output: (B, H, W, K)}``."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"`images` must have shape (B, H, W, 3). Received: {images.shape}")
        x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images
        x = np.asarray(x, dtype=np.float32)
        parts: dict[str, list[np.ndarray]] = {}
        # One image per run: onnxruntime on a CPU gains nothing from batching tiles, and one
        # tile's activations at a time keep the memory down (4000 x 4000 image in 1128-px
        # tiles, one core: 23.5 s and 1.9 GB peak one by one, 24.4 s and 3.3 GB four at once).
        for i in range(len(x)):
            maps = average_views(self._forward, x[i : i + 1], self.views)
            for name, value in maps.items():
                parts.setdefault(name, []).append(value)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The graph on one ``(1, H, W, 3)`` float32 tile, padded to the stride and cropped
        back (the padding follows each view, as in the Keras predictor)."""
        padded, size = pad_to_multiple(x)
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(padded)})
        return crop_maps(dict(zip(self.output_names, outs, strict=True)), size)

    def predict_instances_batch(self, images: np.ndarray) -> list[PostprocResult]:
        """Nuclei of a batch of tiles (the ``predict_fn`` of the tiling)."""
        maps = self.predict_maps_batch(images)
        return [
            self.method.postprocess({k: v[b] for k, v in maps.items()}, self.postproc)
            for b in range(len(images))
        ]


def load_engine_predictor(
    run_dir: str | os.PathLike,
    engine: str = "auto",
    tta: int = 0,
    batch_size: int = 8,
    keras_reason: str | None = None,
    note: Any = None,
    views: int | None = None,
    precision: str | None = None,
) -> Any:
    """The predictor of ``run_dir`` on the engine ``kerasnuc predict --engine`` names.

    ``"auto"``: an :class:`OnnxPredictor` where the folder allows it, else a Keras
    :class:`~kerasnuc.inference.predictor.Predictor` (TensorFlow is imported only then);
    ``"onnx"``: the :class:`OnnxPredictor` or an error saying why not; ``"keras"``: the
    Predictor.

    Args:
        run_dir: a run or bundled-model folder.
        engine: one of :data:`ENGINES`.
        tta, batch_size: as for the Predictor (onnxruntime runs only ``tta <= 1``).
        keras_reason: why the caller needs Keras even where a graph exists (``"--device gpu
            runs with TensorFlow"``); None: no such reason.
        note: with ``"auto"``, called with a one-line message when a graph exists but cannot be
            loaded (e.g. made from other weights) and Keras runs the model instead; None: that
            error is raised.
        views: flips / rotations averaged per tile (None: the run's ``inference.views``; 1
            with ``tta > 1``).
        precision: the onnxruntime graph (``"float32"`` / ``"int8"``; None: the run's
            ``inference.onnx_precision`` where its graph exists). ``"int8"`` with the Keras
            engine is refused.

    Raises:
        KerasnucError: ``"onnx"`` where onnxruntime cannot run the model (the reason), or
            ``"auto"`` without ``note`` on a graph that cannot be loaded.
    """
    if engine not in ENGINES:
        raise ValueError(f"`engine` must be one of {ENGINES}. Received: engine={engine!r}")
    if precision == "int8" and (engine == "keras" or keras_reason or tta > 1):
        why = keras_reason or ("test-time augmentation runs with Keras" if tta > 1 else None)
        raise KerasnucError(
            "int8 runs on onnxruntime only" + (f" ({why})" if why else " (not with --engine keras)")
        )
    if engine != "keras":
        reason = keras_reason or onnx_unusable_reason(run_dir, tta, precision)
        if reason is None:
            try:
                return OnnxPredictor.from_run_dir(
                    run_dir, batch_size=batch_size, views=views, precision=precision
                )
            except KerasnucError as err:
                if engine == "onnx" or note is None:
                    raise
                note(f"{err}; predicting with Keras")
        elif engine == "onnx":
            raise KerasnucError(f"{run_dir}: cannot predict with onnxruntime: {reason}")
    from kerasnuc.inference.predictor import Predictor  # imports TensorFlow

    return Predictor.from_run_dirs(run_dir, tta=tta, batch_size=batch_size, views=views)


__all__ = [
    "ENGINES",
    "OnnxPredictor",
    "graph_file",
    "load_engine_predictor",
    "onnx_unusable_reason",
    "onnxruntime_available",
]
