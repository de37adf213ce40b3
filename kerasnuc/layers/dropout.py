"""Dropout that can stay active at inference (Monte Carlo dropout).

The ``conic`` method keeps the decoder dropout active at test time and averages 16 stochastic
forward passes (Rumberger et al., CoNIC 2022, section II-F, following Gal & Ghahramani, "Dropout
as a Bayesian Approximation", ICML 2016). :class:`MCDropout` is a dropout layer with the
semantics of ``keras.layers.Dropout`` and a switch that turns it on outside training without
rebuilding or re-tracing the model.

The switch is a non-trainable float32 ``keras.Variable`` (``mc_active``, 0 or 1) read inside
``call``. A variable, unlike a Python attribute, is read when the compiled function runs, so
flipping it with :func:`set_mc_dropout` also affects a ``model.predict`` function or a
``tf.function`` / SavedModel signature traced before the flip (on JAX the variable is part of the
state passed to the jitted function). The switch is saved with the weights and in the layer
config (``mc``), so a model saved with the switch on loads with it on.

Cost: outside training the layer always draws the dropout mask and selects between the dropped
and the unchanged tensor, so with the switch off it still spends one random draw per call.
"""

from __future__ import annotations

import logging

import keras
from keras import ops

logger = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="kerasnuc")
class MCDropout(keras.layers.Layer):
    """Dropout that can also drop units at inference (MC dropout).

    In training (``training=True``) it behaves exactly like ``keras.layers.Dropout``. Otherwise
    it drops units only while its switch is on (``mc=True``, or after
    ``set_mc_dropout(model, True)``), and is the identity while it is off.

    Args:
        rate: fraction of the units to drop, ``0 <= rate < 1``. Kept units are scaled by
            ``1 / (1 - rate)``.
        noise_shape: ``None`` or a tuple of ints / ``None`` (``None`` dimensions take the input's
            size), as for ``keras.layers.Dropout``; e.g. ``(None, 1, 1, None)`` drops whole
            channels.
        seed: seed of the layer's random generator.
        mc: initial state of the switch (dropout active at inference).
        **kwargs: base layer arguments (``name``, ``dtype``, ...).

    Call arguments:
        inputs: tensor of any shape.
        training: Python bool; ``True`` always drops.

    Returns:
        A tensor of the same shape and dtype as ``inputs``.
    """

    def __init__(
        self,
        rate: float,
        noise_shape: tuple[int | None, ...] | None = None,
        seed: int | None = None,
        mc: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(rate, int | float) or not 0 <= rate < 1:
            raise ValueError(f"`rate` must be a float in [0, 1). Received: rate={rate!r}")
        if noise_shape is not None:
            noise_shape = tuple(noise_shape)
            if not all(d is None or (isinstance(d, int) and d > 0) for d in noise_shape):
                raise ValueError(
                    "`noise_shape` must be None or a tuple of positive ints or None. "
                    f"Received: noise_shape={noise_shape}"
                )
        if not isinstance(mc, bool):
            raise ValueError(f"`mc` must be a bool. Received: mc={mc!r}")
        self.rate = float(rate)
        self.noise_shape = noise_shape
        self.seed = seed
        self.supports_masking = True
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.mc_active = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(1.0 if mc else 0.0),
            dtype="float32",
            trainable=False,
            autocast=False,
            name="mc_active",
        )

    @property
    def mc(self) -> bool:
        """Whether dropout is active at inference (reads the switch variable)."""
        return bool(ops.convert_to_numpy(self.mc_active.value) > 0.5)

    @mc.setter
    def mc(self, value: bool) -> None:
        self.mc_active.assign(1.0 if value else 0.0)

    def call(self, inputs, training=False):
        if self.rate == 0:
            return inputs

        def dropped():
            return keras.random.dropout(
                inputs, self.rate, noise_shape=self.noise_shape, seed=self.seed_generator
            )

        if training:
            return dropped()
        # A conditional, not a select: with MC dropout off (the usual inference) no random mask
        # is drawn, which was a quarter of the model's inference time at full resolution.
        return ops.cond(ops.greater(self.mc_active, 0.5), dropped, lambda: inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {"rate": self.rate, "noise_shape": self.noise_shape, "seed": self.seed, "mc": self.mc}
        )
        return config


def set_mc_dropout(model: keras.layers.Layer, active: bool) -> int:
    """Turn inference-time dropout on or off in every :class:`MCDropout` layer of ``model``.

    Nested models and layers are searched too. Takes effect immediately, also for prediction
    functions traced before the call.

    Args:
        model: a model or layer.
        active: ``True`` to drop units at inference (MC dropout), ``False`` for the identity.

    Returns:
        The number of layers switched (0 if ``model`` has no ``MCDropout`` layer).
    """
    # ``_flatten_layers`` is the Keras 3 walk over a layer and all its nested sublayers.
    layers = [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, MCDropout)
    ]
    for layer in layers:
        layer.mc = bool(active)
    logger.debug(
        "MC dropout %s in %d layers of %s", "on" if active else "off", len(layers), model.name
    )
    return len(layers)
