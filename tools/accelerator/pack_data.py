"""Pack the train splits into one compact file for a machine without TensorFlow (a lent GPU).

Runs here, with kerasnuc's own loaders: every image of the train split of each dataset is decoded
and resampled to the model's pixel size exactly as ``kerasnuc train`` does
(:func:`kerasnuc.data.pipeline.load_items`), then stored as

* the image as JPEG (quality 95; the training augmentation applies JPEG at 30-95 anyway) to fit
  the device tool's 64 MiB transfer limit,
* the instance map (uint16) and the class map (int8, -1 = unknown cell type),
* its dataset index and its importance-sampling probability within that dataset
  (Rumberger et al. 2022, Eq. 2, as :mod:`kerasnuc.data.sampling` computes it; balanced across
  source slides where the run's ``pipeline.image_groups`` or ``--image-groups`` names them).

Usage::

    python tools/accelerator/pack_data.py --run kerasnuc/models_bundled/default \
        --out .accel/train.npz
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


def sampling_probabilities(items, freqs, image_groups=None, alpha=0.5) -> np.ndarray:
    """Each item's importance-sampling probability within its own dataset, as ``kerasnuc
    train``'s sampler draws them (``dataset_weights`` then pick the dataset)."""
    from kerasnuc.data.pipeline import item_groups
    from kerasnuc.data.sampling import importance_probabilities

    sources = np.array([it.source for it in items])
    groups = item_groups(items, image_groups)
    probs = np.zeros(len(items))
    for s in np.unique(sources):
        m = sources == s
        probs[m] = importance_probabilities(freqs[m], None if groups is None else groups[m], alpha)
    return probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run or bundled-model folder (config.json)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument(
        "--image-groups",
        default=None,
        help="regular expression naming each image's source slide (default: the run's "
        "pipeline.image_groups), e.g. '^train_[0-9]+' for the CoNSeP patches",
    )
    parser.add_argument("--group-alpha", type=float, default=None)
    args = parser.parse_args()

    from kerasnuc.data.dataset import Dataset
    from kerasnuc.data.pipeline import _sampling_frequencies, load_items

    config = json.loads((Path(args.run) / "config.json").read_text())
    root = Path(os.environ.get("KERASNUC_DATA", "../shared/data"))
    datasets = []
    for name in config["data"]["datasets"]:
        datasets.append(
            Dataset(root / name, mpp=(config["data"].get("dataset_mpp") or {}).get(name))
        )
    items, num_classes = load_items(datasets, args.split, config["data"]["mpp"])

    freqs = np.stack([_sampling_frequencies(it.labels[..., 1], num_classes) for it in items])
    sources = np.array([it.source for it in items])
    pipeline = config.get("pipeline", {})
    groups = args.image_groups or pipeline.get("image_groups")
    alpha = args.group_alpha if args.group_alpha is not None else pipeline.get("group_alpha", 0.5)
    probs = sampling_probabilities(items, freqs, groups, alpha)

    out = {"num_classes": np.int64(num_classes), "sources": sources, "probs": probs}
    for k, it in enumerate(items):
        buf = io.BytesIO()
        Image.fromarray(it.image).save(buf, format="JPEG", quality=args.quality)
        out[f"jpeg_{k}"] = np.frombuffer(buf.getvalue(), dtype=np.uint8)
        inst = it.labels[..., 0]
        if inst.max() >= 65536:
            raise SystemExit(f"{it.id}: more than 65535 instance ids")
        out[f"inst_{k}"] = inst.astype(np.uint16)
        out[f"cls_{k}"] = it.labels[..., 1].astype(np.int8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(args.out) + ".tmp.npz")
    np.savez_compressed(tmp, **out)
    tmp.replace(args.out)
    size = Path(args.out).stat().st_size / 2**20
    counts = np.bincount(sources)
    print(
        f"{len(items)} images ({counts.tolist()} per dataset), {num_classes} classes, "
        f"{size:.1f} MiB"
    )


if __name__ == "__main__":
    main()
