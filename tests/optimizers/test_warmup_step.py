"""The panoptic optimizer: SGD momentum 0.9, weight decay, linear warm-up, step decay."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasnuc.config import TrainConfig
from kerasnuc.optimizers.schedules import WarmupStepDecay, build_sgd_warmup_step


def test_schedule_values():
    s = WarmupStepDecay(0.3, warmup_steps=10, boundaries=(20, 30), factor=0.1, warmup_factor=0.5)
    got = [float(s(i)) for i in (0, 4, 10, 19, 20, 29, 30, 1000)]
    expected = [0.15, 0.3 * (0.5 + 0.5 * 0.4), 0.3, 0.3, 0.03, 0.03, 0.003, 0.003]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(s))
    assert float(clone(25)) == pytest.approx(0.03)


def test_sgd_warmup_step_optimizer():
    opt = build_sgd_warmup_step(TrainConfig(learning_rate=0.01, optimizer="sgd"), 2000)
    assert isinstance(opt, keras.optimizers.SGD)
    assert opt.momentum == 0.9 and opt.weight_decay == pytest.approx(1e-4)
    sched = opt._learning_rate
    assert sched.warmup_steps == 200 and sched.boundaries == (1000, 1500)
    long = build_sgd_warmup_step(TrainConfig(learning_rate=0.01), 17280)._learning_rate
    assert long.warmup_steps == 500 and long.boundaries == (8640, 12960)  # the paper's run
    with pytest.raises(ValueError, match="'sgd'"):
        build_sgd_warmup_step(TrainConfig(optimizer="radam"), 10)


def test_lr_decay_at_moves_the_boundaries():
    """1120 steps decayed at 65 % and 90 %: boundaries 728 and 1008; the rate is 0.005 just
    before 728, 0.0005 from 728 and 0.00005 from 1008; bad fractions are refused."""
    train = TrainConfig.from_dict({"learning_rate": 0.005, "lr_decay_at": [0.65, 0.9]})
    sched = build_sgd_warmup_step(train, 1120)._learning_rate
    assert sched.boundaries == (728, 1008)
    got = [float(sched(s)) for s in (727, 728, 1007, 1008)]
    np.testing.assert_allclose(got, [0.005, 0.0005, 0.0005, 0.00005], rtol=1e-6)
    assert TrainConfig.from_dict(train.to_dict()).lr_decay_at == (0.65, 0.9)
    single = build_sgd_warmup_step(TrainConfig(lr_decay_at=(0.8,)), 100)._learning_rate
    assert single.boundaries == (80,)
    for bad in ([0.9, 0.5], [0.5, 1.0], [0.0], [0.5, 0.5]):
        with pytest.raises(ValueError, match="lr_decay_at"):
            TrainConfig(lr_decay_at=bad)


def test_registry_entry():
    from kerasnuc.config import RunConfig
    from kerasnuc.data.augment import AugmentConfig
    from kerasnuc.data.pipeline import PipelineConfig
    from kerasnuc.registry import get_method

    method = get_method("panoptic")
    assert method.losses(1) is None and not method.dense_outputs
    config = RunConfig(
        method="panoptic", model={}, pipeline=PipelineConfig().to_dict(), train=TrainConfig()
    )
    prepared = method.prepare_config(config, [])
    assert prepared.train.optimizer == "sgd"
    assert AugmentConfig.from_dict(prepared.pipeline["augment"]) == AugmentConfig.panoptic()
    own = PipelineConfig(augment=AugmentConfig.none()).to_dict()
    kept = method.prepare_config(RunConfig(method="panoptic", model={}, pipeline=own), [])
    assert AugmentConfig.from_dict(kept.pipeline["augment"]) == AugmentConfig.none()


def test_set_clip_norm_bounds_each_gradient():
    """SGD lr 1: a gradient (30, 40) (norm 50) clipped to norm 1 moves the weights by (0.6, 0.8);
    a small gradient passes unchanged; on Ranger the inner optimizer clips."""
    from kerasnuc.optimizers.lookahead import ranger
    from kerasnuc.optimizers.schedules import set_clip_norm

    big = keras.Variable(np.zeros(2, "float32"))
    small = keras.Variable(np.zeros(2, "float32"))
    opt = keras.optimizers.SGD(1.0)
    set_clip_norm(opt, 1.0)
    grads = [np.array([30.0, 40.0], "float32"), np.array([0.3, 0.4], "float32")]
    opt.apply_gradients(zip(grads, [big, small], strict=True))
    np.testing.assert_allclose(np.asarray(big), [-0.6, -0.8], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(small), [-0.3, -0.4], rtol=1e-6)
    r = ranger(1e-3)
    set_clip_norm(r, 2.0)
    assert r.inner_optimizer.clipnorm == 2.0
    plain = keras.optimizers.SGD(1.0)
    set_clip_norm(plain, None)
    assert not plain.clipnorm
    with pytest.raises(ValueError, match="clip_norm"):
        set_clip_norm(plain, 0.0)
    with pytest.raises(ValueError, match="clip_norm"):
        TrainConfig(clip_norm=-1.0)
