"""Hungarian matching of Type-II queries: the cost terms, optimality, NaN/inf handling."""

import itertools
import math

import pytest
import torch
from torchvision.ops import box_iou

from samcp.models.affinity import AffinityConfig, HungarianMatcher, hungarian_match, match_cost
from samcp.models.affinity.matcher import query_boxes


def brute_force_min(cost: torch.Tensor) -> float:
    q, g = cost.shape
    best = math.inf
    if q >= g:
        for perm in itertools.permutations(range(q), g):
            best = min(best, sum(float(cost[perm[j], j]) for j in range(g)))
    else:
        for perm in itertools.permutations(range(g), q):
            best = min(best, sum(float(cost[i, perm[i]]) for i in range(q)))
    return best


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (1, 3), (6, 1)])
def test_hungarian_is_optimal_against_brute_force(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    for _ in range(5):
        cost = torch.rand(shape, generator=gen) * 10 - 3
        rows, cols = hungarian_match(cost)
        assert len(rows) == min(shape)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert float(cost[rows, cols].sum()) == pytest.approx(brute_force_min(cost), abs=1e-4)


def test_hungarian_sanitises_nan_and_inf():
    cost = torch.tensor([[float("nan"), 1.0], [2.0, float("inf")], [0.5, 3.0]])
    rows, cols = hungarian_match(cost)
    pairs = set(zip(rows.tolist(), cols.tolist()))
    assert pairs == {(1, 0), (0, 1)} or pairs == {(2, 0), (0, 1)}
    assert all(math.isfinite(float(cost[r, c])) for r, c in pairs)
    # -inf is treated as a very good (finite) cost, not a crash.
    rows, cols = hungarian_match(torch.tensor([[float("-inf"), 0.0], [0.0, 5.0]]))
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]


def _focal(x: float, t: float, alpha: float, gamma: float) -> float:
    p = 1 / (1 + math.exp(-x))
    if t == 1:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def test_match_cost_against_a_loop_implementation():
    cfg = AffinityConfig.tiny(
        cost_cls=2.0, cost_mfl=1.5, cost_dice=0.7, cost_bbox=1.3, cost_giou=0.9
    )
    gen = torch.Generator().manual_seed(0)
    q, g, p, k = 4, 3, 5, 6
    cls = torch.randn(q, k, generator=gen) * 2
    aff = torch.randn(q, p, generator=gen) * 2
    boxes = torch.tensor(
        [[0.1, 0.1, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.2, 0.4, 0.9], [0.5, 0.5, 0.9, 0.8]]
    )
    gt_labels = torch.tensor([2, 0, 5])
    gt_pos = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    gt_ign = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    gt_boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.2, 0.2, 0.6, 0.9], [0.6, 0.0, 0.7, 0.3]])
    patch_valid = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool)
    cost = match_cost(cls, aff, boxes, gt_labels, gt_pos, gt_ign, gt_boxes, patch_valid, cfg)
    a, gm = cfg.focal_alpha, cfg.focal_gamma
    for i in range(q):
        for j in range(g):
            c_cls = _focal(float(cls[i, gt_labels[j]]), 1, a, gm) - _focal(
                float(cls[i, gt_labels[j]]), 0, a, gm
            )
            used = [n for n in range(p) if patch_valid[n] and not gt_ign[j, n]]
            npos = max(int(gt_pos[j].sum()), 1)
            c_mfl = sum(_focal(float(aff[i, n]), float(gt_pos[j, n]), a, gm) for n in used) / npos
            pr = [1 / (1 + math.exp(-float(aff[i, n]))) for n in used]
            tt = [float(gt_pos[j, n]) for n in used]
            c_dice = 1 - (2 * sum(x * y for x, y in zip(pr, tt)) + 1) / (sum(pr) + sum(tt) + 1)
            c_l1 = float((boxes[i] - gt_boxes[j]).abs().sum())
            b1, b2 = boxes[i].tolist(), gt_boxes[j].tolist()
            iou = float(box_iou(boxes[i : i + 1], gt_boxes[j : j + 1]))
            inter = max(0, min(b1[2], b2[2]) - max(b1[0], b2[0])) * max(
                0, min(b1[3], b2[3]) - max(b1[1], b2[1])
            )
            union = (b1[2] - b1[0]) * (b1[3] - b1[1]) + (b2[2] - b2[0]) * (b2[3] - b2[1]) - inter
            hull = (max(b1[2], b2[2]) - min(b1[0], b2[0])) * (max(b1[3], b2[3]) - min(b1[1], b2[1]))
            giou = iou - (hull - union) / hull
            expected = 2.0 * c_cls + 1.5 * c_mfl + 0.7 * c_dice + 1.3 * c_l1 - 0.9 * giou
            assert float(cost[i, j]) == pytest.approx(expected, rel=1e-4, abs=1e-5), (i, j)


def test_query_boxes_are_union_boxes_of_member_patches():
    patch_boxes = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.5, 0.4, 0.7, 0.9], [0.0, 0.0, 1.0, 1.0]])
    valid = torch.tensor([True, True, False])
    aff = torch.tensor([[5.0, 5.0, 9.0], [5.0, -5.0, 9.0], [1.0, 1.0, 1.0]])
    boxes = query_boxes(aff, patch_boxes, valid)
    torch.testing.assert_close(boxes[0], torch.tensor([0.1, 0.1, 0.7, 0.9]))
    # The padded patch 2 never counts.
    torch.testing.assert_close(boxes[1], torch.tensor([0.1, 0.1, 0.2, 0.2]))
    # A degenerate row (all affinities equal) keeps all its valid patches.
    torch.testing.assert_close(boxes[2], torch.tensor([0.1, 0.1, 0.7, 0.9]))


def test_matcher_picks_the_query_that_covers_the_gt_and_skips_padding():
    cfg = AffinityConfig.tiny()
    matcher = HungarianMatcher(cfg)
    p, k = 4, 3
    patch_boxes = torch.tensor(
        [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0], [0, 0, 1, 1.0]]
    )
    patch_valid = torch.tensor([True, True, True, False])
    aff = torch.full((p, p), -6.0)
    aff[0, 0] = 6.0  # query 0 selects patch 0
    aff[1, 1] = 6.0  # query 1 selects patch 1
    aff[3, 1] = 8.0  # query 3 is padding but would be the best match for GT 1
    aff[2, 2] = 6.0
    cls = torch.full((p, k), -4.0)
    cls[0, 1] = 4.0
    cls[1, 2] = 4.0
    cls[3, 2] = 8.0
    query_valid = torch.tensor([True, True, True, False])
    gt_labels = torch.tensor([2, 1])
    gt_pos = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    gt_boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]])
    rows, cols = matcher(
        cls,
        aff,
        patch_boxes,
        patch_valid,
        query_valid,
        gt_labels,
        gt_pos,
        torch.zeros_like(gt_pos),
        gt_boxes,
    )
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 1, 1: 0}
    # No GT: nothing is matched.
    rows, cols = matcher(
        cls,
        aff,
        patch_boxes,
        patch_valid,
        query_valid,
        gt_labels[:0],
        gt_pos[:0],
        gt_pos[:0],
        gt_boxes[:0],
    )
    assert rows.numel() == 0 and cols.numel() == 0
