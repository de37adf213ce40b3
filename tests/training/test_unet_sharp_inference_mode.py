"""After a short ``kerasnuc train --method unet_sharp`` run, the saved model must predict in
inference mode (moving batch-norm statistics) what it predicts in training mode (batch
statistics) on the training crops, the output the loss was computed on.

Without batch-norm re-estimation (``train.bn_reestimation_batches = 0``) the moving averages of a
run of a few steps are still mostly their initial values (mean 0, variance 1; momentum 0.99), and
the two modes disagree; the method's default re-estimates them from training batches before the
weights are saved.

Tiny run: 4 train + 2 val 64x64 CoNSeP crops, ResNeXt-50 at width 0.25 with one block per
stage, 4-8 channel decoder, no frozen-encoder epoch, batch 4, 40 steps at lr 5e-3, seeded
(about 2 minutes on one core, most of it tracing the train step).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kerasnuc.cli import main
from kerasnuc.config import TrainConfig
from kerasnuc.data.dataset import Dataset
from kerasnuc.models.freeze import batchnorm_layers, set_encoder_phase
from kerasnuc.runs import load_config, load_run
from tests.integration.test_cli_unet_sharp import TINY_MODEL as CLI_TINY_MODEL
from tests.integration.test_cli_unet_sharp import _consep_crops

pytestmark = pytest.mark.slow

#: The tiny model of the CLI tests, without dropout and without the frozen-encoder phase.
TINY_MODEL = {**CLI_TINY_MODEL, "aspp_dropout": 0.0, "freeze_encoder_epochs": 0}
#: Thresholds on the training crops: share of pixels whose argmax class (whose foreground
#: decision, P(background) < 0.5) agrees between the two modes, and mean absolute difference of
#: the softmax. Measured: 0.84 / 0.92 / 0.041 with the default re-estimation, 0.47 / 0.61 / 0.169
#: with bn_reestimation_batches = 0.
MIN_AGREEMENT = 0.75
MIN_FG_AGREEMENT = 0.85
MAX_PROB_DIFF = 0.08


def _train(data, tmp_path, train_section):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(
        json.dumps(
            {"model": TINY_MODEL, "pipeline": {"deterministic": True}, "train": train_section}
        )
    )
    out = tmp_path / "run"
    args = ["train", "--method", "unet_sharp", "--data", data, "--out", out, "--config", cfg]
    args += ["--epochs", "1", "--batch-size", "4", "--crop", "64", "--steps-per-epoch", "40"]
    args += ["--lr", "5e-3", "--seed", "5", "--no-importance-sampling"]
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return out


def _mode_gap(run_dir, data) -> tuple[float, float, float]:
    """On the 4 training crops: (argmax agreement, foreground agreement, mean |p_inference -
    p_training|) of the saved model, training mode as in the run's last epoch (encoder batch
    norms frozen: freeze_encoder_batchnorm)."""
    model = load_run(run_dir).model
    set_encoder_phase(model.get_layer("encoder"), frozen=False, freeze_batchnorm=True)
    ds = Dataset(data)
    x = np.stack([ds.image(i) for i in ds.split("train")]).astype(np.float32) / 255.0
    infer = np.asarray(model(x, training=False)["semantic"])
    train = np.asarray(model(x, training=True)["semantic"])
    agreement = float((infer.argmax(-1) == train.argmax(-1)).mean())
    foreground = float(((infer[..., 0] < 0.5) == (train[..., 0] < 0.5)).mean())
    return agreement, foreground, float(np.abs(infer - train).mean())


@pytest.fixture(scope="module")
def tiny_consep(shared_data, tmp_path_factory):
    return _consep_crops(shared_data, tmp_path_factory.mktemp("data") / "consep_tiny")


def test_inference_mode_matches_training_mode_after_a_short_run(tiny_consep, tmp_path):
    out = _train(tiny_consep, tmp_path, {})
    config = load_config(out)
    assert config.train.bn_reestimation_batches == 8  # the method's default
    agreement, foreground, diff = _mode_gap(out, tiny_consep)
    assert agreement >= MIN_AGREEMENT, (agreement, foreground, diff)
    assert foreground >= MIN_FG_AGREEMENT, (agreement, foreground, diff)
    assert diff <= MAX_PROB_DIFF, (agreement, foreground, diff)
    # The encoder of the random-init model is frozen batch norm included (freeze_encoder_
    # batchnorm): its statistics were calibrated on training batches before the first step,
    # not left at the initial mean 0 / variance 1.
    encoder_bn = batchnorm_layers(load_run(out).model.get_layer("encoder"))
    assert all(not np.allclose(bn.moving_variance.numpy(), 1.0) for bn in encoder_bn)


def test_bn_reestimation_batches_is_checked():
    with pytest.raises(ValueError, match="`bn_reestimation_batches` must be >= 0"):
        TrainConfig(bn_reestimation_batches=-1)
