"""Per-class semantic IoU / Dice of a run's raw argmax on a dataset split (background included).

U-Net# (Stagys et al., Table II) scores the pixel class map of the semantic head directly, before
any instance post-processing; ``kerasnuc evaluate`` scores the post-processed class map. This
script gives the former, pooled over the images of the split (confusion matrices summed).

Usage::

    python benchmarks/semantic_iou.py RUN_DIR DATASET_DIR [--split val]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from kerasnuc.data.dataset import Dataset
from kerasnuc.metrics.semantic import confusion_matrix, iou_dice_from_confusion
from kerasnuc.models.maps import predict_maps
from kerasnuc.runs import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("dataset")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    run = load_run(args.run_dir)
    ds = Dataset(args.dataset)
    c = ds.num_classes
    cm = np.zeros((c + 1, c + 1), np.int64)
    for id in ds.split(args.split):
        pred = np.argmax(predict_maps(run.model, ds.image(id))["semantic"], axis=-1)
        cm += confusion_matrix(ds.classes(id), pred.astype(np.int32), c)
    iou, dice = iou_dice_from_confusion(cm)
    names = {0: "background", **ds.class_names}
    rows = {names[k]: {"iou": float(iou[k]), "dice": float(dice[k])} for k in range(c + 1)}
    rows["mean w/o background"] = {
        "iou": float(np.nanmean(iou[1:])),
        "dice": float(np.nanmean(dice[1:])),
    }
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
