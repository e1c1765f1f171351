"""Cost-aggregation samples: cached CLIP maps, semantic targets on the frame, flips, batching.

A sample holds one image's ``clip_level`` map and guidance maps (float16, as cached) and, for
training, the semantic label map rasterised on the CLIP frame's ``label_grid`` (and its mirror
image, so that a flip needs no decoding). Label values: a class index, :data:`VOID` (-1) on
unlabelled pixels, :data:`OUTSIDE` (-2) on frame cells past the image (the frame's padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from ..frames import content_width_cells, mirror_columns
from ..heads import GroundTruth, ImageInputs
from .config import CostAggConfig

VOID = -1
OUTSIDE = -2

LEVELS_FLAG = "re-run samcp precompute with --clip-checkpoint and --clip-levels res3,res4,res5"


@dataclass
class CostAggSample:
    """One image ready for the cost-aggregation head (CPU tensors).

    Attributes:
        image_id, height, width: the image and its size.
        clip_map: (C, h, w) float16, the ``clip_level`` map.
        guidance: the guidance levels' maps (C_i, h_i, w_i) float16, in config order.
        labels: (G, G) int16 label grid of the frame (training only), G = ``label_grid``.
        labels_mirrored: the label grid of the horizontally mirrored image (training only).
        flipped: mirrored by :func:`flip_sample` (odd number of times).
    """

    image_id: str
    height: int
    width: int
    clip_map: Tensor
    guidance: list[Tensor]
    labels: Tensor | None = None
    labels_mirrored: Tensor | None = None
    flipped: bool = False


def _array(inputs: ImageInputs, name: str) -> Tensor:
    if name not in inputs.image_arrays:
        raise ValueError(f"cache row {inputs.image_id} has no {name}; {LEVELS_FLAG}")
    return torch.from_numpy(np.ascontiguousarray(inputs.image_arrays[name])).to(torch.float16)


def semantic_label_map(gt: GroundTruth, height: int, width: int) -> np.ndarray:
    """(height, width) int16: each GT segment's class (crowd segments too), VOID elsewhere."""
    out = np.full((height, width), VOID, np.int16)
    for rle, label in zip(gt.rles, np.asarray(gt.labels).reshape(-1)):
        out[mask_utils.decode(rle).astype(bool)] = int(label)
    return out


def frame_label_grid(label_map: np.ndarray, grid: int) -> np.ndarray:
    """Nearest-pixel labels at the centres of a ``grid`` x ``grid`` frame grid (G, G) int16.

    Cell j's centre is at (j + 0.5) * L / grid original pixels (L = the longer image side, the
    frame's side in original pixels); cells whose centre lies past the image are OUTSIDE.
    """
    h, w = label_map.shape
    long_side = max(h, w)
    centres = (np.arange(grid) + 0.5) * long_side / grid
    ys = np.floor(centres).astype(np.int64)
    xs = np.floor(centres).astype(np.int64)
    out = np.full((grid, grid), OUTSIDE, np.int16)
    rows, cols = ys < h, xs < w
    out[np.ix_(rows, cols)] = label_map[np.ix_(ys[rows], xs[cols])]
    return out


def make_sample(
    inputs: ImageInputs, config: CostAggConfig, gt: GroundTruth | None = None
) -> CostAggSample:
    """A sample from a cached image (the proposals are not used)."""
    clip = _array(inputs, config.clip_level)
    if clip.ndim != 3 or clip.shape[0] != config.clip_channels:
        raise ValueError(
            f"{config.clip_level} of {inputs.image_id} is {tuple(clip.shape)}, the head expects "
            f"{config.clip_channels} channels"
        )
    guidance = []
    for level, ch in zip(config.guidance_levels, config.guidance_channels):
        g = _array(inputs, level)
        if g.ndim != 3 or g.shape[0] != ch:
            raise ValueError(
                f"{level} of {inputs.image_id} is {tuple(g.shape)}, the head expects {ch} channels"
            )
        guidance.append(g)
    sample = CostAggSample(
        image_id=inputs.image_id,
        height=int(inputs.height),
        width=int(inputs.width),
        clip_map=clip,
        guidance=guidance,
    )
    if gt is not None:
        label_map = semantic_label_map(gt, sample.height, sample.width)
        grid = config.label_grid
        sample.labels = torch.from_numpy(frame_label_grid(label_map, grid))
        sample.labels_mirrored = torch.from_numpy(
            frame_label_grid(np.ascontiguousarray(label_map[:, ::-1]), grid)
        )
    return sample


def mirror_frame_map(f: Tensor, height: int, width: int) -> Tensor:
    """Mirror a frame map (..., h, w) about the image content's vertical centre line.

    Columns wholly past the content (the padding, whose CLIP features are not zero) keep their
    values: a mirrored image is padded the same way. Bilinear where the content edge falls
    inside a cell, exact otherwise (samcp.models.frames.mirror_columns).
    """
    c = content_width_cells(height, width, f.shape[-1])
    out = mirror_columns(f, c)
    n = min(f.shape[-1], math.ceil(c))
    out[..., n:] = f[..., n:]
    return out


def flip_sample(s: CostAggSample) -> CostAggSample:
    """The horizontally mirrored sample: every CLIP map mirrored about the image's own centre
    line, and the label grid swapped for the mirrored image's (rasterised from the mirrored
    label map, so labels stay exact)."""
    h, w = s.height, s.width
    return replace(
        s,
        clip_map=mirror_frame_map(s.clip_map, h, w),
        guidance=[mirror_frame_map(g, h, w) for g in s.guidance],
        labels=s.labels_mirrored,
        labels_mirrored=s.labels,
        flipped=not s.flipped,
    )


def collate(samples: Sequence[CostAggSample], text_embed: Tensor, device) -> dict:
    """The module's keyword arguments: stacked maps (float32) and the (K, D) class embeddings."""
    samples = list(samples)
    levels = len(samples[0].guidance)
    return {
        "clip_map": torch.stack([s.clip_map for s in samples]).to(device).float(),
        "guidance": [
            torch.stack([s.guidance[i] for s in samples]).to(device).float() for i in range(levels)
        ],
        "text_embed": text_embed.to(device).float(),
    }


def stack_labels(samples: Sequence[CostAggSample], device) -> Tensor:
    """(B, G, G) int64 label grids of training samples."""
    labels = []
    for s in samples:
        if s.labels is None:
            raise ValueError(f"sample {s.image_id} has no training targets (built without gt)")
        labels.append(s.labels)
    return torch.stack(labels).to(device=device, dtype=torch.long)
