"""PosSAM samples: from a cached image to frame tensors, horizontal flip, batching.

A sample holds one image's cached maps (float16, as cached), the first ``max_masks`` proposals as
soft coverage masks on the SAM grid of the frame (float16), their CLIP mask embeddings, and the
training targets. Full-resolution masks are decoded once, here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ..frames import content_width_cells, mirror_columns
from ..heads import GroundTruth, ImageInputs
from .config import PossamConfig
from .targets import MaskTargets, ProposalTargets, frame_coverage, mask_targets, proposal_targets


@dataclass
class PossamSample:
    """One image ready for the PosSAM head (CPU tensors).

    Attributes:
        image_id, height, width: the image and its size.
        rles: the N proposals' RLEs at (height, width) (for writing predictions).
        masks: (N, G, G) float16 coverage of the SAM-grid frame cells by each proposal.
        sam_embed: (sam_dim, G, G) float16.
        clip_map: (C, h, w) float16, the ``clip_level`` map.
        clip_embed: (N, D) float16 cached CLIP mask embeddings, or None.
        targets: proposal targets (proposals path, training only).
        gt: GT masks on the stride-4 frame grid (decoder path, training only).
        flipped: mirrored by :func:`flip_sample` (odd number of times).
    """

    image_id: str
    height: int
    width: int
    rles: list[dict]
    masks: Tensor
    sam_embed: Tensor
    clip_map: Tensor
    clip_embed: Tensor | None
    targets: ProposalTargets | None = None
    gt: MaskTargets | None = None
    flipped: bool = False

    @property
    def num_masks(self) -> int:
        return int(self.masks.shape[0])


def _array(inputs: ImageInputs, name: str, flag: str) -> Tensor:
    if name not in inputs.image_arrays:
        raise ValueError(f"cache row {inputs.image_id} has no {name}; {flag}")
    return torch.from_numpy(np.ascontiguousarray(inputs.image_arrays[name])).to(torch.float16)


def make_sample(
    inputs: ImageInputs, config: PossamConfig, max_masks: int, gt: GroundTruth | None = None
) -> PossamSample:
    """A sample from a cached image (its first ``max_masks`` proposals, in cache order)."""
    sam = _array(
        inputs,
        "sam_embed",
        "re-run samcp precompute with --store-sam-embeddings (and --sam-checkpoint)",
    )
    g = config.sam_grid
    if tuple(sam.shape) != (config.sam_dim, g, g):
        raise ValueError(
            f"sam_embed of {inputs.image_id} is {tuple(sam.shape)}, the head expects "
            f"({config.sam_dim}, {g}, {g}) (sam_dim, sam_grid)"
        )
    clip = _array(inputs, config.clip_level, "re-run samcp precompute with --clip-checkpoint")
    if clip.ndim != 3 or clip.shape[0] != config.clip_channels:
        raise ValueError(
            f"{config.clip_level} of {inputs.image_id} is {tuple(clip.shape)}, the head expects "
            f"{config.clip_channels} channels"
        )
    inputs = inputs.first(max_masks)
    n = len(inputs)
    emb = inputs.mask_arrays.get("clip_mask_embed")
    sample = PossamSample(
        image_id=inputs.image_id,
        height=int(inputs.height),
        width=int(inputs.width),
        rles=list(inputs.rles),
        masks=frame_coverage(inputs.rles, inputs.height, inputs.width, g).to(torch.float16),
        sam_embed=sam,
        clip_map=clip,
        clip_embed=None
        if emb is None
        else torch.from_numpy(np.array(emb, np.float16).reshape(n, np.shape(emb)[-1])),
    )
    if gt is not None:
        if config.mask_source == "proposals":
            sample.targets = proposal_targets(
                inputs.rles,
                gt.rles,
                gt.labels,
                gt.iscrowd,
                config.match_iou,
                config.iou_void_ignore,
            )
        else:
            sample.gt = mask_targets(
                gt.rles, gt.labels, gt.iscrowd, inputs.height, inputs.width, config.mask_grid
            )
    return sample


def _mirror(f: Tensor, height: int, width: int) -> Tensor:
    """Mirror a frame map (..., h, w) about the image content's vertical centre line.

    Columns wholly past the content (the padding, whose SAM / CLIP features are not zero) keep
    their values: a mirrored image is padded the same way.
    """
    c = content_width_cells(height, width, f.shape[-1])
    out = mirror_columns(f, c)
    n = min(f.shape[-1], math.ceil(c))
    out[..., n:] = f[..., n:]
    return out


def flip_sample(s: PossamSample) -> PossamSample:
    """The horizontally mirrored sample: maps, masks and GT masks mirrored about the image's own
    vertical centre line (the maps hold the image at the top-left of a padded square, so only the
    content columns are mirrored; bilinear when the content edge falls inside a cell, exact
    otherwise). Proposal targets are unchanged (labels and IoUs are flip-invariant). The RLEs are
    left as they are: predictions are never made on flipped samples."""
    h, w = s.height, s.width
    gt = s.gt
    if gt is not None:
        gt = MaskTargets(_mirror(gt.masks.float(), h, w) >= 0.5, gt.labels)
    return replace(
        s,
        masks=_mirror(s.masks, h, w),
        sam_embed=_mirror(s.sam_embed, h, w),
        clip_map=_mirror(s.clip_map, h, w),
        gt=gt,
        flipped=not s.flipped,
    )


def collate(samples: Sequence[PossamSample], text_embed: Tensor, device) -> dict:
    """The module's keyword arguments, padded to the largest N (``valid`` marks real masks)."""
    samples = list(samples)
    b = len(samples)
    n = max(1, max(s.num_masks for s in samples))
    g = samples[0].masks.shape[-1]
    masks = torch.zeros(b, n, g, g)
    valid = torch.zeros(b, n, dtype=torch.bool)
    has_emb = all(s.clip_embed is not None for s in samples)
    emb = None
    if has_emb:
        d = int(text_embed.shape[-1])
        emb = torch.zeros(b, n, d)
    for i, s in enumerate(samples):
        m = s.num_masks
        masks[i, :m] = s.masks.float()
        valid[i, :m] = True
        if emb is not None and m:
            emb[i, :m] = s.clip_embed.float()
    return {
        "sam_embed": torch.stack([s.sam_embed for s in samples]).to(device).float(),
        "clip_map": torch.stack([s.clip_map for s in samples]).to(device).float(),
        "masks": masks.to(device),
        "valid": valid.to(device),
        "text_embed": text_embed.to(device).float(),
        "clip_embed": None if emb is None else emb.to(device),
    }
