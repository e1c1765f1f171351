"""DINO-style denoising queries for the SAM-CP affinity head (appendix A.3; the official
``CdnQueryGenerator_plus`` and ``SamCPHead._get_dn_targets_single``).

In training only, every GT instance (a Type-II target: non-crowd thing segment) is copied into
extra queries whose content is its (noised) class and whose position is its (noised) box:

- ``G = max GT count in the batch``; ``groups = max(1, num_denoising_queries // G)`` (the official
  "dynamic" grouping, ``num_dn_queries=300``); each group holds ``2 G`` queries: G *positive*
  copies (box corners moved by less than half the box side times ``box_noise``) followed by G
  *negative* copies (moved by between 1 and 2 half sides). Images with fewer GTs leave padding.
- label noise: each copy's class is replaced, with probability ``label_noise / 2``, by a class drawn
  uniformly from the vocabulary (the official ``p < label_noise_scale * 0.5``).
- box noise: ``xyxy += u * (w, h, w, h) / 2 * box_noise`` with ``|u|`` in [0, 1) (positive) or
  [1, 2) (negative) and a random sign per coordinate; clamped to the image; the resulting
  cxcywh is clamped to [1e-3, 1 - 1e-3] (the official inverse_sigmoid(eps=1e-3) round trip).

The head appends them after its K + P normal queries and runs them through the same decoder under
an attention mask (:func:`denoising_attn_mask`): normal queries never see them and groups never see
each other. They are never Hungarian-matched: a positive copy of GT g is supervised directly with
class c_g and affinity row G_g (if g has a positive patch), a negative copy is a classification
negative with no affinity loss (:func:`denoising_targets`). Inference never builds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .config import AffinityConfig
from .targets import ImageTargets


@dataclass
class DenoisingQueries:
    """The denoising queries of one batch (B images, Nd = groups * group_size queries each).

    Attributes:
        labels: (B, Nd) long noised class of each query (0 on padding).
        boxes: (B, Nd, 4) noised xyxy boxes normalised by the image (W, H).
        valid: (B, Nd) bool, False on padding (an image with fewer GTs than the batch maximum).
        positive: (B, Nd) bool, True for the positive copies (first half of each group).
        gt_index: (B, Nd) long index of the source GT in the image's ImageTargets (-1 on padding).
        num_groups: number of groups.
        group_size: 2 * (max GT count in the batch).
    """

    labels: Tensor
    boxes: Tensor
    valid: Tensor
    positive: Tensor
    gt_index: Tensor
    num_groups: int
    group_size: int

    @property
    def num_queries(self) -> int:
        return int(self.labels.shape[1])

    def to(self, device: torch.device | str) -> DenoisingQueries:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return DenoisingQueries(num_groups=self.num_groups, group_size=self.group_size, **moved)


def _clamped_cxcywh_xyxy(xyxy: Tensor, eps: float = 1e-3) -> Tensor:
    """xyxy -> cxcywh clamped to [eps, 1 - eps] -> xyxy (so every box has a positive size)."""
    c = (xyxy[..., :2] + xyxy[..., 2:]) / 2
    wh = xyxy[..., 2:] - xyxy[..., :2]
    cxcywh = torch.cat([c, wh], dim=-1).clamp(eps, 1 - eps)
    return torch.cat(
        [cxcywh[..., :2] - cxcywh[..., 2:] / 2, cxcywh[..., :2] + cxcywh[..., 2:] / 2], -1
    )


def build_denoising_queries(
    targets: Sequence[ImageTargets],
    num_classes: int,
    config: AffinityConfig,
    generator: torch.Generator | None = None,
    label_choices: Tensor | None = None,
) -> DenoisingQueries | None:
    """Noised copies of every image's Type-II GTs, or None when disabled or the batch has no GT.

    Args:
        targets: one ImageTargets per image (``inst_labels``, ``inst_boxes`` are used).
        num_classes: K, the vocabulary the noised labels are drawn from.
        config: ``num_denoising_queries``, ``dn_label_noise``, ``dn_box_noise``.
        generator: torch RNG (None: the global one, whose state training checkpoints save).
        label_choices: (C,) long classes a noised label may take (e.g. the thing classes, as the
            official generator draws from its 80 thing classes); None = all K.

    Returns:
        DenoisingQueries on the CPU, or None.
    """
    counts = [int(t.inst_labels.numel()) for t in targets]
    max_gt = max(counts, default=0)
    if config.num_denoising_queries <= 0 or max_gt == 0:
        return None
    b = len(targets)
    groups = max(1, config.num_denoising_queries // max_gt)
    copies = 2 * groups  # copy 2g: positive of group g, copy 2g + 1: its negative
    labels = torch.cat([t.inst_labels.long().cpu() for t in targets])  # (T,) the batch's GTs
    boxes = torch.cat([t.inst_boxes.float().cpu().reshape(-1, 4) for t in targets])
    image = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
    within = torch.cat([torch.arange(c) for c in counts])
    total = labels.numel()

    # Label noise over all copies (positives and negatives alike).
    lab = labels.repeat(copies)
    flip = torch.rand(lab.shape, generator=generator) < config.dn_label_noise * 0.5
    if label_choices is None:
        new = torch.randint(0, num_classes, lab.shape, generator=generator)
    else:
        choices = torch.as_tensor(label_choices, dtype=torch.long).reshape(-1)
        new = choices[torch.randint(0, len(choices), lab.shape, generator=generator)]
    lab = torch.where(flip, new, lab)

    # Box noise: |u| in [0, 1) for positives, [1, 2) for negatives, random sign per coordinate.
    box = boxes.repeat(copies, 1)
    negative = (torch.arange(copies) % 2 == 1).repeat_interleave(total)
    sign = torch.randint(0, 2, box.shape, generator=generator).float() * 2 - 1
    u = torch.rand(box.shape, generator=generator) + negative[:, None].float()
    whwh = (box[:, 2:] - box[:, :2]).repeat(1, 2)
    box = (box + u * sign * whwh * config.dn_box_noise / 2).clamp(0.0, 1.0)
    box = _clamped_cxcywh_xyxy(box)

    # Scatter into (B, copies * max_gt): query = copy * max_gt + index of the GT in its image.
    nd = copies * max_gt
    copy = torch.arange(copies).repeat_interleave(total)
    rows = image.repeat(copies)
    cols = copy * max_gt + within.repeat(copies)
    out_labels = torch.zeros(b, nd, dtype=torch.long)
    out_boxes = torch.zeros(b, nd, 4)
    valid = torch.zeros(b, nd, dtype=torch.bool)
    gt_index = torch.full((b, nd), -1, dtype=torch.long)
    out_labels[rows, cols] = lab
    out_boxes[rows, cols] = box
    valid[rows, cols] = True
    gt_index[rows, cols] = within.repeat(copies)
    positive = ((torch.arange(nd) // max_gt) % 2 == 0).unsqueeze(0).expand(b, -1) & valid
    return DenoisingQueries(
        labels=out_labels,
        boxes=out_boxes,
        valid=valid,
        positive=positive.clone(),
        gt_index=gt_index,
        num_groups=groups,
        group_size=2 * max_gt,
    )


def denoising_attn_mask(
    num_matching: int, dn: DenoisingQueries, device: torch.device | str | None = None
) -> Tensor:
    """(M + Nd, M + Nd) bool self-attention mask, True = blocked (the official generate_dn_mask
    with the denoising part placed after the M matching queries instead of before them).

    Matching queries never see denoising queries; a denoising group sees itself and the matching
    queries, never another group.
    """
    nd = dn.num_queries
    total = num_matching + nd
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[:num_matching, num_matching:] = True
    group = torch.arange(nd, device=device) // dn.group_size
    mask[num_matching:, num_matching:] = group[:, None] != group[None, :]
    return mask


def denoising_targets(
    dn: DenoisingQueries,
    targets: Sequence[ImageTargets],
    patch_valid: Tensor,
    num_classes: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(aff_t, aff_w, eps, cls_t, cls_w) of the denoising queries, in the criterion's layout.

    A positive copy of GT g whose row G_g has a positive patch gets B = G_g (weights: valid patches
    outside g's ignore band), eps = 1 and class c_g (its true class, whatever noise its input
    label got). A positive copy of a GT with no positive patch is ignored (the official
    ``label_weights[pos] = check_parts.max``). A negative copy is a classification negative with
    no affinity loss. Padding queries are ignored.

    Args:
        dn: the batch's denoising queries (on the outputs' device).
        targets: one ImageTargets per image (on the same device).
        patch_valid: (B, P) bool.
        num_classes: K.
    """
    b, p = patch_valid.shape
    nd = dn.num_queries
    dev = patch_valid.device
    aff_t = torch.zeros((b, nd, p), device=dev)
    aff_w = torch.zeros((b, nd, p), device=dev)
    cls_t = torch.zeros((b, nd, num_classes), device=dev)
    cls_w = dn.valid.float().clone()
    eps = torch.zeros((b, nd), dtype=torch.bool, device=dev)
    for i, tg in enumerate(targets):
        rows = (dn.positive[i] & dn.valid[i]).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        n = tg.num_patches
        g = dn.gt_index[i, rows]
        valid = patch_valid[i, :n]
        pos = tg.inst_pos[g] & valid.unsqueeze(0)
        has_pos = pos.any(-1)
        cls_w[i, rows[~has_pos]] = 0.0
        rows, g, pos = rows[has_pos], g[has_pos], pos[has_pos]
        eps[i, rows] = True
        cls_t[i, rows, tg.inst_labels[g]] = 1.0
        aff_t[i, rows, :n] = pos.float()
        aff_w[i, rows, :n] = (valid.unsqueeze(0) & ~tg.inst_ignore[g]).float()
    return aff_t, aff_w, eps, cls_t, cls_w
