"""PanNuke importer: one fold of the PanNuke arrays.

Source: PanNuke (Gamper et al., "PanNuke: an open pan-cancer histology dataset for nuclei
instance segmentation and classification", ECDP 2019; "PanNuke Dataset Extension, Insights and
Baselines", arXiv:2003.10778). A fold (``Fold 1/images/fold1/images.npy`` ...) holds::

    images.npy   (N, 256, 256, 3) float64 RGB values 0..255
    masks.npy    (N, 256, 256, 6): channels 0..4 = neoplastic, inflammatory, connective, dead,
                 epithelial, each holding instance ids; channel 5 = background
    types.npy    optional (N,) tissue names

Instance ids are only unique within a channel, so the importer keys every nucleus by
``(channel, id)``: the same id in two channels gives two nuclei. Where channels overlap, the
later channel wins and the number of overlapping pixels is reported. Class ``c + 1`` is given
to the nuclei of channel ``c``. The images are 40x (0.25 um/px). Tissue names go to
``meta.json`` as ``"tissue": {id: name}``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from kerasnuc.data.importers.base import (
    ImportItem,
    ImportPlan,
    LoadedSample,
    as_label_map,
    load_npy,
)
from kerasnuc.fileutil import KerasnucError

logger = logging.getLogger(__name__)

PANNUKE_CLASSES = {
    1: "neoplastic",
    2: "inflammatory",
    3: "connective",
    4: "dead",
    5: "epithelial",
}
_FOLD_RE = re.compile(r"^fold[\s_-]*(\d+)$", re.IGNORECASE)


def pannuke_instances(masks: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Merge the per-class instance channels of one PanNuke mask into one instance map.

    Args:
        masks: ``(H, W, 6)`` mask of one image (channels 0..4 hold instance ids).
        source: what to name in errors.

    Returns:
        ``(instances, classes, n_overlap)``: ``(H, W)`` int64 instance map with one id per
        ``(channel, id)`` pair (ids ordered by channel, then original id), ``(H, W)`` int32
        class map (channel + 1), and the number of pixels labelled in more than one channel.
    """
    n_ch = len(PANNUKE_CLASSES)
    chans = [as_label_map(masks[..., c], source, f"mask channel {c}") for c in range(n_ch)]
    stride = max(int(ch.max()) for ch in chans) + 1
    inst = np.zeros(masks.shape[:2], dtype=np.int64)
    classes = np.zeros(masks.shape[:2], dtype=np.int32)
    n_labelled = np.zeros(masks.shape[:2], dtype=np.int32)
    for c, ch in enumerate(chans):
        fg = ch > 0
        inst[fg] = c * stride + ch[fg]
        classes[fg] = c + 1
        n_labelled += fg
    return inst, classes, int(np.count_nonzero(n_labelled > 1))


def pannuke_image(image: np.ndarray, source: str) -> np.ndarray:
    """Convert a PanNuke image (float 0..255 or uint8) to ``(H, W, 3)`` uint8 by rounding."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise KerasnucError(
            f"{source}: image must be float 0..255 or uint8; got dtype {image.dtype}"
        )
    if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 255:
        raise KerasnucError(f"{source}: image values must lie in 0..255")
    return np.rint(image).astype(np.uint8)


def _load(
    images: np.ndarray, masks: np.ndarray, index: int, images_path: Path, masks_path: Path
) -> LoadedSample:
    image = pannuke_image(images[index], f"{images_path} [{index}]")
    source = f"{masks_path} [{index}]"
    inst, classes, n_overlap = pannuke_instances(np.asarray(masks[index]), source)
    problems = []
    if n_overlap:
        problems.append(
            f"{source}: {n_overlap} pixels in several class channels; later channel kept"
        )
    return LoadedSample(image, inst, classes, problems)


def _find(src: Path, name: str, required: bool) -> Path | None:
    if src.is_file():
        candidate = src.parent / name
        return candidate if candidate.is_file() or required else None
    found = sorted(p for p in src.rglob(name) if p.is_file())
    if len(found) > 1:
        raise KerasnucError(
            f"{src}: {len(found)} {name} files found ({found[0]}, {found[1]}, ...); "
            "point SRC at a single fold"
        )
    if not found:
        if required:
            raise KerasnucError(f"{src}: no {name} found")
        return None
    return found[0]


def fold_prefix(path: Path) -> str:
    """``"fold<k>_"`` from the nearest ``fold<k>``/``Fold <k>`` folder of ``path``, else ``""``."""
    for part in reversed(path.parent.parts):
        m = _FOLD_RE.match(part)
        if m:
            return f"fold{int(m.group(1))}_"
    return ""


def scan_pannuke(src: str | Path) -> ImportPlan:
    """Open one PanNuke fold (memory-mapped) and plan one item per image.

    Args:
        src: a folder holding exactly one ``images.npy`` and one ``masks.npy`` somewhere below it
            (and optionally ``types.npy``), e.g. ``Fold 1/``.

    Returns:
        An :class:`ImportPlan` with the 5 PanNuke classes, mpp 0.25 (40x). Ids are
        ``fold<k>_<index>`` (``<index>`` alone when no fold folder is in the path).

    Raises:
        KerasnucError: a file is missing, unreadable or has the wrong shape/dtype.
    """
    src = Path(src)
    if not src.exists():
        raise KerasnucError(f"{src}: not found")
    images_path = _find(src, "images.npy", True)
    masks_path = _find(src, "masks.npy", True)
    types_path = _find(src, "types.npy", False)
    assert images_path is not None and masks_path is not None
    images = load_npy(images_path)
    masks = load_npy(masks_path)
    if images.ndim != 4 or images.shape[3] != 3:
        raise KerasnucError(f"{images_path}: expected shape (N, H, W, 3); got {images.shape}")
    if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
        raise KerasnucError(
            f"{images_path}: images must be float 0..255 or uint8; got {images.dtype}"
        )
    if masks.ndim != 4 or masks.shape[3] != 6:
        raise KerasnucError(f"{masks_path}: expected shape (N, H, W, 6); got {masks.shape}")
    if masks.shape[:3] != images.shape[:3]:
        raise KerasnucError(
            f"{masks_path}: shape {masks.shape[:3]} does not match images.npy {images.shape[:3]}"
        )
    if not (np.issubdtype(masks.dtype, np.integer) or np.issubdtype(masks.dtype, np.floating)):
        raise KerasnucError(f"{masks_path}: masks must be numeric; got dtype {masks.dtype}")
    n = images.shape[0]
    prefix = fold_prefix(images_path)
    width = max(4, len(str(n - 1)))
    ids = [f"{prefix}{i:0{width}d}" for i in range(n)]
    tissue = None
    if types_path is not None:
        types = load_npy(types_path, mmap=False)
        if types.shape != (n,) or types.dtype.kind not in "US":
            raise KerasnucError(
                f"{types_path}: expected {n} tissue names; got {types.dtype} {types.shape}"
            )
        tissue = {
            i: str(t.decode() if isinstance(t, bytes) else t)
            for i, t in zip(ids, types, strict=True)
        }
    items = [
        ImportItem(
            ids[i],
            f"{masks_path} [{i}]",
            lambda i=i: _load(images, masks, i, images_path, masks_path),
        )
        for i in range(n)
    ]
    meta = {
        "source": [str(src.resolve())],
        "license": None,
        "stain": "H&E",
        "magnification": "40x",
        "mpp": 0.25,
        "classes": dict(PANNUKE_CLASSES),
        "tissue": tissue,
        "notes": (
            "Imported by `kerasnuc data import pannuke` from images.npy (float 0..255, rounded to "
            "uint8) and masks.npy; one nucleus per (class channel, id) pair, class = channel + 1; "
            "ids relabelled 1..N ordered by channel then source id. 'tissue' maps image ids to "
            "the names of types.npy. mpp: nominal 0.25 um/px (40x) unless given."
        ),
    }
    return ImportPlan("pannuke", src, items, meta, [])
