"""Overfit the panoptic model on two MoNuSeg (TCGA-Kumar) crops: can the whole chain learn?

Trains :class:`kerasnuc.models.panoptic.model.PanopticModel` (all seven losses of Eq. 4) on
two fixed ``crop x crop`` crops of two ``train`` images of ``monuseg_kumar``, with the panoptic
pipeline's targets (:func:`kerasnuc.data.targets.panoptic_box_targets`) and no augmentation,
then predicts the same crops and scores them with the real post-processing
(:func:`kerasnuc.postprocess.panoptic.postprocess_panoptic`) and AJI / pixel F1 / PQ. Prints one
table row per evaluation and the seven losses.

Example (CPU, a few minutes)::

    python benchmarks/panoptic_overfit.py --data ../shared/data/monuseg_kumar --steps 300
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np

from kerasnuc.config import TrainConfig
from kerasnuc.data.dataset import Dataset
from kerasnuc.data.targets import panoptic_targets
from kerasnuc.metrics import aji, panoptic_quality
from kerasnuc.metrics.semantic import pixel_scores
from kerasnuc.models.maps import predict_maps
from kerasnuc.models.panoptic.model import LOSS_NAMES, PanopticModelConfig, build_panoptic
from kerasnuc.optimizers.schedules import build_sgd_warmup_step
from kerasnuc.postprocess.panoptic import PanopticPostprocConfig, postprocess_panoptic

SMALL = dict(
    encoder="tiny",
    tiny_widths=(32, 64, 96, 128),
    fpn_filters=64,
    box_fc_units=256,
    mask_conv_filters=64,
    mask_fc_filters=32,
    mask_up_filters=64,
    rpn_pre_nms=600,
    rpn_post_nms=300,
    rpn_pre_nms_test=600,
    rpn_post_nms_test=300,
    roi_batch=128,
    max_mask_rois=64,
    max_detections=150,
)


def load_crops(root: str, crop: int, max_instances: int, n_images: int = 2):
    ds = Dataset(root)
    ids = ds.split("train")[:n_images]
    images, instances = [], []
    for i in ids:
        s = ds.sample(i)
        h, w = s.instances.shape
        y0, x0 = (h - crop) // 2, (w - crop) // 2
        images.append(s.image[y0 : y0 + crop, x0 : x0 + crop])
        instances.append(s.instances[y0 : y0 + crop, x0 : x0 + crop])
    return ids, np.stack(images), panoptic_targets(np.stack(instances), max_instances)


def evaluate(model, images, instances, postproc):
    ajis, f1s, pqs, counts = [], [], [], []
    for img, gt in zip(images, instances, strict=True):
        res = postprocess_panoptic(predict_maps(model, img), postproc)
        ajis.append(aji(gt, res.instances))
        f1s.append(pixel_scores(gt > 0, res.instances > 0)["f1"])
        pqs.append(panoptic_quality(gt, res.instances).pq)
        counts.append(res.num_instances)
    return float(np.mean(ajis)), float(np.mean(f1s)), float(np.mean(pqs)), counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/monuseg_kumar")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--optimizer",
        choices=("adam", "sgd"),
        default="adam",
        help="adam (fast overfitting) or the method's SGD + warm-up + step decay",
    )
    parser.add_argument("--max-instances", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    ids, images, targets = load_crops(args.data, args.crop, args.max_instances)
    n_gt = [int((c > 0).sum()) for c in targets["classes"]]
    print(f"images: {ids}, crops {args.crop}x{args.crop}, nuclei per crop: {n_gt}")
    model = build_panoptic(PanopticModelConfig(**SMALL, seed=args.seed))
    print(f"model: {model.count_params():,} parameters ({SMALL['encoder']} encoder)")
    if args.optimizer == "sgd":
        train = TrainConfig(learning_rate=args.lr, optimizer="sgd")
        model.compile(optimizer=build_sgd_warmup_step(train, args.steps))
    else:
        model.compile(optimizer=keras.optimizers.Adam(args.lr))
    x = images.astype(np.float32) / 255.0
    postproc = PanopticPostprocConfig()

    header = ["step", "sec", *[n.replace("_loss", "") for n in LOSS_NAMES], "AJI", "F1", "PQ", "n"]
    print(" | ".join(f"{h:>8}" for h in header))
    start = time.time()
    done = 0
    while done < args.steps:
        chunk = min(args.eval_every, args.steps - done)
        hist = model.fit(x, targets, batch_size=len(x), epochs=chunk, verbose=0, shuffle=False)
        done += chunk
        losses = [hist.history[n][-1] for n in LOSS_NAMES]
        a, f, p, n = evaluate(model, images, targets["instances"], postproc)
        row = [done, time.time() - start, *losses, a, f, p]
        print(
            " | ".join(f"{v:>8d}" if isinstance(v, int) else f"{v:>8.4f}" for v in row) + f" | {n}",
            flush=True,
        )
    print(f"final AJI {a:.4f} (target > 0.7), pixel F1 {f:.4f}, PQ {p:.4f}")


if __name__ == "__main__":
    main()
