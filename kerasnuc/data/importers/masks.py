"""Mask-folder importer: images with instance masks (and optional class maps) as image files.

Layout::

    SRC/images/<stem>.<png|tif|tiff|jpg|jpeg>   RGB(A) uint8
    SRC/masks/<stem>.<png|tif|tiff>             instance map (0 = background) or binary mask
    SRC/classes/<stem>.<png|tif|tiff>           optional per-pixel class map (0 = background)

Masks: an integer map is read as an instance map (any ids; relabelled 1..N). A binary mask (a
boolean image, or values only 0 and one of 1/255/65535) is split into nuclei by 4-connected
components (``scipy.ndimage.label``), so touching nuclei in a binary mask become one nucleus.
``mask_type="auto"`` (default) decides per file; ``"instance"``/``"binary"`` force one reading.
An instance map holding a single nucleus with id 1 or 255 reads the same either way unless that
nucleus is in several pieces.

Class maps: each nucleus gets the most frequent non-zero class on its pixels (reported when a
nucleus has several); class pixels outside nuclei are ignored; a nucleus without class pixels is
an error. Class names come from ``classes=["a", "b"]`` (ids 1, 2, ...); without it they are
``class_1 .. class_K`` with K the largest id found in the class maps.

Images without a mask are skipped and reported; a mask without an image is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kerasnuc.data.importers.base import (
    IMAGE_EXTENSIONS,
    ImportItem,
    ImportPlan,
    LoadedSample,
    as_label_map,
    check_same_shape,
    files_by_stem,
    parse_class_names,
    per_instance_classes,
    read_rgb,
    require_dir,
    subdir,
)
from kerasnuc.fileutil import KerasnucError, read_image

logger = logging.getLogger(__name__)

MASK_EXTENSIONS = (".png", ".tif", ".tiff")
MASK_TYPES = ("auto", "instance", "binary")
_BINARY_ON_VALUES = (1, 255, 65535)


def is_binary_mask(mask: np.ndarray) -> bool:
    """True for a boolean mask or one whose values are 0 and at most one of 1, 255, 65535."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return True
    values = np.unique(mask)
    nonzero = values[values != 0]
    return nonzero.size == 0 or (nonzero.size == 1 and int(nonzero[0]) in _BINARY_ON_VALUES)


def mask_to_instances(mask: np.ndarray, source: str | Path, mask_type: str = "auto") -> np.ndarray:
    """Turn a mask image into an instance map.

    Args:
        mask: ``(H, W)`` mask as read from ``source``.
        source: the file named in errors.
        mask_type: ``"auto"``, ``"instance"`` or ``"binary"`` (see the module docstring).

    Returns:
        ``(H, W)`` int64 instance map (ids not necessarily consecutive).
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(
            f"`mask_type` must be one of {MASK_TYPES}. Received: mask_type={mask_type!r}"
        )
    mask = np.asarray(mask)
    binary = mask_type == "binary" or (mask_type == "auto" and is_binary_mask(mask))
    inst = as_label_map(mask, source, "mask")
    if not binary:
        return inst
    import scipy.ndimage as ndi

    labels, _ = ndi.label(inst > 0)
    return labels.astype(np.int64)


def _load(
    image_path: Path,
    mask_path: Path,
    class_path: Path | None,
    n_classes: int,
    mask_type: str,
) -> LoadedSample:
    image = read_rgb(image_path)
    inst = mask_to_instances(read_image(mask_path), mask_path, mask_type)
    check_same_shape(inst, image, mask_path, "mask", f"image {image_path.name}")
    if class_path is None:
        return LoadedSample(image, inst)
    cls = as_label_map(read_image(class_path), class_path, "class map")
    check_same_shape(cls, inst, class_path, "class map", f"mask {mask_path.name}")
    bad = sorted(set(np.unique(cls[inst > 0]).tolist()) - set(range(n_classes + 1)))
    if bad:
        raise KerasnucError(
            f"{class_path}: class id(s) {bad} not in the class names 1..{n_classes}"
        )
    inst, classes, n_mixed = per_instance_classes(inst, cls, class_path)
    problems = []
    if n_mixed:
        problems.append(f"{class_path}: {n_mixed} nuclei had several classes; majority class used")
    return LoadedSample(image, inst, classes, problems)


def scan_masks(
    src: str | Path,
    classes: str | Sequence[str] | None = None,
    mask_type: str = "auto",
) -> ImportPlan:
    """Pair the masks of ``src/masks/`` with their images (and class maps).

    Args:
        src: folder with ``images/``, ``masks/`` and optionally ``classes/``.
        classes: class names for ids 1, 2, ... (``"a,b,c"`` or a list); requires ``classes/``.
        mask_type: ``"auto"``, ``"instance"`` or ``"binary"``.

    Returns:
        An :class:`ImportPlan` (mpp unknown unless given to :func:`write_plan`).

    Raises:
        KerasnucError: missing folders, a mask without image, a mask without class map when
            ``classes/`` exists, or an unreadable class map.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(
            f"`mask_type` must be one of {MASK_TYPES}. Received: mask_type={mask_type!r}"
        )
    src = Path(src)
    if not src.is_dir():
        raise KerasnucError(f"{src}: not a folder")
    layout = "images/<stem>.png and masks/<stem>.png"
    images_dir = require_dir(src, "images", layout)
    masks_dir = require_dir(src, "masks", layout)
    classes_dir = subdir(src, "classes")
    names = parse_class_names(classes)
    if names is not None and classes_dir is None:
        raise KerasnucError(f"{src}: class names given but there is no classes/ folder")
    masks = files_by_stem(masks_dir, MASK_EXTENSIONS)
    if not masks:
        raise KerasnucError(f"{masks_dir}: no mask files (.png, .tif)")
    images = files_by_stem(images_dir, IMAGE_EXTENSIONS)
    class_maps = files_by_stem(classes_dir, MASK_EXTENSIONS) if classes_dir else {}
    pairs = []
    for stem, mask in masks.items():
        image = images.get(stem)
        if image is None:
            raise KerasnucError(f"{mask}: no image {stem}.<png|tif|jpg> in {images_dir}")
        class_map = None
        if classes_dir is not None:
            class_map = class_maps.get(stem)
            if class_map is None:
                raise KerasnucError(f"{mask}: no class map {stem}.png in {classes_dir}")
        pairs.append((stem, image, mask, class_map))
    problems = [
        f"{path}: image without mask (skipped)"
        for stem, path in images.items()
        if stem not in masks
    ]
    class_names: dict[int, str] | None = None
    if classes_dir is not None:
        if names is None:
            top = 0
            for _, _, _, class_map in pairs:
                top = max(
                    top, int(as_label_map(read_image(class_map), class_map, "class map").max())
                )
            names = [f"class_{k}" for k in range(1, top + 1)]
        if not names:
            raise KerasnucError(f"{classes_dir}: the class maps hold no class")
        class_names = {k: n for k, n in enumerate(names, start=1)}
    n_classes = len(names) if names else 0
    items = [
        ImportItem(
            stem,
            str(mask),
            lambda i=image, m=mask, c=class_map: _load(i, m, c, n_classes, mask_type),
        )
        for stem, image, mask, class_map in pairs
    ]
    meta = {
        "source": [str(src.resolve())],
        "license": None,
        "stain": None,
        "magnification": None,
        "mpp": None,
        "classes": class_names,
        "notes": (
            "Imported by `kerasnuc data import masks` from images/ + masks/"
            + (" + classes/" if classes_dir else "")
            + f" (mask type: {mask_type}; binary masks split by 4-connected components"
            + ("; each nucleus takes the majority class of its pixels" if classes_dir else "")
            + "); ids relabelled 1..N."
        ),
    }
    return ImportPlan("masks", src, items, meta, problems)
