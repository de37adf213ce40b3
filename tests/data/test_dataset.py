import json

import numpy as np
import pytest

from kerasnuc.data.dataset import Dataset, DatasetWriter, relabel_consecutive
from kerasnuc.fileutil import KerasnucError, read_image


def _sample(h=8, w=10):
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 200
    inst = np.zeros((h, w), np.int32)
    inst[1:3, 1:3] = 7
    inst[5:7, 5:9] = 3
    cls = np.where(inst == 7, 2, np.where(inst == 3, 1, 0))
    return img, inst, cls


META = {"name": "toy", "mpp": 0.5, "classes": {"1": "tumour", "2": "lymphocyte"}}


def test_relabel_consecutive_keeps_order():
    inst = np.array([[0, 7, 7], [3, 0, 9]])
    np.testing.assert_array_equal(relabel_consecutive(inst), [[0, 2, 2], [1, 0, 3]])
    np.testing.assert_array_equal(relabel_consecutive(np.array([[5, 5]])), [[1, 1]])


def test_write_then_read_round_trip(tmp_path):
    img, inst, cls = _sample()
    with DatasetWriter(tmp_path / "ds", META) as w:
        w.add("a", img, inst, cls, split="train")
        w.add("b", img, np.zeros_like(inst), np.zeros_like(cls), split="val")
    ds = Dataset(tmp_path / "ds")
    assert ds.ids == ["a", "b"]
    assert ds.split("val") == ["b"]
    assert ds.class_names == {1: "tumour", 2: "lymphocyte"}
    assert ds.num_classes == 2 and ds.has_classes and ds.mpp == 0.5
    s = ds.sample("a")
    np.testing.assert_array_equal(s.image, img)
    # ids relabelled by order: 3 -> 1, 7 -> 2
    assert set(np.unique(s.instances)) == {0, 1, 2}
    np.testing.assert_array_equal(s.instances == 2, inst == 7)
    np.testing.assert_array_equal(s.classes, cls)
    assert s.instances.dtype == np.int32
    assert read_image(ds.instances_path("a")).dtype == np.uint16
    lab = ds.label("a")
    assert lab.shape == (8, 10, 2)
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["n_images"] == 2 and meta["n_nuclei"] == 2
    ds.validate("a")


def test_failed_write_leaves_nothing(tmp_path):
    img, inst, cls = _sample()
    with pytest.raises(KerasnucError, match="bad.png: class id"):
        with DatasetWriter(tmp_path / "ds", META) as w:
            w.add("a", img, inst, cls)
            w.add("b", img, inst, np.where(cls > 0, 5, 0), source="bad.png")
    assert not (tmp_path / "ds").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda i, n, c: (i[:, :5], n, c), "does not match image"),
        (lambda i, n, c: (i.astype(np.float32), n, c), "must be uint8"),
        (lambda i, n, c: (i, n.astype(np.float32), c), "must be integer"),
        (lambda i, n, c: (i, n, np.where(n > 0, 1, 1)), "0 exactly where"),
        (
            lambda i, n, c: (i, n, np.where(n > 0, 1 + (np.arange(n.shape[1]) % 2), 0)),
            "more than one class",
        ),
    ],
)
def test_writer_rejects_bad_samples(tmp_path, mutate, message):
    img, inst, cls = mutate(*_sample())
    with pytest.raises(KerasnucError, match=message):
        with DatasetWriter(tmp_path / "ds", META) as w:
            w.add("x", img, inst, cls, source="x.png")
    assert not (tmp_path / "ds").exists()


def test_existing_destination_needs_overwrite(tmp_path):
    img, inst, cls = _sample()
    with DatasetWriter(tmp_path / "ds", META) as w:
        w.add("a", img, inst, cls)
    with pytest.raises(KerasnucError, match="already exists"):
        with DatasetWriter(tmp_path / "ds", META) as w:
            w.add("b", img, inst, cls)
    with DatasetWriter(tmp_path / "ds", META, overwrite=True) as w:
        w.add("b", img, inst, cls)
    assert Dataset(tmp_path / "ds").ids == ["b"]


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(KerasnucError, match="not found"):
        Dataset(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(KerasnucError, match="meta.json: missing"):
        Dataset(tmp_path / "d")
    (tmp_path / "d" / "meta.json").write_text("{not json")
    with pytest.raises(KerasnucError, match="meta.json: invalid JSON"):
        Dataset(tmp_path / "d")
    (tmp_path / "d" / "meta.json").write_text('{"classes": null}')
    (tmp_path / "d" / "splits.csv").write_text("name,x\na,b\n")
    with pytest.raises(KerasnucError, match="splits.csv: header"):
        Dataset(tmp_path / "d")
    (tmp_path / "d" / "splits.csv").write_text("id,split\na,train\n")
    ds = Dataset(tmp_path / "d")
    with pytest.raises(KerasnucError, match=r"images/a.png: file not found"):
        ds.image("a")
    (tmp_path / "d" / "images").mkdir()
    (tmp_path / "d" / "images" / "a.png").write_bytes(b"garbage")
    with pytest.raises(KerasnucError, match=r"a.png: cannot decode"):
        ds.image("a")
    with pytest.raises(KerasnucError, match="unknown image id"):
        ds.image("zzz")
    with pytest.raises(KerasnucError, match="no images in split"):
        ds.split("test")


def test_shared_datasets_read(shared_data):
    consep = Dataset(shared_data / "consep")
    assert consep.class_names == {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle"}
    assert len(consep.split("train")) == 352 and len(consep.split("val")) == 80
    s = consep.sample(consep.split("train")[0])
    assert s.image.shape == (256, 256, 3) and s.image.dtype == np.uint8
    assert ((s.classes == 0) == (s.instances == 0)).all()
    kumar = Dataset(shared_data / "monuseg_kumar")
    assert not kumar.has_classes and kumar.classes(kumar.ids[0]) is None
    assert kumar.mpp == 0.25 and len(kumar) == 30
    assert kumar.instances(kumar.ids[0]).shape == (1000, 1000)


def test_assumed_mpp_overrides_meta_and_drives_resampling(shared_data):
    from kerasnuc.config import DataConfig
    from kerasnuc.data.pipeline import load_items

    root = shared_data / "dsb2018_histology"
    assert Dataset(root).mpp is None  # DSB-2018 states no pixel size
    ds = Dataset(root, mpp=0.5)
    assert ds.mpp == 0.5
    # 0.5 um/px resampled to 0.25 um/px doubles each side: 256x320 -> 512x640.
    items, _ = load_items([ds], "val", target_mpp=0.25)
    assert len(items) == 16
    assert {it.image.shape for it in items} == {(512, 640, 3)}
    # Without an assumed size the resampling cannot be done and says why.
    with pytest.raises(KerasnucError, match="no mpp"):
        load_items([Dataset(root)], "val", target_mpp=0.25)
    # The run config keeps the assumption by folder name.
    data = DataConfig(dataset_mpp={"dsb2018_histology": 0.5})
    assert DataConfig.from_dict(data.to_dict()) == data
    assert data.assumed_mpp(root) == 0.5
    assert data.assumed_mpp(shared_data / "consep") is None
    with pytest.raises(ValueError, match="dataset_mpp"):
        DataConfig(dataset_mpp={"x": 0})
    with pytest.raises(KerasnucError, match="assumed pixel size"):
        Dataset(root, mpp=-1)
