"""Importers on tiny files made here; expected label maps are worked out by hand in comments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import tifffile

from kerasnuc.data import Dataset
from kerasnuc.data.importers import (
    FORMAT_OPTIONS,
    FORMATS,
    assign_splits,
    import_dataset,
    scan,
)
from kerasnuc.data.importers.base import per_instance_classes
from kerasnuc.data.importers.masks import is_binary_mask
from kerasnuc.fileutil import KerasnucError, write_png
from kerasnuc.instances import composition_counts


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# MoNuSeg -----------------------------------------------------------------------------------------

MONUSEG_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Annotations MicronsPerPixel="0.252000">
  <Annotation Id="1">
    <Regions>
      <Region Id="1">
        <Vertices>
          <Vertex X="2.5" Y="3.5" Z="0"/><Vertex X="5.5" Y="3.5" Z="0"/>
          <Vertex X="5.5" Y="5.5" Z="0"/><Vertex X="2.5" Y="5.5" Z="0"/>
        </Vertices>
      </Region>
      <Region Id="2">
        <Vertices><Vertex X="1" Y="1"/><Vertex X="3" Y="1"/></Vertices>
      </Region>
      <Region Id="3">
        <Vertices>
          <Vertex X="4.5" Y="4.5"/><Vertex X="7.5" Y="4.5"/>
          <Vertex X="7.5" Y="6.5"/><Vertex X="4.5" Y="6.5"/>
        </Vertices>
      </Region>
    </Regions>
  </Annotation>
</Annotations>
"""


def make_monuseg(root: Path) -> Path:
    """MoNuSeg training-zip layout: ``Tissue Images/*.tif`` + ``Annotations/*.xml``."""
    (root / "Tissue Images").mkdir(parents=True)
    (root / "Annotations").mkdir()
    tifffile.imwrite(root / "Tissue Images" / "TCGA-XX.tif", rgb(8, 10))
    (root / "Annotations" / "TCGA-XX.xml").write_text(MONUSEG_XML)
    return root


def monuseg_expected() -> np.ndarray:
    # 1-based vertices: row = Y - 1, col = X - 1.
    # Region 1: cols 1.5..4.5 -> 2, 3, 4; rows 2.5..4.5 -> 3, 4.
    # Region 2: 2 vertices -> skipped.
    # Region 3: cols 3.5..6.5 -> 4, 5, 6; rows 3.5..5.5 -> 4, 5; drawn after region 1 (wins).
    exp = np.zeros((8, 10), np.int32)
    exp[3:5, 2:5] = 1
    exp[4:6, 4:7] = 2
    return exp


def test_monuseg_rasterises_with_one_based_vertices(tmp_path):
    src = make_monuseg(tmp_path / "src")
    report = import_dataset("monuseg", src, tmp_path / "out")
    ds = Dataset(tmp_path / "out")
    assert ds.ids == ["TCGA-XX"]
    np.testing.assert_array_equal(ds.instances("TCGA-XX"), monuseg_expected())
    np.testing.assert_array_equal(ds.image("TCGA-XX"), rgb(8, 10))
    assert ds.mpp == pytest.approx(0.252)
    assert not ds.has_classes
    assert report.n_nuclei == 2
    assert any("skipped 1 region" in p for p in report.problems)


def test_monuseg_test_zip_layout_and_missing_mpp(tmp_path):
    # Test zip: .tif and .xml side by side, no Annotations/ folder, no MicronsPerPixel.
    src = tmp_path / "src"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", rgb(8, 10))
    (src / "a.xml").write_text(MONUSEG_XML.replace(' MicronsPerPixel="0.252000"', ""))
    report = import_dataset("monuseg", src, tmp_path / "out", mpp=0.5)
    ds = Dataset(tmp_path / "out")
    np.testing.assert_array_equal(ds.instances("a"), monuseg_expected())
    assert ds.mpp == 0.5
    assert any("no MicronsPerPixel" in p for p in report.problems)


def test_monuseg_missing_image_and_corrupt_xml(tmp_path):
    src = make_monuseg(tmp_path / "src")
    (src / "Annotations" / "other.xml").write_text(MONUSEG_XML)
    with pytest.raises(KerasnucError, match="other.xml: no image"):
        import_dataset("monuseg", src, tmp_path / "out")
    (src / "Annotations" / "other.xml").unlink()
    (src / "Annotations" / "TCGA-XX.xml").write_text("<Annotations><Region>")
    with pytest.raises(KerasnucError, match="TCGA-XX.xml: invalid XML"):
        import_dataset("monuseg", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# CoNSeP ------------------------------------------------------------------------------------------


def consep_arrays() -> tuple[np.ndarray, np.ndarray]:
    inst = np.zeros((6, 6), np.float64)  # MATLAB stores inst_map as double
    types = np.zeros((6, 6), np.float64)
    inst[0:2, 0:2] = 1
    types[0:2, 0:2] = 4  # dysplastic/malignant epithelial -> merged 3
    inst[3:5, 3:6] = 2
    types[3:5, 3:6] = 6  # muscle -> merged 4
    inst[5, 0] = 3
    types[5, 0] = 2  # inflammatory -> 2
    return inst, types


def make_consep(root: Path, with_type_map: bool = True) -> Path:
    (root / "Images").mkdir(parents=True)
    (root / "Labels").mkdir()
    write_png(root / "Images" / "train_1.png", rgb(6, 6, 1))
    inst, types = consep_arrays()
    mat = {"inst_map": inst, "inst_type": np.array([[4.0], [6.0], [2.0]])}
    if with_type_map:
        mat["type_map"] = types
    scipy.io.savemat(root / "Labels" / "train_1.mat", mat)
    return root


def test_consep_merges_into_hovernet_classes(tmp_path):
    src = make_consep(tmp_path / "src")
    import_dataset("consep", src, tmp_path / "out")
    ds = Dataset(tmp_path / "out")
    assert ds.class_names == {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle"}
    inst, _ = consep_arrays()
    np.testing.assert_array_equal(ds.instances("train_1"), inst.astype(np.int32))
    exp = np.zeros((6, 6), np.int32)
    exp[0:2, 0:2] = 3
    exp[3:5, 3:6] = 4
    exp[5, 0] = 2
    np.testing.assert_array_equal(ds.classes("train_1"), exp)
    assert ds.mpp == 0.25


@pytest.mark.parametrize("with_type_map", [True, False])
def test_consep_keeps_seven_types(tmp_path, with_type_map):
    src = make_consep(tmp_path / "src", with_type_map=with_type_map)
    import_dataset("consep", src, tmp_path / "out", merge_classes=False)
    ds = Dataset(tmp_path / "out")
    assert ds.num_classes == 7
    assert ds.class_names[4] == "dysplastic/malignant epithelial"
    assert ds.class_names[7] == "endothelial"
    _, types = consep_arrays()
    np.testing.assert_array_equal(ds.classes("train_1"), types.astype(np.int32))


def test_consep_majority_type_and_bad_type(tmp_path):
    src = make_consep(tmp_path / "src")
    inst, types = consep_arrays()
    types[0, 0] = 3  # nucleus 1: three pixels of type 4, one of type 3 -> type 4 -> class 3
    scipy.io.savemat(src / "Labels" / "train_1.mat", {"inst_map": inst, "type_map": types})
    report = import_dataset("consep", src, tmp_path / "out")
    assert Dataset(tmp_path / "out").classes("train_1")[0, 0] == 3
    assert any("1 nuclei had several types" in p for p in report.problems)
    types[5, 0] = 9
    scipy.io.savemat(src / "Labels" / "train_1.mat", {"inst_map": inst, "type_map": types})
    with pytest.raises(KerasnucError, match=r"train_1.mat: type id\(s\) \[9\] not in"):
        import_dataset("consep", src, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_consep_reads_matlab_v73(tmp_path):
    import h5py

    src = make_consep(tmp_path / "src")
    inst, types = consep_arrays()
    (src / "Labels" / "train_1.mat").unlink()
    with h5py.File(src / "Labels" / "train_1.mat", "w") as f:
        f["inst_map"] = inst.T  # HDF5 (v7.3) files hold MATLAB arrays column-major
        f["type_map"] = types.T
    import_dataset("consep", src, tmp_path / "out")
    np.testing.assert_array_equal(Dataset(tmp_path / "out").instances("train_1"), inst)


def test_consep_missing_type_information(tmp_path):
    src = make_consep(tmp_path / "src")
    scipy.io.savemat(src / "Labels" / "train_1.mat", {"inst_map": consep_arrays()[0]})
    with pytest.raises(KerasnucError, match="no 'type_map' or 'inst_type'"):
        import_dataset("consep", src, tmp_path / "out")


# CoNIC -------------------------------------------------------------------------------------------


def make_conic(root: Path, counts_row1: str = "2,0,0,0,0,0") -> Path:
    root.mkdir(parents=True)
    images = np.stack([rgb(256, 256, 2), rgb(256, 256, 3)])
    labels = np.zeros((2, 256, 256, 2), np.uint16)
    # Image 0: central 224 x 224 region = rows/cols 16..239.
    labels[0, 100:104, 100:104] = (1, 2)  # epithelial, inside
    labels[0, 0:4, 0:4] = (2, 3)  # lymphocyte, outside the region -> not counted
    labels[0, 14:18, 50:54] = (3, 6)  # connective, rows 16, 17 inside -> counted
    # Image 1: one neutrophil; counts.csv (below) claims 2 -> mismatch.
    labels[1, 30:35, 30:35] = (7, 1)
    np.save(root / "images.npy", images)
    np.save(root / "labels.npy", labels)
    (root / "counts.csv").write_text(
        "neutrophil,epithelial,lymphocyte,plasma,eosinophil,connective\n"
        f"0,1,0,0,0,1\n{counts_row1}\n"
    )
    return root


def test_conic_import_and_counts_cross_check(tmp_path):
    src = make_conic(tmp_path / "src")
    (src / "patch_info.csv").write_text("patch_info\ncrag_1-0000\ncrag_1-0001\n")
    report = import_dataset("conic", src, tmp_path / "out")
    ds = Dataset(tmp_path / "out")
    assert ds.ids == ["crag_1-0000", "crag_1-0001"]
    assert ds.class_names[1] == "neutrophil" and ds.class_names[6] == "connective"
    assert ds.mpp == 0.5
    inst = ds.instances("crag_1-0000")
    assert inst[100, 100] == 1 and inst[0, 0] == 2 and inst[14, 50] == 3  # source ids kept
    cls = ds.classes("crag_1-0000")
    assert (cls[100, 100], cls[0, 0], cls[14, 50]) == (2, 3, 6)
    assert ds.instances("crag_1-0001").max() == 1
    np.testing.assert_array_equal(ds.image("crag_1-0001"), rgb(256, 256, 3))
    mismatches = [p for p in report.problems if "counts.csv" in p]
    assert len(mismatches) == 1
    assert "labels.npy [1]" in mismatches[0] and "'neutrophil': (2, 1)" in mismatches[0]


def test_conic_counts_agree_and_index_ids(tmp_path):
    src = make_conic(tmp_path / "src", counts_row1="1,0,0,0,0,0")
    report = import_dataset("conic", src, tmp_path / "out")
    assert Dataset(tmp_path / "out").ids == ["0000", "0001"]
    assert not [p for p in report.problems if "counts.csv" in p]


def test_composition_counts_by_hand():
    inst = np.zeros((256, 256), np.int32)
    cls = np.zeros((256, 256), np.int32)
    inst[15, 20], cls[15, 20] = 1, 4  # row 15 is outside the central region 16..239
    inst[16, 20], cls[16, 20] = 2, 4  # row 16 is inside
    inst[239, 239], cls[239, 239] = 3, 5  # last inside pixel
    inst[240, 240], cls[240, 240] = 4, 5  # outside
    np.testing.assert_array_equal(composition_counts(inst, cls, 6), [0, 0, 0, 1, 1, 0])


def test_conic_bad_arrays(tmp_path):
    src = make_conic(tmp_path / "src")
    labels = np.load(src / "labels.npy")
    labels[1, 0, 0] = (9, 7)
    np.save(src / "labels.npy", labels)
    with pytest.raises(KerasnucError, match=r"labels.npy \[1\]: class id\(s\) \[7\]"):
        import_dataset("conic", src, tmp_path / "out")
    np.save(src / "labels.npy", labels[:1])
    with pytest.raises(KerasnucError, match="labels.npy: shape"):
        import_dataset("conic", src, tmp_path / "out")
    (src / "images.npy").write_bytes(b"not a numpy file")
    with pytest.raises(KerasnucError, match="images.npy: cannot read .npy"):
        import_dataset("conic", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# PanNuke -----------------------------------------------------------------------------------------


def make_pannuke(root: Path) -> Path:
    img_dir = root / "Fold 2" / "images" / "fold2"
    mask_dir = root / "Fold 2" / "masks" / "fold2"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    images = np.zeros((2, 8, 8, 3), np.float64)
    images[0] = 12.0
    images[0, 0, 0] = (200.4, 0.6, 255.0)  # rounds to (200, 1, 255)
    images[1] = 100.0
    masks = np.zeros((2, 8, 8, 6), np.float64)
    masks[0, 1:3, 1:3, 0] = 1  # neoplastic id 1
    masks[0, 5:7, 5:7, 2] = 1  # connective id 1: same id, other channel -> separate nucleus
    masks[0, 0, 7, 4] = 7  # epithelial id 7
    masks[1, 0:2, 0:2, 0] = 1  # neoplastic
    masks[1, 1, 1, 1] = 2  # inflammatory pixel overlapping it -> later channel wins
    masks[..., 5] = (masks[..., :5].sum(-1) == 0).astype(np.float64)
    np.save(img_dir / "images.npy", images)
    np.save(img_dir / "types.npy", np.array(["Breast", "Colon"]))
    np.save(mask_dir / "masks.npy", masks)
    return root / "Fold 2"


def test_pannuke_unique_instances_across_channels(tmp_path):
    src = make_pannuke(tmp_path / "src")
    report = import_dataset("pannuke", src, tmp_path / "out")
    ds = Dataset(tmp_path / "out")
    assert ds.ids == ["fold2_0000", "fold2_0001"]
    assert ds.meta["tissue"] == {"fold2_0000": "Breast", "fold2_0001": "Colon"}
    assert ds.mpp == 0.25
    assert ds.class_names == {
        1: "neoplastic",
        2: "inflammatory",
        3: "connective",
        4: "dead",
        5: "epithelial",
    }
    # Keys (channel, id): (0, 1) -> 1, (2, 1) -> 2, (4, 7) -> 3.
    exp_inst = np.zeros((8, 8), np.int32)
    exp_inst[1:3, 1:3] = 1
    exp_inst[5:7, 5:7] = 2
    exp_inst[0, 7] = 3
    exp_cls = np.zeros((8, 8), np.int32)
    exp_cls[1:3, 1:3] = 1
    exp_cls[5:7, 5:7] = 3
    exp_cls[0, 7] = 5
    np.testing.assert_array_equal(ds.instances("fold2_0000"), exp_inst)
    np.testing.assert_array_equal(ds.classes("fold2_0000"), exp_cls)
    img = ds.image("fold2_0000")
    assert tuple(img[0, 0]) == (200, 1, 255) and tuple(img[4, 4]) == (12, 12, 12)
    # Image 1: pixel (1, 1) belongs to the inflammatory nucleus (channel 1 drawn after 0).
    inst1, cls1 = ds.instances("fold2_0001"), ds.classes("fold2_0001")
    assert inst1[1, 1] == 2 and cls1[1, 1] == 2
    assert (inst1[0:2, 0:2] == 1).sum() == 3
    assert any("masks.npy [1]: 1 pixels in several class channels" in p for p in report.problems)


def test_pannuke_out_of_range_image(tmp_path):
    src = make_pannuke(tmp_path / "src")
    path = src / "images" / "fold2" / "images.npy"
    images = np.load(path)
    images[1, 0, 0, 0] = 300.0
    np.save(path, images)
    with pytest.raises(KerasnucError, match=r"images.npy \[1\]: image values must lie in 0..255"):
        import_dataset("pannuke", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# Mask folders ------------------------------------------------------------------------------------


def make_masks(root: Path) -> Path:
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    write_png(root / "images" / "inst.png", rgb(5, 6, 4))
    write_png(root / "images" / "bin.png", rgb(5, 6, 5))
    tifffile.imwrite(root / "images" / "tif.tif", rgb(5, 6, 6))
    write_png(root / "images" / "unlabelled.png", rgb(5, 6, 7))
    inst = np.zeros((5, 6), np.uint16)
    inst[0:2, 0:2] = 9
    inst[3:5, 3:6] = 5
    write_png(root / "masks" / "inst.png", inst)
    binary = np.zeros((5, 6), np.uint8)
    binary[0, 0] = binary[1, 1] = 255  # touch diagonally only -> 2 nuclei (4-connectivity)
    binary[3:5, 2:5] = 255
    write_png(root / "masks" / "bin.png", binary)
    tif = np.zeros((5, 6), np.int32)
    tif[2, 2:4] = 3
    tifffile.imwrite(root / "masks" / "tif.tif", tif)
    return root


def test_masks_instance_binary_and_tiff(tmp_path):
    src = make_masks(tmp_path / "src")
    report = import_dataset("masks", src, tmp_path / "out", split="test")
    ds = Dataset(tmp_path / "out")
    assert sorted(ds.ids) == ["bin", "inst", "tif"]
    assert set(ds.splits.values()) == {"test"}
    exp = np.zeros((5, 6), np.int32)
    exp[0:2, 0:2] = 2  # id 9 -> 2 (order of ids kept)
    exp[3:5, 3:6] = 1  # id 5 -> 1
    np.testing.assert_array_equal(ds.instances("inst"), exp)
    exp = np.zeros((5, 6), np.int32)
    exp[0, 0], exp[1, 1] = 1, 2  # components numbered in raster order
    exp[3:5, 2:5] = 3
    np.testing.assert_array_equal(ds.instances("bin"), exp)
    exp = np.zeros((5, 6), np.int32)
    exp[2, 2:4] = 1
    np.testing.assert_array_equal(ds.instances("tif"), exp)
    np.testing.assert_array_equal(ds.image("tif"), rgb(5, 6, 6))
    assert any("unlabelled.png: image without mask" in p for p in report.problems)


def test_masks_forced_instance_reading_keeps_binary_as_one_nucleus(tmp_path):
    src = make_masks(tmp_path / "src")
    import_dataset("masks", src, tmp_path / "out", mask_type="instance")
    assert Dataset(tmp_path / "out").instances("bin").max() == 1


def test_masks_with_class_maps(tmp_path):
    src = make_masks(tmp_path / "src")
    (src / "classes").mkdir()
    for stem in ("bin", "tif"):
        (src / "masks" / f"{stem}.{'png' if stem == 'bin' else 'tif'}").unlink()
    cls = np.zeros((5, 6), np.uint8)
    cls[0:2, 0:2] = 2
    cls[0, 0] = 1  # nucleus with pixels 2, 2, 2, 1 -> class 2
    cls[3:5, 3:6] = 1
    cls[2, 0] = 2  # class pixel on background: ignored
    write_png(src / "classes" / "inst.png", cls)
    report = import_dataset("masks", src, tmp_path / "out", classes="tumour,stroma")
    ds = Dataset(tmp_path / "out")
    assert ds.class_names == {1: "tumour", 2: "stroma"}
    exp = np.zeros((5, 6), np.int32)
    exp[0:2, 0:2] = 2
    exp[3:5, 3:6] = 1
    np.testing.assert_array_equal(ds.classes("inst"), exp)
    assert any("1 nuclei had several classes" in p for p in report.problems)
    # Without names: class_1 .. class_K with K the largest id found.
    import_dataset("masks", src, tmp_path / "out2")
    assert Dataset(tmp_path / "out2").class_names == {1: "class_1", 2: "class_2"}
    # A class id beyond the given names.
    with pytest.raises(KerasnucError, match=r"inst.png: class id\(s\) \[2\] not in the class"):
        import_dataset("masks", src, tmp_path / "out3", classes="tumour")
    assert not (tmp_path / "out3").exists()


def test_is_binary_mask():
    assert is_binary_mask(np.array([[0, 255]], np.uint8))
    assert is_binary_mask(np.array([[0, 1]], np.uint16))
    assert is_binary_mask(np.array([[False, True]]))
    assert not is_binary_mask(np.array([[0, 1, 2]], np.uint8))
    assert not is_binary_mask(np.array([[0, 7]], np.uint8))


# GeoJSON -----------------------------------------------------------------------------------------


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def geojson_features() -> list[dict]:
    return [
        {  # corners (2, 1)-(5, 4): pixel centres inside -> rows 1..3, cols 2..4
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square(2, 1, 5, 4)]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
        },
        {  # rows 5..7, cols 0..4 minus the hole x 1..3, y 6..7 (row 6, cols 1..2)
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [square(0, 5, 5, 8), square(1, 6, 3, 7)],
            },
            "properties": {"objectType": "detection", "classification": {"name": "Stroma"}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [1, 1]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
        },
        {  # a cell: the nucleus x 6..8, y 0..2 (rows 0..1, cols 6..7) is used, not the cell
            "type": "Feature",
            "id": "PathCellObject",
            "geometry": {"type": "Polygon", "coordinates": [square(5, 0, 8, 4)]},
            "nucleusGeometry": {"type": "Polygon", "coordinates": [square(6, 0, 8, 2)]},
            "properties": {"classification": {"name": "Immune"}},
        },
    ]


def make_geojson(root: Path, collection: bool = True) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    write_png(root / "images" / "slide_tile.png", rgb(8, 8, 8))
    feats = geojson_features()
    data = {"type": "FeatureCollection", "features": feats} if collection else feats
    (root / "annotations" / "slide_tile.geojson").write_text(json.dumps(data))
    return root


def geojson_expected() -> tuple[np.ndarray, np.ndarray]:
    inst = np.zeros((8, 8), np.int32)
    inst[1:4, 2:5] = 1
    inst[5:8, 0:5] = 2
    inst[6, 1:3] = 0
    inst[0:2, 6:8] = 3
    cls = np.zeros((8, 8), np.int32)  # sorted names: Immune 1, Stroma 2, Tumor 3
    cls[inst == 1] = 3
    cls[inst == 2] = 2
    cls[inst == 3] = 1
    return inst, cls


@pytest.mark.parametrize("collection", [True, False])
def test_geojson_pixel_centre_convention(tmp_path, collection):
    src = make_geojson(tmp_path / "src", collection)
    report = import_dataset("geojson", src, tmp_path / "out")
    ds = Dataset(tmp_path / "out")
    assert ds.class_names == {1: "Immune", 2: "Stroma", 3: "Tumor"}
    exp_inst, exp_cls = geojson_expected()
    np.testing.assert_array_equal(ds.instances("slide_tile"), exp_inst)
    np.testing.assert_array_equal(ds.classes("slide_tile"), exp_cls)
    assert any("'Point': 1" in p for p in report.problems)


def test_geojson_class_order_and_object_types(tmp_path):
    src = make_geojson(tmp_path / "src")
    import_dataset(
        "geojson",
        src,
        tmp_path / "out",
        classes="Tumor,Stroma,Immune",
        object_types="detection,cell",
    )
    ds = Dataset(tmp_path / "out")
    assert ds.class_names == {1: "Tumor", 2: "Stroma", 3: "Immune"}
    exp_inst, _ = geojson_expected()
    exp_inst[exp_inst == 1] = 0  # the annotation is dropped
    np.testing.assert_array_equal(
        ds.instances("slide_tile"), np.where(exp_inst > 0, exp_inst - 1, 0)
    )
    cls = ds.classes("slide_tile")
    assert cls[5, 0] == 2 and cls[0, 6] == 3


def test_geojson_without_classes_and_multipolygon(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "annotations").mkdir()
    write_png(src / "images" / "t.png", rgb(4, 4))
    feature = {
        "type": "Feature",
        "geometry": {
            "type": "MultiPolygon",
            "coordinates": [[square(0, 0, 1, 1)], [square(3, 3, 4, 4)]],
        },
        "properties": {},
    }
    (src / "annotations" / "t.json").write_text(json.dumps(feature))
    import_dataset("geojson", src, tmp_path / "out")
    ds = Dataset(tmp_path / "out")
    assert not ds.has_classes
    exp = np.zeros((4, 4), np.int32)
    exp[0, 0] = exp[3, 3] = 1  # both parts are one nucleus
    np.testing.assert_array_equal(ds.instances("t"), exp)


def test_geojson_class_errors(tmp_path):
    src = make_geojson(tmp_path / "src")
    with pytest.raises(KerasnucError, match="slide_tile.geojson: feature 1 class 'Stroma' not in"):
        import_dataset("geojson", src, tmp_path / "out", classes="Tumor,Immune")
    feats = geojson_features()
    del feats[1]["properties"]["classification"]
    (src / "annotations" / "slide_tile.geojson").write_text(json.dumps(feats))
    with pytest.raises(KerasnucError, match="slide_tile.geojson: feature 1 has no classification"):
        import_dataset("geojson", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def write_geojson_source(root: Path, features: list[dict], size: int = 8) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    write_png(root / "images" / "t.png", rgb(size, size))
    (root / "annotations" / "t.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": features})
    )
    return root


def polygon_feature(coordinates: list) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coordinates}}


def test_geojson_polygons_outside_the_image(tmp_path):
    """Issue 20, item 4: polygons that miss the image are an error, not 0 nuclei and exit 0."""
    far = [polygon_feature([square(100, 100, 110, 110)]), polygon_feature([square(-9, 0, -1, 4)])]
    src = write_geojson_source(tmp_path / "far", far)
    with pytest.raises(KerasnucError, match=r"t\.geojson: none of its 2 polygons covers a pixel"):
        import_dataset("geojson", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # One inside (rows 0..1, cols 0..1), one outside: imported, the miss reported.
    src = write_geojson_source(tmp_path / "half", [polygon_feature([square(0, 0, 2, 2)]), far[0]])
    report = import_dataset("geojson", src, tmp_path / "out")
    assert report.n_nuclei == 1
    assert any("t.geojson: 1 polygon(s) outside the 8x8 image" in p for p in report.problems)


def test_geojson_empty_coordinates(tmp_path):
    """``"coordinates": []`` (an empty geometry, RFC 7946) is skipped and reported."""
    feats = [polygon_feature([]), polygon_feature([square(0, 0, 2, 2)])]
    src = write_geojson_source(tmp_path / "src", feats)
    report = import_dataset("geojson", src, tmp_path / "out")
    assert report.n_nuclei == 1
    assert any("t.geojson: skipped 1 empty geometry" in p for p in report.problems)
    src = write_geojson_source(tmp_path / "only", [polygon_feature([])])
    with pytest.raises(KerasnucError, match=r"t\.geojson: no polygon"):
        import_dataset("geojson", src, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_monuseg_rejects_other_xml_and_regions_outside(tmp_path):
    """Issue 20, item 4: a non-MoNuSeg XML is an error naming the file, not 0 nuclei."""
    src = make_monuseg(tmp_path / "src")
    xml = src / "Annotations" / "TCGA-XX.xml"
    xml.write_text(
        "<annotation><object><name>cell</name><bndbox><xmin>1</xmin></bndbox></object></annotation>"
    )  # Pascal VOC
    with pytest.raises(KerasnucError, match=r"TCGA-XX\.xml: not a MoNuSeg .*<annotation>"):
        import_dataset("monuseg", src, tmp_path / "out")
    xml.write_text(MONUSEG_XML.replace('X="', 'X="10').replace('Y="', 'Y="10'))
    with pytest.raises(KerasnucError, match=r"TCGA-XX\.xml: none of its 2 regions covers a pixel"):
        import_dataset("monuseg", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_without_any_nucleus_fails(tmp_path):
    """Every image of the import empty: nothing to train or score on, so nothing is written."""
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for stem in ("a", "b"):
        write_png(src / "images" / f"{stem}.png", rgb(6, 6))
        write_png(src / "masks" / f"{stem}.png", np.zeros((6, 6), np.uint16))
    with pytest.raises(KerasnucError, match="no nuclei in any of the 2 images"):
        import_dataset("masks", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# Shared behaviour --------------------------------------------------------------------------------


def test_assign_splits_definition():
    ids = [f"img{i}" for i in range(10)]
    got = assign_splits(ids, "train", 0.3, seed=5)
    # round(0.3 * 10) = 3 ids drawn with default_rng(5).choice(sorted ids, 3, replace=False).
    drawn = set(np.random.default_rng(5).choice(sorted(ids), size=3, replace=False).tolist())
    assert {i for i, s in got.items() if s == "val"} == drawn
    assert list(got) == ids
    assert set(assign_splits(ids, "test").values()) == {"test"}
    assert list(assign_splits(["a", "b", "c"], "train", 0.1).values()).count("val") == 1
    assert list(assign_splits(["a", "b"], "train", 0.9).values()).count("val") == 1
    with pytest.raises(ValueError, match="val_fraction"):
        assign_splits(ids, "train", 1.0)


def test_import_options_name_mpp_and_val_fraction(tmp_path):
    src = make_masks(tmp_path / "src")
    report = import_dataset(
        "masks", src, tmp_path / "out", name="mine", mpp=0.3, val_fraction=0.34, seed=1
    )
    ds = Dataset(tmp_path / "out")
    assert ds.name == "mine" and ds.mpp == 0.3
    assert report.splits == {"train": 2, "val": 1}
    assert ds.meta["n_images"] == 3 and ds.meta["n_nuclei"] == report.n_nuclei == 6


def test_failure_after_good_images_leaves_nothing(tmp_path):
    src = make_masks(tmp_path / "src")
    (src / "masks" / "tif.tif").write_bytes(b"garbage")  # written after bin.png and inst.png
    with pytest.raises(KerasnucError, match="tif.tif: cannot read TIFF"):
        import_dataset("masks", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary folder left either


def test_existing_destination_is_kept_on_failure(tmp_path):
    src = make_masks(tmp_path / "src")
    import_dataset("masks", src, tmp_path / "out")
    with pytest.raises(KerasnucError, match="already exists"):
        import_dataset("masks", src, tmp_path / "out")
    (src / "masks" / "tif.tif").write_bytes(b"garbage")
    with pytest.raises(KerasnucError):
        import_dataset("masks", src, tmp_path / "out", overwrite=True)
    assert len(Dataset(tmp_path / "out")) == 3


def test_scan_rejects_unknown_format_and_options(tmp_path):
    assert set(FORMATS) == set(FORMAT_OPTIONS)
    with pytest.raises(ValueError, match="format"):
        scan("nope", tmp_path)
    with pytest.raises(ValueError, match="takes the options"):
        scan("monuseg", tmp_path, merge_classes=False)


def test_per_instance_classes_unclassified_nucleus():
    inst = np.array([[1, 1, 0, 4]])
    cls = np.array([[2, 0, 0, 0]])
    with pytest.raises(KerasnucError, match=r"src.png: 1 nucleus/nuclei without a class .*\[4\]"):
        per_instance_classes(inst, cls, "src.png")
