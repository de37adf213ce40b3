"""Losses of the ``conic`` method (Rumberger et al., CoNIC 2022, sections II-B and II-C).

Target formats (one convention for the three outputs of ``build_conic``):

* ``semantic``: int class map ``(B, H, W)`` (or ``(B, H, W, 1)``), 0 = background, ``1..C`` =
  cell type; predictions ``(B, H, W, C + 1)`` softmax probabilities.
* ``three_label``: int map ``(B, H, W)`` (or ``(B, H, W, 1)``), 0 = background, 1 = nucleus
  interior, 2 = nucleus boundary; predictions ``(B, H, W, 3)`` softmax probabilities.
* ``vectors``: float ``(B, H, W, 3)`` = ``(dy, dx, fg)``: the vector from the pixel to the centre
  of its nucleus and a 0/1 nucleus mask; predictions ``(B, H, W, 2)`` = ``(dy, dx)``. The unit of
  the vectors is whatever the target generator writes; the loss does not rescale them.

The paper trains with the plain sum ``semantic + three_label + vectors`` (Keras' default loss
weights of 1); :func:`conic_losses` returns the three losses keyed by output name.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kerasnuc.data.targets import UNKNOWN_CLASS


def _sparse_labels(y_true, y_pred):
    """Int32 ``(B, H, W)`` labels from ``(B, H, W)`` or ``(B, H, W, 1)`` targets."""
    if len(y_true.shape) == len(y_pred.shape):
        y_true = ops.squeeze(y_true, axis=-1)
    return ops.cast(y_true, "int32")


def initial_class_frequency(num_classes: int) -> np.ndarray:
    """Initial EMA class prior: uniform ``1 / (num_classes + 1)`` over background and cell types.

    Args:
        num_classes: number of cell types ``C`` (background excluded).

    Returns:
        ``(C + 1,)`` float32 array.
    """
    k = num_classes + 1
    return np.full((k,), 1.0 / k, dtype="float32")


@keras.saving.register_keras_serializable(package="kerasnuc")
class WeightedSemanticLoss(keras.losses.Loss):
    """Cross-entropy with label smoothing and class weights from a moving class prior.

    Rumberger et al. (CoNIC 2022, II-B), adapted from the "focal" class weighting of Araslanov &
    Roth (CVPR 2021). With ``K = C + 1`` classes (background included), each training step first
    updates an exponential moving average of the class pixel frequency with the batch labels,

        ``X_c <- momentum * X_c + (1 - momentum) * X_{c,batch}``,
        ``X_{c,batch}`` = fraction of the batch's pixels labelled ``c``,

    then weights the classes with ``w_c = (1 - X_c) ** rho`` (the updated prior, as in the paper)
    and computes

        ``loss = sum_n sum_c w_c * y~_{n,c} * (-log p_{n,c}) / sum_n w_{y_n}``,
        ``y~ = (1 - label_smoothing) * onehot(y) + label_smoothing / K``,

    over all pixels ``n`` of the batch: the class weights multiply each class term of the smoothed
    cross-entropy and the sum is normalised by the summed weight of the true classes. This is
    ``torch.nn.functional.cross_entropy(logits, y, weight=w, label_smoothing=0.05)`` (mean
    reduction), the form used by the reference implementation of the weighting. Without smoothing
    it is the weighted mean of the per-pixel cross-entropy with pixel weight ``w_{y_n}``.

    The prior starts uniform (``X_c = 1 / K``, as in that implementation), so the weights start
    equal and approach the data's class balance with a time constant of ``1 / (1 - momentum)``
    steps (100 for the default 0.99, the reference value). With the default Keras reduction the
    value returned is exactly the formula above; ``sample_weight`` multiplies the per-pixel terms.

    State. The prior lives in the non-trainable variable :attr:`class_frequency` (``(K,)``
    float32). A fresh loss owns its own variable and updates it on every call. The model returned
    by ``kerasnuc.models.conic.build_conic`` owns a prior variable of the same shape: when that
    model, compiled with this loss, computes its loss it binds the loss to its variable
    (:meth:`bind_class_frequency`), so the prior is saved with the model's weights and
    checkpoints, and sets :attr:`update_frequency` from the ``training`` flag of
    ``compute_loss``, so that the prior is updated inside the compiled train step and never by
    ``evaluate`` or the validation pass of ``fit``. With any other model the loss updates its
    own prior on every call, evaluation included. On the JAX backend the prior must be bound to
    the model (otherwise updates inside ``jit`` are lost).

    The denominator is floored at ``epsilon * num_pixels``; it only gets there if one class has
    a prior of 1 in float32 (about 1600 consecutive single-class batches).

    Args:
        num_classes: number of cell types ``C`` (background excluded); predictions have
            ``C + 1`` channels.
        rho: exponent of the class weights (paper: 3).
        label_smoothing: label smoothing ``epsilon`` (paper: 0.05).
        momentum: EMA factor ``gamma`` of the class prior, ``0 <= momentum < 1`` (0.99).
        name: loss name.
        reduction: Keras reduction of the per-pixel terms (default ``"sum_over_batch_size"``).
        dtype: dtype of the computation (default float32).

    Unknown cell type. Pixels labelled :data:`UNKNOWN_CLASS` (-1), e.g. nuclei of a dataset
    without cell types trained together with one that has them, are left out of the loss, of
    its normalisation and of the prior update (a batch of only such pixels leaves the prior as
    it is and gives 0).

    Call arguments:
        y_true: ``(B, H, W)`` or ``(B, H, W, 1)`` int class map in ``[0, C]`` or -1 (unknown).
        y_pred: ``(B, H, W, C + 1)`` softmax probabilities.
    """

    def __init__(
        self,
        num_classes: int,
        rho: float = 3.0,
        label_smoothing: float = 0.05,
        momentum: float = 0.99,
        name: str = "weighted_semantic_ce",
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(
                f"`num_classes` must be a positive int. Received: num_classes={num_classes!r}"
            )
        if not rho >= 0:
            raise ValueError(f"`rho` must be >= 0. Received: rho={rho}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(
                f"`label_smoothing` must be in [0, 1). Received: label_smoothing={label_smoothing}"
            )
        if not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1). Received: momentum={momentum}")
        self.num_classes = num_classes
        self.rho = float(rho)
        self.label_smoothing = float(label_smoothing)
        self.momentum = float(momentum)
        self.class_frequency = keras.Variable(
            initial_class_frequency(num_classes),
            dtype="float32",
            trainable=False,
            name="class_frequency",
        )
        #: Whether a call updates the prior. Read when the call is traced; set per step by the
        #: model returned by ``build_conic`` (``True`` in train steps, ``False`` in test steps).
        self.update_frequency = True

    def bind_class_frequency(self, variable: keras.Variable) -> None:
        """Use ``variable`` (e.g. owned by the model) as the class prior instead of the own one.

        Args:
            variable: non-trainable ``(C + 1,)`` float32 variable.

        Raises:
            ValueError: the variable has the wrong shape.
        """
        if tuple(variable.shape) != (self.num_classes + 1,):
            raise ValueError(
                f"The class prior of {self.name} must have shape ({self.num_classes + 1},) "
                f"(num_classes={self.num_classes} plus background). "
                f"Received: shape={tuple(variable.shape)}"
            )
        self.class_frequency = variable

    def call(self, y_true, y_pred):
        k = self.num_classes + 1
        labels = _sparse_labels(y_true, y_pred)
        valid = ops.cast(labels != UNKNOWN_CLASS, "float32")
        onehot = ops.one_hot(ops.maximum(labels, 0), k, dtype="float32") * valid[..., None]
        prior = ops.convert_to_tensor(self.class_frequency.value, dtype="float32")
        if self.update_frequency:
            n_valid = ops.sum(valid)
            batch_frequency = ops.sum(ops.reshape(onehot, (-1, k)), axis=0) / ops.maximum(
                n_valid, 1.0
            )
            updated = self.momentum * prior + (1.0 - self.momentum) * batch_frequency
            prior = ops.where(n_valid > 0, updated, prior)
            self.class_frequency.assign(prior)
        weights = ops.stop_gradient(ops.power(1.0 - prior, self.rho))
        target = onehot * (1.0 - self.label_smoothing) + self.label_smoothing / k
        log_p = ops.log(ops.clip(ops.cast(y_pred, "float32"), keras.config.epsilon(), 1.0))
        per_pixel = -ops.sum(weights * target * log_p, axis=-1) * valid
        true_weight = ops.sum(onehot * weights, axis=-1)
        # mean(per_pixel / mean(true_weight)) == sum(per_pixel) / sum(true_weight).
        norm = ops.maximum(ops.mean(true_weight), keras.config.epsilon())
        return ops.cast(per_pixel / norm, self.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "rho": self.rho,
                "label_smoothing": self.label_smoothing,
                "momentum": self.momentum,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="kerasnuc")
class CentreVectorLoss(keras.losses.Loss):
    """Mean squared error of the centre vectors over nucleus pixels.

    The auxiliary regression task of Rumberger et al. (CoNIC 2022, II-C, after Hirsch &
    Kainmueller 2020): each nucleus pixel regresses the vector to its nucleus centre.

        ``loss = sum_n fg_n * mean_j (v^_{n,j} - v_{n,j}) ** 2 / max(sum_n fg_n, 1)``

    over all pixels ``n`` of the batch and the two components ``j`` (dy, dx): the squared error is
    averaged over the two components and over the foreground pixels. A batch without foreground
    gives 0 (never NaN). With the default Keras reduction the value returned is exactly this
    formula; ``sample_weight`` multiplies the per-pixel terms.

    Args:
        name: loss name.
        reduction: Keras reduction of the per-pixel terms (default ``"sum_over_batch_size"``).
        dtype: dtype of the computation (default float32).

    Call arguments:
        y_true: ``(B, H, W, 3)`` float ``(dy, dx, fg)`` with ``fg`` a 0/1 nucleus mask.
        y_pred: ``(B, H, W, 2)`` predicted ``(dy, dx)``.
    """

    def __init__(
        self,
        name: str = "centre_vector_mse",
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        vectors, fg = y_true[..., :2], y_true[..., 2]
        squared = ops.mean(ops.square(ops.cast(y_pred, "float32") - vectors), axis=-1)
        num_pixels = ops.cast(ops.size(fg), "float32")
        # mean(fg * squared / norm) == sum(fg * squared) / max(sum(fg), 1).
        norm = ops.maximum(ops.sum(fg), 1.0) / num_pixels
        return ops.cast(fg * squared / norm, self.dtype)


def conic_losses(
    num_classes: int,
    rho: float = 3.0,
    label_smoothing: float = 0.05,
    momentum: float = 0.99,
) -> dict[str, keras.losses.Loss]:
    """The three losses of ``conic``, keyed by the output names of ``build_conic``.

    ``three_label`` is ``keras.losses.SparseCategoricalCrossentropy`` on probabilities: plain
    cross-entropy over background / interior / boundary, averaged over pixels.

    Args:
        num_classes: number of cell types ``C`` (background excluded).
        rho: exponent of the semantic class weights.
        label_smoothing: label smoothing of the semantic loss.
        momentum: EMA factor of the semantic class prior.

    Returns:
        ``{"semantic": WeightedSemanticLoss, "three_label": SparseCategoricalCrossentropy,
        "vectors": CentreVectorLoss}``.
    """
    return {
        "semantic": WeightedSemanticLoss(
            num_classes, rho=rho, label_smoothing=label_smoothing, momentum=momentum
        ),
        "three_label": keras.losses.SparseCategoricalCrossentropy(name="three_label_ce"),
        "vectors": CentreVectorLoss(),
    }
