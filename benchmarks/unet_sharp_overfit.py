"""Overfit ``unet_sharp`` on two CoNSeP crops: can the whole chain learn?

Builds a small U-Net# through the registry (``unet_sharp`` model config: ResNeXt-50 at reduced
width as in ``runs/unet_sharp_cpu.json``, no frozen-encoder phase, batch normalisation trainable,
in-model Macenko normalisation onto a reference fitted on the CoNSeP training images), trains it
on two fixed crops of two ``train`` images (all four cell types present) with the method's loss
(Focal Tversky, beta 0.7, gamma 4/3, background included; or ``--loss ce`` for plain sparse
cross-entropy) and optimizer (AdaBound, final lr 0.1, gamma 1e-3; or ``--optimizer adam``), with
no augmentation, and every ``--eval-every`` steps prints one row: the training loss, the
per-class IoU (background included) of the argmax of the softmax on those crops (pooled over the
two crops, model in inference mode; the last two columns: background and mean nucleus-class IoU
with batch statistics, i.e. training mode, which also moves the batch-norm averages one step),
and PQ / AJI / pixel F1 of the method's post-processing against the ground truth
(:func:`kerasnuc.metrics.evaluation.evaluate_pair`, mean of the crops).

Example (CPU, about 15 minutes)::

    python benchmarks/unet_sharp_overfit.py --data ../shared/data/consep --steps 300
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np

from kerasnuc.data.dataset import Dataset
from kerasnuc.data.stain import fit_macenko_reference
from kerasnuc.metrics.evaluation import evaluate_pair
from kerasnuc.optimizers.adabound import AdaBound
from kerasnuc.registry import UNET_SHARP_FINAL_LR, UNET_SHARP_GAMMA, get_method

#: Two CoNSeP train patches where all four cell types occur.
DEFAULT_IDS = ("train_19_005", "train_10_009")

#: Reduced-width model of ``runs/unet_sharp_cpu.json``, frozen phase off, BN trainable.
SMALL = dict(
    encoder="resnext50",
    encoder_width_scale=0.5,
    skip_filters=16,
    decoder_filters=64,
    head_filters=16,
    aspp_filters=64,
    freeze_encoder_epochs=0,
    freeze_encoder_batchnorm=False,
)


def load_crops(root: str, ids, crop: int):
    ds = Dataset(root)
    images, instances, classes = [], [], []
    for i in ids:
        s = ds.sample(i)
        h, w = s.instances.shape
        y0, x0 = (h - crop) // 2, (w - crop) // 2
        images.append(s.image[y0 : y0 + crop, x0 : x0 + crop])
        instances.append(s.instances[y0 : y0 + crop, x0 : x0 + crop])
        classes.append(s.classes[y0 : y0 + crop, x0 : x0 + crop])
    return ds, np.stack(images), np.stack(instances), np.stack(classes)


def class_ious(truth: np.ndarray, pred: np.ndarray, num_labels: int) -> list[float]:
    """IoU of every label 0..num_labels-1 pooled over all pixels (NaN where absent in both)."""
    out = []
    for c in range(num_labels):
        t, p = truth == c, pred == c
        union = np.logical_or(t, p).sum()
        out.append(float(np.logical_and(t, p).sum() / union) if union else float("nan"))
    return out


def evaluate(model, method, postproc, x, instances, classes, num_classes):
    probs = np.asarray(model(x, training=False)["semantic"])
    ious = class_ious(classes, probs.argmax(-1), num_classes + 1)
    scores = []
    for p, gi, gc in zip(probs, instances, classes, strict=True):
        res = method.postprocess({"semantic": p}, postproc)
        m = evaluate_pair(gi, res.instances, gc, res.classes, num_classes, hausdorff=False)
        scores.append((m["pq"], m["aji"], m["pixel_f1"], res.num_instances))
    pq, aji, f1, _ = np.mean(np.array(scores, dtype=np.float64), axis=0)
    fg = float((probs[..., 0] < 0.5).mean())
    # The same argmax with batch statistics (training mode): what the loss sees. Differs from the
    # inference-mode one while the batch-norm moving averages still lag (momentum 0.99 in the
    # decoder: 0.99 ** 100 = 37 % of the initial statistics are left after 100 steps).
    train_probs = np.asarray(model(x, training=True)["semantic"])
    train_ious = class_ious(classes, train_probs.argmax(-1), num_classes + 1)
    return ious, float(pq), float(aji), float(f1), [s[3] for s in scores], fg, train_ious


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/consep")
    parser.add_argument("--ids", nargs="+", default=list(DEFAULT_IDS))
    parser.add_argument("--crop", type=int, default=192)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss", choices=("ftl", "ce"), default="ftl")
    parser.add_argument("--optimizer", choices=("adabound", "adam"), default="adabound")
    parser.add_argument("--no-stain", action="store_true", help="no Macenko layer")
    parser.add_argument("--max-minutes", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    method = get_method("unet_sharp")
    ds, images, instances, classes = load_crops(args.data, args.ids, args.crop)
    num_classes = len(ds.class_names)
    counts = [[int((c == k).sum()) for k in range(num_classes + 1)] for c in classes]
    print(f"images {args.ids}, crops {args.crop}x{args.crop}, pixels per class {counts}")

    model_cfg = dict(SMALL, num_classes=num_classes, stain_normalization=not args.no_stain)
    if not args.no_stain:
        norm = fit_macenko_reference([ds], "train", max_images=32, seed=args.seed)
        model_cfg["stain_reference"] = norm.to_dict()
    model = method.build(method.model_config.from_dict(model_cfg))
    print(f"model: {model.count_params():,} parameters")

    if args.loss == "ce":
        loss = {"semantic": keras.losses.SparseCategoricalCrossentropy()}
    else:
        loss = method.losses(num_classes)
    if args.optimizer == "adam":
        opt = keras.optimizers.Adam(args.lr)
    else:
        opt = AdaBound(learning_rate=args.lr, final_lr=UNET_SHARP_FINAL_LR, gamma=UNET_SHARP_GAMMA)
    model.compile(optimizer=opt, loss=loss)
    print(f"loss {args.loss}, optimizer {args.optimizer} lr {args.lr}, batch {len(images)}")

    x = images.astype(np.float32) / 255.0
    if not args.no_stain:
        xn = np.asarray(model.get_layer("macenko")(x))
        print(f"Macenko output range [{xn.min():.3f}, {xn.max():.3f}], mean {xn.mean():.3f}")
    y = {"semantic": classes.astype(np.int32)}
    postproc = method.postproc_config()
    names = ["bg", *[f"c{k}" for k in range(1, num_classes + 1)]]
    header = ["step", "sec", "loss", *[f"IoU_{n}" for n in names], "mIoU_nuc", "fg_frac"]
    header += ["PQ", "AJI", "pix_F1", "trIoU_bg", "trIoU_nu"]
    print(" | ".join(f"{h:>8}" for h in header) + " | n_inst")
    start = time.time()
    done, loss_value = 0, float("nan")

    def row():
        ious, pq, aji, f1, n, fg, t_ious = evaluate(
            model, method, postproc, x, instances, classes, num_classes
        )
        vals = [done, time.time() - start, loss_value, *ious, float(np.nanmean(ious[1:])), fg]
        vals += [pq, aji, f1, t_ious[0], float(np.nanmean(t_ious[1:]))]
        text = " | ".join(f"{v:>8d}" if isinstance(v, int) else f"{v:>8.4f}" for v in vals)
        print(f"{text} | {n}", flush=True)
        return ious, pq

    row()
    while done < args.steps and time.time() - start < args.max_minutes * 60:
        chunk = min(args.eval_every, args.steps - done)
        hist = model.fit(x, y, batch_size=len(x), epochs=chunk, verbose=0, shuffle=False)
        done += chunk
        loss_value = float(hist.history["loss"][-1])
        ious, pq = row()
    nuc = float(np.nanmean(ious[1:]))
    ok = ious[0] > 0.9 and nuc > 0.5 and pq > 0.5
    print(
        f"final: background IoU {ious[0]:.4f}, mean nucleus-class IoU {nuc:.4f}, PQ {pq:.4f} "
        f"-> {'LEARNS' if ok else 'does not reach the targets'} (bg > 0.9, nuc > 0.5, PQ > 0.5)"
    )


if __name__ == "__main__":
    main()
