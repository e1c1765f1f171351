"""Training augmentation the cache allows: random rescaling and cropping of an affinity sample.

The paper trains with DETR's multi-scale resize and crop (appendix B.1; the authors' config
``samcp_r50_12e_panoptic_ms_crop_improved_param.py``: a random choice between resizing the image to
a short side of 480-800 and resize -> random crop of 384-600 px -> resize to 480-800). The cached
features exist at one geometry only, so samcp does the same on what the cache holds:

1. **Window**: with probability ``crop_prob`` a random crop keeping a fraction in
   ``[crop_min, 1]`` of each side (drawn per axis, at a random integer offset), else the whole
   image.
2. **Scale**: the window becomes an image whose longer side fills ``r`` of the CLIP frame,
   ``r ~ U(scale_range)`` (1 = the test geometry, where an image fills the frame; the paper's
   480-800 short sides against its 800 test side are ``(0.6, 1.0)``). It is held as an image of
   ``round(window / r)`` pixels with the window at its top-left, the rest blank, so every head
   convention (boxes in image pixels, image resized so its longer side is the frame) is unchanged.
3. The dense maps are resampled bilinearly into that image's frame
   (:func:`samcp.models.frames.crop_frame_map`); patch boxes and GT instance boxes are shifted into
   the window and clipped to it; patch mask crops of patches cut by the window are re-cropped to
   the kept part of their box (RoIAlign on the 7 x 7 crop, as the authors' ``crop_and_resize``).

What is kept (the authors' ``RandomCrop`` on proposals and GT, ``mmdet/datasets/transforms``):

- a **patch** is kept when its clipped box has a positive area and, if the window cuts it, its
  re-cropped mask still has a cell at least half covered (their RoI masks are binarised at 0.5 and a
  patch whose crop becomes empty is dropped); patches entirely inside keep their crop unchanged;
- a **GT instance** is kept when its clipped box has a positive area;
- **GT affinities** are the full image's, restricted to the kept patches and instances: the authors
  load offline overlaps of the whole image and index them with the kept ids
  (``PartAssignerPlus.assign``, ``SamCPHead``'s semantic targets), so IoP is never recomputed on the
  crop. ``inst_usable`` is recomputed with the same rule on the cropped boxes (a GT whose kept
  positives no longer compose its clipped box is ignored);
- if no patch survives a window, the image is used uncropped (same scale).

RLEs, per-patch CLIP embeddings and areas are subset, not cropped: they are inference inputs, and
predictions are never made on augmented samples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align

from ..frames import crop_frame_map
from .config import AffinityConfig
from .data import AffinitySample
from .targets import _paired_box_iou, _union_boxes_xyxy


@dataclass(frozen=True)
class ScaleCrop:
    """One drawn augmentation: ``window`` (x0, y0, w, h) in the sample's pixels, shown as an image
    of ``size`` = (height, width) pixels with the window at its top-left."""

    window: tuple[int, int, int, int]
    size: tuple[int, int]

    def is_identity(self, height: int, width: int) -> bool:
        return self.window == (0, 0, width, height) and self.size == (height, width)


def draw_scale_crop(
    rng: np.random.Generator, height: int, width: int, config: AffinityConfig
) -> ScaleCrop:
    """The random window and scale of one image (a pure function of the generator's state)."""
    x0, y0, w, h = 0, 0, width, height
    if rng.random() < config.crop_prob:
        fh, fw = rng.uniform(config.crop_min, 1.0, size=2)
        h = int(min(height, max(1, round(fh * height))))
        w = int(min(width, max(1, round(fw * width))))
        y0 = int(rng.integers(0, height - h + 1))
        x0 = int(rng.integers(0, width - w + 1))
    lo, hi = config.scale_range
    r = float(rng.uniform(lo, hi)) if hi > lo else float(hi)
    size = (max(h, round(h / r)), max(w, round(w / r)))
    return ScaleCrop((x0, y0, w, h), size)


def _recrop_masks(masks: Tensor, frac: Tensor) -> Tensor:
    """(N, R, R) crops resampled to the sub-box ``frac`` (N, 4) = xyxy fractions of their box."""
    r = masks.shape[-1]
    rois = torch.cat([torch.arange(len(masks), dtype=torch.float32)[:, None], frac * r], dim=1)
    return roi_align(
        masks[:, None].float(),
        rois,
        output_size=r,
        spatial_scale=1.0,
        sampling_ratio=2,
        aligned=True,
    )[:, 0]


def scale_crop_sample(
    s: AffinitySample, aug: ScaleCrop, config: AffinityConfig
) -> tuple[AffinitySample, Tensor]:
    """The sample seen through ``aug``; also the indices of the kept patches (into ``s``)."""
    if aug.is_identity(s.height, s.width):
        return s, torch.arange(s.num_patches)
    x0, y0, ww, wh = aug.window
    new_h, new_w = aug.size

    # Patches: shift into the window, clip, keep those with area (and mask) left.
    b = s.patch_boxes.double()
    xyxy = torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)
    shift = torch.tensor([x0, y0, x0, y0], dtype=torch.float64)
    lim = torch.tensor([ww, wh, ww, wh], dtype=torch.float64)
    moved = xyxy - shift
    clipped = torch.minimum(moved.clamp(min=0), lim)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    cut = keep & (clipped != moved).any(dim=1)
    masks = s.patch_masks.clone()
    if cut.any():
        span = (moved[cut, 2:] - moved[cut, :2]).clamp(min=1e-9).repeat(1, 2)
        frac = ((clipped[cut] - moved[cut, :2].repeat(1, 2)) / span).float()
        recropped = _recrop_masks(s.patch_masks[cut], frac).to(masks.dtype)
        masks[cut] = recropped
        alive = torch.ones_like(keep)
        alive[cut] = recropped.flatten(1).amax(dim=1) >= 0.5
        keep = keep & alive
    idx = keep.nonzero()[:, 0]
    if len(idx) == 0 and s.num_patches:
        # No patch left in the window: the whole image, at the drawn scale.
        r = max(ww, wh) / max(new_w, new_h)
        whole = ScaleCrop(
            (0, 0, s.width, s.height),
            (max(s.height, round(s.height / r)), max(s.width, round(s.width / r))),
        )
        if whole == aug:  # only patches without area: nothing to crop by
            return s, torch.arange(s.num_patches)
        return scale_crop_sample(s, whole, config)
    new_boxes = clipped[idx]
    patch_xywh = torch.cat([new_boxes[:, :2], new_boxes[:, 2:] - new_boxes[:, :2]], dim=1)

    feats = {
        name: crop_frame_map(f, (s.height, s.width), aug.window, aug.size)
        for name, f in s.clip_feats.items()
    }
    targets = s.targets
    if targets is not None:
        targets = _crop_targets(targets, idx, new_boxes, s, aug, config)
    emb = s.patch_clip_embed
    index = idx.tolist()
    out = replace(
        s,
        height=int(new_h),
        width=int(new_w),
        clip_feats=feats,
        patch_rles=[s.patch_rles[i] for i in index],
        patch_boxes=patch_xywh.float(),
        patch_masks=masks[idx],
        patch_clip_embed=None if emb is None else emb[idx],
        patch_areas=s.patch_areas[idx],
        targets=targets,
    )
    return out, idx


def _crop_targets(targets, idx: Tensor, patch_xyxy: Tensor, s: AffinitySample, aug, config):
    """Full-image GT affinities restricted to the kept patches and instances; boxes cropped."""
    x0, y0, ww, wh = aug.window
    new_h, new_w = aug.size
    old_scale = torch.tensor([s.width, s.height, s.width, s.height], dtype=torch.float64)
    gt = targets.inst_boxes.double() * old_scale - torch.tensor(
        [x0, y0, x0, y0], dtype=torch.float64
    )
    lim = torch.tensor([ww, wh, ww, wh], dtype=torch.float64)
    gt = torch.minimum(gt.clamp(min=0), lim)
    rows = ((gt[:, 2] > gt[:, 0]) & (gt[:, 3] > gt[:, 1])).nonzero()[:, 0]
    gt = gt[rows]
    pos = targets.inst_pos[rows][:, idx]
    union = _union_boxes_xyxy(pos.numpy(), patch_xyxy.numpy())
    usable = pos.any(dim=1).numpy() & (
        _paired_box_iou(union, gt.numpy()) > config.min_usable_box_iou
    )
    new_scale = torch.tensor([new_w, new_h, new_w, new_h], dtype=torch.float64)
    return replace(
        targets,
        inst_labels=targets.inst_labels[rows],
        inst_pos=pos,
        inst_ignore=targets.inst_ignore[rows][:, idx],
        inst_boxes=(gt / new_scale).to(targets.inst_boxes.dtype),
        inst_usable=torch.as_tensor(usable, dtype=torch.bool).reshape(len(rows)),
        sem_pos=targets.sem_pos[:, idx],
        sem_ignore=targets.sem_ignore[:, idx],
    )
