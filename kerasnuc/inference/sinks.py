"""Stage 5 of the predict job: the sinks that measure an input's nuclei and write its files.

==================================  ==============================================================
``<name>.geojson``                  QuPath detections with measurements (:mod:`kerasnuc.io.geojson`)
``<name>.csv``                      one row per nucleus (:mod:`kerasnuc.io.table`)
``<name>.instances.ome.tif``        instance map, uint32, tiled pyramidal OME-TIFF
``<name>.classes.ome.tif``          class map, uint8 (models with cell types only)
``<name>.overlay.png``              2 px outlines coloured by class over the image (downsampled
                                    so that the longer side is at most :data:`OVERVIEW_MAX_SIZE`
                                    px for streamed inputs), a colour legend strip below it
``<name>.summary.json``             counts per class, densities per mm2 of tissue, runtime, model,
                                    settings (:mod:`kerasnuc.io.summary`); written by the job
==================================  ==============================================================

Everything is in level-0 (full-resolution) pixels of the input. Both sinks measure with
:func:`measure_table`, so every input of a model gets the same columns:
:func:`write_in_memory` for an input predicted in one piece, :class:`SlideWriter` tile by tile
for a streamed one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.fileutil import write_png
from kerasnuc.io.geojson import GeoJSONWriter, write_geojson
from kerasnuc.io.masks import write_class_tiff, write_instance_tiff
from kerasnuc.io.overlay import THICKNESS, add_legend, draw_overlay, write_overlay
from kerasnuc.io.readers import ImageSource
from kerasnuc.io.summary import class_counts
from kerasnuc.io.table import CSVWriter, write_csv
from kerasnuc.postprocess.measure import NucleusTable, measure_instances

FORMATS = ("geojson", "csv", "tiff", "overlay", "summary")
"""Output formats; ``summary`` is always written (it is the completion record)."""

OVERVIEW_MAX_SIZE = 4096
"""Longer side of the overlay PNG of a streamed slide."""


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


@dataclass
class OutputContext:
    """Everything the writers of one input need.

    Attributes:
        source: the input (level-0 pixels are read again for the stain column and the overlay).
        name: the output name ``<name>``.
        folder: where the files go (the temporary folder of the atomic ``OUT/<name>/``).
        formats: formats to write (``summary`` included).
        class_names, class_colours, num_classes: the model's cell types.
        mpp: the input's um/px (None: no measurements in micrometres).
    """

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

    @property
    def image_name(self) -> str:
        """The input's file name (the ``image`` column of the CSV)."""
        return Path(str(self.source.name)).name

    def path(self, fmt: str, index: int = 0) -> Path:
        return self.folder / output_files(self.name, self.has_classes)[fmt][index]


def measure_table(
    ctx: OutputContext,
    instances: np.ndarray,
    image: np.ndarray,
    classes: np.ndarray | None,
    probabilities: np.ndarray | None,
    offset: tuple[int, int] = (0, 0),
) -> NucleusTable:
    """Measure a map the same way on both paths (same columns for every input of a model).

    The first column, ``image``, is the input's file name (:attr:`OutputContext.image_name`),
    so the CSVs of many inputs can be concatenated.
    """
    if ctx.has_classes and probabilities is None and not instances.any():
        probabilities = np.zeros((0, ctx.num_classes + 1))
    table = measure_instances(
        instances,
        image=image,
        classes=classes if ctx.has_classes else None,
        probabilities=probabilities if ctx.has_classes else None,
        mpp=ctx.mpp,
        offset=offset,
        class_names=ctx.class_names or None,
    )
    source = np.full(len(table), ctx.image_name, dtype=object)
    return dataclasses.replace(table, columns={"image": source, **table.columns})


def measure_in_memory(ctx: OutputContext, result: Any) -> tuple[np.ndarray, NucleusTable]:
    """The level-0 image and the measurement table of an input predicted in one piece.

    Args:
        ctx: the input's context.
        result: the stitched :class:`~kerasnuc.postprocess.common.PostprocResult` of the input
            (level-0 ``instances``, ``classes`` and the table's ``probabilities``).

    Returns:
        ``(image (H, W, 3) uint8, table)``; the table is the CSV's (:func:`measure_table`).
    """
    height, width = ctx.source.shape
    image = ctx.source.read_region(0, 0, height, width)
    table = measure_table(
        ctx, result.instances, image, result.classes, result.table.get("probabilities")
    )
    return image, table


def summary_counts(ctx: OutputContext, counts: Mapping[int, int], total: int) -> Any:
    """The summary's counts: per class for a model with cell types, else the total."""
    return dict(counts) if ctx.has_classes else total


def write_in_memory(ctx: OutputContext, result: Any) -> tuple[dict[int, int], int]:
    """Sink of an input predicted in one piece: measure the stitched maps and write every format.

    Args:
        ctx: the input's context.
        result: the stitched :class:`~kerasnuc.postprocess.common.PostprocResult` of the input
            (level-0 ``instances``, ``classes`` and the table's ``probabilities``).

    Returns:
        ``(counts per class, total)``.
    """
    image, table = measure_in_memory(ctx, result)
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
            thickness=THICKNESS,
            class_names=ctx.class_names if ctx.has_classes else None,
        )
    counts = class_counts(table) if ctx.has_classes else {}
    return counts, len(table)


class SlideWriter:
    """Sink of a streamed input: measures each tile's nuclei and writes every output.

    A :class:`~kerasnuc.inference.tiling.TileSink`: the GeoJSON and CSV are streamed, the label
    maps are painted into disk-backed arrays in the work folder (memory stays bounded by the
    tile, not the slide) and written as pyramids at :meth:`close`, and the overlay is drawn over
    a thumbnail (each overview pixel takes the nucleus of the level-0 pixel nearest its centre).

    Args:
        ctx: the input's context.
        maps_dir: folder for the disk-backed label maps (in the work folder).
        overview: ``(H', W', 3)`` uint8 thumbnail the overlay is drawn on, or None.
    """

    def __init__(self, ctx: OutputContext, maps_dir: Path, overview: np.ndarray | None) -> None:
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
        table = measure_table(ctx, local, image, local_cls, prob_rows, offset=(y0, x0))
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
            self._csv.add(measure_table(ctx, empty, np.zeros((1, 1, 3), np.uint8), empty, None))
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
                thickness=THICKNESS,
            )
            legend = ctx.class_names if ctx.has_classes else None
            write_png(ctx.path("overlay"), add_legend(overlay, legend, ctx.class_colours))

    def abort(self, exc: BaseException) -> None:
        """Delete the partial outputs after a failure."""
        self._stack.__exit__(type(exc), exc, exc.__traceback__)
