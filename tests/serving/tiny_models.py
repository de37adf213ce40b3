"""The tiny conic model the serving tests export (ONNX) and quantize."""

from __future__ import annotations

import keras
import numpy as np

from kerasnuc.models.conic import build_conic


def randomise_batch_norm(model: keras.Model, rng: np.random.Generator) -> None:
    """Fresh batch norms are identities; give them statistics so the test sees them."""
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.gamma.assign(rng.uniform(0.8, 1.2, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.1, n).astype("float32"))


def tiny_conic_model(randomise: bool = True) -> keras.Model:
    """A 3-class Lite0 conic with a (16, 8, 8, 8) decoder, seeded; batch norms with statistics
    unless ``randomise`` is False."""
    keras.utils.set_random_seed(0)
    model = build_conic(
        "efficientnet_lite0",
        num_classes=3,
        decoder_filters=(16, 8, 8, 8),
        encoder_features="blocks",
    )
    if randomise:
        randomise_batch_norm(model, np.random.default_rng(1))
    return model
