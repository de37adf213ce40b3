"""``kerasnuc models``: list, show and pack named models."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kerasnuc.cli.common import (
    check_writable_dir,
    dataset_path,
    format_table,
    json_option,
    verbose_option,
)
from kerasnuc.fileutil import KerasnucError


def _headline(card: dict) -> str:
    """The main validation scores of a card as a short text, e.g. 'Kumar AJI 0.61, PQ 0.58'."""
    parts = []
    for dataset, scores in (card.get("scores") or {}).items():
        if not isinstance(scores, dict):
            continue
        keys = [k for k in ("aji", "pq", "mpq_plus") if isinstance(scores.get(k), (int, float))]
        if keys:
            text = ", ".join(f"{k.upper().replace('_PLUS', '+')} {scores[k]:.3f}" for k in keys)
            parts.append(f"{dataset}: {text}")
    return "; ".join(parts)


@click.group("models", invoke_without_command=True)
@json_option
@click.pass_context
@verbose_option
def models(ctx: click.Context, as_json: bool) -> None:
    """List the named models (bundled with the package), or show / pack one.

    A named model is used with 'kerasnuc predict --model NAME'; 'default' is used when --model
    is omitted.
    """
    if ctx.invoked_subcommand is not None:
        return
    from kerasnuc.runs import DEFAULT_MODEL, bundled_models, read_card

    cards = {name: read_card(path) for name, path in bundled_models().items()}
    if as_json:
        click.echo(json.dumps(cards, indent=2))
        return
    if not cards:
        click.echo("no named models installed")
        return
    rows = [
        {
            "name": name + (" (default)" if name == DEFAULT_MODEL else ""),
            "method": card.get("method"),
            "um/px": card.get("mpp"),
            "classes": ", ".join((card.get("classes") or {}).values()) or "-",
            "validation": _headline(card),
        }
        for name, card in cards.items()
    ]
    click.echo(format_table(rows, ["name", "method", "um/px", "classes", "validation"], "{:g}"))


@models.command("show")
@click.argument("name")
@verbose_option
def show(name: str) -> None:
    """Print the model card of NAME (a named model or a run folder) as JSON."""
    from kerasnuc.runs import read_card, resolve_model

    click.echo(json.dumps(read_card(resolve_model(name)), indent=2))


@models.command("pack")
@click.argument("run_dir")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--card",
    "card_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON object with model-card fields (description, licence, scores, ...).",
)
@click.option("--float32", is_flag=True, help="Keep float32 weights (default: float16).")
@click.option("--overwrite", is_flag=True, help="Replace DST.")
@verbose_option
def pack(run_dir: str, dst: Path, card_file: Path | None, float32: bool, overwrite: bool) -> None:
    """Write RUN_DIR (a run folder or a bundled model) as a weights-only named model folder DST
    with a model card (no local paths: datasets and runs are named by their folder names)."""
    from kerasnuc.runs import pack_run, resolve_model

    run_path = resolve_model(run_dir)

    check_writable_dir(dst.parent, dst)
    card = None
    if card_file is not None:
        try:
            card = json.loads(card_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KerasnucError(f"{card_file}: invalid JSON ({exc})") from exc
        if not isinstance(card, dict):
            raise KerasnucError(f"{card_file}: the card must be a JSON object")
    out = pack_run(run_path, dst, card=card, float16=not float32, overwrite=overwrite)
    size = (out / "model.weights.h5").stat().st_size / 2**20
    click.echo(f"{out}: weights {size:.1f} MiB ({'float32' if float32 else 'float16'})")
    _write_onnx_if_possible(out, float32)


def _write_onnx_if_possible(run_path: Path, float32: bool) -> None:
    """``model.onnx`` next to packed conic weights when the onnx package is installed."""
    import importlib.util

    from kerasnuc.runs import load_config

    if load_config(run_path).method != "conic":
        return
    if importlib.util.find_spec("onnx") is None:
        click.echo(
            "Note: no model.onnx written (pip install 'kerasnuc[onnx]', then kerasnuc models "
            f"onnx {run_path}): kerasnuc predict runs this model with TensorFlow",
            err=True,
        )
        return
    from kerasnuc.serving.onnx import export_run_onnx

    try:
        path = export_run_onnx(run_path, float16_weights=not float32)
    except KerasnucError as err:  # a layer the exporter does not know: Keras runs the model
        click.echo(f"Note: no model.onnx written ({err})", err=True)
        return
    click.echo(f"{path}: {path.stat().st_size / 2**20:.1f} MiB (onnxruntime, no TensorFlow)")


@models.command("onnx")
@click.argument("run_dir")
@click.option("--float32", is_flag=True, help="Store float32 weights (default: float16).")
@click.option(
    "--int8-data",
    "int8_data",
    multiple=True,
    help="Also write model.int8.onnx, its activations calibrated on crops of this dataset's "
    "train split (repeatable).",
)
@verbose_option
def onnx(run_dir: str, float32: bool, int8_data: tuple[str, ...]) -> None:
    """Write RUN_DIR/model.onnx, with which kerasnuc predict runs the model on onnxruntime
    (no TensorFlow; conic models). Needs the onnx package (pip install 'kerasnuc[onnx]');
    the graph records the weights it was made from, so write it again after training on.
    With --int8-data, also the 8-bit graph model.int8.onnx (kerasnuc predict --precision int8,
    or "onnx_precision": "int8" in the run's config "inference")."""
    from kerasnuc.runs import is_bundled, resolve_model
    from kerasnuc.serving.onnx import export_run_onnx

    run_path = resolve_model(run_dir)
    if is_bundled(run_path):
        raise KerasnucError(
            f"{run_dir}: bundled models are read-only and ship their model.onnx; copy one with "
            "kerasnuc models pack first"
        )
    check_writable_dir(run_path)
    dirs = [dataset_path(d) for d in int8_data]
    for d in dirs:
        if not (d / "meta.json").is_file():
            raise KerasnucError(f"{d}: not a dataset folder (no meta.json)")
    path = export_run_onnx(run_path, float16_weights=not float32)
    size = path.stat().st_size / 2**20
    click.echo(f"{path}: {size:.1f} MiB ({'float32' if float32 else 'float16'} weights)")
    if dirs:
        from kerasnuc.serving.quantize import quantize_run_onnx

        path = quantize_run_onnx(run_path, dirs)
        click.echo(f"{path}: {path.stat().st_size / 2**20:.1f} MiB (int8, {len(dirs)} datasets)")
