"""SAM-CP losses (eq. 1-2): sigmoid focal classification, affinity (mask) focal and Dice, per layer.

For each decoder layer and each query type:

    L_cls  = sum_m c_m sum_c FL(sigma(S_mc), 1[c = c*_m]) / N_cls
    L_mfl  = (1 / M*) sum_m eps_m / max(|B_m|_0, 1) sum_n w_mn FL(A_mn, B_mn)
    L_dice = (1 / M*) sum_m eps_m Dice(A_m, B_m)          (Dice over the patches with w_mn = 1)

    total  = sum over layers and both query types of  lambda_cls L_cls + lambda_mfl L_mfl + lambda_dice L_dice

with w_mn = 0 on padded and ignored patches, eps_m = 1 for a query with a usable target, M* the number
of such queries in the batch (per query type), c_m the classification weight (0 for a padded query, a
query matched to an unusable GT, or a Type-I query of a present class none of whose patches qualify),
and N_cls = max(M*, 1) by default (DETR/official) or the number of weighted queries (eq. 1's 1/M,
`cls_normalizer="num_queries"`). Type-I and Type-II queries are normalised separately, as the official
code does (its semantic and instance losses are separate terms).

Two more terms per layer (training aids, both on by default):

- "bg" (`bg_self_affinity`, table 4's BG): every valid Type-II query that is neither matched nor
  ignored gets B_m = one-hot at its own patch, L_mfl + L_dice averaged over those queries (no class
  term beyond the usual negative).
- "dn" (`num_denoising_queries`, appendix A.3): the denoising queries' L_cls, L_mfl, L_dice with the
  targets of `denoising.denoising_targets` (no matching), normalised by their own positives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from .config import AffinityConfig
from .denoising import denoising_targets
from .matcher import HungarianMatcher
from .model import AffinityOutput
from .targets import ImageTargets


def affinity_focal_loss(
    logits: Tensor, targets: Tensor, weights: Tensor, row_mask: Tensor, alpha: float, gamma: float
) -> Tensor:
    """Eq. (2) L_mfl summed over rows (not yet divided by M*).

    Args:
        logits: (R, P) affinity logits.
        targets: (R, P) {0, 1}.
        weights: (R, P) {0, 1}: 0 on padded / ignored patches.
        row_mask: (R,) bool eps_m.
    """
    fl = sigmoid_focal_loss(
        logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="none"
    )
    per_row = (fl * weights).sum(-1) / (targets * weights).sum(-1).clamp_min(1)
    return (per_row * row_mask).sum()


def dice_loss(
    logits: Tensor, targets: Tensor, weights: Tensor, row_mask: Tensor, eps: float = 1.0
) -> Tensor:
    """Eq. (2) L_dice summed over rows: 1 - (2 sum p t + eps) / (sum p + sum t + eps), masked by weights."""
    p = logits.sigmoid() * weights
    t = targets.to(p.dtype) * weights
    per_row = 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)
    return (per_row * row_mask).sum()


def classification_loss(
    logits: Tensor, targets: Tensor, weights: Tensor, alpha: float, gamma: float
) -> Tensor:
    """Eq. (1) sigmoid focal loss summed over classes and weighted queries (not normalised).

    Args:
        logits: (R, K); targets: (R, K) one-hot or zeros; weights: (R,) c_m.
    """
    fl = sigmoid_focal_loss(
        logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="none"
    )
    return (fl.sum(-1) * weights).sum()


class AffinityCriterion(nn.Module):
    """Builds B and eps for both query types (Type-II by Hungarian matching) and sums the losses.

    Call it as `criterion(outputs, targets)` with the head's `AffinityOutput` and one `ImageTargets`
    per image (patch order = the batch's patch order, P_i = number of valid patches of image i).
    Returns a dict of scalar tensors: "loss" (the total to backpropagate) and the components of the
    last layer ("sem_cls", "sem_mfl", "sem_dice", "ins_cls", "ins_mfl", "ins_dice", "num_pos_sem",
    "num_pos_ins") plus "layer{l}/<component>" for every layer.
    """

    def __init__(self, config: AffinityConfig) -> None:
        super().__init__()
        self.config = config
        self.matcher = HungarianMatcher(config)

    def _semantic_targets(
        self, outputs: AffinityOutput, targets: Sequence[ImageTargets]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        b, p = outputs.patch_valid.shape
        k = outputs.num_semantic
        dev = outputs.patch_valid.device
        aff_t = torch.zeros((b, k, p), device=dev)
        aff_w = torch.zeros((b, k, p), device=dev)
        cls_t = torch.zeros((b, k, k), device=dev)
        cls_w = torch.ones((b, k), device=dev)
        eps = torch.zeros((b, k), dtype=torch.bool, device=dev)
        eye = torch.eye(k, device=dev)
        for i, tg in enumerate(targets):
            n = tg.num_patches
            valid = outputs.patch_valid[i, :n]
            aff_t[i, :, :n] = tg.sem_pos.float()
            aff_w[i, :, :n] = (valid.unsqueeze(0) & ~tg.sem_ignore).float()
            has_pos = (tg.sem_pos & valid.unsqueeze(0)).any(-1)
            eps[i] = tg.sem_present & has_pos
            cls_t[i] = eye * eps[i].unsqueeze(-1).float()
            cls_w[i] = (~(tg.sem_present & ~has_pos)).float()
        return aff_t, aff_w, eps, cls_t, cls_w

    def _instance_targets(
        self, aff: Tensor, cls: Tensor, outputs: AffinityOutput, targets: Sequence[ImageTargets]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """aff (B, P, P) and cls (B, P, K): the Type-II slices of one layer."""
        b, q, p = aff.shape
        k = outputs.num_semantic
        dev = aff.device
        aff_t = torch.zeros((b, q, p), device=dev)
        aff_w = torch.zeros((b, q, p), device=dev)
        cls_t = torch.zeros((b, q, k), device=dev)
        query_valid = outputs.query_valid[:, k:]
        cls_w = query_valid.float().clone()
        eps = torch.zeros((b, q), dtype=torch.bool, device=dev)
        for i, tg in enumerate(targets):
            if tg.inst_labels.numel() == 0:
                continue
            n = tg.num_patches
            valid = outputs.patch_valid[i]
            gt_pos = torch.zeros((tg.inst_pos.shape[0], p), dtype=torch.bool, device=dev)
            gt_ign = torch.zeros_like(gt_pos)
            gt_pos[:, :n] = tg.inst_pos
            gt_ign[:, :n] = tg.inst_ignore
            rows, cols = self.matcher(
                cls[i],
                aff[i],
                outputs.patch_boxes[i],
                valid,
                query_valid[i],
                tg.inst_labels,
                gt_pos,
                gt_ign,
                tg.inst_boxes,
            )
            usable = tg.inst_usable[cols]
            cls_w[i, rows[~usable]] = 0.0  # a GT no patch composes: its query is ignored
            rows, cols = rows[usable], cols[usable]
            eps[i, rows] = True
            cls_t[i, rows, tg.inst_labels[cols]] = 1.0
            aff_t[i, rows] = gt_pos[cols].float()
            aff_w[i, rows] = (valid.unsqueeze(0) & ~gt_ign[cols]).float()
        return aff_t, aff_w, eps, cls_t, cls_w

    def _terms(
        self,
        aff: Tensor,
        cls: Tensor,
        aff_t: Tensor,
        aff_w: Tensor,
        eps: Tensor,
        cls_t: Tensor,
        cls_w: Tensor,
    ) -> dict[str, Tensor]:
        cfg = self.config
        num_pos = eps.sum().float()
        m_star = num_pos.clamp_min(1)
        a = aff.flatten(0, 1)
        rows = eps.flatten().float()
        mfl = affinity_focal_loss(
            a, aff_t.flatten(0, 1), aff_w.flatten(0, 1), rows, cfg.focal_alpha, cfg.focal_gamma
        )
        dice = dice_loss(a, aff_t.flatten(0, 1), aff_w.flatten(0, 1), rows, cfg.dice_eps)
        cls_sum = classification_loss(
            cls.flatten(0, 1),
            cls_t.flatten(0, 1),
            cls_w.flatten(),
            cfg.focal_alpha,
            cfg.focal_gamma,
        )
        n_cls = m_star if cfg.cls_normalizer == "num_pos" else cls_w.sum().clamp_min(1)
        return {
            "cls": cls_sum / n_cls,
            "mfl": mfl / m_star,
            "dice": dice / m_star,
            "num_pos": num_pos,
        }

    def _bg_terms(
        self, aff: Tensor, outputs: AffinityOutput, eps: Tensor, cls_w: Tensor
    ) -> dict[str, Tensor]:
        """The "BG" self-affinity (table 4): a valid Type-II query matched to no GT (not positive,
        not ignored) has target 1 on its own patch and 0 on every other valid patch, with the
        affinity focal and Dice losses of eq. (2), averaged over those queries.

        aff: (B, P, P) Type-II affinity logits (query n is patch n); eps, cls_w: (B, P) from
        `_instance_targets`.
        """
        cfg = self.config
        b, q, p = aff.shape
        k = outputs.num_semantic
        bg = outputs.query_valid[:, k:] & ~eps & (cls_w > 0)
        n = bg.sum().float()
        eye = torch.eye(q, p, device=aff.device).expand(b, q, p).flatten(0, 1)
        w = outputs.patch_valid.unsqueeze(1).expand(b, q, p).float().flatten(0, 1)
        rows = bg.flatten().float()
        a = aff.flatten(0, 1)
        mfl = affinity_focal_loss(a, eye, w, rows, cfg.focal_alpha, cfg.focal_gamma)
        dice = dice_loss(a, eye, w, rows, cfg.dice_eps)
        return {"mfl": mfl / n.clamp_min(1), "dice": dice / n.clamp_min(1), "num_pos": n}

    def forward(
        self, outputs: AffinityOutput, targets: Sequence[ImageTargets]
    ) -> dict[str, Tensor]:
        cfg = self.config
        b = outputs.patch_valid.shape[0]
        if len(targets) != b:
            raise ValueError(f"got {len(targets)} targets for a batch of {b} images")
        for i, tg in enumerate(targets):
            n_valid = int(outputs.patch_valid[i].sum())
            if tg.num_patches != n_valid or (
                n_valid and not bool(outputs.patch_valid[i, :n_valid].all())
            ):
                raise ValueError(
                    f"image {i}: targets cover {tg.num_patches} patches but the batch has {n_valid} valid "
                    "patches; valid patches must come first, in the targets' order"
                )
        targets = [tg.to(outputs.patch_valid.device) for tg in targets]
        k = outputs.num_semantic
        sem = self._semantic_targets(outputs, targets)
        dn_targets = None  # denoising queries: supervised directly, never matched (appendix A.3)
        if outputs.denoising is not None and outputs.dn_affinity_logits is not None:
            dn_targets = denoising_targets(outputs.denoising, targets, outputs.patch_valid, k)
        layers = range(outputs.num_layers) if cfg.deep_supervision else [outputs.num_layers - 1]
        out: dict[str, Tensor] = {}
        total = outputs.affinity_logits.new_zeros(())
        for layer in layers:
            aff, cls = outputs.affinity_logits[layer], outputs.class_logits[layer]
            ins = self._instance_targets(aff[:, k:].detach(), cls[:, k:].detach(), outputs, targets)
            terms = {
                "sem": self._terms(aff[:, :k], cls[:, :k], *sem),
                "ins": self._terms(aff[:, k:], cls[:, k:], *ins),
            }
            if cfg.bg_self_affinity:
                terms["bg"] = self._bg_terms(aff[:, k:], outputs, ins[2], ins[4])
            if dn_targets is not None:
                terms["dn"] = self._terms(
                    outputs.dn_affinity_logits[layer], outputs.dn_class_logits[layer], *dn_targets
                )
            for kind, t in terms.items():
                total = (
                    total
                    + cfg.loss_cls_weight * t.get("cls", 0.0)
                    + cfg.loss_mfl_weight * t["mfl"]
                    + cfg.loss_dice_weight * t["dice"]
                )
                for name, value in t.items():
                    key = f"{kind}_{name}" if name != "num_pos" else f"num_pos_{kind}"
                    out[f"layer{layer}/{key}"] = value.detach()
                    if layer == outputs.num_layers - 1:
                        out[key] = value.detach()
        out["loss"] = total
        return out
