"""Does ``unet_sharp`` lose its training-mode quality in inference mode, and does a batch-norm
re-estimation pass (:func:`kerasnuc.models.batchnorm.reestimate_batch_norm`) bring it back?

Part 1 (decoder batch norms, the lag of the moving averages): the reduced-width model of
``benchmarks/unet_sharp_overfit.py`` (BN trainable, no frozen phase, in-model Macenko) trains
on random ``--crop`` px crops of the ``train`` images (batch ``--batch``, the method's loss
and optimizer at ``--lr``); every ``--eval-every`` steps one row: background / mean
nucleus-class IoU of the argmax on held-out ``val`` crops (pooled pixels) in inference mode
with the moving statistics as trained, in training mode (batch statistics of the val batch),
and in inference mode after re-estimating the statistics from ``--reestimate-batches`` training
batches (the trained moving statistics are put back afterwards, so the run itself is not
changed by the probe).

Part 2 (the frozen-encoder phase): the per-level standard deviation of the encoder features
``P1..P5`` of a freshly initialised (random) encoder on training crops, with the batch norms at
their initial statistics (mean 0, variance 1: what a frozen, never-calibrated encoder computes
in both modes) and after re-estimating them from the same crops.

Example (one core, a few minutes)::

    taskset -c 1 python benchmarks/unet_sharp_bn_probe.py --data ../shared/data/consep
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import keras
import numpy as np

from kerasnuc.data.dataset import Dataset
from kerasnuc.data.stain import fit_macenko_reference
from kerasnuc.models.batchnorm import reestimate_batch_norm, reestimated_layers
from kerasnuc.optimizers.adabound import AdaBound
from kerasnuc.registry import UNET_SHARP_FINAL_LR, UNET_SHARP_GAMMA, get_method

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet_sharp_overfit import SMALL  # noqa: E402  (the same reduced-width model)


def random_crops(ds: Dataset, split: str, n: int, crop: int, rng: np.random.Generator):
    ids = ds.split(split)
    images, classes = [], []
    for _ in range(n):
        s = ds.sample(ids[rng.integers(len(ids))])
        h, w = s.classes.shape
        y0, x0 = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        images.append(s.image[y0 : y0 + crop, x0 : x0 + crop])
        classes.append(s.classes[y0 : y0 + crop, x0 : x0 + crop])
    return np.stack(images).astype(np.float32) / 255.0, np.stack(classes).astype(np.int32)


def bg_nuc_iou(truth: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    pred = probs.argmax(-1)
    ious = []
    for c in range(probs.shape[-1]):
        t, p = truth == c, pred == c
        union = np.logical_or(t, p).sum()
        ious.append(np.logical_and(t, p).sum() / union if union else np.nan)
    return float(ious[0]), float(np.nanmean(ious[1:]))


def predict(model, x: np.ndarray, training: bool, batch: int) -> np.ndarray:
    return np.concatenate(
        [np.asarray(model(x[i : i + batch], training=training)["semantic"])
         for i in range(0, len(x), batch)]
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/consep")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--train-crops", type=int, default=64)
    parser.add_argument("--val-crops", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--reestimate-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    ds = Dataset(args.data)
    num_classes = max(1, len(ds.class_names))
    x_train, y_train = random_crops(ds, "train", args.train_crops, args.crop, rng)
    x_val, y_val = random_crops(ds, "val", args.val_crops, args.crop, rng)
    method = get_method("unet_sharp")
    norm = fit_macenko_reference([ds], "train", max_images=32, seed=args.seed)
    cfg = dict(SMALL, num_classes=num_classes, stain_reference=norm.to_dict())

    # Part 2 first, on a fresh model: a random encoder's features with initial BN statistics.
    model = method.build(method.model_config.from_dict(cfg))
    encoder = model.get_layer("encoder")
    probe = keras.Model(model.input, encoder(model.get_layer("macenko").output))
    xs = x_train[: 4 * args.batch]
    stds_init = {k: float(np.std(v)) for k, v in probe(xs, training=False).items()}
    reestimate_batch_norm(encoder, [model.get_layer("macenko")(xs[i : i + args.batch])
                                    for i in range(0, len(xs), args.batch)])  # fmt: skip
    stds_cal = {k: float(np.std(v)) for k, v in probe(xs, training=False).items()}
    print("random encoder, feature std with initial BN statistics (frozen, mean 0 / var 1) vs "
          "re-estimated from training crops:")  # fmt: skip
    for k in sorted(stds_init):
        print(f"  {k}: {stds_init[k]:10.3f}  vs {stds_cal[k]:7.3f}")

    # Part 1: the lag of the decoder's (and the trainable encoder's) moving statistics.
    keras.utils.set_random_seed(args.seed)
    model = method.build(method.model_config.from_dict(cfg))
    opt = AdaBound(learning_rate=args.lr, final_lr=UNET_SHARP_FINAL_LR, gamma=UNET_SHARP_GAMMA)
    model.compile(optimizer=opt, loss=method.losses(num_classes))
    layers = reestimated_layers(model)
    print(f"\n{model.count_params():,} parameters, {len(layers)} trainable batch norms; "
          f"crops {args.crop}, batch {args.batch}, lr {args.lr}")  # fmt: skip
    header = ("step", "sec", "loss", "inf bg/nuc", "train bg/nuc", "reest bg/nuc", "tr-crops inf")
    print(" | ".join(f"{h:>13}" for h in header))
    start, done, loss = time.time(), 0, float("nan")
    order = np.random.default_rng(args.seed + 1)
    while done < args.steps:
        for _ in range(args.eval_every):
            idx = order.choice(len(x_train), args.batch, replace=False)
            loss = float(model.train_on_batch(x_train[idx], {"semantic": y_train[idx]}))
        done += args.eval_every
        inf = bg_nuc_iou(y_val, predict(model, x_val, False, args.batch))
        trm = bg_nuc_iou(y_val, predict(model, x_val, True, args.batch))
        tr_inf = bg_nuc_iou(
            y_train[: 4 * args.batch], predict(model, x_train[: 4 * args.batch], False, args.batch)
        )
        saved = [(bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in layers]
        picks = order.choice(len(x_train), args.reestimate_batches * args.batch)
        reestimate_batch_norm(
            model, [x_train[picks[i : i + args.batch]] for i in range(0, len(picks), args.batch)]
        )
        rest = bg_nuc_iou(y_val, predict(model, x_val, False, args.batch))
        for bn, (m, v) in zip(layers, saved, strict=True):
            bn.moving_mean.assign(m)
            bn.moving_variance.assign(v)
        cells = [
            f"{inf[0]:.2f}/{inf[1]:.2f}",
            f"{trm[0]:.2f}/{trm[1]:.2f}",
            f"{rest[0]:.2f}/{rest[1]:.2f}",
            f"{tr_inf[0]:.2f}/{tr_inf[1]:.2f}",
        ]
        print(" | ".join([f"{done:>13d}", f"{time.time() - start:>13.0f}", f"{loss:>13.4f}",
                          *[f"{c:>13}" for c in cells]]), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
