"""The tf.data training pipelines: the one place where the order of data operations is defined.

Order, for every method::

    Dataset(s) -> decoded images + label maps cached in memory (resampled to the model's mpp)
      -> epoch index stream (importance sampling, Rumberger et al. Eq. 2, or plain shuffling)
      -> random crop with context margin (numpy, seeded per element)
      -> augment image and label maps together (TF, stateless seeds)   [kerasnuc.data.augment]
      -> centre crop to the training size
      -> method targets (numpy per crop: three-label map, vectors, ...) [kerasnuc.data.targets]
      -> batch -> prefetch

Every random choice derives from ``(config.seed, epoch, position in epoch)``, so a pipeline is
reproducible and a resumed run continues with the epochs it had not seen. ``deterministic=True``
(the default) also keeps the element order of the parallel maps: without it, crops that finish
early overtake others, batches are made of other crops from run to run, and neither a repeated
nor a resumed run reproduces the first.

One public function per method returns a ``tf.data.Dataset`` of ``(image, targets)`` batches whose
target keys match the output names of that method's model:

* :func:`conic_dataset`: ``semantic`` (B, S, S) int32, ``three_label`` (B, S, S) int32,
  ``vectors`` (B, S, S, 3) float32 = ``(dy, dx, foreground)``;
* :func:`unet_sharp_dataset`: ``semantic`` (B, S, S) int32 (optionally Macenko-normalised input);
* :func:`weak_dataset`: ``voronoi`` (B, S, S) int32 in {0, 1, IGNORE}, ``cluster`` (B, S, S)
  int32 in {0, 1, IGNORE}, ``repel`` (B, S, S) float32 (the filtered repel code), all derived from
  point labels only;
* :func:`panoptic_dataset`: ``instances`` (B, S, S) int32, ``semantic`` (B, S, S) int32, padded
  ground-truth ``boxes`` (B, N, 4) float32 and ``classes`` (B, N) int32 (anchor/ROI matching and
  mask targets are computed inside the model's training step).

Images are ``(B, S, S, 3)`` float32 in ``[0, 1]``.

One cohesive concept: the order of the tf.data operations is defined once, here, for every
method; the per-crop numpy targets live in :mod:`kerasnuc.data.targets`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import cv2
import numpy as np
import tensorflow as tf

from kerasnuc.config import check_field_types, strict_from_dict
from kerasnuc.data.augment import AugmentConfig, augment
from kerasnuc.data.dataset import Dataset, Sample
from kerasnuc.data.points import IGNORE, encode_points, points_from_instances
from kerasnuc.data.points_cache import cached_encode_points
from kerasnuc.data.sampling import ImportanceSampler
from kerasnuc.data.targets import UNKNOWN_CLASS, conic_targets_numpy, panoptic_box_targets
from kerasnuc.fileutil import KerasnucError

logger = logging.getLogger(__name__)

REPEL_SCALE = 65535
"""The float repel code travels through augmentation as ``round(repel * REPEL_SCALE)`` (int32)."""

_SEED_STRIDE = 1 << 24  # element seeds: (config.seed, epoch * _SEED_STRIDE + position)


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of a training pipeline (one per method run; saved with the run's config).

    Attributes:
        crop_size: side S of the square training crops (pixels at the model's resolution).
        batch_size: crops per batch.
        context: extra margin around each crop, as a fraction of ``crop_size``, that goes through
            the geometric augmentation and is cut away afterwards, so rotations and zoom-outs
            show real tissue instead of fill in the crop.
        importance_sampling: draw images with ``p_n`` (with replacement) instead of shuffling.
        image_groups: a regular expression naming the group (source slide) of each image: the
            first match in the image's id; the images of a dataset whose ids do not match form
            one group (a dataset without matches keeps the paper's sampling inside it); groups
            never span datasets. With it, importance sampling balances each class across groups
            (:mod:`kerasnuc.data.sampling`), so that one slide cannot define a class. CoNSeP
            patches ``train_18_003``: ``"^train_[0-9]+"``. None: no groups (the paper's ``p_n``).
        group_alpha: the balancing exponent with ``image_groups``: 1 keeps each group's share
            of a class, 0 gives the groups equal shares; the default 0.5 takes the square root.
        dataset_weights: when training on several datasets, the share of crops drawn from each
            (importance sampling then runs within each dataset). None: pool all images (the
            paper's sampling).
        samples_per_epoch: crops per epoch (default: the number of images).
        boundary_width: boundary band of the three-label map, pixels.
        vector_units: units of the centre vectors (see ``kerasnuc.data.targets.centre_vectors``).
            Default ``"scale"``: pixels divided by ``vector_scale``, so that the L2 loss of the
            vectors stays of the order of the cross-entropies it is summed with (in pixels it
            starts ~50x larger and dominates the gradient).
        vector_scale: divisor for ``vector_units="scale"``; default 10 px, a typical nucleus
            radius at 0.25 um/px (MoNuSeg median equivalent diameter: 20 px).
        augment: augmentation settings; ``AugmentConfig.none()`` to switch off.
        seed: base seed of the whole pipeline.
        deterministic: keep the element order of the parallel maps (default), so that a run
            is reproducible and ``--resume`` exact; False lets finished crops overtake slower
            ones (a little more throughput, batches differ from run to run).
        parallel_calls: parallelism of the maps; -1 = ``tf.data.AUTOTUNE``.
        max_instances: ``panoptic``: ground-truth box slots per crop (a 512x512 MoNuSeg crop
            holds up to ~450 nuclei).
    """

    crop_size: int = 256
    batch_size: int = 8
    context: float = 0.25
    importance_sampling: bool = True
    image_groups: str | None = None
    group_alpha: float = 0.5
    dataset_weights: tuple[float, ...] | None = None
    samples_per_epoch: int | None = None
    boundary_width: int = 1
    vector_units: str = "scale"
    vector_scale: float = 10.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    deterministic: bool = True
    parallel_calls: int = -1
    max_instances: int = 512

    def __post_init__(self) -> None:
        check_field_types(type(self), {f.name: getattr(self, f.name) for f in fields(self)})
        if self.crop_size < 8:
            raise ValueError(f"`crop_size` must be >= 8. Received: crop_size={self.crop_size}")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={self.batch_size}")
        if self.max_instances < 1:
            raise ValueError(
                f"`max_instances` must be >= 1. Received: max_instances={self.max_instances}"
            )
        if not 0 <= self.context <= 1:
            raise ValueError(f"`context` must lie in [0, 1]. Received: context={self.context}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(
                "`samples_per_epoch` must be >= 1 or null. "
                f"Received: samples_per_epoch={self.samples_per_epoch}"
            )
        if self.boundary_width < 0 or not self.vector_scale > 0:
            raise ValueError(
                "`boundary_width` must be >= 0 and `vector_scale` > 0. Received: "
                f"boundary_width={self.boundary_width}, vector_scale={self.vector_scale}"
            )
        if not 0.0 <= self.group_alpha <= 1.0:
            raise ValueError(
                f"`group_alpha` must lie in [0, 1]. Received: group_alpha={self.group_alpha}"
            )
        if self.image_groups is not None:
            try:
                re.compile(self.image_groups)
            except re.error as err:
                raise ValueError(
                    f"`image_groups` is not a regular expression ({err}). "
                    f"Received: image_groups={self.image_groups!r}"
                ) from None
        if self.dataset_weights is not None:
            weights = tuple(float(w) for w in self.dataset_weights)
            if not weights or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    "`dataset_weights` must be non-negative with a positive sum. "
                    f"Received: dataset_weights={self.dataset_weights}"
                )
            object.__setattr__(self, "dataset_weights", weights)

    @property
    def context_size(self) -> int:
        """Side of the crop that goes through augmentation (even margin on both sides)."""
        return self.crop_size + 2 * int(round(self.context * self.crop_size / 2))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["augment"] = self.augment.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        data = dict(data)
        if isinstance(data.get("augment"), str):  # a preset name, e.g. "stain"
            try:
                data["augment"] = AugmentConfig.preset(data["augment"])
            except ValueError as err:
                raise KerasnucError(f"pipeline.augment: {err}") from err
        elif "augment" in data:
            data["augment"] = AugmentConfig.from_dict(data["augment"])
        return strict_from_dict(cls, data)


# ----------------------------------------------------------------------------------------------
# In-memory cache of decoded images


@dataclass
class _Item:
    id: str
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W, K) int32: instance, class, extra maps
    source: int = 0  # index of the dataset it comes from


def resample_image(image: np.ndarray, scale: float) -> np.ndarray:
    """An image resampled by ``scale`` as the pipelines do (area averaging when shrinking,
    bilinear when enlarging; each side ``max(1, round(side * scale))``)."""
    if abs(scale - 1.0) < 1e-6:
        return image
    h, w = image.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def _resample(image: np.ndarray, labels: np.ndarray, scale: float) -> tuple[np.ndarray, ...]:
    if abs(scale - 1.0) < 1e-6:
        return image, labels
    image = resample_image(image, scale)
    size = (image.shape[1], image.shape[0])
    chans = [
        cv2.resize(labels[..., k], size, interpolation=cv2.INTER_NEAREST_EXACT)
        for k in range(labels.shape[-1])
    ]
    return image, np.stack(chans, axis=-1)


def dataset_scale(ds: Dataset, target_mpp: float | None) -> float:
    """The factor that resamples a dataset's images to ``target_mpp`` (1 for None).

    Raises:
        KerasnucError: the dataset states no pixel size.
    """
    if target_mpp is None:
        return 1.0
    if ds.mpp is None:
        raise KerasnucError(
            f"{ds.root}: meta.json has no mpp, cannot resample to {target_mpp} um/px "
            "(set 'mpp' in meta.json)"
        )
    return ds.mpp / target_mpp


def shared_classes(datasets: Sequence[Dataset]) -> tuple[int, dict[int, str]]:
    """Class count and names shared by ``datasets``.

    Datasets without cell types may be mixed with datasets that share one set of types: their
    nuclei then get :data:`~kerasnuc.data.targets.UNKNOWN_CLASS` (see :func:`load_items`).
    """
    typed = [ds for ds in datasets if ds.has_classes]
    names = [ds.class_names for ds in typed]
    if any(n != names[0] for n in names[1:]):
        listing = "; ".join(f"{ds.root}: {ds.class_names}" for ds in typed)
        raise KerasnucError(
            f"datasets have different cell types, cannot train on them together ({listing})"
        )
    return (typed[0].num_classes, names[0]) if typed else (0, {})


def load_items(
    datasets: Dataset | Sequence[Dataset],
    split: str | None,
    target_mpp: float | None = None,
    extra: Callable[[Dataset, str, np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[list[_Item], int]:
    """Decode every image of ``split`` of each dataset into memory.

    Args:
        datasets: one dataset or several with the same classes.
        split: split name (None: all images).
        target_mpp: resample to this pixel size.
        extra: ``f(ds, id, image, instances, classes) -> (H, W, K')`` int32 extra label maps
            computed on the full image before resampling (e.g. point encodings).

    Returns:
        ``(items, num_classes)``. When no dataset has cell types, nuclei get class 1 and
        ``num_classes`` is 0. When some have, the nuclei of those without get
        :data:`~kerasnuc.data.targets.UNKNOWN_CLASS`. A points dataset (no masks) is read only
        with ``extra`` (its label maps are all 0; ``extra`` reads the points).

    Raises:
        KerasnucError: no image, or a points dataset without ``extra`` (one line).
    """
    datasets = [datasets] if isinstance(datasets, Dataset) else list(datasets)
    if not datasets:
        raise ValueError("`datasets` must name at least one dataset.")
    num_classes, _ = shared_classes(datasets)
    items = []
    for source, ds in enumerate(datasets):
        scale = dataset_scale(ds, target_mpp)
        for id in ds.split(split):
            if ds.is_points and extra is not None:
                image = ds.image(id)
                blank = np.zeros(image.shape[:2], dtype=np.int32)
                s = Sample(id, image, blank, None)
            else:
                s = ds.sample(id)
            if s.classes is not None:
                cls = s.classes
            else:
                cls = np.where(s.instances > 0, UNKNOWN_CLASS if num_classes else 1, 0)
            maps = [s.instances, cls]
            if extra is not None:
                ext = extra(ds, id, s.image, s.instances, cls)
                maps.extend(np.moveaxis(ext, -1, 0))
            image, labels = _resample(s.image, np.stack(maps, axis=-1).astype(np.int32), scale)
            items.append(_Item(f"{ds.name}/{id}", image, labels, source))
    if not items:
        raise KerasnucError(f"no images in split {split!r}")
    return items, num_classes


# ----------------------------------------------------------------------------------------------
# Element streams


def _sampling_frequencies(class_map: np.ndarray, num_classes: int) -> np.ndarray:
    """``X_{c,n}`` for importance sampling; nuclei of unknown type form an extra last class.

    Giving "unknown type" its own column keeps images of datasets without cell types from being
    drawn only for their background when they are mixed with typed datasets.
    """
    k = max(num_classes, 1) + 1
    idx = np.where(class_map == UNKNOWN_CLASS, k, class_map).ravel()
    return np.bincount(idx, minlength=k + 1) / idx.size


def image_group(item_id: str, pattern: str | None) -> str:
    """The group of a pipeline item ``"<dataset>/<image id>"`` under ``image_groups``
    (``"<dataset>/"`` where the id does not match; the item id itself without a pattern)."""
    dataset, _, image_id = item_id.rpartition("/")
    if pattern is None:
        return item_id
    found = re.search(pattern, image_id)
    return f"{dataset}/{found.group(0) if found else ''}"


def item_groups(items: Sequence[_Item], pattern: str | None) -> np.ndarray | None:
    """``(N,)`` groups of pipeline items under ``image_groups`` (None without a pattern)."""
    if pattern is None:
        return None
    return np.array([image_group(it.id, pattern) for it in items])


def _epoch_sampler(items: list[_Item], freqs: np.ndarray, config: PipelineConfig):
    """``epoch -> item indices`` of one epoch.

    Without ``dataset_weights``: importance sampling (or shuffling) over all items pooled.
    With them: each draw picks a dataset with the given probabilities, then an image of that
    dataset by importance sampling among its own images.
    """
    per_epoch = config.samples_per_epoch or len(items)
    groups = item_groups(items, config.image_groups)
    alpha = config.group_alpha
    if config.dataset_weights is None:
        sampler = ImportanceSampler(
            freqs, seed=config.seed, enabled=config.importance_sampling, groups=groups, alpha=alpha
        )
        return lambda epoch: sampler.draw(epoch, per_epoch)[0]

    sources = np.array([it.source for it in items])
    n_sources = int(sources.max()) + 1
    weights = np.asarray(config.dataset_weights, dtype=np.float64)
    if weights.shape != (n_sources,):
        raise ValueError(
            f"`dataset_weights` needs one weight per dataset ({n_sources}). "
            f"Received: dataset_weights={config.dataset_weights}"
        )
    members = [np.flatnonzero(sources == s) for s in range(n_sources)]
    samplers = [
        ImportanceSampler(
            freqs[m],
            seed=config.seed + 1000 * (s + 1),
            enabled=config.importance_sampling,
            groups=None if groups is None else groups[m],
            alpha=alpha,
        )
        for s, m in enumerate(members)
    ]
    probs = weights / weights.sum()

    def draw(epoch: int) -> np.ndarray:
        rng = np.random.default_rng([config.seed, int(epoch), 7])
        which = rng.choice(n_sources, size=per_epoch, p=probs)
        out = np.empty(per_epoch, dtype=np.int64)
        for s in range(n_sources):
            sel = np.flatnonzero(which == s)
            if sel.size:
                out[sel] = members[s][samplers[s].draw(epoch, sel.size)[0]]
        return out

    return draw


def _element_stream(
    items: list[_Item],
    num_classes: int,
    config: PipelineConfig,
    training: bool,
    start_epoch: int,
) -> tf.data.Dataset:
    """``(item_index, y0, x0, seed)`` elements: training = sampled epochs, else a tile grid."""
    if not training:
        rows = []
        size = config.crop_size
        for k, it in enumerate(items):
            h, w = it.image.shape[:2]
            ys = sorted({min(y, max(h - size, 0)) for y in range(0, max(h, 1), size)})
            xs = sorted({min(x, max(w - size, 0)) for x in range(0, max(w, 1), size)})
            rows.extend((k, y, x, 0) for y in ys for x in xs)
        arr = np.asarray(rows, dtype=np.int64)
        seeds = np.stack([np.full(len(arr), config.seed), np.arange(len(arr))], axis=1)
        return tf.data.Dataset.from_tensor_slices((arr[:, 0], arr[:, 1], arr[:, 2], seeds))

    freqs = np.stack([_sampling_frequencies(it.labels[..., 1], num_classes) for it in items])
    draw = _epoch_sampler(items, freqs, config)

    def gen():
        epoch = start_epoch
        while True:
            for pos, k in enumerate(draw(epoch)):
                yield k, -1, -1, np.array([config.seed, epoch * _SEED_STRIDE + pos], np.int64)
            epoch += 1

    sig = (
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec((2,), tf.int64),
    )
    return tf.data.Dataset.from_generator(gen, output_signature=sig)


def _crop(items: list[_Item], size: int, margin: int, pad_value: int, shift: bool):
    """Numpy crop function returning a ``size + 2 * margin`` window around a ``size`` crop.

    The inner ``size`` crop lies inside the image when the image is large enough: at a random
    place (``y0 < 0``) or at ``(y0, x0)``. Where the window leaves the image, the image is padded
    with ``pad_value`` and the labels with 0; with ``shift`` the labels are stored ``+ 1`` first,
    so that 0 marks "outside the image" for the caller.
    """

    def fn(k, y0, x0, seed):
        it = items[int(k)]
        h, w = it.image.shape[:2]
        if y0 < 0:
            rng = np.random.default_rng(seed.tolist())
            y0 = rng.integers(0, max(h - size, 0) + 1)
            x0 = rng.integers(0, max(w - size, 0) + 1)
        if h < size:  # centre small images in the crop
            y0 = -((size - h) // 2)
        if w < size:
            x0 = -((size - w) // 2)
        big = size + 2 * margin
        top, left = int(y0) - margin, int(x0) - margin
        ys, xs = slice(max(top, 0), min(top + big, h)), slice(max(left, 0), min(left + big, w))
        img = it.image[ys, xs]
        lab = it.labels[ys, xs] + 1 if shift else it.labels[ys, xs]
        pad = ((ys.start - top, top + big - ys.stop), (xs.start - left, left + big - xs.stop))
        if any(p for pair in pad for p in pair):
            img = np.pad(img, pad + ((0, 0),), constant_values=pad_value)
            lab = np.pad(lab, pad + ((0, 0),))
        return np.ascontiguousarray(img), np.ascontiguousarray(lab, dtype=np.int32)

    return fn


def _crops(
    items: list[_Item],
    num_classes: int,
    config: PipelineConfig,
    training: bool,
    start_epoch: int,
    label_fill: tf.Tensor | None = None,
) -> tf.data.Dataset:
    """``(image (S,S,3) float32, labels (S,S,K) int32)`` crops, augmented when training.

    Args:
        label_fill: ``(K,)`` label values for pixels outside the image (padding, or brought in by
            the geometric augmentation). None: 0 (background) for every map.
    """
    k_maps = items[0].labels.shape[-1]
    size = config.crop_size
    margin = (config.context_size - size) // 2 if training else 0
    big = size + 2 * margin
    aug = config.augment
    pad_value = int(round(255 * min(max(aug.fill_value, 0.0), 1.0)))
    crop = _crop(items, size, margin, pad_value, shift=label_fill is not None)
    par = tf.data.AUTOTUNE if config.parallel_calls < 0 else config.parallel_calls

    # Every branch of the crop and of the augmentation is decided in Python (settings, static
    # shapes) or by explicit tf.cond / tf.where, so AutoGraph has nothing to convert; converting
    # the augmentation's source anyway took ~10 s at the start of every training run.
    @tf.autograph.experimental.do_not_convert
    def load(k, y0, x0, seed):
        img, lab = tf.numpy_function(crop, [k, y0, x0, seed], [tf.uint8, tf.int32], stateful=False)
        img = tf.ensure_shape(img, (big, big, 3))
        lab = tf.ensure_shape(lab, (big, big, k_maps))
        image = tf.cast(img, tf.float32) / 255.0
        if training:
            image, lab = augment(image, lab, seed, aug)
            image = image[margin : margin + size, margin : margin + size]
            lab = lab[margin : margin + size, margin : margin + size]
        if label_fill is not None:  # 0 = outside the image
            lab = tf.where(lab == 0, label_fill, lab - 1)
        return image, lab

    stream = _element_stream(items, num_classes, config, training, start_epoch)
    return stream.map(load, num_parallel_calls=par, deterministic=config.deterministic)


def _finish(ds: tf.data.Dataset, config: PipelineConfig, training: bool) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = config.deterministic
    ds = ds.with_options(options)
    return ds.batch(config.batch_size, drop_remainder=training).prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------------
# Methods


def conic_dataset(
    datasets: Dataset | Sequence[Dataset],
    split: str | None = "train",
    config: PipelineConfig | None = None,
    training: bool = True,
    start_epoch: int = 0,
    target_mpp: float | None = None,
) -> tf.data.Dataset:
    """``(image, {"semantic", "three_label", "vectors"})`` batches for the ``conic`` method.

    Args:
        datasets: one dataset or several with the same classes.
        split: split to read.
        config: pipeline settings.
        training: sampled, augmented, endless crops (True) or every image tiled once in order,
            without augmentation (False: validation).
        start_epoch: first epoch to draw (resuming a run).
        target_mpp: resample every image to this pixel size, the model's resolution
            (``DataConfig.mpp`` of the run; None: keep the data's own).

    Returns:
        A ``tf.data.Dataset`` of ``(images (B,S,S,3) float32, targets)`` (see module docstring).
    """
    config = config or PipelineConfig()
    items, num_classes = load_items(datasets, split, target_mpp)
    return conic_dataset_from_items(items, num_classes, config, training, start_epoch)


def conic_dataset_from_items(
    items: list[_Item],
    num_classes: int,
    config: PipelineConfig,
    training: bool = True,
    start_epoch: int = 0,
) -> tf.data.Dataset:
    """:func:`conic_dataset` on images already decoded with :func:`load_items`."""
    size = config.crop_size
    par = tf.data.AUTOTUNE if config.parallel_calls < 0 else config.parallel_calls

    def targets(image, lab):
        three, vec = tf.numpy_function(
            lambda inst: conic_targets_numpy(
                inst, config.boundary_width, config.vector_units, config.vector_scale
            ),
            [lab[..., 0]],
            [tf.int32, tf.float32],
            stateful=False,
        )
        semantic = lab[..., 1]
        # A crop holding a nucleus of unknown type (from a dataset without cell types) is left
        # out of the semantic loss entirely, background included: otherwise the background of
        # untyped datasets would dominate the loss's moving class prior (driving the background
        # weight to ~0) and its label-smoothing terms would dwarf the typed nuclei.
        semantic = tf.where(
            tf.reduce_any(semantic == UNKNOWN_CLASS),
            tf.fill(tf.shape(semantic), UNKNOWN_CLASS),
            semantic,
        )
        return image, {
            "semantic": semantic,
            "three_label": tf.ensure_shape(three, (size, size)),
            "vectors": tf.ensure_shape(vec, (size, size, 3)),
        }

    ds = _crops(items, num_classes, config, training, start_epoch)
    ds = ds.map(targets, num_parallel_calls=par, deterministic=config.deterministic)
    return _finish(ds, config, training)


def unet_sharp_dataset(
    datasets: Dataset | Sequence[Dataset],
    split: str | None = "train",
    config: PipelineConfig | None = None,
    training: bool = True,
    start_epoch: int = 0,
    target_mpp: float | None = None,
    normalizer: Any | None = None,
) -> tf.data.Dataset:
    """``(image, {"semantic"})`` batches for ``unet_sharp``.

    Args:
        normalizer: a fitted ``kerasnuc.data.stain.MacenkoNormalizer`` applied to every image once,
            before caching (the same normaliser is stored with the model for inference).
        Other arguments as :func:`conic_dataset`.
    """
    config = config or PipelineConfig()
    items, num_classes = load_items(datasets, split, target_mpp)
    if normalizer is not None:
        for it in items:
            it.image = _normalise(normalizer, it)
    ds = _crops(items, num_classes, config, training, start_epoch)
    ds = ds.map(lambda image, lab: (image, {"semantic": lab[..., 1]}))
    return _finish(ds, config, training)


def _normalise(normalizer: Any, item: _Item) -> np.ndarray:
    try:
        out = normalizer.transform(item.image)
    except (ValueError, KerasnucError) as exc:  # e.g. a tile without tissue
        logger.warning("%s: Macenko normalisation skipped (%s)", item.id, exc)
        return item.image
    out = np.asarray(out)
    if out.dtype != np.uint8:
        out = np.clip(np.round(out * 255.0 if out.max() <= 1.0 else out), 0, 255).astype(np.uint8)
    return out


def weak_dataset(
    datasets: Dataset | Sequence[Dataset],
    split: str | None = "train",
    config: PipelineConfig | None = None,
    training: bool = True,
    start_epoch: int = 0,
    target_mpp: float | None = None,
    points: dict[str, np.ndarray] | None = None,
    cache_dir: str | None = None,
    encode_params: dict[str, Any] | None = None,
) -> tf.data.Dataset:
    """``(image, {"voronoi", "cluster", "repel"})`` batches for the point-supervised ``weak``.

    The point encodings (Chamanzar & Nie 2020) are computed once per full image, before
    cropping, and go through the same augmentation as the image. Pixels that the augmentation
    brings in from outside the image are :data:`IGNORE` in ``voronoi`` and ``cluster`` and 0 in
    ``repel``.

    Args:
        points: ``{image id: (K, 2) (row, col) points}``; default: the points of a points
            dataset (``kerasnuc data import points``), else the centroids of the instance maps
            (so instance masks are read only to derive points, never used as targets).
        cache_dir: folder for the encoding cache (default: encode in memory only).
        encode_params: keyword arguments of ``kerasnuc.data.points.encode_points``.
        Other arguments as :func:`conic_dataset`.
    """
    config = config or PipelineConfig()
    params = dict(encode_params or {})

    def extra(ds, id, image, instances, classes):
        pts = points[id] if points is not None and id in points else None
        if pts is None:
            if points is not None:
                raise KerasnucError(f"{ds.image_path(id)}: no point annotations for this image")
            if ds.is_points:
                pts, _ = ds.points(id)
            else:
                pts, _ = points_from_instances(instances)
        if cache_dir is not None:
            enc = cached_encode_points(cache_dir, f"{ds.name}_{id}", image, pts, **params)
        else:
            enc = encode_points(image, pts, **params)
        repel = np.round(enc["filtered_repel"] * REPEL_SCALE)
        return np.stack([enc["voronoi"], enc["cluster"], repel], axis=-1).astype(np.int32)

    items, num_classes = load_items(datasets, split, target_mpp, extra=extra)
    for it in items:  # instance masks never reach the weak targets
        it.labels[..., 0] = 0

    def targets(image, lab):
        voronoi, cluster = lab[..., 2], lab[..., 3]
        repel = tf.cast(tf.maximum(lab[..., 4], 0), tf.float32) / REPEL_SCALE
        return image, {"voronoi": voronoi, "cluster": cluster, "repel": repel}

    fill = tf.constant([0, 0, IGNORE, IGNORE, 0], tf.int32)
    ds = _crops(items, num_classes, config, training, start_epoch, label_fill=fill)
    ds = ds.map(targets)
    return _finish(ds, config, training)


def panoptic_dataset(
    datasets: Dataset | Sequence[Dataset],
    split: str | None = "train",
    config: PipelineConfig | None = None,
    training: bool = True,
    start_epoch: int = 0,
    target_mpp: float | None = None,
) -> tf.data.Dataset:
    """``(image, {"instances", "semantic", "boxes", "classes"})`` batches for ``panoptic``.

    ``instances`` (B, S, S) int32 relabelled so that ``boxes[:, k]`` belongs to id ``k + 1``,
    ``semantic`` (B, S, S) int32 class map, ``boxes`` (B, N, 4) float32 and ``classes`` (B, N)
    int32 (0 = empty slot) with ``N = config.max_instances``
    (see :func:`panoptic_box_targets`). Default crops 512x512 (Liu et al. 2019).
    """
    config = config or PipelineConfig(crop_size=512, batch_size=2)
    items, num_classes = load_items(datasets, split, target_mpp)
    ds = _crops(items, num_classes, config, training, start_epoch)
    n, size = config.max_instances, config.crop_size

    def targets(image, lab):
        inst, boxes, classes = tf.numpy_function(
            lambda i, c: panoptic_box_targets(i, c, n),
            [lab[..., 0], lab[..., 1]],
            [tf.int32, tf.float32, tf.int32],
            stateful=False,
        )
        return image, {
            "instances": tf.ensure_shape(inst, (size, size)),
            "semantic": lab[..., 1],
            "boxes": tf.ensure_shape(boxes, (n, 4)),
            "classes": tf.ensure_shape(classes, (n,)),
        }

    par = tf.data.AUTOTUNE if config.parallel_calls < 0 else config.parallel_calls
    ds = ds.map(targets, num_parallel_calls=par, deterministic=config.deterministic)
    return _finish(ds, config, training)
