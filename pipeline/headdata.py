"""From cache rows to head inputs: per-image samples, horizontal flip, batching.

Shared by training and prediction, so both see patches exactly the same way. Everything here works on
cached arrays and RLEs; full-resolution masks are decoded only to make the small RoI mask crops and
(for training) the ground-truth affinities, once per image.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, replace

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from samcp.models.affinity import (
    AffinityConfig,
    ImageTargets,
    build_image_targets,
    patch_mask_crops,
)
from samcp.pipeline.cache import CachedImage
from samcp.pipeline.errors import SamcpError


@dataclass
class GroundTruth:
    """One image's panoptic ground truth as RLEs (contiguous class indices)."""

    rles: list[dict]
    labels: np.ndarray  # (S,) int64 contiguous class index
    iscrowd: np.ndarray  # (S,) bool


@dataclass
class HeadSample:
    """One image ready for the head (CPU tensors)."""

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


class ClassSpace:
    """The training classes as a contiguous class index (the order of the text embeddings).

    Args:
        categories: The training classes' dataset categories (``id``, ``name``, ``isthing``), in
            class-index order.
        void_ids: Dataset category ids that are not training classes (open-vocabulary training
            on a subset): their ground-truth segments are void, i.e. left out of the targets, as
            COCO leaves ADE20K-only classes unlabelled.
    """

    def __init__(self, categories: list[dict], void_ids: Collection[int] = ()) -> None:
        self.categories = list(categories)
        self.ids = [int(c["id"]) for c in self.categories]
        self.index = {cid: i for i, cid in enumerate(self.ids)}
        self.isthing = np.array([bool(c.get("isthing", 1)) for c in self.categories])
        self.names = [str(c["name"]) for c in self.categories]
        self.void_ids = frozenset(int(i) for i in void_ids)
        if self.void_ids & set(self.ids):
            raise ValueError("a category cannot be both a class and void")

    def __len__(self) -> int:
        return len(self.ids)


def ground_truth_rles(id_map: np.ndarray, segments: list[dict], classes: ClassSpace) -> GroundTruth:
    """Panoptic PNG ids + segments_info -> per-segment RLEs, labels and crowd flags.

    Segments of ``classes.void_ids`` are dropped (their pixels are void); any other category that
    is not a class is an error.
    """
    rles, labels, crowd = [], [], []
    for seg in segments:
        if int(seg["category_id"]) in classes.void_ids:
            continue
        m = id_map == seg["id"]
        if not m.any():
            continue
        if int(seg["category_id"]) not in classes.index:
            raise SamcpError(
                f"ground-truth category {seg['category_id']} is not in the class list; "
                "train with the dataset's own categories"
            )
        rles.append(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
        labels.append(classes.index[int(seg["category_id"])])
        crowd.append(bool(seg.get("iscrowd", 0)))
    return GroundTruth(rles, np.asarray(labels, np.int64), np.asarray(crowd, bool))


def make_sample(
    row: CachedImage,
    config: AffinityConfig,
    max_patches: int,
    gt: GroundTruth | None = None,
    classes: ClassSpace | None = None,
) -> HeadSample:
    """A HeadSample from a cache row (first ``max_patches`` patches in cache order)."""
    missing = [lv for lv in config.clip_levels if lv not in row.image_arrays]
    if missing:
        raise SamcpError(
            f"cache row {row.image_id} has no {', '.join(missing)}; run precompute with CLIP "
            "features (--clip-checkpoint) and the levels the head uses"
        )
    n = min(len(row.proposals), max_patches)
    rles = row.proposals.coco_rles()[:n]
    boxes = np.asarray(row.proposals.bbox[:n], np.float32)
    emb = row.mask_arrays.get("clip_mask_embed")
    sample = HeadSample(
        image_id=row.image_id,
        height=row.height,
        width=row.width,
        clip_feats={
            lv: torch.from_numpy(np.asarray(row.image_arrays[lv])) for lv in config.clip_levels
        },
        patch_rles=rles,
        patch_boxes=torch.from_numpy(boxes),
        patch_masks=patch_mask_crops(rles, boxes, config.roi_size)
        if n
        else torch.zeros(0, config.roi_size, config.roi_size),
        patch_clip_embed=None if emb is None else torch.from_numpy(np.asarray(emb[:n])),
        patch_areas=torch.from_numpy(np.asarray(row.proposals.area[:n], np.float32)),
    )
    if gt is not None:
        assert classes is not None
        sample.targets = build_image_targets(
            rles,
            boxes,
            gt.rles,
            gt.labels,
            gt.iscrowd,
            classes.isthing,
            (row.height, row.width),
            config,
        )
    return sample


def flip_sample(s: HeadSample, input_size: int) -> HeadSample:
    """The horizontally mirrored sample: features, boxes, mask crops and targets together.

    GT affinities (IoP between patches and segments) do not change under a mirror of both, so
    targets only need their boxes mirrored. The dense maps hold the image top-left in a padded
    square; they are mirrored about the image's own vertical centre line (bilinear when the
    image edge falls inside a cell), not about the padded square's.
    """
    scale = input_size / max(s.height, s.width)
    feats = {}
    for name, f in s.clip_feats.items():
        stride = input_size / f.shape[-1]
        feats[name] = _mirror_columns(f, s.width * scale / stride)
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


def _mirror_columns(f: Tensor, content_width: float) -> Tensor:
    """Mirror (C, h, w) about x = content_width / 2 (in cells); columns past the content stay 0.

    Cell j (centre j + 0.5) takes the value at c - (j + 0.5), i.e. source index c - j - 1, linearly
    interpolated between neighbouring cells.
    """
    w = f.shape[-1]
    out = torch.zeros_like(f)
    n = min(w, math.ceil(content_width))
    if n <= 0:
        return out
    src = content_width - torch.arange(n, dtype=torch.float64) - 1.0
    lo = src.floor().clamp(0, w - 1)
    t = (src - lo).clamp(0, 1).to(torch.float32)
    lo = lo.long()
    hi = (lo + 1).clamp(max=w - 1)
    ff = f.float()
    out[..., :n] = (ff[..., lo] * (1 - t) + ff[..., hi] * t).to(f.dtype)
    return out


def collate(samples: list[HeadSample], text_embed: Tensor, device: torch.device | str) -> dict:
    """The head's batch dict (samcp.models.affinity.BATCH_KEYS), padded to the largest P."""
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
    return {
        "clip_feats": {
            lv: torch.stack([s.clip_feats[lv] for s in samples]).to(device).float() for lv in levels
        },
        "image_sizes": torch.tensor([[s.height, s.width] for s in samples], device=device),
        "patch_boxes": boxes.to(device),
        "patch_masks": masks.to(device),
        "patch_valid": valid.to(device),
        "text_embed": text_embed.to(device).float(),
    }
