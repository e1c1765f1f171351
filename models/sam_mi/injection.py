"""Shallow mask aggregation (SMAgg, SAM-MI sec. 3.3) and decoupled mask injection (DMI, sec. 3.4).

Masks are coverage fractions on frame grids (a binary mask pooled to the grid), shape (N, s, s)
per image or (B, N, s, s) padded with a ``valid`` (B, N) flag. With binary masks on the grid every
formula below is the paper's; coverage makes a mask smaller than a cell still count.

SMAgg (eqs. 6-7), with M^text the argmax of TSPP's text-mask logits on the cost grid::

    O(i, k) = sum(M_i^sam * [M^text = k]) / (sum(M_i^sam) + eps)
    M_k = union_i [O(i, k) > alpha_sma] M_i^sam     (union: the cell-wise max)

the masks joining no class are kept as they are (N_m <= N_s).

Low-frequency injection (eqs. 8-10) on the per-pixel CLIP embeddings F (B, D, h, w)::

    tok_k = sum_x M_k(x) F(x) / sum_x M_k(x)                      eq. 8
    F_intra(x) = F(x) + sum_k M_k(x) tok_k                         eq. 9 (overlaps add up)
    F_inter = Attention(Q = F_intra, K = V = tok)                  eq. 10
    F_mcr = F_intra + F_inter                                      (replaces F in the guidance)

High-frequency injection (eqs. 11-12) on a decoder guidance map F_h (B, g, H, W)::

    F_h <- F_h + gamma DWConv(MLP(concat[F_h, proj(M)]))

proj(M) must take any number of masks in any order: it is an MLP (1 x 1 convs) on four
permutation-invariant per-pixel descriptors of the mask set: the coverage count sum_k M_k, the
boundary density sum_k B_k, max_k M_k and max_k B_k, with B_k the morphological gradient of M_k
(3 x 3 max minus 3 x 3 min) at the map's resolution. An image with no mask keeps F and F_h as they
are: the injection is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: eq. 6's epsilon, and the smallest mask area that counts
EPS = 1e-6


def matching_scores(masks: Tensor, text_labels: Tensor, num_classes: int) -> Tensor:
    """O (N, K) of eq. 6: the fraction of each mask (N, h, w) on each class of ``text_labels``
    (h, w), the argmax text mask."""
    onehot = F.one_hot(text_labels.long(), num_classes).to(masks.dtype)  # (h, w, K)
    inter = torch.einsum("nhw,hwk->nk", masks, onehot)
    return inter / (masks.sum(dim=(1, 2))[:, None] + EPS)


def shallow_mask_aggregation(masks: Tensor, scores: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Eq. 7: per class, the union of the masks with O(i, k) > alpha; unassigned masks kept.

    Args:
        masks: (N, s, s) masks (any grid).
        scores: (N, K) matching scores O.
        alpha: alpha_sma.

    Returns:
        (N_m, s, s) the aggregated masks (classes in index order, then the unassigned masks in
        their order) and (N_m,) the class each came from (-1: unassigned).
    """
    assign = scores > alpha
    out, origin = [], []
    for k in torch.nonzero(assign.any(dim=0)).flatten().tolist():
        out.append(masks[assign[:, k]].amax(dim=0))
        origin.append(k)
    single = ~assign.any(dim=1)
    if bool(single.any()):
        out.extend(masks[single])
        origin.extend([-1] * int(single.sum()))
    if not out:
        return masks[:0], torch.zeros(0, dtype=torch.long, device=masks.device)
    return torch.stack(out), torch.tensor(origin, dtype=torch.long, device=masks.device)


def mask_tokens(features: Tensor, masks: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 8: (B, N, D) mask-pooled features and (B, N) whether each mask counts (valid and
    non-empty). features (B, D, h, w), masks (B, N, h, w)."""
    f = features.flatten(2).transpose(1, 2)  # (B, hw, D)
    m = masks.flatten(2).to(f.dtype) * valid[..., None].to(f.dtype)  # (B, N, hw)
    area = m.sum(dim=-1)
    counts = valid & (area > EPS)
    tokens = (m @ f) / area.clamp_min(EPS)[..., None]
    return tokens * counts[..., None].to(f.dtype), counts


def intra_mask_context(
    features: Tensor, masks: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 9: F_intra (B, D, h, w), with the tokens (B, N, D) and their flags (B, N)."""
    tokens, counts = mask_tokens(features, masks, valid)
    b, d, h, w = features.shape
    m = masks.flatten(2).to(features.dtype) * counts[..., None].to(features.dtype)
    added = torch.einsum("bnx,bnd->bdx", m, tokens).reshape(b, d, h, w)
    return features + added, tokens, counts


class LowFrequencyInjection(nn.Module):
    """Eqs. 8-10: intra-mask context (mask pooling added back) and inter-mask context (the
    pixels attend to the mask tokens); returns F_mcr."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, features: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
        """features (B, D, h, w), masks (B, N, h, w), valid (B, N) -> F_mcr (B, D, h, w)."""
        intra, tokens, counts = intra_mask_context(features, masks, valid)
        has = counts.any(dim=1)  # (B,)
        if tokens.shape[1] == 0 or not bool(has.any()):
            return intra  # = features: nothing to inject
        b, d, h, w = intra.shape
        q = intra.flatten(2).transpose(1, 2)
        # An image without masks attends to one (zero) token, then its result is dropped: a fully
        # masked softmax would give NaN, and NaN times 0 is still NaN in the backward pass.
        ignore = ~counts
        ignore[~has, 0] = False
        inter, _ = self.attn(q, tokens, tokens, key_padding_mask=ignore, need_weights=False)
        inter = inter * has[:, None, None].to(inter.dtype)
        return intra + inter.transpose(1, 2).reshape(b, d, h, w)


def mask_descriptors(masks: Tensor, valid: Tensor) -> Tensor:
    """(B, 4, s, s) permutation-invariant descriptors of a mask set (B, N, s, s): sum and max of
    the masks, sum and max of their boundaries (3 x 3 morphological gradient)."""
    b, n, s, _ = masks.shape
    m = masks.to(torch.float32) * valid[..., None, None].to(torch.float32)
    if n == 0:
        return m.new_zeros(b, 4, s, s)
    flat = m.reshape(b * n, 1, s, s)
    dilated = F.max_pool2d(flat, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-flat, 3, stride=1, padding=1)
    boundary = (dilated - eroded).reshape(b, n, s, s)
    return torch.stack([m.sum(1), boundary.sum(1), m.amax(1), boundary.amax(1)], dim=1)


class HighFrequencyInjection(nn.Module):
    """Eqs. 11-12 on one decoder guidance map of ``channels`` channels."""

    def __init__(self, channels: int, kernel: int, gamma_init: float) -> None:
        super().__init__()
        self.proj = nn.Sequential(  # proj(M): an MLP on the mask-set descriptors
            nn.Conv2d(4, channels, 1), nn.GELU(), nn.Conv2d(channels, channels, 1)
        )
        self.mlp = nn.Sequential(
            nn.Conv2d(2 * channels, channels, 1), nn.GELU(), nn.Conv2d(channels, channels, 1)
        )
        self.dwconv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.gamma = nn.Parameter(torch.tensor(float(gamma_init)))

    def forward(self, guidance: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
        """guidance (B, g, H, W), masks (B, N, H, W), valid (B, N) -> the injected guidance."""
        counts = valid & (masks.flatten(2).sum(-1) > EPS)
        has = counts.any(dim=1)
        if not bool(has.any()):
            return guidance
        desc = mask_descriptors(masks, counts).to(guidance.dtype)
        emd = torch.cat([guidance, self.proj(desc)], dim=1)  # eq. 11
        out = guidance + self.gamma * self.dwconv(self.mlp(emd))  # eq. 12
        return torch.where(has[:, None, None, None], out, guidance)
