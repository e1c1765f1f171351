"""PosSAM losses (eq. 1-4, appendix A) for both mask sources.

Proposals (``mask_source="proposals"``; the masks are fixed, so there is nothing to match)::

    loss = loss_cls * CE(K + 1, void weight) + loss_iou * MSE(iou, best-GT IoU)

    CE over the valid, non-ignored proposals (targets: samcp.models.possam.targets), weighted mean
    with weight ``void_weight`` on the void class (Mask2Former's no-object weight); MSE over the
    valid proposals whose IoU target is known (not mostly on unannotated pixels).

Decoder (``mask_source="decoder"``, Mask2Former's criterion as appendix A says)::

    loss = loss_cls * CE + loss_mask_bce * BCE + loss_mask_dice * Dice + loss_iou * MSE
           (+ the BCE / Dice terms of every earlier prediction with ``deep_supervision``)

* Hungarian matching per image (scipy ``linear_sum_assignment``) on
  ``loss_cls * (-p_class[gt]) + loss_mask_bce * BCE + loss_mask_dice * Dice``, the mask terms on
  ``train_points`` points drawn uniformly in the frame (Mask2Former draws uniform points for the
  matcher but uncertainty-based importance-sampled points for the loss; we use the same uniform
  points for both, which is simpler and unbiased, at some cost in boundary precision).
* CE over all queries: matched -> the GT label, unmatched -> void (weight ``void_weight``).
* BCE and Dice on the matched (prediction, GT) pairs at the points, summed and divided by the
  number of GT masks in the batch (at least 1), as Mask2Former does.
* IoU: the IoU head regresses, for a matched query, the IoU of its binarised mask (logit > 0) with
  its GT on the stride-4 grid; an unmatched query's target is 0 (the paper trains matched pairs
  only but MASE weighs every query by its IoU, so void queries must learn a low IoU). MSE over all
  queries.
* Deep supervision: earlier predictions have no class logits (classes come from LDP on the final
  masks), so they are matched on the mask terms alone and add their BCE and Dice terms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .config import PossamConfig
from .model import PossamOutput
from .targets import MaskTargets, ProposalTargets

IGNORE = -100


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """(n, P) values of (n, g, g) maps at (P, 2) points (x, y) in [0, 1] of the frame (bilinear)."""
    grid = (points * 2 - 1)[None, :, None, :].expand(maps.shape[0], -1, -1, -1)
    return F.grid_sample(maps[:, None].float(), grid, mode="bilinear", align_corners=False)[
        :, 0, :, 0
    ]


def pair_costs(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """(Q, S) mean BCE-with-logits and Dice cost of point logits (Q, P) against targets (S, P)."""
    n = pred.shape[1]
    bce = (F.softplus(-pred) @ gt.t() + F.softplus(pred) @ (1 - gt).t()) / max(n, 1)
    p = pred.sigmoid()
    dice = 1 - (2 * p @ gt.t() + 1) / (p.sum(-1)[:, None] + gt.sum(-1)[None, :] + 1)
    return bce, dice


@torch.no_grad()
def hungarian(
    point_logits: Tensor,
    gt_points: Tensor,
    class_prob: Tensor | None,
    gt_labels: Tensor,
    config: PossamConfig,
) -> tuple[Tensor, Tensor]:
    """(query indices, GT indices) minimising ``loss_cls * (-p[gt]) + loss_mask_bce * BCE +
    loss_mask_dice * Dice`` (the class term only when ``class_prob`` (Q, K + 1) is given)."""
    q, s = point_logits.shape[0], gt_points.shape[0]
    if q == 0 or s == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    bce, dice = pair_costs(point_logits.float(), gt_points.float())
    cost = config.loss_mask_bce * bce + config.loss_mask_dice * dice
    if class_prob is not None:
        cost = cost - config.loss_cls * class_prob[:, gt_labels].float()
    cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def _class_weights(k: int, config: PossamConfig, device) -> Tensor:
    w = torch.ones(k + 1, device=device)
    w[k] = config.void_weight
    return w


def _ce(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Weighted-mean CE over non-ignored entries; 0 (with a graph) when all are ignored."""
    if not bool((target != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(
        logits.flatten(0, -2).float(), target.flatten(), weight=weight, ignore_index=IGNORE
    )


class PossamCriterion(nn.Module):
    """``(outputs, targets) -> {"loss", "loss_cls", "loss_iou", ...}`` (see the module doc).

    ``targets`` is one :class:`ProposalTargets` (proposals) or :class:`MaskTargets` (decoder)
    per image, on the outputs' device.
    """

    def __init__(self, config: PossamConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, out: PossamOutput, targets: Sequence) -> dict[str, Tensor]:
        if self.config.mask_source == "proposals":
            return self._proposals(out, targets)
        return self._decoder(out, targets)

    # --- proposals --------------------------------------------------------------------------

    def _proposals(
        self, out: PossamOutput, targets: Sequence[ProposalTargets]
    ) -> dict[str, Tensor]:
        cfg = self.config
        b, n, k1 = out.class_logits.shape
        k = k1 - 1
        device = out.class_logits.device
        cls_t = torch.full((b, n), IGNORE, dtype=torch.long, device=device)
        iou_t = torch.zeros(b, n, device=device)
        iou_w = torch.zeros(b, n, device=device)
        for i, t in enumerate(targets):
            m = int(t.labels.shape[0])
            if m > n:
                raise ValueError(f"targets for {m} masks, outputs for {n}")
            lab = t.labels.to(device).clone()
            if m and int(lab.max()) >= k:
                raise ValueError(f"class target {int(lab.max())} outside the {k} text classes")
            lab[lab < 0] = k
            lab[t.ignore.to(device)] = IGNORE
            cls_t[i, :m] = lab
            iou_t[i, :m] = t.iou.to(device)
            iou_w[i, :m] = t.iou_known.to(device).float()
        cls_t[~out.valid] = IGNORE
        iou_w = iou_w * out.valid
        loss_cls = _ce(out.class_logits, cls_t, _class_weights(k, cfg, device))
        loss_iou = ((out.iou.float() - iou_t) ** 2 * iou_w).sum() / iou_w.sum().clamp_min(1)
        total = cfg.loss_cls * loss_cls + cfg.loss_iou * loss_iou
        return {"loss": total, "loss_cls": loss_cls.detach(), "loss_iou": loss_iou.detach()}

    # --- decoder ----------------------------------------------------------------------------

    def _mask_terms(
        self,
        logits: Tensor,
        targets: Sequence[MaskTargets],
        class_prob: Tensor | None,
        points: list,
    ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """Summed BCE and Dice of matched pairs, and the matches, for one prediction."""
        cfg = self.config
        bce = logits.sum() * 0.0
        dice = logits.sum() * 0.0
        matches = []
        for i, t in enumerate(targets):
            pl = point_sample(logits[i], points[i])  # (Q, P)
            gp = point_sample(t.masks.float(), points[i])  # (S, P)
            rows, cols = hungarian(
                pl.detach(), gp, None if class_prob is None else class_prob[i], t.labels, cfg
            )
            rows, cols = rows.to(logits.device), cols.to(logits.device)
            matches.append((rows, cols))
            if rows.numel():
                b_, d_ = _paired_losses(pl[rows], gp[cols])
                bce = bce + b_
                dice = dice + d_
        return bce, dice, matches

    def _decoder(self, out: PossamOutput, targets: Sequence[MaskTargets]) -> dict[str, Tensor]:
        cfg = self.config
        assert out.mask_logits is not None
        b, q, k1 = out.class_logits.shape
        k = k1 - 1
        device = out.class_logits.device
        num_masks = max(1, sum(int(t.labels.numel()) for t in targets))
        points = [torch.rand(cfg.train_points, 2, device=device) for _ in range(b)]
        prob = out.class_logits.detach().float().softmax(-1)
        bce, dice, matches = self._mask_terms(out.mask_logits, targets, prob, points)
        cls_t = torch.full((b, q), k, dtype=torch.long, device=device)
        iou_t = torch.zeros(b, q, device=device)
        for i, (t, (rows, cols)) in enumerate(zip(targets, matches)):
            if not rows.numel():
                continue
            lab = t.labels.to(device)
            if int(lab.max()) >= k:
                raise ValueError(f"class target {int(lab.max())} outside the {k} text classes")
            cls_t[i, rows] = lab[cols]
            with torch.no_grad():
                pm = out.mask_logits[i, rows] > 0
                gm = t.masks.to(device)[cols]
                inter = (pm & gm).flatten(1).sum(-1).float()
                union = (pm | gm).flatten(1).sum(-1).float()
                iou_t[i, rows] = torch.where(
                    union > 0, inter / union.clamp_min(1), torch.zeros_like(union)
                )
        loss_cls = _ce(out.class_logits, cls_t, _class_weights(k, cfg, device))
        loss_iou = F.mse_loss(out.iou.float(), iou_t)
        loss_bce, loss_dice = bce / num_masks, dice / num_masks
        total = (
            cfg.loss_cls * loss_cls
            + cfg.loss_mask_bce * loss_bce
            + cfg.loss_mask_dice * loss_dice
            + cfg.loss_iou * loss_iou
        )
        result = {
            "loss_cls": loss_cls.detach(),
            "loss_mask_bce": loss_bce.detach(),
            "loss_mask_dice": loss_dice.detach(),
            "loss_iou": loss_iou.detach(),
        }
        if cfg.deep_supervision and out.aux_mask_logits:
            aux = out.mask_logits.sum() * 0.0
            for logits in out.aux_mask_logits:
                a_bce, a_dice, _ = self._mask_terms(logits, targets, None, points)
                aux = aux + (cfg.loss_mask_bce * a_bce + cfg.loss_mask_dice * a_dice) / num_masks
            total = total + aux
            result["loss_aux"] = aux.detach()
        result["loss"] = total
        return result


def _paired_losses(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """Summed (over pairs) mean-BCE and Dice of matched point logits (M, P) and targets (M, P)."""
    bce = F.binary_cross_entropy_with_logits(pred.float(), gt, reduction="none").mean(-1).sum()
    p = pred.float().sigmoid()
    dice = (1 - (2 * (p * gt).sum(-1) + 1) / (p.sum(-1) + gt.sum(-1) + 1)).sum()
    return bce, dice
