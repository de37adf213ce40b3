"""Speed of PQ + AJI: one contingency table per image vs. the textbook per-instance loop.

Scores the MoNuSeg (``monuseg_kumar``) ground truth of each 1000x1000 image against a realistic
synthetic prediction and times two implementations on the same pairs:

* ``kerasnuc``: :func:`kerasnuc.metrics.pair_stats` (one bincount pass over combined ids) then
  ``.pq()`` and ``.aji()`` on the sparse table.
* ``naive``: the plain textbook loop written below. For each ground-truth nucleus it builds the
  full-image mask ``gt == g``, lists the predicted ids under that mask, and for each of them
  builds ``pred == p`` and counts the intersection and union of the two full-image masks with
  numpy. The inner loop is restricted to predictions touching the nucleus (the others have
  IoU 0 and cannot change PQ or AJI), which keeps the run to minutes; no bounding boxes or other
  precomputation. Prediction areas for AJI's unused predictions are counted one mask at a time.

The prediction of each image (seeded by its index) is the ground truth with ~3 % of the nuclei
removed, ~3 % merged into a touching neighbour, ~10 % shifted by 1-4 px, every nucleus eroded
by one pixel (4-neighbourhood) and the ids replaced by non-consecutive random ones.

Usage (limit threads on a shared machine)::

    OMP_NUM_THREADS=1 python benchmarks/metrics_speed.py [--n-images 30] [--data DIR]

The data root defaults to ``$KERASNUC_DATA`` or ``../shared/data`` next to the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from kerasnuc.cli.common import format_table
from kerasnuc.data.dataset import Dataset
from kerasnuc.metrics import pair_stats

REPO = Path(__file__).resolve().parent.parent


def data_root(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    return Path(os.environ.get("KERASNUC_DATA", REPO.parent / "shared" / "data"))


def touching_pairs(inst: np.ndarray) -> np.ndarray:
    """``(K, 2)`` distinct pairs of different non-zero ids that touch horizontally/vertically."""
    pairs = []
    for a, b in ((inst[:, :-1], inst[:, 1:]), (inst[:-1, :], inst[1:, :])):
        m = (a > 0) & (b > 0) & (a != b)
        pairs.append(np.stack([np.minimum(a[m], b[m]), np.maximum(a[m], b[m])], axis=1))
    both = np.concatenate(pairs)
    return np.unique(both, axis=0) if both.size else both.reshape(0, 2)


def make_prediction(gt: np.ndarray, seed: int) -> np.ndarray:
    """A realistic imperfect instance map derived from the ground truth (see module docstring)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(gt)
    ids = ids[ids > 0]
    pred = gt.copy()
    # Remove ~3 %.
    removed = rng.choice(ids, size=max(1, round(0.03 * ids.size)), replace=False)
    pred[np.isin(pred, removed)] = 0
    # Merge ~3 %: relabel one nucleus of a touching pair with its neighbour's id.
    pairs = touching_pairs(pred)
    if len(pairs):
        pick = rng.choice(len(pairs), size=min(len(pairs), max(1, round(0.03 * ids.size))))
        for a, b in pairs[pick]:
            pred[pred == b] = a
    # Shift ~10 % by 1-4 px (pasted over whatever is there).
    kept = np.unique(pred)
    kept = kept[kept > 0]
    boxes = ndimage.find_objects(pred)
    h, w = pred.shape
    for i in rng.choice(kept, size=round(0.10 * kept.size), replace=False):
        sl = boxes[i - 1]
        if sl is None:
            continue
        dy, dx = rng.integers(-4, 5, size=2)
        if dy == 0 and dx == 0:
            dx = 2
        ys, xs = np.nonzero(pred[sl] == i)
        ys, xs = ys + sl[0].start, xs + sl[1].start
        pred[ys, xs] = 0
        ny, nx = np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)
        pred[ny, nx] = i
    # Erode every nucleus by one pixel: drop pixels with a 4-neighbour of another label.
    pad = np.pad(pred, 1, mode="edge")
    edge = (
        (pad[:-2, 1:-1] != pred)
        | (pad[2:, 1:-1] != pred)
        | (pad[1:-1, :-2] != pred)
        | (pad[1:-1, 2:] != pred)
    )
    pred[edge] = 0
    # Non-consecutive ids.
    uniq, inv = np.unique(pred, return_inverse=True)
    new = np.r_[0, 1000 + 7 * rng.permutation(uniq.size - 1)] if uniq[0] == 0 else None
    if new is None:
        new = 1000 + 7 * rng.permutation(uniq.size)
    return new[inv.reshape(pred.shape)].astype(np.int32)


def naive_pq_aji(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Textbook per-instance loop for PQ (IoU > 0.5) and Kumar's AJI (see module docstring)."""
    gt_ids = [int(v) for v in np.unique(gt) if v != 0]
    pred_ids = [int(v) for v in np.unique(pred) if v != 0]
    tp, iou_sum = 0, 0.0
    aji_inter, aji_union = 0, 0
    used: set[int] = set()
    for g in gt_ids:
        g_mask = gt == g
        touching = [int(v) for v in np.unique(pred[g_mask]) if v != 0]
        best_iou, best_inter, best_union, best_p = -1.0, 0, 0, None
        for p in touching:
            p_mask = pred == p
            inter = int(np.count_nonzero(g_mask & p_mask))
            union = int(np.count_nonzero(g_mask | p_mask))
            iou = inter / union
            if iou > 0.5:
                tp += 1
                iou_sum += iou
            if iou > best_iou:
                best_iou, best_inter, best_union, best_p = iou, inter, union, p
        if best_p is None:
            aji_union += int(np.count_nonzero(g_mask))
        else:
            aji_inter += best_inter
            aji_union += best_union
            used.add(best_p)
    for p in pred_ids:
        if p not in used:
            aji_union += int(np.count_nonzero(pred == p))
    fp, fn = len(pred_ids) - tp, len(gt_ids) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn) if tp + fp + fn else float("nan")
    sq = iou_sum / tp if tp else 0.0
    return {
        "pq": dq * sq,
        "dq": dq,
        "sq": sq,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "aji": aji_inter / aji_union if aji_union else float("nan"),
    }


def fast_pq_aji(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    stats = pair_stats(gt, pred)
    r = stats.pq()
    return {
        "pq": r.pq,
        "dq": r.dq,
        "sq": r.sq,
        "tp": r.tp,
        "fp": r.fp,
        "fn": r.fn,
        "aji": stats.aji(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=30, help="images to use (default 30)")
    parser.add_argument("--data", default=None, help="data root holding monuseg_kumar/")
    args = parser.parse_args(argv)

    ds = Dataset(data_root(args.data) / "monuseg_kumar")
    ids = ds.ids[: args.n_images]
    pairs = []
    for k, id in enumerate(ids):
        gt = ds.instances(id)
        pairs.append((gt, make_prediction(gt, seed=k)))
    n_gt = sum(int(np.unique(g).size - 1) for g, _ in pairs)
    print(
        f"{len(pairs)} MoNuSeg images ({pairs[0][0].shape[0]}x{pairs[0][0].shape[1]}), "
        f"{n_gt} ground-truth nuclei; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )

    fast_pq_aji(*pairs[0])  # warm-up (imports, allocator)
    t0 = time.perf_counter()
    fast = [fast_pq_aji(g, p) for g, p in pairs]
    t_fast = time.perf_counter() - t0

    t0 = time.perf_counter()
    naive = []
    for i, (g, p) in enumerate(pairs):
        naive.append(naive_pq_aji(g, p))
        print(f"\rnaive loop: {i + 1}/{len(pairs)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    t_naive = time.perf_counter() - t0

    keys = ["pq", "dq", "sq", "aji"]
    max_diff = max(abs(f[k] - n[k]) for f, n in zip(fast, naive, strict=True) for k in keys)
    counts_equal = all(
        f[k] == n[k] for f, n in zip(fast, naive, strict=True) for k in ("tp", "fp", "fn")
    )
    rows = [
        {
            "implementation": "kerasnuc pair_stats",
            "total_s": t_fast,
            "ms_per_image": 1000 * t_fast / len(pairs),
            "speedup": t_naive / t_fast,
        },
        {
            "implementation": "naive per-instance loop",
            "total_s": t_naive,
            "ms_per_image": 1000 * t_naive / len(pairs),
            "speedup": 1.0,
        },
    ]
    print(format_table(rows, ["implementation", "total_s", "ms_per_image", "speedup"], "{:.3f}"))
    print(
        f"mean PQ {np.mean([f['pq'] for f in fast]):.4f}  DQ {np.mean([f['dq'] for f in fast]):.4f}"
        f"  SQ {np.mean([f['sq'] for f in fast]):.4f}  AJI {np.mean([f['aji'] for f in fast]):.4f}"
    )
    print(
        f"speedup {t_naive / t_fast:.1f}x; max |diff| over PQ, DQ, SQ, AJI: {max_diff:.3e}; "
        f"TP/FP/FN identical: {counts_equal}"
    )
    ok = max_diff < 1e-9 and counts_equal
    if not ok:
        print("MISMATCH between the implementations", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
