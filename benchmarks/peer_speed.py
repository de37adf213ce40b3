"""Speed of kerasnuc next to StarDist 2D on the same real H&E inputs, in one run (issue 16).

Cases, built deterministically from ``$KERASNUC_DATA`` (default ``/work/shared/data``):

* ``a``: one image, the first ``monuseg_kumar`` ``val`` image (1000x1000);
* ``b``: a 4000x4000 mosaic of 16 Kumar images (the ``val`` images, then ``train``, in the
  order of ``splits.csv``), 4x4, row by row;
* ``c``: 200 patches of 256x256: the 80 CoNSeP ``val`` patches, then 256x256 crops of the Kumar
  ``val`` images (a 3x3 grid from the top-left corner of each image, image by image).

Tools:

* **kerasnuc** (this environment): with ``--engine auto`` (the default, as ``kerasnuc predict``)
  ``OnnxPredictor.from_run_dir(resolve_model(--model))`` where the model folder has a
  ``model.onnx`` (onnxruntime, no TensorFlow), else (or with ``--engine keras``)
  ``Predictor.from_run_dirs(resolve_model(--model))``; the ``engine`` column says which;
  ``a`` and ``b`` with ``predict_tiled(image, p.predict_instances_batch, tile_size=T,
  margin=M, target_mpp=0.25, mpp=0.25)``, tiled as ``kerasnuc predict`` tiles an image that
  fits in memory: ``T, M = tile_plan(shape, --tile, 64)`` with ``--tile`` defaulting to
  predict's largest tile (1152: a 1000x1000 image is one 1000-px tile without margin, the
  mosaic 4x4 tiles of 1128 px with 64-px margins); ``--tile 512 --no-balance`` gives the old
  rule (9 tiles of 512 for 1000x1000);
  ``c`` through the batch path, ``p.predict_instances_batch`` on the ``(200, 256, 256, 3)``
  stack in one call.
* **StarDist 2D** (``stardist`` from PyPI, a model trained from scratch on Kumar ``train`` by
  ``benchmarks/train_stardist_peer.py``, default ``/work/cache/stardist_kumar``):
  images normalised as its H&E examples do (percentiles 1 / 99.8 over all channels jointly),
  then ``predict_instances`` (``n_tiles`` with tiles of about ``--stardist-tile`` px, so
  ``(4, 4)`` for the mosaic); ``c`` image by image (StarDist has no batch API for instances).

Columns, for each case and tool (best of ``--repeats`` warm runs, after one untimed warm-up):

* ``model_s``: the network. kerasnuc: time inside ``Predictor.predict_maps_batch`` (uint8 to
  float, padding, forward passes), summed over the tile batches. StarDist: normalisation plus
  the prediction phase of ``predict_instances`` (its tiled network prediction and the sparse
  gathering of candidates), i.e. everything before its ``'nms'`` phase.
* ``postproc_s``: ``total_s - model_s``. kerasnuc: instance post-processing of every tile plus
  tile reading and stitching. StarDist: non-maximum suppression and painting the label image
  (``_instances_from_prediction``).
* ``total_s``: wall time of the whole in-process call (input already in memory, model loaded);
  ``s_per_mpx`` the same per megapixel of input.
* ``cli_s``: a new process end to end, best of ``--repeats``: kerasnuc ``kerasnuc predict INPUT
  --out TMPDIR --mpp 0.25`` (all its default outputs: GeoJSON, CSV, OME-TIFFs, overlay,
  summary); StarDist a ``python -c`` script that imports stardist, loads the model, reads the
  PNG(s), normalises, predicts and writes the label TIFF(s). For ``c`` both get the folder of
  the 200 PNGs.
* ``rss_mb``: peak resident memory of the in-process measurement's own process (each tool and
  case runs in a fresh subprocess; ``ru_maxrss`` from ``os.wait4``); ``cli_rss_mb`` the same for
  the CLI process.
* ``nuclei``: instances found (a sanity check that both make realistic predictions).

The ``ratio`` row of each case is kerasnuc / StarDist per column (below 1: kerasnuc is
faster or smaller). The checks of issue 16 are printed at the end: total (= s/MPx) ratio at
most 1.0 on ``a``, ``b`` and ``c``; the kerasnuc CLI on ``a`` within 2x StarDist's in-process
total.

StarDist environment: StarDist and kerasnuc never share a process. StarDist runs in a separate
virtual environment that reuses this environment's TensorFlow 2.21 / Keras 3 / NumPy 2 (the
``bench`` extra of ``pyproject.toml`` names it) and is called with its own Python
(``--stardist-python``)::

    python3 -m venv --system-site-packages /work/cache/sdvenv
    /work/cache/sdvenv/bin/pip install stardist       # 0.9.2 + csbdeep 0.8.2 + numba
    nice -n 15 /work/cache/sdvenv/bin/python benchmarks/train_stardist_peer.py --minutes 30

The StarDist timings mean something only if its model finds nuclei (its NMS time grows with the
candidates above its probability threshold): check ``peer_scores.json`` in the model folder
(F1 at IoU 0.5 on Kumar ``val`` images) and the ``nuclei`` column; the script warns when a tool
finds none. 8 minutes on a busy 2-core machine gave only 90 training steps and a model whose
probabilities stay below 0.32 (no nuclei at all).

Usage (a full run takes a long time on a CPU; run it on an otherwise idle machine)::

    python3 benchmarks/peer_speed.py --json peer_speed.json
    nice -n 15 python3 benchmarks/peer_speed.py --quick     # smoke test: tiny sizes, 1 repeat

``--quick``: ``a`` is the 256x256 top-left crop, ``b`` a 512x512 mosaic of 2x2 such crops
(StarDist tiles of 256 px, so its tiled path runs), ``c`` 8 patches, ``--repeats 1``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = ("a", "b", "c")
TOOLS = ("kerasnuc", "stardist")
MPP = 0.25
MARGIN = 64
DEFAULT_STARDIST_PYTHON = "/work/cache/sdvenv/bin/python"
DEFAULT_STARDIST_MODEL = "/work/cache/stardist_kumar"
COLUMNS = ("model_s", "postproc_s", "total_s", "s_per_mpx", "cli_s", "rss_mb", "cli_rss_mb")

# The StarDist "CLI": a new process doing what a user script would, end to end.
# argv: model folder, input PNG or folder of PNGs, output folder, tile side.
STARDIST_CLI = """
import math, sys
from pathlib import Path
import imageio.v3 as iio
import tifffile
from csbdeep.utils import normalize
from stardist.models import StarDist2D
model_dir, src, out = (Path(a) for a in sys.argv[1:4])
tile = int(sys.argv[4])
model = StarDist2D(None, name=model_dir.name, basedir=str(model_dir.parent))
out.mkdir(parents=True, exist_ok=True)
for path in sorted(src.glob('*.png')) if src.is_dir() else [src]:
    img = iio.imread(path)[..., :3]
    n_tiles = (math.ceil(img.shape[0] / tile), math.ceil(img.shape[1] / tile), 1)
    x = normalize(img, 1, 99.8, axis=(0, 1, 2))
    labels, _ = model.predict_instances(x, n_tiles=n_tiles, show_tile_progress=False)
    tifffile.imwrite(out / (path.stem + '.tif'), labels.astype('int32'), compression='zlib')
"""


# --- inputs -----------------------------------------------------------------------------------


def split_ids(dataset: Path, split: str) -> list[str]:
    with open(dataset / "splits.csv", newline="") as fh:
        return [row["id"] for row in csv.DictReader(fh) if row["split"] == split]


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"{path}: unreadable image")
    return np.ascontiguousarray(bgr[..., ::-1])


def write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise SystemExit(f"{path}: cannot write")


def build_inputs(data: Path, quick: bool) -> dict[str, np.ndarray]:
    """``{case: uint8 array}``: ``(H, W, 3)`` for ``a``, ``b``; ``(N, 256, 256, 3)`` for ``c``."""
    kumar, consep = data / "monuseg_kumar", data / "consep"
    k_val, k_train = split_ids(kumar, "val"), split_ids(kumar, "train")
    side, grid, n_patches = (256, 2, 8) if quick else (1000, 4, 200)
    first = read_rgb(kumar / "images" / f"{k_val[0]}.png")
    inputs = {"a": first[:side, :side]}

    mosaic_ids = (k_val + k_train)[: grid * grid]
    mosaic = np.zeros((grid * side, grid * side, 3), np.uint8)
    for i, name in enumerate(mosaic_ids):
        row, col = divmod(i, grid)
        image = read_rgb(kumar / "images" / f"{name}.png")[:side, :side]
        if image.shape[:2] != (side, side):
            raise SystemExit(f"{name}: expected at least {side}x{side}, got {image.shape[:2]}")
        mosaic[row * side : (row + 1) * side, col * side : (col + 1) * side] = image
    inputs["b"] = mosaic

    patches: list[np.ndarray] = []
    for name in split_ids(consep, "val"):
        if len(patches) == n_patches:
            break
        patch = read_rgb(consep / "images" / f"{name}.png")
        if patch.shape[:2] != (256, 256):
            raise SystemExit(f"consep {name}: expected 256x256, got {patch.shape[:2]}")
        patches.append(patch)
    for name in k_val:
        if len(patches) == n_patches:
            break
        image = read_rgb(kumar / "images" / f"{name}.png")
        for y in range(0, image.shape[0] - 255, 256):
            for x in range(0, image.shape[1] - 255, 256):
                if len(patches) < n_patches:
                    patches.append(image[y : y + 256, x : x + 256])
    if len(patches) < n_patches:
        raise SystemExit(f"only {len(patches)} patches available, {n_patches} needed")
    inputs["c"] = np.stack(patches)
    return inputs


def write_inputs(inputs: dict[str, np.ndarray], folder: Path) -> dict[str, dict[str, Path]]:
    """Each case as ``.npy`` (for the in-process workers) and PNG(s) (for the CLIs)."""
    paths = {}
    for case, array in inputs.items():
        npy = folder / f"{case}.npy"
        np.save(npy, array)
        if array.ndim == 3:
            png = folder / f"{case}.png"
            write_png(png, array)
        else:
            png = folder / case
            png.mkdir()
            for i, patch in enumerate(array):
                write_png(png / f"{case}_{i:03d}.png", patch)
        paths[case] = {"npy": npy, "png": png}
    return paths


def megapixels(array: np.ndarray) -> float:
    return float(np.prod(array.shape[:-1])) / 1e6


# --- workers (each runs in its own process) ---------------------------------------------------


def _best(runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["total_s"])
    return {**best, "all_total_s": [round(r["total_s"], 4) for r in runs]}


def worker_kerasnuc(args: argparse.Namespace) -> dict:
    from kerasnuc.inference.job import PredictOptions
    from kerasnuc.inference.onnx_predictor import load_engine_predictor
    from kerasnuc.inference.tiling import predict_tiled, tile_plan
    from kerasnuc.runs import resolve_model

    array = np.load(args.input)
    predictor = load_engine_predictor(resolve_model(args.model), args.engine)
    target_mpp = predictor.mpp or MPP
    tile_size, margin = args.tile or PredictOptions().tile_size, MARGIN
    if not args.no_balance:
        tile_size, margin = tile_plan(array.shape[:2], tile_size, MARGIN, MPP / target_mpp)
    maps_batch = predictor.predict_maps_batch
    clock = {"model": 0.0}

    def timed_maps_batch(images, *a, **kw):
        # predict_instances_batch calls self.predict_maps_batch, so this instance attribute
        # sees exactly the network part of the real code path.
        t0 = time.perf_counter()
        out = maps_batch(images, *a, **kw)
        clock["model"] += time.perf_counter() - t0
        return out

    predictor.predict_maps_batch = timed_maps_batch

    def once() -> dict:
        clock["model"] = 0.0
        t0 = time.perf_counter()
        if args.case == "c":
            results = predictor.predict_instances_batch(array)
        else:
            results = [
                predict_tiled(
                    array,
                    predictor.predict_instances_batch,
                    tile_size=tile_size,
                    margin=margin,
                    target_mpp=target_mpp,
                    mpp=MPP,
                )
            ]
        total = time.perf_counter() - t0
        nuclei = sum(int(np.unique(r.instances).size - (r.instances == 0).any()) for r in results)
        return {"total_s": total, "model_s": clock["model"], "nuclei": nuclei}

    once()  # warm-up: tracing, first-call allocations
    best = _best([once() for _ in range(args.repeats)])
    best["engine"] = getattr(predictor, "engine", "keras")
    if args.case != "c":
        best["tile"] = tile_size
        best["margin"] = margin
    return best


def worker_stardist(args: argparse.Namespace) -> dict:
    from csbdeep.utils import normalize
    from stardist.models import StarDist2D

    array = np.load(args.input)
    images = list(array) if args.case == "c" else [array]
    folder = Path(args.stardist_model)
    model = StarDist2D(None, name=folder.name, basedir=str(folder.parent))

    def predict(image: np.ndarray) -> tuple[float, int]:
        """``(seconds before NMS, nuclei)`` of one image."""
        n_tiles = tuple(math.ceil(s / args.stardist_tile) for s in image.shape[:2]) + (1,)
        t0 = time.perf_counter()
        x = normalize(image, 1, 99.8, axis=(0, 1, 2))
        # predict_instances(...) is exactly "run this generator to its end"; its 'nms' marker
        # separates the network prediction from the non-maximum suppression.
        t_nms = None
        result = None
        for result in model._predict_instances_generator(
            x, n_tiles=n_tiles, show_tile_progress=False
        ):
            if isinstance(result, str) and result == "nms":
                t_nms = time.perf_counter()
        _labels, details = result
        return t_nms - t0, len(details["points"])

    def once() -> dict:
        model_s = 0.0
        nuclei = 0
        t0 = time.perf_counter()
        for image in images:
            m, n = predict(image)
            model_s += m
            nuclei += n
        total = time.perf_counter() - t0
        return {"total_s": total, "model_s": model_s, "nuclei": nuclei}

    once()
    return _best([once() for _ in range(args.repeats)])


def run_worker(args: argparse.Namespace) -> None:
    result = worker_kerasnuc(args) if args.worker == "kerasnuc" else worker_stardist(args)
    Path(args.result).write_text(json.dumps(result))


# --- orchestration ----------------------------------------------------------------------------


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run ``cmd`` to its end; ``(wall seconds, peak RSS MB of it and its children)``."""
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return wall, usage.ru_maxrss / 1024.0


def kerasnuc_cli() -> list[str]:
    script = Path(sys.executable).parent / "kerasnuc"
    if script.is_file():
        return [str(script)]
    found = shutil.which("kerasnuc")
    return [found] if found else [sys.executable, "-m", "kerasnuc"]


def measure(
    tool: str,
    case: str,
    paths: dict[str, Path],
    args: argparse.Namespace,
    work: Path,
    env: dict[str, str],
) -> dict:
    python = sys.executable if tool == "kerasnuc" else args.stardist_python
    result_file = work / f"result_{tool}_{case}.json"
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        tool,
        "--case",
        case,
        "--input",
        str(paths["npy"]),
        "--result",
        str(result_file),
        "--repeats",
        str(args.repeats),
        "--model",
        args.model,
        "--stardist-model",
        args.stardist_model,
        "--stardist-tile",
        str(args.stardist_tile),
        "--engine",
        args.engine,
    ]
    if args.tile:
        cmd += ["--tile", str(args.tile)]
    if args.no_balance:
        cmd.append("--no-balance")
    print(f"  {tool} {case}: in process ...", flush=True)
    _, rss = spawn(cmd, work / f"log_{tool}_{case}.txt", env)
    row = json.loads(result_file.read_text())
    row["rss_mb"] = rss
    if args.no_cli:
        return row
    cli_times, cli_rss = [], 0.0
    for r in range(args.repeats):
        out = work / f"cli_{tool}_{case}_{r}"
        if tool == "kerasnuc":
            cmd = [*kerasnuc_cli(), "predict", str(paths["png"]), "--out", str(out)]
            cmd += ["--mpp", str(MPP), "--model", args.model, "--engine", args.engine]
            if args.tile:
                cmd += ["--tile", str(args.tile)]  # the CLI always balances its tiles
            if args.cli_format:
                cmd += ["--format", args.cli_format]
        else:
            cmd = [python, "-c", STARDIST_CLI, args.stardist_model, str(paths["png"]), str(out)]
            cmd.append(str(args.stardist_tile))
        print(f"  {tool} {case}: CLI run {r + 1}/{args.repeats} ...", flush=True)
        wall, rss = spawn(cmd, work / f"log_cli_{tool}_{case}_{r}.txt", env)
        cli_times.append(wall)
        cli_rss = max(cli_rss, rss)
        shutil.rmtree(out, ignore_errors=True)
    row["cli_s"] = min(cli_times)
    row["cli_rss_mb"] = cli_rss
    return row


def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
        return "" if value is None else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def checks(results: dict[str, dict[str, dict]]) -> list[dict]:
    """The done-when conditions of issue 16 on what was measured."""
    out = []
    for case in CASES:
        if case in results:
            ratio = results[case]["kerasnuc"]["total_s"] / results[case]["stardist"]["total_s"]
            out.append(
                {
                    "check": f"({case}) kerasnuc / StarDist in process s/MPx <= 1.0",
                    "value": ratio,
                    "ok": ratio <= 1.0,
                }
            )
    if "a" in results and "cli_s" in results["a"]["kerasnuc"]:
        ratio = results["a"]["kerasnuc"]["cli_s"] / results["a"]["stardist"]["total_s"]
        out.append(
            {
                "check": "(a) kerasnuc CLI / StarDist in process <= 2.0",
                "value": ratio,
                "ok": ratio <= 2.0,
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="kerasnuc model name or run folder")
    parser.add_argument("--stardist-model", default=DEFAULT_STARDIST_MODEL)
    parser.add_argument(
        "--engine",
        choices=("auto", "onnx", "keras"),
        default="auto",
        help="what runs kerasnuc's model (as kerasnuc predict --engine)",
    )
    parser.add_argument("--stardist-python", default=DEFAULT_STARDIST_PYTHON)
    parser.add_argument(
        "--stardist-tile",
        type=int,
        default=None,
        help="StarDist n_tiles = ceil(side / this) (default 1024; 256 with --quick)",
    )
    parser.add_argument(
        "--tile", type=int, default=None, help="kerasnuc largest tile (default: predict's)"
    )
    parser.add_argument(
        "--no-balance", action="store_true", help="kerasnuc full-size tiles (the old rule)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="best of N (default 3)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (smoke test)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--no-cli", action="store_true", help="skip the new-process runs")
    parser.add_argument("--cli-format", default=None, help="--format of kerasnuc predict")
    parser.add_argument("--data", default=os.environ.get("KERASNUC_DATA", "/work/shared/data"))
    parser.add_argument("--workdir", default=None, help="keep inputs and logs here")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    # internal: one measurement in this process
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.stardist_tile is None:
        args.stardist_tile = 256 if args.quick else 1024
    if args.worker:
        run_worker(args)
        return

    if not Path(args.stardist_python).is_file():
        raise SystemExit(f"{args.stardist_python}: no such Python (see the module docstring)")
    if not (Path(args.stardist_model) / "config.json").is_file():
        raise SystemExit(
            f"{args.stardist_model}: no StarDist model; train it with "
            "benchmarks/train_stardist_peer.py"
        )
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    inputs = build_inputs(Path(args.data), args.quick)
    temp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.TemporaryDirectory(prefix="peer_speed_")
        work = Path(temp.name)
    try:
        paths = write_inputs({c: inputs[c] for c in args.cases}, work)
        results: dict[str, dict[str, dict]] = {}
        for case in args.cases:
            shape = "x".join(str(s) for s in inputs[case].shape[:-1])
            print(f"case {case}: {shape}, {megapixels(inputs[case]):.2f} MPx", flush=True)
            results[case] = {t: measure(t, case, paths[case], args, work, env) for t in TOOLS}
    finally:
        if temp is not None:
            temp.cleanup()

    rows = []
    for case, by_tool in results.items():
        mpx = megapixels(inputs[case])
        shape = "x".join(str(s) for s in inputs[case].shape[:-1])
        for tool in TOOLS:
            row = by_tool[tool]
            row["postproc_s"] = row["total_s"] - row["model_s"]
            row["s_per_mpx"] = row["total_s"] / mpx
            rows.append({"case": case, "input": shape, "tool": tool, **row})
        ratio = {
            c: by_tool["kerasnuc"][c] / by_tool["stardist"][c]
            for c in COLUMNS
            if c in by_tool["kerasnuc"] and by_tool["stardist"].get(c)
        }
        by_tool["ratio"] = ratio
        rows.append({"case": case, "input": shape, "tool": "ratio k/s", **ratio})
    columns = ["case", "input", "tool", "engine", *COLUMNS, "nuclei"]
    if args.no_cli:
        columns = [c for c in columns if not c.startswith("cli_")]
    print()
    print(format_table(rows, columns))
    verdicts = checks(results)
    tiles = ", ".join(
        f"{c} {r['kerasnuc']['tile']} px, margin {r['kerasnuc'].get('margin', MARGIN)}"
        for c, r in results.items()
        if c != "c"
    )
    rule = "full size" if args.no_balance else "tile_plan"
    print(f"kerasnuc tiles ({rule}): {tiles or '-'}; StarDist n_tiles: ceil(side / ", end="")
    print(f"{args.stardist_tile})")
    print()
    if args.quick:
        print("(--quick: tiny sizes, not the measurement of issue 16)")
    for v in verdicts:
        print(f"{'PASS' if v['ok'] else 'FAIL'}  {v['check']}: {v['value']:.3f}")
    for case, by_tool in results.items():
        for tool in TOOLS:
            if by_tool[tool]["nuclei"] == 0:
                print(
                    f"WARNING: {tool} found no nuclei in case {case}; its post-processing time "
                    "is not realistic (an untrained model? see train_stardist_peer.py)"
                )
    if args.json:
        report = {
            "settings": {
                "quick": args.quick,
                "repeats": args.repeats,
                "kerasnuc_model": args.model,
                "stardist_model": args.stardist_model,
                "stardist_tile": args.stardist_tile,
                "kerasnuc_tiling": {
                    "largest_tile": args.tile or "predict's default",
                    "balanced": not args.no_balance,
                    "tile_used": {c: r["kerasnuc"].get("tile") for c, r in results.items()},
                    "margin": MARGIN,
                    "mpp": MPP,
                },
                "cli_format": args.cli_format,
                "cpu_count": os.cpu_count(),
            },
            "inputs": {c: list(inputs[c].shape) for c in args.cases},
            "results": results,
            "checks": verdicts,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
