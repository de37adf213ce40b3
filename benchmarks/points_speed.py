"""Speed of the point-label encodings of the ``weak`` method on 1000x1000 MoNuSeg images.

For one ``monuseg_kumar`` image the points are the centroids of its ground-truth nuclei
(``points_from_instances``); the script times every stage of ``encode_points`` (snapping, Voronoi
cells + label, local 2-means clustering, repel code) and the whole ``encode_points`` call, with
all points and with a seeded random subset of ``--subset`` points, and prints the median seconds
over ``--repeats`` runs. It also prints the Dice of the clustering label against the true nuclei
(all points) as a sanity figure. Target: under 2 s per image.

Run with limited threads, from the repository root::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        python benchmarks/points_speed.py --repeats 5

Data: ``$KERASNUC_DATA`` (default ``../shared/data`` relative to the repository root).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from kerasnuc.cli.common import format_table  # noqa: E402
from kerasnuc.data.dataset import Dataset  # noqa: E402
from kerasnuc.data.points import (  # noqa: E402
    cluster_label,
    encode_points,
    nearest_two_distances,
    points_from_instances,
    repel_code,
    snap_points,
    voronoi_cells,
    voronoi_label,
)

REPO = Path(__file__).resolve().parent.parent
STAGES = ["snap", "voronoi", "cluster", "repel"]


def time_stages(image: np.ndarray, points: np.ndarray) -> dict[str, float]:
    """Seconds per stage of one encoding, the same steps as ``encode_points``."""
    shape = image.shape[:2]
    times = {}
    t0 = time.perf_counter()
    px = snap_points(points, shape)
    t1 = time.perf_counter()
    cells, d1 = voronoi_cells(shape, px)
    voronoi = voronoi_label(cells, d1)
    t2 = time.perf_counter()
    cluster = cluster_label(image, cells, d1)
    cluster[voronoi == 0] = 0
    t3 = time.perf_counter()
    repel = repel_code(*nearest_two_distances(shape, px))
    _ = repel * cluster
    t4 = time.perf_counter()
    times.update(snap=t1 - t0, voronoi=t2 - t1, cluster=t3 - t2, repel=t4 - t3)
    times["sum"] = t4 - t0
    t5 = time.perf_counter()
    encode_points(image, points)
    times["encode_points"] = time.perf_counter() - t5
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("KERASNUC_DATA", str(REPO.parent / "shared" / "data"))
    parser.add_argument("--data", default=default_data, help="folder holding monuseg_kumar/")
    parser.add_argument(
        "--id", default=None, help="image id (default: the image with the most nuclei <= 600)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--subset", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    ds = Dataset(Path(args.data) / "monuseg_kumar")
    if args.id is None:
        counts = {i: int(ds.instances(i).max()) for i in ds.ids}
        image_id = max((i for i in counts if counts[i] <= 600), key=counts.get)
    else:
        image_id = args.id
    image, instances = ds.image(image_id), ds.instances(image_id)
    points, _ = points_from_instances(instances)
    rng = np.random.default_rng(args.seed)
    runs = [("all", points)]
    if args.subset < len(points):
        keep = np.sort(rng.choice(len(points), args.subset, replace=False))
        runs.append((f"subset {args.subset}", points[keep]))

    rows = []
    for name, pts in runs:
        encode_points(image, pts)  # warm-up
        trials = [time_stages(image, pts) for _ in range(args.repeats)]
        row = {"points": f"{name} ({len(pts)})"}
        for key in STAGES + ["sum", "encode_points"]:
            row[key] = float(np.median([t[key] for t in trials]))
        rows.append(row)

    out = encode_points(image, points)
    fg, pred = instances > 0, out["cluster"] == 1
    dice = 2 * (fg & pred).sum() / (fg.sum() + pred.sum())
    print(
        f"monuseg_kumar/{image_id}  {image.shape[0]}x{image.shape[1]}  "
        f"median seconds of {args.repeats} runs  "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"
    )
    print(format_table(rows, ["points"] + STAGES + ["sum", "encode_points"], "{:.3f}"))
    print(f"clustering label vs true nuclei (all points): Dice {dice:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
