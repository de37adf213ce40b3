"""Continue training a ``conic`` model on a machine with JAX and no TensorFlow (a lent GPU).

``kerasnuc train`` feeds the model through ``tf.data`` with TensorFlow augmentation; a machine
without TensorFlow cannot run that pipeline. This script trains the same model (built by
:func:`kerasnuc.models.conic.build_conic_from_config`, compiled with
:func:`kerasnuc.losses.conic.conic_losses`, AdamW as ``kerasnuc train``) on the Keras JAX
backend, fed by worker processes that draw and augment crops in numpy/scipy:

* sampling as the run's pipeline config: a dataset by ``dataset_weights``, then an image by its
  importance-sampling probability (packed by ``pack_data.py``), a uniform crop position;
* geometry of :class:`kerasnuc.data.augment.AugmentConfig`: flips, 90-degree rotations, one affine
  map (scale, rotation, shear, translation) and elastic deformation on a crop with context,
  bilinear for the image and nearest for the labels, then the centre crop;
* colour: the strong stain change and the HED augmentation in optical density (the matrices of
  :mod:`kerasnuc.data.stain`), brightness / contrast / saturation / hue, Gaussian blur, noise and
  JPEG, with the run's probabilities and ranges;
* targets: :func:`kerasnuc.data.targets.conic_targets_numpy`, the semantic map left out of the
  loss for crops holding nuclei of unknown type (as :mod:`kerasnuc.data.pipeline`).

The draws are numpy's, so the crops are not those ``kerasnuc train`` would draw for the same seed;
the distribution is the same by construction (same ranges and probabilities).

The learning rate follows a linear warm-up and a cosine decay over a wall-clock budget (the
machine is lent for minutes): it is set at the start of every short epoch from the elapsed
fraction of the budget. Weights are written as float16 HDF5 (the bundled models' storage) to
``--out`` every ``--save-every`` seconds and at the end.

Usage (on the device, from the repository root)::

    KERAS_BACKEND=jax python tools/accelerator/train_jax.py --run kerasnuc/models_bundled/default \
        --data .accel/train.npz --out $OUT --budget 420 --batch-size 16 --lr 4e-4
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------
# Data (worker processes: numpy, scipy, PIL only)

_DATA: dict = {}


def _load_pack(path: str) -> dict:
    from PIL import Image

    pack = np.load(path)
    n = len(pack["sources"])
    images = [
        np.asarray(Image.open(io.BytesIO(pack[f"jpeg_{k}"].tobytes())).convert("RGB"))
        for k in range(n)
    ]
    labels = [
        np.stack([pack[f"inst_{k}"].astype(np.int32), pack[f"cls_{k}"].astype(np.int32)], axis=-1)
        for k in range(n)
    ]
    return {
        "images": images,
        "labels": labels,
        "sources": pack["sources"],
        "probs": pack["probs"],
        "num_classes": int(pack["num_classes"]),
    }


def _init_worker(data: dict, pipeline: dict) -> None:
    _DATA.update(data)
    _DATA["pipeline"] = pipeline


def _crop(rng, image, labels, size: int, margin: int):
    h, w = image.shape[:2]
    y0 = rng.integers(0, max(h - size, 0) + 1) if h >= size else -((size - h) // 2)
    x0 = rng.integers(0, max(w - size, 0) + 1) if w >= size else -((size - w) // 2)
    big = size + 2 * margin
    top, left = int(y0) - margin, int(x0) - margin
    ys, xs = slice(max(top, 0), min(top + big, h)), slice(max(left, 0), min(left + big, w))
    img, lab = image[ys, xs], labels[ys, xs]
    pad = ((ys.start - top, top + big - ys.stop), (xs.start - left, left + big - xs.stop))
    if any(p for pair in pad for p in pair):
        img = np.pad(img, pad + ((0, 0),))
        lab = np.pad(lab, pad + ((0, 0),))
    return img.astype(np.float32) / 255.0, lab


def _geometric(rng, image, labels, aug: dict):
    import cv2

    if rng.random() < aug["flip_prob"]:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if rng.random() < aug["flip_prob"]:
        image, labels = image[::-1], labels[::-1]
    if rng.random() < aug["rot90_prob"]:
        k = int(rng.integers(1, 4))
        image, labels = np.rot90(image, k), np.rot90(labels, k)
    image, labels = np.ascontiguousarray(image), np.ascontiguousarray(labels)
    size = image.shape[0]
    linear = np.eye(2)
    shift = np.zeros(2)
    if rng.random() < aug["scale_prob"]:
        linear = linear * rng.uniform(*aug["scale"])
    if rng.random() < aug["rotate_prob"]:
        t = math.radians(rng.uniform(*aug["rotate"]))
        linear = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]]) @ linear
    if rng.random() < aug["shear_prob"]:
        sy, sx = (math.tan(math.radians(rng.uniform(*aug["shear"]))) for _ in range(2))
        linear = np.array([[1.0, sy], [sx, 1.0]]) @ linear
    if rng.random() < aug["translate_prob"]:
        shift = rng.uniform(*aug["translate"], size=2) * size
    elastic = rng.random() < aug["elastic_prob"]
    if np.allclose(linear, np.eye(2)) and not shift.any() and not elastic:
        return image, labels
    # Source coordinate of every output pixel: inverse affine map about the centre, after the
    # elastic displacement of the output grid.
    centre = (size - 1) / 2.0
    rows, cols = np.meshgrid(
        np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij"
    )
    grid = np.stack([rows, cols])
    if elastic:
        alpha = rng.uniform(*aug["elastic_alpha"])
        sigma = aug["elastic_sigma"]
        field = rng.standard_normal((2, size, size)).astype(np.float32)
        field = np.stack(
            [cv2.GaussianBlur(f, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for f in field]
        )
        field *= alpha / max(float(field.std()), 1e-8)
        grid = grid + field
    inv = np.linalg.inv(linear).astype(np.float32)
    rel = grid - (centre + shift).astype(np.float32)[:, None, None]
    src = np.einsum("ij,jhw->ihw", inv, rel) + centre
    map_y, map_x = src[0], src[1]
    fill = float(aug["fill_value"])
    image = cv2.remap(
        image,
        map_x,
        map_y,
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(fill, fill, fill),
    )
    # Labels: nearest sampling only (ids are copied, never interpolated); float32 holds the ids
    # exactly (< 2**24).
    lab = cv2.remap(
        labels.astype(np.float32),
        map_x,
        map_y,
        cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    return image.astype(np.float32), np.rint(lab).astype(np.int32).reshape(labels.shape)


# The optical-density model of kerasnuc.data.stain (scikit-image's H&E-DAB stain vectors).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
OD_UNIT = -math.log(1e-6)


def _rgb_to_hed(x):
    return (np.log(np.maximum(x, 1e-6)) / -OD_UNIT) @ HED_FROM_RGB.astype(np.float32)


def _hed_to_rgb(hed, matrix=RGB_FROM_HED):
    return np.clip(np.exp(-(hed * OD_UNIT) @ matrix.astype(np.float32)), 0.0, 1.0).astype(
        np.float32
    )


def _stain(rng, x, aug: dict):
    lo, hi = aug["stain_scale"]
    factor = np.exp(rng.uniform(math.log(lo), math.log(hi), size=3) * [1, 1, 0])
    offset = rng.uniform(-aug["stain_shift"], aug["stain_shift"], size=3) * [1, 1, 0] / OD_UNIT
    base = RGB_FROM_HED.copy()
    norm = np.linalg.norm(base[:2], axis=-1, keepdims=True)
    v = base[:2] / norm
    d = rng.standard_normal((2, 3))
    u = d - (d * v).sum(-1, keepdims=True) * v
    u /= np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-6)
    angle = rng.uniform(0, math.radians(aug["stain_rotation"]), size=(2, 1))
    turned = np.maximum(v + np.tan(angle) * u, 0.0)
    turned = turned / np.linalg.norm(turned, axis=-1, keepdims=True) * norm
    matrix = np.concatenate([turned, base[2:]], axis=0)
    return _hed_to_rgb(_rgb_to_hed(x) * factor + offset, matrix)


def _hed(rng, x, aug: dict):
    scale = rng.uniform(1 - aug["hed_alpha"], 1 + aug["hed_alpha"], size=3)
    shift = rng.uniform(-aug["hed_beta"], aug["hed_beta"], size=3) / OD_UNIT
    return _hed_to_rgb(_rgb_to_hed(x) * scale + shift)


def _jitter(rng, x, aug: dict):
    import cv2

    x = np.clip(x + rng.uniform(*aug["brightness"]), 0, 1)
    mean = x.mean(axis=(0, 1), keepdims=True)
    x = np.clip((x - mean) * rng.uniform(*aug["contrast"]) + mean, 0, 1).astype(np.float32)
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # float32: hue in degrees
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*aug["saturation"]), 0, 1)
    hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * rng.uniform(*aug["hue"]), 360.0)
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1)


def _colour(rng, x, aug: dict):
    import cv2
    from PIL import Image

    if rng.random() < aug["stain_prob"]:
        x = _stain(rng, x, aug)
    if rng.random() < aug["hed_prob"]:
        x = _hed(rng, x, aug)
    if rng.random() < aug["jitter_prob"]:
        x = _jitter(rng, x, aug)
    if rng.random() < aug["blur_prob"]:
        s = rng.uniform(*aug["blur_sigma"])
        x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), s, borderType=cv2.BORDER_REFLECT)
    if rng.random() < aug["noise_prob"]:
        x = np.clip(x + rng.uniform(*aug["noise_std"]) * rng.standard_normal(x.shape), 0, 1)
    if rng.random() < aug["jpeg_prob"]:
        lo, hi = (int(round(q)) for q in aug["jpeg_quality"])
        buf = io.BytesIO()
        Image.fromarray(np.round(x * 255).astype(np.uint8)).save(
            buf, format="JPEG", quality=int(rng.integers(lo, hi + 1))
        )
        x = np.asarray(Image.open(buf).convert("RGB")).astype(np.float32) / 255.0
    return x


def make_batch(seed: tuple[int, int]):
    """One training batch ``(uint8 images, int8 semantic, int8 three-label, float16 vectors)``."""
    from kerasnuc.data.targets import UNKNOWN_CLASS, conic_targets_numpy

    cfg = _DATA["pipeline"]
    aug = cfg["augment"]
    rng = np.random.default_rng(seed)
    size = cfg["crop_size"]
    margin = (size + 2 * int(round(cfg["context"] * size / 2)) - size) // 2
    weights = np.asarray(cfg["dataset_weights"], dtype=np.float64)
    sources, probs = _DATA["sources"], _DATA["probs"]
    out = ([], [], [], [])
    for _ in range(cfg["batch_size"]):
        s = rng.choice(len(weights), p=weights / weights.sum())
        members = np.flatnonzero(sources == s)
        k = members[rng.choice(len(members), p=probs[members] / probs[members].sum())]
        image, labels = _crop(rng, _DATA["images"][k], _DATA["labels"][k], size, margin)
        image, labels = _geometric(rng, image, labels, aug)
        image = image[margin : margin + size, margin : margin + size]
        labels = labels[margin : margin + size, margin : margin + size]
        image = _colour(rng, image, aug)
        three, vec = conic_targets_numpy(
            np.ascontiguousarray(labels[..., 0]),
            cfg["boundary_width"],
            cfg["vector_units"],
            cfg["vector_scale"],
        )
        semantic = labels[..., 1]
        if (semantic == UNKNOWN_CLASS).any():
            semantic = np.full_like(semantic, UNKNOWN_CLASS)
        out[0].append(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
        out[1].append(semantic.astype(np.int8))
        out[2].append(three.astype(np.int8))
        out[3].append(vec.astype(np.float16))
    return tuple(np.stack(o) for o in out)


def dihedral(image, semantic, three, vectors, code: int):
    """One crop under one of the 8 symmetries of the square, targets included.

    ``code`` bit 0: transpose (rows <-> columns), bit 1: flip the rows, bit 2: flip the columns,
    applied in that order. The centre vectors ``(dy, dx, fg)`` move with the pixels and their
    components follow the map: a transpose swaps ``dy`` and ``dx``, a row flip negates ``dy``, a
    column flip negates ``dx``; the three-label and semantic maps only move (their definitions do
    not depend on orientation).
    """
    arrays = [image, semantic, three, vectors]
    if code & 1:
        arrays = [np.swapaxes(a, 0, 1) for a in arrays]
        arrays[3] = arrays[3][..., [1, 0, 2]]
    if code & 2:
        arrays = [a[::-1] for a in arrays]
        arrays[3] = arrays[3] * np.asarray([-1, 1, 1], arrays[3].dtype)
    if code & 4:
        arrays = [a[:, ::-1] for a in arrays]
        arrays[3] = arrays[3] * np.asarray([1, -1, 1], arrays[3].dtype)
    return tuple(np.ascontiguousarray(a) for a in arrays)


def echoes(batch, copies: int, rng):
    """``copies`` further versions of a batch, every crop under a random non-identity symmetry.

    Data echoing (Choi et al., "Faster Neural Network Training with Data Echoing", 2019): when
    the augmentation workers, not the accelerator, set the pace, each augmented batch is used
    more than once; a symmetry of the square per crop keeps the repeats distinct samples.
    """
    out = []
    for _ in range(copies):
        codes = rng.integers(1, 8, size=len(batch[0]))
        crops = [dihedral(*(a[i] for a in batch), int(c)) for i, c in enumerate(codes)]
        out.append(tuple(np.stack(parts) for parts in zip(*crops, strict=True)))
    return out


def batches(pool, base_seed: int, ahead: int, echo: int = 1):
    """Endless ``(x, y)`` batches from the pool, ``ahead`` batches in flight.

    With ``echo > 1`` every worker batch is used ``echo`` times (:func:`echoes`); the repeats
    wait in a small buffer and leave it in random order, interleaved with fresh batches.
    """
    pending: deque = deque()
    buffer: list = []
    rng = np.random.default_rng((base_seed, 2**31 - 1))
    index = 0
    while True:
        while len(pending) < ahead:
            pending.append(pool.apply_async(make_batch, ((base_seed, index),)))
            index += 1
        fresh = pending.popleft().get()
        buffer.extend(echoes(fresh, echo - 1, rng))
        queue = [fresh]
        while len(buffer) > 2 * (echo - 1):
            queue.append(buffer.pop(int(rng.integers(len(buffer)))))
        if echo > 1 and len(buffer) > echo - 1:
            queue.append(buffer.pop(int(rng.integers(len(buffer)))))
        for img, sem, three, vec in queue:
            yield (
                img.astype(np.float32) / 255.0,
                {
                    "semantic": sem.astype(np.int32),
                    "three_label": three.astype(np.int32),
                    "vectors": vec.astype(np.float32),
                },
            )


# ----------------------------------------------------------------------------------------------
# Schedule and weights


def learning_rate(fraction: float, peak: float, warmup: float, min_fraction: float) -> float:
    """Learning rate at ``fraction`` of the wall-clock budget.

    Linear warm-up from ``0.05 * peak`` to ``peak`` over the first ``warmup`` of the budget, then
    a cosine decay from ``peak`` to ``min_fraction * peak`` at the end (and after it).
    """
    if fraction < warmup:
        return peak * max(fraction / warmup, 0.05)
    p = min((fraction - warmup) / (1.0 - warmup), 1.0)
    return peak * (min_fraction + (1.0 - min_fraction) * 0.5 * (1.0 + math.cos(math.pi * p)))


def save_float16(model, path: Path) -> None:
    """``model.save_weights`` with float32 datasets stored as float16 (atomic)."""
    import h5py

    tmp32 = path.with_name(path.name + ".f32.weights.h5")
    model.save_weights(tmp32)
    tmp = path.with_name(path.name + ".tmp.weights.h5")
    with h5py.File(tmp32, "r") as src, h5py.File(tmp, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value

        def copy(name, obj):
            if name.split("/")[0] == "optimizer":  # model variables only, as the bundled models
                return
            if isinstance(obj, h5py.Group):
                group = dst.require_group(name)
                for key, value in obj.attrs.items():
                    group.attrs[key] = value
            else:
                data = obj[()]
                if data.dtype == np.float32:
                    data = data.astype(np.float16)
                dst.create_dataset(name, data=data)

        src.visititems(copy)
    tmp32.unlink()
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="bundled-model or run folder to continue")
    parser.add_argument("--data", required=True, help="pack_data.py output")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, required=True, help="training seconds, wall clock")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--min-lr-fraction", type=float, default=0.01)
    parser.add_argument("--warmup", type=float, default=0.03, help="fraction of the budget")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--save-every", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument(
        "--echo", type=int, default=1, help="use every augmented batch this many times"
    )
    args = parser.parse_args()
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())
    pipeline = dict(config["pipeline"], batch_size=args.batch_size)
    data = _load_pack(args.data)
    # Workers fork before JAX starts any thread.
    pool = mp.get_context("fork").Pool(
        args.workers, initializer=_init_worker, initargs=(data, pipeline)
    )
    print(
        f"[{time.time() - t_start:5.1f}s] {len(data['images'])} images, {args.workers} workers",
        flush=True,
    )

    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    from kerasnuc.losses.conic import conic_losses
    from kerasnuc.models.conic import ConicModelConfig, build_conic_from_config

    keras.utils.set_random_seed(args.seed)
    model_cfg = ConicModelConfig.from_dict(dict(config["model"], encoder_weights=None))
    model = build_conic_from_config(model_cfg)
    model.load_weights(run / "model.weights.h5")
    optimizer = keras.optimizers.AdamW(learning_rate=args.lr, weight_decay=args.weight_decay)
    model.compile(optimizer=optimizer, loss=conic_losses(model_cfg.num_classes))
    print(
        f"[{time.time() - t_start:5.1f}s] model built ({model.count_params():,} parameters), "
        f"backend {keras.backend.backend()}",
        flush=True,
    )

    t_train = None
    log = []

    class Budget(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.last_save = time.time()
            self.steps = 0

        def on_epoch_begin(self, epoch, logs=None):
            nonlocal t_train
            if t_train is None:
                t_train = time.time()
            frac = (time.time() - t_train) / args.budget
            self.model.optimizer.learning_rate = learning_rate(
                frac, args.lr, args.warmup, args.min_lr_fraction
            )

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1

        def on_epoch_end(self, epoch, logs=None):
            elapsed = time.time() - t_train
            row = {
                "epoch": epoch,
                "steps": self.steps,
                "seconds": round(elapsed, 1),
                "lr": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            }
            row.update({k: round(float(v), 4) for k, v in (logs or {}).items() if "loss" in k})
            log.append(row)
            print(json.dumps(row), flush=True)
            done = elapsed >= args.budget or (
                args.max_steps is not None and self.steps >= args.max_steps
            )
            if done:
                self.model.stop_training = True
            if done or time.time() - self.last_save > args.save_every:
                save_float16(self.model, out / "model.weights.h5")
                (out / "train_log.json").write_text(json.dumps(log, indent=1))
                self.last_save = time.time()

    stream = batches(pool, args.seed, ahead=max(2 * args.workers, 8), echo=args.echo)
    model.fit(
        stream, steps_per_epoch=args.steps_per_epoch, epochs=10**6, verbose=0, callbacks=[Budget()]
    )
    pool.terminate()
    steps = log[-1]["steps"] if log else 0
    secs = log[-1]["seconds"] if log else 0
    print(
        f"[{time.time() - t_start:5.1f}s] done: {steps} steps of batch {args.batch_size} "
        f"in {secs:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
