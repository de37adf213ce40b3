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


@click.command("tune")
@click.argument("run_dir", type=click.Path(path_type=Path))
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
    type=click.IntRange(min=32),
    help="Predict and score non-overlapping tiles of at most N px instead of whole images (for "
    "dense images with panoptic, whose forward pass has max_detections slots; or big images).",
)
@verbose_option
def tune(
    run_dir: Path,
    data_dirs: tuple[str, ...],
    split: str,
    grid_file: Path | None,
    max_images: int | None,
    tile: int | None,
) -> None:
    """Tune the post-processing of RUN_DIR on a labelled split; write RUN_DIR/postproc.json.

    Each image is predicted once; every grid configuration is scored with mPQ+ (PQ for data
    without classes, and for weak runs) over the whole split, and the best one is saved.
    Default grids: conic foreground/seed thresholds and minimum size; unet_sharp foreground
    threshold, marker distance and minimum size; weak peak threshold, minimum detection
    distance (um) and smoothing; panoptic detection score, mask threshold and extra box NMS.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    grid = read_grid(grid_file) if grid_file is not None else None
    if run_dir.is_dir():
        check_writable_dir(run_dir)  # postproc.json is written there at the end
    dirs = [dataset_path(d) for d in data_dirs]
    for d in dirs:
        if not d.is_dir():
            raise KerasnucError(f"{d}: not a dataset folder")
    from kerasnuc.data.dataset import Dataset
    from kerasnuc.runs import POSTPROC, load_run
    from kerasnuc.training.validation import (
        predict_all,
        score_predictions,
        score_summary,
        tile_items,
    )
    from kerasnuc.training.validation import val_items as load_val_items

    run = load_run(run_dir)
    method = run.method
    if grid is None:
        grid = method.tune_grid
    items, num_classes = load_val_items(
        [Dataset(d, mpp=run.config.data.assumed_mpp(d)) for d in dirs],
        split,
        run.config.data.mpp,
        max_images,
    )
    if tile is not None:
        items = tile_items(items, tile)
    if not method.class_agnostic and max(1, num_classes) != run.config.model.get("num_classes"):
        raise KerasnucError(
            f"the data has {num_classes} classes but the model was trained for "
            f"{run.config.model.get('num_classes')}"
        )
    with click.progressbar(items, label=f"predicting {len(items)} images") as bar:
        maps = predict_all(run.model, list(bar))
    if method.class_agnostic:  # scored by PQ whatever the data's classes
        num_classes = 0

    def score_fn(pred_instances: list, pred_classes: list) -> float:
        summary = score_predictions(pred_instances, pred_classes, items, num_classes)
        return score_summary(summary, num_classes)

    try:
        best, table = method.tune(maps, grid, score_fn, run.postproc)
    except ValueError as exc:
        raise KerasnucError(f"invalid grid: {exc}") from exc
    best.save(run_dir / POSTPROC)
    metric = "mPQ+" if num_classes else "PQ"
    ranked = sorted(table, key=lambda r: -r["score"] if not math.isnan(r["score"]) else math.inf)
    rows = [
        {**{k: json.dumps(v) for k, v in r.items() if k != "score"}, metric: r["score"]}
        for r in ranked[:SHOWN]
    ]
    click.echo(format_table(rows, list(grid) + [metric]))
    unit = "tiles" if tile else "images"
    click.echo(
        f"\n{len(table)} configurations on {len(items)} {unit}; best {metric} "
        f"{ranked[0]['score']:.4f} saved to {run_dir / POSTPROC}"
    )
