"""The interchange dataset layout: reader (:class:`Dataset`) and writer (:class:`DatasetWriter`).

Layout of a dataset folder (the same as ``../shared/data/<name>/``)::

    images/<id>.png      RGB uint8
    instances/<id>.png   16-bit greyscale PNG, 0 = background, 1..N nuclei (consecutive)
    classes/<id>.png     8-bit greyscale PNG, 0 = background, 1..C cell type (only with classes)
    meta.json            name, source, license, stain, magnification, mpp, classes {"1": name}, ...
    splits.csv           header ``id,split``, one row per image

Invariants (checked by the writer, and by :meth:`Dataset.validate`): the class map is 0 exactly
where the instance map is 0; every nucleus has a single class in ``meta.json``; ids are consecutive.

A **points dataset** (``meta.json`` ``"annotations": "points"``, written by
``kerasnuc data import points``) has one point per nucleus instead of masks::

    images/<id>.png      RGB uint8
    points/<id>.csv      header ``x,y,class``: pixel indices (``x`` = column, ``y`` = row, the
                         centre of pixel (r, c) is (x, y) = (c, r)); class 1..C, empty = none
    meta.json, splits.csv

It trains the point-supervised ``weak`` method and is scored by detection (``kerasnuc tune
--points``); :meth:`Dataset.instances` refuses it in one line.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.fileutil import (
    KerasnucError,
    atomic_dir,
    read_image,
    write_json_atomic,
    write_png,
    write_text_atomic,
)
from kerasnuc.io.points import read_points_csv

META_FILE = "meta.json"
SPLITS_FILE = "splits.csv"
MAX_PNG_INSTANCES = 65535
POINTS_DIR = "points"
#: ``meta.json`` ``"annotations"`` of a points dataset.
POINTS = "points"


@dataclass(frozen=True)
class Sample:
    """One image with its labels.

    Attributes:
        id: image id (file stem).
        image: ``(H, W, 3)`` uint8 RGB.
        instances: ``(H, W)`` int32, 0 = background, 1..N nuclei.
        classes: ``(H, W)`` int32 cell-type map (0 = background) or None without classes.
    """

    id: str
    image: np.ndarray
    instances: np.ndarray
    classes: np.ndarray | None


def relabel_consecutive(instances: np.ndarray) -> np.ndarray:
    """Relabel an instance map to ids 1..N keeping the order of the original ids."""
    instances = np.asarray(instances)
    ids, inverse = np.unique(instances, return_inverse=True)
    if ids[0] != 0:
        inverse = inverse + 1
    return inverse.reshape(instances.shape).astype(np.int32)


def instance_classes(instances: np.ndarray, classes: np.ndarray) -> dict[int, np.ndarray]:
    """Map each instance id to the distinct class values found on its pixels."""
    fg = instances > 0
    pairs = np.unique(np.stack([instances[fg], classes[fg]], axis=1), axis=0)
    out: dict[int, list[int]] = {}
    for inst, cls in pairs:
        out.setdefault(int(inst), []).append(int(cls))
    return {k: np.asarray(v) for k, v in out.items()}


def check_label_pair(
    name: str,
    image: np.ndarray,
    instances: np.ndarray,
    classes: np.ndarray | None,
    class_ids: set[int] | None,
) -> None:
    """Check the layout invariants of one sample, raising a one-line :class:`KerasnucError`.

    Args:
        name: what to call the sample in messages (a file path).
        image: ``(H, W, 3)`` uint8.
        instances: ``(H, W)`` integer map.
        classes: ``(H, W)`` integer map or None.
        class_ids: the allowed class ids (from meta.json) or None when the dataset has no classes.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise KerasnucError(f"{name}: image must be RGB (H, W, 3); got shape {image.shape}")
    if image.dtype != np.uint8:
        raise KerasnucError(f"{name}: image must be uint8; got {image.dtype}")
    if not np.issubdtype(instances.dtype, np.integer):
        raise KerasnucError(f"{name}: instance map must be integer; got {instances.dtype}")
    if instances.shape != image.shape[:2]:
        raise KerasnucError(
            f"{name}: instance map shape {instances.shape} does not match image {image.shape[:2]}"
        )
    if instances.size and instances.min() < 0:
        raise KerasnucError(f"{name}: instance map has negative ids")
    if classes is None:
        return
    if not np.issubdtype(classes.dtype, np.integer):
        raise KerasnucError(f"{name}: class map must be integer; got {classes.dtype}")
    if classes.shape != instances.shape:
        raise KerasnucError(
            f"{name}: class map shape {classes.shape} does not match instance map {instances.shape}"
        )
    if np.any((classes == 0) != (instances == 0)):
        raise KerasnucError(f"{name}: class map must be 0 exactly where the instance map is 0")
    present = set(np.unique(classes).tolist()) - {0}
    if class_ids is not None and not present <= class_ids:
        bad = sorted(present - class_ids)
        raise KerasnucError(
            f"{name}: class id(s) {bad} not in meta.json classes {sorted(class_ids)}"
        )
    multi = [k for k, v in instance_classes(instances, classes).items() if len(v) > 1]
    if multi:
        raise KerasnucError(f"{name}: nucleus id(s) {multi[:5]} have more than one class")


def check_points(
    name: str,
    image: np.ndarray,
    points: np.ndarray,
    classes: np.ndarray | None,
    class_ids: set[int],
) -> None:
    """Check the points of one image of a points dataset (one-line :class:`KerasnucError`).

    Args:
        name: what to call the points in messages (a file path).
        image: ``(H, W, 3)`` uint8.
        points: ``(K, 2)`` ``(row, col)``; each must lie on the image (pixel edges included:
            ``-0.5 <= row <= H - 0.5``).
        classes: ``(K,)`` class ids (0 = unclassified) or None.
        class_ids: the allowed ids (meta.json).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise KerasnucError(f"{name}: image must be RGB uint8; got {image.dtype} {image.shape}")
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    h, w = image.shape[:2]
    outside = (
        ~np.isfinite(points).all(axis=1)
        | (points[:, 0] < -0.5)
        | (points[:, 0] > h - 0.5)
        | (points[:, 1] < -0.5)
        | (points[:, 1] > w - 0.5)
    )
    if outside.any():
        row, col = points[outside][0]
        raise KerasnucError(
            f"{name}: {int(outside.sum())} point(s) outside the {h}x{w} image, e.g. "
            f"x={col:g}, y={row:g}"
        )
    if classes is not None:
        bad = sorted(set(np.unique(classes).tolist()) - {0} - class_ids)
        if bad:
            raise KerasnucError(f"{name}: class id(s) {bad} not in meta.json classes")


class Dataset:
    """Lazy reader of a dataset folder in the interchange layout.

    Nothing but ``meta.json`` and ``splits.csv`` is read at construction; images and label maps
    are read from disk on each access.

    Args:
        root: the dataset folder.
        mpp: assumed pixel size in um/px, overriding ``meta.json`` (for datasets that do not
            state one, e.g. DSB-2018; the value is a decision of whoever trains on them).

    Raises:
        KerasnucError: the folder, ``meta.json`` or ``splits.csv`` is missing or malformed.
    """

    def __init__(self, root: str | os.PathLike, mpp: float | None = None):
        self.root = Path(root)
        if mpp is not None and not (isinstance(mpp, (int, float)) and mpp > 0):
            raise KerasnucError(f"{self.root}: assumed pixel size must be > 0 um/px (got {mpp!r})")
        self._assumed_mpp = None if mpp is None else float(mpp)
        if not self.root.is_dir():
            raise KerasnucError(f"{self.root}: dataset folder not found")
        meta_path = self.root / META_FILE
        if not meta_path.is_file():
            raise KerasnucError(f"{meta_path}: missing (not a kerasnuc dataset folder?)")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KerasnucError(f"{meta_path}: invalid JSON ({exc})") from exc
        classes = self.meta.get("classes") or {}
        try:
            self.class_names: dict[int, str] = {int(k): str(v) for k, v in classes.items()}
        except (ValueError, AttributeError) as exc:
            raise KerasnucError(f"{meta_path}: 'classes' must map integer ids to names") from exc
        if 0 in self.class_names:
            raise KerasnucError(f"{meta_path}: class id 0 is reserved for background")
        self.splits: dict[str, str] = self._read_splits(self.root / SPLITS_FILE)

    @staticmethod
    def _read_splits(path: Path) -> dict[str, str]:
        if not path.is_file():
            raise KerasnucError(f"{path}: missing")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"id", "split"} <= set(reader.fieldnames):
                raise KerasnucError(f"{path}: header must contain 'id,split'")
            splits: dict[str, str] = {}
            for row in reader:
                if row["id"] in splits:
                    raise KerasnucError(f"{path}: duplicate id {row['id']!r}")
                splits[row["id"]] = row["split"]
        return splits

    # Properties ---------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.root.name)

    @property
    def mpp(self) -> float | None:
        """Microns per pixel: the assumed value given to the constructor, else ``meta.json``'s
        ``mpp``, else None (unknown)."""
        if self._assumed_mpp is not None:
            return self._assumed_mpp
        mpp = self.meta.get("mpp")
        return float(mpp) if mpp is not None else None

    @property
    def has_classes(self) -> bool:
        return bool(self.class_names)

    @property
    def is_points(self) -> bool:
        """Whether the dataset has one point per nucleus instead of instance masks."""
        return self.meta.get("annotations") == POINTS

    @property
    def num_classes(self) -> int:
        """Number of cell types C (0 without classes); class ids run 1..C."""
        return max(self.class_names) if self.class_names else 0

    @property
    def ids(self) -> list[str]:
        return list(self.splits)

    def split(self, name: str | None) -> list[str]:
        """Ids of one split (``None`` or ``"all"``: every id)."""
        if name in (None, "all"):
            return self.ids
        ids = [i for i, s in self.splits.items() if s == name]
        if not ids:
            known = sorted(set(self.splits.values()))
            raise KerasnucError(f"{self.root}: no images in split {name!r} (splits: {known})")
        return ids

    def __len__(self) -> int:
        return len(self.splits)

    def __iter__(self) -> Iterator[str]:
        return iter(self.splits)

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r}, n={len(self)}, classes={self.class_names})"

    # File access --------------------------------------------------------------------------------

    def image_path(self, id: str) -> Path:
        return self.root / "images" / f"{id}.png"

    def instances_path(self, id: str) -> Path:
        return self.root / "instances" / f"{id}.png"

    def classes_path(self, id: str) -> Path:
        return self.root / "classes" / f"{id}.png"

    def points_path(self, id: str) -> Path:
        return self.root / POINTS_DIR / f"{id}.csv"

    def points(self, id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The point annotations of a points dataset.

        Returns:
            ``(points, classes)``: ``(K, 2)`` float64 ``(row, col)`` pixel indices and ``(K,)``
            int32 class ids (0 = unclassified), or None when no point has a class.

        Raises:
            KerasnucError: not a points dataset, or a bad points file.
        """
        self._check_id(id)
        if not self.is_points:
            raise KerasnucError(f"{self.root}: not a points dataset (it has instance masks)")
        return read_points_csv(self.points_path(id), self.class_names or None)

    def _refuse_points(self) -> None:
        if self.is_points:
            raise KerasnucError(
                f"{self.root}: a points dataset (points/<id>.csv, no instance masks): it "
                "trains --method weak and is scored with kerasnuc tune --points"
            )

    def _check_id(self, id: str) -> None:
        if id not in self.splits:
            raise KerasnucError(f"{self.root}: unknown image id {id!r}")

    def image(self, id: str) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB image."""
        self._check_id(id)
        path = self.image_path(id)
        img = read_image(path)
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, :3]
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise KerasnucError(f"{path}: expected RGB uint8, got {img.dtype} {img.shape}")
        return img

    def instances(self, id: str) -> np.ndarray:
        """``(H, W)`` int32 instance map (KerasnucError for a points dataset)."""
        self._check_id(id)
        self._refuse_points()
        path = self.instances_path(id)
        arr = read_image(path)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise KerasnucError(
                f"{path}: expected a greyscale integer PNG, got {arr.dtype} {arr.shape}"
            )
        return arr.astype(np.int32)

    def classes(self, id: str) -> np.ndarray | None:
        """``(H, W)`` int32 class map, or None when the dataset has no classes."""
        self._check_id(id)
        self._refuse_points()
        if not self.has_classes:
            return None
        path = self.classes_path(id)
        arr = read_image(path)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise KerasnucError(
                f"{path}: expected a greyscale integer PNG, got {arr.dtype} {arr.shape}"
            )
        return arr.astype(np.int32)

    def label(self, id: str) -> np.ndarray:
        """``(H, W, 2)`` int32 stack of instance map and class map (class = 1 without classes)."""
        inst = self.instances(id)
        cls = self.classes(id)
        if cls is None:
            cls = (inst > 0).astype(np.int32)
        return np.stack([inst, cls], axis=-1)

    def sample(self, id: str) -> Sample:
        """Read image, instance map and class map of one id."""
        return Sample(id, self.image(id), self.instances(id), self.classes(id))

    def samples(self, split: str | None = None) -> Iterator[Sample]:
        for id in self.split(split):
            yield self.sample(id)

    def validate(self, id: str) -> None:
        """Check one sample against the layout invariants (raises :class:`KerasnucError`)."""
        if self.is_points:
            image = self.image(id)
            points, classes = self.points(id)
            check_points(str(self.points_path(id)), image, points, classes, set(self.class_names))
            return
        s = self.sample(id)
        check_label_pair(
            str(self.instances_path(id)),
            s.image,
            s.instances,
            s.classes,
            set(self.class_names) if self.has_classes else None,
        )


class DatasetWriter:
    """Write a dataset folder atomically: everything goes to a temporary folder first.

    Use as a context manager; the folder appears at ``root`` only when the block finishes
    without an exception, so a failed import leaves nothing behind::

        with DatasetWriter(dst, meta={"name": "x", "mpp": 0.25, "classes": {"1": "tumour"}}) as w:
            w.add("img1", image, instances, classes, split="train")

    A points dataset (see the module docstring) is written with ``annotations="points"`` and
    :meth:`add_points`.

    Args:
        root: destination folder (must not exist unless ``overwrite``).
        meta: metadata for ``meta.json``; ``classes`` maps ids (str or int) to names.
        overwrite: replace an existing folder.
        annotations: ``"instances"`` (masks, :meth:`add`) or ``"points"`` (:meth:`add_points`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        meta: Mapping[str, Any],
        overwrite: bool = False,
        annotations: str = "instances",
    ):
        if annotations not in ("instances", POINTS):
            raise ValueError(
                f"`annotations` must be 'instances' or 'points'. Received: {annotations!r}"
            )
        self.annotations = annotations
        self.root = Path(root)
        self.meta = dict(meta)
        classes = self.meta.get("classes") or {}
        self.class_names = {int(k): str(v) for k, v in classes.items()}
        self.meta["classes"] = {str(k): v for k, v in sorted(self.class_names.items())} or None
        self.overwrite = overwrite
        self._splits: dict[str, str] = {}
        self._n_nuclei = 0
        self._ctx = None
        self._tmp: Path | None = None

    def __enter__(self) -> DatasetWriter:
        self._ctx = atomic_dir(self.root, overwrite=self.overwrite)
        self._tmp = self._ctx.__enter__()
        if self.annotations == POINTS:
            subs: tuple[str, ...] = ("images", POINTS_DIR)
        else:
            subs = ("images", "instances") + (("classes",) if self.class_names else ())
        for sub in subs:
            (self._tmp / sub).mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        assert self._ctx is not None and self._tmp is not None
        if exc_type is None:
            try:
                self._finish()
            except BaseException as err:
                return self._ctx.__exit__(type(err), err, err.__traceback__)
        return self._ctx.__exit__(exc_type, exc, tb)

    def add(
        self,
        id: str,
        image: np.ndarray,
        instances: np.ndarray,
        classes: np.ndarray | None = None,
        split: str = "train",
        source: str | None = None,
    ) -> None:
        """Add one sample; instance ids are relabelled to 1..N (order kept).

        Args:
            id: image id, used as file stem (no path separators).
            image: ``(H, W, 3)`` uint8 RGB.
            instances: ``(H, W)`` integer instance map.
            classes: ``(H, W)`` integer class map (required when the dataset has classes).
            split: split name for ``splits.csv``.
            source: what to name in error messages (defaults to the id).

        Raises:
            KerasnucError: the sample violates the layout invariants.
        """
        if self._tmp is None:
            raise RuntimeError("DatasetWriter.add must be called inside its `with` block")
        if self.annotations == POINTS:
            raise RuntimeError("a points dataset is written with add_points")
        name = source or id
        self._check_new_id(id, name)
        image = np.asarray(image)
        instances = np.asarray(instances)
        if self.class_names and classes is None:
            raise KerasnucError(f"{name}: dataset has classes but no class map was given")
        if not self.class_names and classes is not None:
            classes = None
        check_label_pair(
            name,
            image,
            instances,
            None if classes is None else np.asarray(classes),
            set(self.class_names) if self.class_names else None,
        )
        inst = relabel_consecutive(instances)
        n = int(inst.max()) if inst.size else 0
        if n > MAX_PNG_INSTANCES:
            raise KerasnucError(
                f"{name}: {n} nuclei exceed the 16-bit PNG limit of {MAX_PNG_INSTANCES}"
            )
        write_png(self._tmp / "images" / f"{id}.png", image)
        write_png(self._tmp / "instances" / f"{id}.png", inst.astype(np.uint16))
        if classes is not None:
            write_png(self._tmp / "classes" / f"{id}.png", np.asarray(classes).astype(np.uint8))
        self._splits[id] = split
        self._n_nuclei += n

    def _check_new_id(self, id: str, name: str) -> None:
        if not id or "/" in id or "\\" in id or id.startswith("."):
            raise KerasnucError(f"{name}: invalid image id {id!r}")
        if id in self._splits:
            raise KerasnucError(f"{name}: duplicate image id {id!r}")

    def add_points(
        self,
        id: str,
        image: np.ndarray,
        points: np.ndarray,
        classes: np.ndarray | None = None,
        split: str = "train",
        source: str | None = None,
    ) -> None:
        """Add one image with its point annotations (a points dataset).

        Args:
            id: image id, used as file stem.
            image: ``(H, W, 3)`` uint8 RGB.
            points: ``(K, 2)`` float ``(row, col)`` pixel indices (the centre of pixel
                ``(r, c)`` is ``(r, c)``), each on the image.
            classes: ``(K,)`` int class ids (0 = unclassified), or None.
            split: split name for ``splits.csv``.
            source: what to name in error messages (defaults to the id).

        Raises:
            KerasnucError: bad image, points off the image or unknown class ids.
        """
        if self._tmp is None:
            raise RuntimeError("DatasetWriter.add_points must be called inside its `with` block")
        if self.annotations != POINTS:
            raise RuntimeError("add_points needs DatasetWriter(..., annotations='points')")
        name = source or id
        self._check_new_id(id, name)
        image = np.asarray(image)
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if classes is not None:
            classes = np.asarray(classes).astype(np.int64).reshape(-1)
            if classes.shape[0] != points.shape[0]:
                raise KerasnucError(f"{name}: {points.shape[0]} points but {classes.size} classes")
        check_points(name, image, points, classes, set(self.class_names))
        write_png(self._tmp / "images" / f"{id}.png", image)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["x", "y", "class"])
        for k, (row, col) in enumerate(points):
            label = "" if classes is None or classes[k] == 0 else int(classes[k])
            w.writerow([repr(float(col)), repr(float(row)), label])
        write_text_atomic(self._tmp / POINTS_DIR / f"{id}.csv", buf.getvalue())
        self._splits[id] = split
        self._n_nuclei += int(points.shape[0])

    def _finish(self) -> None:
        assert self._tmp is not None
        meta = dict(self.meta)
        meta["n_images"] = len(self._splits)
        meta["n_nuclei"] = self._n_nuclei
        if self.annotations == POINTS:
            meta["annotations"] = POINTS
        meta.setdefault("name", self.root.name)
        write_json_atomic(self._tmp / META_FILE, meta)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["id", "split"])
        for id, split in self._splits.items():
            w.writerow([id, split])
        write_text_atomic(self._tmp / SPLITS_FILE, buf.getvalue())
