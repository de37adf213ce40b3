"""Where a model loses its cell-type score: wrong types or wrong outlines.

Predicts every ``val`` image of a typed dataset as ``kerasnuc predict`` does
(:func:`kerasnuc.segment`: the model's own views, precision and post-processing) and prints

1. the confusion matrix of the types of matched nuclei (ground truth vs prediction, matched as
   for PQ: IoU > 0.5) and the type accuracy among them;
2. CoNIC mPQ+ with its per-class PQ+ as predicted, and with the types of the matched nuclei
   replaced by the true ones: the score a perfect classifier of the same outlines would reach,
   so the gap between the two rows is what better typing can win and the rest is segmentation;
3. a seeded bootstrap over the images (``--bootstrap`` resamples): the 5 / 50 / 95 % points of
   mPQ+, i.e. how much a validation figure moves with the images drawn. Images cut from one
   slide are not independent, so the true spread is wider than this.

mPQ+ follows the CoNIC definition (per-class TP, FP, FN and IoU sums pooled over the images); the
matched pairs of a class are the matched nuclei whose true and predicted types are both that
class, which is what scoring the per-class instance maps gives, since a match at IoU > 0.5 is
unique.

Usage::

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/type_errors.py [--model default] \\
        [--data ../shared/data] [--dataset consep] [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kerasnuc.cli.common import format_table
from kerasnuc.data.dataset import Dataset
from kerasnuc.metrics.evaluation import instance_types
from kerasnuc.metrics.instance import PQResult, mpq_plus, pair_stats


@dataclass
class ImageTypes:
    """Types and matches of one image: enough to recount mPQ+ with any predicted types."""

    gt_type: np.ndarray  # (N,) 1..C
    pred_type: np.ndarray  # (M,) 1..C
    gt_index: np.ndarray  # (T,) matched true nucleus
    pred_index: np.ndarray  # (T,) matched predicted nucleus
    iou: np.ndarray  # (T,)


def image_types(gt_inst, gt_cls, pred_inst, pred_cls, num_classes: int) -> ImageTypes:
    gi, pi, iou = pair_stats(gt_inst, pred_inst).match(0.5)
    return ImageTypes(
        instance_types(gt_inst, gt_cls, num_classes),
        instance_types(pred_inst, pred_cls, num_classes),
        gi,
        pi,
        iou,
    )


def class_counts(images: list[ImageTypes], num_classes: int, oracle: bool = False) -> np.ndarray:
    """``(C, 4)`` pooled TP, FP, FN and IoU sum per class; ``oracle``: matched types = truth."""
    out = np.zeros((num_classes, 4))
    for im in images:
        pred_type = im.pred_type.copy()
        if oracle:
            pred_type[im.pred_index] = im.gt_type[im.gt_index]
        true, pred = im.gt_type[im.gt_index], pred_type[im.pred_index]
        for c in range(1, num_classes + 1):
            hit = (true == c) & (pred == c)
            tp = int(hit.sum())
            out[c - 1] += (
                tp,
                int((pred_type == c).sum()) - tp,
                int((im.gt_type == c).sum()) - tp,
                float(im.iou[hit].sum()),
            )
    return out


def mpq_from_counts(counts: np.ndarray) -> tuple[float, list[float]]:
    return mpq_plus([PQResult.from_counts(int(a), int(b), int(c), d) for a, b, c, d in counts])


def confusion(images: list[ImageTypes], num_classes: int) -> np.ndarray:
    """``(C, C)`` counts of matched nuclei, rows true type, columns predicted type."""
    cm = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for im in images:
        np.add.at(cm, (im.gt_type[im.gt_index], im.pred_type[im.pred_index]), 1)
    return cm[1:, 1:]


def predict_images(model: str, root: Path) -> tuple[list[ImageTypes], dict[int, str]]:
    from kerasnuc.api import load_predictor, segment

    data = load_predictor(model).data_config
    names = data.class_names
    ds = Dataset(root)
    if not ds.has_classes or ds.class_names != names:
        sys.exit(f"{root}: its cell types {ds.class_names} are not the model's {names}")
    out = []
    t0 = time.perf_counter()
    for id in ds.split("val"):
        s = ds.sample(id)
        res = segment(s.image, model, mpp=ds.mpp or data.mpp)
        out.append(image_types(s.instances, s.classes, res.labels, res.classes, len(names)))
    seconds = time.perf_counter() - t0
    print(f"{root.name}: {len(out)} val images in {seconds:.0f} s", file=sys.stderr)
    return out, {int(k): v for k, v in names.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--dataset", default="consep")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images, names = predict_images(args.model, args.data / args.dataset)
    k = len(names)
    cm = confusion(images, k)
    rows = [
        {"true \\ predicted": names[c], **{names[j]: int(cm[c - 1, j - 1]) for j in names}}
        for c in names
    ]
    print(format_table(rows, ["true \\ predicted", *names.values()]))
    pairs = int(cm.sum())
    print(f"type accuracy of matched nuclei: {np.trace(cm) / max(pairs, 1):.3f} of {pairs}\n")

    table = []
    for label, oracle in (("as predicted", False), ("matched types from the truth", True)):
        mpq, per_class = mpq_from_counts(class_counts(images, k, oracle))
        per_name = dict(zip(names.values(), per_class, strict=True))
        table.append({"types": label, "mPQ+": mpq, **per_name})
    print(format_table(table, ["types", "mPQ+", *names.values()], "{:.3f}"))

    if args.bootstrap:
        rng = np.random.default_rng(args.seed)
        scores = []
        for _ in range(args.bootstrap):
            draw = rng.integers(0, len(images), len(images))
            scores.append(mpq_from_counts(class_counts([images[i] for i in draw], k))[0])
        low, mid, high = np.percentile(scores, [5, 50, 95])
        print(
            f"\nmPQ+ over {args.bootstrap} bootstrap draws of the {len(images)} images: "
            f"5 % {low:.3f}, median {mid:.3f}, 95 % {high:.3f} (sd {np.std(scores):.3f})"
        )


if __name__ == "__main__":
    main()
