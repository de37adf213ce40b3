"""Predictor: test-time augmentation, MC dropout and ensembles behind one API.

One cohesive concept: how a model (or an ensemble, or a served model) turns images into maps and
instances, including its fingerprint (the identity of those results for --resume).

Rumberger, Baumann, Hirsch et al., "Panoptic segmentation with highly imbalanced semantic
labels" (CoNIC challenge, ISBI 2022, "Inference") average 16 stochastic
forward passes pixel-wise: every pass sees the image with a random HED stain-intensity change
of up to 10 %, a random flip / 90-degree rotation, and the decoder dropout kept active (Monte
Carlo dropout, Gal & Ghahramani 2016); an ensemble of two models does 8 passes each.

:class:`Predictor` implements that for any model with a dict of named ``(B, H, W, K)`` outputs:

* Pass ``j`` of a model uses the dihedral transform ``j % 8`` (:func:`apply_transform`), so 8 or
  more passes per model cover the whole group of flips and rotations exactly once per cycle;
  the HED factors come from ``np.random.default_rng(seed)``, three per pass (one per stain),
  uniform in ``[1 - hed_intensity, 1 + hed_intensity]``. The plan is the same on every call
  (:func:`plan_passes`); the dropout masks come from the model's own seeded generators, which
  advance from call to call.
* Every output is mapped back to the input frame exactly (:func:`invert_transform`): maps get
  the inverse flip / rotation and the vector outputs (``(dy, dx)`` in the last axis, e.g. the
  conic centre vectors) are also rotated / reflected as vectors.
* Ensembles: ``tta`` is the **total** number of passes, split as evenly as possible over the
  models (16 passes and 2 models: 8 per model, as in the paper; every model gets at least one).
  Each model's passes are averaged, then the models are averaged with equal weights.
* ``tta`` 0 or 1: one plain pass per model (no HED change, no flip, dropout off).

The per-pixel variance returned with ``return_variance=True`` is pooled over all passes of all
models with the same equal model weights, ``mean_m(E_m[x^2]) - mean^2``: it holds both the
spread of the TTA / MC dropout passes and the disagreement between the ensemble's models.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from kerasnuc.checks import check_int
from kerasnuc.config import DataConfig, check_views
from kerasnuc.data.stain import hed_to_rgb, rgb_to_hed
from kerasnuc.fileutil import KerasnucError
from kerasnuc.layers.dropout import MCDropout, set_mc_dropout
from kerasnuc.models.maps import predict_maps_batch
from kerasnuc.models.views import (
    NUM_TRANSFORMS,
    VECTOR_OUTPUTS,
    VIEW_ORDER,
    apply_transform,
    invert_transform,
)
from kerasnuc.postprocess.common import PostprocResult
from kerasnuc.registry import Method
from kerasnuc.runs import load_config, load_run

logger = logging.getLogger(__name__)

#: Number of passes of ``tta=True`` (the paper's 16).
DEFAULT_TTA_PASSES = 16


@dataclass(frozen=True)
class AugmentPass:
    """One forward pass of the test-time augmentation.

    Attributes:
        transform: dihedral transform index ``0..7`` (see :func:`apply_transform`).
        hed_scale: ``(3,)`` float64 factors of the H, E, D stain amounts, or None (no change).
        mc_dropout: whether the model's MC dropout layers are active in this pass.
    """

    transform: int
    hed_scale: np.ndarray | None
    mc_dropout: bool


def passes_per_model(passes: int, num_models: int) -> list[int]:
    """Split ``passes`` TTA passes over ``num_models`` models (at least one each).

    ``passes`` 0 or 1 means one plain pass per model; otherwise model ``m`` gets
    ``passes // M`` passes plus one for the first ``passes % M`` models, and at least one.
    """
    if passes <= 1:
        return [1] * num_models
    return [max(1, passes // num_models + (m < passes % num_models)) for m in range(num_models)]


def plan_passes(
    passes: int,
    num_models: int = 1,
    hed_intensity: float = 0.1,
    mc_dropout: bool = True,
    seed: int = 0,
) -> list[list[AugmentPass]]:
    """The deterministic test-time augmentation plan of every model.

    Args:
        passes: total number of passes ``N`` (0 or 1: one plain pass per model).
        num_models: ensemble size ``M`` (see :func:`passes_per_model` for the split).
        hed_intensity: half-width of the uniform HED scale range (paper: 0.1); 0 disables it.
        mc_dropout: keep dropout active in the augmented passes.
        seed: seed of the HED factor generator.

    Returns:
        One list of :class:`AugmentPass` per model. Pass ``j`` of a model uses transform
        ``j % 8``; HED factors are drawn in order, model after model, from
        ``np.random.default_rng(seed)``.
    """
    if passes <= 1:
        return [[AugmentPass(0, None, False)] for _ in range(num_models)]
    rng = np.random.default_rng(seed)
    plan = []
    for count in passes_per_model(passes, num_models):
        model_plan = []
        for j in range(count):
            scale = (
                rng.uniform(1.0 - hed_intensity, 1.0 + hed_intensity, size=3)
                if hed_intensity > 0
                else None
            )
            model_plan.append(AugmentPass(j % NUM_TRANSFORMS, scale, bool(mc_dropout)))
        plan.append(model_plan)
    return plan


def hed_rescale(images: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Scale the H, E, D stain amounts of each image (the TTA stain-intensity change).

    Args:
        images: ``(B, H, W, 3)`` float32 RGB in ``[0, 1]``.
        scales: ``(B, 3)`` factors per image and stain.

    Returns:
        ``(B, H, W, 3)`` float32 in ``[0, 1]``: ``hed_to_rgb(rgb_to_hed(x) * s)`` without
        clipping the stain amounts (so a factor of 1 gives the image back up to rounding).
    """
    hed = rgb_to_hed(images, clip_negative=False)
    scales = np.asarray(scales, np.float32)[:, None, None, :]
    return np.asarray(hed_to_rgb(hed * scales), dtype=np.float32)


@contextlib.contextmanager
def _mc_dropout_state(model: keras.Model, active: bool) -> Iterator[None]:
    """Switch the MC dropout of ``model`` and restore every layer's previous state after."""
    layers = [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, MCDropout)
    ]
    before = [layer.mc for layer in layers]
    set_mc_dropout(model, active)
    try:
        yield
    finally:
        for layer, state in zip(layers, before, strict=True):
            layer.mc = state


def _as_float_images(images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"`images` must have shape (B, H, W, 3). Received: shape={images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"`images` must be uint8 or float in [0, 1]. Received: dtype={images.dtype}"
        )
    return images.astype(np.float32)


class Predictor:
    """Probability maps and instances of images, with TTA, MC dropout and ensembles.

    Assumptions: images are RGB at the models' resolution (``data_config.mpp``; resample or use
    :mod:`kerasnuc.inference.tiling` otherwise) and small enough to predict in one piece; every
    model accepts any height and width divisible by 32 (inputs are padded and the maps cropped
    by :func:`~kerasnuc.models.maps.predict_maps_batch`), so rotated non-square images work;
    all models return the same output names and channel counts. Exact TTA inversion of vector
    outputs assumes they hold ``(dy, dx)`` in (row, column) pixel axes.

    Args:
        models: one Keras model or a list (an ensemble), each mapping ``(B, H, W, 3)`` float32
            in ``[0, 1]`` to a dict of ``(B, H, W, K)`` maps.
        method: the :class:`~kerasnuc.registry.Method` (its ``postprocess`` makes instances).
        postproc: the method's post-processing config (e.g. from ``postproc.json``).
        data_config: what the models were trained on (resolution, class names); default empty.
        tta: total number of passes ``N`` (paper: 16; ``True`` means 16, ``False`` 0); 0 or 1
            is one plain pass per model.
        mc_dropout: keep MC dropout active in the TTA passes (restored afterwards).
        hed_intensity: half-width of the HED stain scale range (paper: 0.1); 0 disables it.
        seed: seed of the TTA plan (HED factors).
        batch_size: forward passes per model call.
        vector_outputs: names of the outputs holding ``(dy, dx)`` vectors.
        views: without TTA, the deterministic views of each image averaged per model (1, 2,
            4 or 8; :data:`~kerasnuc.models.views.VIEW_ORDER`: no stain change, dropout off).
            Must be 1 with ``tta > 1``.

    Raises:
        ValueError: bad arguments.
    """

    def __init__(
        self,
        models: keras.Model | Sequence[keras.Model],
        method: Method,
        postproc: Any,
        data_config: DataConfig | None = None,
        tta: int | bool = 0,
        mc_dropout: bool = True,
        hed_intensity: float = 0.1,
        seed: int = 0,
        batch_size: int = 8,
        vector_outputs: Sequence[str] = VECTOR_OUTPUTS,
        views: int = 1,
    ) -> None:
        models = [models] if _is_backend(models) else list(models)
        if not models or not all(_is_backend(m) for m in models):
            raise ValueError(
                "`models` must be a keras.Model (or a remote backend with `predict_maps_batch`, "
                "e.g. a ServingClient) or a non-empty list of them. "
                f"Received: {[type(m).__name__ for m in models]}"
            )
        self.tta = _tta_passes(tta)
        self.views = check_views(views)
        if self.tta > 1 and self.views > 1:
            raise ValueError(
                "`views` must be 1 with test-time augmentation (its passes have their own "
                f"flips). Received: tta={self.tta}, views={self.views}"
            )
        if self.tta > 1 and not getattr(method, "dense_outputs", True):
            raise KerasnucError(
                f"test-time augmentation (tta={self.tta}) is not available for the "
                f"{method.name!r} method: its outputs are detections, not maps that can be "
                "flipped back and averaged (use --tta 0)"
            )
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        if not isinstance(hed_intensity, int | float) or not 0 <= hed_intensity < 1:
            raise ValueError(
                "`hed_intensity` must be a float in [0, 1). "
                f"Received: hed_intensity={hed_intensity!r}"
            )
        self.models = models
        self.method = method
        self.postproc = postproc
        self.data_config = DataConfig() if data_config is None else data_config
        self.mc_dropout = bool(mc_dropout)
        self.hed_intensity = float(hed_intensity)
        self.vector_outputs = tuple(vector_outputs)
        if self.views > 1:
            views_plan = [AugmentPass(t, None, False) for t in VIEW_ORDER[: self.views]]
            self.plan = [list(views_plan) for _ in models]
        else:
            self.plan = plan_passes(
                self.tta, len(models), self.hed_intensity, self.mc_dropout, self.seed
            )
        self._fingerprint: dict[str, Any] | None = None

    @classmethod
    def from_run_dirs(
        cls,
        run_dirs: str | os.PathLike | Sequence[str | os.PathLike],
        tta: int | bool = 0,
        mc_dropout: bool = True,
        hed_intensity: float = 0.1,
        seed: int = 0,
        batch_size: int = 8,
        postproc: Any = None,
        views: int | None = None,
    ) -> Predictor:
        """A predictor for one run directory or an ensemble of several.

        Args:
            run_dirs: one folder written by ``kerasnuc train`` or a list of them.
            tta, mc_dropout, hed_intensity, seed, batch_size: as for :class:`Predictor`.
            postproc: post-processing config; default the first run's ``postproc.json`` (or the
                method's defaults).
            views: as for :class:`Predictor`; None: the first run's ``inference.views``
                (1 with ``tta > 1``).

        Raises:
            KerasnucError: unreadable runs, or runs that differ in method, cell types or
                resolution (mpp), or whose models differ in outputs.
        """
        if isinstance(run_dirs, str | os.PathLike):
            run_dirs = [run_dirs]
        run_dirs = list(run_dirs)
        if not run_dirs:
            raise KerasnucError("no run directory given")
        configs = [load_config(d) for d in run_dirs]
        # Compare the configs before building any model, then the loaded models' outputs.
        for run_dir, config in zip(run_dirs[1:], configs[1:], strict=True):
            _check_same(
                run_dirs[0],
                run_dir,
                {
                    "method": (configs[0].method, config.method),
                    "cell types": (configs[0].data.class_names, config.data.class_names),
                    "mpp": (configs[0].data.mpp, config.data.mpp),
                },
            )
        runs = [load_run(d) for d in run_dirs]
        for run in runs[1:]:
            _check_same(
                runs[0].run_dir,
                run.run_dir,
                {"outputs": (_output_channels(runs[0].model), _output_channels(run.model))},
            )
        first = runs[0]
        if views is None:
            views = _default_views(tta, first.config.inference.views)
        logger.info("predictor: %d model(s), tta=%s, views=%s", len(runs), tta, views)
        return cls(
            [r.model for r in runs],
            first.method,
            first.postproc if postproc is None else postproc,
            first.config.data,
            tta=tta,
            mc_dropout=mc_dropout,
            hed_intensity=hed_intensity,
            seed=seed,
            batch_size=batch_size,
            views=views,
        )

    @classmethod
    def from_server(
        cls,
        url: str,
        model_name: str,
        version: int | None = None,
        tta: int | bool = 0,
        hed_intensity: float = 0.1,
        seed: int = 0,
        batch_size: int = 8,
        timeout: float = 60.0,
        retries: int = 3,
        views: int | None = None,
    ) -> Predictor:
        """A predictor whose maps come from a TensorFlow Serving endpoint.

        The model's method, classes, colours, resolution and post-processing settings are read
        from the export's metadata signature, so no run directory is needed. TTA works as for
        a local model (flips, rotations, HED), without MC dropout: the export has dropout off.

        Args:
            url: ``http(s)://host:8501`` (REST) or ``grpc://host:8500``.
            model_name: the model name on the server (``kerasnuc export --name``).
            version: a served version (default: the server's latest).
            views: as for :class:`Predictor`; None: the exported run's ``inference.views``
                (1 with ``tta > 1``).
            Other arguments as :class:`Predictor`; ``timeout``/``retries`` of the client.

        Raises:
            KerasnucError: the server is unreachable or answers with an error.
        """
        from kerasnuc.registry import get_method
        from kerasnuc.serving.client import ServingClient

        client = ServingClient(url, model_name, version=version, timeout=timeout, retries=retries)
        meta = client.metadata()
        method = get_method(meta["method"])
        data = DataConfig(
            mpp=meta.get("mpp"),
            class_names=meta.get("class_names") or {},
            class_colours=meta.get("class_colours") or {},
        )
        postproc = method.postproc_config.from_dict(meta["postproc"])
        if views is None:
            exported = (meta.get("run_config") or {}).get("inference") or {}
            views = _default_views(tta, exported.get("views", 1))
        return cls(
            client,
            method,
            postproc,
            data,
            tta=tta,
            mc_dropout=False,
            hed_intensity=hed_intensity,
            seed=seed,
            batch_size=batch_size,
            views=views,
        )

    @property
    def mpp(self) -> float | None:
        """The models' resolution in um/px (None: unknown)."""
        return self.data_config.mpp

    def fingerprint(self) -> dict[str, Any]:
        """What this predictor's results depend on, as JSON-ready values (computed once).

        A SHA-256 digest of every model's variables (for a served model: the server, the model
        name and version and the export's metadata), the method, the post-processing
        settings, the test-time augmentation (passes, MC dropout, HED intensity, seed), the
        batch size and the models' resolution and cell types. ``predict --resume`` reuses an
        earlier output only when its fingerprint is the same
        (:mod:`kerasnuc.inference.job`).
        """
        if self._fingerprint is None:
            postproc = self.postproc
            to_dict = getattr(postproc, "to_dict", None)
            self._fingerprint = _json_ready(
                {
                    "method": self.method.name,
                    "models": [_model_digest(m) for m in self.models],
                    "postproc": to_dict() if callable(to_dict) else repr(postproc),
                    "tta": self.tta,
                    "views": self.views,
                    "mc_dropout": self.mc_dropout,
                    "hed_intensity": self.hed_intensity,
                    "seed": self.seed,
                    "batch_size": self.batch_size,
                    "mpp": self.data_config.mpp,
                    "class_names": dict(self.data_config.class_names),
                }
            )
        return self._fingerprint

    def predict_maps(
        self, image: np.ndarray, return_variance: bool = False
    ) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Mean output maps of one image over all passes of all models.

        Args:
            image: ``(H, W, 3)`` uint8 RGB (or float in ``[0, 1]``).
            return_variance: also return the per-pixel variance across passes.

        Returns:
            ``{name: (H, W, K) float32}`` mean maps, or ``(mean, variance)`` with variance maps
            of the same shapes (see the module docstring for the pooling).
        """
        image = np.asarray(image)
        if image.ndim != 3:
            raise ValueError(f"`image` must have shape (H, W, 3). Received: shape={image.shape}")
        mean, var = self.predict_maps_batch(image[None], return_variance=True)
        mean = {k: v[0] for k, v in mean.items()}
        if return_variance:
            return mean, {k: v[0] for k, v in var.items()}
        return mean

    def predict_maps_batch(
        self, images: np.ndarray, return_variance: bool = False
    ) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """:meth:`predict_maps` of a batch of same-size images, ``{name: (B, H, W, K)}``."""
        x = _as_float_images(images)
        mean: dict[str, np.ndarray] = {}
        sq: dict[str, np.ndarray] = {}
        weight = 1.0 / len(self.models)
        for model, plan in zip(self.models, self.plan, strict=True):
            m_mean, m_sq = self._model_moments(model, plan, x, return_variance)
            if mean and (
                set(m_mean) != set(mean) or any(m_mean[k].shape != mean[k].shape for k in mean)
            ):
                raise ValueError(
                    "all models must return the same outputs. Received: "
                    f"{ {k: v.shape[1:] for k, v in m_mean.items()} } vs "
                    f"{ {k: v.shape[1:] for k, v in mean.items()} }"
                )
            if len(self.models) == 1:
                mean, sq = m_mean, m_sq
                continue
            for k in m_mean:
                mean[k] = mean.get(k, 0.0) + weight * m_mean[k]
                if return_variance:
                    sq[k] = sq.get(k, 0.0) + weight * m_sq[k]
        mean32 = {k: v.astype(np.float32, copy=False) for k, v in mean.items()}
        if not return_variance:
            return mean32
        var = {k: np.maximum(sq[k] - mean[k] ** 2, 0.0).astype(np.float32) for k in mean}
        return mean32, var

    def _model_moments(
        self, model: keras.Model, plan: list[AugmentPass], x: np.ndarray, second: bool
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Mean and, if ``second``, mean square of one model's passes, ``{name: (B, H, W, K)}``.

        The mean square (for the variance) is accumulated in float64, the mean alone in float32:
        without variance a plain pass costs no more than the forward pass (summing large float64
        maps took longer than the network on a 1000 x 1000 image).
        """
        dtype = np.float64 if second else np.float32
        jobs = [(i, p) for i in range(len(x)) for p in plan]
        # Odd rotations of a non-square image change its shape: batch the two shapes apart.
        groups = [[job for job in jobs if job[1].transform % 2 == parity] for parity in (0, 1)]
        total: dict[str, np.ndarray] = {}
        total_sq: dict[str, np.ndarray] = {}
        for group in groups:
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                batch = x[[i for i, _ in chunk]]
                scales = [p.hed_scale for _, p in chunk]
                if any(s is not None for s in scales):
                    batch = hed_rescale(
                        batch, np.stack([np.ones(3) if s is None else s for s in scales])
                    )
                batch = np.stack(
                    [
                        apply_transform(b, p.transform)
                        for b, (_, p) in zip(batch, chunk, strict=True)
                    ]
                )
                if isinstance(model, keras.Model):
                    with _mc_dropout_state(model, any(p.mc_dropout for _, p in chunk)):
                        out = predict_maps_batch(model, batch, batch_size=len(chunk))
                else:  # a remote backend (TF Serving): no MC dropout there
                    out = model.predict_maps_batch(batch, batch_size=len(chunk))
                for n, (i, p) in enumerate(chunk):
                    maps = invert_transform(
                        {k: v[n] for k, v in out.items()}, p.transform, self.vector_outputs
                    )
                    for k, v in maps.items():
                        if k not in total:
                            total[k] = np.zeros((len(x), *v.shape), dtype)
                            if second:
                                total_sq[k] = np.zeros((len(x), *v.shape), dtype)
                        total[k][i] += v
                        if second:
                            v = v.astype(dtype)
                            total_sq[k][i] += v * v
        n_pass = len(plan)
        if n_pass > 1:
            for k in total:
                total[k] /= n_pass
                if second:
                    total_sq[k] /= n_pass
        return total, total_sq

    def predict_instances(self, image: np.ndarray) -> PostprocResult:
        """Nuclei of one image: :meth:`predict_maps`, then the method's post-processing.

        The low-level, untiled path: one forward pass over the whole image as given (no
        resampling, no mirrored tile context, padded to a multiple of 32), so its nuclei differ
        from those of ``kerasnuc predict`` near the borders. For what the CLI finds (the same
        tiles, resolution handling and measurements), use :func:`kerasnuc.segment`.

        Args:
            image: ``(H, W, 3)`` uint8 RGB at the models' resolution.

        Returns:
            :class:`~kerasnuc.postprocess.common.PostprocResult` with ``(H, W)`` int32
            ``instances`` and ``classes`` and the per-instance table.
        """
        return self.method.postprocess(self.predict_maps(image), self.postproc)

    def predict_instances_batch(self, images: np.ndarray) -> list[PostprocResult]:
        """:meth:`predict_instances` of a ``(B, H, W, 3)`` batch; usable as the ``predict_fn``
        of :mod:`kerasnuc.inference.tiling`."""
        maps = self.predict_maps_batch(images)
        return [
            self.method.postprocess({k: v[b] for k, v in maps.items()}, self.postproc)
            for b in range(len(images))
        ]


def _tta_passes(tta: int | bool) -> int:
    """The number of TTA passes ``tta`` stands for (``True``: the paper's 16, ``False``: 0)."""
    if isinstance(tta, bool):
        return DEFAULT_TTA_PASSES if tta else 0
    return check_int("tta", tta, 0)


def _default_views(tta: int | bool, configured: int) -> int:
    """The views of a model whose config says ``configured``: 1 with TTA, whose passes bring
    their own flips."""
    return 1 if _tta_passes(tta) > 1 else configured


def _model_digest(model: Any) -> str | dict[str, Any]:
    """SHA-256 of a Keras model's weights (position, dtype, shape, values); for a remote
    backend its server, model, version and metadata."""
    if not isinstance(model, keras.Model):
        meta = getattr(model, "metadata", None)
        return {
            "server": getattr(model, "url", None),
            "model": getattr(model, "model_name", None),
            "version": getattr(model, "version", None),
            "metadata": meta() if callable(meta) else None,
        }
    digest = hashlib.sha256()
    # By position, not by name: layer names are numbered per process (conv2d_3, ...).
    for i, var in enumerate(model.weights):
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(var.value))
        digest.update(f"{i}:{value.dtype}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _json_ready(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(value, default=str))


def _is_backend(obj: Any) -> bool:
    """A local Keras model or a remote maps backend (``predict_maps_batch(images, batch_size)``)."""
    return isinstance(obj, keras.Model) or callable(getattr(obj, "predict_maps_batch", None))


def _check_same(
    first: str | os.PathLike, other: str | os.PathLike, checks: Mapping[str, tuple[Any, Any]]
) -> None:
    for what, (a, b) in checks.items():
        if a != b:
            raise KerasnucError(
                f"{other}: cannot ensemble with {first}: {what} differ ({b!r} vs {a!r})"
            )


def _output_channels(model: keras.Model) -> dict[str, int | None]:
    """``{output name: channels}`` of a model with a dict of outputs."""
    outputs = model.output
    if isinstance(outputs, Mapping):
        return {k: v.shape[-1] for k, v in outputs.items()}
    return {name: t.shape[-1] for name, t in zip(model.output_names, model.outputs, strict=True)}
