"""SAM-MI (paper 003, fig. 2) on the cost-aggregation network of samcp.models.costagg.

    enc = costagg.encode(clip_res5, T)                       cost volume S, embeddings F
    p_k, M^text = TSPP(S)                                    sec. 3.2 (no gradient into CLIP)
    points ~ Bernoulli(min(sum_k p_k, 1)) on the 32 x 32 grid
    M^sam = SAM(sam_embed, points)                           frozen decoder, one mask per point
    M = SMAgg(M^sam, argmax M^text)                          eqs. 6-7
    appearance = costagg.appearance_proj(LowInject(F, M))    eqs. 8-10 (replaces the guidance)
    features = costagg.aggregate(enc)
    guidance = HighInject(costagg.decoder_guidance(res4, res3), M)    eqs. 11-12
    logits = costagg.decode(features, guidance)

Stage 1 (sec. 3.5) runs only the encoding and TSPP; every other parameter is frozen and the
semantic output is TSPP's text-mask logits. With ``prompter="grid"`` the masks are the cached
proposals (collated by the plugin) and SAM is not built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..costagg.model import CostAggregationNet
from .config import SamMiConfig
from .injection import (
    HighFrequencyInjection,
    LowFrequencyInjection,
    matching_scores,
    shallow_mask_aggregation,
)
from .sam import FrozenSamDecoder, coverage
from .tspp import TextGuidedSparsePointPrompter, draw_points, read_at_points, sampling_probability


@dataclass
class SamMiOutput:
    """What the head returns.

    Attributes:
        logits: (B, K, H', W') per-class logits on the CLIP frame (stage 1: TSPP's text-mask
            logits on the cost grid).
        cost: (B, K, h, w) the raw cost volume.
        text_logits: (B, K, h, w) TSPP's text-mask logits (M^text is their argmax).
        class_prob: (B, K, g, g) TSPP's per-class point probabilities at the grid points.
        num_points: (B,) points SAM was prompted with (0 with the grid prompter / in stage 1).
        num_masks: (B,) masks injected after SMAgg (N_m).
    """

    logits: Tensor
    cost: Tensor
    text_logits: Tensor
    class_prob: Tensor
    num_points: Tensor
    num_masks: Tensor


class SamMiNet(nn.Module):
    """SAM-MI's head (see the module doc). ``forward(clip_map, guidance, text_embed, sizes,
    seeds, sam_embed=None, masks=None, mask_valid=None)``:

    * clip_map, guidance, text_embed: as :class:`CostAggregationNet`;
    * sizes: (B, 2) image (height, width); seeds: (B,) int64 per-image seeds of the point draw;
    * sam_embed: (B, C, G, G) the cached SAM embeddings (stage 2, TSPP prompter);
    * masks, mask_valid: (B, N, R, R) coverage of the cached proposals on the ``mask_res`` grid
      and (B, N) flags (stage 2, grid prompter).
    """

    def __init__(self, config: SamMiConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.costagg = CostAggregationNet(c)
        self.tspp = TextGuidedSparsePointPrompter(c)
        self.sam = FrozenSamDecoder(c) if c.uses_sam else None
        self.low = LowFrequencyInjection(c.text_dim, c.dmi_heads) if c.low_injection else None
        guided = c.decoder_guidance_proj_dims[: len(c.guidance_levels)]
        self.high = (
            nn.ModuleList(HighFrequencyInjection(g, c.dw_kernel, c.gamma_init) for g in guided)
            if c.high_injection
            else None
        )
        if c.stage == 1:  # sec. 3.5: stage 1 trains TSPP alone
            for part in (self.costagg, self.low, self.high):
                if part is not None:
                    part.requires_grad_(False)

    # --- masks --------------------------------------------------------------------------------

    @torch.no_grad()
    def sam_masks(
        self, point_prob: Tensor, sam_embed: Tensor, sizes: Tensor, seeds: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """SAM's masks for a Bernoulli draw of grid points, per image.

        Returns:
            (B, N, R, R) coverage on the ``mask_res`` grid, (B, N) valid, (B,) points drawn.
        """
        c = self.config
        grid, res = c.grid_size, c.mask_res
        frame = float(c.sam_image_size)
        out, counts = [], []
        for i in range(point_prob.shape[0]):
            idx = draw_points(point_prob[i], int(seeds[i]), c.max_points)
            counts.append(idx.numel())
            h, w = float(sizes[i, 0]), float(sizes[i, 1])
            scale = frame / max(h, w)
            rows, cols = idx // grid, idx % grid
            xy = torch.stack(
                [(cols.double() + 0.5) * w / grid, (rows.double() + 0.5) * h / grid], dim=1
            )
            coords = (xy * scale).float().to(sam_embed.device)
            if idx.numel() == 0:
                out.append(sam_embed.new_zeros(0, res, res))
                continue
            side = 4 * c.sam_grid
            content = (h * scale / frame * side, w * scale / frame * side)
            m = self.sam.masks(sam_embed[i : i + 1].float(), coords, content, c.mask_threshold)
            m = coverage(m, res)
            out.append(m[m.flatten(1).sum(1) > 0])
        return (*_pad_masks(out, res, sam_embed.device), torch.tensor(counts))

    def aggregate_masks(
        self, masks: Tensor, valid: Tensor, text_logits: Tensor
    ) -> tuple[Tensor, Tensor]:
        """SMAgg per image against the argmax text mask; (B, N_m, R, R), (B, N_m)."""
        k, h = text_logits.shape[1], text_logits.shape[-1]
        labels = text_logits.argmax(dim=1)  # (B, h, w): M^text
        out = []
        for i in range(masks.shape[0]):
            m = masks[i][valid[i]]
            scores = matching_scores(coverage(m, h), labels[i], k)
            merged, _ = shallow_mask_aggregation(m, scores, self.config.alpha_sma)
            out.append(merged)
        return _pad_masks(out, masks.shape[-1], masks.device)

    # --- forward ------------------------------------------------------------------------------

    def forward(
        self,
        clip_map: Tensor,
        guidance: list[Tensor],
        text_embed: Tensor,
        sizes: Tensor,
        seeds: Tensor,
        sam_embed: Tensor | None = None,
        masks: Tensor | None = None,
        mask_valid: Tensor | None = None,
    ) -> SamMiOutput:
        c = self.config
        net = self.costagg
        enc = net.encode(clip_map, text_embed)
        text = F.normalize(text_embed.to(enc.embed.dtype), dim=-1)
        # Paper sec. 3.2: TSPP's losses do not reach CLIP.
        prob_map, text_logits = self.tspp(enc.cost.detach(), enc.embed.detach(), text.detach())
        class_prob = read_at_points(prob_map, sizes, c.grid_size)
        b = clip_map.shape[0]
        none = torch.zeros(b, dtype=torch.long)
        if c.stage == 1:
            return SamMiOutput(text_logits, enc.cost, text_logits, class_prob, none, none)

        if c.prompter == "tspp":
            if sam_embed is None:
                raise ValueError("the tspp prompter needs the cached sam_embed")
            point_prob = sampling_probability(class_prob)
            masks, mask_valid, num_points = self.sam_masks(point_prob, sam_embed, sizes, seeds)
        else:
            if masks is None or mask_valid is None:
                raise ValueError("the grid prompter needs the cached proposals' masks")
            masks, mask_valid, num_points = masks.float(), mask_valid, none
        if c.smagg:
            masks, mask_valid = self.aggregate_masks(masks, mask_valid, text_logits.detach())
        num_masks = mask_valid.sum(dim=1).cpu()

        h = enc.embed.shape[-1]
        if self.low is not None:  # eqs. 8-10: F_mcr replaces F in the appearance guidance
            mcr = self.low(enc.embed, coverage(masks, h), mask_valid)
            enc = replace(enc, appearance=net.appearance_proj(mcr))
        features = net.aggregate(enc)
        guid = net.decoder_guidance(guidance)
        if self.high is not None:  # eqs. 11-12 on each guided stage
            for i, inject in enumerate(self.high):
                g = guid[i]
                guid[i] = inject(g, coverage(masks, g.shape[-1]), mask_valid)
        logits = net.decode(features, guid)
        return SamMiOutput(logits, enc.cost, text_logits, class_prob, num_points, num_masks)


def _pad_masks(masks: list[Tensor], res: int, device) -> tuple[Tensor, Tensor]:
    """Per-image (N_i, R, R) masks -> (B, N, R, R) zero-padded and (B, N) valid flags."""
    n = max((m.shape[0] for m in masks), default=0)
    out = torch.zeros(len(masks), n, res, res, device=device)
    valid = torch.zeros(len(masks), n, dtype=torch.bool, device=device)
    for i, m in enumerate(masks):
        out[i, : m.shape[0]] = m
        valid[i, : m.shape[0]] = True
    return out, valid


def build_sam_mi_head(config: SamMiConfig) -> SamMiNet:
    """The SAM-MI network of ``config``."""
    return SamMiNet(config)
