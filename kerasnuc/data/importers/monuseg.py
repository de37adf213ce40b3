"""MoNuSeg importer: Aperio ImageScope XML polygons + H&E images.

Source: MoNuSeg 2018 (Kumar et al., "A Dataset and a Technique for Generalized Nuclear
Segmentation for Computational Pathology", IEEE TMI 2017). Each ``<Region>`` of an XML file is
one nucleus outlined by ``<Vertices><Vertex X=".." Y=".."/>...``; the image has the same stem
(``.tif`` in the challenge zips).

Rasterisation follows the official mask code (``he_to_binary_mask.m``, MATLAB ``poly2mask`` with
1-based vertices): ``skimage.draw.polygon(rows=Y - 1, cols=X - 1)``. Regions are drawn in file
order, a later region overwrites an earlier one where they overlap, and regions with fewer than
three vertices are skipped (and reported). ``MicronsPerPixel`` on the root ``<Annotations>``
element gives the pixel size.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from kerasnuc.data.importers.base import (
    ImportItem,
    ImportPlan,
    LoadedSample,
    read_rgb,
    subdir,
)
from kerasnuc.fileutil import KerasnucError

logger = logging.getLogger(__name__)

MONUSEG_IMAGE_EXTENSIONS = (".tif", ".tiff", ".png")


def read_monuseg_mpp(xml_path: Path) -> float | None:
    """``MicronsPerPixel`` of the root element of a MoNuSeg XML file (None when absent).

    Only the start of the file is parsed.
    """
    value = None
    try:
        with open(xml_path, "rb") as f:
            for _, elem in ET.iterparse(f, events=("start",)):
                value = elem.attrib.get("MicronsPerPixel")
                break
    except ET.ParseError as exc:
        raise KerasnucError(f"{xml_path}: invalid XML ({exc})") from exc
    except OSError as exc:
        raise KerasnucError(f"{xml_path}: cannot read ({exc})") from exc
    try:
        mpp = float(value) if value is not None else None
    except ValueError:
        return None
    return mpp if mpp is not None and np.isfinite(mpp) and mpp > 0 else None


def read_monuseg_regions(xml_path: Path) -> list[np.ndarray]:
    """Vertices of every ``<Region>`` of a MoNuSeg XML file, in file order.

    Returns:
        One ``(K, 2)`` float64 array of ``(X, Y)`` vertex coordinates (1-based) per region.

    Raises:
        KerasnucError: the file is not valid XML, not an ImageScope ``<Annotations>`` document
            (e.g. Pascal VOC or CVAT XML), or a vertex lacks a numeric X/Y.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise KerasnucError(f"{xml_path}: invalid XML ({exc})") from exc
    except OSError as exc:
        raise KerasnucError(f"{xml_path}: cannot read ({exc})") from exc
    if root.tag != "Annotations":
        raise KerasnucError(
            f"{xml_path}: not a MoNuSeg (Aperio ImageScope) annotation file: its root element "
            f"is <{root.tag}>, expected <Annotations> with <Region>/<Vertex> outlines"
        )
    regions = []
    for r_idx, region in enumerate(root.iter("Region")):
        verts = []
        for vertex in region.iter("Vertex"):
            try:
                verts.append((float(vertex.attrib["X"]), float(vertex.attrib["Y"])))
            except (KeyError, ValueError):
                raise KerasnucError(
                    f"{xml_path}: region {r_idx + 1} has a vertex without numeric X/Y "
                    f"({dict(vertex.attrib)})"
                ) from None
        regions.append(np.asarray(verts, dtype=np.float64).reshape(-1, 2))
    return regions


def rasterise_monuseg(regions: list[np.ndarray], shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Draw MoNuSeg regions into an instance map (1-based vertex convention).

    Args:
        regions: ``(K, 2)`` arrays of 1-based ``(X, Y)`` vertices, in file order.
        shape: ``(H, W)``.

    Returns:
        ``(instances, n_skipped, n_outside)``: ``(H, W)`` int32 map where region ``k`` (counting
        only the regions drawn) has id ``k``; later regions overwrite earlier ones. ``n_skipped``
        counts the regions with fewer than 3 vertices, ``n_outside`` those that cover no pixel.
    """
    from skimage.draw import polygon

    inst = np.zeros(shape, dtype=np.int32)
    n_skipped = n_outside = 0
    k = 0
    for verts in regions:
        if len(verts) < 3:
            n_skipped += 1
            continue
        k += 1
        rr, cc = polygon(verts[:, 1] - 1.0, verts[:, 0] - 1.0, shape=shape)
        inst[rr, cc] = k
        n_outside += rr.size == 0
    return inst, n_skipped, n_outside


def _load(xml_path: Path, image_path: Path) -> LoadedSample:
    image = read_rgb(image_path)
    regions = read_monuseg_regions(xml_path)
    inst, n_skipped, n_outside = rasterise_monuseg(regions, image.shape[:2])
    height, width = image.shape[:2]
    n_regions = len(regions) - n_skipped
    if n_regions and n_outside == n_regions:
        raise KerasnucError(
            f"{xml_path}: none of its {n_regions} regions covers a pixel of the {width}x{height} "
            f"image {image_path.name} (the annotations of another image?)"
        )
    problems = []
    if not regions:
        problems.append(f"{xml_path}: no <Region> elements (image imported without nuclei)")
    if n_outside:
        problems.append(
            f"{xml_path}: {n_outside} region(s) outside the {width}x{height} image skipped"
        )
    if n_skipped:
        msg = f"{xml_path}: skipped {n_skipped} region(s) with fewer than 3 vertices"
        logger.info(msg)
        problems.append(msg)
    return LoadedSample(image, inst, None, problems)


def scan_monuseg(src: str | Path) -> ImportPlan:
    """Find MoNuSeg XML files and their images.

    XML files are taken from ``src/Annotations/*.xml`` when that folder exists, otherwise from
    anywhere under ``src``. Each needs an image with the same stem anywhere under ``src``
    (``.tif``, ``.tiff`` or ``.png``; the first in that order wins), which covers both the
    training zip (``Tissue Images/`` + ``Annotations/``) and the test zip (one folder).

    Args:
        src: the MoNuSeg folder.

    Returns:
        An :class:`ImportPlan` without classes; ``meta["mpp"]`` is the median
        ``MicronsPerPixel`` of the XML files (None when no file has it) and
        ``meta["mpp_per_image"]`` the value of each file that has one.

    Raises:
        KerasnucError: no XML file, or an XML file without image.
    """
    src = Path(src)
    if not src.is_dir():
        raise KerasnucError(f"{src}: not a folder")
    ann_dir = subdir(src, "Annotations")
    xmls = sorted(ann_dir.glob("*.xml")) if ann_dir else sorted(src.rglob("*.xml"))
    xmls = [p for p in xmls if not p.name.startswith(".")]
    if not xmls:
        raise KerasnucError(f"{src}: no MoNuSeg XML files (expected Annotations/*.xml)")
    order = {ext: i for i, ext in enumerate(MONUSEG_IMAGE_EXTENSIONS)}
    images: dict[str, Path] = {}
    for path in sorted(src.rglob("*")):
        ext = path.suffix.lower()
        if ext in order and path.is_file() and not path.name.startswith("."):
            prev = images.get(path.stem)
            if prev is None or order[ext] < order[prev.suffix.lower()]:
                images[path.stem] = path
    items = []
    mpps: dict[str, float] = {}
    for xml in xmls:
        image = images.get(xml.stem)
        if image is None:
            raise KerasnucError(f"{xml}: no image {xml.stem}{{.tif,.tiff,.png}} found under {src}")
        mpp = read_monuseg_mpp(xml)
        if mpp is not None:
            mpps[xml.stem] = mpp
        items.append(ImportItem(xml.stem, str(xml), lambda x=xml, i=image: _load(x, i)))
    problems = []
    if len(mpps) < len(xmls):
        problems.append(
            f"{src}: {len(xmls) - len(mpps)} of {len(xmls)} XML file(s) have no MicronsPerPixel"
        )
    meta = {
        "source": [str(src.resolve())],
        "license": None,
        "stain": "H&E",
        "magnification": "40x",
        "mpp": round(float(np.median(list(mpps.values()))), 4) if mpps else None,
        "classes": None,
        "mpp_per_image": mpps or None,
        "notes": (
            "Imported by `kerasnuc data import monuseg`: every XML <Region> is one nucleus, "
            "rasterised with skimage.draw.polygon(rows=Y-1, cols=X-1) (1-based vertices, as the "
            "official he_to_binary_mask.m); later regions overwrite earlier ones on overlap; "
            "regions with < 3 vertices skipped; ids relabelled 1..N. mpp = median "
            "MicronsPerPixel of the XML files unless given with --mpp."
        ),
    }
    return ImportPlan("monuseg", src, items, meta, problems)
