"""dataset_info on a hand-made dataset: every expected number is worked out in the comments."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from kerasnuc.data import Dataset, DatasetWriter
from kerasnuc.data.info import check_labels, dataset_info
from kerasnuc.fileutil import KerasnucError, write_json_atomic, write_png


def make_dataset(root, mpp=0.5):
    """Image a: 4x4 (train), image b: 4x6 (val); two classes."""
    img_a = np.empty((4, 4, 3), np.uint8)
    img_a[:] = (10, 20, 30)
    img_b = np.empty((4, 6, 3), np.uint8)
    img_b[:] = (30, 20, 50)
    inst_a = np.zeros((4, 4), np.int32)
    inst_a[0, 0:3] = 1  # 3 px, class 1
    inst_a[2:4, 2:4] = 2  # 4 px, class 2
    cls_a = np.zeros((4, 4), np.int32)
    cls_a[inst_a == 1] = 1
    cls_a[inst_a == 2] = 2
    inst_b = np.zeros((4, 6), np.int32)
    inst_b[1:3, 0:3] = 1  # 6 px, class 2
    cls_b = (inst_b > 0).astype(np.int32) * 2
    meta = {"mpp": mpp, "classes": {"1": "tumour", "2": "immune"}}
    with DatasetWriter(root, meta) as w:
        w.add("a", img_a, inst_a, cls_a, split="train")
        w.add("b", img_b, inst_b, cls_b, split="val")
    return root


def test_counts_per_split_and_class(tmp_path):
    info = dataset_info(make_dataset(tmp_path / "ds"))
    assert info["n_images"] == 2 and info["n_nuclei"] == 3
    assert info["classes"] == {"1": "tumour", "2": "immune"}
    assert info["splits"] == {
        "train": {"images": 1, "nuclei": 2, "classes": {"tumour": 1, "immune": 1}},
        "val": {"images": 1, "nuclei": 1, "classes": {"tumour": 0, "immune": 1}},
    }
    assert info["class_counts"] == [
        {"id": 1, "name": "tumour", "nuclei": 1, "images": 1, "fraction": pytest.approx(1 / 3)},
        {"id": 2, "name": "immune", "nuclei": 2, "images": 2, "fraction": pytest.approx(2 / 3)},
    ]
    assert info["images"]["sizes"] == {"4x4": 1, "4x6": 1}
    assert info["images"]["empty"] == 0
    assert info["images"]["nuclei_per_image"] == {"min": 1, "median": 1.5, "mean": 1.5, "max": 2}
    assert info["problems"] == []
    json.dumps(info)  # JSON-serialisable


def test_pixel_statistics(tmp_path):
    info = dataset_info(make_dataset(tmp_path / "ds"))
    # 16 pixels of (10, 20, 30) and 24 of (30, 20, 50): 40 pixels.
    # R: mean (16*10 + 24*30)/40 = 22; E[R^2] = (16*100 + 24*900)/40 = 580; var 580 - 484 = 96.
    # G: 20 everywhere; std 0.
    # B: mean (16*30 + 24*50)/40 = 42; E[B^2] = (16*900 + 24*2500)/40 = 1860; var 1860-1764 = 96.
    np.testing.assert_allclose(info["pixels"]["mean"], [22.0, 20.0, 42.0])
    np.testing.assert_allclose(info["pixels"]["std"], [math.sqrt(96), 0.0, math.sqrt(96)])


def test_nucleus_sizes(tmp_path):
    info = dataset_info(make_dataset(tmp_path / "ds", mpp=0.5))
    size = info["nucleus_size"]
    # Areas 3, 4, 6 px; um^2 = px * 0.5^2.
    assert size["area_px"] == {"min": 3, "median": 4, "mean": pytest.approx(13 / 3), "max": 6}
    assert size["area_um2"] == {
        "min": 0.75,
        "median": 1.0,
        "mean": pytest.approx(13 / 12),
        "max": 1.5,
    }
    d = [2 * math.sqrt(a / math.pi) for a in (3, 4, 6)]  # disc of the same area
    assert size["equivalent_diameter_px"]["min"] == pytest.approx(d[0])
    assert size["equivalent_diameter_px"]["median"] == pytest.approx(d[1])
    assert size["equivalent_diameter_px"]["mean"] == pytest.approx(sum(d) / 3)
    assert size["equivalent_diameter_um"]["max"] == pytest.approx(d[2] * 0.5)
    assert size["by_class"]["tumour"] == {"min": 3, "median": 3, "mean": 3, "max": 3}
    assert size["by_class"]["immune"]["mean"] == 5.0


def test_unknown_mpp_gives_no_micron_sizes(tmp_path):
    info = dataset_info(make_dataset(tmp_path / "ds", mpp=None))
    assert info["mpp"] is None
    assert info["nucleus_size"]["area_um2"] is None
    assert info["nucleus_size"]["equivalent_diameter_um"] is None


def test_validation_problems(tmp_path):
    root = make_dataset(tmp_path / "ds")
    inst = np.zeros((4, 6), np.uint16)
    inst[0, 0] = 1
    inst[3, 5] = 3  # ids 1 and 3: not consecutive
    write_png(root / "instances" / "b.png", inst)
    cls = np.zeros((4, 6), np.uint8)
    cls[0, 0] = 1
    cls[3, 5] = 5  # class 5 is not in meta.json
    write_png(root / "classes" / "b.png", cls)
    (root / "images" / "a.png").unlink()  # missing file
    write_png(root / "images" / "stray.png", np.zeros((2, 2, 3), np.uint8))  # not in splits
    info = dataset_info(Dataset(root))
    text = "\n".join(info["problems"])
    assert "a.png: file not found" in text
    assert "b.png: class id(s) [5] not in meta.json" in text
    assert "b.png: instance ids are not consecutive (2 nuclei, largest id 3)" in text
    assert "1 image(s) not listed in splits.csv (stray.png" in text
    assert "n_nuclei is 3 but the dataset has 2" in text
    assert len(info["problems"]) == 5
    # The readable image still counts.
    assert info["n_nuclei"] == 2 and info["splits"]["train"]["images"] == 1


def test_nucleus_with_two_classes_is_reported(tmp_path):
    root = make_dataset(tmp_path / "ds")
    meta = Dataset(root).meta
    cls = np.zeros((4, 6), np.uint8)
    cls[1:3, 0:3] = 2
    cls[1, 0] = 1
    write_png(root / "classes" / "b.png", cls)
    write_json_atomic(root / "meta.json", meta)
    problems = dataset_info(root)["problems"]
    assert problems == [
        f"{root / 'instances' / 'b.png'}: nucleus id(s) [1] have more than one class"
    ]


def test_check_labels_raises_the_first_problem_of_the_splits(tmp_path):
    """``check_labels`` (train's up-front check) raises what ``dataset_info`` reports."""
    root = make_dataset(tmp_path / "ds")
    check_labels([Dataset(root)], ["train", "val"])  # a consistent dataset passes
    cls = np.zeros((4, 6), np.uint8)
    cls[1:3, 0:3] = 2
    cls[1, 0] = 1  # nucleus 1 of b: classes 2 and 1
    write_png(root / "classes" / "b.png", cls)
    check_labels([Dataset(root)], ["train"])  # b is a val image
    with pytest.raises(KerasnucError) as info:
        check_labels([Dataset(root)], ["train", "val"])
    assert str(info.value) == dataset_info(root)["problems"][0]
    cls[1, 0] = 0  # a nucleus pixel without class
    write_png(root / "classes" / "b.png", cls)
    with pytest.raises(KerasnucError, match="b.png: class map must be 0 exactly where"):
        check_labels([Dataset(root)], ["val"])


def test_monuseg_kumar_is_fast(shared_data):
    t0 = time.perf_counter()
    info = dataset_info(shared_data / "monuseg_kumar")
    elapsed = time.perf_counter() - t0
    # Figures of ../shared/data/README.md.
    assert info["n_images"] == 30 and info["n_nuclei"] == 16492
    assert info["images"]["sizes"] == {"1000x1000": 30}
    assert info["problems"] == []
    assert info["nucleus_size"]["area_um2"] is not None
    assert elapsed < 30, f"dataset_info took {elapsed:.1f} s"
