"""``kerasnuc evaluate`` end to end on tiny synthetic datasets and two real CoNSeP patches."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from kerasnuc.cli import evaluate as evaluate_module
from kerasnuc.cli import main
from kerasnuc.data.dataset import Dataset, DatasetWriter
from kerasnuc.fileutil import write_png
from kerasnuc.metrics import DEFAULT_MAX_DIST

CLASSES = {"1": "small", "2": "large"}


def square_maps(shape, squares):
    """Instance and class maps with ``(id, class, r0, c0, size)`` squares."""
    inst = np.zeros(shape, np.int32)
    cls = np.zeros(shape, np.int32)
    for i, c, r0, c0, n in squares:
        inst[r0 : r0 + n, c0 : c0 + n] = i
        cls[r0 : r0 + n, c0 : c0 + n] = c
    return inst, cls


# Image "a": an 8x8 nucleus of class 1 and a 10x10 one of class 2; image "b": one 10x10 class 2.
GT_SQUARES = {
    "a": [(1, 1, 2, 2, 8), (2, 2, 14, 16, 10)],
    "b": [(1, 2, 5, 5, 10)],
}


@pytest.fixture
def tiny(tmp_path):
    """A 2-image dataset with classes, and a prediction folder of its 1-px eroded squares."""
    gt_root = tmp_path / "gt"
    with DatasetWriter(gt_root, meta={"name": "tiny", "classes": CLASSES}) as w:
        for id, squares in GT_SQUARES.items():
            inst, cls = square_maps((32, 32), squares)
            w.add(id, np.full((32, 32, 3), 128, np.uint8), inst, cls, split="val")
    pred = tmp_path / "pred"
    for id, squares in GT_SQUARES.items():
        # Erosion by one pixel of an n x n square is the (n-2) x (n-2) square inside it;
        # ids are scrambled (non-consecutive) on purpose.
        eroded = [(7 * i + 300, c, r0 + 1, c0 + 1, n - 2) for i, c, r0, c0, n in squares]
        inst, cls = square_maps((32, 32), eroded)
        write_png(pred / "instances" / f"{id}.png", inst.astype(np.uint16))
        write_png(pred / "classes" / f"{id}.png", cls.astype(np.uint8))
    return gt_root, pred


def run(args):
    res = CliRunner().invoke(main, ["evaluate", *map(str, args)])
    return res


def test_ground_truth_against_itself(tiny):
    gt_root, _ = tiny
    res = run([gt_root, gt_root, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    s = out["summary"]
    for key in ("pq", "dq", "sq", "aji", "aji_plus", "pixel_f1", "obj_dice", "det_f1", "mpq"):
        assert s[key] == 1.0, key
    assert s["obj_hausdorff"] == 0.0
    assert s["mpq_plus"] == 1.0 and s["r2"] == 1.0 and s["ccc"] == 1.0
    assert [r["id"] for r in out["images"]] == ["a", "b"]
    assert out["skipped"] == []
    assert out["classes"] == {"1": "small", "2": "large"}


def test_eroded_prediction_matches_hand_computation(tiny, tmp_path):
    gt_root, pred = tiny
    out_file = tmp_path / "res" / "scores.json"
    res = run([pred, gt_root, "--split", "val", "--json", "--out", out_file])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert json.loads(out_file.read_text()) == out
    a, b = out["images"]
    # IoU of an n x n square and its eroded (n-2) x (n-2) core: 36/64 (n=8), 64/100 (n=10).
    iou8, iou10 = 36 / 64, 64 / 100
    assert (a["tp"], a["fp"], a["fn"]) == (2, 0, 0)
    assert a["sq"] == pytest.approx((iou8 + iou10) / 2)
    assert a["pq"] == pytest.approx((iou8 + iou10) / 2)
    assert a["aji"] == pytest.approx((36 + 64) / (64 + 100))
    assert a["aji_plus"] == pytest.approx((36 + 64) / (64 + 100))
    assert a["pixel_f1"] == pytest.approx(2 * 100 / (164 + 100))
    dice8, dice10 = 2 * 36 / (64 + 36), 2 * 64 / (100 + 64)
    gt_side = (64 * dice8 + 100 * dice10) / 164
    pred_side = (36 * dice8 + 64 * dice10) / 100
    assert a["obj_dice"] == pytest.approx((gt_side + pred_side) / 2)
    # A corner pixel of the square is sqrt(2) from the eroded core, every other pixel closer.
    assert a["obj_hausdorff"] == pytest.approx(math.sqrt(2))
    assert a["det_f1"] == 1.0  # same centroids
    assert a["pq_c1"] == pytest.approx(iou8) and a["pq_c2"] == pytest.approx(iou10)
    assert a["mpq"] == pytest.approx((iou8 + iou10) / 2)
    assert b["pq"] == pytest.approx(iou10) and b["aji"] == pytest.approx(iou10)
    assert b["pq_c1"] is None  # class 1 absent from the ground truth of "b": skipped (null)
    s = out["summary"]
    assert s["pq"] == pytest.approx(((iou8 + iou10) / 2 + iou10) / 2)
    # mPQ+: class 1 pools one match (iou8), class 2 two (iou10 each).
    assert s["pq_plus_c1"] == pytest.approx(iou8)
    assert s["pq_plus_c2"] == pytest.approx(iou10)
    assert s["mpq_plus"] == pytest.approx((iou8 + iou10) / 2)
    assert s["r2"] == 1.0 and s["ccc"] == 1.0  # counts are exact
    # Pixel classes: class 2 keeps 64 + 64 of 100 + 100 pixels, predicts no other pixel.
    assert s["iou_pooled_c2"] == pytest.approx(128 / 200)


def test_table_output(tiny):
    gt_root, pred = tiny
    res = run([pred, gt_root])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["id", "n_gt", "n_pred", "PQ"]
    all_row = next(line for line in lines if line.strip().startswith("ALL"))
    assert all_row.split()[1:3] == ["3", "3"]
    assert any(line.startswith("mPQ+ 0.601") for line in lines)  # (36/64 + 64/100) / 2


def test_skipped_images_are_reported(tiny, tmp_path):
    gt_root, _ = tiny
    pred = tmp_path / "partial"
    inst, _ = square_maps((32, 32), GT_SQUARES["a"])
    write_png(pred / "instances" / "a.png", inst.astype(np.uint16))
    res = run([pred, gt_root, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [r["id"] for r in out["images"]] == ["a"]
    assert [s["id"] for s in out["skipped"]] == ["b"]
    assert "no prediction" in out["skipped"][0]["reason"]
    assert "Skipped b: no prediction" in res.stderr
    assert "scoring instances only" in res.stderr  # no classes/ folder in the prediction
    assert "mpq_plus" not in out["summary"]

    # Unreadable and mismatched files: nothing left to score -> error exit.
    (pred / "instances" / "a.png").write_bytes(b"not a png")
    write_png(pred / "instances" / "b.png", np.zeros((16, 16), np.uint16))
    res = run([pred, gt_root])
    assert res.exit_code == 1
    assert "Skipped a:" in res.stderr and "cannot decode" in res.stderr
    assert "Skipped b:" in res.stderr and "does not match the ground truth" in res.stderr
    assert "nothing could be scored: 2 of 2" in res.output


def test_user_errors(tiny, tmp_path):
    gt_root, pred = tiny
    res = run([tmp_path / "nope", gt_root])
    assert res.exit_code == 1 and "nope" in res.output
    res = run([pred, gt_root, "--split", "test"])
    assert res.exit_code == 1 and "no images in split 'test'" in res.output
    (pred / "meta.json").write_text(json.dumps({"classes": {"1": "a", "5": "b"}}))
    res = run([pred, gt_root])
    assert res.exit_code == 1 and "differ from the ground truth" in res.output
    assert evaluate_module.DEFAULT_MAX_DIST == DEFAULT_MAX_DIST


def test_real_consep_patches_against_themselves(shared_data, tmp_path):
    ds = Dataset(shared_data / "consep")
    ids = ds.split("val")[:2]
    pred = tmp_path / "pred"
    for id in ids:
        write_png(pred / "instances" / f"{id}.png", ds.instances(id).astype(np.uint16))
        write_png(pred / "classes" / f"{id}.png", ds.classes(id).astype(np.uint8))
    res = run([pred, shared_data / "consep", "--split", "val", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [r["id"] for r in out["images"]] == ids
    assert len(out["skipped"]) == len(ds.split("val")) - 2
    s = out["summary"]
    assert s["n_gt"] == s["n_pred"] > 0
    for key in ("pq", "aji", "aji_plus", "pixel_f1", "obj_dice", "det_f1", "mpq", "mpq_plus"):
        assert s[key] == 1.0, key
    assert s["r2"] == 1.0 and s["ccc"] == 1.0 and s["obj_hausdorff"] == 0.0
    assert s["miou_pooled"] == 1.0


def test_evaluate_does_not_import_tensorflow(tiny):
    gt_root, pred = tiny
    code = (
        "import sys; from click.testing import CliRunner; from kerasnuc.cli import main; "
        f"r = CliRunner().invoke(main, ['evaluate', {str(pred)!r}, {str(gt_root)!r}]); "
        "assert r.exit_code == 0, r.output; "
        "print([m for m in ('tensorflow', 'keras') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_reads_the_output_folders_of_predict(tiny, tmp_path):
    """PRED may be a 'kerasnuc predict' output: <id>/<id>.instances.ome.tif (+ classes)."""
    from kerasnuc.io.masks import write_class_tiff, write_instance_tiff

    gt_root, pred = tiny
    out = tmp_path / "predict_out"
    for id in GT_SQUARES:
        inst = Dataset(pred.parent / "gt").instances(id)  # the ground truth itself
        cls = Dataset(pred.parent / "gt").classes(id)
        write_instance_tiff(out / id / f"{id}.instances.ome.tif", inst)
        write_class_tiff(out / id / f"{id}.classes.ome.tif", cls)
    res = run([out, gt_root, "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)["summary"]
    assert s["pq"] == 1.0 and s["mpq_plus"] == 1.0
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run([empty, gt_root])
    assert res.exit_code == 1 and "no predictions found" in res.output
