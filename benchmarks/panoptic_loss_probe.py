"""The seven panoptic loss terms of every epoch of a run, on one fixed probe sample.

The epoch means that ``kerasnuc train`` logs are not a learning curve of the box and mask heads:
those heads see the RPN's current proposals, and as the RPN learns, the sampled ROIs change
(more positives that are not ground-truth copies, negatives that touch nuclei). The per-positive
``det_reg`` and the ``det_cls`` epoch means can then rise while every head gets better.

This script scores every snapshot of a run trained with ``--keep-epoch-weights`` (and the
run's random initialisation as epoch 0) on the **same** examples:
:meth:`kerasnuc.models.panoptic.model.PanopticModel.probe_losses` on centre crops of ``val``
images with a fixed anchor/ROI sampling seed and fixed candidate ROIs for the box and mask heads:

* ``--proposals final`` (default): the proposals of the run's last snapshot on the crops, i.e. the
  kind of ROIs the trained heads see at inference;
* ``--proposals jitter``: every ground-truth box jittered ``--jitter`` times plus
  ``--background`` random boxes of nucleus size (independent of any model; hard: many
  candidates have an IoU near the 0.5 positive threshold).

It prints one row per epoch: the seven terms of Eq. 4, their sum and the positive counts.

Example::

    python benchmarks/panoptic_loss_probe.py runs/panoptic_kumar \\
        --data ../shared/data/monuseg_kumar --crops 8 --json runs/probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import keras
import numpy as np

from kerasnuc.config import RunConfig
from kerasnuc.data.dataset import Dataset
from kerasnuc.data.pipeline import PipelineConfig
from kerasnuc.data.targets import panoptic_targets
from kerasnuc.models.panoptic.model import LOSS_NAMES, STAT_NAMES
from kerasnuc.registry import get_method
from kerasnuc.runs import EPOCH_WEIGHTS_DIR, build_model, load_config
from kerasnuc.training.trainer import open_datasets
from kerasnuc.training.validation import val_items


def probe_set(items, crop: int, slots: int):
    """Centre ``crop x crop`` crops of the items and the pipeline's panoptic targets."""
    images, instances = [], []
    for it in items:
        h, w = it.instances.shape
        y0, x0 = max((h - crop) // 2, 0), max((w - crop) // 2, 0)
        instances.append(it.instances[y0 : y0 + crop, x0 : x0 + crop])
        images.append(it.image[y0 : y0 + crop, x0 : x0 + crop].astype(np.float32) / 255.0)
    return np.stack(images), panoptic_targets(np.stack(instances), slots)


def probe_proposals(boxes, classes, size: int, jitter: int, background: int, seed: int):
    """Fixed candidate ROIs ``(B, P, 4)``: jittered gt boxes and random nucleus-sized boxes.

    Each valid gt box gets ``jitter`` copies with its centre moved by up to 30 % of its side and
    its sides scaled by ``exp(U(-0.3, 0.3))``, so that their IoUs with the gt spread over about
    0.3-0.9 (positives and hard negatives); the random boxes have the side lengths of the crop's
    gt boxes. Padded to the same ``P`` in every crop with empty boxes.
    """
    rng = np.random.default_rng(seed)
    out = []
    for b, c in zip(boxes, classes, strict=True):
        gt = b[c > 0].astype(np.float64)
        hw = gt[:, 2:] - gt[:, :2]
        ctr = (gt[:, 2:] + gt[:, :2]) / 2
        ctr_j = np.repeat(ctr, jitter, 0) + rng.uniform(
            -0.3, 0.3, (len(gt) * jitter, 2)
        ) * np.repeat(hw, jitter, 0)
        hw_j = np.repeat(hw, jitter, 0) * np.exp(rng.uniform(-0.3, 0.3, (len(gt) * jitter, 2)))
        sides = (
            hw[rng.integers(0, max(len(hw), 1), background)]
            if len(hw)
            else np.full((background, 2), 16.0)
        )
        ctr_r = rng.uniform(0, size, (background, 2))
        ctrs = np.concatenate([ctr_j, ctr_r])
        sizes = np.concatenate([hw_j, sides])
        props = np.clip(np.concatenate([ctrs - sizes / 2, ctrs + sizes / 2], 1), 0, size)
        out.append(props.astype(np.float32))
    n = max(len(p) for p in out)
    return np.stack([np.concatenate([p, np.zeros((n - len(p), 4), np.float32)]) for p in out])


def initialize_like_train(model, config: RunConfig) -> None:
    """What ``kerasnuc train`` does before its first step of a run from scratch (the method's
    ``initialize`` hook on the run's training pipeline, e.g. the frozen-BN calibration of a
    ResNet without ImageNet weights), so that epoch 0 is the run's real starting point."""
    method = get_method(config.method)
    if method.initialize is None or config.train.init_from:
        return
    datasets = open_datasets(config.data.datasets, config.data)
    pipe = PipelineConfig.from_dict(config.pipeline)
    data = method.dataset(datasets, config.data.train_split, pipe, training=True, start_epoch=0)
    method.initialize(model, config, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run folder trained with --keep-epoch-weights")
    parser.add_argument("--data", required=True, help="dataset folder (its val split is used)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--crops", type=int, default=8, help="images (one centre crop each)")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--proposals", choices=["final", "jitter"], default="final")
    parser.add_argument("--jitter", type=int, default=4)
    parser.add_argument("--background", type=int, default=200)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()

    config = load_config(args.run)
    if config.method != "panoptic":
        raise SystemExit(f"{args.run}: a panoptic run is needed (this one is {config.method})")
    pipe = PipelineConfig.from_dict(config.pipeline)
    ds = Dataset(args.data, mpp=config.data.assumed_mpp(args.data))
    items, _ = val_items([ds], args.split, config.data.mpp, args.crops)
    images, targets = probe_set(items, args.crop, pipe.max_instances)
    snapshots = sorted((args.run / EPOCH_WEIGHTS_DIR).glob("epoch_*.weights.h5"))
    if not snapshots:
        raise SystemExit(
            f"{args.run}: no {EPOCH_WEIGHTS_DIR}/epoch_*.weights.h5 (train with "
            "--keep-epoch-weights)"
        )
    keras.utils.set_random_seed(config.train.seed)
    model = build_model(config)
    if args.proposals == "jitter":
        proposals = probe_proposals(
            targets["boxes"], targets["classes"], args.crop, args.jitter, args.background, args.seed
        )
        valid = np.ones(proposals.shape[:2], bool)
    else:  # the last snapshot's RPN proposals (training-time pre/post-NMS counts)
        model.load_weights(snapshots[-1])
        parts = [
            model.propose(images[i : i + args.batch]) for i in range(0, len(images), args.batch)
        ]
        proposals = np.concatenate([keras.ops.convert_to_numpy(p[0]) for p in parts])
        valid = np.concatenate([keras.ops.convert_to_numpy(p[1]) for p in parts])
        keras.utils.set_random_seed(config.train.seed)
        model = build_model(config)  # epoch 0: the run's random initialisation (same seed)
    initialize_like_train(model, config)
    names = [*LOSS_NAMES, *STAT_NAMES]
    rows = []
    header = ["epoch", *[n.replace("_loss", "") for n in names[:7]], "total", "rpn_pos", "roi_pos"]
    print(
        f"probe: {len(images)} {args.split} crops of {args.crop} px from {args.data}, "
        f"{proposals.shape[1]} candidate ROIs per crop, seed {args.seed}"
    )
    print(" | ".join(header))
    t0 = time.time()
    for epoch, path in [
        (0, None),
        *[(int(p.stem.split("_")[1].split(".")[0]), p) for p in snapshots],
    ]:
        if path is not None:
            model.load_weights(path)
        sums = dict.fromkeys(names, 0.0)
        for i in range(0, len(images), args.batch):
            sl = slice(i, i + args.batch)
            terms = model.probe_losses(
                images[sl],
                {k: v[sl] for k, v in targets.items()},
                proposals[sl],
                args.seed,
                proposal_valid=valid[sl],
            )
            for n in names:
                sums[n] += terms[n] * len(images[sl])
        row = {"epoch": epoch, **{n: sums[n] / len(images) for n in names}}
        row["total"] = sum(row[n] for n in LOSS_NAMES)
        rows.append(row)
        print(
            " | ".join(
                [
                    str(epoch),
                    *[f"{row[n]:.4f}" for n in LOSS_NAMES],
                    f"{row['total']:.4f}",
                    *[f"{row[n]:.1f}" for n in STAT_NAMES],
                ]
            )
        )
    first, last = rows[0], rows[-1]
    down = [n for n in LOSS_NAMES if last[n] < first[n]]
    print(
        f"\n{len(down)}/7 terms lower at epoch {last['epoch']} than at epoch 0: "
        + ", ".join(n.replace("_loss", "") for n in down)
        + f" ({time.time() - t0:.0f} s)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
