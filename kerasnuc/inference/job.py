"""The ``kerasnuc predict`` job: one image or slide in, the outputs pathologists use out.

The job is a chain of stages, each a small object with one job; the speed work (batching,
pipelining) and distribution plug into one of them, never into the chain:

1. :class:`SourceStage`: opens the input (:func:`~kerasnuc.io.readers.open_image`), decides
   the resolution the model sees and whether the input is predicted in memory or streamed;
2. :class:`TileStage`: cuts it into overlapping tiles at the model's resolution, skips glass
   (tissue detection on a thumbnail, streamed inputs only), checkpoints finished tiles, and
   keeps each nucleus from the one tile that owns it (:mod:`kerasnuc.inference.tiling`);
3. :class:`ModelStage`: tiles -> probability maps (the predictor's models, TTA, ensembles);
4. :class:`PostprocessStage`: maps -> nuclei (the method's post-processing);
5. sinks (:mod:`kerasnuc.inference.sinks`): measure the nuclei and write the files.

:class:`PredictJob` runs them over one input (:meth:`PredictJob.run_input`) or many
(:meth:`PredictJob.run`); :func:`predict_input` and :func:`predict_inputs` are the same as
functions. The predictor is a :class:`~kerasnuc.inference.predictor.Predictor`, or anything with
its ``predict_instances_batch`` and ``data_config`` (stages 3 and 4 in one call then).

**Two paths.** Inputs that fit in memory (one pyramid level, at most :data:`SMALL_MAX_PIXELS`,
not a slide format) are predicted with :func:`~kerasnuc.inference.tiling.predict_tiled` and
measured in one piece; they are assumed to be tissue throughout (tissue area = image area).
Pyramidal images, slides and larger images go through
:func:`~kerasnuc.inference.tiling.predict_streaming`: tissue detection on a thumbnail
(:func:`~kerasnuc.io.tissue.tissue_mask`, unless ``tissue=False``) chooses the tiles and gives
the tissue area; each tile's nuclei are stored by a
:class:`~kerasnuc.inference.tiling.ResumableSink` in ``OUT/.kerasnuc-work/<name>/`` next to the
tiling checkpoint, and replayed at the end into the :class:`~kerasnuc.inference.sinks.SlideWriter`.
By default the TIFF maps are skipped for images above :data:`TIFF_DEFAULT_MAX_PIXELS` (they need
5 bytes per pixel of temporary disk); asking for ``tiff`` explicitly writes them anyway.

**Resolution.** The model's pixel size (``data_config.mpp``) is compared with the input's (the
``mpp`` option, else the file's tags); tiles are read from the best pyramid level and resampled
(:func:`~kerasnuc.inference.tiling.make_grid`). When either is unknown the input is used at its
native resolution, with a warning when the model's is known; measurements in micrometres and
densities need the input's pixel size and are left out (``null``) without it.

**All or nothing.** An input's outputs are written into a temporary sibling folder that is
renamed to ``OUT/<name>/`` only when every file is complete
(:func:`~kerasnuc.fileutil.atomic_dir`), so ``OUT/<name>/`` exists only when complete. A
failed slide keeps only its hidden work folder (checkpoint and finished tiles), which a rerun
with ``resume=True`` continues from; a run without ``resume`` starts that input over.

**Resuming.** Every summary records a *fingerprint* (:func:`input_fingerprint` and
:attr:`PredictJob.fingerprint`): the input (absolute path, size, modification time), the
predictor (a digest of the model weights, the post-processing settings, the test-time
augmentation, see :meth:`~kerasnuc.inference.predictor.Predictor.fingerprint`) and every
option that changes the nuclei (tile, margin, batch size, ``--mpp``, ``--grey``, tissue
detection). With ``resume=True`` an input is skipped only when its folder holds a summary
with the same fingerprint, listing every requested format, whose listed outputs all exist.
Otherwise the folder came from another input with the same name, another model or other
settings: the input is predicted again and its folder replaced, with a warning saying which
of the three differs (we recompute rather than refuse: the folder's name is this input's, and
a run without ``resume`` would replace it too). A slide's work folder is resumed under the
same rule.

One cohesive concept: the job, its options, its report and its stages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.fileutil import KerasnucError, atomic_dir, write_json_atomic
from kerasnuc.inference.inputs import output_names
from kerasnuc.inference.sinks import (
    FORMATS,
    OVERVIEW_MAX_SIZE,
    OutputContext,
    SlideWriter,
    output_files,
    summary_counts,
    write_in_memory,
)
from kerasnuc.inference.tiling import (
    ResumableSink,
    StreamSummary,
    TileSink,
    predict_streaming,
    predict_tiled,
    tile_plan,
)
from kerasnuc.io.readers import OPENSLIDE_SUFFIXES, ImageSource, open_image
from kerasnuc.io.summary import build_summary, write_summary
from kerasnuc.io.tissue import tissue_mask
from kerasnuc.postprocess.common import PostprocResult

logger = logging.getLogger(__name__)

SMALL_MAX_PIXELS = 8192 * 8192
"""Single-level images up to this many pixels are predicted and measured in memory."""

TIFF_DEFAULT_MAX_PIXELS = 40000 * 40000
"""By default (no explicit ``tiff`` format) the label TIFFs of larger slides are skipped."""

WORK_DIR = ".kerasnuc-work"
"""Hidden folder of ``OUT`` holding the resumable state of unfinished slides."""

ProgressFn = Callable[[int, int], None]


# --- options, reports and completeness -------------------------------------------------------


@dataclass(frozen=True)
class PredictOptions:
    """Settings of a predict job (the command-line options).

    Attributes:
        formats: formats to write (subset of :data:`FORMATS`), or None for all that fit.
        tile_size: largest tile side the model sees (model pixels); images that fit in memory
            get the smallest tiles that need no more of them
            (:func:`~kerasnuc.inference.tiling.tile_plan`): an image up to 1152 px at the
            model's resolution is one tile of its own size, without margin.
        margin: context per tile side; the largest nucleus must fit in it.
        batch_size: tiles per predictor call.
        mpp: the inputs' um/px, overriding their files (None: from the files).
        grey: ``"error"`` or ``"convert"`` for greyscale inputs.
        tissue: detect tissue on streamed images and skip tiles of glass.
        resume: skip complete inputs and continue interrupted slides.
        small_max_pixels: larger (or pyramidal / slide) inputs are streamed.
    """

    formats: frozenset[str] | None = None
    tile_size: int = 1152
    margin: int = 64
    batch_size: int = 4
    mpp: float | None = None
    grey: str = "error"
    tissue: bool = True
    resume: bool = False
    small_max_pixels: int = SMALL_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.formats is not None:
            bad = sorted(set(self.formats) - set(FORMATS))
            if bad or not self.formats:
                raise ValueError(
                    f"`formats` must be a non-empty subset of {FORMATS}. "
                    f"Received: formats={sorted(self.formats)}"
                )
            object.__setattr__(self, "formats", frozenset(self.formats))

    def settings(self) -> dict[str, Any]:
        """The options as summary settings."""
        return {
            "formats": "default" if self.formats is None else sorted(self.formats),
            "tile_size": self.tile_size,
            "margin": self.margin,
            "batch_size": self.batch_size,
            "mpp_override": self.mpp,
            "grey": self.grey,
            "tissue_detection": self.tissue,
        }


@dataclass
class InputReport:
    """What happened to one input.

    Attributes:
        path: the input file.
        name: its output folder name.
        status: ``"done"``, ``"complete"`` (skipped by ``resume``) or ``"failed"``.
        out_dir: ``OUT/<name>`` (exists for done and complete inputs).
        n_nuclei: nuclei found (None unless done).
        seconds: wall time of this run.
        mode: ``"in-memory"`` or ``"streaming"`` (None unless done).
        reason: why it failed.
        warnings: warnings logged while processing it (conversions, resolution).
        outputs: file names written.
    """

    path: Path
    name: str
    status: str
    out_dir: Path
    n_nuclei: int | None = None
    seconds: float = 0.0
    mode: str | None = None
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def input_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """The input part of a fingerprint: absolute path, size and modification time (ns)."""
    path = Path(path)
    try:
        stat = path.stat()
        size, mtime = int(stat.st_size), int(stat.st_mtime_ns)
    except OSError:
        size = mtime = None
    return {"path": str(path.resolve()), "size": size, "mtime_ns": mtime}


FINGERPRINT_PARTS = {"input": "input", "predictor": "model", "options": "settings"}
"""Fingerprint keys and how a warning names them."""


def fingerprint_differences(saved: Any, current: Mapping[str, Any]) -> list[str]:
    """What differs between a stored and the current fingerprint (``["input", "model"]``);
    empty when equal. A missing or malformed stored fingerprint differs in everything."""
    if not isinstance(saved, dict):
        return list(FINGERPRINT_PARTS.values())
    return [word for key, word in FINGERPRINT_PARTS.items() if saved.get(key) != current.get(key)]


def _read_summary(folder: Path, name: str) -> dict[str, Any] | None:
    try:
        summary = json.loads((folder / f"{name}.summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def is_complete(folder: Path, name: str, formats: frozenset[str] | None) -> bool:
    """Whether ``folder`` holds the complete outputs of an earlier run with these formats (its
    fingerprint is compared separately, see :func:`fingerprint_differences`)."""
    summary = _read_summary(folder, name)
    try:
        outputs = [str(o) for o in summary["outputs"]]
        requested = summary["settings"]["formats"]
        written = set(summary["formats"])
    except (KeyError, TypeError):
        return False
    if not all((folder / o).is_file() for o in outputs):
        return False
    if formats is None:
        return requested == "default"
    return set(formats) - {"summary"} <= written


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _collect_warnings() -> Iterator[list[str]]:
    """Collect the warnings of the ``kerasnuc`` loggers (they still propagate)."""
    handler = _WarningCollector()
    root = logging.getLogger("kerasnuc")
    root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)


# --- stages ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceStage:
    """Stage 1: open an input and decide how it is predicted.

    Attributes:
        options: the job's options (``mpp``, ``grey``, ``small_max_pixels``, ``formats``).
    """

    options: PredictOptions

    def open(self, path: Path) -> ImageSource:
        """The input for region reading (a context manager); KerasnucError when unreadable."""
        return open_image(path, mpp=self.options.mpp, grey=self.options.grey)

    def target_mpp(self, source: ImageSource, model_mpp: float | None) -> float | None:
        """The pixel size the tiles are resampled to: the model's, or None (native) when the
        input's is unknown (with a warning)."""
        if source.mpp is not None:
            return model_mpp
        if model_mpp is not None:
            logger.warning(
                "%s: pixel size unknown; running at native resolution, assumed to match the "
                "model's %.4g um/px (pass --mpp to resample)",
                source.name,
                model_mpp,
            )
        else:
            logger.warning(
                "%s: neither the input's nor the model's pixel size is known; running at "
                "native resolution",
                source.name,
            )
        return None

    def streaming(self, source: ImageSource) -> bool:
        """Whether the input is streamed tile by tile (pyramid, slide format or too large)."""
        height, width = source.shape
        return (
            source.level_count > 1
            or height * width > self.options.small_max_pixels
            or Path(source.name).suffix.lower() in OPENSLIDE_SUFFIXES
        )

    def formats(self, source: ImageSource, streaming: bool) -> set[str]:
        """The formats to write for this input (``summary`` always; no default TIFFs of huge
        streamed inputs)."""
        height, width = source.shape
        options = self.options
        formats = set(FORMATS if options.formats is None else options.formats) | {"summary"}
        if options.formats is None and streaming and height * width > TIFF_DEFAULT_MAX_PIXELS:
            formats.discard("tiff")
            logger.warning(
                "%s: %d x %d: instance/class TIFFs skipped (ask for --format ...,tiff to write "
                "them)",
                source.name,
                height,
                width,
            )
        return formats


class ModelStage:
    """Stage 3: a batch of tiles -> probability maps, by the predictor's models.

    Args:
        predictor: a :class:`~kerasnuc.inference.predictor.Predictor` (``predict_maps_batch``).
    """

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor

    def __call__(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """``(B, T, T, 3)`` uint8 -> ``{output: (B, T, T, K) float32}``."""
        return self.predictor.predict_maps_batch(tiles)


class PostprocessStage:
    """Stage 4: the maps of a batch of tiles -> their nuclei, by the method's post-processing.

    Args:
        method: the registry :class:`~kerasnuc.registry.Method` (its ``postprocess``).
        postproc: its settings (``postproc.json``).
    """

    def __init__(self, method: Any, postproc: Any) -> None:
        self.method = method
        self.postproc = postproc

    def __call__(self, maps: dict[str, np.ndarray]) -> list[PostprocResult]:
        """``{output: (B, T, T, K)}`` -> B :class:`~kerasnuc.postprocess.common.PostprocResult`."""
        size = len(next(iter(maps.values())))
        return [
            self.method.postprocess({k: v[b] for k, v in maps.items()}, self.postproc)
            for b in range(size)
        ]


def tile_predictor(predictor: Any) -> Callable[[np.ndarray], Sequence[Any]]:
    """The ``predict_fn`` of the tile stage: :class:`ModelStage` then :class:`PostprocessStage`
    for a :class:`~kerasnuc.inference.predictor.Predictor` (what its
    ``predict_instances_batch`` does), else the object's own ``predict_instances_batch``."""
    if all(hasattr(predictor, a) for a in ("predict_maps_batch", "method", "postproc")):
        model = ModelStage(predictor)
        postprocess = PostprocessStage(predictor.method, predictor.postproc)
        return lambda tiles: postprocess(model(tiles))
    return predictor.predict_instances_batch


@dataclass(frozen=True)
class TileStage:
    """Stage 2: tiles at the model's resolution, through the model and post-processing stages.

    Attributes:
        options: the job's options (``tile_size``, ``margin``, ``batch_size``, ``tissue``,
            ``resume``, ``small_max_pixels``).
    """

    options: PredictOptions

    def in_memory(
        self,
        source: ImageSource,
        predict_fn: Callable[[np.ndarray], Sequence[Any]],
        target_mpp: float | None,
        progress: ProgressFn | None,
    ) -> PostprocResult:
        """The stitched nuclei of an input that fits in memory (every tile predicted)."""
        height, width = source.shape
        options = self.options
        scale = source.mpp / target_mpp if source.mpp and target_mpp else 1.0
        tile_size, margin = tile_plan((height, width), options.tile_size, options.margin, scale)
        return predict_tiled(
            source,
            predict_fn,
            tile_size=tile_size,
            margin=margin,
            target_mpp=target_mpp,
            batch_size=options.batch_size,
            tissue=False,
            progress=progress,
            max_pixels=max(options.small_max_pixels, height * width),
        )

    def tissue(self, source: ImageSource, name: str) -> tuple[np.ndarray | bool, float]:
        """``(tissue mask or False, tissue area in level-0 px)`` of a streamed input."""
        height, width = source.shape
        if not self.options.tissue:
            return False, float(height * width)
        mask, _ = tissue_mask(source)
        if not mask.any():
            logger.warning("%s: no tissue detected; nothing predicted (try --no-tissue)", name)
        return mask, float(mask.mean()) * height * width

    def work_folder(self, work: Path, name: str, fingerprint: dict[str, Any]) -> None:
        """Prepare the resumable state of a streamed input: keep it only when resuming a run
        with the same settings (``fingerprint``), else start over."""
        settings_path = work / "settings.json"
        resume = self.options.resume
        if work.exists():
            try:
                same = json.loads(settings_path.read_text(encoding="utf-8")) == fingerprint
            except (OSError, ValueError):
                same = False
            if not (resume and same):
                if resume:
                    logger.warning(
                        "%s: earlier partial run used other settings; starting over", name
                    )
                shutil.rmtree(work)
        resumed = work.exists()
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(settings_path, fingerprint)
        if resumed:
            logger.info("%s: resuming the interrupted run in %s", name, work)

    def streaming(
        self,
        source: ImageSource,
        predict_fn: Callable[[np.ndarray], Sequence[Any]],
        sink: TileSink,
        target_mpp: float | None,
        tissue: np.ndarray | bool,
        work: Path,
        progress: ProgressFn | None,
    ) -> StreamSummary:
        """Stream the owned nuclei of every tissue tile into ``sink``, tile by tile, through a
        :class:`~kerasnuc.inference.tiling.ResumableSink` in ``work`` (checkpointed)."""
        options = self.options
        return predict_streaming(
            source,
            predict_fn,
            ResumableSink(work / "parts", sink),
            tile_size=options.tile_size,
            margin=options.margin,
            target_mpp=target_mpp,
            batch_size=options.batch_size,
            tissue=tissue,
            checkpoint=work / "checkpoint.json",
            progress=progress,
        )


# --- the job -----------------------------------------------------------------------------------


def _remove_work(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        work.parent.rmdir()


def failed_report(
    path: str | os.PathLike, name: str, out_dir: str | os.PathLike, exc: Exception
) -> InputReport:
    """The ``failed`` report of an input whose prediction raised ``exc`` (logged at debug)."""
    logger.debug("%s failed", path, exc_info=exc)
    reason = str(exc) if isinstance(exc, KerasnucError) else f"{type(exc).__name__}: {exc}"
    return InputReport(
        path=Path(path), name=name, status="failed", out_dir=Path(out_dir) / name, reason=reason
    )


class PredictJob:
    """Predict inputs with one predictor and write their outputs (see the module docstring).

    Args:
        predictor: a :class:`~kerasnuc.inference.predictor.Predictor`, or any object with
            ``predict_instances_batch((B, T, T, 3) uint8) -> results`` (a tiling ``predict_fn``)
            and ``data_config`` (:class:`~kerasnuc.config.DataConfig`: ``mpp``,
            ``class_names``, ``class_colours``, ``num_classes``).
        options: job settings (default :class:`PredictOptions`).
        model_id: model name recorded in the summaries.
    """

    def __init__(
        self, predictor: Any, options: PredictOptions | None = None, model_id: str | None = None
    ) -> None:
        self.predictor = predictor
        self.options = PredictOptions() if options is None else options
        self.model_id = model_id
        self.source_stage = SourceStage(self.options)
        self.tile_stage = TileStage(self.options)
        self.predict_fn = tile_predictor(predictor)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> dict[str, Any]:
        """The predictor and option parts of every input's fingerprint (see the module
        docstring); a predictor without ``fingerprint()`` is known by ``model_id`` only."""
        own = getattr(self.predictor, "fingerprint", None)
        predictor = own() if callable(own) else {"model_id": self.model_id}
        options = self.options.settings()
        options.pop("formats")
        options["small_max_pixels"] = self.options.small_max_pixels
        return json.loads(json.dumps({"predictor": predictor, "options": options}, default=str))

    def run_input(
        self,
        path: str | os.PathLike,
        out_dir: str | os.PathLike,
        name: str | None = None,
        progress: ProgressFn | None = None,
    ) -> InputReport:
        """Predict one image or slide and write its outputs into ``out_dir/<name>/``.

        Args:
            path: the input file.
            out_dir: the output folder ``OUT``.
            name: output folder name (default: the file's stem).
            progress: ``progress(done, total)`` in tiles.

        Returns:
            The :class:`InputReport` (status ``"done"`` or ``"complete"``).

        Raises:
            KerasnucError: unreadable, corrupt or unsupported input, or bad settings; nothing is
                left in ``out_dir/<name>`` then (a slide's work folder is kept for ``resume``).
        """
        path = Path(path)
        out_dir = Path(out_dir)
        options = self.options
        name = output_names([path])[0] if name is None else name
        folder = out_dir / name
        report = InputReport(path=path, name=name, status="done", out_dir=folder)
        fingerprint = {"input": input_fingerprint(path), **self.fingerprint}
        start = time.perf_counter()
        with _collect_warnings() as warnings:
            try:
                if options.resume and is_complete(folder, name, options.formats):
                    saved = (_read_summary(folder, name) or {}).get("fingerprint")
                    differs = fingerprint_differences(saved, fingerprint)
                    if not differs:
                        report.status = "complete"
                        return report
                    logger.warning(
                        "%s: %s holds the results of %s; predicting it again",
                        path,
                        folder,
                        " and ".join(
                            f"another {w}" if w != "settings" else "other settings" for w in differs
                        ),
                    )
                for stale in out_dir.glob(f".{name}.*.tmp"):
                    shutil.rmtree(stale, ignore_errors=True)
                with self.source_stage.open(path) as source:
                    report.n_nuclei, report.mode, report.outputs = self._run(
                        source, out_dir, name, progress, fingerprint
                    )
            finally:
                report.warnings = list(warnings)
                report.seconds = time.perf_counter() - start
        return report

    def _run(
        self,
        source: ImageSource,
        out_dir: Path,
        name: str,
        progress: ProgressFn | None,
        fingerprint: dict[str, Any],
    ) -> tuple[int, str, list[str]]:
        start = time.perf_counter()
        options = self.options
        data_config = self.predictor.data_config
        height, width = source.shape
        model_mpp = data_config.mpp
        target_mpp = self.source_stage.target_mpp(source, model_mpp)
        streaming = self.source_stage.streaming(source)
        formats = self.source_stage.formats(source, streaming)
        work = out_dir / WORK_DIR / name
        with atomic_dir(out_dir / name, overwrite=True) as tmp:
            ctx = OutputContext(
                source=source,
                name=name,
                folder=tmp,
                formats=formats,
                class_names=dict(data_config.class_names),
                class_colours=dict(data_config.class_colours),
                num_classes=int(data_config.num_classes),
                mpp=source.mpp,
            )
            if streaming:
                work_fingerprint = {
                    **fingerprint,
                    "model_mpp": model_mpp,
                    "mpp": source.mpp,
                    "formats": sorted(formats),
                }
                counts, total, tissue_px, extra = self._streamed(
                    ctx, target_mpp, progress, work, work_fingerprint
                )
            else:
                result = self.tile_stage.in_memory(source, self.predict_fn, target_mpp, progress)
                counts, total = write_in_memory(ctx, result)
                tissue_px, extra = float(height * width), {"mode": "in-memory"}
            files = output_files(name, ctx.has_classes)
            written = sorted(formats - {"summary"})
            outputs = [f for fmt in written for f in files[fmt]] + files["summary"]
            settings = {**options.settings(), "model_mpp": model_mpp}
            if not streaming:  # no tissue detection: the whole image counts as tissue
                settings["tissue_detection"] = False
            summary = build_summary(
                summary_counts(ctx, counts, total),
                class_names=ctx.class_names,
                tissue_area_px=tissue_px,
                mpp=source.mpp,
                runtime_s=time.perf_counter() - start,
                model_id=self.model_id,
                settings=settings,
                input=str(source.name),
                image_shape=[height, width],
                formats=sorted(formats),
                outputs=outputs,
                fingerprint=fingerprint,
                **extra,
            )
            write_summary(ctx.path("summary"), summary)
        if streaming:
            _remove_work(work)
        return total, str(extra["mode"]), outputs

    def _streamed(
        self,
        ctx: OutputContext,
        target_mpp: float | None,
        progress: ProgressFn | None,
        work: Path,
        fingerprint: dict[str, Any],
    ) -> tuple[dict[int, int], int, float, dict[str, Any]]:
        """Predict a large image or slide tile by tile (resumable) and write its outputs."""
        source = ctx.source
        height, width = source.shape
        self.tile_stage.work_folder(work, ctx.name, fingerprint)
        mask, tissue_px = self.tile_stage.tissue(source, ctx.name)
        overview = None
        if "overlay" in ctx.formats:
            overview = source.thumbnail(min(OVERVIEW_MAX_SIZE, max(height, width)))
        writer = SlideWriter(ctx, work / "maps", overview)
        try:
            stream = self.tile_stage.streaming(
                source, self.predict_fn, writer, target_mpp, mask, work, progress
            )
        except BaseException as exc:
            writer.abort(exc)
            raise
        extra = {
            "mode": "streaming",
            "tiles": {
                "total": stream.grid.n_tiles,
                "predicted": stream.n_selected,
                "resumed": stream.n_resumed,
                "level": stream.grid.level,
            },
        }
        return writer.counts, writer.total, tissue_px, extra

    def run(
        self,
        paths: Sequence[str | os.PathLike],
        out_dir: str | os.PathLike,
        progress_factory: Callable[[Path, str], ProgressFn | None] | None = None,
        on_report: Callable[[InputReport], None] | None = None,
    ) -> list[InputReport]:
        """:meth:`run_input` over several inputs; a failing input does not stop the others.

        Args:
            paths: the input files (see :func:`~kerasnuc.inference.inputs.find_inputs`).
            out_dir: the output folder ``OUT``.
            progress_factory: ``(path, name) -> progress callback`` (or None) per input.
            on_report: called with each input's report as soon as it is done.

        Returns:
            One :class:`InputReport` per input, in order; failures have status ``"failed"``
            and the reason (unreadable, corrupt, unsupported, greyscale, ...).
            ``KeyboardInterrupt`` is not caught.
        """
        paths = [Path(p) for p in paths]
        reports = []
        for path, name in zip(paths, output_names(paths), strict=True):
            progress = progress_factory(path, name) if progress_factory is not None else None
            try:
                report = self.run_input(path, out_dir, name, progress)
            except Exception as exc:  # one bad input must not stop a batch of slides
                report = failed_report(path, name, out_dir, exc)
            reports.append(report)
            if on_report is not None:
                on_report(report)
        return reports


def predict_input(
    path: str | os.PathLike,
    predictor: Any,
    out_dir: str | os.PathLike,
    name: str | None = None,
    options: PredictOptions | None = None,
    model_id: str | None = None,
    progress: ProgressFn | None = None,
) -> InputReport:
    """:meth:`PredictJob.run_input` as a function (arguments as :class:`PredictJob`)."""
    return PredictJob(predictor, options, model_id).run_input(path, out_dir, name, progress)


def predict_inputs(
    paths: Sequence[str | os.PathLike],
    predictor: Any,
    out_dir: str | os.PathLike,
    options: PredictOptions | None = None,
    model_id: str | None = None,
    progress_factory: Callable[[Path, str], ProgressFn | None] | None = None,
    on_report: Callable[[InputReport], None] | None = None,
) -> list[InputReport]:
    """:meth:`PredictJob.run` as a function (arguments as :class:`PredictJob`)."""
    return PredictJob(predictor, options, model_id).run(paths, out_dir, progress_factory, on_report)
