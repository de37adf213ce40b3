"""``kerasnuc models`` (list, show, pack), ``predict demo`` and the new ``train`` flags."""

from __future__ import annotations

import json

import keras
import pytest
from click.testing import CliRunner

from kerasnuc import model_dirs
from kerasnuc.cli import main
from kerasnuc.cli.train import parse_dataset_mpp
from kerasnuc.config import DataConfig, RunConfig
from kerasnuc.fileutil import KerasnucError
from kerasnuc.runs import BEST_WEIGHTS, build_model, save_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    config = RunConfig(
        method="conic",
        model={"encoder": "efficientnet_b0", "num_classes": 1, "decoder_filters": [8] * 5},
        data=DataConfig(datasets=("somewhere",), mpp=0.5),
    )
    keras.utils.set_random_seed(0)
    model = build_model(config)
    path = tmp_path_factory.mktemp("run")
    model.save_weights(path / BEST_WEIGHTS)
    save_config(config, path)
    return path


class _NamedModels:
    """The named models of a test: ``named[name] = run_dir`` links it into a temporary
    ``BUNDLED_DIR`` (the package's own bundled folder is hidden)."""

    def __init__(self, folder):
        self.folder = folder
        folder.mkdir()

    def __setitem__(self, name, run_dir):
        (self.folder / name).symlink_to(run_dir, target_is_directory=True)


@pytest.fixture
def only_registered(monkeypatch, tmp_path):
    named = _NamedModels(tmp_path / "named_models")
    monkeypatch.setattr(model_dirs, "BUNDLED_DIR", named.folder)
    return named


def test_pack_then_list_and_show(run_dir, tmp_path, only_registered):
    card = tmp_path / "card.json"
    card.write_text(
        json.dumps(
            {
                "description": "demo",
                "licence": "CC0",
                "scores": {"kumar": {"aji": 0.612, "pq": 0.583}, "consep": {"mpq_plus": 0.25}},
            }
        )
    )
    runner = CliRunner()
    res = runner.invoke(
        main, ["models", "pack", str(run_dir), str(tmp_path / "mini"), "--card", str(card)]
    )
    assert res.exit_code == 0, res.output
    assert "float16" in res.output
    only_registered["default"] = tmp_path / "mini"
    only_registered["plain"] = run_dir
    res = runner.invoke(main, ["models"])
    assert res.exit_code == 0, res.output
    lines = [line.strip() for line in res.output.splitlines()]
    assert lines[0].split() == ["name", "method", "um/px", "classes", "validation"]
    default = next(line for line in lines if line.startswith("default"))
    assert "(default)" in default and "conic" in default and "0.5" in default
    assert "kumar: AJI 0.612, PQ 0.583" in default and "consep: MPQ+ 0.250" in default
    assert any(line.startswith("plain") for line in lines)
    res = runner.invoke(main, ["models", "--json"])
    cards = json.loads(res.output)
    assert cards["default"]["licence"] == "CC0" and cards["plain"]["licence"] is None
    res = runner.invoke(main, ["models", "show", "default"])
    assert json.loads(res.output)["name"] == "mini"


def test_models_errors_are_one_line(run_dir, tmp_path, only_registered):
    runner = CliRunner()
    res = runner.invoke(main, ["models"])
    assert res.exit_code == 0 and "no named models installed" in res.output
    res = runner.invoke(main, ["models", "show", "nothing"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: nothing: no such run directory, nor a bundled model (bundled: none installed)"
    ]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    res = runner.invoke(
        main, ["models", "pack", str(run_dir), str(tmp_path / "x"), "--card", str(bad)]
    )
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert str(bad) in res.output and "invalid JSON" in res.output
    assert not (tmp_path / "x").exists()


def test_predict_demo_runs_on_the_bundled_example_images(run_dir, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["predict", "demo", "--model", str(run_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    from kerasnuc.examples import example_images

    names = sorted(p.stem for p in example_images())
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names
    for name in names:
        assert (out / name / f"{name}.overlay.png").is_file()
        assert (out / name / f"{name}.geojson").is_file()


def test_parse_dataset_mpp(tmp_path):
    dirs = [tmp_path / "kumar", tmp_path / "dsb"]
    assert parse_dataset_mpp(("dsb=0.3",), dirs) == {"dsb": 0.3}
    assert parse_dataset_mpp((), dirs) == {}
    for bad in ("dsb", "dsb=x", "dsb=0", "dsb=-1", "dsb=1000", "dsb=1e-9", "dsb=nan"):
        with pytest.raises(KerasnucError, match="NAME=MPP"):
            parse_dataset_mpp((bad,), dirs)
    with pytest.raises(KerasnucError, match="not one of the --data folders"):
        parse_dataset_mpp(("other=0.5",), dirs)
