"""The Python API: one call from an image (array or file) to nuclei, cell types and measurements.

::

    import kerasnuc

    result = kerasnuc.segment(image, mpp=0.25)   # (H, W, 3) uint8 array or a file path
    result.labels    # (H, W) int32 instance map, 0 = background, nuclei 1..N
    result.classes   # (H, W) int32 cell type of each pixel's nucleus (0 = background)
    result.table     # one row per nucleus: the columns of `kerasnuc predict`'s CSV
    result.counts    # {cell type: number of nuclei}

:func:`segment` runs exactly what ``kerasnuc predict`` runs on an image that fits in memory (the
stages of :mod:`kerasnuc.inference.job`: resampling to the model's resolution, the same tiles
with mirrored context, the model, the method's post-processing, stitching, measuring), so it
finds the same nuclei as the command line. ``Predictor.predict_instances``
(:mod:`kerasnuc.inference.predictor`) is the low-level, untiled path: one forward pass over the
whole image at its own resolution, without the tile context of the CLI; its nuclei differ near
the borders and between tiles.

The model is loaded once per process and reused by later calls (:func:`load_predictor`). As
with ``kerasnuc predict``, ``engine="auto"`` runs it on onnxruntime when its folder has a
``model.onnx`` and no test-time augmentation is asked for (TensorFlow is then never imported),
else with Keras.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.fileutil import KerasnucError
from kerasnuc.inference.job import PredictJob, PredictOptions
from kerasnuc.inference.onnx_predictor import load_engine_predictor
from kerasnuc.inference.sinks import OutputContext, measure_in_memory
from kerasnuc.io.readers import ArraySource
from kerasnuc.model_dirs import DEFAULT_MODEL, resolve_model
from kerasnuc.postprocess.measure import NucleusTable


@dataclass(frozen=True)
class Segmentation:
    """The nuclei of one image (:func:`segment`).

    Attributes:
        labels: ``(H, W)`` int32 instance map in the image's pixels, 0 = background, nuclei
            1..N (the ids of the table's ``id`` column).
        classes: ``(H, W)`` int32 cell type of the nucleus under each pixel (0 = background;
            1 on every nucleus for a model without cell types, see ``class_names``).
        table: one row per nucleus with the columns of ``kerasnuc predict``'s CSV (``image``,
            ``id``, ``class``, ``class_name``, centroid, box, area, perimeter, axes, solidity,
            stain, class probabilities; ``_um`` columns with a pixel size): a
            ``pandas.DataFrame`` when pandas is installed (``pip install kerasnuc[tables]``),
            else a dict ``{column: (N,) array}``.
        class_names: ``{class id: name}`` of the model (empty without cell types).
        mpp: the image's um/px (None: unknown; no ``_um`` columns then).
        model: the model's run folder.
        measurements: the table as a :class:`~kerasnuc.postprocess.measure.NucleusTable`.
    """

    labels: np.ndarray
    classes: np.ndarray
    table: Any
    class_names: dict[int, str]
    mpp: float | None
    model: Path
    measurements: NucleusTable = field(repr=False)

    def __len__(self) -> int:
        return len(self.measurements)

    @property
    def counts(self) -> dict[str, int]:
        """``{cell type: number of nuclei}`` (every type of the model, also 0); ``{"nuclei": N}``
        for a model without cell types."""
        if not self.class_names:
            return {"nuclei": len(self)}
        ids = np.asarray(self.measurements["class"], dtype=np.int64)
        return {name: int(np.sum(ids == k)) for k, name in sorted(self.class_names.items())}


@functools.lru_cache(maxsize=4)
def load_predictor(
    model: str = DEFAULT_MODEL,
    tta: int = 0,
    batch_size: int = 4,
    engine: str = "auto",
    views: int | None = None,
    precision: str | None = None,
) -> Any:
    """The predictor of a model, loaded once per process.

    Args:
        model: a run folder (written by ``kerasnuc train``) or the name of a bundled model.
        tta: test-time augmentation passes (0: one plain pass, as ``kerasnuc predict``).
        batch_size: tiles per model call.
        engine: ``"auto"`` (onnxruntime where the model folder allows, else Keras), ``"onnx"``
            or ``"keras"``, as ``kerasnuc predict --engine``.
        views: flips / rotations averaged per tile (None: the model's own setting), as
            ``kerasnuc predict --views``.
        precision: ``"float32"`` or ``"int8"`` graph of the onnxruntime engine (None: the
            model's own setting), as ``kerasnuc predict --precision``.

    Returns:
        An :class:`~kerasnuc.inference.onnx_predictor.OnnxPredictor` or a
        :class:`~kerasnuc.inference.predictor.Predictor`.

    Raises:
        KerasnucError: an unknown model, or ``engine="onnx"`` where it cannot run (why).
    """
    return load_engine_predictor(
        resolve_model(model), engine, tta, batch_size, views=views, precision=precision
    )


def _as_table(table: NucleusTable) -> Any:
    columns = table.flat_columns()
    try:
        import pandas as pd
    except ImportError:
        return columns
    return pd.DataFrame(columns)


def segment(
    image: np.ndarray | str | os.PathLike,
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    mpp: float | None = None,
    tta: int = 0,
    tile: int = 1152,
    margin: int = 64,
    batch_size: int = 4,
    grey: str = "error",
    name: str | None = None,
    engine: str = "auto",
    views: int | None = None,
    precision: str | None = None,
) -> Segmentation:
    """Find, outline, classify and measure the nuclei of one image, as ``kerasnuc predict`` does.

    The same tiled path as the command line (see the module docstring): the result has the
    nuclei of ``kerasnuc predict IMAGE --model MODEL``, and ``table`` its CSV's rows.
    ``Predictor.predict_instances`` is the low-level untiled path (one forward pass, no tile
    context); use this function unless you need the raw model outputs.

    Args:
        image: ``(H, W, 3)`` uint8 RGB array (``(H, W)`` grey or RGBA as ``kerasnuc predict``
            reads them; floats in ``[0, 1]``), or the path of an image file (PNG, JPEG, TIFF).
            Slides and images above 8192 x 8192 px are for ``kerasnuc predict`` (streamed).
        model: a run folder or the name of a bundled model (``"default"``).
        mpp: the image's pixel size in um/px (arrays have none; files: from their tags unless
            given). With it, the image is resampled to the model's resolution and the table has
            micrometre columns; without it, the image is used at its own resolution.
        tta: test-time augmentation passes (0: one plain pass).
        tile: largest tile side the model sees, in model pixels (``predict --tile``).
        margin: context per tile side in model pixels (``predict --margin``).
        batch_size: tiles per model call.
        grey: ``"error"`` (default) or ``"convert"`` for greyscale images.
        name: the ``image`` column of the table for an array (default ``"image"``; a file
            gets its file name, as in the CSV of ``kerasnuc predict``).
        engine: what runs the model, as ``kerasnuc predict --engine`` (see
            :func:`load_predictor`); both engines find the same nuclei with the float graph.
        views, precision: flips / turns averaged per tile and the onnxruntime graph
            (``"float32"`` or ``"int8"``), as ``kerasnuc predict --views / --precision``;
            None: the model's own settings.

    Returns:
        A :class:`Segmentation` (``labels``, ``classes``, ``table``, ``counts``).

    Raises:
        KerasnucError: an unreadable image, an unknown model, or an image too large for memory
            (one line).
    """
    run_dir = resolve_model(model)
    predictor = load_predictor(str(run_dir), tta, batch_size, engine, views, precision)
    options = PredictOptions(
        tile_size=tile, margin=margin, batch_size=batch_size, mpp=mpp, grey=grey, tissue=False
    )
    job = PredictJob(predictor, options, model_id=run_dir.resolve().name)
    if isinstance(image, str | os.PathLike):
        source = job.source_stage.open(Path(image))
        label = Path(image).name
    else:
        label = name or "image"
        source = ArraySource(np.asarray(image), mpp=mpp, name=label, grey=grey)
    with source:
        if job.source_stage.streaming(source):
            height, width = source.shape
            raise KerasnucError(
                f"{source.name}: {height} x {width} (or a slide) is predicted tile by tile to "
                "files: use kerasnuc predict (or kerasnuc.inference.job.predict_input)"
            )
        data = predictor.data_config
        target_mpp = job.source_stage.target_mpp(source, data.mpp)
        result = job.tile_stage.in_memory(source, job.predict_fn, target_mpp, None)
        ctx = OutputContext(
            source=source,
            name=label,
            folder=Path("."),
            formats=set(),
            class_names=dict(data.class_names),
            class_colours=dict(data.class_colours),
            num_classes=int(data.num_classes),
            mpp=source.mpp,
        )
        _, table = measure_in_memory(ctx, result)
    return Segmentation(
        labels=result.instances,
        classes=result.classes,
        table=_as_table(table),
        class_names=dict(data.class_names),
        mpp=source.mpp,
        model=run_dir,
        measurements=table,
    )


__all__ = ["Segmentation", "load_predictor", "segment"]
