"""ESC-Net's pseudo prompt generator (PPG): SAM point and mask prompts from a class's probability
map (paper sec. 3, "Pseudo Prompt Generator").

Per class n and image: the probability map P_n (softmax of the correlation over the classes, see
docs/heads/esc-net.md; handled as log P_n), its foreground ``P_n > alpha``, k-means on the foreground pixels'
coordinates into N_o regions, and per region the highest-probability pixel (the point prompt) and
the region itself (the mask prompt). Everything is batched over the M = B x K maps and is
deterministic: the k-means starts from farthest-point seeds (no random draws), ties go to the
lowest index, so a class's prompts depend on its own map only (class-order equivariance and
chunking are exact).

Fewer than N_o foreground pixels (or an empty cluster) leave slots unused: ``valid`` is False
there, the point gets SAM's "not a point" label -1 and the region is empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PseudoPrompts:
    """Prompts of M probability maps on an (h, w) grid, N_o slots each.

    Attributes:
        points: (M, N_o, 2) long, (x, y) cell of each region's highest-probability pixel
            (0 where not valid).
        regions: (M, N_o, h, w) bool, the k-means regions (empty where not valid).
        valid: (M, N_o) bool, slots that hold a region.
    """

    points: Tensor
    regions: Tensor
    valid: Tensor

    @property
    def labels(self) -> Tensor:
        """(M, N_o) SAM point labels: 1 (foreground point) or -1 (padding, "not a point")."""
        one = torch.ones_like(self.valid, dtype=torch.long)
        return torch.where(self.valid, one, -one)


def kmeans_regions(foreground: Tensor, seeds: Tensor, k: int, iters: int) -> tuple[Tensor, Tensor]:
    """Deterministic k-means on the pixel coordinates of M foreground masks.

    Initialisation is farthest-point (Gonzalez): the first centre is the ``seeds`` pixel (the
    highest-probability one), each next centre the foreground pixel farthest from the centres so
    far (the lowest index on ties); a mask with fewer than ``k`` foreground pixels gets fewer
    centres. Then ``iters`` Lloyd steps (nearest centre, lowest index on ties; an empty cluster
    keeps its centre).

    Args:
        foreground: (M, h, w) bool.
        seeds: (M,) flat index of each map's first centre (a foreground pixel when it has any).
        k: clusters per map (N_o).
        iters: Lloyd iterations.

    Returns:
        (assignment (M, h*w) long cluster of each pixel, -1 off the foreground;
        valid (M, k) bool, clusters that hold at least one pixel).
    """
    m, h, w = foreground.shape
    dev = foreground.device
    fg = foreground.reshape(m, h * w)
    ys, xs = torch.meshgrid(
        torch.arange(h, device=dev, dtype=torch.float32),
        torch.arange(w, device=dev, dtype=torch.float32),
        indexing="ij",
    )
    coords = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)  # (P, 2)
    rows = torch.arange(m, device=dev)
    centres = coords[seeds][:, None].repeat(1, k, 1)  # (M, k, 2)
    alive = torch.zeros(m, k, dtype=torch.bool, device=dev)
    alive[:, 0] = fg.any(-1)
    nearest = ((coords[None] - centres[:, :1]) ** 2).sum(-1)  # (M, P) squared distance
    for j in range(1, k):
        d = torch.where(fg, nearest, torch.full_like(nearest, -1.0))
        far = d.argmax(-1)  # first maximum: lowest index on ties
        alive[:, j] = d[rows, far] > 0  # a foreground pixel that is not a centre yet
        centres[:, j] = coords[far]
        nearest = torch.minimum(nearest, ((coords[None] - centres[:, j : j + 1]) ** 2).sum(-1))
    inf = torch.tensor(float("inf"), device=dev)
    assign = torch.zeros(m, h * w, dtype=torch.long, device=dev)
    for step in range(iters + 1):
        d = ((coords[None, :, None] - centres[:, None]) ** 2).sum(-1)  # (M, P, k)
        d = torch.where(alive[:, None], d, inf)
        assign = d.argmin(-1)  # first minimum: lowest index on ties
        if step == iters:
            break
        one_hot = (assign[..., None] == torch.arange(k, device=dev)) & fg[..., None]
        count = one_hot.sum(1)  # (M, k)
        total = torch.einsum("mpk,pc->mkc", one_hot.float(), coords)
        centres = torch.where(
            (count > 0)[..., None], total / count.clamp_min(1)[..., None], centres
        )
    assign = torch.where(fg, assign, torch.full_like(assign, -1))
    valid = (assign[..., None] == torch.arange(k, device=dev)).any(1) & alive
    return assign, valid


def class_log_probs(score: Tensor, temperature: float) -> Tensor:
    """log softmax over the classes (dim 1) of ``score / temperature``, (B, K, h, w).

    The normaliser sums the classes in sorted order, so it does not depend on the order of the
    classes bit for bit (PPG's thresholds and argmaxes then do not either). Log-probabilities,
    not probabilities: P saturates at 1.0 in float32 where CLIP is confident, and the argmax of
    a saturated map would be decided by rounding.
    """
    z = score / temperature
    return z - torch.logsumexp(z.sort(dim=1).values, dim=1, keepdim=True)


def pseudo_prompts(log_prob: Tensor, alpha: float, num_regions: int, iters: int) -> PseudoPrompts:
    """PPG on M log-probability maps (M, h, w): foreground ``P > alpha``, k-means into
    ``num_regions`` regions, and per region its highest-probability pixel (see the module doc)."""
    m, h, w = log_prob.shape
    p = log_prob.detach().reshape(m, h * w)
    fg = p > math.log(alpha)
    low = torch.full_like(p, -torch.inf)
    seeds = torch.where(fg, p, low).argmax(-1)
    assign, valid = kmeans_regions(fg.reshape(m, h, w), seeds, num_regions, iters)
    regions = assign[:, None] == torch.arange(num_regions, device=p.device)[None, :, None]
    regions = regions & valid[..., None]  # (M, N_o, P)
    best = torch.where(regions, p[:, None], low[:, None]).argmax(-1)
    best = torch.where(valid, best, torch.zeros_like(best))
    points = torch.stack([best % w, best // w], -1)
    return PseudoPrompts(points=points, regions=regions.reshape(m, num_regions, h, w), valid=valid)
