"""The text-guided sparse point prompter (TSPP, SAM-MI sec. 3.2 and fig. 3c) and its point draw.

    S_en = Attn(MLP(S))                   S: the cost volume (B, K, h, w), CLIP gets no gradient
    p_k  = Linear_p(S_en)                 per-class point probabilities on the cost grid
    M^text logits = Linear_m(S_en)        text-mask logits, supervised by the semantic labels

"MLP" embeds each class's cost map (3 x 3 conv 1 -> d, GELU, 1 x 1 conv); "Attn" is one
aggregation layer of the cost-aggregation kind: windowed spatial attention per class guided by the
image embeddings, then linear attention across classes guided by the class texts (TSPP's own
small copies of costagg's blocks, no positional encoding over classes, so any vocabulary works).

The per-class maps are read at the point grid (bilinearly, at each grid point's place in the CLIP
frame) and the image's sampling probability is ``p(x) = sum_k max(p_k(x), 0)``: a class left out
of the vocabulary takes its points with it (the paper's fig. 9). Training regresses each p_k to
the class's share of eq. 3's target (:mod:`samcp.models.sam_mi.targets`).

Inference draws each grid point independently with probability ``min(p(x), 1)`` (a Bernoulli draw
per point, paper sec. 3.2) from a generator seeded per image, so predictions are reproducible;
when more than ``max_points`` are drawn, the most likely ``max_points`` are kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..costagg.model import ClassAggregation, SpatialAggregation
from .config import SamMiConfig


class TextGuidedSparsePointPrompter(nn.Module):
    """TSPP: per-class point probabilities and text-mask logits from the cost volume."""

    def __init__(self, config: SamMiConfig) -> None:
        super().__init__()
        c = config
        d, g = c.tspp_dim, c.tspp_guidance_dim
        self.embed = nn.Sequential(nn.Conv2d(1, d, 3, padding=1), nn.GELU(), nn.Conv2d(d, d, 1))
        self.appearance_proj = nn.Sequential(nn.Conv2d(c.text_dim, g, 3, padding=1), nn.ReLU())
        self.text_proj = nn.Sequential(nn.Linear(c.text_dim, g), nn.ReLU())
        self.spatial = SpatialAggregation(d, g, c.tspp_heads, c.window_size, c.mlp_ratio)
        self.classes = ClassAggregation(d, g, c.tspp_heads, c.pooling_size, c.pad_len, c.mlp_ratio)
        self.prob_head = nn.Linear(d, 1)
        self.mask_head = nn.Linear(d, 1)

    def forward(self, cost: Tensor, embed: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """cost (B, K, h, w), embed (B, D, h, w), text (K, D) unit vectors ->
        (per-class point probabilities, text-mask logits), each (B, K, h, w)."""
        b, k, h, w = cost.shape
        x = self.embed(cost.reshape(b * k, 1, h, w))
        x = x.reshape(b, k, -1, h, w).transpose(1, 2)  # (B, d, K, h, w)
        x = self.spatial(x, self.appearance_proj(embed))
        x = self.classes(x, self.text_proj(text))
        x = x.permute(0, 2, 3, 4, 1)  # (B, K, h, w, d)
        return self.prob_head(x)[..., 0], self.mask_head(x)[..., 0]


def point_grid_frame(sizes: Tensor, grid: int) -> Tensor:
    """(B, grid, grid, 2) grid-point places (x, y) in ``grid_sample`` units of the square frame.

    sizes: (B, 2) image (height, width). Point (i, j) sits at ((j + 0.5) W / grid,
    (i + 0.5) H / grid) pixels; the frame's side is the longer image side.
    """
    sizes = sizes.float()
    long_side = sizes.max(dim=1).values
    t = (torch.arange(grid, device=sizes.device, dtype=torch.float32) + 0.5) / grid
    ys = t[None] * (sizes[:, 0] / long_side)[:, None]  # (B, grid) fraction of the frame
    xs = t[None] * (sizes[:, 1] / long_side)[:, None]
    gy = ys[:, :, None].expand(-1, grid, grid)
    gx = xs[:, None, :].expand(-1, grid, grid)
    return torch.stack([gx, gy], dim=-1) * 2 - 1


def read_at_points(maps: Tensor, sizes: Tensor, grid: int) -> Tensor:
    """Frame maps (B, K, h, w) read bilinearly at the point grid -> (B, K, grid, grid)."""
    where = point_grid_frame(sizes, grid).to(maps.dtype)
    return F.grid_sample(maps, where, mode="bilinear", align_corners=False)


def sampling_probability(class_prob: Tensor) -> Tensor:
    """(B, K, g, g) per-class maps -> (B, g, g) p(x) = sum_k max(p_k(x), 0) (may exceed 1)."""
    return class_prob.clamp_min(0).sum(dim=1)


def draw_points(prob: Tensor, seed: int, max_points: int) -> Tensor:
    """Indices (row-major, ascending) of the grid points a Bernoulli draw keeps.

    Args:
        prob: (g, g) sampling probabilities (clamped to [0, 1] here).
        seed: the draw's seed (one torch.Generator on the CPU, so every device draws the same).
        max_points: keep at most this many: the most likely (ties by index).

    Returns:
        (n,) int64 indices into the flattened grid.
    """
    p = prob.detach().float().flatten().clamp(0, 1).cpu()
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.rand(p.shape[0], generator=gen)
    chosen = torch.nonzero(u < p).flatten()
    if chosen.numel() > max_points:
        order = torch.sort(-p[chosen], stable=True).indices[:max_points]
        chosen = torch.sort(chosen[order]).values
    return chosen
