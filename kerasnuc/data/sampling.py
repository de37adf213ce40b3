"""Importance sampling of training images (image-level class imbalance).

Rumberger, Baumann, Hirsch et al., "Panoptic segmentation with highly imbalanced semantic
labels" (CoNIC challenge, ISBI 2022), Eq. 1-2, adapted from Mosinska et al.:

    X_{c,n} = mean_{h,w} m_{c,n,h,w}                    (pixel frequency of class c in image n)
    p_n     = 1/|C| * sum_c X_{c,n} / sum_m X_{c,m}     (probability to draw image n)

Background counts as a class. Each epoch draws a new subset of the training set **with
replacement** using ``p_n``. ``p_n`` is a uniform mixture over classes of the per-class
distributions ``q_c(n) = X_{c,n} / sum_m X_{c,m}``: a draw first picks a class uniformly, then an
image in proportion to how much of that class it holds. :meth:`ImportanceSampler.draw` samples
exactly this way, so it can also report which class each draw was made for.

Our choice where the paper is silent: a class with no pixel in any training image has no
``q_c`` and is left out of ``|C|`` (otherwise ``p`` would not sum to 1).
"""

from __future__ import annotations

import numpy as np


def importance_probabilities(freqs: np.ndarray) -> np.ndarray:
    """Sampling probabilities ``p_n`` (Eq. 2) from the frequency matrix.

    Args:
        freqs: ``(N, C + 1)`` array of ``X_{c,n}`` (rows: images; columns: classes, bg first).

    Returns:
        ``(N,)`` float64 probabilities summing to 1.
    """
    freqs = np.asarray(freqs, dtype=np.float64)
    if freqs.ndim != 2 or freqs.shape[0] == 0:
        raise ValueError(f"`freqs` must have shape (N>0, C+1). Received: shape={freqs.shape}")
    if np.any(freqs < 0):
        raise ValueError("`freqs` must be non-negative.")
    totals = freqs.sum(axis=0)
    present = totals > 0
    if not present.any():
        raise ValueError("`freqs` is all zero: no class has any pixel.")
    q = freqs[:, present] / totals[present]
    return q.mean(axis=1)


class ImportanceSampler:
    """Draws a new training subset each epoch with probabilities ``p_n``.

    Args:
        freqs: ``(N, C + 1)`` class pixel frequencies of the training images.
        seed: base seed; epoch ``e`` uses ``np.random.default_rng([seed, e])`` so any epoch can be
            re-drawn exactly (e.g. after resuming a run).
        enabled: False gives plain shuffling without replacement (for ablations).
    """

    def __init__(self, freqs: np.ndarray, seed: int = 0, enabled: bool = True):
        self.freqs = np.asarray(freqs, dtype=np.float64)
        self.probabilities = importance_probabilities(self.freqs)
        totals = self.freqs.sum(axis=0)
        self.classes = np.flatnonzero(totals > 0)
        self._q = self.freqs[:, self.classes] / totals[self.classes]
        self.seed = int(seed)
        self.enabled = bool(enabled)

    def __len__(self) -> int:
        return self.freqs.shape[0]

    def draw(self, epoch: int, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Image indices of one epoch and the class each draw was made for.

        Args:
            epoch: epoch number (part of the seed).
            size: number of draws (default: the number of images).

        Returns:
            ``(indices, classes)``, each ``(size,)`` int64. Without importance sampling
            ``classes`` is all -1.
        """
        size = len(self) if size is None else int(size)
        rng = np.random.default_rng([self.seed, int(epoch)])
        if not self.enabled:
            reps = -(-size // len(self))
            idx = np.concatenate([rng.permutation(len(self)) for _ in range(reps)])[:size]
            return idx, np.full(size, -1, dtype=np.int64)
        which = rng.integers(0, len(self.classes), size=size)
        idx = np.empty(size, dtype=np.int64)
        for k in range(len(self.classes)):
            sel = np.flatnonzero(which == k)
            if sel.size:
                idx[sel] = rng.choice(len(self), size=sel.size, replace=True, p=self._q[:, k])
        return idx, self.classes[which].astype(np.int64)
