"""CAT-Seg's loss: per-class binary cross-entropy against one-hot targets (code: ``CATSeg.forward``).

The logits (B, K, H', W') are bilinearly resampled to the label grid (CAT-Seg interpolates them to
the label size), then::

    loss = mean over (pixels p in P, classes n) of BCE(logit(p, n), [label(p) == n])

CAT-Seg's code keeps unlabelled pixels (ignore value 255) in the mean with an all-zero target:
every class is pushed down there. ``void_loss="negative"`` (default) does the same;
``"ignore"`` leaves them out of P. Frame cells past the image (the padding of the square CLIP
frame; CAT-Seg's crops have none) are always left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .config import CostAggConfig
from .data import VOID, CostAggSample, stack_labels
from .model import CostAggOutput


def semantic_bce(logits: Tensor, labels: Tensor, void_loss: str = "negative") -> Tensor:
    """CAT-Seg's BCE of per-class logits (B, K, H', W') against label grids (B, G, G).

    Args:
        logits: per-class logits at any resolution (resampled to the labels' bilinearly).
        labels: class index, VOID (-1) or OUTSIDE (-2) per cell.
        void_loss: "negative" (VOID cells are all-negative targets) or "ignore".

    Returns:
        The mean BCE over the counted cells and all K classes; 0 (with a graph) when no cell
        counts.
    """
    k = logits.shape[1]
    labels = labels.to(logits.device)
    if int(labels.max()) >= k:
        raise ValueError(f"class target {int(labels.max())} outside the {k} text classes")
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(
            logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False
        )
    counted = labels >= 0
    if void_loss == "negative":
        counted = counted | (labels == VOID)
    elif void_loss != "ignore":
        raise ValueError(f"void_loss must be 'negative' or 'ignore', got {void_loss!r}")
    if not bool(counted.any()):
        return logits.sum() * 0.0
    target = F.one_hot(labels.clamp_min(0), k).permute(0, 3, 1, 2).to(logits.dtype)
    target = target * (labels >= 0)[:, None]
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    weight = counted[:, None].float()
    return (bce * weight).sum() / (weight.sum() * k)


class CostAggCriterion(nn.Module):
    """``(outputs, samples) -> {"loss", "loss_bce"}`` (see the module doc)."""

    def __init__(self, config: CostAggConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, outputs: CostAggOutput, samples: Sequence[CostAggSample]) -> dict:
        labels = stack_labels(samples, outputs.logits.device)
        loss = semantic_bce(outputs.logits, labels, self.config.void_loss)
        return {"loss": loss, "loss_bce": loss.detach()}
