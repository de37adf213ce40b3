"""Instance metrics against values computed by hand or by pixel counting in the test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from kerasnuc.metrics import (
    PQResult,
    aji,
    aji_plus,
    hausdorff_distance,
    max_weight_matching,
    object_dice,
    object_hausdorff,
    pair_stats,
    panoptic_quality,
)


def paint(shape, boxes):
    """Label map with ``{id: (r0, r1, c0, c1)}`` rectangles (stop exclusive)."""
    out = np.zeros(shape, dtype=np.int32)
    for i, (r0, r1, c0, c1) in boxes.items():
        out[r0:r1, c0:c1] = i
    return out


def disc(shape, cy, cx, r):
    """Pixels whose centre lies within ``r`` of ``(cy, cx)``, by the equation of the disc."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# Known overlap -----------------------------------------------------------------------------------


def test_shift_by_one_column_is_a_match():
    # 4x4 squares shifted by one column: |G & P| = 12, |G | P| = 20, IoU = 0.6.
    gt = paint((8, 8), {1: (0, 4, 0, 4)})
    pred = paint((8, 8), {1: (0, 4, 1, 5)})
    r = panoptic_quality(gt, pred)
    assert (r.tp, r.fp, r.fn) == (1, 0, 0)
    assert r.dq == 1.0
    assert r.sq == pytest.approx(0.6)
    assert r.pq == pytest.approx(0.6)
    assert aji(gt, pred) == pytest.approx(12 / 20)
    assert aji_plus(gt, pred) == pytest.approx(12 / 20)
    assert object_dice(gt, pred) == pytest.approx(2 * 12 / 32)
    # Column 0 of G is 1 px from column 1 of P, column 4 of P is 1 px from G.
    assert object_hausdorff(gt, pred) == pytest.approx(1.0)


def test_shift_by_two_columns_is_not_a_match():
    # |G & P| = 8, |G | P| = 24: IoU = 1/3 <= 0.5, so one FP and one FN.
    gt = paint((8, 8), {1: (0, 4, 0, 4)})
    pred = paint((8, 8), {1: (0, 4, 2, 6)})
    r = panoptic_quality(gt, pred)
    assert (r.tp, r.fp, r.fn) == (0, 1, 1)
    assert (r.pq, r.dq, r.sq) == (0.0, 0.0, 0.0)
    assert aji(gt, pred) == pytest.approx(8 / 24)
    assert object_hausdorff(gt, pred) == pytest.approx(2.0)


def test_iou_exactly_half_does_not_match():
    # 4x4 square vs 4x2 inside it: IoU = 8 / 16 = 0.5 exactly, and a match needs IoU > 0.5.
    gt = paint((6, 6), {1: (0, 4, 0, 4)})
    pred = paint((6, 6), {1: (0, 4, 0, 2)})
    assert panoptic_quality(gt, pred).tp == 0
    assert panoptic_quality(gt, pred, match_iou=0.4).tp == 1


def test_pq_sums_iou_over_matches():
    # Two nuclei, one matched with IoU 12/20, one missed; one spurious prediction.
    gt = paint((12, 20), {1: (0, 4, 0, 4), 2: (6, 10, 0, 4)})
    pred = paint((12, 20), {3: (0, 4, 1, 5), 9: (6, 10, 12, 16)})
    r = panoptic_quality(gt, pred)
    assert (r.tp, r.fp, r.fn) == (1, 1, 1)
    assert r.dq == pytest.approx(1 / (1 + 0.5 + 0.5))
    assert r.sq == pytest.approx(0.6)
    assert r.pq == pytest.approx(0.3)
    # AJI: G1 pairs P3 (12 / 20); G2 overlaps nothing (+16); P9 is unused (+16).
    assert aji(gt, pred) == pytest.approx(12 / (20 + 16 + 16))


# Split and merge ---------------------------------------------------------------------------------


def test_split_nucleus():
    # One 4x8 nucleus predicted as two 4x4 halves: each IoU = 16 / 32 = 0.5 (no match).
    gt = paint((6, 10), {5: (0, 4, 0, 8)})
    pred = paint((6, 10), {10: (0, 4, 0, 4), 20: (0, 4, 4, 8)})
    r = panoptic_quality(gt, pred)
    assert (r.tp, r.fp, r.fn) == (0, 2, 1)
    assert r.pq == 0.0
    # AJI: the nucleus picks one half (16 / 32), the other half is unused (+16).
    assert aji(gt, pred) == pytest.approx(16 / 48)
    assert aji_plus(gt, pred) == pytest.approx(16 / 48)
    # Object Dice: every pair has Dice 2 * 16 / 48 on both sides.
    assert object_dice(gt, pred) == pytest.approx(2 / 3)
    # Hausdorff: the far end of the nucleus is 4 px from either half.
    assert object_hausdorff(gt, pred) == pytest.approx(4.0)


def test_merged_nuclei_aji_counts_the_prediction_twice_aji_plus_once():
    # G1 = 4x5 (20 px), G2 = 4x3 (12 px) side by side, predicted as one 4x8 blob P (32 px).
    gt = paint((6, 10), {1: (0, 4, 0, 5), 2: (0, 4, 5, 8)})
    pred = paint((6, 10), {7: (0, 4, 0, 8)})
    r = panoptic_quality(gt, pred)
    # IoU(G1, P) = 20 / 32 > 0.5 matches; IoU(G2, P) = 12 / 32 does not.
    assert (r.tp, r.fp, r.fn) == (1, 0, 1)
    assert r.dq == pytest.approx(1 / 1.5)
    assert r.sq == pytest.approx(20 / 32)
    assert r.pq == pytest.approx(20 / 32 / 1.5)
    # Kumar's AJI: both nuclei pick P: (20 + 12) / (32 + 32).
    assert aji(gt, pred) == pytest.approx(32 / 64)
    # AJI+: P goes to G1 only; G2 is unpaired: 20 / (32 + 12).
    assert aji_plus(gt, pred) == pytest.approx(20 / 44)
    # Object Dice: G1 2*20/52, G2 2*12/44 weighted 20/32, 12/32; P's best overlap is G1.
    expect = 0.5 * ((20 * 40 / 52 + 12 * 24 / 44) / 32 + 40 / 52)
    assert object_dice(gt, pred) == pytest.approx(expect)


def test_ties_go_to_the_smallest_prediction_id():
    # G (cols 2-5) overlaps P5 (cols 0-3) and P3 (cols 4-7) by 8 px each: IoU 8/24 both.
    gt = paint((4, 8), {1: (0, 4, 2, 6)})
    pred = paint((4, 8), {5: (0, 4, 0, 4), 3: (0, 4, 4, 8)})
    s = pair_stats(gt, pred)
    gt_partner, pred_partner = s.best_overlap()
    assert s.pred_ids[gt_partner[0]] == 3
    assert pred_partner.tolist() == [0, 0]
    # AJI: 8 / (24 + 16 for the unused half).
    assert s.aji() == pytest.approx(8 / 40)


# Empty maps --------------------------------------------------------------------------------------


def test_empty_prediction():
    gt = paint((8, 8), {1: (0, 3, 0, 3), 2: (4, 8, 4, 8)})
    pred = np.zeros_like(gt)
    r = panoptic_quality(gt, pred)
    assert (r.tp, r.fp, r.fn) == (0, 0, 2)
    assert (r.pq, r.dq, r.sq) == (0.0, 0.0, 0.0)
    assert aji(gt, pred) == 0.0
    assert aji_plus(gt, pred) == 0.0
    assert object_dice(gt, pred) == 0.0
    assert object_hausdorff(gt, pred) == math.inf


def test_empty_ground_truth():
    pred = paint((8, 8), {4: (0, 3, 0, 3)})
    gt = np.zeros_like(pred)
    r = panoptic_quality(gt, pred)
    assert (r.tp, r.fp, r.fn) == (0, 1, 0)
    assert r.pq == 0.0
    assert aji(gt, pred) == 0.0
    assert aji_plus(gt, pred) == 0.0
    assert object_dice(gt, pred) == 0.0
    assert object_hausdorff(gt, pred) == math.inf


def test_both_empty_is_undefined():
    z = np.zeros((5, 5), dtype=np.int32)
    r = panoptic_quality(z, z)
    assert (r.tp, r.fp, r.fn) == (0, 0, 0)
    assert math.isnan(r.pq) and math.isnan(r.dq) and math.isnan(r.sq)
    for fn in (aji, aji_plus, object_dice, object_hausdorff):
        assert math.isnan(fn(z, z))


# Ids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("big", [70_000, 2**31 - 5])
def test_non_contiguous_ids(big):
    # The merge case with arbitrary ids (the largest one forces the np.unique path).
    gt = paint((6, 10), {big: (0, 4, 0, 5), 3: (0, 4, 5, 8)}).astype(np.int64)
    pred = paint((6, 10), {big - 1: (0, 4, 0, 8)}).astype(np.int64)
    s = pair_stats(gt, pred)
    assert s.gt_ids.tolist() == [3, big]
    assert s.gt_areas.tolist() == [12, 20]
    assert s.pred_ids.tolist() == [big - 1]
    assert s.pq().sq == pytest.approx(20 / 32)
    assert s.aji() == pytest.approx(32 / 64)
    assert s.aji_plus() == pytest.approx(20 / 44)


def test_bool_and_unsigned_inputs():
    gt = np.zeros((4, 4), dtype=bool)
    gt[:2, :2] = True
    pred = np.zeros((4, 4), dtype=np.uint16)
    pred[:2, :3] = 65535
    r = panoptic_quality(gt, pred)
    assert r.tp == 1 and r.sq == pytest.approx(4 / 6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        pair_stats(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError, match="negative"):
        pair_stats(-np.ones((3, 3), int), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match="integer dtype"):
        pair_stats(np.zeros((3, 3), float), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match="2-D"):
        pair_stats(np.zeros((3, 3, 1), int), np.zeros((3, 3, 1), int))
    with pytest.raises(ValueError, match="match_iou"):
        pair_stats(np.ones((3, 3), int), np.ones((3, 3), int)).pq(1.0)


# Synthetic shifted discs -------------------------------------------------------------------------


def counted_iou(shape, cy, cx, r, d):
    """IoU of a disc and the same disc shifted by ``d`` columns, by counting pixels."""
    inter = union = 0
    for y in range(shape[0]):
        for x in range(shape[1]):
            a = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
            b = (y - cy) ** 2 + (x - cx - d) ** 2 <= r * r
            inter += a and b
            union += a or b
    return inter / union, inter, union


def lens_iou(r, d):
    """IoU of two continuous discs of radius ``r`` at distance ``d`` (circle-circle lens)."""
    lens = 2 * r * r * math.acos(d / (2 * r)) - d / 2 * math.sqrt(4 * r * r - d * d)
    return lens / (2 * math.pi * r * r - lens)


@pytest.mark.parametrize("d", [0, 1, 3, 6, 9, 14])
def test_shifted_disc(d):
    shape, r = (48, 64), 12
    gt = disc(shape, 24, 20, r).astype(np.int32)
    pred = disc(shape, 24, 20 + d, r).astype(np.int32) * 17
    iou, inter, union = counted_iou(shape, 24, 20, r, d)
    assert iou == pytest.approx(lens_iou(r, d), abs=0.03)  # the pixel count tracks geometry
    res = panoptic_quality(gt, pred)
    if iou > 0.5:
        assert (res.tp, res.fp, res.fn) == (1, 0, 0)
        assert res.pq == pytest.approx(iou, abs=1e-12)
    else:
        assert (res.tp, res.fp, res.fn) == (0, 1, 1)
        assert res.pq == 0.0
    assert aji(gt, pred) == pytest.approx(iou, abs=1e-12)
    assert aji_plus(gt, pred) == pytest.approx(iou, abs=1e-12)
    area = int(gt.sum())
    assert object_dice(gt, pred) == pytest.approx(2 * inter / (2 * area), abs=1e-12)
    # A convex set and its translate by v are |v| apart in the Hausdorff sense.
    assert object_hausdorff(gt, pred) == pytest.approx(float(d))


def test_several_shifted_discs():
    shape, r = (40, 160), 8
    shifts = [0, 2, 5, 9]
    gt = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    ious = []
    for k, d in enumerate(shifts):
        cx = 15 + 38 * k
        gt[disc(shape, 20, cx, r)] = k + 1
        pred[disc(shape, 20, cx + d, r)] = 100 - k
        ious.append(counted_iou((40, 40), 20, 15, r, d)[0])
    matched = [v for v in ious if v > 0.5]
    tp = len(matched)
    fp = fn = len(shifts) - tp
    res = panoptic_quality(gt, pred)
    assert (res.tp, res.fp, res.fn) == (tp, fp, fn)
    assert res.pq == pytest.approx(sum(matched) / (tp + 0.5 * fp + 0.5 * fn), abs=1e-12)
    # Each disc only touches its own shifted copy, so AJI = sum |G & P| / sum |G | P|.
    inters, unions = zip(*[counted_iou((40, 40), 20, 15, r, d)[1:] for d in shifts], strict=True)
    assert aji(gt, pred) == pytest.approx(sum(inters) / sum(unions), abs=1e-12)
    # All discs have the same area: object Hausdorff is the mean shift.
    assert object_hausdorff(gt, pred) == pytest.approx(np.mean(shifts))


# Object-level Hausdorff without overlap ----------------------------------------------------------


def test_object_hausdorff_uses_nearest_object_when_nothing_overlaps():
    gt = np.zeros((21, 40), np.int32)
    pred = np.zeros((21, 40), np.int32)
    gt[10, 10] = 1
    pred[10, 12:31] = 4  # bar: closer bounding box (gap 2) but Hausdorff 20 to the GT pixel
    pred[10, 5] = 9  # single pixel at distance 5
    # GT side: nearest by Hausdorff is the pixel (5). Prediction side (only one GT object):
    # the bar (19 px) at 20, the pixel (1 px) at 5.
    expect = 0.5 * (5 + (19 * 20 + 1 * 5) / 20)
    assert object_hausdorff(gt, pred) == pytest.approx(expect)


def test_hausdorff_distance_of_masks():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0, 0] = True
    b[3, 4] = True
    b[0, 1] = True
    assert hausdorff_distance(a, b) == pytest.approx(5.0)
    assert hausdorff_distance(a, a) == 0.0
    assert hausdorff_distance(a, np.zeros_like(a)) == math.inf
    assert hausdorff_distance(np.zeros_like(a), np.zeros_like(a)) == 0.0


# Building blocks ---------------------------------------------------------------------------------


def test_pq_result_pools_counts():
    a = PQResult.from_counts(2, 1, 0, 1.5)
    b = PQResult.from_counts(1, 0, 3, 0.9)
    s = a + b
    assert (s.tp, s.fp, s.fn, s.n_gt, s.n_pred) == (3, 1, 3, 6, 4)
    assert s.pq == pytest.approx(2.4 / (3 + 0.5 + 1.5))


def test_max_weight_matching_equals_brute_force(rng):
    for _ in range(20):
        n_r, n_c = (int(v) for v in rng.integers(1, 6, size=2))
        mask = rng.random((n_r, n_c)) < 0.5
        w = np.round(rng.random((n_r, n_c)), 3) + 0.001
        rows, cols = np.nonzero(mask)
        mr, mc = max_weight_matching(rows, cols, w[rows, cols], n_r, n_c)
        got = float(w[mr, mc].sum()) if mr.size else 0.0
        assert mask[mr, mc].all() and len(set(mr)) == mr.size and len(set(mc)) == mc.size
        best = 0.0
        k = min(n_r, n_c)
        for rsel in itertools.combinations(range(n_r), k):
            for perm in itertools.permutations(range(n_c), k):
                pairs = zip(rsel, perm, strict=True)
                best = max(best, sum(w[r, c] for r, c in pairs if mask[r, c]))
        assert got == pytest.approx(best)


# Random maps against per-instance definitions written out in the test ---------------------------


def random_map(rng, shape, n):
    """Overlapping random rectangles painted in order, with sparse ids (some get covered)."""
    out = np.zeros(shape, np.int32)
    for k in range(n):
        h, w = rng.integers(3, 10, size=2)
        r, c = rng.integers(0, shape[0] - h), rng.integers(0, shape[1] - w)
        out[r : r + h, c : c + w] = 5 * k + 2
    return out


def definition_scores(gt, pred):
    """PQ, AJI, AJI+, object Dice and Hausdorff by looping over instances (pixel coordinates)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import directed_hausdorff

    g_ids = [i for i in np.unique(gt) if i]
    p_ids = [j for j in np.unique(pred) if j]
    gm = {i: gt == i for i in g_ids}
    pm = {j: pred == j for j in p_ids}
    inter = np.array([[np.sum(gm[i] & pm[j]) for j in p_ids] for i in g_ids]).reshape(
        len(g_ids), len(p_ids)
    )
    union = np.array([[np.sum(gm[i] | pm[j]) for j in p_ids] for i in g_ids]).reshape(inter.shape)
    iou = inter / union
    ga = np.array([gm[i].sum() for i in g_ids])
    pa = np.array([pm[j].sum() for j in p_ids])
    match = iou > 0.5
    tp = int(match.sum())
    pq = iou[match].sum() / (tp + 0.5 * (len(p_ids) - tp) + 0.5 * (len(g_ids) - tp))
    # Kumar AJI: argmax IoU per nucleus (only nuclei with overlap pair).
    c = u = 0
    used = set()
    for a in range(len(g_ids)):
        if inter[a].max() == 0:
            u += ga[a]
            continue
        b = int(np.argmax(iou[a]))
        c += inter[a, b]
        u += union[a, b]
        used.add(b)
    u += sum(pa[b] for b in range(len(p_ids)) if b not in used)
    aji_v = c / u
    # AJI+: dense Hungarian on the full IoU matrix.
    ra, cb = linear_sum_assignment(-iou)
    keep = iou[ra, cb] > 0
    ra, cb = ra[keep], cb[keep]
    u2 = union[ra, cb].sum() + np.delete(ga, ra).sum() + np.delete(pa, cb).sum()
    aji_p = inter[ra, cb].sum() / u2

    def coords(m):
        return np.argwhere(m)

    def haus(a, b):
        return max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])

    def side(own_ids, own_m, own_a, other_ids, other_m, inter_rows):
        dice = hd = 0.0
        for a, i in enumerate(own_ids):
            if inter_rows[a].max() > 0:
                b = int(np.argmax(inter_rows[a]))  # largest overlap, first (smallest id) on ties
                m = other_m[other_ids[b]]
                dice += own_a[a] * 2 * inter_rows[a, b] / (own_a[a] + m.sum())
            else:
                ds = [haus(coords(own_m[i]), coords(other_m[j])) for j in other_ids]
                m = other_m[other_ids[int(np.argmin(ds))]]
            hd += own_a[a] * haus(coords(own_m[i]), coords(m))
        return dice / own_a.sum(), hd / own_a.sum()

    dg, hg = side(g_ids, gm, ga, p_ids, pm, inter)
    dp, hp = side(p_ids, pm, pa, g_ids, gm, inter.T)
    return {
        "pq": pq,
        "aji": aji_v,
        "aji_plus": aji_p,
        "obj_dice": (dg + dp) / 2,
        "obj_hd": (hg + hp) / 2,
    }


def test_random_maps_match_the_definitions(rng):
    for _ in range(6):
        gt = random_map(rng, (40, 48), 12)
        pred = random_map(rng, (40, 48), 12)
        want = definition_scores(gt, pred)
        s = pair_stats(gt, pred)
        assert s.pq().pq == pytest.approx(want["pq"], abs=1e-12)
        assert s.aji() == pytest.approx(want["aji"], abs=1e-12)
        assert s.aji_plus() == pytest.approx(want["aji_plus"], abs=1e-12)
        assert s.object_dice() == pytest.approx(want["obj_dice"], abs=1e-12)
        assert object_hausdorff(gt, pred) == pytest.approx(want["obj_hd"], abs=1e-9)
