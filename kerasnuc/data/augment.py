"""Joint image + label-map augmentation as pure, seeded TensorFlow ops (runs in ``tf.data``).

The augmentations are those of Rumberger, Baumann, Hirsch et al., "Panoptic segmentation with
highly imbalanced semantic labels" (CoNIC challenge, ISBI 2022):
mirroring, 90-degree rotations, translation, scaling/zoom, rotation, shear and elastic
deformation (Simard et al. 2003, "Best practices for convolutional neural networks applied to
visual document analysis"), HED stain augmentation (Tellez et al. 2018, see
:mod:`kerasnuc.data.stain`), RGB colour jitter, Gaussian blur and slight Gaussian noise. The paper
names them without ranges; the ranges of :class:`AugmentConfig` are ours (documented there).

Design:

* :func:`augment` is the only entry point: ``(image, labels, seed, config) -> (image, labels)``.
  Every random draw uses a stateless op whose seed is folded from the ``(2,)`` ``seed`` with a
  fixed per-draw index, so the output is a pure function of its inputs (``tf.data`` derives a
  seed per element, see the example in :func:`augment`).
* Geometry: flips, 90-degree rotations, scale, shear, rotation and translation are composed into
  one affine map about the image centre; the elastic displacement field is added to the output
  grid before that map. The result is one dense sampling grid (source coordinate of every output
  pixel), read once: bilinear for the image, nearest for every label channel, so labels are only
  ever copied, never interpolated (instance ids survive; some may vanish when their nucleus
  leaves the field of view). Nearest sampling moves boundary pixels, so under strong elastic
  deformation a one-pixel protrusion can end up touching its nucleus only diagonally. When no
  geometric op fires, the inputs pass through untouched.
* Borders: labels read 0 (background) outside the source image. The image reads ``fill_value``
  (``fill_mode="constant"``, the default, as HoVer-Net's imgaug pipeline) so that image and labels
  agree that there is no nucleus there, or mirrored content (``fill_mode="reflect"``); reflected
  nuclei are then labelled background, which suits pipelines that crop the centre afterwards.
  Labels are never reflected: a mirrored copy of a nucleus would repeat its instance id.
* Colour ops follow the geometry, so they also touch the filled border and the noise is not
  smoothed by the resampling: HED stain change, colour jitter (brightness, contrast, saturation,
  hue in that order), emboss, sharpen, channel shuffle (the ``panoptic`` augmentations of Liu et
  al. 2019, off by default), Gaussian blur, Gaussian noise; the image is clipped to ``[0, 1]``
  after each.

One cohesive concept: the joint geometric and colour augmentation is one seeded TF function;
splitting it would split the order of its operations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import tensorflow as tf

from kerasnuc.config import check_field_types
from kerasnuc.data.stain import hed_augment, stain_augment
from kerasnuc.fileutil import KerasnucError

FILL_MODES = ("constant", "reflect")
PRESETS = ("default", "none", "panoptic", "stain")

# Fixed fold-in index per random draw: adding an op never changes the draws of the others.
_FLIP_LR, _FLIP_UD, _ROT90, _ROT90_K = 0, 1, 2, 3
_TRANSLATE, _TRANSLATE_V, _SCALE, _SCALE_V = 4, 5, 6, 7
_ROTATE, _ROTATE_V, _SHEAR, _SHEAR_V = 8, 9, 10, 11
_ELASTIC, _ELASTIC_V, _ELASTIC_FIELD = 12, 13, 14
_HED, _HED_V = 15, 16
_JITTER, _BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 17, 18, 19, 20, 21
_BLUR, _BLUR_V, _NOISE, _NOISE_V, _NOISE_FIELD = 22, 23, 24, 25, 26
_EMBOSS, _EMBOSS_ALPHA, _EMBOSS_V, _SHARPEN, _SHARPEN_ALPHA, _SHARPEN_V = 27, 28, 29, 30, 31, 32
_SHUFFLE, _SHUFFLE_V = 33, 34
_STAIN, _STAIN_V, _JPEG, _JPEG_V = 35, 36, 37, 38

_RANGE_FIELDS = (
    "translate",
    "scale",
    "rotate",
    "shear",
    "elastic_alpha",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "blur_sigma",
    "noise_std",
    "emboss_alpha",
    "emboss_strength",
    "sharpen_alpha",
    "sharpen_lightness",
    "stain_scale",
    "jpeg_quality",
)
_PROB_FIELDS = (
    "flip_prob",
    "rot90_prob",
    "translate_prob",
    "scale_prob",
    "rotate_prob",
    "shear_prob",
    "elastic_prob",
    "hed_prob",
    "jitter_prob",
    "blur_prob",
    "noise_prob",
    "emboss_prob",
    "sharpen_prob",
    "channel_shuffle_prob",
    "stain_prob",
    "jpeg_prob",
)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of every augmentation; ``(lo, hi)`` ranges are sampled uniformly.

    Rumberger et al. 2022 list the operations but not their ranges; the defaults below are ours:
    HED scale +-10 % (the stain-intensity change the paper uses at test time) and the geometric
    ranges of HoVer-Net (Graham et al. 2019: scale 0.8-1.2, shear +-5 degrees), with mild colour
    changes since the HED augmentation already varies the stain.

    Attributes:
        flip_prob: probability of a left-right flip, and independently of an up-down flip.
        rot90_prob: probability of a rotation by 90, 180 or 270 degrees (equally likely); 0.75
            makes all four orientations equally likely. Counter-clockwise, as ``np.rot90``. On a
            non-square image the corners leave the frame (the output keeps its shape).
        translate_prob, translate: shift per axis as a fraction of the image height (rows) and
            width (columns), drawn independently; positive moves content down / right.
        scale_prob, scale: zoom factor about the centre; 2.0 doubles the size of the content.
        rotate_prob, rotate: rotation in degrees, counter-clockwise as displayed.
        shear_prob, shear: shear angles in degrees, drawn independently for both axes; the
            range must lie inside (-45, 45).
        elastic_prob, elastic_alpha, elastic_sigma: elastic deformation; the displacement of
            each pixel is white Gaussian noise smoothed by a Gaussian of ``elastic_sigma`` pixels
            and scaled so that its standard deviation per axis is ``elastic_alpha`` pixels.
        fill_mode, fill_value: image content outside the source: ``"constant"`` (``fill_value``)
            or ``"reflect"`` (mirrored, edge pixel repeated). Labels always read 0 there.
        hed_prob, hed_alpha, hed_beta: HED stain augmentation, per stain channel
            ``h * U[1 - hed_alpha, 1 + hed_alpha] + U[-hed_beta, hed_beta]`` (``hed_beta`` in
            optical-density units, see :func:`kerasnuc.data.stain.hed_augment`).
        jitter_prob: probability of the colour jitter, which then applies all four of:
        brightness: additive change in ``[-1, 1]``.
        contrast: factor about the per-channel mean (``tf.image.adjust_contrast``), ``>= 0``.
        saturation: factor in HSV space (``tf.image.adjust_saturation``), ``>= 0``.
        hue: hue rotation as a fraction of the colour circle, within ``[-0.5, 0.5]``.
        blur_prob, blur_sigma: Gaussian blur with this standard deviation in pixels (> 0).
        noise_prob, noise_std: additive Gaussian noise with this standard deviation (>= 0).
        emboss_prob, emboss_alpha, emboss_strength: emboss (Liu et al. 2019, ``panoptic``),
            imgaug's 3x3 kernel ``[[-1-s, -s, 0], [-s, 1, s], [0, s, 1+s]]`` per channel,
            blended as ``(1 - alpha) x + alpha emboss(x)``.
        sharpen_prob, sharpen_alpha, sharpen_lightness: sharpening (``panoptic``), imgaug's
            kernel ``(1 - alpha) I + alpha [[-1, -1, -1], [-1, 8 + L, -1], [-1, -1, -1]]``.
        channel_shuffle_prob: random permutation of the RGB channels (``panoptic``).
        The last three default to probability 0 (not part of the conic augmentations); see
        :meth:`preset` ``"panoptic"``.
        stain_prob, stain_scale, stain_shift, stain_rotation: strong stain change between labs
            (:func:`kerasnuc.data.stain.stain_augment`): H and E amounts times a log-uniform
            factor in ``stain_scale``, plus ``U[-stain_shift, stain_shift]`` OD, stain vectors
            turned by up to ``stain_rotation`` degrees. Applied before the HED augmentation.
        jpeg_prob, jpeg_quality: JPEG compression at a quality drawn from ``jpeg_quality``
            (integers in ``[1, 100]``), applied last: the artefacts of scanners' compressed
            tiles. Both default to probability 0; see :meth:`preset` ``"stain"``.
    """

    flip_prob: float = 0.5
    rot90_prob: float = 0.75
    translate_prob: float = 0.5
    translate: tuple[float, float] = (-0.1, 0.1)
    scale_prob: float = 0.5
    scale: tuple[float, float] = (0.8, 1.2)
    rotate_prob: float = 0.5
    rotate: tuple[float, float] = (-45.0, 45.0)
    shear_prob: float = 0.3
    shear: tuple[float, float] = (-5.0, 5.0)
    elastic_prob: float = 0.3
    elastic_alpha: tuple[float, float] = (1.0, 2.0)
    elastic_sigma: float = 8.0
    fill_mode: str = "constant"
    fill_value: float = 0.0
    hed_prob: float = 1.0
    hed_alpha: float = 0.1
    hed_beta: float = 0.02
    jitter_prob: float = 0.5
    brightness: tuple[float, float] = (-0.1, 0.1)
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: tuple[float, float] = (-0.04, 0.04)
    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    noise_prob: float = 0.2
    noise_std: tuple[float, float] = (0.01, 0.03)
    emboss_prob: float = 0.0
    emboss_alpha: tuple[float, float] = (0.0, 0.5)
    emboss_strength: tuple[float, float] = (0.0, 1.0)
    sharpen_prob: float = 0.0
    sharpen_alpha: tuple[float, float] = (0.0, 0.5)
    sharpen_lightness: tuple[float, float] = (0.75, 1.25)
    channel_shuffle_prob: float = 0.0
    stain_prob: float = 0.0
    stain_scale: tuple[float, float] = (0.5, 2.0)
    stain_shift: float = 0.05
    stain_rotation: float = 10.0
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[float, float] = (40.0, 95.0)

    def __post_init__(self) -> None:
        for name in _PROB_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"`{name}` must be a float in [0, 1]. Received: {name}={value!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be a float in [0, 1]. Received: {name}={value}")
            object.__setattr__(self, name, float(value))
        for name in _RANGE_FIELDS:
            value = getattr(self, name)
            ok = (
                isinstance(value, list | tuple)
                and len(value) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
                and all(math.isfinite(v) for v in value)
                and value[0] <= value[1]
            )
            if not ok:
                raise ValueError(
                    f"`{name}` must be a (low, high) pair of finite floats with low <= high. "
                    f"Received: {name}={value!r}"
                )
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        self._check_range("scale", lo=0.0, open_lo=True)
        self._check_range("shear", lo=-45.0, hi=45.0, open_lo=True, open_hi=True)
        self._check_range("elastic_alpha", lo=0.0)
        self._check_range("brightness", lo=-1.0, hi=1.0)
        self._check_range("contrast", lo=0.0)
        self._check_range("saturation", lo=0.0)
        self._check_range("hue", lo=-0.5, hi=0.5)
        self._check_range("blur_sigma", lo=0.0, open_lo=True)
        self._check_range("noise_std", lo=0.0)
        self._check_range("emboss_alpha", lo=0.0, hi=1.0)
        self._check_range("sharpen_alpha", lo=0.0, hi=1.0)
        self._check_range("stain_scale", lo=0.0, open_lo=True)
        self._check_range("jpeg_quality", lo=1.0, hi=100.0)
        if not (isinstance(self.stain_shift, int | float) and self.stain_shift >= 0):
            raise ValueError(
                f"`stain_shift` must be >= 0. Received: stain_shift={self.stain_shift}"
            )
        if not (isinstance(self.stain_rotation, int | float) and 0 <= self.stain_rotation <= 45):
            raise ValueError(
                "`stain_rotation` must be in [0, 45]. "
                f"Received: stain_rotation={self.stain_rotation}"
            )
        if not (isinstance(self.elastic_sigma, int | float) and self.elastic_sigma > 0):
            raise ValueError(
                f"`elastic_sigma` must be a float > 0. Received: elastic_sigma={self.elastic_sigma}"
            )
        if self.fill_mode not in FILL_MODES:
            raise ValueError(
                f"`fill_mode` must be one of {FILL_MODES}. Received: fill_mode={self.fill_mode!r}"
            )
        if not 0.0 <= self.hed_alpha < 1.0:
            raise ValueError(f"`hed_alpha` must be in [0, 1). Received: hed_alpha={self.hed_alpha}")
        if self.hed_beta < 0.0:
            raise ValueError(f"`hed_beta` must be >= 0. Received: hed_beta={self.hed_beta}")
        for name in (
            "elastic_sigma",
            "fill_value",
            "hed_alpha",
            "hed_beta",
            "stain_shift",
            "stain_rotation",
        ):
            object.__setattr__(self, name, float(getattr(self, name)))

    def _check_range(
        self,
        name: str,
        lo: float = -math.inf,
        hi: float = math.inf,
        open_lo: bool = False,
        open_hi: bool = False,
    ) -> None:
        low, high = getattr(self, name)
        bad_lo = low <= lo if open_lo else low < lo
        bad_hi = high >= hi if open_hi else high > hi
        if bad_lo or bad_hi:
            bounds = f"{'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
            raise ValueError(f"`{name}` must lie within {bounds}. Received: {name}={(low, high)}")

    @property
    def geometric(self) -> bool:
        """Whether any geometric op can fire (else labels are returned as given)."""
        return any(
            getattr(self, n) > 0
            for n in (
                "flip_prob",
                "rot90_prob",
                "translate_prob",
                "scale_prob",
                "rotate_prob",
                "shear_prob",
                "elastic_prob",
            )
        )

    @classmethod
    def none(cls) -> AugmentConfig:
        """The identity preset: every probability is 0."""
        return cls(**{name: 0.0 for name in _PROB_FIELDS})

    @classmethod
    def panoptic(cls) -> AugmentConfig:
        """The augmentations of Liu et al. 2019 (TCGA-Kumar): flips, 90-degree rotations, blur,
        Gaussian noise, emboss, sharpen and channel shuffle (probabilities and ranges ours:
        0.5 for flips, all four orientations equally likely, 0.2 for each photometric op)."""
        none = cls.none().to_dict()
        none.update(
            flip_prob=0.5,
            rot90_prob=0.75,
            blur_prob=0.2,
            noise_prob=0.2,
            emboss_prob=0.2,
            sharpen_prob=0.2,
            channel_shuffle_prob=0.2,
        )
        return cls.from_dict(none)

    @classmethod
    def stain(cls) -> AugmentConfig:
        """The defaults plus the stain variation of real labs (the ``default`` model's recipe).

        Stain amounts x0.4 .. x2.5 with stain vectors turned by up to 12 degrees (half the
        time), the HED jitter of the defaults, wider colour jitter (hue +-0.1, saturation
        0.6-1.6, brightness +-0.15, contrast 0.6-1.4, 80 % of the time), blur (30 %) and JPEG
        quality 30-95 (30 %). Ranges chosen to cover the shifts of
        ``benchmarks/stain_shift.py`` (H x0.5 and x1.8, E x2, hue +-0.08, saturation x1.6) with
        margin, not tuned on them.
        """
        return dataclasses.replace(
            cls(),
            stain_prob=0.5,
            stain_scale=(0.4, 2.5),
            stain_shift=0.05,
            stain_rotation=12.0,
            jitter_prob=0.8,
            brightness=(-0.15, 0.15),
            contrast=(0.6, 1.4),
            saturation=(0.6, 1.6),
            hue=(-0.1, 0.1),
            blur_prob=0.3,
            blur_sigma=(0.5, 2.0),
            jpeg_prob=0.3,
            jpeg_quality=(30.0, 95.0),
        )

    @classmethod
    def preset(cls, name: str) -> AugmentConfig:
        """A named preset: ``"default"`` (the training defaults), ``"none"``, ``"panoptic"`` or
        ``"stain"`` (:meth:`stain`)."""
        if name == "default":
            return cls()
        if name == "none":
            return cls.none()
        if name == "panoptic":
            return cls.panoptic()
        if name == "stain":
            return cls.stain()
        raise ValueError(f"`name` must be one of {PRESETS}. Received: name={name!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (ranges as 2-element lists)."""
        out = dataclasses.asdict(self)
        for name in _RANGE_FIELDS:
            out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        """Inverse of :meth:`to_dict`; missing keys take their defaults.

        Raises:
            KerasnucError: unknown keys or invalid values.
        """
        if not isinstance(data, dict):
            raise KerasnucError(f"augmentation config must be a JSON object. Received: {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KerasnucError(f"unknown augmentation config keys: {unknown}")
        try:
            check_field_types(cls, data)
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise KerasnucError(f"invalid augmentation config: {exc}") from exc


# ----------------------------------------------------------------------------- random draws


def _seed(seed: tf.Tensor, index: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(seed, index)


def _coin(seed: tf.Tensor, index: int, prob: float) -> tf.Tensor:
    """Scalar bool, True with probability ``prob``."""
    return tf.random.stateless_uniform([], _seed(seed, index), dtype=tf.float64) < prob


def _uniform(
    seed: tf.Tensor, index: int, bounds: tuple[float, float], shape: tuple[int, ...] = ()
) -> tf.Tensor:
    """float64 tensor uniform in ``[lo, hi]`` (exactly ``lo`` when ``lo == hi``)."""
    lo, hi = bounds
    u = tf.random.stateless_uniform(shape, _seed(seed, index), dtype=tf.float64)
    return lo + (hi - lo) * u


# ----------------------------------------------------------------------------- geometry


def _inverse_affine(
    seed: tf.Tensor, config: AugmentConfig, height: tf.Tensor, width: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Draw the affine map; return its inverse linear part and its translation.

    The forward map (source -> output, centred coordinates, ``(row, col)`` order) is
    ``p = R(rotate) @ Shear @ Scale @ Rot90 @ Flip @ q + t``; returned are ``inv(R @ ... @ Flip)``
    as a ``(2, 2)`` float64 and ``t`` as a ``(2,)`` float64 in pixels.
    """
    f64 = tf.float64
    one = tf.constant(1.0, f64)
    eye = tf.eye(2, dtype=f64)

    # Flips are their own inverse: diag(sy, sx).
    sy = sx = one
    if config.flip_prob > 0:
        sy = tf.where(_coin(seed, _FLIP_UD, config.flip_prob), -one, one)
        sx = tf.where(_coin(seed, _FLIP_LR, config.flip_prob), -one, one)
    flip = tf.stack([tf.stack([sy, 0 * sy]), tf.stack([0 * sx, sx])])

    # Counter-clockwise rotation by k * 90 degrees in (row, col) = [[c, -s], [s, c]]; inverse = T.
    rot90_inv = eye
    if config.rot90_prob > 0:
        k = tf.random.stateless_uniform([], _seed(seed, _ROT90_K), 1, 4, dtype=tf.int32)
        k = tf.where(_coin(seed, _ROT90, config.rot90_prob), k, 0)
        table = tf.constant(
            [[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]]], f64
        )
        rot90_inv = tf.transpose(tf.gather(table, k))

    scale_inv = eye
    if config.scale_prob > 0:
        s = tf.where(
            _coin(seed, _SCALE, config.scale_prob), _uniform(seed, _SCALE_V, config.scale), one
        )
        scale_inv = eye / s

    shear_inv = eye
    if config.shear_prob > 0:
        angles = _uniform(seed, _SHEAR_V, config.shear, (2,)) * (math.pi / 180.0)
        angles = tf.where(_coin(seed, _SHEAR, config.shear_prob), angles, tf.zeros_like(angles))
        # Shear [[1, a], [b, 1]]: row += a * col, col += b * row.
        a, b = tf.tan(angles[0]), tf.tan(angles[1])
        shear_inv = tf.stack([tf.stack([one, -a]), tf.stack([-b, one])]) / (1.0 - a * b)

    rotate_inv = eye
    if config.rotate_prob > 0:
        theta = _uniform(seed, _ROTATE_V, config.rotate) * (math.pi / 180.0)
        theta = tf.where(_coin(seed, _ROTATE, config.rotate_prob), theta, tf.zeros_like(theta))
        c, s = tf.cos(theta), tf.sin(theta)
        rotate_inv = tf.stack([tf.stack([c, s]), tf.stack([-s, c])])

    shift = tf.zeros([2], f64)
    if config.translate_prob > 0:
        frac = _uniform(seed, _TRANSLATE_V, config.translate, (2,))
        size = tf.cast(tf.stack([height, width]), f64)
        shift = tf.where(_coin(seed, _TRANSLATE, config.translate_prob), frac * size, shift)

    linear_inv = flip @ rot90_inv @ scale_inv @ shear_inv @ rotate_inv
    return linear_inv, shift


def _gaussian_kernel(sigma: tf.Tensor | float, radius: int) -> tf.Tensor:
    """``(2 * radius + 1,)`` float32 normalised Gaussian."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(x / tf.cast(sigma, tf.float32)))
    return k / tf.reduce_sum(k)


def _separable_conv(x: tf.Tensor, kernel: tf.Tensor, padding: str) -> tf.Tensor:
    """Depthwise 2D convolution of ``(1, H, W, C)`` with ``outer(kernel, kernel)``."""
    channels = x.shape[-1]
    size = tf.shape(kernel)[0]
    kv = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    kh = tf.reshape(kv, tf.stack([1, size, channels, 1]))
    x = tf.nn.depthwise_conv2d(x, kv, [1, 1, 1, 1], padding)
    return tf.nn.depthwise_conv2d(x, kh, [1, 1, 1, 1], padding)


def _elastic_field(
    seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor, alpha: tf.Tensor, sigma: float
) -> tf.Tensor:
    """``(H, W, 2)`` float32 smooth displacement with standard deviation ``alpha`` per axis.

    White N(0, 1) noise on a grid padded by the kernel radius, smoothed by a separable Gaussian
    (valid convolution, so no border effect). A normalised kernel ``k`` leaves noise with
    standard deviation ``sum(outer(k, k) ** 2) ** 0.5 = sum(k ** 2)``, which is divided out.
    """
    radius = max(1, math.ceil(3.0 * sigma))
    kernel = _gaussian_kernel(sigma, radius)
    noise = tf.random.stateless_normal(
        tf.stack([1, height + 2 * radius, width + 2 * radius, 2]), _seed(seed, _ELASTIC_FIELD)
    )
    field = _separable_conv(noise, kernel, "VALID")[0]
    return field * (tf.cast(alpha, tf.float32) / tf.reduce_sum(tf.square(kernel)))


def _reflect_index(index: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Mirror integer indices into ``[0, size)`` with the edge repeated (``dcba|abcd|dcba``)."""
    period = 2 * size
    m = tf.math.floormod(index, period)
    return tf.where(m < size, m, period - 1 - m)


def warp(
    image: tf.Tensor,
    labels: tf.Tensor,
    coords: tf.Tensor,
    fill_mode: str = "constant",
    fill_value: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Resample an image (bilinear) and its label maps (nearest) at source coordinates.

    Pixel ``(i, j)`` has its centre at coordinate ``(i, j)``. Output pixel ``(i, j)`` reads the
    source at ``coords[i, j] = (row, col)``; labels take the value of the pixel whose centre is
    nearest (halves round up) and 0 outside the source; the image interpolates its four
    neighbours, which outside the source read ``fill_value`` (``"constant"``) or the mirrored
    image (``"reflect"``, edge repeated).

    Args:
        image: ``(H, W, C)`` float32.
        labels: ``(H, W, K)`` integer label maps.
        coords: ``(H2, W2, 2)`` float32 source coordinates ``(row, col)``.
        fill_mode: ``"constant"`` or ``"reflect"``.
        fill_value: image value outside the source for ``"constant"``.

    Returns:
        ``(H2, W2, C)`` float32 image and ``(H2, W2, K)`` labels of the input dtype.
    """
    if fill_mode not in FILL_MODES:
        raise ValueError(
            f"`fill_mode` must be one of {FILL_MODES}. Received: fill_mode={fill_mode!r}"
        )
    size = tf.shape(image)[:2]
    # A one-pixel ring of fill around the source: indices clamped to [-1, size] then read the
    # fill for every position outside, with one gather and no masks.
    ring = [[1, 1], [1, 1], [0, 0]]

    # Labels: nearest neighbour, 0 outside.
    near = tf.cast(tf.floor(coords + 0.5), tf.int32)
    label_out = tf.gather_nd(tf.pad(labels, ring), tf.clip_by_value(near, -1, size) + 1)

    # Image: bilinear over the four neighbours, gathered at once as (4, H2, W2, C).
    base = tf.floor(coords)
    corners = (
        tf.cast(base, tf.int32)[None]
        + tf.constant([[0, 0], [0, 1], [1, 0], [1, 1]], tf.int32)[:, None, None, :]
    )
    if fill_mode == "reflect":
        rows = _reflect_index(corners[..., 0], size[0])
        cols = _reflect_index(corners[..., 1], size[1])
        values = tf.gather_nd(image, tf.stack([rows, cols], axis=-1))
    else:
        padded = tf.pad(image, ring, constant_values=tf.cast(fill_value, image.dtype))
        values = tf.gather_nd(padded, tf.clip_by_value(corners, -1, size) + 1)
    wy, wx = tf.unstack(coords - base, axis=-1)
    weights = tf.stack([(1.0 - wy) * (1.0 - wx), (1.0 - wy) * wx, wy * (1.0 - wx), wy * wx])
    return tf.reduce_sum(weights[..., None] * values, axis=0), label_out


def _geometric(
    image: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, config: AugmentConfig
) -> tuple[tf.Tensor, tf.Tensor]:
    size = tf.shape(image)[:2]
    height, width = size[0], size[1]
    linear_inv, shift = _inverse_affine(seed, config, height, width)
    identity = tf.reduce_all(tf.equal(linear_inv, tf.eye(2, dtype=tf.float64))) & tf.reduce_all(
        tf.equal(shift, 0.0)
    )

    elastic = tf.constant(False)
    if config.elastic_prob > 0 and config.elastic_alpha[1] > 0:
        elastic = _coin(seed, _ELASTIC, config.elastic_prob)

    def resample() -> tuple[tf.Tensor, tf.Tensor]:
        rows = tf.range(height, dtype=tf.float32)
        cols = tf.range(width, dtype=tf.float32)
        grid = tf.stack(tf.meshgrid(rows, cols, indexing="ij"), axis=-1)
        if config.elastic_prob > 0 and config.elastic_alpha[1] > 0:
            alpha = _uniform(seed, _ELASTIC_V, config.elastic_alpha)
            grid += tf.cond(
                elastic,
                lambda: _elastic_field(seed, height, width, alpha, config.elastic_sigma),
                lambda: tf.zeros_like(grid),
            )
        centre = (tf.cast(size, tf.float32) - 1.0) / 2.0
        offset = centre + tf.cast(shift, tf.float32)
        coords = tf.einsum("hwj,ij->hwi", grid - offset, tf.cast(linear_inv, tf.float32)) + centre
        return warp(image, labels, coords, config.fill_mode, config.fill_value)

    return tf.cond(identity & ~elastic, lambda: (image, labels), resample)


# ----------------------------------------------------------------------------- colour


def _gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, max_sigma: float) -> tf.Tensor:
    """Blur ``(H, W, C)`` with a Gaussian of ``sigma`` pixels, symmetric padding at the borders."""
    radius = max(1, math.ceil(3.0 * max_sigma))
    padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "SYMMETRIC")
    return _separable_conv(padded, _gaussian_kernel(sigma, radius), "VALID")[0]


def _filter3x3(image: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Correlate every channel of ``(H, W, C)`` with one ``(3, 3)`` kernel (symmetric padding)."""
    padded = tf.pad(image[None], [[0, 0], [1, 1], [1, 1], [0, 0]], "SYMMETRIC")
    channels = tf.shape(image)[-1]
    depthwise = tf.tile(tf.reshape(kernel, (3, 3, 1, 1)), tf.stack([1, 1, channels, 1]))
    return tf.nn.depthwise_conv2d(padded, depthwise, [1, 1, 1, 1], "VALID")[0]


def _colour(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    def maybe(index: int, prob: float, fn: Any, x: tf.Tensor) -> tf.Tensor:
        if prob <= 0:
            return x
        return tf.cond(_coin(seed, index, prob), lambda: fn(x), lambda: x)

    def hed(x: tf.Tensor) -> tf.Tensor:
        return hed_augment(x, _seed(seed, _HED_V), config.hed_alpha, config.hed_beta)

    def jitter(x: tf.Tensor) -> tf.Tensor:
        f32 = tf.float32
        x = x + tf.cast(_uniform(seed, _BRIGHTNESS, config.brightness), f32)
        x = tf.clip_by_value(x, 0.0, 1.0)
        x = tf.image.adjust_contrast(x, tf.cast(_uniform(seed, _CONTRAST, config.contrast), f32))
        x = tf.clip_by_value(x, 0.0, 1.0)
        x = tf.image.adjust_saturation(
            x, tf.cast(_uniform(seed, _SATURATION, config.saturation), f32)
        )
        x = tf.image.adjust_hue(x, tf.cast(_uniform(seed, _HUE, config.hue), f32))
        return tf.clip_by_value(x, 0.0, 1.0)

    def blur(x: tf.Tensor) -> tf.Tensor:
        sigma = _uniform(seed, _BLUR_V, config.blur_sigma)
        return tf.clip_by_value(_gaussian_blur(x, sigma, config.blur_sigma[1]), 0.0, 1.0)

    def noise(x: tf.Tensor) -> tf.Tensor:
        std = tf.cast(_uniform(seed, _NOISE_V, config.noise_std), tf.float32)
        field = tf.random.stateless_normal(tf.shape(x), _seed(seed, _NOISE_FIELD))
        return tf.clip_by_value(x + std * field, 0.0, 1.0)

    def emboss(x: tf.Tensor) -> tf.Tensor:
        a = tf.cast(_uniform(seed, _EMBOSS_ALPHA, config.emboss_alpha), tf.float32)
        st = tf.cast(_uniform(seed, _EMBOSS_V, config.emboss_strength), tf.float32)
        kernel = tf.stack(
            [[-1.0 - st, -st, 0.0 * st], [-st, 1.0 + 0.0 * st, st], [0.0 * st, st, 1.0 + st]]
        )
        return tf.clip_by_value((1.0 - a) * x + a * _filter3x3(x, kernel), 0.0, 1.0)

    def sharpen(x: tf.Tensor) -> tf.Tensor:
        a = tf.cast(_uniform(seed, _SHARPEN_ALPHA, config.sharpen_alpha), tf.float32)
        light = tf.cast(_uniform(seed, _SHARPEN_V, config.sharpen_lightness), tf.float32)
        effect = -tf.ones((3, 3)) + tf.scatter_nd([[1, 1]], [9.0 + light], (3, 3))
        identity = tf.scatter_nd([[1, 1]], [1.0], (3, 3))
        kernel = (1.0 - a) * identity + a * effect
        return tf.clip_by_value(_filter3x3(x, kernel), 0.0, 1.0)

    def shuffle(x: tf.Tensor) -> tf.Tensor:
        order = tf.argsort(tf.random.stateless_uniform([3], _seed(seed, _SHUFFLE_V)))
        return tf.gather(x, order, axis=-1)

    def stain(x: tf.Tensor) -> tf.Tensor:
        return stain_augment(
            x, _seed(seed, _STAIN_V), config.stain_scale, config.stain_shift, config.stain_rotation
        )

    def jpeg(x: tf.Tensor) -> tf.Tensor:
        lo, hi = (int(round(q)) for q in config.jpeg_quality)
        quality = tf.random.stateless_uniform([], _seed(seed, _JPEG_V), lo, hi + 1, dtype=tf.int32)
        return tf.image.adjust_jpeg_quality(x, quality)

    image = maybe(_STAIN, config.stain_prob, stain, image)
    image = maybe(_HED, config.hed_prob, hed, image)
    image = maybe(_JITTER, config.jitter_prob, jitter, image)
    image = maybe(_EMBOSS, config.emboss_prob, emboss, image)
    image = maybe(_SHARPEN, config.sharpen_prob, sharpen, image)
    image = maybe(_SHUFFLE, config.channel_shuffle_prob, shuffle, image)
    image = maybe(_BLUR, config.blur_prob, blur, image)
    image = maybe(_NOISE, config.noise_prob, noise, image)
    return maybe(_JPEG, config.jpeg_prob, jpeg, image)


# ----------------------------------------------------------------------------- entry point


def augment(
    image: Any, labels: Any, seed: Any, config: AugmentConfig | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Augment an image and its label maps together (pure TF, graph-compatible, deterministic).

    Geometric ops move image and labels identically (one resampling: bilinear image, nearest
    labels, see the module docstring); colour ops change the image only. The same
    ``(image, labels, seed, config)`` always gives the same output.

    Example inside a ``tf.data`` pipeline, one seed per element::

        ds = ds.enumerate().map(
            lambda i, xy: augment(xy[0], xy[1], tf.stack([base_seed, i]), config)
        )

    Args:
        image: ``(H, W, 3)`` float32 RGB in ``[0, 1]``.
        labels: ``(H, W, K)`` integer stack of label maps (instance, class, ...).
        seed: ``(2,)`` int32 or int64 tensor, the seed of every stateless random op.
        config: probabilities and ranges; ``None`` means ``AugmentConfig()``.

    Returns:
        ``(image, labels)``: ``(H, W, 3)`` float32 in ``[0, 1]`` and ``(H, W, K)`` labels of the
        input dtype, with the input static shapes.
    """
    config = AugmentConfig() if config is None else config
    if not isinstance(config, AugmentConfig):
        raise TypeError(f"`config` must be an AugmentConfig. Received: config={config!r}")
    image = tf.convert_to_tensor(image)
    labels = tf.convert_to_tensor(labels)
    seed = tf.convert_to_tensor(seed)
    if image.dtype != tf.float32 or image.shape.rank != 3 or image.shape[-1] != 3:
        raise ValueError(
            "`image` must be an (H, W, 3) float32 tensor in [0, 1]. "
            f"Received: shape={image.shape}, dtype={image.dtype.name}"
        )
    if not labels.dtype.is_integer or labels.shape.rank != 3:
        raise ValueError(
            "`labels` must be an (H, W, K) integer tensor. "
            f"Received: shape={labels.shape}, dtype={labels.dtype.name}"
        )
    if (
        seed.dtype not in (tf.int32, tf.int64)
        or seed.shape.rank != 1
        or seed.shape[0]
        not in (
            2,
            None,
        )
    ):
        raise ValueError(
            f"`seed` must be a (2,) int32/int64 tensor. Received: shape={seed.shape}, "
            f"dtype={seed.dtype.name}"
        )
    if image.shape[:2].is_fully_defined() and labels.shape[:2].is_fully_defined():
        if image.shape[:2] != labels.shape[:2]:
            raise ValueError(
                "`image` and `labels` must have the same height and width. "
                f"Received: image.shape={image.shape}, labels.shape={labels.shape}"
            )
    image_shape, labels_shape = image.shape, labels.shape
    if config.geometric:
        image, labels = _geometric(image, labels, seed, config)
    image = _colour(image, seed, config)
    image = tf.ensure_shape(image, image_shape)
    labels = tf.ensure_shape(labels, labels_shape)
    return image, labels


__all__ = ["FILL_MODES", "PRESETS", "AugmentConfig", "augment", "warp"]
