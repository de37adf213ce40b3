"""Prediction on onnxruntime: the same nuclei as Keras, no TensorFlow, stale graphs refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from kerasnuc.cli import main
from kerasnuc.data.dataset import Dataset
from kerasnuc.examples import example_dataset
from kerasnuc.fileutil import KerasnucError
from kerasnuc.inference.onnx_predictor import OnnxPredictor, onnx_unusable_reason
from kerasnuc.runs import resolve_model

pytest.importorskip("onnxruntime", reason="the onnx engine needs onnxruntime")

DEMO_IDS = ["5d75a63972ef", "2dd3356f2dcf"]


@pytest.fixture(scope="module")
def default_dir():
    return resolve_model(None)


def test_bundled_default_has_a_current_graph(default_dir):
    assert onnx_unusable_reason(default_dir) is None
    OnnxPredictor.from_run_dir(default_dir)  # the recorded weights digest matches


def test_same_maps_and_nuclei_as_keras(default_dir):
    from kerasnuc.inference.predictor import Predictor

    demo = Dataset(example_dataset("demo"))
    images = np.stack([demo.sample(i).image[:256, :256] for i in DEMO_IDS])
    fast = OnnxPredictor.from_run_dir(default_dir, batch_size=1, precision="float32")
    keras_predictor = Predictor.from_run_dirs(default_dir)
    got, expected = fast.predict_maps_batch(images), keras_predictor.predict_maps_batch(images)
    assert set(got) == set(expected)
    for name in expected:
        # float16 weights on both sides, float32 arithmetic in different libraries
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=0)
    for a, b in zip(
        fast.predict_instances_batch(images),
        keras_predictor.predict_instances_batch(images),
        strict=True,
    ):
        np.testing.assert_array_equal(a.instances, b.instances)
        np.testing.assert_array_equal(a.classes, b.classes)
    assert fast.mpp == keras_predictor.mpp == 0.25
    assert fast.fingerprint()["engine"] == "onnxruntime"


def test_views_are_the_mean_of_the_flipped_back_maps_as_with_keras(default_dir):
    from kerasnuc.inference.predictor import Predictor

    demo = Dataset(example_dataset("demo"))
    images = np.stack([demo.sample(i).image[:200, :232] for i in DEMO_IDS])
    plain = OnnxPredictor.from_run_dir(default_dir, views=1, precision="float32")
    two = OnnxPredictor.from_run_dir(default_dir, views=2, precision="float32")
    flat = plain.predict_maps_batch(images)
    mirrored = plain.predict_maps_batch(images[:, :, ::-1])
    got = two.predict_maps_batch(images)
    for name in ("semantic", "three_label"):
        np.testing.assert_allclose(
            got[name], (flat[name] + mirrored[name][:, :, ::-1]) / 2, atol=1e-6, rtol=0
        )
    # The mirror image's column vectors point the other way.
    np.testing.assert_allclose(
        got["vectors"][..., 1],
        (flat["vectors"][..., 1] - mirrored["vectors"][:, :, ::-1, 1]) / 2,
        atol=1e-5,
        rtol=0,
    )
    expected = Predictor.from_run_dirs(default_dir, views=2).predict_maps_batch(images)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=0)
    assert two.fingerprint() != plain.fingerprint()


def test_int8_graph_finds_the_float_graphs_nuclei(default_dir):
    """The bundled 8-bit graph against the float graph it was made from: the float graph's
    nuclei serve as ground truth, scored by the definitions in kerasnuc.metrics."""
    from kerasnuc.metrics.evaluation import evaluate_pair

    assert onnx_unusable_reason(default_dir, precision="int8") is None
    demo = Dataset(example_dataset("demo"))
    images = np.stack([demo.sample(i).image[:256, :256] for i in DEMO_IDS])
    exact = OnnxPredictor.from_run_dir(default_dir, views=1, precision="float32")
    rounded = OnnxPredictor.from_run_dir(default_dir, views=1, precision="int8")
    assert rounded.precision == "int8" and exact.fingerprint() != rounded.fingerprint()
    from kerasnuc.inference.onnx_predictor import cpu_has_vnni

    if not cpu_has_vnni():
        pytest.skip("int8 accuracy is claimed only on CPUs with VNNI (see cpu_has_vnni)")
    for a, b in zip(
        exact.predict_instances_batch(images), rounded.predict_instances_batch(images), strict=True
    ):
        scores = evaluate_pair(a.instances, b.instances, hausdorff=False)
        assert scores["n_gt"] > 20
        assert scores["det_f1"] > 0.9 and scores["pq"] > 0.75, scores


def test_graph_choice_follows_the_config_and_falls_back_to_float(
    default_dir, tmp_path, monkeypatch
):
    from kerasnuc.inference import onnx_predictor
    from kerasnuc.inference.onnx_predictor import graph_file, load_engine_predictor

    monkeypatch.setattr(onnx_predictor, "cpu_has_vnni", lambda: True)
    assert graph_file(default_dir).name == "model.int8.onnx"  # the bundled config asks for it
    assert graph_file(default_dir, "float32").name == "model.onnx"
    monkeypatch.setattr(onnx_predictor, "cpu_has_vnni", lambda: False)
    assert graph_file(default_dir).name == "model.onnx"  # no VNNI: the float graph
    assert graph_file(default_dir, "int8").name == "model.int8.onnx"  # unless asked for
    monkeypatch.setattr(onnx_predictor, "cpu_has_vnni", lambda: True)
    run = tmp_path / "run"
    shutil.copytree(default_dir, run)
    (run / "model.int8.onnx").unlink()
    assert graph_file(run).name == "model.onnx"  # no int8 graph: the float one
    assert OnnxPredictor.from_run_dir(run).precision == "float32"
    assert "model.int8.onnx does not exist" in onnx_unusable_reason(run, precision="int8")
    with pytest.raises(KerasnucError, match="int8 runs on onnxruntime only"):
        load_engine_predictor(run, "keras", precision="int8")
    result = CliRunner().invoke(
        main,
        [
            "predict",
            "demo",
            "--out",
            str(tmp_path / "o"),
            "--precision",
            "int8",
            "--tta",
            "4",
        ],  # fmt: skip
    )
    assert result.exit_code == 1 and "int8 runs on onnxruntime only" in result.output


def test_graph_of_other_weights_is_refused(default_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(default_dir, run)
    weights = run / "model.weights.h5"
    weights.write_bytes(weights.read_bytes() + b"\0")  # any change of the weights file
    with pytest.raises(KerasnucError, match="other weights"):
        OnnxPredictor.from_run_dir(run)
    # auto falls back to Keras with a note; --engine onnx fails in one line
    result = CliRunner().invoke(
        main,
        ["predict", "demo", "--model", str(run), "--out", str(tmp_path / "o"), "--engine", "onnx"],
    )
    assert result.exit_code == 1 and "other weights" in result.output


def test_unusable_reasons(default_dir, tmp_path):
    assert "augmentation" in onnx_unusable_reason(default_dir, tta=4)
    run = tmp_path / "run"
    shutil.copytree(default_dir, run)
    (run / "model.onnx").unlink()
    assert "model.onnx does not exist" in onnx_unusable_reason(run, precision="float32")
    (run / "model.int8.onnx").unlink()
    assert "model.onnx does not exist" in onnx_unusable_reason(run)
    result = CliRunner().invoke(
        main, ["predict", "demo", "--out", str(tmp_path / "o"), "--engine", "onnx", "--tta", "4"]
    )
    assert result.exit_code == 1 and "augmentation" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_predicts_without_importing_tensorflow(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from kerasnuc.cli import main\n"
        f"r = CliRunner().invoke(main, ['predict', 'demo', '--out', {str(out)!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
        "print(r.output.splitlines()[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded, header = done.stdout.strip().splitlines()[-2:]
    assert loaded == "[]"
    assert "onnxruntime" in header
    for image_id in DEMO_IDS:
        summary = json.loads((out / image_id / f"{image_id}.summary.json").read_text())
        assert summary["total"] > 50  # demo ground truth: 88 and 117 nuclei


def test_models_onnx_writes_a_graph_for_a_run_and_refuses_bundled_models(default_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(default_dir, run)
    (run / "model.onnx").unlink()
    result = CliRunner().invoke(main, ["models", "onnx", str(run)])
    assert result.exit_code == 0, result.output
    OnnxPredictor.from_run_dir(run)  # current for these weights
    # The export is deterministic: the same weights give the bundled graph, byte for byte (so
    # the bundled model.onnx is also what the exporter writes today).
    assert (run / "model.onnx").read_bytes() == (default_dir / "model.onnx").read_bytes()
    (run / "model.int8.onnx").unlink()
    result = CliRunner().invoke(main, ["models", "onnx", str(run), "--int8-data", "demo"])
    assert result.exit_code == 0, result.output
    assert "int8, 1 datasets" in result.output
    assert OnnxPredictor.from_run_dir(run, precision="int8").precision == "int8"
    result = CliRunner().invoke(main, ["models", "onnx", "default"])
    assert result.exit_code == 1 and "read-only" in result.output


def test_cpu_has_vnni_reads_the_flags_line(monkeypatch, tmp_path):
    from kerasnuc.inference import onnx_predictor

    def with_cpuinfo(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        real = onnx_predictor.Path
        monkeypatch.setattr(
            onnx_predictor, "Path", lambda p: path if p == "/proc/cpuinfo" else real(p)
        )
        onnx_predictor.cpu_has_vnni.cache_clear()
        try:
            return onnx_predictor.cpu_has_vnni()
        finally:
            onnx_predictor.cpu_has_vnni.cache_clear()
            monkeypatch.setattr(onnx_predictor, "Path", real)

    assert with_cpuinfo("model name : x\nflags : fpu avx2 fma avx512f avx512_vnni\n")
    assert with_cpuinfo("flags\t\t: fpu avx2 avx_vnni\n")
    assert not with_cpuinfo("flags : fpu avx2 fma avx512f avx512bw\n")  # AVX-512 without VNNI
    assert not with_cpuinfo("processor : 0\n")
