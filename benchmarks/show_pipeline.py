"""Write a PNG grid of augmented training samples with their targets overlaid.

Each row is one sample of the ``conic`` pipeline (full augmentation):

1. the augmented image;
2. the three-label target over it (interior green, boundary red);
3. the semantic target over it (one colour per class);
4. the centre vectors (hue = direction, brightness = length) with the foreground outline;
5. for the ``weak`` pipeline on the same data: Voronoi discs (green) and lines (red), the
   clustering label (blue tint) and the filtered repel code (yellow intensity).

Usage::

    python benchmarks/show_pipeline.py --data ../shared/data/consep --out pipeline_grid.png
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2
import numpy as np

from kerasnuc.data import Dataset
from kerasnuc.data.pipeline import PipelineConfig, conic_dataset, weak_dataset
from kerasnuc.data.points import IGNORE
from kerasnuc.fileutil import write_png

CLASS_COLOURS = np.array(
    [
        [0, 0, 0],
        [255, 255, 0],
        [255, 0, 0],
        [0, 160, 255],
        [0, 255, 0],
        [255, 0, 255],
        [255, 128, 0],
    ],
    np.float32,
)


def _blend(image: np.ndarray, mask: np.ndarray, colour, alpha: float = 0.5) -> np.ndarray:
    out = image.copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    return out


def _vectors_rgb(vec: np.ndarray) -> np.ndarray:
    dy, dx, fg = vec[..., 0], vec[..., 1], vec[..., 2] > 0
    angle = (np.degrees(np.arctan2(dy, dx)) + 360) % 360
    length = np.hypot(dy, dx)
    hsv = np.zeros(vec.shape[:2] + (3,), np.float32)
    hsv[..., 0] = angle
    hsv[..., 1] = 1.0
    hsv[..., 2] = np.clip(length / max(length.max(), 1e-6), 0, 1) * fg
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255
    edges = fg ^ cv2.erode(fg.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    rgb[edges] = 255
    return rgb


def main() -> None:
    default_data = Path(os.environ.get("KERASNUC_DATA", "../shared/data")) / "consep"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(default_data))
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", default="pipeline_grid.png")
    parser.add_argument("--n", type=int, default=6, help="number of samples (rows)")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ds = Dataset(args.data)
    cfg = PipelineConfig(crop_size=args.crop, batch_size=args.n, seed=args.seed, deterministic=True)
    images, t = next(iter(conic_dataset(ds, args.split, cfg)))
    _, w = next(iter(weak_dataset(ds, args.split, cfg)))
    images = images.numpy() * 255.0
    rows = []
    for i in range(args.n):
        img = images[i]
        three = t["three_label"][i].numpy()
        sem = t["semantic"][i].numpy()
        vec = t["vectors"][i].numpy()
        c2 = _blend(_blend(img, three == 1, (0, 255, 0)), three == 2, (255, 0, 0), 0.8)
        c3 = img.copy()
        for c in range(1, int(sem.max()) + 1):
            c3 = _blend(c3, sem == c, CLASS_COLOURS[c % len(CLASS_COLOURS)])
        c4 = _vectors_rgb(vec)
        vor = w["voronoi"][i].numpy()
        clu = w["cluster"][i].numpy()
        rep = w["repel"][i].numpy()
        c5 = _blend(img, clu == 1, (0, 80, 255), 0.35)
        c5 = c5 * (1 - rep[..., None]) + rep[..., None] * np.array([255, 255, 0], np.float32)
        c5 = _blend(c5, vor == 0, (255, 0, 0), 0.9)
        c5 = _blend(_blend(c5, vor == 1, (0, 255, 0), 1.0), vor == IGNORE, (0, 0, 0), 0.0)
        sep = np.full((img.shape[0], 4, 3), 255, np.float32)
        rows.append(np.concatenate([img, sep, c2, sep, c3, sep, c4, sep, c5], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.float32))
    grid = np.clip(np.concatenate(rows[:-1], axis=0), 0, 255).astype(np.uint8)
    write_png(args.out, grid)
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]} px, {args.n} samples from {ds.name})")


if __name__ == "__main__":
    main()
