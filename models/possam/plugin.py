"""The PosSAM head as a samcp head plugin (see samcp.models.heads)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..compose import compose_masks
from ..heads import (
    CacheInfo,
    CompositionParams,
    GroundTruth,
    Head,
    ImageInputs,
    ImageResult,
    InferContext,
)
from ..openvocab import geometric_ensemble, mase, split_void
from ..registry import register_head
from .config import PossamConfig
from .data import PossamSample, collate, flip_sample, make_sample
from .losses import PossamCriterion
from .model import PossamOutput, build_possam_head
from .targets import frame_logits_to_rles

_DEFAULT_LEVEL = next(f.default for f in dataclasses.fields(PossamConfig) if f.name == "clip_level")


class _Criterion(nn.Module):
    """PossamCriterion on samples (their targets moved to the outputs' device)."""

    def __init__(self, config: PossamConfig) -> None:
        super().__init__()
        self.inner = PossamCriterion(config)

    def forward(self, outputs: PossamOutput, samples: Sequence[PossamSample]) -> dict:
        device = outputs.class_logits.device
        proposals = self.inner.config.mask_source == "proposals"
        targets = []
        for s in samples:
            t = s.targets if proposals else s.gt
            if t is None:
                raise ValueError(f"sample {s.image_id} has no training targets (built without gt)")
            targets.append(t.to(device))
        return self.inner(outputs, targets)


def class_probs(
    p_ldp: Tensor,
    p_clip: Tensor | None,
    iou: Tensor,
    classifier: str,
    seen: Tensor,
    alpha: float,
    beta: float,
) -> Tensor:
    """(M, K) final class scores of M masks by ``classifier`` (paper table 7):

    * ``mase``: Algorithm 1 (IoU-weighted, confidence-adapted geometric ensemble);
    * ``geometric``: FC-CLIP's geometric ensemble with fixed alpha / beta (no IoU);
    * ``ldp``: LDP probabilities x predicted IoU;
    * ``clip``: frozen-CLIP probabilities x predicted IoU.
    """
    if classifier == "ldp":
        return p_ldp * iou[:, None]
    if p_clip is None:
        raise ValueError(
            f"classifier {classifier!r} needs the cache's clip_mask_embed (CLIP logits)"
        )
    if classifier == "clip":
        return p_clip * iou[:, None]
    if classifier == "geometric":
        return geometric_ensemble(p_ldp, p_clip, seen, alpha, beta)
    if classifier == "mase":
        return mase(p_ldp, p_clip, iou, seen, alpha, beta)
    raise ValueError(f"unknown classifier {classifier!r}")


@register_head
class PossamPlugin(Head):
    """PosSAM: LDP (SAM + CLIP mask pooling, fused) + IoU head, MASE with frozen CLIP."""

    name = "possam"
    config_cls = PossamConfig
    summary = (
        "PosSAM local discriminative pooling + IoU head on cached SAM proposals or its own "
        "FPN/Mask2Former masks, MASE ensemble with frozen CLIP"
    )
    train_defaults = {"weight_decay": 0.05}  # PosSAM's AdamW weight decay
    inference_fields = (
        "classifier",
        "alpha",
        "beta",
        "clip_logit_scale",
        "score_thresh",
        "overlap_thresh",
        "stuff_area_min",
        "max_instances",
    )

    def configure(self, config: Mapping[str, Any], cache: CacheInfo) -> dict[str, Any]:
        if "sam_embed" not in cache.image_arrays:
            raise ValueError(
                "cache has no sam_embed: re-run samcp precompute with --store-sam-embeddings "
                "(and --sam-checkpoint)"
            )
        if "clip_mask_embed" not in cache.mask_arrays or not cache.clip_levels:
            raise ValueError(
                "cache has no clip_mask_embed / dense CLIP maps: re-run samcp precompute with "
                "--clip-checkpoint"
            )
        level = config.get("clip_level")
        if level not in cache.clip_levels:
            if level not in (None, _DEFAULT_LEVEL):
                raise ValueError(
                    f"clip_level {level!r} is not in the cache (it has "
                    f"{', '.join(cache.clip_levels)})"
                )
            level = cache.clip_levels[-1]  # the deepest cached level
        out = {
            "clip_level": level,
            "clip_channels": int(cache.clip_channels[level]),
            "clip_input_size": int(cache.clip_input_size),
            "text_dim": int(cache.text_dim),
        }
        if cache.sam_embed_shape is not None:
            c, h, w = cache.sam_embed_shape
            if h != w:
                raise ValueError(f"sam_embed is {h}x{w}; the head needs SAM's square embedding")
            out.update(sam_dim=int(c), sam_grid=int(h))
        return out

    def needs(self, config: PossamConfig) -> tuple[list[str], list[str]]:
        return ["sam_embed", config.clip_level], ["clip_mask_embed"]

    def default_params(self, config: PossamConfig) -> CompositionParams:
        return CompositionParams(
            score_thresh=config.score_thresh,
            overlap_thresh=config.overlap_thresh,
            stuff_area_min=config.stuff_area_min,
            max_instances=config.max_instances,
        )

    def build(self, config: PossamConfig) -> nn.Module:
        return build_possam_head(config)

    def sample(
        self,
        inputs: ImageInputs,
        config: PossamConfig,
        max_masks: int,
        gt: GroundTruth | None = None,
    ) -> PossamSample:
        return make_sample(inputs, config, max_masks, gt)

    def augment(
        self, sample: PossamSample, config: PossamConfig, flip: bool, rng=None
    ) -> PossamSample:
        return flip_sample(sample) if flip else sample  # flips only (no rescale/crop yet)

    def collate(self, samples, text_embed: Tensor, config: PossamConfig, device) -> dict:
        return collate(list(samples), text_embed, device)

    def criterion(self, config: PossamConfig) -> nn.Module:
        return _Criterion(config)

    def num_masks(self, sample: PossamSample) -> int:
        return sample.num_masks

    @torch.no_grad()
    def infer(
        self,
        outputs: PossamOutput,
        samples: Sequence[PossamSample],
        config: PossamConfig,
        ctx: InferContext,
    ) -> list[ImageResult]:
        """Per image: p_ldp (void dropped), p_clip, the ``classifier``'s scores (sec. 3.5), then
        Mask2Former's composition of the masks (proposals, or the decoder's binarised masks)."""
        alpha = config.alpha if ctx.alpha is None else float(ctx.alpha)
        beta = config.beta if ctx.beta is None else float(ctx.beta)
        seen = torch.as_tensor(np.asarray(ctx.seen, bool))
        isthing = np.asarray(ctx.isthing, bool)
        results = []
        for i, s in enumerate(samples):
            if config.mask_source == "proposals":
                n = s.num_masks
                rles = s.rles
            else:
                n = int(outputs.valid[i].sum())
                rles = None
            if n == 0:
                results.append(ImageResult.empty(s.image_id, s.height, s.width))
                continue
            p_ldp = split_void(outputs.class_logits[i, :n].float())[0].cpu()
            p_clip = None
            if outputs.clip_logits is not None:
                p_clip = outputs.clip_logits[i, :n].float().softmax(-1).cpu()
            iou = outputs.iou[i, :n].float().cpu()
            probs = class_probs(p_ldp, p_clip, iou, config.classifier, seen, alpha, beta)
            if rles is None:
                assert outputs.mask_logits is not None
                rles = frame_logits_to_rles(outputs.mask_logits[i, :n], s.height, s.width)
            results.append(
                compose_masks(
                    s.image_id, s.height, s.width, rles, probs.numpy(), isthing, ctx.params
                )
            )
        return results
