"""SAM-CP affinity head (Chen et al., "SAM-CP: Marrying SAM with Composable Prompts").

Public API:
    AffinityConfig                         the frozen config dataclass (`AffinityConfig.tiny()` for tests)
    AffinityHead, build_affinity_head      the torch module and its registry builder
    AffinityOutput                         what the head returns
    AffinityCriterion                      losses of eq. (1)-(2) with Hungarian matching
    HungarianMatcher, match_cost           Type-II query matching
    ImageTargets, build_image_targets      GT affinity from RLEs (min(box IoP, mask IoP) >= tau)
    patch_mask_crops                       MaskRoI input for the data loader
    predict_image, ImagePrediction         section 3.3 inference on one image
    AffinitySample, make_sample, flip_sample, collate   samples from cached images
    plugin.AffinityPlugin                  the head plugin (registered as "affinity")
    save_head, load_head                   safetensors weights + config.json
"""

from pathlib import Path
from typing import Any

from torch import nn

from .config import AffinityConfig
from .data import AffinitySample, collate, flip_sample, make_sample
from .losses import AffinityCriterion
from .matcher import HungarianMatcher, hungarian_match, match_cost
from .model import (
    BATCH_KEYS,
    AffinityHead,
    AffinityOutput,
    ImagePrediction,
    build_affinity_head,
    merge_patches,
    normalized_affinity,
    open_vocab_scores,
    predict_image,
    query_clip_logits,
)
from .targets import ImageTargets, build_image_targets, gt_affinity, patch_mask_crops


def save_head(module: nn.Module, config: AffinityConfig, directory: str | Path) -> Path:
    """`samcp.models.registry.save_head`."""
    from ..registry import save_head as _save

    return _save(module, config, directory)


def load_head(directory: str | Path, device: str = "cpu") -> tuple[nn.Module, Any]:
    """`samcp.models.registry.load_head`."""
    from ..registry import load_head as _load

    return _load(directory, device)


__all__ = [
    "BATCH_KEYS",
    "AffinityConfig",
    "AffinityCriterion",
    "AffinityHead",
    "AffinityOutput",
    "AffinitySample",
    "HungarianMatcher",
    "ImagePrediction",
    "ImageTargets",
    "build_affinity_head",
    "build_image_targets",
    "collate",
    "flip_sample",
    "gt_affinity",
    "hungarian_match",
    "load_head",
    "make_sample",
    "match_cost",
    "merge_patches",
    "normalized_affinity",
    "open_vocab_scores",
    "patch_mask_crops",
    "predict_image",
    "query_clip_logits",
    "save_head",
]
