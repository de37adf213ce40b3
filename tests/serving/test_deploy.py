"""deploy/: TF Serving configs parse as their protos; docker-compose refers to real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kerasnuc.fileutil import KerasnucError
from kerasnuc.serving.export import models_config_text, write_models_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _parse_model_server_config(text: str):
    from google.protobuf import text_format

    config_pb2 = pytest.importorskip("tensorflow_serving.config.model_server_config_pb2")
    return text_format.Parse(text, config_pb2.ModelServerConfig())


def test_deploy_models_config_parses():
    config = _parse_model_server_config((DEPLOY / "models.config").read_text())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == (
        "conic",
        "/models/conic",
        "tensorflow",
    )
    assert model.model_version_policy.latest.num_versions == 2


def test_generated_models_config_parses(tmp_path):
    for name, versions in (("b", ["2"]), ("a", ["1", "7"]), ("empty", []), (".hidden", ["1"])):
        (tmp_path / name).mkdir()
        for v in versions:
            (tmp_path / name / v).mkdir()
    (tmp_path / "a" / ".tmp-8-x").mkdir()
    path = write_models_config(tmp_path, container_base="/srv/models/", num_versions=3)
    config = _parse_model_server_config(path.read_text())
    models = [(m.name, m.base_path) for m in config.model_config_list.config]
    assert models == [("a", "/srv/models/a"), ("b", "/srv/models/b")]
    assert {
        m.model_version_policy.latest.num_versions for m in config.model_config_list.config
    } == {3}
    assert _parse_model_server_config(models_config_text([])).model_config_list.config == []
    with pytest.raises(KerasnucError, match="invalid model name"):
        models_config_text(["a b"])
    with pytest.raises(ValueError, match="`num_versions` must be >= 1"):
        models_config_text(["a"], num_versions=0)


def test_batching_parameters_fields():
    # BatchingParameters (tensorflow_serving/servables/tensorflow/session_bundle_config.proto)
    # is not shipped in tensorflow-serving-api: check the field names and value forms.
    wrapped = {
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
    }
    seen = {}
    for line in (DEPLOY / "batching_parameters.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        key, _, value = line.partition(" ")
        seen[key.rstrip(":")] = value
    assert set(seen) == wrapped | {"pad_variable_length_inputs"}
    for key in wrapped:
        assert seen[key].startswith("{ value: ") and seen[key].endswith(" }")
        assert int(seen[key][len("{ value: ") : -2]) > 0
    assert seen["pad_variable_length_inputs"] == "false"


def test_docker_compose_mounts_existing_files():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    service = compose["services"]["tfserving"]
    assert service["image"].startswith("tensorflow/serving:")
    assert sorted(service["ports"]) == ["8500:8500", "8501:8501"]
    flags = dict(arg.lstrip("-").split("=", 1) for arg in service["command"])
    assert flags["port"] == "8500" and flags["rest_api_port"] == "8501"
    assert flags["enable_batching"] == "true"
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in service["volumes"])
    assert mounts["../saved_models"] == "/models"
    for source in mounts:
        if source.startswith("./"):
            assert (DEPLOY / source).is_file()
    assert flags["batching_parameters_file"] == mounts["./batching_parameters.txt"]
    assert mounts["./models.config"] == "/config/models.config"
    assert flags["model_config_file"] == "${KERASNUC_MODELS_CONFIG:-/models/models.config}"
