"""Pipeline throughput against the training speed of the ``conic`` B0 model.

Prints batches/s of the ``conic`` tf.data pipeline with full augmentation on
``monuseg_kumar`` (train split, 256x256 crops, batch 8) and train steps/s of a ``conic``
EfficientNet-B0 model on batches of the same shape, so that the pipeline is never the
bottleneck (target: pipeline >= 3x the training step rate).

Usage::

    python benchmarks/pipeline_speed.py [--batches 30] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    default_data = Path(os.environ.get("KERASNUC_DATA", "../shared/data")) / "monuseg_kumar"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(default_data))
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30, help="batches timed")
    parser.add_argument("--steps", type=int, default=5, help="train steps timed")
    args = parser.parse_args()

    import keras

    from kerasnuc.data import Dataset
    from kerasnuc.data.pipeline import PipelineConfig, conic_dataset, load_items
    from kerasnuc.losses.conic import conic_losses
    from kerasnuc.models.conic import build_conic

    ds = Dataset(args.data)
    cfg = PipelineConfig(crop_size=args.crop, batch_size=args.batch, seed=0)
    t0 = time.perf_counter()
    items, num_classes = load_items(ds, "train")
    t_load = time.perf_counter() - t0

    pipe = conic_dataset(ds, "train", cfg)
    it = iter(pipe)
    for _ in range(3):  # warm-up: tracing, first decode
        batch = next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
    pipe_rate = args.batches / (time.perf_counter() - t0)

    model = build_conic("efficientnet_b0", num_classes=max(num_classes, 1))
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
        loss=conic_losses(max(num_classes, 1)),
    )
    x, y = batch
    model.train_on_batch(x, y)  # warm-up: compile the train step
    model.train_on_batch(x, y)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        model.train_on_batch(x, y)
    step_rate = args.steps / (time.perf_counter() - t0)

    rows = [
        ("decode + cache 16 images (s)", f"{t_load:.2f}"),
        (
            f"pipeline batches/s (batch {args.batch}, {args.crop}x{args.crop}, full aug)",
            f"{pipe_rate:.2f}",
        ),
        ("pipeline crops/s", f"{pipe_rate * args.batch:.1f}"),
        ("conic B0 train steps/s (same batches)", f"{step_rate:.3f}"),
        ("ratio pipeline / train step (target >= 3)", f"{pipe_rate / step_rate:.1f}"),
        ("cores", str(os.cpu_count())),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  value")
    print(f"{'-' * width}  -----")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    assert np.isfinite(pipe_rate)


if __name__ == "__main__":
    main()
