"""The affinity head's samples: from a cached image to patches, horizontal flip, batching.

Training and prediction build samples here, so both see patches exactly the same way. Everything
works on cached arrays and RLEs; full-resolution masks are decoded only to make the small RoI mask
crops and (for training) the ground-truth affinities, once per image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ..frames import content_width_cells, mirror_columns
from ..heads import GroundTruth, ImageInputs
from .config import AffinityConfig
from .denoising import build_denoising_queries
from .targets import ImageTargets, build_image_targets, patch_mask_crops


@dataclass
class AffinitySample:
    """One image ready for the affinity head (CPU tensors)."""

    image_id: str
    height: int
    width: int
    clip_feats: dict[str, Tensor]  # level name -> (C, h, w) float16
    patch_rles: list[dict]  # kept for writing predictions
    patch_boxes: Tensor  # (P, 4) XYWH original pixels
    patch_masks: Tensor  # (P, R, R) RoI-aligned coverage of each patch in its own box
    patch_clip_embed: Tensor | None  # (P, D) float16
    patch_areas: Tensor  # (P,)
    targets: ImageTargets | None = None
    flipped: bool = False

    @property
    def num_patches(self) -> int:
        return int(self.patch_boxes.shape[0])


def make_sample(
    inputs: ImageInputs,
    config: AffinityConfig,
    max_patches: int,
    gt: GroundTruth | None = None,
) -> AffinitySample:
    """A sample from a cached image (its first ``max_patches`` patches in cache order)."""
    missing = [lv for lv in config.clip_levels if lv not in inputs.image_arrays]
    if missing:
        raise ValueError(
            f"cache row {inputs.image_id} has no {', '.join(missing)}; run precompute with CLIP "
            "features (--clip-checkpoint) and the levels the head uses"
        )
    inputs = inputs.first(max_patches)
    n = len(inputs)
    boxes = np.asarray(inputs.boxes, np.float32)
    emb = inputs.mask_arrays.get("clip_mask_embed")
    sample = AffinitySample(
        image_id=inputs.image_id,
        height=inputs.height,
        width=inputs.width,
        clip_feats={
            lv: torch.from_numpy(np.asarray(inputs.image_arrays[lv])) for lv in config.clip_levels
        },
        patch_rles=inputs.rles,
        patch_boxes=torch.from_numpy(boxes),
        patch_masks=patch_mask_crops(inputs.rles, boxes, config.roi_size)
        if n
        else torch.zeros(0, config.roi_size, config.roi_size),
        patch_clip_embed=None if emb is None else torch.from_numpy(np.asarray(emb)),
        patch_areas=torch.from_numpy(np.asarray(inputs.areas, np.float32)),
    )
    if gt is not None:
        sample.targets = build_image_targets(
            inputs.rles,
            boxes,
            gt.rles,
            gt.labels,
            gt.iscrowd,
            gt.isthing,
            (inputs.height, inputs.width),
            config,
        )
    return sample


def flip_sample(s: AffinitySample) -> AffinitySample:
    """The horizontally mirrored sample: features, boxes, mask crops and targets together.

    GT affinities (IoP between patches and segments) do not change under a mirror of both, so
    targets only need their boxes mirrored. The dense maps hold the image top-left in a padded
    square; they are mirrored about the image's own vertical centre line
    (:func:`samcp.models.frames.mirror_columns`), not about the padded square's.
    """
    feats = {
        name: mirror_columns(f, content_width_cells(s.height, s.width, f.shape[-1]))
        for name, f in s.clip_feats.items()
    }
    b = s.patch_boxes.clone()
    b[:, 0] = s.width - b[:, 0] - b[:, 2]
    targets = s.targets
    if targets is not None:
        ib = targets.inst_boxes.clone()
        ib[:, [0, 2]] = 1.0 - targets.inst_boxes[:, [2, 0]]
        targets = replace(targets, inst_boxes=ib)
    # The RLEs are left as they are: predictions are never made on flipped samples.
    return replace(
        s,
        clip_feats=feats,
        patch_boxes=b,
        patch_masks=s.patch_masks.flip(-1),
        targets=targets,
        flipped=not s.flipped,
    )


def collate(
    samples: list[AffinitySample],
    text_embed: Tensor,
    device: torch.device | str,
    config: AffinityConfig | None = None,
) -> dict:
    """The head's batch dict (samcp.models.affinity.BATCH_KEYS), padded to the largest P.

    With a ``config`` that enables denoising queries and samples that all carry targets (training),
    the dict also holds "denoising": noised copies of the GT instances
    (:func:`samcp.models.affinity.denoising.build_denoising_queries`, global torch RNG), which the
    head uses in training mode only. Samples without targets (prediction) never get them.
    """
    b = len(samples)
    p = max(1, max(s.num_patches for s in samples))
    r = samples[0].patch_masks.shape[-1]
    boxes = torch.zeros(b, p, 4)
    masks = torch.zeros(b, p, r, r)
    valid = torch.zeros(b, p, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = s.num_patches
        boxes[i, :n] = s.patch_boxes
        masks[i, :n] = s.patch_masks
        valid[i, :n] = True
        if n == 0:  # keep one dummy box inside the image so RoIAlign stays finite
            boxes[i, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    levels = list(samples[0].clip_feats)
    batch = {
        "clip_feats": {
            lv: torch.stack([s.clip_feats[lv] for s in samples]).to(device).float() for lv in levels
        },
        "image_sizes": torch.tensor([[s.height, s.width] for s in samples], device=device),
        "patch_boxes": boxes.to(device),
        "patch_masks": masks.to(device),
        "patch_valid": valid.to(device),
        "text_embed": text_embed.to(device).float(),
    }
    if config is not None and all(s.targets is not None for s in samples):
        dn = build_denoising_queries([s.targets for s in samples], int(text_embed.shape[0]), config)
        if dn is not None:
            batch["denoising"] = dn.to(device)
    return batch
