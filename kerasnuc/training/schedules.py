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
