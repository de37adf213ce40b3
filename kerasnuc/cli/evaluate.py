"""``kerasnuc evaluate``: score predicted instance (and class) maps against a labelled dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from kerasnuc.cli.common import (
    check_writable_dir,
    dataset_path,
    format_table,
    json_option,
    verbose_option,
)
from kerasnuc.fileutil import KerasnucError

MAX_SKIPPED_SHOWN = 20
DEFAULT_MAX_DIST = 12.0  # kept equal to kerasnuc.metrics.DEFAULT_MAX_DIST (checked in tests)

# (key of a metrics row, column header) of the per-image table.
IMAGE_COLUMNS = [
    ("n_gt", "n_gt"),
    ("n_pred", "n_pred"),
    ("pq", "PQ"),
    ("dq", "DQ"),
    ("sq", "SQ"),
    ("aji", "AJI"),
    ("aji_plus", "AJI+"),
    ("pixel_f1", "F1"),
    ("obj_dice", "ObjDice"),
    ("obj_hausdorff", "ObjHD"),
    ("det_f1", "DetF1"),
]
CLASS_IMAGE_COLUMNS = [("mpq", "mPQ"), ("miou", "mIoU")]


def _json_safe(obj: Any) -> Any:
    """Replace float nan by None and +-inf by the strings "inf" / "-inf" (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj


def _read_label_map(path: Path, shape: tuple[int, ...], what: str):
    """Read a single-channel integer PNG of the given shape as int32 (KerasnucError otherwise)."""
    import numpy as np

    from kerasnuc.fileutil import read_image

    if not path.is_file():
        raise KerasnucError(f"{path}: no {what} file")
    arr = read_image(path)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise KerasnucError(
            f"{path}: {what} must be a single-channel integer image; got {arr.dtype} {arr.shape}"
        )
    if arr.shape != tuple(shape):
        raise KerasnucError(f"{path}: shape {arr.shape} does not match the ground truth {shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.int32).max):
        raise KerasnucError(
            f"{path}: {what} ids must lie in 0..2^31-1; got {int(arr.min())}..{int(arr.max())}"
        )
    return arr.astype(np.int32)


def _prediction_layout(pred_dir: Path):
    """``(instance path of id, class path of id, has class maps)`` of a prediction folder.

    Two layouts are read: the dataset layout (``instances/<id>.png``, ``classes/<id>.png``) and
    the output of ``kerasnuc predict`` (``<id>/<id>.instances.ome.tif``,
    ``<id>/<id>.classes.ome.tif``).
    """
    if (pred_dir / "instances").is_dir():
        return (
            lambda id: pred_dir / "instances" / f"{id}.png",
            lambda id: pred_dir / "classes" / f"{id}.png",
            (pred_dir / "classes").is_dir(),
        )
    if any(pred_dir.glob("*/*.instances.ome.tif")):
        return (
            lambda id: pred_dir / id / f"{id}.instances.ome.tif",
            lambda id: pred_dir / id / f"{id}.classes.ome.tif",
            any(pred_dir.glob("*/*.classes.ome.tif")),
        )
    raise KerasnucError(
        f"{pred_dir}: no predictions found (expected instances/<id>.png, or the "
        "<id>/<id>.instances.ome.tif folders of 'kerasnuc predict')"
    )


def _check_pred_meta(pred: Path, gt_classes: dict[int, str]) -> list[str]:
    """Check the optional PRED/meta.json against the ground truth; return notes to print."""
    meta_path = pred / "meta.json"
    if not meta_path.is_file():
        return []
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KerasnucError(f"{meta_path}: invalid JSON ({exc})") from exc
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if not classes or not gt_classes:
        return []
    try:
        pred_classes = {int(k): str(v) for k, v in classes.items()}
    except (ValueError, AttributeError) as exc:
        raise KerasnucError(f"{meta_path}: 'classes' must map integer ids to names") from exc
    if set(pred_classes) != set(gt_classes):
        raise KerasnucError(
            f"{meta_path}: class ids {sorted(pred_classes)} differ from the ground truth's "
            f"{sorted(gt_classes)}"
        )
    renamed = [c for c in gt_classes if pred_classes[c] != gt_classes[c]]
    if renamed:
        return [f"class names differ from the ground truth for ids {renamed} (ids are scored)"]
    return []


def _print_tables(result: dict[str, Any]) -> None:
    classes = result["classes"]
    columns = IMAGE_COLUMNS + (CLASS_IMAGE_COLUMNS if classes else [])
    rows = [{"id": r["id"], **{h: r.get(k) for k, h in columns}} for r in result["images"]]
    s = result["summary"]
    rows.append({"id": "ALL", **{h: s.get(k) for k, h in columns}})
    headers = ["id"] + [h for _, h in columns]
    click.echo(format_table(rows, headers))
    click.echo(
        f"\n{s['n_images']} images scored; ALL = mean over images (counts summed).\n"
        f"Dataset: CCC of counts {s['ccc']:.4f}, detection P/R/F1 (pooled) "
        f"{s['det_precision_pooled']:.4f}/{s['det_recall_pooled']:.4f}/"
        f"{s['det_f1_pooled']:.4f}, pixel F1 (pooled) {s['pixel_f1_pooled']:.4f}, "
        f"pixel accuracy (mean) {s['pixel_acc']:.4f}"
    )
    if classes:
        click.echo(f"mPQ+ {s['mpq_plus']:.4f}  R2 {s['r2']:.4f}  mPQ {s['mpq']:.4f}")
        click.echo(
            f"Types of detected nuclei (HoVer-Net): accuracy {s['type_acc']:.4f} of "
            f"{s['type_pairs']} pairs; F_d {s['det_f1_pooled']:.4f}"
        )
        click.echo(
            f"Semantic (pooled pixels, classes 1..C): mIoU {s['miou_pooled']:.4f}  "
            f"mDice {s['mdice_pooled']:.4f}"
        )
        class_rows = []
        for c, name in classes.items():
            class_rows.append(
                {
                    "class": c,
                    "name": name,
                    "n_gt": s[f"tp_c{c}"] + s[f"fn_c{c}"],
                    "n_pred": s[f"tp_c{c}"] + s[f"fp_c{c}"],
                    "PQ+": s[f"pq_plus_c{c}"],
                    "PQ(mean)": s[f"pq_c{c}"],
                    "R2": s[f"r2_c{c}"],
                    "IoU": s[f"iou_pooled_c{c}"],
                    "Dice": s[f"dice_pooled_c{c}"],
                    "F_c": s[f"type_f1_c{c}"],
                }
            )
        click.echo(
            "\n"
            + format_table(
                class_rows,
                ["class", "name", "n_gt", "n_pred", "PQ+", "PQ(mean)", "R2", "IoU", "Dice", "F_c"],
            )
        )


@click.command("evaluate")
@click.argument("pred")
@click.argument("gt")
@click.option("--split", default=None, help="Score only the images of this split of GT.")
@click.option(
    "--max-dist",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_MAX_DIST,
    show_default=True,
    help="Detection: largest centroid distance of a match, in pixels.",
)
@json_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the results as JSON to this file (atomically).",
)
@verbose_option
def evaluate(
    pred: str, gt: str, split: str | None, max_dist: float, as_json: bool, out: Path | None
) -> None:
    """Score the predictions in PRED against the ground truth of dataset GT.

    PRED is a folder with instances/<id>.png (integer instance maps, 0 = background, any ids)
    and, to score cell types, classes/<id>.png (meta.json optional; its class ids must match
    GT's), or the output folder of 'kerasnuc predict' (<id>/<id>.instances.ome.tif, ...).
    GT is a dataset folder; either may be the name of a bundled example (e.g. 'demo').

    Every GT image (of --split) with a prediction is scored: PQ/DQ/SQ, AJI, AJI+, pixel F1,
    object Dice and Hausdorff, detection F1 and, with classes, PanNuke mPQ, CoNIC mPQ+, R2 of
    the class counts, per-class IoU/Dice and HoVer-Net's type accuracy and per-class F_c of
    the detected nuclei. Images without a usable prediction are listed as
    skipped; the command fails only when nothing could be scored. In JSON, undefined values
    (e.g. PQ of an image empty on both sides) are null and infinite ones "inf".
    """
    from kerasnuc.data.dataset import Dataset
    from kerasnuc.fileutil import write_json_atomic
    from kerasnuc.metrics import MetricAccumulator

    if out is not None:
        check_writable_dir(out.parent, out)
    ds = Dataset(dataset_path(gt))
    pred_dir = dataset_path(pred)
    if not pred_dir.is_dir():
        raise KerasnucError(f"{pred_dir}: not a folder")
    inst_path_of, cls_path_of, has_cls = _prediction_layout(pred_dir)
    notes = _check_pred_meta(pred_dir, ds.class_names)
    score_classes = ds.has_classes and has_cls
    if ds.has_classes and not score_classes:
        notes.append(f"no class maps in {pred_dir}: scoring instances only")
    elif has_cls and not ds.has_classes:
        notes.append("the ground truth has no classes: scoring instances only")
    num_classes = ds.num_classes if score_classes else 0

    ids = ds.split(split)
    acc = MetricAccumulator(num_classes=num_classes, max_dist=max_dist)
    skipped: list[dict[str, str]] = []
    with click.progressbar(ids, label="Scoring", file=click.get_text_stream("stderr")) as bar:
        for id in bar:
            inst_path = inst_path_of(id)
            if not inst_path.is_file():
                skipped.append({"id": id, "reason": f"no prediction ({inst_path} not found)"})
                continue
            try:
                gt_inst = ds.instances(id)
                pred_inst = _read_label_map(inst_path, gt_inst.shape, "instance map")
                gt_cls = pred_cls = None
                if score_classes:
                    gt_cls = ds.classes(id)
                    path = cls_path_of(id)
                    pred_cls = _read_label_map(path, gt_inst.shape, "class map")
                    if int(pred_cls.max()) > num_classes:
                        raise KerasnucError(
                            f"{path}: class id {int(pred_cls.max())} is not a class of the "
                            f"ground truth (1..{num_classes})"
                        )
                acc.add(gt_inst, pred_inst, gt_cls, pred_cls, id=id)
            except KerasnucError as exc:
                skipped.append({"id": id, "reason": str(exc)})

    for note in notes:
        click.echo(f"Note: {note}", err=True)
    for item in skipped[:MAX_SKIPPED_SHOWN]:
        click.echo(f"Skipped {item['id']}: {item['reason']}", err=True)
    if len(skipped) > MAX_SKIPPED_SHOWN:
        click.echo(f"Skipped ... and {len(skipped) - MAX_SKIPPED_SHOWN} more", err=True)
    if not len(acc):
        raise KerasnucError(
            f"nothing could be scored: {len(skipped)} of {len(ids)} image(s) skipped"
        )

    result = {
        "pred": str(pred_dir),
        "gt": str(ds.root),
        "split": split or "all",
        "classes": {c: ds.class_names.get(c, str(c)) for c in range(1, num_classes + 1)},
        "settings": {"match_iou": acc.match_iou, "max_dist": max_dist},
        "summary": acc.summary(),
        "images": acc.rows,
        "skipped": skipped,
    }
    safe = _json_safe(result)
    if out is not None:
        write_json_atomic(out, safe)
    if as_json:
        click.echo(json.dumps(safe, indent=2))
    else:
        _print_tables(result)
        if out is not None:
            click.echo(f"\nwrote {out}")
