"""Scores at other magnifications: the val images shrunk as a 20x (or other) scanner would see them.

Each ``val`` image of Kumar and CoNSeP (40x, 0.25 um/px) is shrunk by ``--factors`` (2 = 20x,
0.5 um/px; area averaging of the RGB, nearest neighbour of the label maps, so every nucleus
keeps its id) and predicted as ``kerasnuc predict`` does (:func:`kerasnuc.segment`), twice:

* ``mpp given``: the shrunk image with its pixel size (``--mpp`` on the command line, or read
  from the file): the model resamples it to its own resolution and maps the result back;
* ``mpp not given``: the same pixels as if they were at the model's resolution (what happens to
  a PNG without a pixel size when ``--mpp`` is forgotten).

Scores (AJI, PQ, and mPQ+ on CoNSeP) are computed at the shrunk resolution against the shrunk
ground truth; factor 1 is the images as they are.

Usage::

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/magnification.py [--model default] \\
        [--data ../shared/data] [--factors 1 1.5 2] [--max-images N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from skimage.transform import resize

from kerasnuc.cli.common import format_table
from kerasnuc.data.dataset import Dataset
from kerasnuc.metrics.evaluation import aggregate, evaluate_pair

DATASETS = ("monuseg_kumar", "consep")


def shrink(image: np.ndarray, labels: list[np.ndarray], factor: float):
    """``image`` area-averaged and ``labels`` (nearest) to ``1 / factor`` of their side."""
    if factor == 1:
        return image, labels
    h, w = image.shape[:2]
    shape = (max(1, round(h / factor)), max(1, round(w / factor)))
    small = resize(image, shape, order=1, anti_aliasing=True, preserve_range=True)
    small = np.round(small).astype(np.uint8)
    rows = np.minimum((np.arange(shape[0]) + 0.5) * h / shape[0], h - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * w / shape[1], w - 1).astype(int)
    return small, [lab[np.ix_(rows, cols)] for lab in labels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    parser.add_argument("--max-images", type=int, default=None)
    args = parser.parse_args()

    from kerasnuc.api import load_predictor, segment

    data = load_predictor(args.model).data_config
    names = data.class_names
    model_mpp = data.mpp or 0.25
    table = []
    for name in DATASETS:
        root = args.data / name
        if not root.is_dir():
            print(f"skipping {name}: {root} not found", file=sys.stderr)
            continue
        ds = Dataset(root)
        typed = ds.has_classes and ds.class_names == names
        k = len(names) if typed else 0
        ids = ds.split("val")[: args.max_images]
        for factor in args.factors:
            mpp = (ds.mpp or model_mpp) * factor
            cases = [("mpp given", mpp)] + ([("mpp not given", None)] if factor != 1 else [])
            for label, told in cases:
                rows, t0 = [], time.perf_counter()
                for id in ids:
                    s = ds.sample(id)
                    labels = [s.instances] + ([s.classes] if typed else [])
                    image, labels = shrink(s.image, labels, factor)
                    # An array has no pixel size of its own: None is the forgotten --mpp.
                    res = segment(image, args.model, mpp=told)
                    rows.append(
                        evaluate_pair(
                            labels[0],
                            res.labels,
                            labels[1] if typed else None,
                            res.classes if typed else None,
                            k,
                            hausdorff=False,
                        )
                    )
                agg = aggregate(rows)
                table.append(
                    {
                        "dataset": name,
                        "um/px": round(mpp, 3),
                        "predicted with": label if factor != 1 else "as it is",
                        "aji": agg["aji"],
                        "pq": agg["pq"],
                        "det_f1": agg["det_f1"],
                        "mpq_plus": agg.get("mpq_plus"),
                    }
                )
                seconds = time.perf_counter() - t0
                print(f"{name} x1/{factor} {label}: {seconds:.0f} s", file=sys.stderr)
    cols = ["dataset", "um/px", "predicted with", "aji", "pq", "det_f1", "mpq_plus"]
    print(format_table(table, cols, "{:.3f}"))


if __name__ == "__main__":
    main()
