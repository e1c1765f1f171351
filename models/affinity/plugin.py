"""The SAM-CP affinity head as a samcp head plugin (see samcp.models.heads)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..compose import compose_regions, union_rle
from ..heads import (
    CacheInfo,
    CompositionParams,
    GroundTruth,
    Head,
    ImageInputs,
    ImageResult,
    InferContext,
)
from ..registry import register_head
from .config import AffinityConfig
from .data import AffinitySample, collate, flip_sample, make_sample
from .losses import AffinityCriterion
from .model import AffinityOutput, build_affinity_head, predict_image


class _Criterion(nn.Module):
    """AffinityCriterion on samples (their targets moved to the outputs' device)."""

    def __init__(self, config: AffinityConfig) -> None:
        super().__init__()
        self.inner = AffinityCriterion(config)

    def forward(self, outputs: AffinityOutput, samples: Sequence[AffinitySample]) -> dict:
        device = outputs.affinity_logits.device
        return self.inner(outputs, [s.targets.to(device) for s in samples])


@register_head
class AffinityPlugin(Head):
    """SAM-CP: patches as queries, affinity merging, kappa fusion with CLIP (sec. 3.2-3.3)."""

    name = "affinity"
    config_cls = AffinityConfig
    summary = "SAM-CP unified affinity decoder over the cached patches (merges and labels them)"
    inference_fields = (
        "kappa",
        "binarize_threshold",
        "min_affinity",
        "score_mode",
        "max_instances",
        "clip_logit_scale",
    )

    def configure(self, config: Mapping[str, Any], cache: CacheInfo) -> dict[str, Any]:
        if not cache.clip_levels:
            raise ValueError(
                "the cache has no dense CLIP features; re-run precompute with --clip-checkpoint "
                "(the affinity head needs clip_res5 and clip_mask_embed)"
            )
        level = cache.clip_levels[-1]  # the deepest cached level (res5 by default)
        return {
            "clip_levels": [level],
            "clip_strides": [cache.clip_strides[level]],
            "clip_channels": [cache.clip_channels[level]],
            "clip_input_size": cache.clip_input_size,
            "text_dim": cache.text_dim,
        }

    def needs(self, config: AffinityConfig) -> tuple[list[str], list[str]]:
        return list(config.clip_levels), ["clip_mask_embed"]

    def default_params(self, config: AffinityConfig) -> CompositionParams:
        # Instances >= 0.5 painted first, then stuff regions of at least 4096 pixels (Panoptic
        # FPN's stuff_area_thresh); the paper's own thresholds are issue 11's work.
        return CompositionParams(
            score_thresh=0.5,
            overlap_thresh=0.8,
            stuff_area_min=4096,
            max_instances=config.max_instances,
        )

    def build(self, config: AffinityConfig) -> nn.Module:
        return build_affinity_head(config)

    def sample(
        self,
        inputs: ImageInputs,
        config: AffinityConfig,
        max_masks: int,
        gt: GroundTruth | None = None,
    ) -> AffinitySample:
        return make_sample(inputs, config, max_masks, gt)

    def augment(self, sample: AffinitySample, config: AffinityConfig, flip: bool):
        return flip_sample(sample) if flip else sample

    def collate(self, samples, text_embed: Tensor, config: AffinityConfig, device) -> dict:
        return collate(list(samples), text_embed, device)

    def criterion(self, config: AffinityConfig) -> nn.Module:
        return _Criterion(config)

    def num_masks(self, sample: AffinitySample) -> int:
        return sample.num_patches

    @torch.no_grad()
    def infer(
        self,
        outputs: AffinityOutput,
        samples: Sequence[AffinitySample],
        config: AffinityConfig,
        ctx: InferContext,
    ) -> list[ImageResult]:
        """Section 3.3 per image: Type-I regions and Type-II instances (unions of member
        patches), scored by the open-vocabulary fusion, then SAM-CP's composition."""
        k = int(ctx.text_embed.shape[0])
        thing = torch.from_numpy(np.asarray(ctx.isthing, bool)).to(ctx.device)
        seen = torch.from_numpy(np.asarray(ctx.seen, bool)).to(ctx.device)
        results = []
        for i, s in enumerate(samples):
            n = s.num_patches
            if n == 0:
                results.append(ImageResult.empty(s.image_id, s.height, s.width))
                continue
            emb = s.patch_clip_embed
            pred = predict_image(
                outputs.affinity_logits[-1, i, : k + n, :n],
                outputs.class_logits[-1, i, : k + n],
                outputs.patch_valid[i, :n],
                k,
                config,
                patch_clip_embed=None if emb is None else emb.to(ctx.device).float(),
                text_embed=None if emb is None else ctx.text_embed,
                patch_areas=s.patch_areas.to(ctx.device),
                instance_classes=thing,
                seen=seen,
                alpha=ctx.alpha,
                beta=ctx.beta,
            )
            sem_members = pred.semantic_members.cpu().numpy()
            inst_members = pred.instance_members.cpu().numpy()
            results.append(
                compose_regions(
                    s.image_id,
                    s.height,
                    s.width,
                    [union_rle(s.patch_rles, m) for m in sem_members],
                    pred.semantic_scores.float().cpu().numpy(),
                    [union_rle(s.patch_rles, m) for m in inst_members],
                    pred.instance_labels.cpu().numpy().astype(np.int64),
                    pred.instance_scores.float().cpu().numpy(),
                    np.asarray(ctx.isthing, bool),
                    ctx.params,
                )
            )
        return results
