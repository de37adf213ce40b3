"""``kerasnuc export`` end to end on a tiny conic run directory (one export)."""

from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner

from kerasnuc.cli import export as export_module
from kerasnuc.cli import main
from tests.serving.test_export import make_tiny_run


@pytest.mark.slow
def test_export_command(tmp_path):
    run_dir = make_tiny_run(tmp_path / "run")
    base = tmp_path / "saved_models"
    runner = CliRunner()
    args = ["export", str(run_dir), "--name", "conic_tiny", "--base", str(base)]
    old_umask = os.umask(0o022)
    try:
        result = runner.invoke(main, [*args, "--warmup", "64,32x48", "--json"])
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    # Readable by a TF Serving process or a colleague under umask 022 (issue 20, item 7).
    for path in [base, *base.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    summary = json.loads(result.output)
    assert summary["version"] == 1
    assert summary["path"] == str(base / "conic_tiny" / "1")
    assert summary["method"] == "conic"
    assert summary["outputs"] == {"semantic": 3, "three_label": 3, "vectors": 2}
    assert summary["signatures"] == ["kerasnuc_metadata", "serving_default", "serving_float"]
    version_dir = base / "conic_tiny" / "1"
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "assets.extra" / "tf_serving_warmup_requests").is_file()
    meta = json.loads((version_dir / "assets.extra" / "kerasnuc.json").read_text())
    assert meta["class_names"] == {"1": "a", "2": "b"} and meta["mpp"] == 0.5
    assert 'base_path: "/models/conic_tiny"' in (base / "models.config").read_text()
    assert sorted(p.name for p in (base / "conic_tiny").iterdir()) == ["1"]

    # An existing version is never overwritten: one-line error, exit code 1.
    result = runner.invoke(main, [*args, "--version", "1"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {base / 'conic_tiny' / '1'}: version 1 of 'conic_tiny' already exists"
    ]

    result = runner.invoke(main, ["export", str(run_dir), "--name", "a/b", "--base", str(base)])
    assert result.exit_code == 1 and "invalid model name 'a/b'" in result.output

    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(main, ["export", str(empty), "--name", "x", "--base", str(base)])
    assert result.exit_code == 1
    assert (
        result.output.strip()
        == f"Error: {empty / 'config.json'}: missing (not a kerasnuc run directory?)"
    )

    result = runner.invoke(main, [*args, "--warmup", "0x4"])
    assert result.exit_code == 2 and "expected SIZE or HEIGHTxWIDTH" in result.output


@pytest.mark.parametrize(
    ("value", "expected"),
    [("256", [(1, 256, 256)]), ("64, 32x48", [(1, 64, 64), (1, 32, 48)]), ("none", [])],
)
def test_warmup_sizes(value, expected):
    assert export_module._warmup_sizes(value) == expected


def test_export_help():
    result = CliRunner().invoke(main, ["export", "--help"])
    assert result.exit_code == 0
    assert "BASE/NAME/VERSION" in result.output
    assert all(o in result.output for o in ("--name", "--version", "--base", "--warmup"))
