"""CoNSeP importer: HoVer-Net ``.mat`` label files + PNG images.

Source: CoNSeP (Graham et al., "HoVer-Net: Simultaneous segmentation and classification of nuclei
in multi-tissue histology images", Medical Image Analysis 2019). Layout::

    Images/<stem>.png
    Labels/<stem>.mat   inst_map (H, W), type_map (H, W) and/or inst_type (N, 1), inst_centroid

The 7 CoNSeP types are 1 other, 2 inflammatory, 3 healthy epithelial, 4 dysplastic/malignant
epithelial, 5 fibroblast, 6 muscle, 7 endothelial. HoVer-Net trains and reports on 4 merged
classes: 1 other, 2 inflammatory, 3 epithelial (3 + 4), 4 spindle-shaped
(5 + 6 + 7); that merge is the default here.

Each nucleus gets one class: the most frequent type on its pixels of ``type_map`` (which agrees
everywhere in the released files), or ``inst_type[k]`` for the k-th instance when the file has
no ``type_map``. MATLAB v7.3 (HDF5) files are read with ``h5py``.
"""

from __future__ import annotations

import logging
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
    per_instance_classes,
    read_rgb,
    require_dir,
)
from kerasnuc.fileutil import KerasnucError

logger = logging.getLogger(__name__)

CONSEP_CLASSES = {
    1: "other",
    2: "inflammatory",
    3: "healthy epithelial",
    4: "dysplastic/malignant epithelial",
    5: "fibroblast",
    6: "muscle",
    7: "endothelial",
}
HOVERNET_CLASSES = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle"}
# CoNSeP type -> HoVer-Net merged class (index = CoNSeP type).
CONSEP_TO_HOVERNET = np.array([0, 1, 2, 3, 3, 4, 4, 4], dtype=np.int32)


def read_mat(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read the arrays ``keys`` (those present) from a MATLAB ``.mat`` file.

    MATLAB v5 files are read with ``scipy.io.loadmat``; v7.3 (HDF5) files with ``h5py``, whose
    arrays are transposed back to MATLAB's row/column order.

    Raises:
        KerasnucError: the file cannot be read.
    """
    import h5py

    out: dict[str, np.ndarray] = {}
    if not path.is_file():
        raise KerasnucError(f"{path}: file not found")
    if h5py.is_hdf5(path):
        try:
            with h5py.File(path, "r") as f:
                for key in keys:
                    if key in f:
                        out[key] = np.asarray(f[key]).T
        except Exception as exc:  # h5py raises many types for corrupt files
            raise KerasnucError(f"{path}: cannot read MATLAB v7.3 file ({exc})") from exc
        return out
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=list(keys))
    except Exception as exc:  # scipy raises many types (even IndexError) for corrupt files
        raise KerasnucError(f"{path}: cannot read .mat file ({exc})") from exc
    for key in keys:
        if key in mat:
            out[key] = np.asarray(mat[key])
    return out


def consep_class_map(
    inst: np.ndarray, mat: dict[str, np.ndarray], mat_path: Path
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-nucleus CoNSeP types (1..7) of one label file.

    Args:
        inst: ``(H, W)`` int64 instance map.
        mat: arrays of the file (``type_map`` and/or ``inst_type``).
        mat_path: the file named in errors.

    Returns:
        ``(instances, types, n_mixed)`` as
        :func:`~kerasnuc.data.importers.base.per_instance_classes`.
    """
    if "type_map" in mat:
        types = as_label_map(mat["type_map"], mat_path, "type_map")
        check_same_shape(types, inst, mat_path, "type_map", "inst_map")
    elif "inst_type" in mat:
        inst_type = as_label_map(
            np.asarray(mat["inst_type"]).reshape(-1, 1), mat_path, "inst_type"
        )[:, 0]
        ids = np.unique(inst)
        ids = ids[ids > 0]
        lut = np.zeros(int(ids.max()) + 1 if ids.size else 1, dtype=np.int64)
        if ids.size and len(inst_type) == ids.max():
            lut[1:] = inst_type
        elif len(inst_type) == ids.size:
            lut[ids] = inst_type
        else:
            raise KerasnucError(
                f"{mat_path}: inst_type has {len(inst_type)} entries but inst_map has "
                f"{ids.size} nuclei (max id {int(ids.max()) if ids.size else 0})"
            )
        types = lut[inst]
    else:
        raise KerasnucError(f"{mat_path}: no 'type_map' or 'inst_type' variable")
    bad = sorted(set(np.unique(types[inst > 0]).tolist()) - set(CONSEP_CLASSES) - {0})
    if bad:
        raise KerasnucError(f"{mat_path}: type id(s) {bad} not in the CoNSeP types 1..7")
    return per_instance_classes(inst, types, mat_path)


def _load(mat_path: Path, image_path: Path, merge_classes: bool) -> LoadedSample:
    image = read_rgb(image_path)
    mat = read_mat(mat_path, ("inst_map", "type_map", "inst_type"))
    if "inst_map" not in mat:
        raise KerasnucError(f"{mat_path}: no 'inst_map' variable")
    inst = as_label_map(mat["inst_map"], mat_path, "inst_map")
    check_same_shape(inst, image, mat_path, "inst_map", f"image {image_path.name}")
    inst, types, n_mixed = consep_class_map(inst, mat, mat_path)
    classes = CONSEP_TO_HOVERNET[types] if merge_classes else types
    problems = []
    if n_mixed:
        problems.append(f"{mat_path}: {n_mixed} nuclei had several types; majority type used")
    return LoadedSample(image, inst, classes, problems)


def scan_consep(src: str | Path, merge_classes: bool = True) -> ImportPlan:
    """Find CoNSeP label files and their images.

    Args:
        src: folder with ``Images/`` and ``Labels/`` (e.g. ``CoNSeP/Train``).
        merge_classes: merge the 7 CoNSeP types into HoVer-Net's 4 classes.

    Returns:
        An :class:`ImportPlan` with 4 (merged) or 7 classes, mpp 0.25 (40x).

    Raises:
        KerasnucError: a folder is missing, there is no ``.mat`` file, or a label file has no
            image.
    """
    src = Path(src)
    if not src.is_dir():
        raise KerasnucError(f"{src}: not a folder")
    layout = "Images/<stem>.png and Labels/<stem>.mat"
    labels_dir = require_dir(src, "Labels", layout)
    images_dir = require_dir(src, "Images", layout)
    mats = sorted(p for p in labels_dir.glob("*.mat") if not p.name.startswith("."))
    if not mats:
        raise KerasnucError(f"{labels_dir}: no .mat files")
    images = files_by_stem(images_dir, IMAGE_EXTENSIONS)
    items = []
    for mat in mats:
        image = images.get(mat.stem)
        if image is None:
            raise KerasnucError(f"{mat}: no image {mat.stem}.png in {images_dir}")
        items.append(
            ImportItem(mat.stem, str(mat), lambda m=mat, i=image: _load(m, i, merge_classes))
        )
    problems = [
        f"{path}: image without label file (skipped)"
        for stem, path in images.items()
        if stem not in {m.stem for m in mats}
    ]
    scheme = (
        "HoVer-Net merged 4-class scheme (3 = healthy + dysplastic/malignant epithelial, "
        "4 = fibroblast + muscle + endothelial)"
        if merge_classes
        else "the 7 CoNSeP types"
    )
    meta = {
        "source": [str(src.resolve())],
        "license": None,
        "stain": "H&E",
        "magnification": "40x",
        "mpp": 0.25,
        "classes": dict(HOVERNET_CLASSES if merge_classes else CONSEP_CLASSES),
        "notes": (
            "Imported by `kerasnuc data import consep` from HoVer-Net .mat files (inst_map + "
            f"type_map/inst_type). Classes: {scheme}; each nucleus takes the majority type of "
            "its pixels. ids relabelled 1..N. mpp: nominal 0.25 um/px (40x) unless given."
        ),
    }
    return ImportPlan("consep", src, items, meta, problems)
