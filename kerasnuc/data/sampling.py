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

Our extension, **group balancing**: patches cut from one slide are not independent, and with
``q_c`` a class can be learned almost entirely from one slide (in our CoNSeP train split, one of
22 source images holds 58 % of the inflammatory nuclei, a dense lymphocyte aggregate; the
scattered inflammatory cells of other slides were then typed as spindle). Given a group per
image (its source slide) and an exponent ``alpha``, the class mass of each group is tempered:

    S_{c,g}  = sum_{n in g} X_{c,n}
    q_c(n)   = X_{c,n} / S_{c,g(n)} * S_{c,g(n)}^alpha / sum_h S_{c,h}^alpha

Within a group images keep their share; across groups ``alpha = 1`` is the paper's ``q_c``,
``alpha = 0`` gives every group that holds class ``c`` the same share, ``0.5`` lies between.
"""

from __future__ import annotations

import numpy as np


def _check_freqs(freqs: np.ndarray) -> np.ndarray:
    freqs = np.asarray(freqs, dtype=np.float64)
    if freqs.ndim != 2 or freqs.shape[0] == 0:
        raise ValueError(f"`freqs` must have shape (N>0, C+1). Received: shape={freqs.shape}")
    if np.any(freqs < 0):
        raise ValueError("`freqs` must be non-negative.")
    if not (freqs.sum(axis=0) > 0).any():
        raise ValueError("`freqs` is all zero: no class has any pixel.")
    return freqs


def class_distributions(
    freqs: np.ndarray, groups: np.ndarray | None = None, alpha: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, q)``: the classes present and ``q[:, k] = q_c(n)`` for each, ``(N, K)``.

    Args:
        freqs: ``(N, C + 1)`` array of ``X_{c,n}``.
        groups: ``(N,)`` group label of each image (any hashable values), or None: no groups.
        alpha: group-balancing exponent in ``[0, 1]`` (see the module docstring); ignored
            without ``groups``.
    """
    freqs = _check_freqs(freqs)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must lie in [0, 1]. Received: alpha={alpha}")
    totals = freqs.sum(axis=0)
    classes = np.flatnonzero(totals > 0)
    x = freqs[:, classes]
    if groups is None or alpha == 1.0:
        return classes, x / totals[classes]
    groups = np.asarray(groups)
    if groups.shape != (freqs.shape[0],):
        raise ValueError(
            f"`groups` must have shape ({freqs.shape[0]},). Received: shape={groups.shape}"
        )
    _, inverse = np.unique(groups, return_inverse=True)
    mass = np.zeros((inverse.max() + 1, x.shape[1]))
    np.add.at(mass, inverse, x)  # S_{c,g}
    share = np.where(mass > 0, mass, 1.0) ** alpha * (mass > 0)
    share /= share.sum(axis=0)  # S^alpha / sum_h S^alpha
    per_image = mass[inverse]
    q = np.where(per_image > 0, x / np.where(per_image > 0, per_image, 1.0), 0.0)
    return classes, q * share[inverse]


def importance_probabilities(
    freqs: np.ndarray, groups: np.ndarray | None = None, alpha: float = 1.0
) -> np.ndarray:
    """Sampling probabilities ``p_n`` (Eq. 2) from the frequency matrix.

    Args:
        freqs: ``(N, C + 1)`` array of ``X_{c,n}`` (rows: images; columns: classes, bg first).
        groups, alpha: group balancing (see :func:`class_distributions`).

    Returns:
        ``(N,)`` float64 probabilities summing to 1.
    """
    return class_distributions(freqs, groups, alpha)[1].mean(axis=1)


class ImportanceSampler:
    """Draws a new training subset each epoch with probabilities ``p_n``.

    Args:
        freqs: ``(N, C + 1)`` class pixel frequencies of the training images.
        seed: base seed; epoch ``e`` uses ``np.random.default_rng([seed, e])`` so any epoch can be
            re-drawn exactly (e.g. after resuming a run).
        enabled: False gives plain shuffling without replacement (for ablations).
        groups, alpha: group balancing (see :func:`class_distributions`).
    """

    def __init__(
        self,
        freqs: np.ndarray,
        seed: int = 0,
        enabled: bool = True,
        groups: np.ndarray | None = None,
        alpha: float = 1.0,
    ):
        self.freqs = np.asarray(freqs, dtype=np.float64)
        self.classes, self._q = class_distributions(self.freqs, groups, alpha)
        self.probabilities = self._q.mean(axis=1)
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
