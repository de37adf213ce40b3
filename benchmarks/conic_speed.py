"""Training and inference speed of the ``conic`` model on this machine.

Measures, for each encoder, training steps/s (batch 4, 256x256 crops, AdamW + the three conic
losses, ``jit_compile=False``) and inference tiles/s (batch 8, 256x256, ``training=False``) on
random inputs, after warm-up steps that absorb tracing, under each Keras dtype policy asked for
(``float32``, ``mixed_bfloat16``: these CPUs have AVX-512 BF16 and AMX, which oneDNN uses for
bfloat16 convolutions). Inference is also reported as seconds per megapixel. Prints a table.

Usage::

    OMP_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 TF_CPP_MIN_LOG_LEVEL=2 \\
        python benchmarks/conic_speed.py --encoders efficientnet_b0 efficientnet_lite0 \
        --policies float32 mixed_bfloat16 --features blocks
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
import tensorflow as tf

from kerasnuc.cli.common import format_table
from kerasnuc.config import TrainConfig
from kerasnuc.losses.conic import conic_losses
from kerasnuc.models.conic import build_conic
from kerasnuc.optimizers.schedules import build_optimizer

NUM_CLASSES = 6
SIZE = 256


def batch(n: int, rng: np.random.Generator):
    x = rng.random((n, SIZE, SIZE, 3), dtype=np.float32)
    sem = rng.integers(0, NUM_CLASSES + 1, (n, SIZE, SIZE)).astype(np.int32)
    vec = rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)
    vec[..., 2] = sem > 0
    y = {"semantic": sem, "three_label": np.minimum(sem, 2), "vectors": vec}
    return x, y


def bench(
    encoder: str, policy: str, features: str, train_steps: int, infer_batches: int, warmup: int
) -> dict:
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy(policy)
    t0 = time.perf_counter()
    model = build_conic(encoder=encoder, num_classes=NUM_CLASSES, encoder_features=features)
    build_s = time.perf_counter() - t0
    model.compile(
        optimizer=build_optimizer(TrainConfig(), 1000),
        loss=conic_losses(NUM_CLASSES),
        jit_compile=False,
    )
    x, y = batch(4, rng)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    t0 = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=warmup, verbose=0)
    trace_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=train_steps, verbose=0)
    train_sps = train_steps / (time.perf_counter() - t0)

    xi = rng.random((8, SIZE, SIZE, 3), dtype=np.float32)
    predict = tf.function(lambda t: model(t, training=False))
    for _ in range(warmup):
        predict(xi)
    t0 = time.perf_counter()
    for _ in range(infer_batches):
        out = predict(xi)
        _ = out["semantic"].numpy()
    tiles_ps = 8 * infer_batches / (time.perf_counter() - t0)
    keras.config.set_dtype_policy("float32")
    return {
        "encoder": encoder,
        "policy": policy,
        "params_M": model.count_params() / 1e6,
        "build_s": build_s,
        "first_steps_s": trace_s,
        "train_steps_per_s": train_sps,
        "infer_tiles_per_s": tiles_ps,
        "infer_s_per_MPx": 1e6 / (tiles_ps * SIZE * SIZE),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["efficientnet_b0", "efficientnet_b7"])
    parser.add_argument("--policies", nargs="+", default=["float32"])
    parser.add_argument("--features", default="blocks", choices=["blocks", "expand"])
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--infer-batches", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for enc in args.encoders:
        for policy in args.policies:
            rows.append(
                bench(enc, policy, args.features, args.train_steps, args.infer_batches, args.warmup)
            )
            print(format_table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(
        f"conic ({args.features} features), {SIZE}x{SIZE}, train batch 4, inference batch 8, "
        f"TF {tf.__version__}"
    )
    print(format_table(rows, list(rows[0]), floatfmt="{:.3f}"))


if __name__ == "__main__":
    main()
