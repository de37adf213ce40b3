"""Machinery shared by the importers: import plans, split assignment, label-map checks, polygons.

An importer is a ``scan_<format>(src, ...)`` function that looks at the source folder without
decoding any pixels and returns an :class:`ImportPlan`: the dataset metadata plus one
:class:`ImportItem` per image, each with a ``load`` callable that reads and converts that image.
:func:`write_plan` then assigns splits and writes the items through
:class:`~kerasnuc.data.dataset.DatasetWriter`, so a failure at any image leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.checks import check_mpp
from kerasnuc.data.dataset import Dataset, DatasetWriter
from kerasnuc.fileutil import KerasnucError, read_image
from kerasnuc.io.readers import open_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


@dataclass
class LoadedSample:
    """One converted image with its labels, as returned by :attr:`ImportItem.load`.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        instances: ``(H, W)`` integer instance map, 0 = background (ids need not be consecutive).
        classes: ``(H, W)`` integer class map (0 exactly where ``instances`` is 0) or None.
        problems: non-fatal findings worth reporting (skipped regions, count mismatches).
    """

    image: np.ndarray
    instances: np.ndarray
    classes: np.ndarray | None = None
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImportItem:
    """One image to import.

    Attributes:
        id: image id in the destination dataset (file stem).
        source: the source file named in error messages.
        load: reads and converts the image and its labels; raises
            :class:`~kerasnuc.fileutil.KerasnucError` naming the offending file.
    """

    id: str
    source: str
    load: Callable[[], LoadedSample]


@dataclass
class ImportPlan:
    """What an importer found in a source folder.

    Attributes:
        format: importer name (``"monuseg"``, ``"consep"``, ...).
        src: the source folder or file.
        items: one entry per image, in import order.
        meta: metadata for ``meta.json`` (``classes``, ``mpp``, ``magnification``, ``notes``, ...).
        problems: non-fatal findings made while scanning (e.g. images without labels).
    """

    format: str
    src: Path
    items: list[ImportItem]
    meta: dict[str, Any]
    problems: list[str] = field(default_factory=list)


@dataclass
class ImportReport:
    """Summary of a finished import.

    Attributes:
        dst: the written dataset folder.
        format: importer name.
        n_images: images written.
        n_nuclei: nuclei written.
        splits: number of images per split.
        class_names: ``{id: name}`` of the written dataset (empty without classes).
        mpp: microns per pixel written to ``meta.json`` (None when unknown).
        problems: non-fatal findings, one line each, naming the file concerned.
    """

    dst: Path
    format: str
    n_images: int
    n_nuclei: int
    splits: dict[str, int]
    class_names: dict[int, str]
    mpp: float | None
    problems: list[str]


# Splits ------------------------------------------------------------------------------------------


def assign_splits(
    ids: Sequence[str],
    split: str = "train",
    val_fraction: float | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Assign a split to every id.

    Without ``val_fraction`` every id goes to ``split``. With it, ``n_val = round(val_fraction *
    len(ids))`` ids (at least 1 and at most ``len(ids) - 1`` when there are two or more ids and
    ``val_fraction > 0``) are drawn with ``numpy.random.default_rng(seed).choice(sorted(ids),
    size=n_val, replace=False)`` and go to ``"val"``; the rest go to ``split``.

    Args:
        ids: image ids (unique).
        split: split name for the ids not drawn for validation.
        val_fraction: fraction of ids for the ``"val"`` split, in ``[0, 1)``, or None.
        seed: seed of the random draw.

    Returns:
        ``{id: split}`` in the order of ``ids``.
    """
    if not split or "," in split or "\n" in split:
        raise ValueError(
            f"`split` must be a non-empty name without commas. Received: split={split!r}"
        )
    if val_fraction is None:
        return {i: split for i in ids}
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(
            f"`val_fraction` must be a float in [0, 1). Received: val_fraction={val_fraction}"
        )
    n = len(ids)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    rng = np.random.default_rng(seed)
    val = set(rng.choice(sorted(ids), size=n_val, replace=False).tolist()) if n_val else set()
    return {i: ("val" if i in val else split) for i in ids}


# Writing -----------------------------------------------------------------------------------------


def check_destination(dst: str | os.PathLike, overwrite: bool) -> None:
    """Fail early (before any scanning) when ``dst`` exists and ``overwrite`` is False."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise KerasnucError(f"{dst}: already exists (use --overwrite to replace it)")
    if dst.exists() and not dst.is_dir():
        raise KerasnucError(f"{dst}: exists and is not a folder")


def write_plan(
    plan: ImportPlan,
    dst: str | os.PathLike,
    *,
    mpp: float | None = None,
    name: str | None = None,
    split: str = "train",
    val_fraction: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Load every item of ``plan`` and write the dataset atomically to ``dst``.

    Args:
        plan: the output of a ``scan_*`` function.
        dst: destination folder; it appears only when every image was written.
        mpp: microns per pixel, overriding the importer's value.
        name: dataset name for ``meta.json`` (default: the folder name of ``dst``).
        split: split of the images (of those not drawn for validation with ``val_fraction``).
        val_fraction: fraction of images drawn at random for the ``"val"`` split.
        seed: seed of that draw.
        overwrite: replace an existing ``dst``.
        progress: called with 1 after each image (e.g. ``click`` progress bar ``update``).

    Returns:
        An :class:`ImportReport`.

    Raises:
        KerasnucError: bad input (the message names the file), or no nucleus in any image.
            ``dst`` is left untouched.
    """
    dst = Path(dst)
    check_mpp(mpp)
    if not plan.items:
        raise KerasnucError(f"{plan.src}: no {plan.format} images found")
    splits = assign_splits([it.id for it in plan.items], split, val_fraction, seed)
    meta = dict(plan.meta)
    if mpp is not None:
        meta["mpp"] = float(mpp)
    meta["name"] = name or dst.name
    meta.setdefault("mpp", None)
    problems = list(plan.problems)
    any_nucleus = False
    with DatasetWriter(dst, meta, overwrite=overwrite) as writer:
        for item in plan.items:
            try:
                sample = item.load()
            except KerasnucError:
                raise
            except (OSError, ValueError, EOFError, KeyError) as exc:
                raise KerasnucError(f"{item.source}: cannot convert ({exc})") from exc
            writer.add(
                item.id,
                sample.image,
                sample.instances,
                sample.classes,
                split=splits[item.id],
                source=item.source,
            )
            problems.extend(sample.problems)
            any_nucleus = any_nucleus or bool(np.any(sample.instances))
            if progress is not None:
                progress(1)
        if not any_nucleus:  # raised inside the writer: nothing is written
            raise KerasnucError(
                f"{plan.src}: no nuclei in any of the {len(plan.items)} images (labels empty or "
                f"outside the images); nothing imported"
            )
    n_nuclei = int(Dataset(dst).meta["n_nuclei"])
    counts: dict[str, int] = {}
    for s in splits.values():
        counts[s] = counts.get(s, 0) + 1
    return ImportReport(
        dst=dst,
        format=plan.format,
        n_images=len(plan.items),
        n_nuclei=n_nuclei,
        splits=counts,
        class_names=writer.class_names,
        mpp=meta["mpp"],
        problems=problems,
    )


# Array checks ------------------------------------------------------------------------------------


def as_rgb_uint8(image: np.ndarray, source: str | os.PathLike) -> np.ndarray:
    """Check an image read from ``source``: RGB or RGBA uint8 (alpha is dropped).

    Returns:
        ``(H, W, 3)`` uint8.

    Raises:
        KerasnucError: not uint8, or not 3/4 channels.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise KerasnucError(f"{source}: image must be uint8 RGB; got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise KerasnucError(f"{source}: image must be RGB (H, W, 3); got shape {image.shape}")
    return np.ascontiguousarray(image)


def read_rgb(path: Path) -> np.ndarray:
    """Read an RGB(A) uint8 image file as ``(H, W, 3)`` uint8 (raises naming the file).

    A TIFF's 4th channel must be alpha by its tags: multiplex planes, CMYK or an unnamed extra
    sample are refused (:func:`kerasnuc.io.readers.open_image` names the layout).
    """
    image = read_image(path)
    if image.ndim == 3 and image.shape[2] == 4 and path.suffix.lower() in (".tif", ".tiff"):
        open_image(path).close()
    return as_rgb_uint8(image, path)


def as_label_map(arr: np.ndarray, source: str | os.PathLike, what: str = "label map") -> np.ndarray:
    """Check and convert a 2-D label map to int64.

    Integer and boolean maps are accepted as they are; floating-point maps (MATLAB stores
    ``inst_map`` as double) only when every value is a finite whole number. A trailing channel
    axis of size 1 is dropped.

    Args:
        arr: the map as read from ``source``.
        source: the file named in errors.
        what: what to call the map in errors (``"instance map"``, ``"class map"``).

    Returns:
        ``(H, W)`` int64, all values >= 0.

    Raises:
        KerasnucError: wrong dtype, non-integral values, negative values or not 2-D.
    """
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise KerasnucError(f"{source}: {what} must be 2-D (H, W); got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise KerasnucError(
                f"{source}: {what} must hold whole numbers; got non-integer {arr.dtype} values"
            )
    elif not np.issubdtype(arr.dtype, np.integer):
        raise KerasnucError(f"{source}: {what} must be integer; got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise KerasnucError(f"{source}: {what} has negative values")
    return arr.astype(np.int64)


def check_same_shape(
    a: np.ndarray, b: np.ndarray, source: str | os.PathLike, a_name: str, b_name: str
) -> None:
    """Raise a one-line error when two maps differ in height/width."""
    if a.shape[:2] != b.shape[:2]:
        raise KerasnucError(
            f"{source}: {a_name} shape {a.shape[:2]} does not match {b_name} shape {b.shape[:2]}"
        )


def per_instance_classes(
    instances: np.ndarray, classes: np.ndarray, source: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray, int]:
    """Give every nucleus one class: the most frequent non-zero class on its pixels.

    Ties go to the smallest class id. Class pixels outside nuclei are ignored.

    Args:
        instances: ``(H, W)`` non-negative integer instance map.
        classes: ``(H, W)`` non-negative integer class map.
        source: the file named in errors.

    Returns:
        ``(instances, class_map, n_mixed)``: the instance map relabelled 1..N (int32, order
        kept), the ``(H, W)`` int32 class map (0 exactly where ``instances`` is 0) and the number
        of nuclei whose pixels carried more than one class.

    Raises:
        KerasnucError: a nucleus has no class (all its class pixels are 0).
    """
    ids, inv = np.unique(instances, return_inverse=True)
    inv = inv.reshape(instances.shape)
    if ids[0] != 0:
        inv = inv + 1
        ids = np.concatenate([[0], ids])
    n = len(ids) - 1
    n_cls = int(classes.max()) + 1 if classes.size else 1
    fg = (inv > 0) & (classes > 0)
    votes = np.bincount(
        inv[fg].astype(np.int64) * n_cls + classes[fg].astype(np.int64),
        minlength=(n + 1) * n_cls,
    ).reshape(n + 1, n_cls)
    votes[:, 0] = 0
    class_of = votes.argmax(axis=1)
    class_of[0] = 0
    unclassified = np.flatnonzero(class_of[1:] == 0) + 1
    if unclassified.size:
        orig = ids[unclassified[:5]].tolist()
        raise KerasnucError(
            f"{source}: {unclassified.size} nucleus/nuclei without a class "
            f"(instance id(s) {orig}{' ...' if unclassified.size > 5 else ''})"
        )
    n_mixed = int(np.count_nonzero((votes[1:] > 0).sum(axis=1) > 1))
    return inv.astype(np.int32), class_of[inv].astype(np.int32), n_mixed


# Files -------------------------------------------------------------------------------------------


def subdir(root: Path, name: str) -> Path | None:
    """The child folder of ``root`` named ``name`` (case-insensitive), or None."""
    exact = root / name
    if exact.is_dir():
        return exact
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    return None


def require_dir(root: Path, name: str, expected: str) -> Path:
    """Like :func:`subdir` but raises naming ``root`` and the expected layout."""
    found = subdir(root, name)
    if found is None:
        raise KerasnucError(f"{root}: no {name}/ folder (expected {expected})")
    return found


def files_by_stem(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """Files of ``folder`` with one of ``extensions`` (case-insensitive), keyed by stem.

    When a stem has several files, the extension listed first wins.
    """
    order = {ext: i for i, ext in enumerate(extensions)}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        ext = path.suffix.lower()
        if not path.is_file() or ext not in order or path.name.startswith("."):
            continue
        prev = found.get(path.stem)
        if prev is None or order[ext] < order[prev.suffix.lower()]:
            found[path.stem] = path
    return found


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """Open a ``.npy`` file memory-mapped (no pickles), raising a one-line error naming it."""
    if not path.is_file():
        raise KerasnucError(f"{path}: file not found")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise KerasnucError(f"{path}: cannot read .npy file ({exc})") from exc


def parse_class_names(value: str | Sequence[str] | None) -> list[str] | None:
    """Turn ``"a,b,c"`` (or a list) into ``["a", "b", "c"]``; None stays None."""
    if value is None:
        return None
    names = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise ValueError(
            f"`classes` must be distinct non-empty names, e.g. 'tumour,stroma'. Received: {value!r}"
        )
    return names
