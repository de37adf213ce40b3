"""Speed of the ``conic`` post-processing on realistic 1000x1000 maps built from MoNuSeg labels.

The probability maps are made from a real ground-truth instance map (``monuseg_kumar``): the
three-label target (background / interior / 1-px inner boundary) and a semantic target with a
random cell type (seeded) per nucleus are blurred with a Gaussian, turned into logits, perturbed
with seeded Gaussian noise and passed through a softmax. The script prints the median seconds
per stage over ``--repeats`` runs and sanity figures: instance count vs ground truth, and
matches at IoU > 0.5 (unique by construction) with their class agreement.

Run with limited threads, from the repository root::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        python benchmarks/postprocess_speed.py --repeats 5

Data: ``$KERASNUC_DATA`` (default ``../shared/data`` relative to the repository root).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

from kerasnuc.cli.common import format_table  # noqa: E402
from kerasnuc.data.dataset import Dataset  # noqa: E402
from kerasnuc.postprocess.conic import ConicPostprocConfig, postprocess_conic  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGES = [
    "thresholds",
    "seeds",
    "watershed",
    "unseeded",
    "split",
    "fill_holes",
    "classes",
    "shape",
    "select",
]


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _soft_maps(
    onehot: np.ndarray, sigma: float, scale: float, noise: float, rng: np.random.Generator
) -> np.ndarray:
    blurred = ndi.gaussian_filter(onehot.astype(np.float32), sigma=(sigma, sigma, 0))
    logits = scale * blurred + noise * rng.standard_normal(onehot.shape, dtype=np.float32)
    return _softmax(logits)


def make_maps(
    instances: np.ndarray, num_classes: int, sigma: float, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Realistic ``(semantic, three_label, gt_classes)`` from a ground-truth instance map."""
    rng = np.random.default_rng(seed)
    fg = instances > 0
    boundary = fg & find_boundaries(instances, mode="inner")
    target = np.where(boundary, 2, np.where(fg, 1, 0))
    three_label = _soft_maps(np.eye(3, dtype=np.float32)[target], sigma, 6.0, noise, rng)
    cell_type = rng.integers(1, num_classes + 1, size=int(instances.max()) + 1)
    cell_type[0] = 0
    gt_classes = cell_type[instances].astype(np.int32)
    onehot = np.eye(num_classes + 1, dtype=np.float32)[gt_classes]
    semantic = _soft_maps(onehot, sigma, 6.0, noise, rng)
    return semantic, three_label, gt_classes


def match_figures(
    pred: np.ndarray, pred_cls: np.ndarray, gt: np.ndarray, gt_cls: np.ndarray
) -> dict[str, float]:
    """Pairs with IoU > 0.5 (each instance is in at most one such pair)."""
    both = (pred > 0) & (gt > 0)
    pairs, inter = np.unique(np.stack([pred[both], gt[both]]), axis=1, return_counts=True)
    area_p = np.bincount(pred.ravel())
    area_g = np.bincount(gt.ravel())
    iou = inter / (area_p[pairs[0]] + area_g[pairs[1]] - inter)
    hit = iou > 0.5
    n_pred, n_gt, tp = int(pred.max()), int(gt.max()), int(hit.sum())
    cls_p = np.zeros(n_pred + 1, np.int64)
    cls_p[pred.ravel()] = pred_cls.ravel()
    cls_g = np.zeros(n_gt + 1, np.int64)
    cls_g[gt.ravel()] = gt_cls.ravel()
    agree = cls_p[pairs[0][hit]] == cls_g[pairs[1][hit]]
    return {
        "f1@0.5": 2 * tp / max(n_pred + n_gt, 1),
        "mean IoU (matched)": float(iou[hit].mean()) if tp else 0.0,
        "class agreement (matched)": float(agree.mean()) if tp else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--id",
        default=None,
        help="monuseg_kumar image id (default: the one with the nuclei count closest to 500)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--classes", type=int, default=6, help="number of cell types C")
    parser.add_argument("--sigma", type=float, default=1.0, help="Gaussian blur of the targets")
    parser.add_argument("--noise", type=float, default=1.0, help="std of the logit noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--per-class",
        action="store_true",
        help="give the thresholds as per-class mappings (exercises the per-pixel lookup)",
    )
    args = parser.parse_args(argv)

    cv2.setNumThreads(1)
    root = Path(os.environ.get("KERASNUC_DATA", REPO.parent / "shared" / "data"))
    ds = Dataset(root / "monuseg_kumar")
    if args.id is None:
        counts = {i: int(ds.instances(i).max()) for i in ds.ids}
        image_id = min(counts, key=lambda i: (abs(counts[i] - 500), i))
    else:
        image_id = args.id
    gt = ds.instances(image_id)
    semantic, three_label, gt_cls = make_maps(gt, args.classes, args.sigma, args.noise, args.seed)
    if args.per_class:
        per_class = {k: 0.5 for k in range(args.classes + 1)}
        config = ConicPostprocConfig(
            fg_threshold=per_class,
            seed_threshold=per_class,
            min_size={k: 10 for k in range(1, args.classes + 1)},
            min_solidity={k: 0.5 for k in range(1, args.classes + 1)},
        )
    else:
        config = ConicPostprocConfig(fg_threshold=0.5, seed_threshold=0.5, min_size=10)

    runs = []
    result = None
    for _ in range(args.repeats):
        timings: dict[str, float] = {}
        start = time.perf_counter()
        result = postprocess_conic(semantic, three_label, config, timings=timings)
        timings["total"] = time.perf_counter() - start
        runs.append(timings)
    assert result is not None
    rows = [
        {"stage": name, "median s": float(np.median([r.get(name, 0.0) for r in runs]))}
        for name in [*STAGES, "total"]
    ]
    print(
        f"image {image_id} {gt.shape[0]}x{gt.shape[1]}, C={args.classes}, "
        f"per-class thresholds={args.per_class}, sigma={args.sigma}, noise={args.noise}, "
        f"repeats={args.repeats}, "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )
    print(format_table(rows, ["stage", "median s"]))
    sanity = {"GT nuclei": int(gt.max()), "predicted nuclei": result.num_instances}
    sanity.update(match_figures(result.instances, result.classes, gt, gt_cls))
    print()
    print(format_table([{"figure": k, "value": v} for k, v in sanity.items()], ["figure", "value"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
