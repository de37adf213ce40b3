"""Tune the weak post-processing settings on the TRAIN images against the training points only.

Score = pooled detection F1 (max distance 12 px = 3 um at 0.25 um/px) between the
post-processed instances' centroids and the points the model was trained with: ``--points DIR``
if given, else the run's own ``--points`` (``data.points`` of its config), else the points of a
points dataset, else the centroids of the train instance maps (as weak_dataset derives them).
No mask is used. Writes RUN/postproc.json (old one kept as postproc.default.json). Stops with one
line when there is nothing to score against.

Since ``kerasnuc tune RUN --data DIR --split train --points [DIR]`` does the same from the
command line, this script is its reproducible record for the README's weak table.

Usage: ``python benchmarks/weak_tune_on_points.py RUN_DIR [--points DIR] [--grid JSON]``
(default grid: peak threshold, minimum distance in um, smoothing).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from kerasnuc.data.dataset import Dataset
from kerasnuc.io.points import read_points_path
from kerasnuc.postprocess.weak import tune_weak_postproc
from kerasnuc.runs import load_run
from kerasnuc.training.validation import point_items, point_score_fn, predict_all

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("run_dir", type=Path)
parser.add_argument("--points", help="point files <image id>.csv/.geojson (default: the run's)")
parser.add_argument("--grid", help="JSON {setting: [values]}")
args = parser.parse_args()

run = load_run(args.run_dir)
source = args.points or run.config.data.points
points = read_points_path(source) if source else None
datasets = [Dataset(d, mpp=run.config.data.assumed_mpp(d)) for d in run.config.data.datasets]
items = point_items(datasets, run.config.data.train_split, run.config.data.mpp, points=points)
n_points = sum(len(it.points) for it in items)
if n_points == 0:
    sys.exit(f"{args.run_dir}: no training points to score against (pass --points DIR)")
print(f"{len(items)} images, {n_points} points from {source or 'the datasets'}")
maps = predict_all(run.model, items)
distance = 3.0 / run.config.data.mpp if run.config.data.mpp else 12.0
score = point_score_fn(items, distance)

grid = {
    "peak_threshold": [0.5, 0.7, 0.9],
    "min_distance_um": [2.5, 4.0, 6.0],
    "smooth_sigma": [0.0, 2.0],
}
if args.grid:
    grid = json.loads(args.grid)
best, table = tune_weak_postproc([m["seg"] for m in maps], grid, score, base_config=run.postproc)
for row in sorted(table, key=lambda r: -r["score"])[:8]:
    print(row)
if max((r["score"] for r in table if r["score"] == r["score"]), default=0.0) <= 0:
    sys.exit("every setting scores detection F1 0: no predicted nucleus is near a point")
if not (args.run_dir / "postproc.default.json").exists():
    shutil.copy(args.run_dir / "postproc.json", args.run_dir / "postproc.default.json")
best.save(args.run_dir / "postproc.json")
print("best", best)
