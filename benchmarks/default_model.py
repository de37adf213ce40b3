"""Scores and speed of a named model (default: the bundled ``default``) vs a classical baseline.

1. Validation scores: every image of the ``val`` split of each H&E dataset in the shared data
   folder, predicted whole (tiled like ``kerasnuc predict``) with the model's tuned
   post-processing, next to the classical colour-deconvolution + Otsu + watershed baseline of
   :mod:`kerasnuc.postprocess.classical` on the same images. Metrics from
   :mod:`kerasnuc.metrics` (binary PQ, AJI, pixel F1; mPQ+ and per-class PQ where the dataset
   has cell types). ``--engine`` as ``kerasnuc predict``'s (default auto: onnxruntime where
   the model folder has a ``model.onnx``, else Keras).
2. End-to-end time of the ``kerasnuc predict`` command (a new process: imports, model loading,
   prediction, post-processing, writing overlay/GeoJSON/CSV/summary/OME-TIFF) on one 1000x1000
   MoNuSeg image, with and without TTA, in seconds and seconds per megapixel; the best of
   ``--repeats`` runs.

Usage::

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/default_model.py [--model default] \\
        [--data ../shared/data] [--engine auto|onnx|keras] [--tta 8] [--repeats 2] [--skip-timing]
        [--skip-scores] [--score-tta 0]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kerasnuc.cli.common import format_table
from kerasnuc.data.dataset import Dataset
from kerasnuc.metrics.evaluation import aggregate, evaluate_pair
from kerasnuc.postprocess.classical import classical_nuclei

DATASETS = ("monuseg_kumar", "consep", "dsb2018_histology")


def _score(rows: list[dict], num_classes: int) -> dict:
    agg = aggregate(rows)
    out = {k: agg.get(k) for k in ("pq", "aji", "pixel_f1", "det_f1")}
    if num_classes:
        out["mpq_plus"] = agg.get("mpq_plus")
        out["type_acc"] = agg.get("type_acc")
        for c in range(1, num_classes + 1):
            out[f"pq+_c{c}"] = agg.get(f"pq_plus_c{c}")
    return out


def scores(
    model: str,
    data_root: Path,
    max_images: int | None,
    tile: int | None = None,
    balance: bool = True,
    keep_margin: bool = False,
    engine: str = "auto",
    datasets: tuple[str, ...] = DATASETS,
    baseline: bool = True,
    tta: int = 0,
) -> list[dict]:
    from kerasnuc.inference.job import PredictOptions
    from kerasnuc.inference.onnx_predictor import load_engine_predictor
    from kerasnuc.inference.tiling import balanced_tile_size, predict_tiled, tile_plan
    from kerasnuc.runs import resolve_model

    options = PredictOptions()
    tile, margin = tile or options.tile_size, options.margin
    run_dir = resolve_model(model)
    predictor = load_engine_predictor(run_dir, engine, tta=tta)
    print(f"engine: {getattr(predictor, 'engine', 'keras')}" + (f", tta {tta}" if tta else ""))
    mpp = predictor.data_config.mpp or 0.25
    names = predictor.data_config.class_names
    table = []
    for name in datasets:
        root = data_root / name
        if not root.is_dir():
            print(f"skipping {name}: {root} not found", file=sys.stderr)
            continue
        ds = Dataset(root)
        ids = ds.split("val")[:max_images]
        typed = ds.has_classes and ds.class_names == names
        k = len(names) if typed else 0
        model_rows, base_rows = [], []
        t0 = time.perf_counter()
        for id in ids:
            s = ds.sample(id)
            shape = s.image.shape[:2]
            if not balance:
                tile_size, tile_margin = tile, margin
            elif keep_margin:
                tile_size, tile_margin = balanced_tile_size(shape, tile, margin), margin
            else:
                tile_size, tile_margin = tile_plan(shape, tile, margin)
            res = predict_tiled(
                s.image,
                predictor.predict_instances_batch,
                tile_size=tile_size,
                margin=tile_margin,
                target_mpp=mpp,
                mpp=ds.mpp or mpp,
            )
            inst, cls = res.instances, res.classes
            gt_cls = s.classes if typed else None
            model_rows.append(
                evaluate_pair(s.instances, inst, gt_cls, cls if typed else None, k, hausdorff=False)
            )
            if baseline:
                base = classical_nuclei(s.image, mpp=ds.mpp or mpp)
                base_rows.append(evaluate_pair(s.instances, base, hausdorff=False))
        seconds = time.perf_counter() - t0
        runs = (("model", model_rows, k), ("classical", base_rows, 0))
        for label, rows, kk in runs if baseline else runs[:1]:
            row = {"dataset": name, "images": len(ids), "method": label}
            row.update(_score(rows, kk))
            table.append(row)
        print(f"{name}: {len(ids)} images scored in {seconds:.0f} s", file=sys.stderr)
    return table


def timing(model: str, image: Path, tta: int, repeats: int) -> list[dict]:
    from kerasnuc.fileutil import read_image

    h, w = read_image(image).shape[:2]
    mp = h * w / 1e6
    rows = []
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    for passes in (0, tta):
        best = float("inf")
        for _ in range(repeats):
            out = Path(tempfile.mkdtemp(prefix="kerasnuc_bench_"))
            cmd = ["kerasnuc", "predict", str(image), "--model", model, "--out", str(out)]
            if passes:
                cmd += ["--tta", str(passes)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            best = min(best, time.perf_counter() - t0)
            shutil.rmtree(out, ignore_errors=True)
        rows.append(
            {
                "command": "kerasnuc predict" + (f" --tta {passes}" if passes else ""),
                "image": f"{w}x{h}",
                "seconds": best,
                "s/MP": best / mp,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("KERASNUC_DATA", Path(__file__).parents[2] / "shared/data")),
    )
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--tile", type=int, default=None, help="largest tile (predict default)")
    parser.add_argument("--no-balance", action="store_true", help="full-size tiles (old rule)")
    parser.add_argument(
        "--keep-margin",
        action="store_true",
        help="64-px margins also around images that fit in one tile (the rule before tile_plan)",
    )
    parser.add_argument(
        "--engine",
        choices=("auto", "onnx", "keras"),
        default="auto",
        help="what runs the model for the scores (as kerasnuc predict --engine)",
    )
    parser.add_argument("--tta", type=int, default=8, help="TTA passes of the timed run")
    parser.add_argument(
        "--score-tta", type=int, default=0, help="TTA passes of the scored runs (Keras engine)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-scores", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    if not args.skip_scores:
        table = scores(
            args.model,
            args.data,
            args.max_images,
            args.tile,
            not args.no_balance,
            args.keep_margin,
            args.engine,
            tta=args.score_tta,
        )
        cols = ["dataset", "images", "method", "pq", "aji", "pixel_f1", "det_f1", "mpq_plus"]
        cols += ["type_acc"] + sorted({k for r in table for k in r if k.startswith("pq+_c")})
        print(format_table(table, cols, "{:.3f}"))
        print()
    if not args.skip_timing:
        kumar = Dataset(args.data / "monuseg_kumar")
        image = kumar.root / "images" / f"{kumar.split('val')[0]}.png"
        rows = timing(args.model, image, args.tta, args.repeats)
        print(format_table(rows, ["command", "image", "seconds", "s/MP"], "{:.2f}"))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
