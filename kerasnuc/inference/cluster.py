"""Predict many inputs on a Dask cluster: one task per image or slide.

``kerasnuc predict --cluster SPEC`` hands each input to :meth:`PredictJob.run_input` on a Dask
``distributed`` worker instead of running them one after the other in this process. ``SPEC`` is

* ``local`` or ``local:N``: an embedded ``LocalCluster`` with N worker processes (default
  :func:`default_local_workers`), started and stopped by the command;
* ``tcp://HOST:PORT`` (or ``tls://``, ``ws://``...): the scheduler of a cluster that is already
  running, e.g. one started with ``dask-jobqueue`` on Slurm/PBS/SGE or on Kubernetes;
* a path to a scheduler file (``dask scheduler --scheduler-file FILE``).

Every worker process builds its predictor once, at its first task, and keeps it for the
following ones (:func:`cached_job`); the tasks carry only a small :class:`PredictorSpec`.
Everything the local run promises still holds, because the task is the same function: an input's
folder appears atomically (``atomic_dir``), ``--resume`` skips complete inputs, a bad input is
reported (status ``"failed"``) and the others finish. A worker that dies mid-input leaves only a
hidden ``.NAME.*.tmp`` folder (and, for slides, the resumable work folder); Dask reruns the task
on another worker, which removes the stale folder first and, for slides, resumes the tiles that
were done. ``dask.distributed`` is imported only here (the ``kerasnuc[cluster]`` extra).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kerasnuc.fileutil import KerasnucError
from kerasnuc.inference.inputs import output_names
from kerasnuc.inference.job import InputReport, PredictJob, PredictOptions, failed_report

logger = logging.getLogger(__name__)

# Memory one local worker needs for TensorFlow, the model and a 1152-px tile batch (measured
# peak RSS of `kerasnuc predict` on one 1000x1000 image is below 2 GB; a margin for slides).
WORKER_MEMORY_BYTES = 3 * 1024**3


@dataclass(frozen=True)
class PredictorSpec:
    """What a worker needs to build the predictor (small and picklable).

    Attributes:
        run_dir: the model's run folder (a path every worker can read), or None with ``server``.
        server: TF Serving endpoint that runs the model, or None.
        model: the model's name on ``server``.
        tta: test-time augmentation passes.
        views: flips / rotations averaged per tile (None: the model's own setting).
        batch_size: tiles per model call.
        threads: TensorFlow intra-op threads per worker (0: TensorFlow's default).
    """

    run_dir: str | None = None
    server: str | None = None
    model: str | None = None
    tta: int = 0
    views: int | None = None
    batch_size: int = 4
    threads: int = 0

    def build(self) -> Any:
        """The :class:`~kerasnuc.inference.predictor.Predictor` (loads TensorFlow and the model)."""
        if self.threads > 0:
            import tensorflow as tf

            with contextlib.suppress(RuntimeError):  # already initialised in this process
                tf.config.threading.set_intra_op_parallelism_threads(self.threads)
                tf.config.threading.set_inter_op_parallelism_threads(self.threads)
        from kerasnuc.inference.predictor import Predictor

        if self.server is not None:
            return Predictor.from_server(
                self.server, self.model, tta=self.tta, batch_size=self.batch_size, views=self.views
            )
        if self.run_dir is None:
            raise KerasnucError("PredictorSpec needs run_dir or server")
        return Predictor.from_run_dirs(
            self.run_dir, tta=self.tta, batch_size=self.batch_size, views=self.views
        )


_JOBS: dict[Any, PredictJob] = {}
_JOBS_LOCK = threading.Lock()


def cached_job(
    spec: Any, options: PredictOptions, model_id: str | None, build: Callable[[], Any]
) -> PredictJob:
    """The :class:`PredictJob` of this process for ``(spec, options, model_id)``.

    The predictor is built by ``build()`` at the first call in a worker process and reused by
    every later task of that process (one model load per worker, not per task).
    """
    key = (spec, options, model_id)
    with _JOBS_LOCK:
        job = _JOBS.get(key)
        if job is None:
            job = PredictJob(build(), options, model_id)
            _JOBS[key] = job
        return job


def _predict_task(
    spec: Any,
    options: PredictOptions,
    model_id: str | None,
    path: str,
    out_dir: str,
    name: str,
) -> InputReport:
    """Worker side: predict one input; a bad input becomes a ``failed`` report, not a retry."""
    build = spec.build if hasattr(spec, "build") else spec
    try:
        job = cached_job(spec, options, model_id, build)
        return job.run_input(path, out_dir, name)
    except Exception as exc:  # one bad input must not stop the batch (as the local run)
        return failed_report(path, name, out_dir, exc)


def default_local_workers(threads_per_worker: int = 1) -> int:
    """Worker processes of ``--cluster local``: cores // threads, at most one per 3 GB of RAM."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, (cores or 1) // max(1, threads_per_worker))
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        workers = min(workers, max(1, memory // WORKER_MEMORY_BYTES))
    except (ValueError, OSError, AttributeError):
        pass
    return int(workers)


def parse_cluster(spec: str) -> tuple[str, Any]:
    """``("local", N or None)``, ``("address", URL)`` or ``("file", PATH)`` of ``--cluster``.

    Raises:
        KerasnucError: an unknown form or a bad worker count.
    """
    value = spec.strip()
    if value == "local" or value.startswith("local:"):
        count = value.partition(":")[2]
        if not count:
            return "local", None
        if not count.isdigit() or int(count) < 1:
            raise KerasnucError(f"--cluster {spec}: the worker count must be a positive integer")
        return "local", int(count)
    if "://" in value:
        return "address", value
    if Path(value).is_file():
        return "file", value
    raise KerasnucError(
        f"--cluster {spec}: use local, local:N, a scheduler address (tcp://host:8786) "
        "or an existing scheduler file"
    )


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise KerasnucError(
            "--cluster needs Dask distributed: pip install 'kerasnuc[cluster]'"
        ) from exc
    return distributed


@contextlib.contextmanager
def open_client(spec: str, worker_threads: int = 1) -> Iterator[Any]:
    """A ``distributed.Client`` for ``--cluster spec``; an embedded cluster stops at the end.

    An embedded cluster runs one task at a time per worker process (one model in memory each);
    ``worker_threads`` (TensorFlow's threads per worker) only sets the default worker count.
    """
    distributed = _import_distributed()
    kind, value = parse_cluster(spec)
    if kind == "local":
        workers = value or default_local_workers(worker_threads)
        with (
            distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                memory_limit=0,
                silence_logs=logging.ERROR,
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            yield client
        return
    try:
        if kind == "file":
            client = distributed.Client(scheduler_file=value, timeout=30)
        else:
            client = distributed.Client(value, timeout=30)
    except (OSError, TimeoutError, ValueError) as exc:
        raise KerasnucError(f"--cluster {spec}: cannot reach the scheduler ({exc})") from exc
    with client:
        yield client


def predict_on_cluster(
    client: Any,
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    spec: Any,
    options: PredictOptions | None = None,
    model_id: str | None = None,
    on_report: Callable[[InputReport], None] | None = None,
) -> list[InputReport]:
    """Predict ``paths`` into ``out_dir`` with one Dask task per input.

    Args:
        client: a ``distributed.Client``.
        paths: input files (paths every worker can read: shared storage on a real cluster).
        out_dir: the output folder ``OUT`` (shared storage too).
        spec: a :class:`PredictorSpec`, or any picklable, hashable zero-argument callable that
            returns a predictor (see :class:`~kerasnuc.inference.job.PredictJob`).
        options: job settings; their ``resume`` skips complete inputs as in the local run.
        model_id: model name recorded in the summaries.
        on_report: called with each input's report as it finishes (in completion order).

    Returns:
        One :class:`InputReport` per input, in the order of ``paths``.
    """
    distributed = _import_distributed()
    options = PredictOptions() if options is None else options
    paths = [Path(p).resolve() for p in paths]
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(paths)
    batch = uuid.uuid4().hex[:12]  # task keys unique per call: Dask reuses results by key
    futures = {}
    for index, (path, name) in enumerate(zip(paths, names, strict=True)):
        future = client.submit(
            _predict_task,
            spec,
            options,
            model_id,
            str(path),
            str(out_dir),
            name,
            key=f"kerasnuc-predict-{batch}-{index}-{name}",
            pure=False,
        )
        futures[future] = index
    reports: list[InputReport | None] = [None] * len(paths)
    for future in distributed.as_completed(list(futures)):
        index = futures[future]
        try:
            report = future.result()
        except Exception as exc:  # the task failed on every worker it was given (e.g. killed)
            report = InputReport(
                path=paths[index],
                name=names[index],
                status="failed",
                out_dir=out_dir / names[index],
                reason=f"{paths[index]}: worker failed ({type(exc).__name__}: {exc})",
            )
        reports[index] = report
        if on_report is not None:
            on_report(report)
    return [r for r in reports if r is not None]
