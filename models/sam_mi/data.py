"""SAM-MI samples: costagg's sample (cached CLIP maps, semantic label grid) plus what TSPP, SAM and
the grid prompter read: the cached ``sam_embed``, the cached proposals as coverage on the mask
grid, TSPP's grid labels and targets, and the seed of the point draw.

Seeds: an image's draw uses ``crc32(image_id) + point_seed`` at inference (reproducible); in
training :meth:`augment` replaces the seed by one drawn from the trainer's generator (seeded by
seed, epoch, step and position), so every step draws afresh and a resumed run draws the same.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor

from ..costagg import data as costagg_data
from ..costagg.data import CostAggSample, mirror_frame_map, semantic_label_map
from ..heads import GroundTruth, ImageInputs
from .config import SamMiConfig
from .targets import grid_labels, tspp_targets

SAM_FLAG = (
    "re-run samcp precompute with --store-sam-embeddings --sam-checkpoint PATH, or --set "
    "prompter=grid"
)


@dataclass
class SamMiSample:
    """One image for SAM-MI (CPU tensors).

    Attributes:
        base: costagg's sample (CLIP maps, label grids, flipped flag).
        seed: the point draw's seed (before ``point_seed``).
        sam_embed: (C, G, G) float16 (stage 2 with the TSPP prompter), else None.
        masks: (N, R, R) uint8 coverage x 255 of the cached proposals on the ``mask_res`` frame
            grid (stage 2 with the grid prompter), else None.
        grid_labels, grid_labels_mirrored: (g, g) int16 labels at the point grid (training).
        target, target_mirrored: (g, g) float32 TSPP targets (eq. 3) (training).
    """

    base: CostAggSample
    seed: int
    sam_embed: Tensor | None = None
    masks: Tensor | None = None
    grid_labels: Tensor | None = None
    grid_labels_mirrored: Tensor | None = None
    target: Tensor | None = None
    target_mirrored: Tensor | None = None

    @property
    def image_id(self) -> str:
        return self.base.image_id

    @property
    def height(self) -> int:
        return self.base.height

    @property
    def width(self) -> int:
        return self.base.width

    @property
    def labels(self) -> Tensor | None:
        return self.base.labels


def image_seed(image_id: str) -> int:
    """A stable per-image seed (crc32 of the id)."""
    return zlib.crc32(image_id.encode("utf-8"))


def frame_coverage(rles: list[dict], height: int, width: int, res: int) -> Tensor:
    """(N, res, res) uint8 coverage x 255 of masks given as RLEs at the image size, on the
    square frame (image at the top-left, longer side = frame side)."""
    long_side = max(height, width)
    out = torch.zeros(len(rles), res, res, dtype=torch.uint8)
    for i, rle in enumerate(rles):
        m = torch.zeros(1, 1, long_side, long_side)
        m[0, 0, :height, :width] = torch.from_numpy(mask_utils.decode(rle).astype(np.float32))
        cov = F.adaptive_avg_pool2d(m, res)[0, 0]
        out[i] = (cov * 255).round().to(torch.uint8)
    return out


def make_sample(
    inputs: ImageInputs, config: SamMiConfig, max_masks: int, gt: GroundTruth | None = None
) -> SamMiSample:
    """A sample from a cached image."""
    base = costagg_data.make_sample(inputs, config, gt)
    sample = SamMiSample(base=base, seed=image_seed(inputs.image_id))
    if config.uses_sam:
        if "sam_embed" not in inputs.image_arrays:
            raise ValueError(f"cache row {inputs.image_id} has no sam_embed; {SAM_FLAG}")
        sam = torch.from_numpy(np.ascontiguousarray(inputs.image_arrays["sam_embed"]))
        want = (config.sam_dim, config.sam_grid, config.sam_grid)
        if tuple(sam.shape) != want:
            raise ValueError(
                f"sam_embed of {inputs.image_id} is {tuple(sam.shape)}, the head expects {want}"
            )
        sample.sam_embed = sam.to(torch.float16)
    if config.stage == 2 and config.prompter == "grid":
        rles = inputs.first(max_masks).rles
        sample.masks = frame_coverage(rles, base.height, base.width, config.mask_res)
    if gt is not None:
        label_map = semantic_label_map(gt, base.height, base.width)
        for mirrored in (False, True):
            lm = np.ascontiguousarray(label_map[:, ::-1]) if mirrored else label_map
            labels = grid_labels(lm, config.grid_size)
            target = tspp_targets(labels, config.g_p, config.m_p)
            suffix = "_mirrored" if mirrored else ""
            setattr(sample, "grid_labels" + suffix, torch.from_numpy(labels))
            setattr(sample, "target" + suffix, torch.from_numpy(target))
    return sample


def flip_sample(s: SamMiSample) -> SamMiSample:
    """The horizontally mirrored sample: costagg's maps and labels, the SAM embedding and the
    proposal masks mirrored about the image's centre line (the SAM embedding of a mirrored image
    is only approximately the mirrored embedding: SAM's encoder is not flip-equivariant; PosSAM's
    samples make the same approximation), and the mirrored image's TSPP labels and targets."""
    h, w = s.height, s.width
    return replace(
        s,
        base=costagg_data.flip_sample(s.base),
        sam_embed=None if s.sam_embed is None else mirror_frame_map(s.sam_embed, h, w),
        masks=None
        if s.masks is None
        else mirror_frame_map(s.masks.float(), h, w).round().to(torch.uint8),
        grid_labels=s.grid_labels_mirrored,
        grid_labels_mirrored=s.grid_labels,
        target=s.target_mirrored,
        target_mirrored=s.target,
    )


def collate(
    samples: Sequence[SamMiSample], text_embed: Tensor, config: SamMiConfig, device
) -> dict:
    """The module's keyword arguments (costagg's, the sizes, the seeds and the SAM inputs)."""
    samples = list(samples)
    batch = costagg_data.collate([s.base for s in samples], text_embed, device)
    batch["sizes"] = torch.tensor([[s.height, s.width] for s in samples], device=device)
    batch["seeds"] = torch.tensor(
        [(s.seed + config.point_seed) % (1 << 62) for s in samples], dtype=torch.long
    )
    if config.uses_sam:
        batch["sam_embed"] = torch.stack([s.sam_embed for s in samples]).to(device).float()
    if config.stage == 2 and config.prompter == "grid":
        n = max(s.masks.shape[0] for s in samples)
        r = config.mask_res
        masks = torch.zeros(len(samples), n, r, r)
        valid = torch.zeros(len(samples), n, dtype=torch.bool)
        for i, s in enumerate(samples):
            masks[i, : s.masks.shape[0]] = s.masks.float() / 255.0
            valid[i, : s.masks.shape[0]] = True
        batch["masks"] = masks.to(device)
        batch["mask_valid"] = valid.to(device)
    return batch


def stack_grid_targets(samples: Sequence[SamMiSample], device) -> tuple[Tensor, Tensor]:
    """(B, g, g) int64 grid labels and (B, g, g) float TSPP targets of training samples."""
    labels, targets = [], []
    for s in samples:
        if s.grid_labels is None or s.target is None:
            raise ValueError(f"sample {s.image_id} has no training targets (built without gt)")
        labels.append(s.grid_labels)
        targets.append(s.target)
    return (
        torch.stack(labels).to(device=device, dtype=torch.long),
        torch.stack(targets).to(device=device, dtype=torch.float32),
    )
