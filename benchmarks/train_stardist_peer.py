"""Train the StarDist 2D peer model of ``benchmarks/peer_speed.py`` (issue 16) from scratch.

Run it with the Python of the StarDist virtual environment, never with kerasnuc's (the two do
not share a process; see the docstring of ``peer_speed.py`` for the environment)::

    nice -n 15 /work/cache/sdvenv/bin/python benchmarks/train_stardist_peer.py \\
        --minutes 8 --out /work/cache/stardist_kumar

What it does:

* Data: the ``train`` split of ``$KERASNUC_DATA/monuseg_kumar`` (default ``/work/shared/data``;
  ``images/<id>.png`` RGB, ``instances/<id>.png`` 16-bit labels, ``splits.csv``). Images are
  normalised as StarDist's H&E examples do (percentiles 1 / 99.8 taken over all three channels
  jointly) and label holes are filled.
* Model: StarDist's default ``Config2D`` for 3-channel input with ``n_rays=32`` and
  ``grid=(2, 2)`` (its H&E example), trained from random weights with flips, quarter turns and a
  small intensity change as augmentation. The TensorBoard callback is off (TensorBoard is not
  installed next to TensorFlow 2.21 here); everything else is StarDist's default.
* Budget: training stops after ``--minutes`` of wall-clock time (a Keras callback sets
  ``stop_training``); ``weights_best.h5`` (best validation loss) is kept.
* Thresholds: ``optimize_thresholds`` on the first ``--tune-images`` ``val`` images, saved
  with the model (``thresholds.json``); then F1 and panoptic quality at IoU 0.5 on the next
  ``--eval-images`` ``val`` images are printed and written to ``peer_scores.json``. With a
  barely trained model the threshold search is slow (its NMS sees very many candidates);
  ``--skip-train`` redoes only this part for the model already in ``--out``, and
  ``--no-tune`` keeps StarDist's default thresholds (prob 0.5, NMS 0.4).

The model folder goes outside the repository (default ``/work/cache/stardist_kumar``:
``config.json``, ``weights_best.h5``, ``weights_last.h5``, ``thresholds.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np


def data_root() -> Path:
    return Path(os.environ.get("KERASNUC_DATA", "/work/shared/data"))


def split_ids(dataset: Path, split: str) -> list[str]:
    with open(dataset / "splits.csv", newline="") as fh:
        return [row["id"] for row in csv.DictReader(fh) if row["split"] == split]


def load_pairs(dataset: Path, ids: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Normalised float32 images and hole-filled int32 labels, StarDist's H&E preprocessing."""
    import imageio.v3 as iio
    from csbdeep.utils import normalize
    from stardist import fill_label_holes

    images, labels = [], []
    for name in ids:
        rgb = iio.imread(dataset / "images" / f"{name}.png")[..., :3]
        images.append(normalize(rgb, 1, 99.8, axis=(0, 1, 2)))
        lbl = iio.imread(dataset / "instances" / f"{name}.png").astype(np.int32)
        labels.append(fill_label_holes(lbl))
    return images, labels


def make_augmenter(seed: int):
    rng = np.random.default_rng(seed)

    def augment(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        turns = int(rng.integers(4))
        x, y = np.rot90(x, turns, axes=(0, 1)), np.rot90(y, turns, axes=(0, 1))
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        x = x * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
        return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y)

    return augment


def budget_callback(seconds: float):
    import keras

    class WallClockBudget(keras.callbacks.Callback):
        """Stop training once ``seconds`` of wall-clock time have passed since it began."""

        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()
            self.steps = 0

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if time.perf_counter() - self.start > seconds:
                self.model.stop_training = True

    return WallClockBudget()


def score(model, images: list[np.ndarray], labels: list[np.ndarray]) -> dict:
    """F1, precision, recall and panoptic quality at IoU 0.5 of ``model`` on the images."""
    from stardist.matching import matching_dataset

    if not images:
        return {}
    preds = [model.predict_instances(x, show_tile_progress=False)[0] for x in images]
    stats = matching_dataset(labels, preds, thresh=0.5, show_progress=False)
    out = {
        k: float(getattr(stats, k))
        for k in ("f1", "precision", "recall", "panoptic_quality", "mean_true_score")
    }
    out.update(n_true=int(stats.n_true), n_pred=int(stats.n_pred))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/work/cache/stardist_kumar", help="model folder")
    parser.add_argument("--minutes", type=float, default=8.0, help="training wall-clock budget")
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--tune-images", type=int, default=3, help="val images for thresholds")
    parser.add_argument("--eval-images", type=int, default=4, help="val images scored after")
    parser.add_argument(
        "--nms-threshs",
        type=float,
        nargs="+",
        default=[0.3, 0.4, 0.5],
        help="NMS thresholds tried by optimize_thresholds (StarDist's default)",
    )
    parser.add_argument(
        "--skip-train", action="store_true", help="reuse the model in --out: thresholds, scores"
    )
    parser.add_argument(
        "--no-tune", action="store_true", help="keep StarDist's default thresholds (0.5, 0.4)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nice", type=int, default=15, help="raise niceness to at least this")
    args = parser.parse_args(argv)

    current = os.nice(0)
    if current < args.nice:
        os.nice(args.nice - current)

    from stardist.models import Config2D, StarDist2D

    dataset = data_root() / "monuseg_kumar"
    train_ids, val_ids = split_ids(dataset, "train"), split_ids(dataset, "val")
    n_tune = 0 if args.no_tune else args.tune_images
    t0 = time.perf_counter()
    x_train, y_train = ([], []) if args.skip_train else load_pairs(dataset, train_ids)
    x_val, y_val = load_pairs(dataset, val_ids[: args.tune_images + args.eval_images])
    print(
        f"loaded {len(x_train)} train, {len(x_val)} val images in {time.perf_counter() - t0:.1f} s"
    )
    out = Path(args.out)
    report_path = out / "peer_scores.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}

    if args.skip_train:
        model = StarDist2D(None, name=out.name, basedir=str(out.parent))
    else:
        config = Config2D(
            n_rays=32,
            grid=(2, 2),
            n_channel_in=3,
            train_tensorboard=False,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        import keras

        keras.utils.set_random_seed(args.seed)  # NumPy's global seed too
        model = StarDist2D(config, name=out.name, basedir=str(out.parent))
        model.prepare_for_training()
        budget = budget_callback(args.minutes * 60.0)
        model.callbacks.append(budget)
        t0 = time.perf_counter()
        model.train(
            x_train,
            y_train,
            validation_data=(x_val[: args.tune_images], y_val[: args.tune_images]),
            augmenter=make_augmenter(args.seed),
            epochs=100000,
            steps_per_epoch=args.steps_per_epoch,
            seed=args.seed,
        )
        train_s = time.perf_counter() - t0
        print(
            f"trained {budget.steps} steps (batch {config.train_batch_size}, "
            f"{config.train_patch_size} patches) in {train_s:.0f} s"
        )
        report = {
            "train_images": len(x_train),
            "train_steps": budget.steps,
            "train_batch_size": config.train_batch_size,
            "train_patch_size": list(config.train_patch_size),
            "train_seconds": round(train_s, 1),
        }
        # Written now so that the training facts survive an interrupted threshold search.
        report_path.write_text(json.dumps(report, indent=2) + "\n")

    if n_tune:
        t0 = time.perf_counter()
        model.optimize_thresholds(
            x_val[:n_tune], y_val[:n_tune], nms_threshs=args.nms_threshs, iou_threshs=[0.5]
        )
        report["threshold_seconds"] = round(time.perf_counter() - t0, 1)
        report["tune_ids"] = val_ids[:n_tune]
    report["thresholds"] = {
        "prob": float(model.thresholds.prob),
        "nms": float(model.thresholds.nms),
    }
    eval_ids = val_ids[args.tune_images : args.tune_images + args.eval_images]
    report["eval_ids"] = eval_ids
    report["eval_iou0.5"] = score(model, x_val[args.tune_images :], y_val[args.tune_images :])
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
