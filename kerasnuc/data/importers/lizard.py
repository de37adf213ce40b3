"""Lizard importer: the patch arrays of the CoNIC 2022 challenge release of the Lizard dataset.

A dataset importer, unrelated to the ``conic`` method (which is named after the same challenge).
Format name ``lizard``; ``conic`` is accepted too (the name of the challenge release).

Source: CoNIC challenge data (Graham et al., "CoNIC: Colon Nuclei Identification and Counting
Challenge 2022", arXiv:2111.14485), patches of the Lizard dataset (Graham et al., ICCVW 2021)::

    images.npy       (N, H, W, 3) uint8 RGB (N = 4981, H = W = 256 in the release)
    labels.npy       (N, H, W, 2): [..., 0] instance ids, [..., 1] class 0..6
    counts.csv       optional: neutrophil, epithelial, lymphocyte, plasma, eosinophil, connective
    patch_info.csv   optional: one patch name per row (used as image ids)

Classes: 1 neutrophil, 2 epithelial, 3 lymphocyte, 4 plasma, 5 eosinophil, 6 connective. The
images are 20x (about 0.5 um/px). Both arrays are memory-mapped, so only one patch is in memory
at a time.

``counts.csv`` holds, per patch, the number of nuclei of each class that have at least one pixel
of that class inside the central 224 x 224 region (the challenge's cellular-composition target).
The importer recounts that from the label maps and reports every patch that disagrees.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from kerasnuc.data.importers.base import (
    ImportItem,
    ImportPlan,
    LoadedSample,
    as_label_map,
    as_rgb_uint8,
    load_npy,
    per_instance_classes,
)
from kerasnuc.fileutil import KerasnucError
from kerasnuc.instances import composition_counts

logger = logging.getLogger(__name__)

LIZARD_CLASSES = {
    1: "neutrophil",
    2: "epithelial",
    3: "lymphocyte",
    4: "plasma",
    5: "eosinophil",
    6: "connective",
}
COUNT_CROP = 224


def read_counts(path: Path) -> np.ndarray:
    """Read ``counts.csv`` as an ``(N, 6)`` int64 array in the LIZARD_CLASSES order."""
    names = list(LIZARD_CLASSES.values())
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [n for n in names if n not in (reader.fieldnames or [])]
            if missing:
                raise KerasnucError(f"{path}: missing column(s) {missing}")
            rows = [[int(float(row[n])) for n in names] for row in reader]
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise KerasnucError(f"{path}: cannot read counts ({exc})") from exc
    return np.asarray(rows, dtype=np.int64).reshape(-1, len(names))


def read_patch_names(path: Path, n: int) -> list[str]:
    """Read ``patch_info.csv`` (header + one name per row) and check it has ``n`` unique names."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, UnicodeDecodeError) as exc:
        raise KerasnucError(f"{path}: cannot read ({exc})") from exc
    names = [r[0].strip() for r in rows[1:]]
    if len(names) != n:
        raise KerasnucError(f"{path}: {len(names)} patch names for {n} images")
    if len(set(names)) != n:
        raise KerasnucError(f"{path}: patch names are not unique")
    bad = [s for s in names if not s or "/" in s or "\\" in s or s.startswith(".")]
    if bad:
        raise KerasnucError(f"{path}: invalid patch name {bad[0]!r}")
    return names


def _load(
    images: np.ndarray,
    labels: np.ndarray,
    index: int,
    source: str,
    counts: np.ndarray | None,
) -> LoadedSample:
    image = as_rgb_uint8(np.asarray(images[index]), source)
    label = np.asarray(labels[index])
    inst = as_label_map(label[..., 0], source, "instance channel")
    cls = as_label_map(label[..., 1], source, "class channel")
    bad = sorted(set(np.unique(cls[inst > 0]).tolist()) - set(LIZARD_CLASSES) - {0})
    if bad:
        raise KerasnucError(f"{source}: class id(s) {bad} not in the CoNIC classes 1..6")
    problems = []
    inst, classes, n_mixed = per_instance_classes(inst, cls, source)
    if n_mixed:
        problems.append(f"{source}: {n_mixed} nuclei had several classes; majority class used")
    if counts is not None:
        found = composition_counts(inst, classes, len(LIZARD_CLASSES), crop=COUNT_CROP)
        if not np.array_equal(found, counts[index]):
            diff = {
                name: (int(c), int(f))
                for name, c, f in zip(LIZARD_CLASSES.values(), counts[index], found, strict=True)
                if c != f
            }
            problems.append(
                f"{source}: counts.csv row {index + 1} differs from labels (csv, labels): {diff}"
            )
    return LoadedSample(image, inst, classes, problems)


def scan_lizard(src: str | Path) -> ImportPlan:
    """Open the CoNIC arrays (memory-mapped) and plan one item per patch.

    Args:
        src: folder with ``images.npy`` and ``labels.npy`` (and optionally ``counts.csv``,
            ``patch_info.csv``).

    Returns:
        An :class:`ImportPlan` with the 6 CoNIC classes, mpp 0.5 (20x). Ids are the names in
        ``patch_info.csv`` when present, else the zero-padded patch index.

    Raises:
        KerasnucError: a file is missing or unreadable, or the arrays have wrong shapes/dtypes.
    """
    src = Path(src)
    if not src.is_dir():
        raise KerasnucError(f"{src}: not a folder")
    images_path, labels_path = src / "images.npy", src / "labels.npy"
    images = load_npy(images_path)
    labels = load_npy(labels_path)
    if images.ndim != 4 or images.shape[3] != 3:
        raise KerasnucError(f"{images_path}: expected shape (N, H, W, 3); got {images.shape}")
    if images.dtype != np.uint8:
        raise KerasnucError(f"{images_path}: images must be uint8; got dtype {images.dtype}")
    if labels.ndim != 4 or labels.shape[3] != 2:
        raise KerasnucError(f"{labels_path}: expected shape (N, H, W, 2); got {labels.shape}")
    if labels.shape[:3] != images.shape[:3]:
        raise KerasnucError(
            f"{labels_path}: shape {labels.shape[:3]} does not match images.npy {images.shape[:3]}"
        )
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise KerasnucError(f"{labels_path}: labels must be integer; got dtype {labels.dtype}")
    n = images.shape[0]
    problems: list[str] = []
    counts = None
    counts_path = src / "counts.csv"
    if counts_path.is_file():
        counts = read_counts(counts_path)
        if len(counts) != n:
            problems.append(f"{counts_path}: {len(counts)} rows for {n} images; not cross-checked")
            counts = None
    info_path = src / "patch_info.csv"
    if info_path.is_file():
        ids = read_patch_names(info_path, n)
    else:
        width = max(4, len(str(n - 1)))
        ids = [f"{i:0{width}d}" for i in range(n)]
    items = [
        ImportItem(
            ids[i],
            f"{labels_path} [{i}]",
            lambda i=i: _load(images, labels, i, f"{labels_path} [{i}]", counts),
        )
        for i in range(n)
    ]
    meta = {
        "source": [str(src.resolve())],
        "license": None,
        "stain": "H&E",
        "magnification": "20x",
        "mpp": 0.5,
        "classes": dict(LIZARD_CLASSES),
        "notes": (
            "Imported by `kerasnuc data import conic` from images.npy + labels.npy (CoNIC 2022 / "
            "Lizard patches); each nucleus takes the majority class of its pixels; ids relabelled "
            "1..N per patch"
            + ("; counts.csv cross-checked against the label maps" if counts is not None else "")
            + ". mpp: nominal 0.5 um/px (20x) unless given."
        ),
    }
    return ImportPlan("lizard", src, items, meta, problems)
