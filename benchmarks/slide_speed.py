"""Speed and memory of streaming tiled prediction over a synthetic whole-slide image.

1. Builds a pyramidal tiled TIFF (default 20000 x 20000 at 0.25 um/px, JPEG tiles of 512 px,
   levels at 1x, 4x and 16x downsampling) in a temporary folder. The slide is a mosaic of the
   real MoNuSeg H&E images (central 960 x 960 crops, rotated by block) inside an elliptical
   tissue region on tinted glass. Every tile is rendered on demand and handed to tifffile one
   by one, so the full image is never in memory. This runs in a child process (its peak RSS is
   reported apart).
2. Opens the slide lazily (:class:`kerasnuc.io.readers.TiffSource`), detects tissue on a
   thumbnail, and streams it through :func:`kerasnuc.inference.tiling.predict_streaming` with a
   cheap numpy ``predict_fn`` standing in for the model (which is not ready yet): optical density
   along the Ruifrok haematoxylin vector > 0.9, 4-connected components, components larger than
   the margin or under 10 px dropped. Runs at the slide's resolution (0.25 um/px) and for a
   model at 0.5 um/px (tiles read at twice the size from level 0 and downsampled). With
   ``--model NAME`` the real model (bundled name or run folder) and its post-processing
   replace the stand-in, at the model's resolution. The sink
   counts instances and pixels (``--resumable`` adds a run that stores every tile's instances in
   a work folder with a checkpoint and replays them).
3. Prints slide megapixels per minute (whole level 0 / wall time), tissue megapixels per minute
   (cores of the predicted tiles), tiles per second and the peak RSS of the tiling process.

Usage (limit threads on a shared machine)::

    OMP_NUM_THREADS=1 python benchmarks/slide_speed.py [--size 20000] [--resumable] [--data DIR]
    python benchmarks/slide_speed.py --model default --tile-size 1152 [--batch-size 1] \
        [--engine auto|onnx|keras]

The data root defaults to ``$KERASNUC_DATA`` or ``../shared/data`` next to the repository.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from kerasnuc.cli.common import format_table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MPP = 0.25
BLOCK = 960  # central crop of one MoNuSeg image (divisible by every level's factor)
LEVELS = (1, 4, 16)  # downsampling factors of the pyramid (tifffile needs a constant step)
TILE = 512
GLASS = (238, 234, 242)
H_VECTOR = np.array([0.65, 0.70, 0.29], dtype=np.float32)
H_VECTOR /= np.linalg.norm(H_VECTOR)


def data_root(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    return Path(os.environ.get("KERASNUC_DATA", REPO.parent / "shared" / "data"))


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(who).ru_maxrss / 1024.0


class Mosaic:
    """Renders any region of any pyramid level of the synthetic slide on demand."""

    def __init__(self, images: list[np.ndarray], size: int) -> None:
        self.size = size
        self.blocks = {}
        for ds in LEVELS:
            side = BLOCK // ds
            self.blocks[ds] = [
                cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA) for im in images
            ]
        self.n = len(images)

    def render(self, ds: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """``(h, w, 3)`` uint8 of level ``ds`` at level pixels ``(y, x)``; glass outside."""
        side = BLOCK // ds
        level_size = self.size // ds
        out = np.empty((h, w, 3), dtype=np.uint8)
        out[:] = GLASS
        for by in range(y // side, min(level_size - 1, y + h - 1) // side + 1):
            for bx in range(x // side, min(level_size - 1, x + w - 1) // side + 1):
                block = self.blocks[ds][(by * 7 + bx * 3) % self.n]
                block = np.rot90(block, k=(by + 2 * bx) % 4)
                y0, y1 = max(y, by * side), min(y + h, (by + 1) * side, level_size)
                x0, x1 = max(x, bx * side), min(x + w, (bx + 1) * side, level_size)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = block[
                    y0 - by * side : y1 - by * side, x0 - bx * side : x1 - bx * side
                ]
        # Elliptical tissue region (level-0 pixel centres), glass elsewhere.
        yy = ((np.arange(y, y + h) + 0.5) * ds - self.size / 2) / (0.42 * self.size)
        xx = ((np.arange(x, x + w) + 0.5) * ds - self.size / 2) / (0.46 * self.size)
        outside = yy[:, None] ** 2 + xx[None, :] ** 2 > 1.0
        out[outside] = GLASS
        return out

    def tiles(self, ds: int):
        level_size = self.size // ds
        for y in range(0, level_size, TILE):
            for x in range(0, level_size, TILE):
                yield self.render(ds, y, x, TILE, TILE)


def write_slide(path: str, size: int, root: str, compression: str, queue) -> None:
    """Child process: write the pyramidal TIFF tile by tile; report time and peak RSS."""
    import tifffile

    from kerasnuc.data.dataset import Dataset

    start = time.perf_counter()
    ds = Dataset(Path(root) / "monuseg_kumar")
    crop = slice(20, 20 + BLOCK)
    mosaic = Mosaic([ds.image(i)[crop, crop] for i in ds.ids], size)
    args = {"compression": compression, "photometric": "rgb", "tile": (TILE, TILE)}
    if compression == "jpeg":
        args["compressionargs"] = {"level": 90}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(
            mosaic.tiles(1),
            shape=(size, size, 3),
            dtype=np.uint8,
            subifds=len(LEVELS) - 1,
            resolution=(1e4 / MPP, 1e4 / MPP),
            resolutionunit="CENTIMETER",
            metadata=None,
            **args,
        )
        for ds_ in LEVELS[1:]:
            side = size // ds_
            tw.write(
                mosaic.tiles(ds_),
                shape=(side, side, 3),
                dtype=np.uint8,
                subfiletype=1,
                metadata=None,
                **args,
            )
    queue.put((time.perf_counter() - start, peak_rss_mib()))


def haematoxylin_predict(tiles: np.ndarray, max_side: int = 64) -> list:
    """Stand-in for the model: haematoxylin OD threshold + connected components."""
    out = []
    for tile in tiles:
        od = -np.log((tile.astype(np.float32) + 1.0) / 256.0)
        mask = (od @ H_VECTOR > 0.9).astype(np.uint8)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        keep = (stats[:, 2] <= max_side) & (stats[:, 3] <= max_side) & (stats[:, 4] >= 10)
        keep[0] = False
        out.append(np.where(keep, np.arange(n), 0).astype(np.int32)[lab])
    return out


class CountSink:
    """Counts instances and their pixels; keeps nothing."""

    def __init__(self) -> None:
        self.n = 0
        self.pixels = 0
        self.closed = False

    def on_tile(self, instances: list[dict]) -> None:
        self.n += len(instances)
        self.pixels += sum(inst["area"] for inst in instances)

    def close(self) -> None:
        self.closed = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20000, help="slide side in pixels")
    parser.add_argument("--compression", choices=["jpeg", "zlib"], default="jpeg")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--margin", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resumable", action="store_true", help="also run with ResumableSink")
    parser.add_argument("--data", default=None, help="shared data root")
    parser.add_argument("--workdir", default=None, help="where to write the slide (temp dir)")
    parser.add_argument(
        "--model",
        default=None,
        help="stream through this kerasnuc model (a bundled name such as 'default' or a run "
        "folder) at its resolution, with its post-processing, instead of the numpy stand-in",
    )
    parser.add_argument(
        "--engine",
        choices=("auto", "onnx", "keras"),
        default="auto",
        help="with --model: what runs it (as kerasnuc predict --engine)",
    )
    args = parser.parse_args(argv)
    if args.size % max(LEVELS) or args.size < 1000:
        parser.error(f"--size must be a multiple of {max(LEVELS)} and >= 1000")
    root = data_root(args.data)
    if not (root / "monuseg_kumar" / "meta.json").is_file():
        print(f"MoNuSeg data not found under {root} (set KERASNUC_DATA)", file=sys.stderr)
        return 1
    cv2.setNumThreads(1)

    from kerasnuc.inference.tiling import ResumableSink, make_grid, predict_streaming
    from kerasnuc.io.readers import open_image
    from kerasnuc.io.tissue import tissue_mask

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = os.path.join(tmp, "synthetic_slide.tif")
        queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(
            target=write_slide, args=(path, args.size, str(root), args.compression, queue)
        )
        proc.start()
        write_s, write_rss = queue.get()
        proc.join()
        file_mib = os.path.getsize(path) / 1024**2
        print(
            f"slide: {args.size} x {args.size} px, levels {LEVELS}, {args.compression}, "
            f"{file_mib:.0f} MiB, written in {write_s:.1f} s (writer peak RSS {write_rss:.0f} MiB)"
        )
        predict_fn = haematoxylin_predict
        modes = [("count", None), ("count", 2 * MPP)]
        if args.model:
            from kerasnuc.inference.onnx_predictor import load_engine_predictor
            from kerasnuc.model_dirs import resolve_model

            predictor = load_engine_predictor(
                resolve_model(args.model), args.engine, batch_size=args.batch_size
            )
            predict_fn = predictor.predict_instances_batch
            modes = [("count", predictor.data_config.mpp or MPP)]
            engine = getattr(predictor, "engine", "keras")
            print(f"predict_fn: model {args.model} ({engine}) + its post-processing")
        else:
            print("predict_fn: haematoxylin threshold + connected components (numpy stand-in)")
        rows = []
        if args.resumable:
            modes.append(("resumable", modes[0][1]))
        base_rss = peak_rss_mib()
        for mode, target_mpp in modes:
            with open_image(path) as src:
                t0 = time.perf_counter()
                mask, _ = tissue_mask(src)
                tissue_s = time.perf_counter() - t0
                grid = make_grid(src, args.tile_size, args.margin, target_mpp=target_mpp)
                counter = CountSink()
                sink = counter
                ckpt = None
                if mode == "resumable":
                    sink = ResumableSink(os.path.join(tmp, "parts"), counter)
                    ckpt = os.path.join(tmp, "run.ckpt.json")
                t0 = time.perf_counter()
                summary = predict_streaming(
                    src,
                    predict_fn,
                    sink,
                    tile_size=args.tile_size,
                    margin=args.margin,
                    batch_size=args.batch_size,
                    tissue=mask,
                    checkpoint=ckpt,
                    target_mpp=target_mpp,
                )
                run_s = time.perf_counter() - t0
            assert counter.closed and counter.n == summary.n_instances
            total_s = tissue_s + run_s
            slide_mp = args.size * args.size / 1e6
            tissue_mp = summary.n_selected * (grid.core * grid.downsample) ** 2 / 1e6
            rows.append(
                {
                    "sink": mode,
                    "model mpp": target_mpp or MPP,
                    "read": f"L{grid.level} {grid.read_size}px",
                    "tiles": f"{summary.n_selected}/{grid.n_tiles}",
                    "instances": summary.n_instances,
                    "tissue s": f"{tissue_s:.1f}",
                    "predict s": f"{run_s:.1f}",
                    "slide MP/min": f"{slide_mp / total_s * 60:.0f}",
                    "tissue MP/min": f"{tissue_mp / run_s * 60:.0f}",
                    "tiles/s": f"{summary.n_processed / run_s:.1f}",
                    "peak RSS MiB": f"{peak_rss_mib():.0f}",
                }
            )
        columns = list(rows[0])
        print(format_table(rows, columns))
        print(
            f"peak RSS before the runs (imports): {base_rss:.0f} MiB; target: peak RSS < 3 GiB; "
            f"tile {args.tile_size} px, margin {args.margin} px, batch {args.batch_size}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
