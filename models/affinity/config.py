"""Configuration of the SAM-CP affinity head (Chen et al., "SAM-CP", sections 3.2-3.3, appendix A-B).

One frozen dataclass covers the architecture, the supervision (GT affinity, matcher, losses) and
inference. YAML run configs map 1:1 onto it through `AffinityConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_SCORE_MODES = ("cls", "cls_x_affinity")
_COMPOSITIONS = ("joint", "regions")
_MERGED_CLIP = ("dense", "patch_mean")
_LOW_QUALITY_IOU_KINDS = ("box", "mask", "min")
_CLS_NORMALIZERS = ("num_pos", "num_queries")


@dataclass(frozen=True)
class AffinityConfig:
    """Every knob of the affinity head. Defaults are the paper's COCO settings (appendix B.1).

    The dense CLIP inputs are described by `clip_levels` / `clip_channels` / `clip_strides`
    (one entry per cached `clip_<level>` map, all at the fixed square input geometry of side
    `clip_input_size`). The head never sees pixels: patches come as boxes plus RoI-aligned mask
    crops of side `roi_size`.
    """

    # --- inputs (must agree with the proposal cache) ---
    # names of the dense maps, in batch order: the paper pools from several pyramid levels
    clip_levels: tuple[str, ...] = ("clip_res3", "clip_res4", "clip_res5")
    clip_channels: tuple[int, ...] = (384, 768, 1536)  # channels of each level (ConvNeXt-L)
    clip_strides: tuple[int, ...] = (8, 16, 32)  # stride of each level w.r.t. the padded input
    clip_input_size: int = 1024  # S: image resized so its longer side is S, padded to S x S
    text_dim: int = 768  # D of the CLIP text space (text embeddings and clip_mask_embed)

    # --- patch encoder (section 3.2.1) ---
    embed_dim: int = 256  # width of patch features and queries
    roi_size: int = 7  # RoIAlign output side; patch mask crops must have this side too
    roi_sampling_ratio: int = 2  # torchvision.ops.roi_align sampling_ratio
    project_after_roi: bool = True  # project RoI cells (Linear+LN) instead of the maps (1x1+GN)
    # Multi-level pooling (FPN rule, as the authors' mmdet SingleRoIExtractor): each RoI is pooled
    # from the one level k = floor(k0 + log2(sqrt(w h) / s0)), w h in padded-input pixels, stride
    # 2^k, clamped to the listed levels. False: every listed level is RoI-aligned and summed, and
    # the plugin lists only the deepest cached level (the single-level head before issue 11).
    multi_level: bool = True
    roi_canonical_size: float = 224.0  # s0 (detectron2's canonical_box_size; mmdet 56 at stride 4)
    roi_canonical_level: int = 4  # k0: an s0-sized box pools from stride 2^k0 = 16 (res4)
    roi_mlp_hidden: int = 1024  # hidden width of the MaskRoI -> feature MLP
    num_encoder_layers: int = 6  # omega: self-attention layers over the patches of an image
    num_heads: int = 8  # eta: attention heads, also the per-head maps mixed in Algorithm 1
    ffn_dim: int = 2048  # FFN width in encoder/decoder layers
    dropout: float = 0.0

    # --- unified affinity decoder (section 3.2.2, appendix A.1) ---
    num_decoder_layers: int = 6
    affinity_mlp_layers: int = 3  # depth of the MLP mixing the eta head maps (Alg. 1, l.6)
    use_dca: bool = True  # dynamic cross-attention (mask by the binarised affinity)
    use_affinity_refinement: bool = True  # accumulate logits over layers (Alg. 1, l.9-11)
    use_query_enhancement: bool = True  # average RoI feature of the merged box into the query
    # Self-attention mask of the official code (sem_attn_mask): Type-II (patch) queries do not
    # attend to Type-I (semantic) queries, Type-I queries not to each other (only to themselves
    # and the patch queries); instance features then do not depend on the vocabulary.
    query_attn_mask: bool = True
    binarize_threshold: float = 0.5  # on the min-max normalised affinity (DCA, QE boxes, merging)
    prior_prob: float = 0.01  # initial sigmoid of affinity and class logits (focal-loss prior)

    # --- GT affinity (section 3.2.3, table 7) ---
    tau: float = 0.8  # positive if min(box IoP, mask IoP) >= tau
    ignore_low: float = 0.5  # patches with ignore_low <= min IoP < tau are ignored (Type-II rows)
    low_quality_match: bool = True  # high-IoU patches become positive (see targets.py)
    low_quality_iou: float = 0.5  # ... when their IoU with the GT exceeds this
    low_quality_iou_kind: str = "box"  # IoU used for low-quality matching: box | mask | min
    semantic_ignore_band: bool = False  # the official code has no ignore band for Type-I rows
    min_usable_box_iou: float = 0.5  # a GT whose positive patches' union box has IoU <= this
    #                                  with the GT box cannot be represented; its query is ignored

    # --- losses (eq. 1-2) ---
    loss_cls_weight: float = 2.0  # lambda_cls
    loss_mfl_weight: float = 1.0  # lambda_mfl
    loss_dice_weight: float = 1.0  # lambda_dice
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_eps: float = 1.0  # Dice = 1 - (2 sum(pt) + eps) / (sum(p) + sum(t) + eps)
    cls_normalizer: str = "num_pos"  # num_pos (DETR/official code) or num_queries (eq. 1's 1/M)
    deep_supervision: bool = True  # apply the loss at every decoder layer
    # "BG" (table 4): a Type-II query matched to no GT gets affinity target 1 on its own patch and
    # 0 elsewhere (mfl + dice, averaged over those queries) instead of no affinity loss
    bg_self_affinity: bool = True

    # --- DINO denoising queries (appendix A.3; official dn_cfg), training only ---
    num_denoising_queries: int = 300  # per-batch budget: groups = this // max GT count; 0 = off
    dn_label_noise: float = 0.5  # a copy's class is replaced with probability dn_label_noise / 2
    dn_box_noise: float = 1.0  # corner noise in half box sides (positives < 1x, negatives 1-2x)
    dn_attn_mask: bool = True  # normal queries never see them, groups never see each other

    # --- Hungarian matcher for Type-II queries ---
    cost_cls: float = 2.0
    cost_mfl: float = 1.0  # affinity focal cost
    cost_dice: float = 1.0
    cost_bbox: float = 1.0  # L1 between normalised xyxy boxes
    cost_giou: float = 1.0

    # --- training augmentation on the cached maps (appendix B.1; samcp.models.affinity.augment) ---
    scale_crop_aug: bool = True  # random rescale + crop of maps, patches and GT (train only)
    scale_range: tuple[float, float] = (0.6, 1.0)  # image's longer side in the frame (1 = test)
    crop_prob: float = 0.5  # the code's random choice: resize only, or resize-crop-resize
    crop_min: float = 0.5  # a crop keeps a fraction in [crop_min, 1] of each side

    # --- inference (section 3.3) ---
    kappa: float = 0.4  # S_ov = sigmoid(S_cls)^(1-kappa) * softmax(S_CLIP)^kappa
    clip_logit_scale: float = 100.0  # S_CLIP = scale * cos(query CLIP embedding, text embedding)
    # S_CLIP's embedding of a merged segment: "dense" pools the cached final CLIP map over the
    # merged mask and applies the cache's frozen CLIP head (the paper's S_CLIP, FC-CLIP);
    # "patch_mean" is the area-weighted mean of the member patches' cached embeddings (samcp
    # before; also the fallback for caches without clip_head/)
    merged_clip: str = "dense"
    min_affinity: float = 0.3  # a merged patch also needs sigmoid(affinity) > this
    score_mode: str = "cls"  # instance score: class prob (official) or x mean member affinity
    max_instances: int = 100  # top-k (query, class) pairs kept per image
    # joint: the authors' per-pixel argmax of score x mask over stuff regions and instances
    # (compose_masks, score 0.3); regions: the earlier instances-then-stuff compose_regions
    composition: str = "joint"

    def __post_init__(self) -> None:
        n = len(self.clip_levels)
        if n == 0 or len(self.clip_channels) != n or len(self.clip_strides) != n:
            raise ValueError(
                "clip_levels, clip_channels and clip_strides must be non-empty and of equal length"
            )
        if min(self.clip_strides) <= 0 or self.roi_canonical_size <= 0:
            raise ValueError("clip_strides and roi_canonical_size must be positive")
        if self.embed_dim % 4:
            raise ValueError(
                f"embed_dim {self.embed_dim} must be a multiple of 4 (box sine embedding)"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} must be a multiple of num_heads {self.num_heads}"
            )
        if not 0.0 < self.ignore_low <= self.tau <= 1.0:
            raise ValueError(f"need 0 < ignore_low <= tau <= 1, got {self.ignore_low}, {self.tau}")
        if not 0.0 <= self.kappa <= 1.0:
            raise ValueError(f"kappa must be in [0, 1], got {self.kappa}")
        if not 0.0 < self.prior_prob < 1.0:
            raise ValueError(f"prior_prob must be in (0, 1), got {self.prior_prob}")
        if len(self.scale_range) != 2 or not 0.0 < self.scale_range[0] <= self.scale_range[1] <= 1:
            raise ValueError(
                f"scale_range must be [lo, hi] with 0 < lo <= hi <= 1, got {list(self.scale_range)}"
            )
        if not (0.0 <= self.crop_prob <= 1.0 and 0.0 < self.crop_min <= 1.0):
            raise ValueError(
                f"need crop_prob in [0, 1] and crop_min in (0, 1], got {self.crop_prob}, "
                f"{self.crop_min}"
            )
        if (
            self.num_denoising_queries < 0
            or not 0.0 <= self.dn_label_noise <= 1.0
            or self.dn_box_noise < 0
        ):
            raise ValueError(
                "need num_denoising_queries >= 0, dn_label_noise in [0, 1] and dn_box_noise >= 0, "
                f"got {self.num_denoising_queries}, {self.dn_label_noise}, {self.dn_box_noise}"
            )
        if self.score_mode not in _SCORE_MODES:
            raise ValueError(f"score_mode must be one of {_SCORE_MODES}, got {self.score_mode!r}")
        if self.merged_clip not in _MERGED_CLIP:
            raise ValueError(
                f"merged_clip must be one of {_MERGED_CLIP}, got {self.merged_clip!r}"
            )
        if self.composition not in _COMPOSITIONS:
            raise ValueError(
                f"composition must be one of {_COMPOSITIONS}, got {self.composition!r}"
            )
        if self.low_quality_iou_kind not in _LOW_QUALITY_IOU_KINDS:
            raise ValueError(
                f"low_quality_iou_kind must be one of {_LOW_QUALITY_IOU_KINDS}, "
                f"got {self.low_quality_iou_kind!r}"
            )
        if self.cls_normalizer not in _CLS_NORMALIZERS:
            raise ValueError(
                f"cls_normalizer must be one of {_CLS_NORMALIZERS}, got {self.cls_normalizer!r}"
            )
        if (
            self.affinity_mlp_layers < 1
            or self.num_decoder_layers < 1
            or self.num_encoder_layers < 0
        ):
            raise ValueError(
                "need affinity_mlp_layers >= 1, num_decoder_layers >= 1, num_encoder_layers >= 0"
            )

    @classmethod
    def tiny(cls, **overrides: Any) -> AffinityConfig:
        """A deliberately small variant that runs the real code path on a CPU in seconds."""
        params: dict[str, Any] = dict(
            clip_levels=("clip_res5",),  # one level: runs on a default (res5-only) cache
            clip_channels=(16,),
            clip_input_size=64,
            clip_strides=(8,),
            text_dim=12,
            embed_dim=32,
            roi_size=4,
            roi_mlp_hidden=64,
            num_encoder_layers=2,
            num_heads=4,
            ffn_dim=64,
            num_decoder_layers=3,
            num_denoising_queries=20,  # a few groups, not 300 queries per few-patch image
        )
        params.update(overrides)
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-serialisable dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AffinityConfig:
        """Build from a YAML/JSON mapping; unknown keys are an error naming them."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown affinity config keys: {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            default = getattr(cls, key, None)
            if isinstance(default, tuple) or isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)
