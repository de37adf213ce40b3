"""The terminal output of ``kerasnuc`` is its own (issue 20, item 11): TensorFlow's C++ log lines
filtered unless ``--verbose``; one line per error, tracebacks with ``--verbose``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from kerasnuc.cli import main
from kerasnuc.cli.terminal import is_noise, wants_verbose

# Lines seen from TensorFlow 2.21 on machines with and without a GPU (issue 20, item 11).
TF_LINES = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1796317402.412152    3582 cudart_stub.cc:31] Could not find cuda drivers on "
    b"your machine, GPU will not be used.",
    b"I0000 00:00:1796317402.557010    3582 cpu_feature_guard.cc:227] This TensorFlow binary is "
    b"optimized to use available CPU instructions in performance-critical operations.",
    b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow "
    b"with the appropriate compiler flags.",
    b"E0000 00:00:1712345678.123456   12345 cuda_executor.cc:1228] failed call to cuInit: "
    b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    b"I0000 00:00:1712345678.000001   12345 port.cc:153] oneDNN custom operations are on. You may "
    b"see slightly different numerical results due to floating-point round-off errors.",
    b"2024-03-01 10:00:00.123456: I tensorflow/core/util/port.cc:113] oneDNN custom operations "
    b"are on.",
    b"W0000 00:00:1712345678.000001   12345 gpu_device.cc:2344] Cannot dlopen some GPU libraries.",
]
OURS = [
    b"Error: /data/x.png: cannot decode image (corrupt or unsupported format)",
    b"F0000 00:00:1712345678.000001   12345 check.cc:1] Check failed: a fatal error must be seen",
    b"Fatal Python error: Segmentation fault",
    b"Traceback (most recent call last):",
    b"warning: x.tif: pixel size unknown",
]


def test_noise_patterns():
    assert all(is_noise(line) for line in TF_LINES)
    assert not any(is_noise(line) for line in OURS)


def test_wants_verbose():
    assert wants_verbose(["predict", "a.png", "--out", "x", "--verbose"])
    assert wants_verbose(["train", "-v"])
    assert not wants_verbose(["predict", "a.png", "--out", "x"])
    assert not wants_verbose(["predict", "--", "-v"])  # a file named -v


FILTER_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from kerasnuc.cli.terminal import quiet_process
    lines = [bytes.fromhex(h) for h in sys.argv[2:]]
    with quiet_process(verbose=sys.argv[1] == "1"):
        for line in lines:
            os.write(2, line + b"\\n")  # as C++ writes: straight to file descriptor 2
        print("python stderr line", file=sys.stderr)
        print("stdout line")
        sys.stdout.flush()
        os.write(2, b"written just before the crash\\n")
        os.abort()  # a C++ abort: the filter must still forward what came before
    """
)


def run_filter_script(verbose: bool) -> subprocess.CompletedProcess:
    lines = [line.hex() for line in TF_LINES + OURS]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, "-c", FILTER_SCRIPT, "1" if verbose else "0", *lines],
        capture_output=True,
        env=env,
        timeout=60,
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the filter needs os.fork")
def test_native_lines_filtered_and_ours_kept_even_on_abort():
    res = run_filter_script(verbose=False)
    assert res.returncode != 0  # aborted
    err = res.stderr.splitlines()
    assert not any(is_noise(line) for line in err), res.stderr.decode()
    for line in OURS + [b"python stderr line", b"written just before the crash"]:
        assert line in err, res.stderr.decode()
    assert res.stdout.splitlines() == [b"stdout line"]
    res = run_filter_script(verbose=True)  # --verbose: TensorFlow's lines too
    for line in TF_LINES + OURS:
        assert line in res.stderr.splitlines()


def test_predict_prints_only_its_own_lines(tmp_path):
    """``python -m kerasnuc predict IMAGE --out X``: no TensorFlow line on either stream."""
    from tests.integration.test_hostile_inputs import tiny_image, tiny_run

    run_dir = tiny_run(tmp_path / "run")
    image = tiny_image(tmp_path / "in.png")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    res = subprocess.run(
        [sys.executable, "-m", "kerasnuc", "predict", str(image), "--model", str(run_dir),
         "--out", str(tmp_path / "out"), "--format", "csv"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    text = res.stdout + res.stderr
    for bad in ("cudart", "cuInit", "oneDNN", "absl", "WARNING: All log messages", "cpu_feature"):
        assert bad not in text, text
    assert not any(is_noise(line.encode()) for line in text.splitlines()), text
    assert "1 predicted, 0 already complete" in res.stdout
    assert (tmp_path / "out" / "in" / "in.csv").is_file()


def test_unexpected_errors_are_one_line_and_verbose_shows_the_traceback(monkeypatch, tmp_path):
    import kerasnuc.data.info

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nwith a second line of detail")

    monkeypatch.setattr(kerasnuc.data.info, "dataset_info", boom)
    res = CliRunner().invoke(main, ["data", "info", "demo"])
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [
        "Error: unexpected RuntimeError: boom (rerun with --verbose for the traceback)"
    ]
    res = CliRunner().invoke(main, ["data", "info", "demo", "--verbose"])
    assert isinstance(res.exception, RuntimeError)  # the traceback, as Python shows it
    res = CliRunner().invoke(main, ["data", "info", str(tmp_path / "nope"), "-v"])
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.stderr
    assert (
        res.stderr.splitlines()[-1] == f"Error: {tmp_path / 'nope'}: no such folder (nor a "
        "bundled example dataset)"
    )
