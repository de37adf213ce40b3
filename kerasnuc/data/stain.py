"""Stain tools: HED colour deconvolution, HED augmentation and Macenko stain normalisation.

* :func:`rgb_to_hed` / :func:`hed_to_rgb`: colour deconvolution with the Ruifrok & Johnston
  haematoxylin-eosin-DAB matrix (A. C. Ruifrok and D. A. Johnston, "Quantification of
  histochemical staining by color deconvolution", Anal. Quant. Cytol. Histol. 23(4), 2001), as
  batched TensorFlow ops using the matrix and normalisation convention of scikit-image's
  ``skimage.color.rgb2hed`` / ``hed2rgb`` (scikit-image >= 0.19): RGB is floored at ``1e-6``, its
  natural log is divided by ``ln(1e-6)`` (so optical density ``OD = -ln(rgb)`` is expressed in
  units of ``-ln(1e-6) ~= 13.8``) and multiplied by the inverse stain matrix.
* :func:`hed_augment`: the HED colour augmentation of Tellez et al. 2018 ("Whole-slide mitosis
  detection in H&E breast histology using PHH3 as a reference to train distilled stain-invariant
  convolutional networks", IEEE TMI) used by Rumberger, Baumann, Hirsch et al. ("Panoptic
  segmentation with highly imbalanced semantic labels", CoNIC challenge, ISBI 2022): every HED
  channel is scaled and shifted at random, then the image goes back to RGB.
* :class:`MacenkoNormalizer`: stain normalisation of Macenko et al. 2009 ("A method for
  normalizing histology slides for quantitative analysis", ISBI 2009), in numpy.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from kerasnuc.fileutil import KerasnucError, write_json_atomic

logger = logging.getLogger(__name__)

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB; columns: OD in R, G, B), the
# values scikit-image uses for `rgb_from_hed`.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
# scikit-image floors RGB at this value before the log and divides the log by ln(RGB_FLOOR).
RGB_FLOOR = 1e-6
OD_UNIT = -math.log(RGB_FLOOR)


def _as_float_image(image: Any, name: str) -> tf.Tensor:
    image = tf.convert_to_tensor(image)
    if not image.dtype.is_floating:
        raise ValueError(
            f"`{name}` must be a float tensor in [0, 1] (convert uint8 with /255). "
            f"Received: dtype={image.dtype.name}"
        )
    if image.shape.rank is not None and (image.shape.rank < 1 or image.shape[-1] not in (3, None)):
        raise ValueError(
            f"`{name}` must have 3 channels in its last axis. Received: shape={image.shape}"
        )
    return tf.cast(image, tf.float32)


def rgb_to_hed(rgb: Any, clip_negative: bool = True) -> tf.Tensor:
    """RGB to haematoxylin-eosin-DAB stain space (Ruifrok & Johnston colour deconvolution).

    ``hed = (ln(max(rgb, 1e-6)) / ln(1e-6)) @ inv(RGB_FROM_HED)``, the convention of
    ``skimage.color.rgb2hed``; with ``clip_negative=True`` (as scikit-image) negative stain
    amounts are set to 0, which makes the conversion lossy for pixels whose colour lies outside
    the cone of the three stain vectors. Use ``clip_negative=False`` for an exact inverse of
    :func:`hed_to_rgb` (what :func:`hed_augment` does).

    Args:
        rgb: ``(..., 3)`` float tensor in ``[0, 1]``, e.g. ``(H, W, 3)`` or ``(B, H, W, 3)``.
        clip_negative: set negative stain amounts to 0 (scikit-image behaviour).

    Returns:
        ``(..., 3)`` float32 tensor of stain amounts (H, E, D) in units of ``-ln(1e-6)`` optical
        density.
    """
    rgb = _as_float_image(rgb, "rgb")
    log_rgb = tf.math.log(tf.maximum(rgb, RGB_FLOOR)) / tf.math.log(tf.constant(RGB_FLOOR))
    hed = tf.einsum("...i,ij->...j", log_rgb, tf.constant(HED_FROM_RGB, tf.float32))
    if clip_negative:
        hed = tf.maximum(hed, 0.0)
    return hed


def hed_to_rgb(hed: Any) -> tf.Tensor:
    """Haematoxylin-eosin-DAB stain space back to RGB (inverse of :func:`rgb_to_hed`).

    ``rgb = clip(exp(-(hed * -ln(1e-6)) @ RGB_FROM_HED), 0, 1)``, the convention of
    ``skimage.color.hed2rgb``.

    Args:
        hed: ``(..., 3)`` float tensor of stain amounts as returned by :func:`rgb_to_hed`.

    Returns:
        ``(..., 3)`` float32 RGB tensor in ``[0, 1]``.
    """
    hed = _as_float_image(hed, "hed")
    od = tf.einsum("...i,ij->...j", hed * OD_UNIT, tf.constant(RGB_FROM_HED, tf.float32))
    return tf.clip_by_value(tf.exp(-od), 0.0, 1.0)


def _image_or_batch(image: Any) -> tuple[tf.Tensor, int]:
    """``(float32 image tensor, rank)`` of an ``(H, W, 3)`` image or ``(B, H, W, 3)`` batch."""
    image = _as_float_image(image, "image")
    rank = image.shape.rank
    if rank not in (3, 4):
        raise ValueError(
            f"`image` must have shape (H, W, 3) or (B, H, W, 3). Received: shape={image.shape}"
        )
    return image, rank


def hed_augment(
    image: Any,
    seed: Any,
    alpha: float = 0.1,
    beta: float = 0.02,
) -> tf.Tensor:
    """Random HED stain augmentation (Tellez et al. 2018; Rumberger et al. 2022).

    The image is deconvolved into H, E, D stain amounts (:func:`rgb_to_hed` without clipping, so
    ``alpha = 1, beta = 0`` is the identity), each channel ``c`` is changed to
    ``h_c * alpha_c + beta_c`` with ``alpha_c ~ U[1 - alpha, 1 + alpha]`` and
    ``beta_c ~ U[-beta, beta]``, and the result is recombined to RGB and clipped to ``[0, 1]``.

    ``beta`` is in optical-density units (natural log), the unit of Tellez et al. and of
    scikit-image before 0.19; :func:`rgb_to_hed` expresses stains in units of ``-ln(1e-6)``, so
    the shift added there is ``beta_c / 13.8``. Rumberger et al. change stain intensities by 10 %
    at test time, hence the default ``alpha = 0.1``; the paper gives no training value for the
    shift, ``beta = 0.02`` OD is a slight one (Tellez's "HED-light" uses 0.05 for both).

    Args:
        image: ``(H, W, 3)`` or ``(B, H, W, 3)`` float tensor in ``[0, 1]``.
        seed: ``(2,)`` int32/int64 tensor, the seed of the stateless random ops; a batch gets
            different factors per image.
        alpha: half-width of the scale range, ``0 <= alpha < 1``.
        beta: half-width of the shift range in optical density, ``>= 0``.

    Returns:
        The augmented image, same shape, float32 in ``[0, 1]``.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"`alpha` must be in [0, 1). Received: alpha={alpha}")
    if beta < 0.0:
        raise ValueError(f"`beta` must be >= 0. Received: beta={beta}")
    image, rank = _image_or_batch(image)
    seed = tf.convert_to_tensor(seed)
    if rank == 4:
        factor_shape = tf.stack([tf.shape(image)[0], 1, 1, 3])
    else:
        factor_shape = tf.constant([1, 1, 3])
    seed_a = tf.random.experimental.stateless_fold_in(seed, 0)
    seed_b = tf.random.experimental.stateless_fold_in(seed, 1)
    scale = tf.random.stateless_uniform(factor_shape, seed_a, 1.0 - alpha, 1.0 + alpha)
    shift = tf.random.stateless_uniform(factor_shape, seed_b, -beta, beta) / OD_UNIT
    hed = rgb_to_hed(image, clip_negative=False)
    return hed_to_rgb(hed * scale + shift)


def _rotated_stain_matrix(seed: tf.Tensor, batch: tf.Tensor | None, max_angle: float):
    """``RGB_FROM_HED`` with the H and E vectors turned by random angles in ``[0, max_angle]``.

    Each of the two stain vectors ``v`` (unit OD vectors) becomes ``(v + tan(t) u) / |...|`` with
    ``u`` a random unit vector orthogonal to ``v`` and ``t ~ U[0, max_angle]`` (degrees), so
    the angle between old and new vector is ``t``; a component that would turn negative (light
    that no stain absorbs less than glass) is set to 0; the vector keeps its length. DAB is left
    alone.
    """
    base = tf.constant(RGB_FROM_HED, tf.float32)
    norm = tf.norm(base[:2], axis=-1, keepdims=True)
    lead = tf.zeros([0], tf.int32) if batch is None else tf.reshape(batch, [1])
    direction = tf.random.stateless_normal(
        tf.concat([lead, [2, 3]], 0), tf.random.experimental.stateless_fold_in(seed, 2)
    )
    angle = tf.random.stateless_uniform(
        tf.concat([lead, [2, 1]], 0),
        tf.random.experimental.stateless_fold_in(seed, 3),
        0.0,
        math.radians(max_angle),
    )
    v = base[:2] / norm
    u = direction - tf.reduce_sum(direction * v, -1, keepdims=True) * v
    u = u / tf.maximum(tf.norm(u, axis=-1, keepdims=True), 1e-6)
    turned = tf.maximum(v + tf.tan(angle) * u, 0.0)  # optical densities are never negative
    turned = turned / tf.norm(turned, axis=-1, keepdims=True) * norm
    dab = tf.broadcast_to(base[2:], tf.concat([lead, [1, 3]], 0))
    return tf.concat([turned, dab], axis=-2)


def stain_augment(
    image: Any,
    seed: Any,
    scale: tuple[float, float] = (0.5, 2.0),
    shift: float = 0.05,
    rotation: float = 10.0,
) -> tf.Tensor:
    """Strong random stain change: what separates the H&E of one lab from another's.

    The image is deconvolved into haematoxylin, eosin and DAB amounts (:func:`rgb_to_hed`
    without clipping). The H and E amounts are each multiplied by a factor drawn log-uniformly
    from ``scale`` (so x0.5 and x2 are equally likely around 1) and shifted by ``U[-shift,
    shift]`` optical density; the image is then recombined with H and E stain vectors turned by
    up to ``rotation`` degrees (a different haematoxylin or eosin hue), and clipped to ``[0, 1]``.
    This extends the HED augmentation of Tellez et al. 2018 (IEEE TMI, "Whole-slide mitosis
    detection in H&E breast histology using PHH3 as a reference...": HED-strong perturbs by up
    to 100 %) with the stain-vector change that Macenko et al. 2009 measure between slides.

    Args:
        image: ``(H, W, 3)`` or ``(B, H, W, 3)`` float in ``[0, 1]``.
        seed: ``(2,)`` int tensor of the stateless random ops (per image in a batch).
        scale: ``(low, high)`` factor range, ``0 < low <= high``.
        shift: half-width of the additive change in optical density, ``>= 0``.
        rotation: largest angle between old and new stain vector, degrees in ``[0, 45]``.

    Returns:
        Float32 image of the input shape in ``[0, 1]``.
    """
    lo, hi = (float(v) for v in scale)
    if not 0 < lo <= hi:
        raise ValueError(f"`scale` must be (low, high) with 0 < low <= high. Received: {scale}")
    if shift < 0:
        raise ValueError(f"`shift` must be >= 0. Received: shift={shift}")
    if not 0 <= rotation <= 45:
        raise ValueError(f"`rotation` must be in [0, 45] degrees. Received: rotation={rotation}")
    image, rank = _image_or_batch(image)
    seed = tf.convert_to_tensor(seed)
    batch = tf.shape(image)[0] if rank == 4 else None
    lead = tf.zeros([0], tf.int32) if batch is None else tf.reshape(batch, [1])
    shape = tf.concat([lead, [1, 1, 3]], 0)
    log_scale = tf.random.stateless_uniform(
        shape, tf.random.experimental.stateless_fold_in(seed, 0), math.log(lo), math.log(hi)
    )
    offset = tf.random.stateless_uniform(
        shape, tf.random.experimental.stateless_fold_in(seed, 1), -shift, shift
    )
    keep_dab = tf.constant([1.0, 1.0, 0.0])
    factor = tf.exp(log_scale * keep_dab)
    offset = offset * keep_dab / OD_UNIT
    hed = rgb_to_hed(image, clip_negative=False) * factor + offset
    matrix = _rotated_stain_matrix(seed, batch, rotation)
    od = tf.einsum("...hwi,...ij->...hwj", hed * OD_UNIT, matrix)
    return tf.clip_by_value(tf.exp(-od), 0.0, 1.0)


def _to_unit_float(image: np.ndarray, name: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 or float in [0, 1] -> float64 in [0, 1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise KerasnucError(
            f"`{name}` must be an (H, W, 3) RGB image. Received: shape={image.shape}"
        )
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image.astype(np.float64), 0.0, 1.0)
    raise KerasnucError(f"`{name}` must be uint8 or float in [0, 1]. Received: dtype={image.dtype}")


class MacenkoNormalizer:
    """Macenko et al. 2009 stain normalisation: fit on a reference, map other images onto it.

    Algorithm (per image):

    1. Optical density ``OD = -ln(max(I, 1/255) / io)`` per channel, clipped at 0, with ``I`` the
       RGB intensity in ``[0, 1]`` and ``io`` the intensity of unstained glass.
    2. Transparent pixels are dropped: a pixel is tissue when every channel has ``OD >= beta``.
    3. The two leading eigenvectors of the covariance of the tissue ODs span the stain plane;
       each tissue OD is projected onto it and its angle taken.
    4. The directions at the ``alpha``-th and ``(100 - alpha)``-th angle percentiles are the
       stain vectors; the one with the larger red OD is haematoxylin (rows ordered H, E).
    5. Concentrations of every pixel are the least-squares solution of ``OD = C @ stains``; the
       "maximum" concentration of a stain is its 99th percentile over all pixels.

    :meth:`transform` rescales an image's concentrations so that its maxima equal the
    reference's and recombines them with the reference stain vectors.

    Degenerate inputs: :meth:`fit` raises :class:`KerasnucError` when fewer than
    ``min_tissue_pixels`` pixels are tissue (an all-white tile has no stain to learn);
    :meth:`transform` returns such an image unchanged (a background tile needs no
    normalisation), logging it at INFO level.

    Args:
        io: transmitted-light intensity of the background in ``[0, 1]`` units (1.0 = white).
        beta: OD threshold below which a channel counts as transparent (paper: 0.15).
        alpha: angle percentile (paper: 1), the vectors are taken at ``alpha`` and ``100-alpha``.
        max_percentile: percentile taken as the maximum concentration (paper: 99).
        min_tissue_pixels: fewest tissue pixels needed to estimate stain vectors.
    """

    def __init__(
        self,
        io: float = 1.0,
        beta: float = 0.15,
        alpha: float = 1.0,
        max_percentile: float = 99.0,
        min_tissue_pixels: int = 100,
    ) -> None:
        if not 0.0 < io <= 1.0:
            raise ValueError(f"`io` must be in (0, 1]. Received: io={io}")
        if beta < 0.0:
            raise ValueError(f"`beta` must be >= 0. Received: beta={beta}")
        if not 0.0 <= alpha < 50.0:
            raise ValueError(f"`alpha` must be in [0, 50). Received: alpha={alpha}")
        if not 0.0 < max_percentile <= 100.0:
            raise ValueError(
                f"`max_percentile` must be in (0, 100]. Received: max_percentile={max_percentile}"
            )
        if int(min_tissue_pixels) < 2:
            raise ValueError(
                f"`min_tissue_pixels` must be an int >= 2. Received: "
                f"min_tissue_pixels={min_tissue_pixels}"
            )
        self.io = float(io)
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.max_percentile = float(max_percentile)
        self.min_tissue_pixels = int(min_tissue_pixels)
        self.stain_matrix: np.ndarray | None = None
        self.max_concentrations: np.ndarray | None = None

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`from_dict` with a fitted state) has been called."""
        return self.stain_matrix is not None

    def optical_density(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 or float [0, 1] RGB -> ``(H*W, 3)`` float64 OD, >= 0."""
        rgb = _to_unit_float(image, "image").reshape(-1, 3)
        return np.maximum(-np.log(np.maximum(rgb, 1.0 / 255.0) / self.io), 0.0)

    def stains_and_maxima(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Estimate stain vectors and maximum concentrations of one image.

        Args:
            image: ``(H, W, 3)`` uint8 or float RGB in ``[0, 1]``.

        Returns:
            ``(stain_matrix, max_concentrations)``: ``(2, 3)`` float64 unit OD vectors (rows H,
            E) and ``(2,)`` float64.

        Raises:
            KerasnucError: fewer than ``min_tissue_pixels`` tissue pixels.
        """
        od = self.optical_density(image)
        stains = self._stain_vectors(od)
        conc = self._concentrations(od, stains)
        maxima = np.percentile(conc, self.max_percentile, axis=0)
        if np.any(maxima <= 0):
            raise KerasnucError(
                f"Macenko: a stain has no positive concentration (maxima={maxima.tolist()})"
            )
        return stains, maxima

    def _stain_vectors(self, od: np.ndarray) -> np.ndarray:
        tissue = od[np.all(od >= self.beta, axis=1)]
        if tissue.shape[0] < self.min_tissue_pixels:
            raise KerasnucError(
                f"Macenko: only {tissue.shape[0]} tissue pixels (OD >= {self.beta} in every "
                f"channel), need at least {self.min_tissue_pixels}"
            )
        _, vectors = np.linalg.eigh(np.cov(tissue, rowvar=False))
        plane = vectors[:, [2, 1]]  # leading eigenvectors, largest first
        plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
        projected = tissue @ plane
        angles = np.arctan2(projected[:, 1], projected[:, 0])
        lo, hi = np.percentile(angles, [self.alpha, 100.0 - self.alpha])
        v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
        v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
        stains = np.stack([v_lo, v_hi] if v_lo[0] > v_hi[0] else [v_hi, v_lo])
        stains = stains * np.where(stains.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
        return stains / np.linalg.norm(stains, axis=1, keepdims=True)

    @staticmethod
    def _concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
        """``(N, 3)`` OD, ``(2, 3)`` stains -> ``(N, 2)`` least-squares concentrations."""
        return np.linalg.lstsq(stains.T, od.T, rcond=None)[0].T

    def fit(self, image: np.ndarray) -> MacenkoNormalizer:
        """Learn the reference stain vectors and maximum concentrations from ``image``.

        Args:
            image: ``(H, W, 3)`` uint8 or float RGB in ``[0, 1]``.

        Returns:
            ``self``.

        Raises:
            KerasnucError: too few tissue pixels.
        """
        self.stain_matrix, self.max_concentrations = self.stains_and_maxima(image)
        logger.debug(
            "Macenko reference: stains=%s maxima=%s",
            self.stain_matrix.tolist(),
            self.max_concentrations.tolist(),
        )
        return self

    def transform(self, image: np.ndarray) -> np.ndarray:
        """Normalise ``image`` to the reference stain appearance.

        Args:
            image: ``(H, W, 3)`` uint8 or float RGB in ``[0, 1]``.

        Returns:
            The normalised image with the input's shape and dtype (uint8 input -> rounded uint8;
            float input -> float in ``[0, 1]``). Returned unchanged when it has fewer than
            ``min_tissue_pixels`` tissue pixels.

        Raises:
            KerasnucError: the normaliser is not fitted.
        """
        if not self.fitted:
            raise KerasnucError("MacenkoNormalizer: call fit() (or load()) before transform()")
        od = self.optical_density(image)
        try:
            stains, maxima = self.stains_and_maxima(image)
        except KerasnucError as exc:
            logger.info("Macenko: image left unchanged (%s)", exc)
            return np.array(image, copy=True)
        conc = self._concentrations(od, stains) * (self.max_concentrations / maxima)
        rgb = np.clip(self.io * np.exp(-conc @ self.stain_matrix), 0.0, 1.0)
        rgb = rgb.reshape(np.shape(image))
        if np.asarray(image).dtype == np.uint8:
            return np.round(rgb * 255.0).astype(np.uint8)
        return rgb.astype(np.asarray(image).dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible state: parameters plus the fitted reference (None when unfitted)."""
        return {
            "method": "macenko",
            "io": self.io,
            "beta": self.beta,
            "alpha": self.alpha,
            "max_percentile": self.max_percentile,
            "min_tissue_pixels": self.min_tissue_pixels,
            "stain_matrix": None if self.stain_matrix is None else self.stain_matrix.tolist(),
            "max_concentrations": (
                None if self.max_concentrations is None else self.max_concentrations.tolist()
            ),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> MacenkoNormalizer:
        """Rebuild a normaliser from :meth:`to_dict` output.

        Raises:
            KerasnucError: the dict is not a Macenko state, has invalid parameters or arrays of
                the wrong shape.
        """
        if not isinstance(state, dict) or state.get("method") != "macenko":
            raise KerasnucError("not a Macenko normaliser state (missing 'method': 'macenko')")
        params = ("io", "beta", "alpha", "max_percentile", "min_tissue_pixels")
        unknown = set(state) - set(params) - {"method", "stain_matrix", "max_concentrations"}
        if unknown:
            raise KerasnucError(f"Macenko state has unknown keys: {sorted(unknown)}")
        try:
            norm = cls(**{k: state[k] for k in params if k in state})
        except (TypeError, ValueError) as exc:
            raise KerasnucError(f"invalid Macenko state: {exc}") from exc
        stains, maxima = state.get("stain_matrix"), state.get("max_concentrations")
        if (stains is None) != (maxima is None):
            raise KerasnucError(
                "Macenko state needs both 'stain_matrix' and 'max_concentrations' or neither"
            )
        if stains is not None:
            stains = np.asarray(stains, dtype=np.float64)
            maxima = np.asarray(maxima, dtype=np.float64)
            if stains.shape != (2, 3) or maxima.shape != (2,):
                raise KerasnucError(
                    "Macenko state: 'stain_matrix' must be 2x3 and 'max_concentrations' of "
                    f"length 2. Received: shapes {stains.shape} and {maxima.shape}"
                )
            norm.stain_matrix, norm.max_concentrations = stains, maxima
        return norm

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON to ``path`` atomically."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> MacenkoNormalizer:
        """Read a normaliser written by :meth:`save`.

        Raises:
            KerasnucError: the file is missing, not JSON or not a Macenko state.
        """
        path = Path(path)
        if not path.is_file():
            raise KerasnucError(f"{path}: file not found")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KerasnucError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(state)


def fit_macenko_reference(
    datasets: Any,
    split: str | None = "train",
    max_images: int = 64,
    max_pixels: int = 2_000_000,
    seed: int = 0,
    normalizer: MacenkoNormalizer | None = None,
) -> MacenkoNormalizer:
    """Fit a Macenko reference on the pooled pixels of a sample of training images.

    One image is a noisy reference (its stain vectors depend on the tissue it shows); pooling the
    pixels of many images gives the typical stain appearance of the training data. Images are
    drawn without replacement (seeded) from all datasets together; the pooled pixels are
    subsampled to ``max_pixels`` (seeded) and fitted as one ``(N, 1, 3)`` "image".

    Args:
        datasets: :class:`kerasnuc.data.dataset.Dataset` objects.
        split: split to draw from (None: all images).
        max_images: largest number of images used.
        max_pixels: largest number of pooled pixels used.
        seed: seed of both draws.
        normalizer: an unfitted normaliser with the parameters to use (default: defaults).

    Returns:
        The fitted normaliser.

    Raises:
        KerasnucError: no image in the split, or too little tissue in the pooled pixels.
    """
    if max_images < 1 or max_pixels < 2:
        raise ValueError(
            f"`max_images` must be >= 1 and `max_pixels` >= 2. Received: max_images={max_images}, "
            f"max_pixels={max_pixels}"
        )
    refs = [(ds, id) for ds in datasets for id in ds.split(split)]
    if not refs:
        raise KerasnucError(f"no images in split {split!r} to fit a Macenko reference on")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(refs), size=min(max_images, len(refs)), replace=False)
    pixels = np.concatenate([refs[k][0].image(refs[k][1]).reshape(-1, 3) for k in sorted(chosen)])
    if pixels.shape[0] > max_pixels:
        pixels = pixels[np.sort(rng.choice(pixels.shape[0], size=max_pixels, replace=False))]
    norm = normalizer if normalizer is not None else MacenkoNormalizer()
    return norm.fit(pixels[:, None, :])
