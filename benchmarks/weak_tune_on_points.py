"""Tune the weak post-processing settings on the TRAIN images against the training points only.

Score = pooled detection F1 (max distance 12 px = 3 um) between the post-processed instances'
centroids and the points the model was trained with (centroids of the train instance maps, as
weak_dataset derives them). No mask is used. Writes RUN/postproc.json (old one kept as
postproc.default.json).

Usage: ``python benchmarks/weak_tune_on_points.py RUN_DIR ['{"setting": [values], ...}']``
(default grid: peak threshold, minimum distance in um, smoothing).
"""

import shutil
import sys
from pathlib import Path

import numpy as np

from kerasnuc.data.dataset import Dataset
from kerasnuc.data.points import points_from_instances
from kerasnuc.metrics import DetectionResult, match_points
from kerasnuc.postprocess.weak import tune_weak_postproc
from kerasnuc.runs import load_run
from kerasnuc.training.validation import predict_all, val_items

run_dir = Path(sys.argv[1])
run = load_run(run_dir)
items, _ = val_items([Dataset(d) for d in run.config.data.datasets], run.config.data.train_split)
points = [points_from_instances(it.instances)[0] for it in items]  # the training points
maps = predict_all(run.model, items)


def score(instances, classes):
    tp = fp = fn = 0
    for inst, pts in zip(instances, points, strict=True):
        ids = np.unique(inst[inst > 0])
        rows, cols = np.nonzero(inst)
        lab = inst[rows, cols]
        pred = (
            np.stack(
                [
                    np.bincount(lab, rows)[ids] / np.bincount(lab)[ids],
                    np.bincount(lab, cols)[ids] / np.bincount(lab)[ids],
                ],
                axis=1,
            )
            if len(ids)
            else np.zeros((0, 2))
        )
        pairs = match_points(pts, pred, 12.0)
        n = len(pairs[0]) if isinstance(pairs, tuple) else len(pairs)
        tp, fp, fn = tp + n, fp + len(pred) - n, fn + len(pts) - n
    return DetectionResult.from_counts(tp, fp, fn).f1


grid = {
    "peak_threshold": [0.5, 0.7, 0.9],
    "min_distance_um": [2.5, 4.0, 6.0],
    "smooth_sigma": [0.0, 2.0],
}
if len(sys.argv) > 2:
    import json

    grid = json.loads(sys.argv[2])
best, table = tune_weak_postproc([m["seg"] for m in maps], grid, score, base_config=run.postproc)
for row in sorted(table, key=lambda r: -r["score"])[:8]:
    print(row)
if not (run_dir / "postproc.default.json").exists():
    shutil.copy(run_dir / "postproc.json", run_dir / "postproc.default.json")
best.save(run_dir / "postproc.json")
print("best", best)
