"""Images per minute of ``kerasnuc predict`` in this process and on 1 and 2 local Dask workers.

Copies N real images (the Kumar ``val`` images from ``$KERASNUC_DATA``, or the bundled CC0 demo
images when the data is absent) into a temporary folder, then predicts them with the bundled
``default`` model (or ``--model``):

* ``in process``: :func:`kerasnuc.inference.job.predict_inputs`, one input after the other;
* ``cluster local:W``: :func:`kerasnuc.inference.cluster.predict_on_cluster` on an embedded
  ``LocalCluster`` with W worker processes and ``--worker-threads`` TensorFlow threads each.

Wall times include the workers' start (TensorFlow import and model load, once per worker), as a
user's run does; the ``first result`` column shows that fixed cost. Run it on a quiet machine::

    python benchmarks/cluster_speed.py [--images 8] [--workers 1 2] [--worker-threads 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _images(n: int) -> list[Path]:
    data = Path(os.environ.get("KERASNUC_DATA", ROOT.parent / "shared" / "data"))
    kumar = data / "monuseg_kumar"
    if (kumar / "meta.json").is_file():
        from kerasnuc.data.dataset import Dataset

        ds = Dataset(kumar)
        found = [ds.image_path(i) for i in ds.split("val")]
    else:
        from kerasnuc.examples import EXAMPLE_DATASETS

        found = sorted((EXAMPLE_DATASETS["demo"] / "images").glob("*.png"))
    return [found[k % len(found)] for k in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--model", default="default")
    parser.add_argument("--skip-local", action="store_true")
    args = parser.parse_args()

    from kerasnuc.inference.cluster import PredictorSpec, open_client, predict_on_cluster
    from kerasnuc.inference.job import PredictOptions, predict_inputs
    from kerasnuc.runs import resolve_model

    run_dir = resolve_model(args.model)
    options = PredictOptions(formats=frozenset({"csv", "summary"}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        paths = []
        for k, src in enumerate(_images(args.images)):
            paths.append(folder / f"img{k:03d}{src.suffix}")
            shutil.copyfile(src, paths[-1])
        pixels = 0
        from kerasnuc.io.readers import open_image

        for p in paths:
            with open_image(p) as source:
                pixels += source.shape[0] * source.shape[1]

        def record(label: str, start: float, first: float | None, reports) -> None:
            wall = time.perf_counter() - start
            done = sum(r.status == "done" for r in reports)
            rows.append(
                (
                    label,
                    done,
                    wall,
                    first - start if first else float("nan"),
                    60 * done / wall,
                    wall / (pixels / 1e6),
                )
            )

        if not args.skip_local:
            from kerasnuc.inference.predictor import Predictor

            start = time.perf_counter()
            first: list[float] = []
            predictor = Predictor.from_run_dirs(run_dir)
            reports = predict_inputs(
                paths,
                predictor,
                Path(tmp) / "local",
                options,
                on_report=lambda r: first or first.append(time.perf_counter()),
            )
            record("in process", start, first[0] if first else None, reports)
        spec = PredictorSpec(run_dir=str(run_dir.resolve()), threads=args.worker_threads)
        for workers in args.workers:
            start = time.perf_counter()
            first = []
            with open_client(f"local:{workers}", args.worker_threads) as client:
                reports = predict_on_cluster(
                    client,
                    paths,
                    Path(tmp) / f"cluster{workers}",
                    spec,
                    options,
                    on_report=lambda r, first=first: first or first.append(time.perf_counter()),
                )
            record(f"cluster local:{workers}", start, first[0] if first else None, reports)

    print(f"\n{args.images} images, {pixels / 1e6:.1f} MPx, model {run_dir.name}, "
          f"{os.cpu_count()} cores, --worker-threads {args.worker_threads}")  # fmt: skip
    print(f"{'run':<18} {'done':>5} {'wall s':>8} {'first result s':>15} "
          f"{'images/min':>11} {'s/MPx':>7}")  # fmt: skip
    for label, done, wall, first_s, per_min, s_mpx in rows:
        print(f"{label:<18} {done:>5} {wall:>8.1f} {first_s:>15.1f} {per_min:>11.2f} "
              f"{s_mpx:>7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
