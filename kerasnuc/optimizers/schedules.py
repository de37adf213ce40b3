"""Optimizer and learning-rate schedule of a training run.

``conic`` (Rumberger et al., CoNIC 2022): AdamW with decoupled weight decay 1e-4 and a cosine-
annealed learning rate (Loshchilov & Hutter, SGDR, without restarts) over all training steps.
"""

from __future__ import annotations

import keras

from kerasnuc.config import TrainConfig


def cosine_learning_rate(
    train: TrainConfig, total_steps: int
) -> keras.optimizers.schedules.CosineDecay:
    """Cosine decay from ``train.learning_rate`` to ``min_lr_fraction`` of it over ``total_steps``.

    ``lr(step) = lr0 * ((1 - a) * 0.5 * (1 + cos(pi * min(step, T) / T)) + a)`` with
    ``a = train.min_lr_fraction`` and ``T = total_steps`` (``keras.optimizers.schedules.
    CosineDecay`` with ``alpha=a``).

    Raises:
        ValueError: ``total_steps < 1``.
    """
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be >= 1. Received: total_steps={total_steps}")
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=train.learning_rate,
        decay_steps=int(total_steps),
        alpha=train.min_lr_fraction,
    )


def build_optimizer(train: TrainConfig, total_steps: int) -> keras.optimizers.Optimizer:
    """The optimizer of ``train`` with the cosine schedule of :func:`cosine_learning_rate`.

    Args:
        train: training settings (``optimizer`` must be ``"adamw"``).
        total_steps: ``epochs * steps_per_epoch``.

    Returns:
        ``keras.optimizers.AdamW(learning_rate=schedule, weight_decay=train.weight_decay)``.

    Raises:
        ValueError: another optimizer name.
    """
    if train.optimizer != "adamw":
        raise ValueError(
            f"`optimizer` must be 'adamw' for this method. Received: optimizer={train.optimizer!r}"
        )
    return keras.optimizers.AdamW(
        learning_rate=cosine_learning_rate(train, total_steps), weight_decay=train.weight_decay
    )


@keras.saving.register_keras_serializable(package="kerasnuc")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up, then step decay (``panoptic``, Liu et al. 2019, Sec. 3.3 and 4.2).

    ``lr(step) = lr0 * (w + (1 - w) * step / warmup_steps)`` for ``step < warmup_steps``, then
    ``lr0 * factor ** k`` where ``k`` is the number of ``boundaries`` ``<= step``. The paper's
    TCGA-Kumar run: 500 warm-up iterations, ``x 0.1`` at iterations 8640 and 12960 of 17280
    (half and three quarters of the run). The start factor ``w = 1/3`` is maskrcnn-benchmark's
    ``WARMUP_FACTOR`` (the paper does not state it).

    Args:
        initial_learning_rate: ``lr0``.
        warmup_steps: length of the warm-up (0: none).
        boundaries: steps at which the rate is multiplied by ``factor``.
        factor: decay factor per boundary.
        warmup_factor: ``w``, the fraction of ``lr0`` at step 0.
    """

    def __init__(
        self,
        initial_learning_rate: float,
        warmup_steps: int = 500,
        boundaries: tuple[int, ...] = (),
        factor: float = 0.1,
        warmup_factor: float = 1.0 / 3.0,
    ):
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0. Received: warmup_steps={warmup_steps}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = tuple(int(b) for b in boundaries)
        self.factor = float(factor)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        lr = keras.ops.convert_to_tensor(self.initial_learning_rate, "float32")
        for b in self.boundaries:
            lr = keras.ops.where(step >= float(b), lr * self.factor, lr)
        if self.warmup_steps > 0:
            frac = keras.ops.minimum(step / float(self.warmup_steps), 1.0)
            lr = lr * (self.warmup_factor + (1.0 - self.warmup_factor) * frac)
        return lr

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "warmup_steps": self.warmup_steps,
            "boundaries": list(self.boundaries),
            "factor": self.factor,
            "warmup_factor": self.warmup_factor,
        }


def build_sgd_warmup_step(train: TrainConfig, total_steps: int) -> keras.optimizers.Optimizer:
    """SGD with momentum 0.9 and weight decay, warm-up then step decay (``panoptic``).

    Liu et al. 2019: "stochastic gradient descent (SGD) ... with a momentum of 0.9 and a weight
    decay of 0.0001 ... the same linear warming up in the first 500 iterations"; step decay by
    10x at 1/2 and 3/4 of the run (their TCGA-Kumar schedule; ``train.lr_decay_at`` moves the
    two points, e.g. later for short CPU runs). Warm-up lasts
    ``min(500, total_steps // 10)`` steps, so that short runs are not all warm-up.

    Args:
        train: ``learning_rate`` (peak), ``weight_decay`` (Keras' decoupled form
            ``w <- w - lr * wd * w``, which for SGD equals an L2 term ``wd/2 |w|^2``);
            ``optimizer`` must be ``"sgd"`` (``"adamw"``, the generic default, is accepted and
            means the method's own optimizer).
        total_steps: ``epochs * steps_per_epoch``.

    Raises:
        ValueError: another optimizer name or ``total_steps < 1``.
    """
    if train.optimizer not in ("sgd", "adamw"):
        raise ValueError(
            f"`optimizer` must be 'sgd' for this method. Received: optimizer={train.optimizer!r}"
        )
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be >= 1. Received: total_steps={total_steps}")
    schedule = WarmupStepDecay(
        train.learning_rate,
        warmup_steps=min(500, total_steps // 10),
        boundaries=tuple(int(f * total_steps) for f in train.lr_decay_at),
    )
    return keras.optimizers.SGD(
        learning_rate=schedule, momentum=0.9, weight_decay=train.weight_decay
    )


def set_clip_norm(optimizer: keras.optimizers.Optimizer, clip_norm: float | None) -> None:
    """Clip every variable's gradient to L2 norm ``clip_norm`` (Keras ``clipnorm``).

    A :class:`~kerasnuc.optimizers.lookahead.Lookahead` gets it on its inner optimizer (the one
    that applies the gradients). None leaves the optimizer as it is.
    """
    if clip_norm is None:
        return
    if not clip_norm > 0:
        raise ValueError(f"`clip_norm` must be > 0. Received: clip_norm={clip_norm}")
    getattr(optimizer, "inner_optimizer", optimizer).clipnorm = float(clip_norm)
