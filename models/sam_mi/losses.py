"""SAM-MI's losses (sec. 3.2 and 3.5).

    L_tspp = L_ce^mask + lambda_mse L_mse
    stage 1: L = L_tspp;   stage 2: L = L_ce + lambda_tspp L_tspp

"L_ce" is CAT-Seg's per-class BCE (samcp.models.costagg.losses.semantic_bce) on the head's
logits; L_ce^mask the same on TSPP's text-mask logits. L_mse regresses each class's point
probabilities to its share of eq. 3's target, p_k(x) = p(x) [y(x) = k], at the grid points:
``mean_x sum_k (p_hat_k(x) - p_k(x))^2`` (p summed over classes is the sampling probability).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..costagg.data import stack_labels
from ..costagg.losses import semantic_bce
from .config import SamMiConfig
from .data import SamMiSample, stack_grid_targets
from .model import SamMiOutput


def point_mse(class_prob: Tensor, grid_labels: Tensor, target: Tensor) -> Tensor:
    """L_mse: class_prob (B, K, g, g) against the targets (B, g, g) of classes ``grid_labels``
    (B, g, g) (negative: void, every class's target is 0 there)."""
    k = class_prob.shape[1]
    if int(grid_labels.max()) >= k:
        raise ValueError(f"class target {int(grid_labels.max())} outside the {k} text classes")
    onehot = F.one_hot(grid_labels.clamp_min(0), k).permute(0, 3, 1, 2).to(class_prob.dtype)
    per_class = onehot * (grid_labels >= 0)[:, None].to(class_prob.dtype) * target[:, None]
    return ((class_prob - per_class) ** 2).sum(dim=1).mean()


class SamMiCriterion(nn.Module):
    """``(outputs, samples) -> {"loss", "loss_ce", "loss_tspp", "loss_mask", "loss_mse",
    "points", "masks"}`` (see the module doc; the last two are per-image means, for the log)."""

    def __init__(self, config: SamMiConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, outputs: SamMiOutput, samples: Sequence[SamMiSample]) -> dict:
        c = self.config
        device = outputs.logits.device
        labels = stack_labels([s.base for s in samples], device)
        grid_labels, target = stack_grid_targets(samples, device)
        loss_mask = semantic_bce(outputs.text_logits, labels, c.void_loss)
        loss_mse = point_mse(outputs.class_prob, grid_labels, target)
        loss_tspp = loss_mask + c.lambda_mse * loss_mse
        out = {
            "loss_tspp": loss_tspp.detach(),
            "loss_mask": loss_mask.detach(),
            "loss_mse": loss_mse.detach(),
            "points": outputs.num_points.float().mean().to(device),
            "masks": outputs.num_masks.float().mean().to(device),
        }
        if c.stage == 1:
            out["loss"] = loss_tspp
            return out
        loss_ce = semantic_bce(outputs.logits, labels, c.void_loss)
        out["loss"] = loss_ce + c.lambda_tspp * loss_tspp
        out["loss_ce"] = loss_ce.detach()
        return out
