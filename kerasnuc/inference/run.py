"""The ``kerasnuc predict`` job: one image or slide in, the outputs pathologists use out.

:func:`predict_input` runs a :class:`~kerasnuc.inference.predictor.Predictor` (or anything with
its ``predict_instances_batch`` and ``data_config``) over one input and writes, into
``OUT/<name>/``:

==================================  ==============================================================
``<name>.geojson``                  QuPath detections with measurements (:mod:`kerasnuc.io.geojson`)
``<name>.csv``                      one row per nucleus (:mod:`kerasnuc.io.table`)
``<name>.instances.ome.tif``        instance map, uint32, tiled pyramidal OME-TIFF
``<name>.classes.ome.tif``          class map, uint8 (models with cell types only)
``<name>.overlay.png``              outlines coloured by class over the image (downsampled so
                                    that the longer side is at most 4096 px for slides)
``<name>.summary.json``             counts per class, densities per mm2 of tissue, runtime, model,
                                    settings (:mod:`kerasnuc.io.summary`); always written
==================================  ==============================================================

Everything is in level-0 (full-resolution) pixels of the input whatever the model's resolution.
``<name>`` is the file name without its extension (``.ome.tif`` counts as one); when several
inputs share a stem, the extension is appended (``a_png``, ``a_tif``) and then a counter.

**Two paths.** Inputs that fit in memory (one pyramid level, at most :data:`SMALL_MAX_PIXELS`,
not a slide format) are predicted with :func:`~kerasnuc.inference.tiling.predict_tiled` and
measured in one piece; they are assumed to be tissue throughout (tissue area = image area).
Pyramidal images, slides and larger images go through
:func:`~kerasnuc.inference.tiling.predict_streaming`: tissue detection on a thumbnail
(:func:`~kerasnuc.io.tissue.tissue_mask`, unless ``tissue=False``) chooses the tiles and
gives the tissue area; each tile's nuclei are stored by a
:class:`~kerasnuc.inference.tiling.ResumableSink` in ``OUT/.kerasnuc-work/<name>/`` next to
the tiling checkpoint, and replayed at the end into the writers: each tile's nuclei are painted
into a local map and measured there (level-0 pixels read again for the stain column), the
GeoJSON and CSV are streamed, the label maps are painted into disk-backed arrays in the work
folder (so memory stays bounded by the tile, not the slide) and written as pyramids, and the
overlay is drawn over a thumbnail. By default the TIFF maps are skipped for images above
:data:`TIFF_DEFAULT_MAX_PIXELS` (they need 5 bytes per pixel of temporary disk); asking for
``tiff`` explicitly writes them anyway.

**Resolution.** The model's pixel size (``data_config.mpp``) is compared with the input's (the
``mpp`` option, else the file's tags); tiles are read from the best pyramid level and resampled
(:func:`~kerasnuc.inference.tiling.make_grid`). When either is unknown the input is used at its
native resolution, with a warning when the model's is known; measurements in micrometres and
densities need the input's pixel size and are left out (``null``) without it.

**All or nothing.** An input's outputs are written into a temporary sibling folder that is
renamed to ``OUT/<name>/`` only when every file is complete
(:func:`~kerasnuc.fileutil.atomic_dir`), so ``OUT/<name>/`` exists only when complete. A
failed slide keeps only its hidden work folder (checkpoint and finished tiles), which a rerun
with ``resume=True`` continues from; a run without ``resume`` starts that input over. With
``resume=True`` an input whose folder holds a summary listing every requested format and whose
listed outputs all exist is skipped (the model is not compared).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.fileutil import KerasnucError, atomic_dir, write_json_atomic, write_png
from kerasnuc.io.geojson import GeoJSONWriter, write_geojson
from kerasnuc.io.masks import write_class_tiff, write_instance_tiff
from kerasnuc.io.overlay import draw_overlay, write_overlay
from kerasnuc.io.readers import (
    IMAGE_SUFFIXES,
    OPENSLIDE_SUFFIXES,
    TIFF_SUFFIXES,
    ImageSource,
    open_image,
)
from kerasnuc.io.summary import build_summary, class_counts, write_summary
from kerasnuc.io.table import CSVWriter, write_csv
from kerasnuc.postprocess.measure import NucleusTable, measure_instances

logger = logging.getLogger(__name__)

FORMATS = ("geojson", "csv", "tiff", "overlay", "summary")
"""Output formats; ``summary`` is always written (it is the completion record)."""

INPUT_SUFFIXES = IMAGE_SUFFIXES + TIFF_SUFFIXES + OPENSLIDE_SUFFIXES
"""File extensions collected from input folders."""

SMALL_MAX_PIXELS = 8192 * 8192
"""Single-level images up to this many pixels are predicted and measured in memory."""

TIFF_DEFAULT_MAX_PIXELS = 40000 * 40000
"""By default (no explicit ``tiff`` format) the label TIFFs of larger slides are skipped."""

OVERVIEW_MAX_SIZE = 4096
"""Longer side of the overlay PNG of a streamed slide."""

WORK_DIR = ".kerasnuc-work"
"""Hidden folder of ``OUT`` holding the resumable state of unfinished slides."""

ProgressFn = Callable[[int, int], None]


# --- inputs and names ----------------------------------------------------------------------


def _is_input_file(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(INPUT_SUFFIXES + (".ome.tif", ".ome.tiff"))


def find_inputs(
    paths: Iterable[str | os.PathLike],
    recursive: bool = False,
    exclude: str | os.PathLike | None = None,
) -> list[Path]:
    """The input files named by files and folders, in argument order, without duplicates.

    Folders contribute their image files (extensions :data:`INPUT_SUFFIXES`, hidden files
    ignored), sorted by path, from sub-folders too when ``recursive``. Files are taken as
    given whatever their extension (an unsupported one fails when read), as are paths that do
    not exist (they fail as "file not found", so that they appear in the report).

    Args:
        paths: files and folders.
        recursive: also search sub-folders.
        exclude: a folder whose contents are never collected (the output folder).
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    out: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(path)

    for value in paths:
        path = Path(value)
        if not path.is_dir():
            add(path)
            continue
        found = path.rglob("*") if recursive else path.iterdir()
        for child in sorted(found):
            if not child.is_file() or not _is_input_file(child):
                continue
            if skip is not None and skip in child.resolve().parents:
                continue
            if recursive and any(p.startswith(".") for p in child.relative_to(path).parts):
                continue
            add(child)
    return out


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def output_names(paths: Sequence[Path]) -> list[str]:
    """Output folder name of each input: its stem, made unique (see the module docstring)."""
    stems = [_stem(p) or "image" for p in paths]
    names = [
        f"{s}_{p.suffix.lstrip('.').lower()}" if stems.count(s) > 1 and p.suffix else s
        for s, p in zip(stems, paths, strict=True)
    ]
    out: list[str] = []
    for name in names:
        unique, k = name, 1
        while unique in out:
            k += 1
            unique = f"{name}_{k}"
        out.append(unique)
    return out


# --- options, reports and completeness -------------------------------------------------------


@dataclass(frozen=True)
class PredictOptions:
    """Settings of a predict job (the command-line options).

    Attributes:
        formats: formats to write (subset of :data:`FORMATS`), or None for all that fit.
        tile_size: tile side the model sees (model pixels).
        margin: context per tile side; the largest nucleus must fit in it.
        batch_size: tiles per predictor call.
        mpp: the inputs' um/px, overriding their files (None: from the files).
        grey: ``"error"`` or ``"convert"`` for greyscale inputs.
        tissue: detect tissue on streamed images and skip tiles of glass.
        resume: skip complete inputs and continue interrupted slides.
        small_max_pixels: larger (or pyramidal / slide) inputs are streamed.
    """

    formats: frozenset[str] | None = None
    tile_size: int = 512
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


def output_files(name: str, has_classes: bool) -> dict[str, list[str]]:
    """``{format: [file names]}`` of one input's folder."""
    tiffs = [f"{name}.instances.ome.tif"] + ([f"{name}.classes.ome.tif"] if has_classes else [])
    return {
        "geojson": [f"{name}.geojson"],
        "csv": [f"{name}.csv"],
        "tiff": tiffs,
        "overlay": [f"{name}.overlay.png"],
        "summary": [f"{name}.summary.json"],
    }


def is_complete(folder: Path, name: str, formats: frozenset[str] | None) -> bool:
    """Whether ``folder`` holds the complete outputs of an earlier run with these formats."""
    path = folder / f"{name}.summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        outputs = [str(o) for o in summary["outputs"]]
        requested = summary["settings"]["formats"]
        written = set(summary["formats"])
    except (OSError, ValueError, KeyError, TypeError):
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


# --- measuring and writing -------------------------------------------------------------------


@dataclass
class _Context:
    """Everything the writers of one input need."""

    source: ImageSource
    name: str
    folder: Path
    formats: set[str]
    class_names: dict[int, str]
    class_colours: dict[int, tuple[int, int, int]]
    num_classes: int
    mpp: float | None

    @property
    def has_classes(self) -> bool:
        return self.num_classes > 0

    def path(self, fmt: str, index: int = 0) -> Path:
        return self.folder / output_files(self.name, self.has_classes)[fmt][index]


def _measure(
    ctx: _Context,
    instances: np.ndarray,
    image: np.ndarray,
    classes: np.ndarray | None,
    probabilities: np.ndarray | None,
    offset: tuple[int, int] = (0, 0),
) -> NucleusTable:
    """Measure a map the same way on both paths (same columns for every input of a model)."""
    if ctx.has_classes and probabilities is None and not instances.any():
        probabilities = np.zeros((0, ctx.num_classes + 1))
    return measure_instances(
        instances,
        image=image,
        classes=classes if ctx.has_classes else None,
        probabilities=probabilities if ctx.has_classes else None,
        mpp=ctx.mpp,
        offset=offset,
        class_names=ctx.class_names or None,
    )


def _summary_counts(ctx: _Context, counts: Mapping[int, int], total: int) -> Any:
    return dict(counts) if ctx.has_classes else total


def _predict_in_memory(
    ctx: _Context,
    predict_fn: Callable[[np.ndarray], Sequence[Any]],
    options: PredictOptions,
    target_mpp: float | None,
    progress: ProgressFn | None,
) -> tuple[dict[int, int], int, float, dict[str, Any]]:
    """Predict, measure and write an input that fits in memory.

    Returns:
        ``(counts per class, total, tissue area in px, extra summary fields)``.
    """
    from kerasnuc.inference.tiling import predict_tiled

    source = ctx.source
    height, width = source.shape
    result = predict_tiled(
        source,
        predict_fn,
        tile_size=options.tile_size,
        margin=options.margin,
        target_mpp=target_mpp,
        batch_size=options.batch_size,
        tissue=False,
        progress=progress,
        max_pixels=max(options.small_max_pixels, height * width),
    )
    image = source.read_region(0, 0, height, width)
    table = _measure(
        ctx, result.instances, image, result.classes, result.table.get("probabilities")
    )
    if "geojson" in ctx.formats:
        write_geojson(
            ctx.path("geojson"),
            result.instances,
            table,
            class_colors=ctx.class_colours,
            id_namespace=ctx.name,
        )
    if "csv" in ctx.formats:
        write_csv(ctx.path("csv"), table)
    if "tiff" in ctx.formats:
        write_instance_tiff(ctx.path("tiff"), result.instances, mpp=ctx.mpp)
        if ctx.has_classes:
            write_class_tiff(ctx.path("tiff", 1), result.classes, mpp=ctx.mpp)
    if "overlay" in ctx.formats:
        write_overlay(
            ctx.path("overlay"),
            image,
            result.instances,
            result.classes if ctx.has_classes else None,
            ctx.class_colours,
        )
    counts = class_counts(table) if ctx.has_classes else {}
    return counts, len(table), float(height * width), {"mode": "in-memory"}


class _SlideWriter:
    """Downstream sink of a streamed slide: measures each tile's nuclei and writes every output.

    Args:
        ctx: the input's context.
        maps_dir: folder for the disk-backed label maps (in the work folder).
        overview: ``(H', W', 3)`` uint8 thumbnail the overlay is drawn on, or None.
    """

    def __init__(self, ctx: _Context, maps_dir: Path, overview: np.ndarray | None) -> None:
        self.ctx = ctx
        self.counts: dict[int, int] = {}
        self.total = 0
        self._stack = contextlib.ExitStack()
        self._geojson: GeoJSONWriter | None = None
        self._csv: CSVWriter | None = None
        self._inst_map: np.ndarray | None = None
        self._cls_map: np.ndarray | None = None
        self._overview = overview
        height, width = ctx.source.shape
        if "geojson" in ctx.formats:
            self._geojson = self._stack.enter_context(
                GeoJSONWriter(ctx.path("geojson"), ctx.class_colours, id_namespace=ctx.name)
            )
        if "csv" in ctx.formats:
            self._csv = self._stack.enter_context(CSVWriter(ctx.path("csv")))
        if "tiff" in ctx.formats:
            maps_dir.mkdir(parents=True, exist_ok=True)
            self._inst_map = np.memmap(
                maps_dir / "instances.u32", np.uint32, mode="w+", shape=(height, width)
            )
            if ctx.has_classes:
                self._cls_map = np.memmap(
                    maps_dir / "classes.u8", np.uint8, mode="w+", shape=(height, width)
                )
        if overview is not None:
            oh, ow = overview.shape[:2]
            self._ov_rows = np.minimum(
                ((np.arange(oh) + 0.5) * height / oh).astype(np.int64), height - 1
            )
            self._ov_cols = np.minimum(
                ((np.arange(ow) + 0.5) * width / ow).astype(np.int64), width - 1
            )
            self._ov_labels = np.zeros((oh, ow), dtype=np.int64)
            self._ov_classes = np.zeros((oh, ow), dtype=np.uint8)

    def on_tile(self, instances: list[dict[str, Any]]) -> None:
        if not instances:
            return
        ctx = self.ctx
        y0 = min(d["bbox"][0] for d in instances)
        x0 = min(d["bbox"][1] for d in instances)
        y1 = max(d["bbox"][2] for d in instances)
        x1 = max(d["bbox"][3] for d in instances)
        local = np.zeros((y1 - y0, x1 - x0), dtype=np.int64)
        local_cls = np.zeros_like(local)
        probs: dict[int, np.ndarray] = {}
        for d in instances:
            by0, bx0, by1, bx1 = d["bbox"]
            region = local[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0]
            sel = d["mask"] & (region == 0)
            region[sel] = d["id"]
            local_cls[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0][sel] = d["class"]
            if "probabilities" in d["table"]:
                probs[d["id"]] = np.asarray(d["table"]["probabilities"], dtype=np.float64)
        present = np.unique(local[local > 0])
        prob_rows = None
        if ctx.has_classes and present.size and all(int(i) in probs for i in present):
            prob_rows = np.stack([probs[int(i)] for i in present])
        image = ctx.source.read_region(y0, x0, y1 - y0, x1 - x0)
        table = _measure(ctx, local, image, local_cls, prob_rows, offset=(y0, x0))
        if self._geojson is not None:
            self._geojson.add(local, table, offset=(y0, x0))
        if self._csv is not None:
            self._csv.add(table)
        for k, n in class_counts(table).items():
            self.counts[k] = self.counts.get(k, 0) + n
        self.total += len(table)
        fg = local > 0
        if self._inst_map is not None:
            block = np.s_[y0:y1, x0:x1]
            target = self._inst_map[block]
            sel = fg & (target == 0)
            target[sel] = local[sel]
            if self._cls_map is not None:
                self._cls_map[block][sel] = local_cls[sel]
        if self._overview is not None:
            r0, r1 = np.searchsorted(self._ov_rows, [y0, y1])
            c0, c1 = np.searchsorted(self._ov_cols, [x0, x1])
            if r1 > r0 and c1 > c0:
                sampled = np.ix_(self._ov_rows[r0:r1] - y0, self._ov_cols[c0:c1] - x0)
                labels = local[sampled]
                keep = labels > 0
                self._ov_labels[r0:r1, c0:c1][keep] = labels[keep]
                self._ov_classes[r0:r1, c0:c1][keep] = local_cls[sampled][keep]

    def close(self) -> None:
        ctx = self.ctx
        if self._csv is not None and self._csv.count == 0:
            empty = np.zeros((1, 1), dtype=np.int64)
            self._csv.add(_measure(ctx, empty, np.zeros((1, 1, 3), np.uint8), empty, None))
        self._stack.close()
        if self._inst_map is not None:
            self._inst_map.flush()
            write_instance_tiff(ctx.path("tiff"), self._inst_map, mpp=ctx.mpp)
            if self._cls_map is not None:
                self._cls_map.flush()
                write_class_tiff(ctx.path("tiff", 1), self._cls_map, mpp=ctx.mpp)
        if self._overview is not None:
            overlay = draw_overlay(
                self._overview,
                self._ov_labels,
                self._ov_classes if ctx.has_classes else None,
                ctx.class_colours,
            )
            write_png(ctx.path("overlay"), overlay)

    def abort(self, exc: BaseException) -> None:
        """Delete the partial outputs after a failure."""
        self._stack.__exit__(type(exc), exc, exc.__traceback__)


def _predict_streaming(
    ctx: _Context,
    predict_fn: Callable[[np.ndarray], Sequence[Any]],
    options: PredictOptions,
    target_mpp: float | None,
    progress: ProgressFn | None,
    work: Path,
    fingerprint: dict[str, Any],
) -> tuple[dict[int, int], int, float, dict[str, Any]]:
    """Predict a large image or slide tile by tile (resumable) and write its outputs."""
    from kerasnuc.inference.tiling import ResumableSink, predict_streaming
    from kerasnuc.io.tissue import tissue_mask

    source = ctx.source
    height, width = source.shape
    settings_path = work / "settings.json"
    if work.exists():
        try:
            same = json.loads(settings_path.read_text(encoding="utf-8")) == fingerprint
        except (OSError, ValueError):
            same = False
        if not (options.resume and same):
            if options.resume:
                logger.warning(
                    "%s: earlier partial run used other settings; starting over", ctx.name
                )
            shutil.rmtree(work)
    resumed = work.exists()
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings_path, fingerprint)
    if resumed:
        logger.info("%s: resuming the interrupted run in %s", ctx.name, work)

    mask: np.ndarray | bool = False
    tissue_px = float(height * width)
    if options.tissue:
        mask, _ = tissue_mask(source)
        tissue_px = float(mask.mean()) * height * width
        if not mask.any():
            logger.warning("%s: no tissue detected; nothing predicted (try --no-tissue)", ctx.name)
    overview = None
    if "overlay" in ctx.formats:
        overview = source.thumbnail(min(OVERVIEW_MAX_SIZE, max(height, width)))
    writer = _SlideWriter(ctx, work / "maps", overview)
    sink = ResumableSink(work / "parts", writer)
    try:
        stream = predict_streaming(
            source,
            predict_fn,
            sink,
            tile_size=options.tile_size,
            margin=options.margin,
            target_mpp=target_mpp,
            batch_size=options.batch_size,
            tissue=mask,
            checkpoint=work / "checkpoint.json",
            progress=progress,
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


def _remove_work(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        work.parent.rmdir()


def predict_input(
    path: str | os.PathLike,
    predictor: Any,
    out_dir: str | os.PathLike,
    name: str | None = None,
    options: PredictOptions | None = None,
    model_id: str | None = None,
    progress: ProgressFn | None = None,
) -> InputReport:
    """Predict one image or slide and write its outputs into ``out_dir/<name>/``.

    Args:
        path: the input file.
        predictor: a :class:`~kerasnuc.inference.predictor.Predictor`, or any object with
            ``predict_instances_batch((B, T, T, 3) uint8) -> results`` (a tiling ``predict_fn``)
            and ``data_config`` (:class:`~kerasnuc.config.DataConfig`: ``mpp``,
            ``class_names``, ``class_colours``, ``num_classes``).
        out_dir: the output folder ``OUT``.
        name: output folder name (default: the file's stem).
        options: job settings (default :class:`PredictOptions`).
        model_id: model name recorded in the summary.
        progress: ``progress(done, total)`` in tiles.

    Returns:
        The :class:`InputReport` (status ``"done"`` or ``"complete"``).

    Raises:
        KerasnucError: unreadable, corrupt or unsupported input, or bad settings; nothing is
            left in ``out_dir/<name>`` then (a slide's work folder is kept for ``resume``).
    """
    path = Path(path)
    out_dir = Path(out_dir)
    options = PredictOptions() if options is None else options
    name = _stem(path) if name is None else name
    folder = out_dir / name
    report = InputReport(path=path, name=name, status="done", out_dir=folder)
    if options.resume and is_complete(folder, name, options.formats):
        report.status = "complete"
        return report
    start = time.perf_counter()
    for stale in out_dir.glob(f".{name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    data_config = predictor.data_config
    with _collect_warnings() as warnings:
        try:
            with open_image(path, mpp=options.mpp, grey=options.grey) as source:
                report.n_nuclei, report.mode, report.outputs = _run(
                    source, predictor, data_config, out_dir, name, options, model_id, progress
                )
        finally:
            report.warnings = list(warnings)
            report.seconds = time.perf_counter() - start
    return report


def _run(
    source: ImageSource,
    predictor: Any,
    data_config: Any,
    out_dir: Path,
    name: str,
    options: PredictOptions,
    model_id: str | None,
    progress: ProgressFn | None,
) -> tuple[int, str, list[str]]:
    start = time.perf_counter()
    height, width = source.shape
    model_mpp = data_config.mpp
    target_mpp = model_mpp
    if source.mpp is None:
        target_mpp = None
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
    streaming = (
        source.level_count > 1
        or height * width > options.small_max_pixels
        or Path(source.name).suffix.lower() in OPENSLIDE_SUFFIXES
    )
    formats = set(FORMATS if options.formats is None else options.formats) | {"summary"}
    if options.formats is None and streaming and height * width > TIFF_DEFAULT_MAX_PIXELS:
        formats.discard("tiff")
        logger.warning(
            "%s: %d x %d: instance/class TIFFs skipped (ask for --format ...,tiff to write them)",
            source.name,
            height,
            width,
        )
    num_classes = int(data_config.num_classes)
    work = out_dir / WORK_DIR / name
    with atomic_dir(out_dir / name, overwrite=True) as tmp:
        ctx = _Context(
            source=source,
            name=name,
            folder=tmp,
            formats=formats,
            class_names=dict(data_config.class_names),
            class_colours=dict(data_config.class_colours),
            num_classes=num_classes,
            mpp=source.mpp,
        )
        predict_fn = predictor.predict_instances_batch
        if streaming:
            fingerprint = {
                "model": model_id,
                "model_mpp": model_mpp,
                "mpp": source.mpp,
                "options": options.settings(),
                "formats": sorted(formats),
            }
            counts, total, tissue_px, extra = _predict_streaming(
                ctx, predict_fn, options, target_mpp, progress, work, fingerprint
            )
        else:
            counts, total, tissue_px, extra = _predict_in_memory(
                ctx, predict_fn, options, target_mpp, progress
            )
        files = output_files(name, ctx.has_classes)
        written = sorted(formats - {"summary"})
        outputs = [f for fmt in written for f in files[fmt]] + files["summary"]
        summary = build_summary(
            _summary_counts(ctx, counts, total),
            class_names=ctx.class_names,
            tissue_area_px=tissue_px,
            mpp=source.mpp,
            runtime_s=time.perf_counter() - start,
            model_id=model_id,
            settings={**options.settings(), "model_mpp": model_mpp},
            input=str(source.name),
            image_shape=[height, width],
            formats=written,
            outputs=outputs,
            **extra,
        )
        write_summary(ctx.path("summary"), summary)
    if streaming:
        _remove_work(work)
    return total, str(extra["mode"]), outputs


def predict_inputs(
    paths: Sequence[str | os.PathLike],
    predictor: Any,
    out_dir: str | os.PathLike,
    options: PredictOptions | None = None,
    model_id: str | None = None,
    progress_factory: Callable[[Path, str], ProgressFn | None] | None = None,
    on_report: Callable[[InputReport], None] | None = None,
) -> list[InputReport]:
    """Run :func:`predict_input` over several inputs; a failing input does not stop the others.

    Args:
        paths: the input files (see :func:`find_inputs`).
        predictor, out_dir, options, model_id: as for :func:`predict_input`.
        progress_factory: ``(path, name) -> progress callback`` (or None) per input.
        on_report: called with each input's report as soon as it is done.

    Returns:
        One :class:`InputReport` per input, in order; failures have status ``"failed"`` and
        the reason (unreadable, corrupt, unsupported, greyscale, ...). ``KeyboardInterrupt``
        is not caught.
    """
    paths = [Path(p) for p in paths]
    reports = []
    for path, name in zip(paths, output_names(paths), strict=True):
        progress = progress_factory(path, name) if progress_factory is not None else None
        try:
            report = predict_input(path, predictor, out_dir, name, options, model_id, progress)
        except Exception as exc:  # one bad input must not stop a batch of slides
            logger.debug("%s failed", path, exc_info=True)
            reason = str(exc) if isinstance(exc, KerasnucError) else f"{type(exc).__name__}: {exc}"
            report = InputReport(
                path=path,
                name=name,
                status="failed",
                out_dir=Path(out_dir) / name,
                reason=reason,
            )
        reports.append(report)
        if on_report is not None:
            on_report(report)
    return reports
