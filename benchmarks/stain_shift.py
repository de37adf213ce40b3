"""How a model holds up when the stain changes: AJI/PQ under fixed strong stain shifts.

Every ``val`` image of each dataset is shifted in colour by each of a fixed set of strong stain
changes (below; deterministic, no random draw), predicted whole (tiled like ``kerasnuc
predict``, the model's tuned post-processing) and scored against its unchanged labels. The table
gives AJI and PQ per shift next to the unshifted score, and AJI as a fraction of it (the target
of the default model: >= 0.90 on every shift for Kumar and CoNSeP).

Shifts, in the colour-deconvolution space of Ruifrok & Johnston (optical density = stain amount
x stain vector, the H&E(-DAB) vectors of scikit-image) and in HSV:

=================  ===========================================================================
``h_x0.5``         haematoxylin amount halved (a pale, under-stained nucleus)
``h_x1.8``         haematoxylin x1.8
``e_x2``           eosin x2 (pink-red cytoplasm and stroma)
``hue_+0.08``      hue turned by +0.08 of the colour circle
``hue_-0.08``      hue turned by -0.08
``sat_x1.6``       saturation x1.6
``purple``         dark over-stained look: haematoxylin x2.2, eosin x1.8, saturation x1.3
=================  ===========================================================================

Usage::

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/stain_shift.py [--model default] \\
        [--data ../shared/data] [--datasets monuseg_kumar consep] [--max-images N] \\
        [--shifts h_x0.5 purple]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from skimage.color import hsv2rgb, rgb2hsv

from kerasnuc.cli.common import format_table
from kerasnuc.data.dataset import Dataset
from kerasnuc.data.stain import RGB_FROM_HED
from kerasnuc.metrics.evaluation import aggregate, evaluate_pair

HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

#: name -> (haematoxylin factor, eosin factor, hue turn, saturation factor)
SHIFTS: dict[str, tuple[float, float, float, float]] = {
    "none": (1.0, 1.0, 0.0, 1.0),
    "h_x0.5": (0.5, 1.0, 0.0, 1.0),
    "h_x1.8": (1.8, 1.0, 0.0, 1.0),
    "e_x2": (1.0, 2.0, 0.0, 1.0),
    "hue_+0.08": (1.0, 1.0, 0.08, 1.0),
    "hue_-0.08": (1.0, 1.0, -0.08, 1.0),
    "sat_x1.6": (1.0, 1.0, 0.0, 1.6),
    "purple": (2.2, 1.8, 0.0, 1.3),
}


def shift_stain(image: np.ndarray, h: float, e: float, hue: float, sat: float) -> np.ndarray:
    """``image`` (uint8 RGB) with stain amounts, hue and saturation changed; uint8 RGB."""
    rgb = image[..., :3].astype(np.float64) / 255.0
    if (h, e) != (1.0, 1.0):
        od = -np.log(np.maximum(rgb, 1e-6))
        amounts = od @ HED_FROM_RGB
        amounts[..., 0] *= h
        amounts[..., 1] *= e
        rgb = np.exp(-(amounts @ RGB_FROM_HED))
    if hue or sat != 1.0:
        hsv = rgb2hsv(np.clip(rgb, 0.0, 1.0))
        hsv[..., 0] = np.mod(hsv[..., 0] + hue, 1.0)
        hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0.0, 1.0)
        rgb = hsv2rgb(hsv)
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("KERASNUC_DATA", Path(__file__).parents[2] / "shared/data")),
    )
    parser.add_argument("--datasets", nargs="+", default=["monuseg_kumar", "consep"])
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS)[1:], choices=list(SHIFTS)[1:])
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument(
        "--engine",
        choices=("auto", "onnx", "keras"),
        default="keras",
        help="what runs the model (auto: as kerasnuc predict, onnxruntime where it can)",
    )
    args = parser.parse_args()

    from kerasnuc.inference.job import PredictOptions
    from kerasnuc.inference.onnx_predictor import load_engine_predictor
    from kerasnuc.inference.tiling import predict_tiled, tile_plan
    from kerasnuc.runs import resolve_model

    predictor = load_engine_predictor(resolve_model(args.model), args.engine)
    tile, margin = PredictOptions().tile_size, PredictOptions().margin
    mpp = predictor.data_config.mpp or 0.25
    table = []
    for name in args.datasets:
        ds = Dataset(args.data / name)
        ids = ds.split("val")[: args.max_images]
        samples = [ds.sample(i) for i in ids]
        base = {}
        for shift in ["none", *args.shifts]:
            t0 = time.perf_counter()
            rows = []
            for s in samples:
                image = shift_stain(s.image, *SHIFTS[shift])
                tile_size, tile_margin = tile_plan(image.shape[:2], tile, margin)
                res = predict_tiled(
                    image,
                    predictor.predict_instances_batch,
                    tile_size=tile_size,
                    margin=tile_margin,
                    target_mpp=mpp,
                    mpp=ds.mpp or mpp,
                )
                rows.append(evaluate_pair(s.instances, res.instances, hausdorff=False))
            agg = aggregate(rows)
            if shift == "none":
                base = agg
            table.append(
                {
                    "dataset": name,
                    "images": len(ids),
                    "shift": shift,
                    "aji": agg["aji"],
                    "pq": agg["pq"],
                    "aji/unshifted": agg["aji"] / base["aji"] if base.get("aji") else float("nan"),
                    "pq/unshifted": agg["pq"] / base["pq"] if base.get("pq") else float("nan"),
                }
            )
            print(f"{name} {shift}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"model {args.model}")
    print(format_table(table, list(table[0]), "{:.3f}"))


if __name__ == "__main__":
    main()
