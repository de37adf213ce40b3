"""Fine-tuning a model on a user's QuPath data: classes are matched by name, never swapped.

``data import geojson`` without ``--classes`` numbers the classes alphabetically (epithelial,
inflammatory, other, spindle); the bundled ``default`` model's order is other, inflammatory,
epithelial, spindle. ``train --init-from default`` must either map the classes by name (permute
the classifier's channels) or refuse with one line; it must never swap cell types silently.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kerasnuc.cli import main
from kerasnuc.data.dataset import Dataset
from kerasnuc.fileutil import write_png
from kerasnuc.runs import load_config, load_run, resolve_model

DEFAULT_ORDER = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle"}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def write_qupath(root, names, size=64, seed=0):
    """One ``size`` x ``size`` tile with one 10 x 10 px detection per class name (QuPath export)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    image = rng.integers(180, 230, (size, size, 3)).astype(np.uint8)
    features = []
    for i, name in enumerate(names):
        x0, y0 = 4 + 14 * (i % 4), 6 + 28 * (i // 4)
        image[y0 : y0 + 10, x0 : x0 + 10] = (90, 40, 150)
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [square(x0, y0, x0 + 10, y0 + 10)]},
                "properties": {"objectType": "detection", "classification": {"name": name}},
            }
        )
    write_png(root / "images" / "tile.png", image)
    collection = {"type": "FeatureCollection", "features": features}
    (root / "annotations" / "tile.geojson").write_text(json.dumps(collection))
    return root


def import_geojson(src, dst, *options):
    result = invoke("data", "import", "geojson", src, dst, "--mpp", "0.25", *options)
    assert result.exit_code == 0, result.output
    return Dataset(dst)


@pytest.mark.slow
def test_finetune_default_on_alphabetical_qupath_classes_maps_them_by_name(tmp_path):
    names = ["spindle", "other", "epithelial", "inflammatory"]
    data = import_geojson(write_qupath(tmp_path / "qupath", names), tmp_path / "data")
    alphabetical = {1: "epithelial", 2: "inflammatory", 3: "other", 4: "spindle"}
    assert data.class_names == alphabetical
    run = tmp_path / "run"
    # One step at a learning rate far too small to move the weights: what comes out of the
    # classifier is what --init-from loaded.
    result = invoke("train", "--init-from", "default", "--data", tmp_path / "data", "--out", run,
                    "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1", "--crop", "64",
                    "--lr", "1e-12", "--seed", "0", "--no-importance-sampling")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "classifier is reordered by name to the data's ids (1 epithelial," in result.output
    config = load_config(run)
    default = load_run(resolve_model("default"))
    # The run keeps the data's ids and names; the architecture and resolution are the
    # default's; the colours stay with the names.
    assert config.method == "conic" and config.data.class_names == alphabetical
    assert {k: v for k, v in config.model.items() if k != "num_classes"} == {
        k: v for k, v in default.config.model.items() if k != "num_classes"
    }
    assert config.data.mpp == 0.25 and config.train.init_from == "default"
    # The default's strong stain augmentation comes along (stain changes on half the crops,
    # JPEG on 30 %; a new run's defaults have neither).
    augment = config.pipeline["augment"]
    assert augment == default.config.pipeline["augment"]
    assert (augment["stain_prob"], augment["jpeg_prob"]) == (0.5, 0.3)
    by_name = {v: k for k, v in default.config.data.class_names.items()}
    for k, name in alphabetical.items():
        assert config.data.class_colours[k] == default.config.data.class_colours[by_name[name]]
    # The tuned thresholds of the default come along.
    assert json.loads((run / "postproc.json").read_text()) == json.loads(
        (resolve_model("default") / "postproc.json").read_text()
    )
    # Channel k of the fine-tuned classifier is the default's channel of the same name.
    tuned = load_run(run).model.get_layer("semantic_logits").get_weights()
    source = default.model.get_layer("semantic_logits").get_weights()
    order = [0] + [by_name[alphabetical[k]] for k in range(1, 5)]
    assert order == [0, 3, 2, 1, 4]
    for got, want in zip(tuned, source, strict=True):
        np.testing.assert_allclose(got, want[..., order], atol=1e-5)
        assert np.abs(got - want).max() > 1e-2  # not the unpermuted channels


def test_finetune_refuses_other_class_names_in_one_line(tmp_path):
    data = import_geojson(write_qupath(tmp_path / "qupath", ["tumour", "stroma"]), tmp_path / "d")
    assert data.class_names == {1: "stroma", 2: "tumour"}
    run = tmp_path / "run"
    result = invoke("train", "--init-from", "default", "--data", tmp_path / "d", "--out", run,
                    "--epochs", "1", "--steps-per-epoch", "1", "--crop", "64")  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "1 other, 2 inflammatory, 3 epithelial, 4 spindle" in lines[0]
    assert "1 stroma, 2 tumour" in lines[0] and "--classes-from default" in lines[0]
    assert not run.exists()


def test_import_classes_from_a_model_uses_its_order(tmp_path):
    names = ["spindle", "other", "epithelial", "inflammatory"]
    src = write_qupath(tmp_path / "qupath", names)
    data = import_geojson(src, tmp_path / "data", "--classes-from", "default")
    assert data.class_names == DEFAULT_ORDER
    # The square of "epithelial" (the third feature) has the default's id 3.
    inst, cls = data.instances("tile"), data.classes("tile")
    x0, y0 = 4 + 14 * 2, 6
    assert cls[y0 + 5, x0 + 5] == 3 and inst[y0 + 5, x0 + 5] > 0
    assert sorted(np.unique(cls[inst > 0]).tolist()) == [1, 2, 3, 4]
    # A name the model does not know: one line naming the file, the class and the model's names.
    bad = write_qupath(tmp_path / "bad", ["other", "tumour"])
    result = invoke("data", "import", "geojson", bad, tmp_path / "bad_out", "--classes-from",
                    "default")  # fmt: skip
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "'tumour'" in result.output and "tile.geojson" in result.output
    result = invoke("data", "import", "geojson", src, tmp_path / "x", "--classes", "a",
                    "--classes-from", "default")  # fmt: skip
    assert result.exit_code == 2 and "--classes" in result.output
