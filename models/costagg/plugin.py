"""The cost-aggregation head (CAT-Seg) as a samcp head plugin (see samcp.models.heads)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..heads import CacheInfo, GroundTruth, Head, ImageInputs, ImageResult, InferContext
from ..registry import register_head
from .config import CostAggConfig
from .data import LEVELS_FLAG, CostAggSample, collate, flip_sample, make_sample
from .losses import CostAggCriterion
from .model import CostAggOutput, build_costagg_head

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CostAggConfig)}


@torch.no_grad()
def semantic_from_frame_logits(
    logits: Tensor, height: int, width: int, chunk: int = 32
) -> np.ndarray:
    """(H, W) int32 per-pixel argmax of per-class logits (K, h', w') given on the CLIP frame.

    Each image pixel centre is mapped into the frame (the image fills the top-left, longer side
    = frame side) and the logits are sampled bilinearly there (``grid_sample``,
    ``align_corners=False``), ``chunk`` classes at a time so memory stays at ``chunk * H * W``.
    With K = 0 every pixel is -1 (no class).
    """
    k = logits.shape[0]
    if k == 0:
        return np.full((height, width), -1, np.int32)
    long_side = float(max(height, width))
    dev = logits.device
    xs = (torch.arange(width, device=dev, dtype=torch.float32) + 0.5) / long_side * 2 - 1
    ys = (torch.arange(height, device=dev, dtype=torch.float32) + 0.5) / long_side * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None]
    best = torch.full((height, width), -torch.inf, device=dev)
    arg = torch.zeros((height, width), dtype=torch.long, device=dev)
    for k0 in range(0, k, chunk):
        part = logits[None, k0 : k0 + chunk].float()
        v = F.grid_sample(part, grid, mode="bilinear", align_corners=False)[0]
        m, a = v.max(0)
        better = m > best
        best = torch.where(better, m, best)
        arg = torch.where(better, a + k0, arg)
    return arg.cpu().numpy().astype(np.int32)


@register_head
class CostAggPlugin(Head):
    """CAT-Seg cost aggregation on cached dense CLIP maps: semantic segmentation only."""

    name = "costagg"
    config_cls = CostAggConfig
    summary = (
        "CAT-Seg cost aggregation: per-pixel CLIP-text cost volume from cached dense CLIP maps, "
        "spatial (Swin) and class (linear attention) aggregation, decoder guided by finer levels"
    )
    outputs = ("semantic",)
    # CAT-Seg's configs: AdamW, lr 2e-4, weight decay 1e-4, full-model gradient norm clipped to
    # 0.01 (its schedule is cosine; samcp's trainer has step drops, left at samcp's default).
    train_defaults = {"lr": 2e-4, "weight_decay": 1e-4, "clip_grad": 0.01}

    def configure(self, config: Mapping[str, Any], cache: CacheInfo) -> dict[str, Any]:
        if not cache.clip_levels:
            raise ValueError(f"cache has no dense CLIP maps: {LEVELS_FLAG}")
        level = config.get("clip_level", _DEFAULTS["clip_level"])
        if level not in cache.clip_levels:
            raise ValueError(
                f"clip_level {level} is not in the cache (it has {', '.join(cache.clip_levels)}); "
                f"{LEVELS_FLAG}"
            )
        guidance = tuple(config.get("guidance_levels", _DEFAULTS["guidance_levels"]))
        missing = [g for g in guidance if g not in cache.clip_levels]
        if missing:
            raise ValueError(
                f"the decoder's guidance needs {', '.join(missing)}, which the cache lacks (it has "
                f"{', '.join(cache.clip_levels)}); {LEVELS_FLAG}, or train without guidance with "
                "--set guidance_levels=[]"
            )
        strides = cache.clip_strides
        if level in strides and all(g in strides for g in guidance):
            for i, g in enumerate(guidance):
                want = strides[level] / 2 ** (i + 1)
                if strides[g] != want:
                    raise ValueError(
                        f"decoder stage {i} upsamples {level} (stride {strides[level]}) to stride "
                        f"{want:g}, but its guidance {g} has stride {strides[g]}; list the "
                        "guidance levels coarse to fine, e.g. clip_res4, clip_res3"
                    )
        dictated: dict[str, Any] = {}
        source = config.get("clip_head_source", _DEFAULTS["clip_head_source"])
        if source == "cache":
            head = cache.clip_head
            if head is None:
                raise ValueError(
                    "the cache stores no CLIP head (clip_head/): re-run the same samcp precompute "
                    "command to add it (complete shards are kept), or --set "
                    "clip_head_source=learned"
                )
            if head.level != level:
                raise ValueError(
                    f"the cache's CLIP head pools {head.level}, not clip_level {level}; "
                    f"--set clip_level={head.level}"
                )
            dictated.update(clip_proj=head.kind, clip_norm_eps=float(head.norm_eps))
        return {
            **dictated,
            "clip_channels": int(cache.clip_channels[level]),
            "clip_input_size": int(cache.clip_input_size),
            "text_dim": int(cache.text_dim),
            "guidance_channels": [int(cache.clip_channels[g]) for g in guidance],
        }

    def needs(self, config: CostAggConfig) -> tuple[list[str], list[str]]:
        return [config.clip_level, *config.guidance_levels], []

    def build(self, config: CostAggConfig) -> nn.Module:
        return build_costagg_head(config)

    def init_from_cache(self, module: nn.Module, config: CostAggConfig, cache: CacheInfo) -> None:
        """``clip_head_source: cache``: the cache's frozen CLIP head goes into ``module.clip_head``
        and stays frozen (configure has checked that the cache has one)."""
        if config.clip_head_source != "cache":
            return
        if cache.clip_head is None:
            raise ValueError(
                "the cache stores no CLIP head (clip_head/): re-run the same samcp precompute "
                "command to add it, or --set clip_head_source=learned"
            )
        module.clip_head.load_weights(cache.clip_head)
        module.clip_head.requires_grad_(False)

    def sample(
        self,
        inputs: ImageInputs,
        config: CostAggConfig,
        max_masks: int,
        gt: GroundTruth | None = None,
    ) -> CostAggSample:
        return make_sample(inputs, config, gt)

    def augment(
        self, sample: CostAggSample, config: CostAggConfig, flip: bool, rng=None
    ) -> CostAggSample:
        return flip_sample(sample) if flip else sample  # flips only (CAT-Seg also crops)

    def collate(self, samples, text_embed: Tensor, config: CostAggConfig, device) -> dict:
        return collate(list(samples), text_embed, device)

    def criterion(self, config: CostAggConfig) -> nn.Module:
        return CostAggCriterion(config)

    @torch.no_grad()
    def infer(
        self,
        outputs: CostAggOutput,
        samples: Sequence[CostAggSample],
        config: CostAggConfig,
        ctx: InferContext,
    ) -> list[ImageResult]:
        """Per image: the per-class argmax at image resolution (CAT-Seg: sigmoid, upsample,
        argmax; the sigmoid does not change the argmax). Semantic only: the panoptic map is all
        void with no segments and there are no instances. The classes are those of the
        ``text_embed`` the batch was collated with (``ctx.text_embed``); CAT-Seg has no ensemble
        with a separate CLIP classifier, so ``ctx.alpha`` / ``ctx.beta`` / ``ctx.seen`` are not
        used."""
        k = outputs.logits.shape[1]
        if ctx.text_embed is not None and int(ctx.text_embed.shape[0]) != k:
            raise ValueError(
                f"the outputs have {k} classes but the vocabulary has {ctx.text_embed.shape[0]}"
            )
        results = []
        for i, s in enumerate(samples):
            result = ImageResult.empty(s.image_id, s.height, s.width)
            result.semantic = semantic_from_frame_logits(outputs.logits[i], s.height, s.width)
            results.append(result)
        return results
