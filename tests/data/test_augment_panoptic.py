"""The panoptic photometric augmentations: emboss, sharpen, channel shuffle (Liu et al. 2019)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kerasnuc.data.augment import AugmentConfig, augment


def _only(**kw) -> AugmentConfig:
    return AugmentConfig.from_dict({**AugmentConfig.none().to_dict(), **kw})


def _filter(img, kernel):
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="symmetric")
    out = np.zeros_like(img)
    for dy in range(3):
        for dx in range(3):
            out += kernel[dy, dx] * p[dy : dy + img.shape[0], dx : dx + img.shape[1]]
    return out


def _run(cfg, img, seed=(3, 4)):
    labels = np.arange(img.shape[0] * img.shape[1], dtype=np.int32).reshape(*img.shape[:2], 1)
    out, lab = augment(tf.constant(img), tf.constant(labels), tf.constant(seed, tf.int64), cfg)
    np.testing.assert_array_equal(lab.numpy(), labels)  # photometric only
    return out.numpy()


def test_emboss_matches_kernel(rng):
    img = rng.uniform(0.3, 0.7, size=(9, 8, 3)).astype("float32")
    cfg = _only(emboss_prob=1.0, emboss_alpha=(1.0, 1.0), emboss_strength=(0.5, 0.5))
    k = np.array([[-1.5, -0.5, 0.0], [-0.5, 1.0, 0.5], [0.0, 0.5, 1.5]])
    np.testing.assert_allclose(_run(cfg, img), np.clip(_filter(img, k), 0, 1), atol=1e-5)


def test_sharpen_matches_kernel_and_alpha_zero_is_identity(rng):
    img = rng.uniform(0.3, 0.7, size=(7, 7, 3)).astype("float32")
    cfg = _only(sharpen_prob=1.0, sharpen_alpha=(0.25, 0.25), sharpen_lightness=(1.0, 1.0))
    effect = -np.ones((3, 3))
    effect[1, 1] = 9.0
    k = 0.75 * np.pad([[1.0]], 1) + 0.25 * effect
    np.testing.assert_allclose(_run(cfg, img), np.clip(_filter(img, k), 0, 1), atol=1e-5)
    cfg = _only(sharpen_prob=1.0, sharpen_alpha=(0.0, 0.0))
    np.testing.assert_allclose(_run(cfg, img), img, atol=1e-6)


def test_channel_shuffle_permutes_channels(rng):
    img = np.stack([np.full((4, 4), v, "float32") for v in (0.1, 0.5, 0.9)], -1)
    seen = set()
    for s in range(12):
        out = _run(_only(channel_shuffle_prob=1.0), img, seed=(s, 0))
        perm = tuple(int(round(v * 10)) for v in out[0, 0])
        assert sorted(perm) == [1, 5, 9]
        seen.add(perm)
    assert len(seen) > 2


def test_panoptic_preset():
    cfg = AugmentConfig.preset("panoptic")
    assert cfg.flip_prob == 0.5 and cfg.rot90_prob == 0.75
    assert cfg.emboss_prob > 0 and cfg.sharpen_prob > 0 and cfg.channel_shuffle_prob > 0
    assert cfg.blur_prob > 0 and cfg.noise_prob > 0
    assert cfg.rotate_prob == 0 and cfg.elastic_prob == 0 and cfg.hed_prob == 0
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
