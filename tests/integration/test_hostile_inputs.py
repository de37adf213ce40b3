"""Hostile but realistic inputs through every command (issue 20).

Each bad input must give exit code 1 (2 for a bad option value), one line naming the file and
the problem, no traceback, and no partial output. Everything runs in-process through click's
CliRunner on 64 x 64 images with one tiny conic model built once per module.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from kerasnuc.cli import main
from kerasnuc.data.dataset import DatasetWriter
from kerasnuc.fileutil import write_png
from tests.integration.test_cli_train import disc_sample

CLASSES = {1: "a", 2: "b"}
SIZE = 64


def discs(seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy H&E-like image with 4 discs: ``(image, instances, classes)``, seeded."""
    return disc_sample(np.random.default_rng(seed), size)


def tiny_image(path: Path, seed: int = 0) -> Path:
    write_png(path, discs(seed)[0])
    return path


def tiny_run(path: Path) -> Path:
    """A random-init conic run folder: EfficientNet-B0, 8-filter decoder, classes a/b."""
    import keras

    from kerasnuc.config import DataConfig, RunConfig
    from kerasnuc.runs import build_model, save_config

    config = RunConfig(
        method="conic",
        model={"encoder": "efficientnet_b0", "num_classes": 2, "decoder_filters": [8] * 5},
        data=DataConfig(mpp=0.5, class_names=CLASSES),
    )
    keras.utils.set_random_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    build_model(config).save_weights(path / "model.weights.h5")
    save_config(config, path)
    return path


def write_dataset(root: Path, n_train: int = 2, n_val: int = 1) -> Path:
    meta = {"name": root.name, "mpp": 0.5, "classes": {str(k): v for k, v in CLASSES.items()}}
    with DatasetWriter(root, meta) as writer:
        for k in range(n_train + n_val):
            image, inst, cls = discs(k)
            writer.add(f"im{k}", image, inst, cls, split="train" if k < n_train else "val")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("hostile") / "run")


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "ds")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("Error:")]


def assert_one_line_error(res, name, code: int = 1, *, contains: str = "") -> str:
    """Exit ``code``, exactly one ``Error:`` line, naming ``name``, no traceback."""
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    errors = error_lines(res)
    assert len(errors) == 1, res.stderr
    assert str(name) in errors[0], errors[0]
    assert contains in errors[0], errors[0]
    return errors[0]


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files and folders that an interrupted atomic write would leave."""
    if not folder.exists():
        return []
    return sorted(str(p) for p in folder.rglob(".*") if ".tmp" in p.name or ".old" in p.name)


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits: sysfs)."""
    if os.geteuid() != 0:
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without sysfs: no unwritable folder to test with")
    return Path("/sys")


# Bad files ---------------------------------------------------------------------------------------


def bad_images(folder: Path) -> dict[str, Path]:
    """One bad image file of each kind, named after the problem."""
    folder.mkdir(parents=True, exist_ok=True)
    good = tiny_image(folder / "good.png").read_bytes()
    files = {
        "truncated": folder / "truncated.png",
        "empty": folder / "empty.png",
        "text_tif": folder / "text.tif",
        "nan_tif": folder / "nan.tif",
        "multiplex": folder / "multiplex.tif",
        "cmyk": folder / "cmyk.tif",
        "grey": folder / "grey.png",
    }
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["empty"].write_bytes(b"")
    files["text_tif"].write_text("this is not a TIFF\n")
    rgb = discs(1)[0]
    nan = rgb.astype(np.float32) / 255
    nan[10:20, 10:20] = np.nan
    tifffile.imwrite(files["nan_tif"], nan, photometric="rgb")
    planes = np.concatenate([rgb, rgb[:, :, :1]], axis=2)
    tifffile.imwrite(files["multiplex"], planes, photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(files["cmyk"], planes, photometric="separated")
    write_png(files["grey"], rgb[:, :, 0])
    (folder / "good.png").unlink()
    return files


# predict -----------------------------------------------------------------------------------------


def test_predict_reports_each_bad_file_and_keeps_going(tmp_path, run_dir):
    files = bad_images(tmp_path / "in")
    tiny_image(tmp_path / "in" / "ok.png")
    (tmp_path / "in" / "folder.png").mkdir()  # a folder named like an image: not an input
    out = tmp_path / "out"
    res = invoke("predict", tmp_path / "in", "--model", run_dir, "--out", out, "--format", "csv")
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    failed = res.stdout.split("Failed inputs:\n")[1].splitlines()
    assert len(failed) == len(files)  # one line per bad file
    for path in files.values():
        assert sum(line.startswith(f"  {path}: ") for line in failed) == 1, failed
    assert "NaN" in next(line for line in failed if "nan.tif" in line)
    assert "not RGB + alpha" in next(line for line in failed if "multiplex.tif" in line)
    assert "CMYK" in next(line for line in failed if "cmyk.tif" in line)
    assert "1 predicted, 0 already complete (--resume), 7 failed" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["ok"]  # nothing for the failed inputs
    assert leftovers(out) == []


@pytest.mark.parametrize("mpp", ["1000", "1e-9", "0", "nan"])
def test_implausible_pixel_sizes_are_usage_errors(tmp_path, mpp):
    """Issue 20, item 8: a typo in --mpp fails at once instead of running for minutes."""
    image = tiny_image(tmp_path / "a.png")
    for args in (
        ("predict", image, "--out", tmp_path / "out", "--mpp", mpp),
        ("train", "--data", tmp_path, "--out", tmp_path / "run", "--mpp", mpp),
        ("data", "import", "masks", tmp_path, tmp_path / "dst", "--mpp", mpp),
    ):
        assert_one_line_error(invoke(*args), "--mpp", code=2, contains="um/px")
    ds = write_dataset(tmp_path / "ds")
    res = invoke("train", "--data", ds, "--out", tmp_path / "run", "--dataset-mpp", f"ds={mpp}")
    assert_one_line_error(res, "--dataset-mpp", contains="0.02..50 um/px")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()
    assert not (tmp_path / "dst").exists()


def test_unwritable_output_is_one_line_before_any_work(tmp_path, run_dir):
    """Issue 20, item 9: a read-only --out is one line up front, not one OSError per input."""
    folder = unwritable_dir(tmp_path)
    images = [tiny_image(tmp_path / f"{k}.png", seed=k) for k in range(3)]
    out = folder / "predictions"
    res = invoke("predict", *images, "--model", run_dir, "--out", out)
    assert_one_line_error(res, out, contains="cannot write there")
    ds = write_dataset(tmp_path / "ds")
    cases = [
        (("train", "--data", ds, "--out", folder / "run"), folder / "run"),
        (("data", "import", "masks", tmp_path, folder / "dst"), folder / "dst"),
        (("evaluate", ds, ds, "--out", folder / "scores.json"), folder / "scores.json"),
        (("export", run_dir, "--name", "m", "--base", folder / "models"), folder / "models"),
    ]
    for args, named in cases:
        assert_one_line_error(invoke(*args), named, contains="cannot write there")
    file = tmp_path / "a_file"
    file.write_text("x")
    res = invoke("predict", images[0], "--model", run_dir, "--out", file)
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_outputs_follow_the_umask(tmp_path, run_dir):
    """Issue 20, item 7: predictions and datasets are 0644 / 0755 under umask 022, not 0600."""
    image = tiny_image(tmp_path / "a.png")
    old = os.umask(0o022)
    try:
        res = invoke("predict", image, "--model", run_dir, "--out", tmp_path / "out")
        assert res.exit_code == 0, res.output
        src = tmp_path / "src"
        (src / "images").mkdir(parents=True)
        (src / "masks").mkdir()
        tiny_image(src / "images" / "a.png")
        write_png(src / "masks" / "a.png", discs(0)[1].astype(np.uint16))
        res = invoke("data", "import", "masks", src, tmp_path / "ds")
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    for root in (tmp_path / "out", tmp_path / "ds"):
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


# data import -------------------------------------------------------------------------------------


def masks_source(root: Path, image: Path | None = None, mask: np.ndarray | None = None) -> Path:
    """``images/a.<ext>`` + ``masks/a.tif``: a good pair unless a bad image or mask is given."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    if image is None:
        tiny_image(root / "images" / "a.png")
    else:
        (root / "images" / f"a{image.suffix}").write_bytes(image.read_bytes())
    tifffile.imwrite(root / "masks" / "a.tif", discs(0)[1] if mask is None else mask)
    return root


def test_data_import_bad_images_and_masks(tmp_path):
    files = bad_images(tmp_path / "bad")
    for key, path in files.items():
        src = masks_source(tmp_path / f"src_{key}", image=path)
        dst = tmp_path / f"dst_{key}"
        res = invoke("data", "import", "masks", src, dst)
        assert_one_line_error(res, src / "images" / f"a{path.suffix}")
        assert not dst.exists() and leftovers(tmp_path) == []
    masks = {
        "negative": np.full((SIZE, SIZE), -3, np.int32),
        "rgb": np.zeros((SIZE, SIZE, 3), np.uint8),
        "fractional": np.full((SIZE, SIZE), 0.5, np.float32),
        "nan": np.full((SIZE, SIZE), np.nan, np.float32),
        "shape": np.ones((3, 3), np.uint16),
        "empty": np.zeros((SIZE, SIZE), np.uint16),  # no nucleus anywhere: nothing to import
    }
    for key, mask in masks.items():
        src = masks_source(tmp_path / f"srcm_{key}", mask=mask)
        dst = tmp_path / f"dstm_{key}"
        named = src if key == "empty" else src / "masks" / "a.tif"
        assert_one_line_error(invoke("data", "import", "masks", src, dst), named)
        assert not dst.exists() and leftovers(tmp_path) == []


def geojson_source(root: Path, text: str) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    tiny_image(root / "images" / "a.png")
    (root / "annotations" / "a.geojson").write_text(text)
    return root


def polygon(coordinates) -> str:
    return json.dumps(
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coordinates}}
    )


@pytest.mark.parametrize(
    "key, text, message",
    [
        ("broken", '{"type": "FeatureCollection", "features": [', "invalid JSON"),
        ("empty_coordinates", polygon([]), "no polygon with coordinates"),
        ("outside", polygon([[[500, 500], [510, 500], [510, 510], [500, 500]]]), "covers a pixel"),
        ("nan", polygon([[[float("nan"), 1], [2, 2], [3, 1], [1, 1]]]), "malformed Polygon"),
        ("string", polygon("abc"), "malformed Polygon"),
        ("not_geojson", json.dumps({"type": "Topology"}), "not a GeoJSON"),
    ],
)
def test_data_import_bad_geojson(tmp_path, key, text, message):
    """Issue 20, items 4 and 9: every bad GeoJSON is one line naming the file, nothing written."""
    src = geojson_source(tmp_path / "src", text)
    dst = tmp_path / "dst"
    res = invoke("data", "import", "geojson", src, dst)
    assert_one_line_error(res, src / "annotations" / "a.geojson", contains=message)
    assert not dst.exists() and leftovers(tmp_path) == []


def test_data_import_non_monuseg_xml(tmp_path):
    """Issue 20, item 4: a Pascal VOC XML given to the monuseg importer is not 0 nuclei."""
    src = tmp_path / "src"
    (src / "Annotations").mkdir(parents=True)
    tiny_image(src / "a.png")
    (src / "Annotations" / "a.xml").write_text(
        "<annotation><object><name>cell</name></object></annotation>"
    )
    res = invoke("data", "import", "monuseg", src, tmp_path / "dst")
    assert_one_line_error(res, src / "Annotations" / "a.xml", contains="not a MoNuSeg")
    assert not (tmp_path / "dst").exists()


# data info ---------------------------------------------------------------------------------------


def test_data_info_on_broken_datasets(tmp_path):
    ds = write_dataset(tmp_path / "broken_meta")
    (ds / "meta.json").write_text("{broken")
    assert_one_line_error(invoke("data", "info", ds), ds / "meta.json", contains="invalid JSON")
    ds = write_dataset(tmp_path / "no_splits")
    (ds / "splits.csv").unlink()
    assert_one_line_error(invoke("data", "info", ds), ds / "splits.csv")
    file = tmp_path / "file.png"
    file.write_bytes(b"")
    assert_one_line_error(invoke("data", "info", file), file)
    # A corrupt image is a problem that info lists (its job), naming the file.
    ds = write_dataset(tmp_path / "corrupt")
    (ds / "images" / "im1.png").write_bytes(b"\x89PNG\r\n")
    res = invoke("data", "info", ds)
    assert res.exit_code == 0 and f"{ds / 'images' / 'im1.png'}: cannot decode" in res.stdout


# train -------------------------------------------------------------------------------------------


TINY_CONFIG = {"model": {"decoder_filters": [8] * 5}, "pipeline": {"deterministic": True}}


def corrupt_classes(ds: Path, how: str) -> Path:
    """Break the class map of im0: disagreeing with the instances, two classes, unknown id."""
    _, inst, cls = discs(0)
    cls = cls.astype(np.uint8)
    if how == "disagrees":
        cls[inst == 0] = 1  # background with a class
    elif how == "two_classes":
        ys, xs = np.nonzero(inst == 1)
        cls[ys[0], xs[0]] = 3 - cls[ys[0], xs[0]]  # one pixel of nucleus 1 in the other class
    elif how == "unknown_class":
        cls[cls == 2] = 7  # not in meta.json
    write_png(ds / "classes" / "im0.png", cls)
    return ds


@pytest.mark.parametrize(
    "how, message",
    [
        ("disagrees", "class map must be 0 exactly where the instance map is 0"),
        ("two_classes", "have more than one class"),
        ("unknown_class", "class id(s) [7] not in meta.json classes [1, 2]"),
    ],
)
def test_train_refuses_inconsistent_labels_up_front(tmp_path, dataset, how, message):
    """Issue 20, items 6 and 9: bad labels stop train before the model is built or a file
    written (they trained silently, or failed later with a misleading shape error)."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "run"
    res = invoke(
        "train", "--data", corrupt_classes(dataset, how), "--out", out, "--config", config,
        "--epochs", "1", "--crop", "64", "--batch-size", "2",
    )  # fmt: skip
    assert_one_line_error(res, dataset / "instances" / "im0.png", contains=message)
    assert not out.exists() or not any(out.iterdir())  # no config.json: before the model


@pytest.mark.parametrize(
    "config, message",
    [
        ({"train": {"clip_norm": "ten"}}, "section 'train': `clip_norm` must be a number or null"),
        ({"train": {"learning_rate": "0.001"}}, "`learning_rate` must be a number"),
        ({"train": {"epochs": 0}}, "`epochs` must be >= 1"),
        ({"model": {"decoder_filters": "eight"}}, "`decoder_filters` must be a list of integers"),
        ({"pipeline": {"crop_size": "256"}}, "`crop_size` must be an integer"),
        ({"pipeline": {"dataset_weights": [1, 2]}}, "2 weight(s) for 1 --data folder(s)"),
        ({"pipeline": {"augment": {"flip_prob": "x"}}}, "`flip_prob` must be a number"),
        ({"data": {"mpp": 1000}}, "`mpp` must be a pixel size in 0.02..50 um/px"),
    ],
)
def test_train_config_errors_name_the_file_and_key(tmp_path, dataset, config, message):
    """Issue 20, item 9: wrong-typed or out-of-range values fail at once, naming file and key
    (a TensorFlow traceback after 50 s, or a message naming neither, before)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    res = invoke("train", "--data", dataset, "--out", out, "--config", path)
    assert_one_line_error(res, path, contains=message)
    assert not out.exists()


def test_train_on_a_corrupt_image(tmp_path, dataset):
    (dataset / "images" / "im1.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "run"
    res = invoke("train", "--data", dataset, "--out", out, "--epochs", "1")
    assert_one_line_error(res, dataset / "images" / "im1.png", contains="cannot decode")


# evaluate ----------------------------------------------------------------------------------------


def test_evaluate_skips_bad_prediction_files(tmp_path, dataset):
    """Issue 20, item 9: negative or >= 2^31 ids are skipped naming the file (a traceback
    before); when nothing can be scored, one error line."""
    pred = tmp_path / "pred"
    bad = {
        "im0": np.full((SIZE, SIZE), -4, np.int32),
        "im1": np.full((SIZE, SIZE), 2**31, np.int64),
        "im2": np.zeros((SIZE, SIZE), np.float32),
    }
    for id, arr in bad.items():
        (pred / id).mkdir(parents=True)
        tifffile.imwrite(pred / id / f"{id}.instances.ome.tif", arr, ome=False)
    res = invoke("evaluate", pred, dataset, "--out", tmp_path / "scores.json")
    assert_one_line_error(res, "nothing could be scored")
    skipped = [line for line in res.stderr.splitlines() if line.startswith("Skipped")]
    assert len(skipped) == 3
    for id in bad:
        path = pred / id / f"{id}.instances.ome.tif"
        assert any(line.startswith(f"Skipped {id}: {path}: ") for line in skipped), skipped
    assert "ids must lie in 0..2^31-1; got -4..-4" in skipped[0]
    assert f"got {2**31}..{2**31}" in skipped[1]
    assert not (tmp_path / "scores.json").exists()
    # One good prediction: scored, the bad ones listed, exit 0.
    inst = discs(2)[1]
    tifffile.imwrite(pred / "im2" / "im2.instances.ome.tif", inst, ome=False)
    res = invoke("evaluate", pred, dataset, "--json")
    assert res.exit_code == 0, res.output
    assert [s["id"] for s in json.loads(res.stdout)["skipped"]] == ["im0", "im1"]


# tune and export ---------------------------------------------------------------------------------


def run_copy(run_dir: Path, dst: Path, **changes) -> Path:
    """A copy of the tiny run with config.json sections updated (``model={...}``, ...)."""
    import shutil

    shutil.copytree(run_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    for section, values in changes.items():
        config[section] = {**config[section], **values}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_tune_and_export_on_broken_runs(tmp_path, run_dir, dataset):
    """Issue 20, item 9: config/weights mismatch is one line naming the run (87 KB of tensors
    before); a wrong-typed config.json names the file and the key."""
    wider = run_copy(run_dir, tmp_path / "wider", model={"decoder_filters": [16] * 5})
    base = tmp_path / "models"
    for args in (
        ("tune", wider, "--data", dataset),
        ("export", wider, "--name", "m", "--base", base),
    ):
        line = assert_one_line_error(invoke(*args), wider, contains="does not match the weights")
        assert len(line) < 400
    typed = run_copy(run_dir, tmp_path / "typed", train={"clip_norm": "ten"})
    res = invoke("tune", typed, "--data", dataset)
    assert_one_line_error(res, typed / "config.json", contains="`clip_norm` must be a number")
    assert not (typed / "postproc.json").exists()
    text = run_copy(run_dir, tmp_path / "text")
    (text / "model.weights.h5").write_text("not an HDF5 file")
    res = invoke("export", text, "--name", "m", "--base", base)
    assert_one_line_error(res, text / "model.weights.h5", contains="cannot read the weights")
    grid = tmp_path / "grid.json"
    grid.write_text("{bad")
    res = invoke("tune", run_dir, "--data", dataset, "--grid", grid)
    assert_one_line_error(res, grid, contains="invalid JSON")
    assert not base.exists() or not any(base.rglob("*"))  # no half-exported version
