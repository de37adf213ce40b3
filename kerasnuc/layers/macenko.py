"""Macenko stain normalisation as a Keras layer (Macenko et al. 2009, "A method for normalizing
histology slides for quantitative analysis", ISBI), the first preprocessing step of U-Net#
(Stagys et al.).

The layer is the in-graph twin of :class:`kerasnuc.data.stain.MacenkoNormalizer` (numpy): it
fits the stain vectors and maximum concentrations of **every input image** with the same
algorithm and maps the image onto a fixed reference (the normaliser fitted on training data,
stored in the layer config and so in the model config). Being part of the model, the
normalisation runs wherever the model runs: training steps, validation, ``kerasnuc predict``
(each tile of a slide is normalised on its own), and the exported SavedModel.

Everything is written with ``keras.ops`` and handles unknown ``H``/``W``: the covariance of the
tissue optical densities, its eigenvectors (``ops.eigh``), the angle percentiles (sorting with
non-tissue pixels pushed to the end, then numpy's "linear" interpolation at position
``q / 100 * (n - 1)`` among the ``n`` tissue pixels) and the least-squares concentrations (the
2x2 normal equations solved in closed form).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

_BIG = 1e6  # sort key of non-tissue angles (angles are in [-pi, pi])


def _check_reference(stain_matrix, max_concentrations) -> tuple[np.ndarray, np.ndarray]:
    stains = np.asarray(stain_matrix, dtype=np.float64)
    maxima = np.asarray(max_concentrations, dtype=np.float64)
    if stains.shape != (2, 3) or not np.all(np.isfinite(stains)):
        raise ValueError(
            "`stain_matrix` must be a finite 2x3 matrix (rows: haematoxylin, eosin OD vectors). "
            f"Received: stain_matrix={stain_matrix!r}"
        )
    if maxima.shape != (2,) or not np.all(maxima > 0):
        raise ValueError(
            "`max_concentrations` must be 2 positive numbers. "
            f"Received: max_concentrations={max_concentrations!r}"
        )
    return stains, maxima


def _sorted_percentile(sorted_values, count, q):
    """numpy's linear-interpolation percentile of the first ``count`` entries of each row.

    Args:
        sorted_values: ``(B, N)`` rows sorted ascending; only the first ``count[b]`` entries of
            row ``b`` are data.
        count: ``(B,)`` float number of data entries (>= 1).
        q: percentile in ``[0, 100]``.

    Returns:
        ``(B,)`` percentiles.
    """
    pos = (q / 100.0) * (count - 1.0)
    low = ops.floor(pos)
    frac = pos - low
    high = ops.minimum(low + 1.0, count - 1.0)
    low_i = ops.expand_dims(ops.cast(low, "int32"), -1)
    high_i = ops.expand_dims(ops.cast(high, "int32"), -1)
    v_low = ops.squeeze(ops.take_along_axis(sorted_values, low_i, axis=1), -1)
    v_high = ops.squeeze(ops.take_along_axis(sorted_values, high_i, axis=1), -1)
    return v_low + frac * (v_high - v_low)


@keras.saving.register_keras_serializable(package="kerasnuc")
class MacenkoNormalization(keras.layers.Layer):
    """Per-image Macenko stain normalisation onto a fixed reference.

    For each image of the batch (algorithm of
    :class:`~kerasnuc.data.stain.MacenkoNormalizer`, same parameters):

    1. ``OD = max(-ln(max(I, 1/255) / io), 0)`` per pixel and channel;
    2. tissue pixels: ``OD >= beta`` in every channel;
    3. the two leading eigenvectors of the tissue OD covariance span the stain plane; the stain
       vectors are the plane directions at the ``alpha`` and ``100 - alpha`` percentiles of
       the tissue pixels' angles, haematoxylin first (larger red OD), unit length;
    4. concentrations = least-squares solution of ``OD = C @ stains``; their
       ``max_percentile``-th percentiles over all pixels are the image's maxima;
    5. output ``clip(io * exp(-(C * ref_max / max) @ ref_stains), 0, 1)``.

    An image with fewer than ``min_tissue_pixels`` tissue pixels, a non-positive maximum or
    (numerically) parallel stain vectors is returned unchanged, as the numpy normaliser does.

    Computed in float32 whatever the dtype policy of the model (build it with
    ``dtype="float32"`` under mixed precision). The layer has no weights; the reference is part
    of its config.

    Args:
        stain_matrix: ``(2, 3)`` reference stain OD vectors (rows H, E), e.g.
            ``MacenkoNormalizer.stain_matrix``.
        max_concentrations: ``(2,)`` reference maximum concentrations.
        io: Transmitted-light intensity of the background in ``[0, 1]`` units.
        beta: OD threshold of tissue pixels.
        alpha: Angle percentile of the stain vectors.
        max_percentile: Percentile taken as maximum concentration.
        min_tissue_pixels: Fewest tissue pixels needed to normalise an image.
        **kwargs: Base ``Layer`` arguments (``name``, ``dtype``).

    Input shape:
        ``(B, H, W, 3)`` RGB float in ``[0, 1]`` (values outside are clipped); ``H`` and ``W``
        may be unknown.

    Output shape:
        ``(B, H, W, 3)`` float32 RGB in ``[0, 1]``.
    """

    def __init__(
        self,
        stain_matrix,
        max_concentrations,
        io=1.0,
        beta=0.15,
        alpha=1.0,
        max_percentile=99.0,
        min_tissue_pixels=100,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        stains, maxima = _check_reference(stain_matrix, max_concentrations)
        for key, value, valid, expected in (
            ("io", io, lambda x: 0 < x <= 1, "in (0, 1]"),
            ("beta", beta, lambda x: x >= 0, ">= 0"),
            ("alpha", alpha, lambda x: 0 <= x < 50, "in [0, 50)"),
            ("max_percentile", max_percentile, lambda x: 0 < x <= 100, "in (0, 100]"),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not valid(value):
                raise ValueError(f"`{key}` must be a float {expected}. Received: {key}={value!r}")
        if (
            isinstance(min_tissue_pixels, bool)
            or not isinstance(min_tissue_pixels, int)
            or min_tissue_pixels < 2
        ):
            raise ValueError(
                "`min_tissue_pixels` must be an int >= 2. "
                f"Received: min_tissue_pixels={min_tissue_pixels!r}"
            )
        self.stain_matrix = stains.tolist()
        self.max_concentrations = maxima.tolist()
        self.io = float(io)
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.max_percentile = float(max_percentile)
        self.min_tissue_pixels = int(min_tissue_pixels)

    def call(self, inputs):
        x = ops.clip(ops.cast(inputs, "float32"), 0.0, 1.0)
        shape = ops.shape(x)
        batch = shape[0]
        od = ops.maximum(-ops.log(ops.maximum(x, 1.0 / 255.0) / self.io), 0.0)
        od = ops.reshape(od, (batch, -1, 3))  # (B, N, 3)

        # Tissue pixels and the covariance of their optical densities.
        tissue = ops.cast(ops.all(od >= self.beta, axis=-1), "float32")  # (B, N)
        count = ops.sum(tissue, axis=1)  # (B,)
        enough = count >= float(self.min_tissue_pixels)
        safe_count = ops.maximum(count, 2.0)
        mask = ops.expand_dims(tissue, -1)
        mean = ops.sum(od * mask, axis=1, keepdims=True) / safe_count[:, None, None]
        centred = (od - mean) * mask
        cov = ops.einsum("bni,bnj->bij", centred, centred) / (safe_count[:, None, None] - 1.0)
        eye = ops.eye(3, dtype="float32")[None]
        cov = ops.where(enough[:, None, None], cov, eye * ops.arange(1.0, 4.0)[None, None, :])

        # Stain plane: the two leading eigenvectors (eigh sorts eigenvalues ascending).
        _, vectors = ops.eigh(cov)
        plane = ops.stack([vectors[:, :, 2], vectors[:, :, 1]], axis=-1)  # (B, 3, 2)
        flip = ops.where(ops.sum(plane, axis=1, keepdims=True) < 0, -1.0, 1.0)
        plane = plane * flip
        projected = ops.einsum("bni,bik->bnk", od, plane)
        angles = ops.arctan2(projected[..., 1], projected[..., 0])
        angles = ops.sort(ops.where(tissue > 0, angles, _BIG), axis=1)
        tissue_count = ops.maximum(count, 1.0)
        lo = _sorted_percentile(angles, tissue_count, self.alpha)
        hi = _sorted_percentile(angles, tissue_count, 100.0 - self.alpha)
        v_lo = ops.einsum("bik,bk->bi", plane, ops.stack([ops.cos(lo), ops.sin(lo)], axis=-1))
        v_hi = ops.einsum("bik,bk->bi", plane, ops.stack([ops.cos(hi), ops.sin(hi)], axis=-1))
        lo_is_h = (v_lo[:, 0] > v_hi[:, 0])[:, None]
        h_vec = ops.where(lo_is_h, v_lo, v_hi)
        e_vec = ops.where(lo_is_h, v_hi, v_lo)
        stains = ops.stack([h_vec, e_vec], axis=1)  # (B, 2, 3)
        stains = stains * ops.where(ops.sum(stains, axis=2, keepdims=True) < 0, -1.0, 1.0)
        stains = stains / ops.maximum(ops.norm(stains, axis=2, keepdims=True), 1e-12)

        # Least squares OD = C @ stains: C = OD @ S^T @ inv(S @ S^T), 2x2 inverse in closed form.
        gram = ops.einsum("bki,bli->bkl", stains, stains)
        a, b, d = gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1]
        det = a * d - b * b
        independent = det > 1e-6
        safe_det = ops.where(independent, det, 1.0)
        inverse = ops.stack([ops.stack([d, -b], -1), ops.stack([-b, a], -1)], 1)
        inverse = inverse / safe_det[:, None, None]
        conc = ops.einsum("bni,bki,bkl->bnl", od, stains, inverse)  # (B, N, 2)

        n_pixels = ops.cast(ops.shape(conc)[1], "float32") * ops.ones_like(count)
        conc_sorted = ops.sort(conc, axis=1)
        maxima = ops.stack(
            [
                _sorted_percentile(conc_sorted[..., k], n_pixels, self.max_percentile)
                for k in range(2)
            ],
            axis=-1,
        )  # (B, 2)
        positive = ops.all(maxima > 0, axis=-1)
        ok = enough & independent & positive
        scale = ops.convert_to_tensor(self.max_concentrations, "float32")[None] / ops.where(
            maxima > 0, maxima, 1.0
        )
        ref_stains = ops.convert_to_tensor(self.stain_matrix, "float32")
        out_od = ops.einsum("bnk,ki->bni", conc * scale[:, None, :], ref_stains)
        rgb = ops.clip(self.io * ops.exp(-out_od), 0.0, 1.0)
        rgb = ops.reshape(rgb, shape)
        return ops.where(ok[:, None, None, None], rgb, x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "stain_matrix": self.stain_matrix,
                "max_concentrations": self.max_concentrations,
                "io": self.io,
                "beta": self.beta,
                "alpha": self.alpha,
                "max_percentile": self.max_percentile,
                "min_tissue_pixels": self.min_tissue_pixels,
            }
        )
        return config

    @classmethod
    def from_normalizer(cls, normalizer, **kwargs) -> MacenkoNormalization:
        """The layer of a fitted :class:`~kerasnuc.data.stain.MacenkoNormalizer`.

        Raises:
            ValueError: the normaliser is not fitted.
        """
        if not normalizer.fitted:
            raise ValueError("`normalizer` must be fitted (call fit() or load() first)")
        return cls(
            stain_matrix=normalizer.stain_matrix,
            max_concentrations=normalizer.max_concentrations,
            io=normalizer.io,
            beta=normalizer.beta,
            alpha=normalizer.alpha,
            max_percentile=normalizer.max_percentile,
            min_tissue_pixels=normalizer.min_tissue_pixels,
            **kwargs,
        )
