"""Hungarian matching of Type-II (instance) queries to GT instances (section 3.2.3).

The cost of pairing query q with GT g is the weighted sum of
    cls   focal classification cost at the GT's class (DETR/DINO `FocalLossCost`),
    mfl   affinity focal cost:  sum_n w_gn [B_gn FL+(A_qn) + (1 - B_gn) FL-(A_qn)] / max(|G_g|, 1),
    dice  1 - (2 sum_n w p B + eps) / (sum_n w p + sum_n w B + eps),
    bbox  L1 between normalised xyxy boxes,
    giou  -GIoU,
where w_gn masks padding and GT g's ignore band, p = sigmoid(A). The box of a query is the union box
of its member patches (normalised affinity > 0.5; the whole image when it has none), as the official
code does; it carries no gradient (matching is under no_grad anyway).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import generalized_box_iou

from .config import AffinityConfig
from .model import merge_patches, union_boxes

_BIG = 1e8


def focal_terms(logits: Tensor, alpha: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Elementwise sigmoid focal loss against target 1 and against target 0."""
    p = logits.sigmoid()
    pos = alpha * (1 - p).pow(gamma) * torch.nn.functional.softplus(-logits)  # -log p
    neg = (1 - alpha) * p.pow(gamma) * torch.nn.functional.softplus(logits)  # -log(1 - p)
    return pos, neg


def query_boxes(
    affinity_logits: Tensor, patch_boxes: Tensor, patch_valid: Tensor, threshold: float = 0.5
) -> Tensor:
    """(Q, 4) normalised xyxy union box of each query's member patches ([0, 0, 1, 1] if none).

    Args:
        affinity_logits: (Q, P).
        patch_boxes: (P, 4) xyxy normalised by the image size.
        patch_valid: (P,) bool.
    """
    members = merge_patches(affinity_logits[None], patch_valid[None], threshold)
    fallback = patch_boxes.new_tensor([[0.0, 0.0, 1.0, 1.0]])
    return union_boxes(members, patch_boxes[None], fallback)[0]


@torch.no_grad()
def match_cost(
    class_logits: Tensor,
    affinity_logits: Tensor,
    boxes: Tensor,
    gt_labels: Tensor,
    gt_pos: Tensor,
    gt_ignore: Tensor,
    gt_boxes: Tensor,
    patch_valid: Tensor,
    config: AffinityConfig,
) -> Tensor:
    """(Q, G) matching cost.

    Args:
        class_logits: (Q, K) classifier logits of the candidate queries.
        affinity_logits: (Q, P).
        boxes: (Q, 4) normalised xyxy boxes of the queries (`query_boxes`).
        gt_labels: (G,) long.
        gt_pos: (G, P) bool, the rows of G.
        gt_ignore: (G, P) bool.
        gt_boxes: (G, 4) normalised xyxy.
        patch_valid: (P,) bool.
        config: cost weights, focal alpha/gamma, dice eps.
    """
    q, g = class_logits.shape[0], gt_labels.shape[0]
    if q == 0 or g == 0:
        return class_logits.new_zeros((q, g))
    a, gm = config.focal_alpha, config.focal_gamma
    cls_pos, cls_neg = focal_terms(class_logits.float(), a, gm)
    cost_cls = (cls_pos - cls_neg)[:, gt_labels]

    logits = affinity_logits.float()
    t = gt_pos.float()
    w = (patch_valid.unsqueeze(0) & ~gt_ignore).float()  # (G, P)
    f_pos, f_neg = focal_terms(logits, a, gm)
    cost_mfl = (f_pos @ (t * w).t() + f_neg @ ((1 - t) * w).t()) / t.sum(1).clamp_min(1).unsqueeze(
        0
    )

    p = logits.sigmoid()
    inter = p @ (t * w).t()
    denom = p @ w.t() + (t * w).sum(1).unsqueeze(0)
    cost_dice = 1 - (2 * inter + config.dice_eps) / (denom + config.dice_eps)

    cost_bbox = torch.cdist(boxes.float(), gt_boxes.float(), p=1)
    cost_giou = -generalized_box_iou(boxes.float(), gt_boxes.float())

    return (
        config.cost_cls * cost_cls
        + config.cost_mfl * cost_mfl
        + config.cost_dice * cost_dice
        + config.cost_bbox * cost_bbox
        + config.cost_giou * cost_giou
    )


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment; NaN and +-inf are replaced by large finite costs first.

    Returns:
        (rows, cols) long tensors on the cost's device, sorted by row; min(Q, G) pairs.
    """
    c = cost.detach().float().cpu().numpy()
    c = np.nan_to_num(c, nan=_BIG, posinf=_BIG, neginf=-_BIG)
    rows, cols = linear_sum_assignment(c)
    dev = cost.device
    return torch.as_tensor(rows, dtype=torch.long, device=dev), torch.as_tensor(
        cols, dtype=torch.long, device=dev
    )


class HungarianMatcher:
    """Matches the valid Type-II queries of one image to its GT instances."""

    def __init__(self, config: AffinityConfig) -> None:
        self.config = config

    @torch.no_grad()
    def __call__(
        self,
        class_logits: Tensor,
        affinity_logits: Tensor,
        patch_boxes: Tensor,
        patch_valid: Tensor,
        query_valid: Tensor,
        gt_labels: Tensor,
        gt_pos: Tensor,
        gt_ignore: Tensor,
        gt_boxes: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Match one image.

        Args:
            class_logits: (Q, K) of the Type-II queries.
            affinity_logits: (Q, P).
            patch_boxes: (P, 4) normalised xyxy.
            patch_valid: (P,) bool.
            query_valid: (Q,) bool; invalid (padding) queries are never matched.
            gt_labels, gt_pos, gt_ignore, gt_boxes: the image's Type-II targets.

        Returns:
            (query indices, GT indices), long tensors of equal length.
        """
        keep = query_valid.nonzero(as_tuple=True)[0]
        boxes = query_boxes(
            affinity_logits[keep], patch_boxes, patch_valid, self.config.binarize_threshold
        )
        cost = match_cost(
            class_logits[keep],
            affinity_logits[keep],
            boxes,
            gt_labels,
            gt_pos,
            gt_ignore,
            gt_boxes,
            patch_valid,
            self.config,
        )
        rows, cols = hungarian_match(cost)
        return keep[rows], cols
