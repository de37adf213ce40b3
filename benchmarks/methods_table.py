"""Validation scores of one trained model per method, next to the classical baseline.

The methods table of the README (issue: every method trains into a useful model on a CPU
budget): each ``--run METHOD=DIR`` (a run folder or a named model) is predicted on every
``val`` image of the chosen datasets exactly as ``kerasnuc predict`` would (tiled, the run's
tuned ``postproc.json``, no TTA unless ``--tta METHOD=N`` asks for ``kerasnuc predict --tta
N``) and scored with :mod:`kerasnuc.metrics` (binary PQ, AJI, pixel
F1, detection F1 with centroids within 12 px, and mPQ+ where the dataset's cell types are the
model's); the classical colour-deconvolution + Otsu + watershed baseline
(:mod:`kerasnuc.postprocess.classical`) is scored once on the same images. A run that was not
trained on a dataset is still scored there (that is how a user would meet it).

Usage::

    python benchmarks/methods_table.py --run conic=default --run weak=runs/weak_kumar \\
        --run unet_sharp=runs/unet_kumar --run panoptic=runs/panoptic_kumar \\
        [--tta weak=4] [--datasets monuseg_kumar consep] [--data ../shared/data] \\
        [--max-images N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from default_model import scores  # noqa: E402

from kerasnuc.cli.common import format_table  # noqa: E402

COLUMNS = ("pq", "aji", "pixel_f1", "det_f1", "mpq_plus")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="METHOD=DIR",
        help="a label (the method) and a run folder or named model; repeatable",
    )
    parser.add_argument(
        "--tta",
        action="append",
        default=[],
        metavar="METHOD=N",
        help="predict the runs labelled METHOD with N test-time augmentation passes; repeatable",
    )
    parser.add_argument("--data", default=os.environ.get("KERASNUC_DATA", "../shared/data"))
    parser.add_argument("--datasets", nargs="+", default=["monuseg_kumar", "consep"])
    parser.add_argument("--max-images", type=int, default=None)
    args = parser.parse_args()
    runs = []
    for spec in args.run:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            parser.error(f"--run {spec!r}: expected METHOD=DIR")
        runs.append((label, path))
    passes = {}
    for spec in args.tta:
        label, sep, n = spec.partition("=")
        if not sep or not n.isdigit() or label not in {lab for lab, _ in runs}:
            parser.error(f"--tta {spec!r}: expected METHOD=N with METHOD a --run label")
        passes[label] = int(n)
    rows = []
    for i, (label, path) in enumerate(runs):
        tta = passes.get(label, 0)
        table = scores(path, Path(args.data), args.max_images, datasets=tuple(args.datasets),
                       baseline=i == 0, tta=tta)  # fmt: skip
        for row in table:
            model = row["method"] == "model"
            rows.append(
                {
                    "dataset": row["dataset"],
                    "method": label if model else "classical",
                    "run": (f"{path} (tta {tta})" if tta else path) if model else "-",
                    **{k: row.get(k) for k in COLUMNS},
                }
            )
    order = {d: i for i, d in enumerate(args.datasets)}
    rows.sort(key=lambda r: (order[r["dataset"]], r["method"] != "classical"))
    for row in rows:
        for k in COLUMNS:
            row[k] = "" if row[k] is None else f"{row[k]:.3f}"
    print(format_table(rows, ["dataset", "method", "run", *COLUMNS]))


if __name__ == "__main__":
    main()
