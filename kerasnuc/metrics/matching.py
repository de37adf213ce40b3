"""One-to-one matching on sparse bipartite graphs (Hungarian algorithm per connected component).

Instance and point matching only ever pairs objects that touch (overlapping pixels) or lie
within a maximum distance, so the weight matrix is sparse. Solving
:func:`scipy.optimize.linear_sum_assignment` once per connected component of the bipartite
graph gives the same optimum as solving it on the full dense matrix (edges between components
do not exist, and absent edges carry no weight) at a fraction of the cost.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def max_weight_matching(
    rows: np.ndarray,
    cols: np.ndarray,
    weights: np.ndarray,
    n_rows: int,
    n_cols: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-weight one-to-one matching of a sparse bipartite graph.

    Each connected component with more than one edge is solved exactly with
    :func:`scipy.optimize.linear_sum_assignment` (Kuhn-Munkres / Jonker-Volgenant) on its dense
    sub-matrix; a component with a single edge is that edge.

    Args:
        rows: ``(E,)`` int row index of each edge, in ``[0, n_rows)``.
        cols: ``(E,)`` int column index of each edge, in ``[0, n_cols)``.
        weights: ``(E,)`` float edge weights, all > 0. At most one edge per (row, col).
        n_rows: number of row nodes.
        n_cols: number of column nodes.

    Returns:
        ``(matched_rows, matched_cols)``: two ``(K,)`` int64 arrays of matched node pairs, sorted by
        row. Only edges of the graph are returned.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    if rows.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if np.any(weights <= 0):
        raise ValueError("`weights` must all be > 0 (an absent edge has weight 0).")
    # Connected components of the bipartite graph; nodes 0..n_rows-1 are rows, then columns.
    n = n_rows + n_cols
    graph = coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols + n_rows)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    comp = labels[rows]
    order = np.argsort(comp, kind="stable")
    comp_sorted = comp[order]
    starts = np.flatnonzero(np.r_[True, comp_sorted[1:] != comp_sorted[:-1]])
    ends = np.r_[starts[1:], comp_sorted.size]
    sizes = ends - starts

    # Components with one edge: that edge is the matching.
    single = order[starts[sizes == 1]]
    out_r = [rows[single]]
    out_c = [cols[single]]
    for s, e in zip(starts[sizes > 1], ends[sizes > 1], strict=True):
        idx = order[s:e]
        r_ids, r_loc = np.unique(rows[idx], return_inverse=True)
        c_ids, c_loc = np.unique(cols[idx], return_inverse=True)
        dense = np.zeros((r_ids.size, c_ids.size), dtype=np.float64)
        dense[r_loc, c_loc] = weights[idx]
        ri, ci = linear_sum_assignment(dense, maximize=True)
        keep = dense[ri, ci] > 0
        out_r.append(r_ids[ri[keep]])
        out_c.append(c_ids[ci[keep]])
    mr = np.concatenate(out_r)
    mc = np.concatenate(out_c)
    srt = np.argsort(mr, kind="stable")
    return mr[srt], mc[srt]
