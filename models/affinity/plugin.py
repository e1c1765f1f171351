"""The SAM-CP affinity head as a samcp head plugin (see samcp.models.heads)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor, nn

from ..compose import compose_masks, compose_regions, union_rle
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
from .model import (
    AffinityOutput,
    ImagePrediction,
    build_affinity_head,
    dense_query_clip_embed,
    predict_image,
)


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
    # The authors' optimizer (samcp_r50_12e_panoptic_ms_crop_improved_param.py): AdamW, lr 2e-4,
    # weight decay 1e-4, gradient norm clipped at 0.1.
    train_defaults = {"lr": 2e-4, "weight_decay": 1e-4, "clip_grad": 0.1}
    # Heads saved before these fields existed: single level, no query attention mask, no
    # denoising queries or BG self-affinity, SAM-CP's earlier region composition.
    legacy_defaults = {
        "multi_level": False,
        "query_attn_mask": False,
        "num_denoising_queries": 0,
        "bg_self_affinity": False,
        "composition": "regions",
        "scale_crop_aug": False,  # training only: they were trained without it
        "merged_clip": "patch_mean",  # inference only: keeps their predictions as they were
    }
    inference_fields = (
        "kappa",
        "binarize_threshold",
        "min_affinity",
        "score_mode",
        "max_instances",
        "clip_logit_scale",
        "composition",
        "merged_clip",
    )

    def configure(self, config: Mapping[str, Any], cache: CacheInfo) -> dict[str, Any]:
        if not cache.clip_levels:
            raise ValueError(
                "the cache has no dense CLIP features; re-run precompute with --clip-checkpoint "
                "and --clip-levels res3,res4,res5 (the affinity head pools patches from the dense "
                "maps and needs clip_mask_embed)"
            )
        if config.get("multi_level", True):
            # The levels the config asks for (default res3..res5), every one of them cached.
            levels = list(config.get("clip_levels") or AffinityConfig.clip_levels)
            missing = [lv for lv in levels if lv not in cache.clip_levels]
            if missing:
                flag = ",".join(lv.removeprefix("clip_") for lv in levels)
                raise ValueError(
                    f"the cache has no {', '.join(missing)} (it stores "
                    f"{', '.join(cache.clip_levels)}) but the affinity head pools patches from "
                    f"{', '.join(levels)}: re-run samcp precompute --clip-levels {flag} (or set "
                    "clip_levels to cached levels, or multi_level=false for the deepest one only)"
                )
        else:
            levels = [cache.clip_levels[-1]]  # single level: the deepest cached (res5 by default)
        return {
            "clip_levels": levels,
            "clip_strides": [cache.clip_strides[lv] for lv in levels],
            "clip_channels": [cache.clip_channels[lv] for lv in levels],
            "clip_input_size": cache.clip_input_size,
            "text_dim": cache.text_dim,
        }

    def needs(self, config: AffinityConfig) -> tuple[list[str], list[str]]:
        return list(config.clip_levels), ["clip_mask_embed"]

    def default_params(self, config: AffinityConfig) -> CompositionParams:
        if config.composition == "regions":
            # Instances >= 0.5 painted first, then stuff regions of at least 4096 pixels
            # (Panoptic FPN's stuff_area_thresh).
            return CompositionParams(
                score_thresh=0.5,
                overlap_thresh=0.8,
                stuff_area_min=4096,
                max_instances=config.max_instances,
            )
        # The authors' SamCPHead._predict_by_feat_panoptic_single with their COCO test_cfg:
        # object_mask_thr 0.3, iou_thr 0.8, no stuff area limit, semantic map = the panoptic
        # map's classes.
        return CompositionParams(
            score_thresh=0.3,
            overlap_thresh=0.8,
            stuff_area_min=0,
            max_instances=config.max_instances,
            semantic_from="panoptic",
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

    def augment(
        self,
        sample: AffinitySample,
        config: AffinityConfig,
        flip: bool,
        rng: np.random.Generator | None = None,
    ):
        # Rescale + crop (drawn from rng; see .augment), then the flip of the augmented image.
        if rng is not None and config.scale_crop_aug:
            from .augment import draw_scale_crop, scale_crop_sample

            aug = draw_scale_crop(rng, sample.height, sample.width, config)
            sample = scale_crop_sample(sample, aug, config)[0]
        return flip_sample(sample) if flip else sample

    def collate(self, samples, text_embed: Tensor, config: AffinityConfig, device) -> dict:
        # Training samples carry targets: the batch then also gets the denoising queries.
        return collate(list(samples), text_embed, device, config)

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
            clip_fn = _dense_clip_fn(s, config, ctx)
            pred = predict_image(
                outputs.affinity_logits[-1, i, : k + n, :n],
                outputs.class_logits[-1, i, : k + n],
                outputs.patch_valid[i, :n],
                k,
                config,
                patch_clip_embed=None if emb is None else emb.to(ctx.device).float(),
                text_embed=None if emb is None and clip_fn is None else ctx.text_embed,
                patch_areas=s.patch_areas.to(ctx.device),
                instance_classes=thing,
                seen=seen,
                alpha=ctx.alpha,
                beta=ctx.beta,
                query_clip_embed=clip_fn,
            )
            results.append(
                compose_prediction(
                    pred,
                    s.patch_rles,
                    s.image_id,
                    s.height,
                    s.width,
                    np.asarray(ctx.isthing, bool),
                    ctx.params,
                    config.composition,
                )
            )
        return results


def _dense_clip_fn(s: AffinitySample, config: AffinityConfig, ctx: InferContext):
    """members -> CLIP embeddings of the merged segments pooled from the cached final map
    (``merged_clip="dense"``), or None for the patch-mean fallback: ``merged_clip="patch_mean"``,
    a cache without ``clip_head/``, a head that does not read the head's level, or another
    CLIP geometry."""
    head = ctx.clip_head
    if config.merged_clip != "dense" or head is None or s.num_patches == 0:
        return None
    dense = s.clip_feats.get(head.level)
    if dense is None or int(head.input_size) != int(config.clip_input_size):
        return None
    dense = dense.to(ctx.device)
    masks = torch.from_numpy(
        np.ascontiguousarray(mask_utils.decode(list(s.patch_rles)).transpose(2, 0, 1))
    ).to(ctx.device, torch.bool)

    def embed(members: Tensor) -> Tensor:
        return dense_query_clip_embed(members, masks, dense, head)

    return embed


def compose_prediction(
    pred: ImagePrediction,
    patch_rles: Sequence[dict],
    image_id: str,
    height: int,
    width: int,
    isthing: np.ndarray,
    params: CompositionParams,
    composition: str = "joint",
) -> ImageResult:
    """One image's ImageResult from :func:`predict_image`'s regions and instances.

    A region's or instance's mask is the union of its member patches' RLEs.

    * ``"joint"`` (the authors' code): the candidates are the Type-I region of every stuff class
      (label c, score its fused score) and the ranked Type-II instances (their thing labels and
      scores), each scored one-hot, composed by :func:`samcp.models.compose.compose_masks`: one
      per-pixel argmax of score x mask over things and stuff, ``score_thresh`` on both, the
      ``overlap_thresh`` visible-area rule, stuff merged per class. Type-I regions of thing
      classes take no part (the authors have no Type-I query for a thing class); with
      ``semantic_from="panoptic"`` the semantic map is the panoptic map's classes. Candidates
      with an empty mask or a score of 0 are left out.
    * ``"regions"``: :func:`samcp.models.compose.compose_regions` (instances painted first, then
      stuff from the semantic map of all classes' regions).

    Args:
        pred: the image's prediction (tensors on any device).
        patch_rles: (P) the patches' RLEs at (height, width).
        image_id: the image.
        height: H.
        width: W.
        isthing: (K,) bool.
        params: thresholds.
        composition: ``"joint"`` or ``"regions"``.

    Returns:
        The image's ImageResult.
    """
    isthing = np.asarray(isthing, bool)
    sem_members = pred.semantic_members.cpu().numpy()
    sem_scores = pred.semantic_scores.float().cpu().numpy().astype(np.float64)
    inst_members = pred.instance_members.cpu().numpy()
    inst_labels = pred.instance_labels.cpu().numpy().astype(np.int64)
    inst_scores = pred.instance_scores.float().cpu().numpy().astype(np.float64)
    if composition == "regions":
        return compose_regions(
            image_id,
            height,
            width,
            [union_rle(patch_rles, m) for m in sem_members],
            sem_scores,
            [union_rle(patch_rles, m) for m in inst_members],
            inst_labels,
            inst_scores,
            isthing,
            params,
        )
    if composition != "joint":
        raise ValueError(f"composition must be 'joint' or 'regions', got {composition!r}")
    rles: list[dict] = []
    labels: list[int] = []
    scores: list[float] = []
    for c in np.flatnonzero(~isthing).tolist():
        rle = union_rle(patch_rles, sem_members[c]) if sem_scores[c] > 0 else None
        if rle is not None:
            rles.append(rle)
            labels.append(c)
            scores.append(float(sem_scores[c]))
    # (query, class) pairs of one query share its mask: merge it once.
    queries = pred.instance_queries.cpu().numpy().tolist()
    merged: dict[int, dict | None] = {}
    for i, q in enumerate(queries):
        if inst_scores[i] <= 0:
            continue
        if q not in merged:
            merged[q] = union_rle(patch_rles, inst_members[i])
        if merged[q] is not None:
            rles.append(merged[q])
            labels.append(int(inst_labels[i]))
            scores.append(float(inst_scores[i]))
    probs = np.zeros((len(rles), len(isthing)), np.float64)
    probs[np.arange(len(rles)), np.asarray(labels, np.int64)] = scores
    return compose_masks(image_id, height, width, rles, probs, isthing, params)
