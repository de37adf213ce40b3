"""``kerasnuc predict``: nuclei of images and whole slides as GeoJSON, CSV, TIFF, overlay, summary.

A thin wrapper around :func:`kerasnuc.inference.job.predict_inputs`; TensorFlow is imported in
the command body, after ``--device cpu`` has hidden the GPUs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from kerasnuc.cli.common import MPP, check_writable_dir, format_table, verbose_option
from kerasnuc.fileutil import KerasnucError

FORMAT_NAMES = ("geojson", "csv", "tiff", "overlay", "summary")


def _parse_formats(value: str | None) -> frozenset[str] | None:
    if value is None or value.strip().lower() in ("", "all", "default"):
        return None
    names = {v.strip().lower() for v in value.split(",") if v.strip()}
    bad = sorted(names - set(FORMAT_NAMES))
    if bad or not names:
        raise click.BadParameter(
            f"unknown format(s) {', '.join(bad) or value!r}; choose from {', '.join(FORMAT_NAMES)}",
            param_hint="--format",
        )
    return frozenset(names)


class _TileProgress:
    """A click progress bar over the tiles of one input, opened at the first report."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(
                length=max(total, 1),
                label=self.label,
                file=click.get_text_stream("stderr"),
                show_eta=True,
                show_pos=True,
            )
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _reason(report) -> str:
    """The failure reason, prefixed with the input unless it already names it."""
    reason = str(report.reason)
    return reason if str(report.path) in reason else f"{report.path}: {reason}"


def _set_device(device: str) -> None:
    """Hide the GPUs for ``cpu`` (before TensorFlow is imported); check one exists for ``gpu``."""
    if device == "cpu":
        if "tensorflow" in sys.modules:
            click.echo("Note: TensorFlow already loaded; --device cpu may not hide GPUs", err=True)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    if device == "gpu":
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            raise KerasnucError("--device gpu: TensorFlow sees no GPU (use --device cpu or auto)")


def example_inputs(values: tuple[str, ...]) -> list[str]:
    """Inputs with the name of a bundled example dataset (e.g. 'demo') replaced by its images.

    A path that exists always wins over an example name.
    """
    from kerasnuc.examples import EXAMPLE_DATASETS

    out = []
    for value in values:
        if not Path(value).exists() and value in EXAMPLE_DATASETS:
            out.append(str(EXAMPLE_DATASETS[value] / "images"))
        else:
            out.append(value)
    return out


def _echo_report(report) -> None:
    for message in report.warnings:
        click.echo(f"warning: {message}", err=True)
    if report.status == "failed":
        click.echo(f"failed: {_reason(report)}", err=True)


def _predict_here(predictor, paths, out, options, model_id) -> list:
    """Inputs one after the other in this process, a progress bar over the tiles of each."""
    from kerasnuc.inference.job import predict_inputs

    bars: list[_TileProgress] = []

    def progress_factory(path: Path, name: str) -> _TileProgress:
        bars.append(_TileProgress(f"{name}: tiles"))
        return bars[-1]

    def on_report(report) -> None:
        if bars:
            bars[-1].close()
        _echo_report(report)

    return predict_inputs(
        paths,
        predictor,
        out,
        options,
        model_id=model_id,
        progress_factory=progress_factory,
        on_report=on_report,
    )


def _predict_on_cluster(cluster, worker_threads, spec, paths, out, options, model_id) -> list:
    """One Dask task per input (kerasnuc.inference.cluster), a progress bar over the inputs."""
    from kerasnuc.inference.cluster import open_client, predict_on_cluster

    with open_client(cluster, worker_threads) as client:
        workers = len(client.scheduler_info().get("workers", {}))
        click.echo(f"Dask cluster: {workers} worker(s)", err=True)
        with click.progressbar(
            length=len(paths), label="inputs", file=click.get_text_stream("stderr"), show_pos=True
        ) as bar:

            def on_report(report) -> None:
                _echo_report(report)
                bar.update(1)

            return predict_on_cluster(
                client, paths, out, spec, options, model_id=model_id, on_report=on_report
            )


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--model",
    "model",
    default=None,
    help="Run directory written by 'kerasnuc train', or the name of a bundled model.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder; each input gets OUT/<name>/.",
)
@click.option(
    "--tta",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Test-time augmentation passes (16 as in the paper; 0 or 1: one plain pass).",
)
@click.option(
    "--views",
    type=click.Choice(["1", "2", "4", "8"]),
    default=None,
    help="Flips / rotations of each tile whose maps are averaged (1: the tile as it is; 2: and "
    "its mirror image; 4, 8: more flips and turns), one forward pass each [default: the "
    "model's own setting, 2 for the bundled default].",
)
@click.option(
    "--precision",
    type=click.Choice(["float32", "int8"]),
    default=None,
    help="Graph of the onnxruntime engine: float32 (model.onnx) or int8 (model.int8.onnx, about "
    "2.7x faster on a CPU with VNNI) [default: the model's own setting].",
)
@click.option(
    "--mpp",
    type=MPP,
    default=None,
    help="Pixel size of the inputs in um/px, overriding their files (not the model's "
    "resolution, which comes with the model).",
)
@click.option(
    "--format",
    "formats",
    default=None,
    help="Comma-separated outputs among geojson,csv,tiff,overlay,summary [default: all that fit].",
)
@click.option(
    "--tile",
    type=click.IntRange(min=32),
    default=1152,
    show_default=True,
    help="Largest tile side the model sees, in model pixels; images that fit in memory get the "
    "smallest tiles that need no more of them (1152: a 1000x1000 image in one tile).",
)
@click.option(
    "--margin",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Context per tile side in model pixels; the largest nucleus must fit in it. Images that "
    "fit in one tile need none.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Tiles per model call (and forward passes per batch with --tta).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Skip inputs already predicted from the same file with the same model and settings; "
    "continue interrupted slides.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "gpu"]),
    default="auto",
    show_default=True,
    help="cpu hides the GPUs; gpu fails without one.",
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "onnx", "keras"]),
    default="auto",
    show_default=True,
    help="What runs the model: onnxruntime from the model folder's model.onnx (no TensorFlow: "
    "starts in about a second; plain prediction of conic models), or Keras/TensorFlow (every "
    "method, --tta, GPUs). auto: onnx where it can, else keras.",
)
@click.option(
    "--grey",
    type=click.Choice(["error", "convert"]),
    default="error",
    show_default=True,
    help="Greyscale inputs: refuse them, or repeat the grey value in R, G and B.",
)
@click.option("--no-tissue", is_flag=True, help="Predict every tile of slides (no tissue mask).")
@click.option("--recursive", is_flag=True, help="Also collect images from sub-folders.")
@click.option(
    "--server",
    default=None,
    help="TF Serving endpoint (http://host:8501 or grpc://host:8500) that runs the model "
    "instead of this machine; --model then names the served model.",
)
@click.option(
    "--cluster",
    default=None,
    metavar="SPEC",
    help="Run one Dask task per input: 'local' or 'local:N' (N worker processes on this "
    "machine), a scheduler address (tcp://host:8786) or a scheduler file. Needs "
    "kerasnuc[cluster]; inputs and --out must be on storage every worker can read.",
)
@click.option(
    "--worker-threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --cluster: TensorFlow threads per worker (local: workers = cores // threads).",
)
@verbose_option
def predict(
    inputs: tuple[str, ...],
    model: str | None,
    out: Path,
    tta: int,
    views: str | None,
    precision: str | None,
    mpp: float | None,
    formats: str | None,
    tile: int,
    margin: int,
    batch_size: int,
    resume: bool,
    device: str,
    engine: str,
    grey: str,
    no_tissue: bool,
    recursive: bool,
    server: str | None,
    cluster: str | None,
    worker_threads: int,
) -> None:
    """Find, outline, classify and measure the nuclei of images and whole slides.

    INPUT: image files (PNG, JPEG, TIFF, OME-TIFF) or slides (SVS, NDPI, MRXS, ...), or folders
    of them, or 'demo' (the bundled example images). Each input gets a folder OUT/<name>/ with
    <name>.geojson (QuPath detections with measurements), <name>.csv (one row per nucleus),
    <name>.instances.ome.tif and <name>.classes.ome.tif (pyramidal label maps),
    <name>.overlay.png and <name>.summary.json (counts and densities per class). A folder
    appears only once all of its files are complete. Unreadable inputs are reported and skipped;
    the exit code is 1 when any input failed. With --cluster, each input is a task on a Dask
    worker that loads the model once.
    """
    format_set = _parse_formats(formats)
    n_views = None if views is None else int(views)
    if tta > 1 and n_views is not None and n_views > 1:
        raise KerasnucError(
            f"--views {n_views} and --tta {tta} exclude each other (the TTA passes have their "
            "own flips)"
        )
    if tile - 2 * margin < 1:
        raise click.BadParameter(
            f"must be less than half of --tile ({tile}); got {margin}", param_hint="--margin"
        )
    if cluster is not None:
        from kerasnuc.inference.cluster import parse_cluster

        parse_cluster(cluster)  # a bad spec fails before the model is loaded
    check_writable_dir(out)
    _set_device(device)
    from kerasnuc.inference.inputs import find_inputs
    from kerasnuc.inference.job import PredictOptions
    from kerasnuc.model_dirs import resolve_model

    if precision == "int8" and (server is not None or cluster is not None):
        raise KerasnucError("--precision int8 runs on onnxruntime, not with --server or --cluster")
    if server is not None and not model:
        raise KerasnucError("--server needs --model NAME, the model's name on the server")
    run_dir = resolve_model(model) if server is None else None
    paths = find_inputs(example_inputs(inputs), recursive=recursive, exclude=out)
    if not paths:
        raise KerasnucError(f"no images found in {', '.join(inputs)}")
    predictor = None
    if cluster is None and run_dir is None:
        if engine == "onnx":
            raise KerasnucError("--engine onnx: --server runs the model on the server")
        from kerasnuc.inference.predictor import Predictor

        predictor = Predictor.from_server(
            server, model, tta=tta, batch_size=batch_size, views=n_views
        )
    elif cluster is None:
        from kerasnuc.inference.onnx_predictor import load_engine_predictor

        predictor = load_engine_predictor(
            run_dir,
            engine,
            tta,
            batch_size,
            keras_reason="--device gpu runs with TensorFlow" if device == "gpu" else None,
            note=lambda message: click.echo(f"Note: {message}", err=True),
            views=n_views,
            precision=precision,
        )
    if run_dir is None:
        model_id, source = f"{model} @ {server}", f"{model} on {server}"
    else:
        model_id, source = run_dir.resolve().name, str(run_dir)
    if getattr(predictor, "engine", None) == "onnxruntime":
        source += ", onnxruntime"
    options = PredictOptions(
        formats=format_set,
        tile_size=tile,
        margin=margin,
        batch_size=batch_size,
        mpp=mpp,
        grey=grey,
        tissue=not no_tissue,
        resume=resume,
    )
    where = f", cluster {cluster}" if cluster is not None else ""
    click.echo(f"{len(paths)} input(s), model {source}, output {out}{where}", err=True)
    start = time.perf_counter()
    if cluster is not None:
        from kerasnuc.inference.cluster import PredictorSpec

        spec = PredictorSpec(
            run_dir=str(run_dir.resolve()) if run_dir is not None else None,
            server=server,
            model=model,
            tta=tta,
            views=n_views,
            batch_size=batch_size,
            threads=worker_threads,
        )
        reports = _predict_on_cluster(cluster, worker_threads, spec, paths, out, options, model_id)
    else:
        reports = _predict_here(predictor, paths, out, options, model_id)
    rows = [
        {
            "input": r.path.name,
            "status": r.status,
            "nuclei": r.n_nuclei,
            "seconds": f"{r.seconds:.1f}" if r.status == "done" else None,
            "output": str(r.out_dir) if r.status != "failed" else "",
        }
        for r in reports
    ]
    click.echo(format_table(rows, ["input", "status", "nuclei", "seconds", "output"]))
    failed = [r for r in reports if r.status == "failed"]
    done = sum(r.status == "done" for r in reports)
    complete = sum(r.status == "complete" for r in reports)
    click.echo(
        f"\n{done} predicted, {complete} already complete (--resume), {len(failed)} failed "
        f"in {time.perf_counter() - start:.1f} s"
    )
    if failed:
        click.echo("Failed inputs:")
        for r in failed:
            click.echo(f"  {_reason(r)}")
        raise click.exceptions.Exit(1)
