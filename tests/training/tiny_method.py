"""A narrow stand-in for the ``conic`` method, for training tests that must be fast.

Same registry entry as ``conic`` (losses with the EMA class prior, pipeline with importance
sampling and augmentation, optimizer and schedule, post-processing, validation) except the
model: two 3x3 convolutions of ``width`` channels with batch norm, an MC dropout layer (the
decoder's) and a channel dropout (the encoder's stochastic depth), so every kind of training
state (weights, batch-norm statistics, class prior, dropout seed generators, optimizer moments
and step) is there, in a model that traces in a second or two instead of ~30 s for B0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import keras

from kerasnuc import registry
from kerasnuc.layers.dropout import MCDropout
from kerasnuc.models.conic import ConicModel

NAME = "tiny_conic"


@dataclass(frozen=True)
class TinyConicConfig:
    num_classes: int = 2
    width: int = 8
    dropout: float = 0.2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TinyConicConfig:
        return cls(**data)


def build_tiny_conic(config: TinyConicConfig) -> ConicModel:
    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Conv2D(config.width, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(0.2, noise_shape=(None, 1, 1, None))(x)
    x = keras.layers.UpSampling2D(2)(x)
    x = MCDropout(config.dropout)(x)
    x = keras.layers.Conv2D(config.width, 3, padding="same", activation="relu")(x)
    semantic = keras.layers.Conv2D(config.num_classes + 1, 1)(x)
    outputs = {
        "semantic": keras.layers.Activation("softmax", name="semantic")(semantic),
        "three_label": keras.layers.Activation("softmax", name="three_label")(
            keras.layers.Conv2D(3, 1)(x)
        ),
        "vectors": keras.layers.Activation("linear", name="vectors")(keras.layers.Conv2D(2, 1)(x)),
    }
    return ConicModel(inputs, outputs, name=NAME)


TINY_METHOD = dataclasses.replace(
    registry.METHODS["conic"], name=NAME, model_config=TinyConicConfig, build=build_tiny_conic
)
