"""``kerasnuc data``: dataset import and inspection."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kerasnuc.cli.common import (
    MPP,
    check_writable_dir,
    dataset_path,
    format_table,
    json_option,
    verbose_option,
)

IMPORT_FORMATS = ("monuseg", "consep", "lizard", "conic", "pannuke", "masks", "geojson")
MAX_PROBLEMS_SHOWN = 20


@click.group()
def data() -> None:
    """Import datasets into the kerasnuc layout and inspect them."""


def _echo_problems(problems: list[str]) -> None:
    for line in problems[:MAX_PROBLEMS_SHOWN]:
        click.echo(f"Warning: {line}", err=True)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        click.echo(f"Warning: ... and {len(problems) - MAX_PROBLEMS_SHOWN} more", err=True)


@data.command("import")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(IMPORT_FORMATS))
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--mpp", type=MPP, help="Microns per pixel.")
@click.option("--name", help="Dataset name for meta.json (default: DST folder name).")
@click.option("--split", default="train", show_default=True, help="Split of the imported images.")
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    help="Draw this fraction of the images at random for the 'val' split.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --val-fraction.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option(
    "--merge-classes/--no-merge-classes",
    default=None,
    help="consep: merge the 7 CoNSeP types into HoVer-Net's 4 classes (default: merge).",
)
@click.option(
    "--classes",
    "class_names",
    help="masks, geojson: comma-separated class names for ids 1, 2, ... (fixes the order).",
)
@click.option(
    "--mask-type",
    type=click.Choice(["auto", "instance", "binary"]),
    help="masks: read masks as instance maps, binary masks (connected components), or decide "
    "per file (default: auto).",
)
@click.option(
    "--object-types",
    help="geojson: keep only these QuPath object types, e.g. 'detection,cell' (default: all).",
)
@verbose_option
def import_(
    fmt: str,
    src: Path,
    dst: Path,
    mpp: float | None,
    name: str | None,
    split: str,
    val_fraction: float | None,
    seed: int,
    overwrite: bool,
    merge_classes: bool | None,
    class_names: str | None,
    mask_type: str | None,
    object_types: str | None,
) -> None:
    """Convert a dataset in FORMAT from SRC into the kerasnuc layout at DST.

    \b
    FORMAT is one of:
      monuseg  Annotations/*.xml polygons + images with the same stem (.tif/.png)
      consep   Images/*.png + Labels/*.mat (inst_map, type_map or inst_type)
      lizard   CoNIC challenge release of Lizard: images.npy + labels.npy (+ counts.csv,
               patch_info.csv); 'conic' is the same format
      pannuke  one fold: images.npy + masks.npy (+ types.npy)
      masks    images/<stem>.* + masks/<stem>.png|tif (+ classes/<stem>.png)
      geojson  images/<stem>.* + annotations/<stem>.geojson (QuPath export)

    DST appears only when every image was converted; on any error nothing is written.
    """
    from kerasnuc.data.importers import FORMAT_OPTIONS, check_destination, scan, write_plan

    given = {
        "merge_classes": ("--merge-classes/--no-merge-classes", merge_classes),
        "classes": ("--classes", class_names),
        "mask_type": ("--mask-type", mask_type),
        "object_types": ("--object-types", object_types),
    }
    options = {}
    for key, (flag, value) in given.items():
        if value is None:
            continue
        if key not in FORMAT_OPTIONS[fmt]:
            raise click.UsageError(f"{flag} does not apply to format {fmt!r}")
        options[key] = value
    check_destination(dst, overwrite)
    check_writable_dir(dst.parent, dst)
    try:
        plan = scan(fmt, src, **options)
        with click.progressbar(
            length=len(plan.items), label=f"Importing {fmt}", file=click.get_text_stream("stderr")
        ) as bar:
            report = write_plan(
                plan,
                dst,
                mpp=mpp,
                name=name,
                split=split,
                val_fraction=val_fraction,
                seed=seed,
                overwrite=overwrite,
                progress=bar.update,
            )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    splits = ", ".join(f"{k} {v}" for k, v in report.splits.items())
    click.echo(
        f"Imported {report.n_images} images ({report.n_nuclei} nuclei) from {fmt} into {dst}"
    )
    click.echo(f"  splits: {splits}")
    if report.class_names:
        click.echo("  classes: " + ", ".join(f"{k} {v}" for k, v in report.class_names.items()))
    click.echo(f"  mpp: {report.mpp if report.mpp is not None else 'unknown'}")
    _echo_problems(report.problems)


def _stats_row(label: str, stats: dict | None) -> dict:
    row = {"measure": label}
    row.update(stats or {})
    return row


@data.command("info")
@click.argument("dataset")
@json_option
@verbose_option
def info(dataset: str, as_json: bool) -> None:
    """Counts, pixel statistics, nucleus sizes and validation problems of DATASET.

    DATASET is a dataset folder or the name of a bundled example (e.g. 'demo').
    """
    from kerasnuc.data.info import dataset_info

    result = dataset_info(dataset_path(dataset))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    mpp = result["mpp"]
    click.echo(
        f"{result['name']} ({result['root']}): {result['n_images']} images, "
        f"{result['n_nuclei']} nuclei, mpp {mpp if mpp is not None else 'unknown'}"
    )
    class_names = list((result["classes"] or {}).values())
    rows = []
    for split, st in result["splits"].items():
        rows.append({"split": split, "images": st["images"], "nuclei": st["nuclei"]})
        rows[-1].update(st.get("classes", {}))
    rows.append({"split": "all", "images": result["n_images"], "nuclei": result["n_nuclei"]})
    rows[-1].update({c["name"]: c["nuclei"] for c in result["class_counts"]})
    click.echo("\n" + format_table(rows, ["split", "images", "nuclei", *class_names]))
    if result["class_counts"]:
        click.echo(
            "\n"
            + format_table(result["class_counts"], ["id", "name", "nuclei", "images", "fraction"])
        )
    img = result["images"]
    sizes = ", ".join(f"{k} ({v})" for k, v in img["sizes"].items())
    click.echo(f"\nimage sizes: {sizes}; images without nuclei: {img['empty']}")
    px = result["pixels"]
    if px["mean"] is not None:
        mean = ", ".join(f"{v:.2f}" for v in px["mean"])
        std = ", ".join(f"{v:.2f}" for v in px["std"])
        click.echo(f"RGB mean: {mean}; std: {std} (0..255)")
    size = result["nucleus_size"]
    stat_cols = ["measure", "min", "median", "mean", "max"]
    stat_rows = [
        _stats_row("nuclei per image", img["nuclei_per_image"]),
        _stats_row("area (px)", size["area_px"]),
        _stats_row("equivalent diameter (px)", size["equivalent_diameter_px"]),
    ]
    if size["area_um2"] is not None:
        stat_rows.append(_stats_row("area (um^2)", size["area_um2"]))
        stat_rows.append(_stats_row("equivalent diameter (um)", size["equivalent_diameter_um"]))
    for name, stats in (size.get("by_class") or {}).items():
        stat_rows.append(_stats_row(f"area (px), {name}", stats))
    click.echo("\n" + format_table(stat_rows, stat_cols, floatfmt="{:.2f}"))
    problems = result["problems"]
    click.echo(f"\nproblems: {len(problems) or 'none'}")
    for line in problems[:MAX_PROBLEMS_SHOWN]:
        click.echo(f"  {line}")
    if len(problems) > MAX_PROBLEMS_SHOWN:
        click.echo(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more (use --json)")
