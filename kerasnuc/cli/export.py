"""``kerasnuc export``: write a trained run as a TF Serving SavedModel ``BASE/NAME/VERSION``."""

from __future__ import annotations

import json

import click

from kerasnuc.cli.common import check_writable_dir, json_option, verbose_option


def _warmup_sizes(value: str) -> list[tuple[int, int, int]]:
    """``"256,512x384"`` -> ``[(1, 256, 256), (1, 512, 384)]``; ``""`` or ``"none"`` -> ``[]``."""
    if value.strip().lower() in ("", "none"):
        return []
    shapes = []
    for part in value.split(","):
        dims = part.strip().lower().split("x")
        try:
            sizes = [int(d) for d in dims]
        except ValueError:
            sizes = []
        if len(sizes) not in (1, 2) or min(sizes) < 1:
            raise click.BadParameter(
                f"{part!r}: expected SIZE or HEIGHTxWIDTH (positive ints)", param_hint="--warmup"
            )
        h, w = (sizes[0], sizes[0]) if len(sizes) == 1 else sizes
        shapes.append((1, h, w))
    return shapes


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--name", required=True, help="Model name (URL path /v1/models/NAME).")
@click.option(
    "--version",
    type=click.IntRange(min=1),
    default=None,
    help="Version number (default: one more than the highest existing; never overwrites).",
)
@click.option(
    "--base",
    type=click.Path(file_okay=False),
    default="saved_models",
    show_default=True,
    help="TF Serving model base folder.",
)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Weights file.")
@click.option(
    "--padding",
    type=click.Choice(["reflect", "edge"]),
    default="reflect",
    show_default=True,
    help="In-graph padding to a multiple of 32.",
)
@click.option(
    "--warmup",
    default="256",
    show_default=True,
    help="Warm-up request sizes, SIZE or HxW, comma-separated ('none' for no warm-up file).",
)
@click.option(
    "--no-models-config",
    is_flag=True,
    help="Do not rewrite BASE/models.config (the TF Serving --model_config_file).",
)
@json_option
@verbose_option
def export(
    run_dir: str,
    name: str,
    version: int | None,
    base: str,
    weights: str | None,
    padding: str,
    warmup: str,
    no_models_config: bool,
    as_json: bool,
) -> None:
    """Export RUN_DIR as a SavedModel for TensorFlow Serving at BASE/NAME/VERSION.

    Signatures: serving_default (images uint8 (batch, height, width, 3)), serving_float
    (images float32 in [0, 1]) and kerasnuc_metadata; outputs are the probability maps at
    the input size. Metadata and warm-up requests go to assets.extra/.
    """
    shapes = _warmup_sizes(warmup)
    check_writable_dir(base)
    from kerasnuc.serving.export import check_model_name, export_run

    check_model_name(name)
    result = export_run(
        run_dir,
        name,
        base=base,
        version=version,
        weights=weights,
        padding=padding,
        warmup_shapes=shapes or None,
        update_models_config=not no_models_config,
    )
    summary = {
        "path": str(result.path),
        "name": result.name,
        "version": result.version,
        "method": result.metadata["method"],
        "outputs": result.metadata["outputs"],
        "signatures": sorted(result.metadata["signatures"]),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    outputs = ", ".join(f"{k} ({c})" for k, c in summary["outputs"].items())
    click.echo(f"exported {summary['method']} model {name!r} version {result.version}")
    click.echo(f"  path:       {result.path}")
    click.echo(f"  signatures: {', '.join(summary['signatures'])}")
    click.echo(f"  outputs:    {outputs}")
