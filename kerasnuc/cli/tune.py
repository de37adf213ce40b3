"""``kerasnuc tune``: grid-search the post-processing thresholds of a run on validation data."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import click

from kerasnuc.cli.common import check_writable_dir, dataset_path, format_table, verbose_option
from kerasnuc.fileutil import KerasnucError

SHOWN = 10


def read_grid(path: Path) -> dict[str, list[Any]]:
    """Read a ``--grid`` JSON file ``{setting: [values]}`` (KerasnucError when malformed)."""
    try:
        grid = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise KerasnucError(f"{path}: cannot read grid ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise KerasnucError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(grid, dict) or not grid:
        raise KerasnucError(f"{path}: the grid must be a JSON object {{setting: [values]}}")
    return grid


#: Default largest centroid-to-point distance of ``tune --points``, in micrometres (12 px at
#: 0.25 um/px: about a nucleus radius).
POINT_DISTANCE_UM = 3.0
#: The same in pixels for a model without a pixel size.
POINT_DISTANCE_PX = 12.0


@click.command("tune")
@click.argument("run_dir")
@click.option(
    "--data",
    "data_dirs",
    multiple=True,
    required=True,
    help="Dataset folder (repeatable; each scored on its own).",
)
@click.option("--split", default="val", show_default=True, help="Split to tune on.")
@click.option("--grid", "grid_file", type=click.Path(path_type=Path), help="JSON grid file.")
@click.option("--max-images", type=click.IntRange(min=1), help="Tune on the first N images.")
@click.option(
    "--tile",
    type=click.IntRange(min=0),
    help="Predict and score non-overlapping tiles of at most N px (at least 32) instead of whole "
    "images (for big images; panoptic tunes on 512 px tiles unless told otherwise, because its "
    "forward pass has max_detections slots); 0: whole images.",
)
@click.option(
    "--points",
    "points",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[DIR]",
    help="Score by detection F1 against one point per nucleus instead of PQ against masks: the "
    "points of a points dataset (kerasnuc data import points), or with DIR the point files "
    "<image id>.csv / .geojson in DIR (as train --points); for weak runs trained on points.",
)
@click.option(
    "--max-distance",
    type=click.FloatRange(min=0, min_open=True),
    default=POINT_DISTANCE_UM,
    show_default=True,
    help="--points: largest distance in um between a nucleus centroid and its point "
    f"({POINT_DISTANCE_PX:g} px for a model without a pixel size).",
)
@click.option(
    "--metric",
    type=click.Choice(["auto", "pq", "aji"]),
    default="auto",
    show_default=True,
    help="What the masks are tuned for: auto is mPQ+ on data with cell types and PQ otherwise; "
    "pq is PQ also on typed data; aji is the aggregated Jaccard index (AJI rewards complete "
    "masks and punishes spurious detections by their area; PQ counts matched nuclei). Not with "
    "--points (always detection F1).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Write the tuned model as a new run folder OUT (config and weights copied) instead of "
    "rewriting RUN_DIR/postproc.json; required for a bundled model (e.g. 'default').",
)
@verbose_option
def tune(
    run_dir: str,
    data_dirs: tuple[str, ...],
    split: str,
    grid_file: Path | None,
    max_images: int | None,
    tile: int | None,
    points: str | None,
    max_distance: float,
    metric: str,
    out: Path | None,
) -> None:
    """Tune the post-processing of RUN_DIR on a labelled split; write RUN_DIR/postproc.json.

    RUN_DIR is a run folder or a bundled model (with --out). Each image is predicted once (with
    the run's views, config.json "inference");
    every grid configuration is scored with mPQ+ (PQ for data without classes, and for weak
    runs) over the whole split, or by PQ or AJI with --metric, or with --points by the
    detection F1 against the points, and the best one is saved. Default grids: conic
    foreground/seed thresholds and minimum size; unet_sharp foreground rule (probability
    threshold or argmax), marker distance and minimum size; weak peak threshold, minimum
    detection distance (um) and smoothing; panoptic detection score, mask threshold and extra
    box NMS (growth into the semantic foreground, "grow", by a grid file).
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    grid = read_grid(grid_file) if grid_file is not None else None
    if points is not None and tile:
        raise KerasnucError("--tile and --points exclude each other")
    if points is not None and metric != "auto":
        raise KerasnucError(f"--metric {metric} and --points exclude each other")
    if tile is not None and 0 < tile < 32:
        raise KerasnucError(f"--tile {tile}: tiles must be at least 32 px (or 0: whole images)")
    from kerasnuc.runs import POSTPROC, copy_run, is_bundled, load_run, resolve_model

    path = resolve_model(run_dir)
    if out is None and is_bundled(path):
        raise KerasnucError(
            f"{run_dir} is a bundled model: pass --out DIR to write the tuned model as a new run "
            "folder (the package's own thresholds are not rewritten)"
        )
    if out is not None and out.exists():
        raise KerasnucError(f"{out}: already exists (choose a new folder for the tuned model)")
    if out is None:
        check_writable_dir(path)  # postproc.json is written there at the end
    else:
        check_writable_dir(out.parent, out)
    dirs = [dataset_path(d) for d in data_dirs]
    for d in dirs:
        if not d.is_dir():
            raise KerasnucError(f"{d}: not a dataset folder")
    from kerasnuc.data.dataset import Dataset

    run = load_run(path)
    method = run.method
    if grid is None:
        grid = method.tune_grid
    datasets = [Dataset(d, mpp=run.config.data.assumed_mpp(d)) for d in dirs]
    if tile is None and points is None:
        tile = method.tune_tile
    if points is None:
        items, score_fn, label = _mask_scoring(
            run, datasets, split, max_images, tile or None, metric
        )
    else:
        items, score_fn, label = _point_scoring(run, datasets, split, max_images, points,
                                                 max_distance)  # fmt: skip
    from kerasnuc.training.validation import predict_all

    with click.progressbar(items, label=f"predicting {len(items)} images") as bar:
        maps = predict_all(run.model, list(bar), views=run.config.inference.views)
    try:
        best, table = method.tune(maps, grid, score_fn, run.postproc)
    except ValueError as exc:
        raise KerasnucError(f"invalid grid: {exc}") from exc
    scores = [r["score"] for r in table if not math.isnan(r["score"])]
    if not scores or max(scores) <= 0:
        click.echo(
            f"warning: every setting scores {label} {0 if scores else 'undefined'} on the "
            f"{len(items)} images of split {split!r}: no predicted nucleus matches the "
            "annotations, so the saved settings are no better than any other",
            err=True,
        )
    if out is None:
        best.save(path / POSTPROC)
        saved = path / POSTPROC
    else:
        copy_run(path, out, postproc=best)
        saved = out / POSTPROC
    ranked = sorted(table, key=lambda r: -r["score"] if not math.isnan(r["score"]) else math.inf)
    rows = [
        {**{k: json.dumps(v) for k, v in r.items() if k != "score"}, label: r["score"]}
        for r in ranked[:SHOWN]
    ]
    click.echo(format_table(rows, list(grid) + [label]))
    unit = "tiles" if tile else "images"
    click.echo(
        f"\n{len(table)} configurations on {len(items)} {unit}; best {label} "
        f"{ranked[0]['score']:.4f} saved to {saved}"
    )


def _mask_scoring(run, datasets, split, max_images, tile, metric="auto") -> tuple[list, Any, str]:
    """Items and score function of the tuning against instance masks.

    ``metric`` "auto": mPQ+ on data with cell types (PQ without, and for class-agnostic
    methods); "pq": PQ; "aji": AJI (both over the split, a mean over datasets when several).
    The label names the score as printed: "mean PQ", "mean mPQ+/PQ" (typed datasets by mPQ+,
    the others by PQ) and so on for several datasets.
    """
    from kerasnuc.training.validation import score_predictions, score_summary, tile_items
    from kerasnuc.training.validation import val_items as load_val_items

    method = run.method
    items, num_classes = load_val_items(datasets, split, run.config.data.mpp, max_images)
    if tile is not None:
        items = tile_items(items, tile)
    model_classes = run.config.model.get("num_classes")
    typed_score = metric == "auto" and not method.class_agnostic  # PQ and AJI ignore the types
    if typed_score and num_classes == 0 and max(1, model_classes or 1) > 1:
        # Masks without cell types (e.g. Kumar) tune a classifying model by PQ: the
        # segmentation thresholds do not need the types.
        click.echo(
            f"note: the data has no cell types: tuning by PQ, the model's {model_classes} "
            "classes are not scored",
            err=True,
        )
    elif typed_score and max(1, num_classes) != model_classes:
        raise KerasnucError(
            f"the data has {num_classes} classes but the model was trained for "
            f"{run.config.model.get('num_classes')}"
        )
    if not typed_score:  # PQ / AJI whatever the data's classes
        num_classes = 0

    def score_fn(pred_instances: list, pred_classes: list) -> float:
        summary = score_predictions(pred_instances, pred_classes, items, num_classes)
        if metric == "aji":
            return float(summary["aji"])
        return score_summary(summary, num_classes)

    label = "AJI" if metric == "aji" else "mPQ+" if num_classes else "PQ"
    if len(datasets) > 1:
        # Each dataset is scored on its own and the score is the mean over them (with cell
        # types: mPQ+ of the typed datasets, PQ of the others).
        if label == "mPQ+" and not all(ds.has_classes for ds in datasets):
            label = "mPQ+/PQ"
        label = f"mean {label}"
    return items, score_fn, label


def _point_scoring(run, datasets, split, max_images, points, max_distance):
    """Items and score function of the detection-F1 tuning against point annotations."""
    from kerasnuc.io.points import read_points_path
    from kerasnuc.training.validation import point_items, point_score_fn

    given = read_points_path(points) if points else None
    if given is None:
        for ds in datasets:
            if not ds.is_points:
                click.echo(
                    f"note: {ds.root} has instance masks: scoring against their centroids",
                    err=True,
                )
    mpp = run.config.data.mpp
    items = point_items(datasets, split, mpp, max_images, given)
    n_points = sum(len(it.points) for it in items)
    if n_points == 0:
        roots = ", ".join(str(ds.root) for ds in datasets)
        raise KerasnucError(
            f"nothing can be scored: the {len(items)} images of split {split!r} of {roots} "
            "have no point annotations"
        )
    distance = max_distance / mpp if mpp else POINT_DISTANCE_PX
    return items, point_score_fn(items, distance), "det_F1"
