"""Encoder fine-tuning schedule: decoder-only epochs with a frozen encoder, then everything but
the encoder's batch normalisation (U-Net#, Stagys et al. section III-B: "we train the decoder
part for 5 epochs with encoder layers being frozen. Then all layers except batch normalization
are unfreezed").

How the switch takes effect in Keras 3:

* the optimizer is built once on every variable that is trainable in *either* phase (the model
  as built, everything trainable), before the first phase is applied; both phases then update
  subsets of the variables it knows, so no optimizer slot is created late and a resumed run
  rebuilds exactly the same optimizer variables (``checkpoint/`` matches them by position);
* ``fit`` traces its train function once, reading ``model.trainable_variables`` and the
  ``training and layer.trainable`` switch of batch normalisation at trace time; after changing
  ``trainable`` the callback rebuilds it (``model.make_train_function(force=True)``), and ``fit``
  calls the new one from the next batch on;
* a frozen batch normalisation layer (``trainable=False``) runs in inference mode in Keras 3: its
  moving statistics are no longer updated and its scale/offset get no gradient.

Difference to PyTorch: optimizers there keep a step count per parameter, so encoder weights
unfrozen after ``k`` steps start their bias correction (and AdaBound's bounds) afresh; Keras
optimizers have one ``iterations`` counter, so they continue at step ``k``.

The phase depends only on the epoch index, so resuming on either side of the boundary (or
across it) applies the right phase in ``on_epoch_begin``.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence

import keras

logger = logging.getLogger(__name__)


def batchnorm_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every ``BatchNormalization`` layer inside ``layer`` (recursively, ``layer`` included)."""
    return [
        sub
        for sub in layer._flatten_layers(include_self=True, recursive=True)
        if isinstance(sub, keras.layers.BatchNormalization)
    ]


def set_encoder_phase(encoder: keras.layers.Layer, frozen: bool, freeze_batchnorm: bool) -> None:
    """Freeze the whole encoder (``frozen``), or unfreeze it except (optionally) its batch norms.

    Every sublayer is set explicitly: setting ``trainable`` on a model whose flag already has
    that value does not reach sublayers that were changed on their own (e.g. frozen batch norms).
    """
    for layer in encoder._flatten_layers(include_self=True, recursive=True):
        layer.trainable = not frozen
    if not frozen and freeze_batchnorm:
        for bn in batchnorm_layers(encoder):
            bn.trainable = False


class EncoderFreezeSchedule(keras.callbacks.Callback):
    """Decoder-only training for ``frozen_epochs`` epochs, then the encoder too.

    Args:
        frozen_epochs: epochs (from the start of the run) with the whole encoder frozen.
        freeze_batchnorm: keep the encoder's batch normalisation layers frozen afterwards
            (statistics and scale/offset), as U-Net# does.
        encoder_name: name of the encoder layer inside the model.

    At the end of training every layer of the encoder is made trainable again (the state of a
    freshly built model), so the model can be used or trained further as usual.
    """

    def __init__(
        self, frozen_epochs: int, freeze_batchnorm: bool = True, encoder_name: str = "encoder"
    ):
        super().__init__()
        if (
            isinstance(frozen_epochs, bool)
            or not isinstance(frozen_epochs, int)
            or frozen_epochs < 0
        ):
            raise ValueError(
                f"`frozen_epochs` must be an int >= 0. Received: frozen_epochs={frozen_epochs!r}"
            )
        self.frozen_epochs = frozen_epochs
        self.freeze_batchnorm = bool(freeze_batchnorm)
        self.encoder_name = encoder_name
        self._phase: str | None = None

    def _encoder(self) -> keras.layers.Layer:
        try:
            return self.model.get_layer(self.encoder_name)
        except ValueError:
            raise ValueError(
                f"EncoderFreezeSchedule: the model has no layer named {self.encoder_name!r}"
            ) from None

    def on_train_begin(self, logs=None):
        self._encoder()
        optimizer = self.model.optimizer
        if not optimizer.built:
            # Slots for every variable of both phases (see the module docstring).
            optimizer.build(self.model.trainable_variables)
        self._phase = None

    def on_epoch_begin(self, epoch, logs=None):
        phase = "frozen" if epoch < self.frozen_epochs else "unfrozen"
        if phase == self._phase:
            return
        set_encoder_phase(self._encoder(), phase == "frozen", self.freeze_batchnorm)
        self.model.make_train_function(force=True)
        self._phase = phase
        logger.info(
            "epoch %d: encoder %s (%d trainable variables)",
            epoch + 1,
            "frozen"
            if phase == "frozen"
            else ("unfrozen except batch norm" if self.freeze_batchnorm else "unfrozen"),
            len(self.model.trainable_variables),
        )

    def on_train_end(self, logs=None):
        set_encoder_phase(self._encoder(), frozen=False, freeze_batchnorm=False)
        self._phase = None


def train_only(model: keras.Model, patterns: Sequence[str]) -> list[str]:
    """Freeze every top-level layer of ``model`` whose name matches none of ``patterns``.

    Fine-tuning one part of a trained model, e.g. the cell-type decoder of ``conic`` on new
    types (``["semantic_*"]``) while the encoder and the instance decoder stay as they are: a
    frozen layer gets no gradient and its batch norms run in inference mode (Keras 3), so its
    outputs are exactly those of the model before training.

    Args:
        model: a built model; its direct layers are matched (a nested encoder is one layer).
        patterns: ``fnmatch`` patterns of layer names (case-sensitive).

    Returns:
        The names of the layers with weights that stay trainable, in model order.

    Raises:
        ValueError: a pattern matches no layer with weights (so at least one layer trains).
    """
    weighted = [layer for layer in model.layers if layer.weights]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(layer.name, pattern) for layer in weighted):
            raise ValueError(
                f"`train_only` pattern {pattern!r} matches no layer with weights of the model "
                f"{model.name!r}; its layers with weights are "
                + ", ".join(layer.name for layer in weighted)
            )
    kept = []
    for layer in model.layers:
        trains = any(fnmatch.fnmatchcase(layer.name, p) for p in patterns)
        for sub in layer._flatten_layers(include_self=True, recursive=True):
            sub.trainable = trains
        if trains and layer.weights:
            kept.append(layer.name)
    logger.info(
        "train_only %s: %d of %d layers with weights train (%d trainable variables)",
        list(patterns),
        len(kept),
        len(weighted),
        len(model.trainable_variables),
    )
    return kept
