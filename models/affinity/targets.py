"""Ground-truth affinity for SAM-CP (section 3.2.3, appendix A.2, table 7).

Everything here works on COCO RLEs through pycocotools and never decodes a full-resolution GT mask:

- `G[k, n] = 1[min(IoP_box, IoP_mask) >= tau]` with IoP = |patch ∩ GT| / |patch| (box and mask).
- Patches with `ignore_low <= min IoP < tau` are ignored (neither positive nor negative) for the
  Type-II rows (the official assigner's `neg_iou_thr=0.5`, `pos_iou_thr=0.8`).
- Low-quality matching, as the official `PartAssignerPlus` does it: a patch whose IoU with the GT
  exceeds both `low_quality_iou` (0.5) and the best IoU among the GT's current positive patches also
  becomes positive. A GT with no IoP-positive patch therefore gets every patch with IoU > 0.5; a GT
  whose positives are small parts also gets a bigger patch that matches it better. The IoU is the
  box IoU by default (the official `low_quality_add_segm=False`).
- Type-I (semantic) rows are computed against the union mask of the class (and its box), without an
  ignore band and without low-quality matching (as in the official code).

`patch_mask_crops` prepares the model's MaskRoI input (RoI-aligned crops of the patch masks); it is
a data-loader helper and the only function here that decodes masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torch import Tensor
from torchvision.ops import roi_align

from .config import AffinityConfig

Rle = dict


@dataclass
class ImageTargets:
    """Supervision for one image, P patches, G instance GTs, K classes.

    Attributes:
        inst_labels: (G,) long class index of each Type-II GT (thing, non-crowd segments).
        inst_pos: (G, P) bool, the matrix G of section 3.2.3.
        inst_ignore: (G, P) bool, patches in the ignore band (never also positive).
        inst_boxes: (G, 4) float xyxy box of each GT, normalised by the image (W, H).
        inst_usable: (G,) bool, False when no patch composes the GT (no positive, or the union box of
            its positives has IoU <= min_usable_box_iou with the GT box); a query matched to such a
            GT is ignored (official `ignore_flag`).
        sem_pos: (K, P) bool, Type-I rows (class union masks).
        sem_ignore: (K, P) bool.
        sem_present: (K,) bool, the class occurs in the image (crowd regions included).
    """

    inst_labels: Tensor
    inst_pos: Tensor
    inst_ignore: Tensor
    inst_boxes: Tensor
    inst_usable: Tensor
    sem_pos: Tensor
    sem_ignore: Tensor
    sem_present: Tensor

    def to(self, device: torch.device | str) -> ImageTargets:
        return ImageTargets(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_patches(self) -> int:
        return int(self.sem_pos.shape[1])


def _as_matrix(x: object, rows: int, cols: int) -> np.ndarray:
    """pycocotools returns [] for empty inputs; give every result its (rows, cols) shape."""
    if rows == 0 or cols == 0:
        return np.zeros((rows, cols), dtype=np.float64)
    out = np.asarray(x, dtype=np.float64).reshape(rows, cols)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def box_iop(patch_boxes_xywh: np.ndarray, gt_boxes_xywh: np.ndarray) -> np.ndarray:
    """(G, P) |patch box ∩ GT box| / |patch box| (XYWH boxes; 0 for an empty patch box)."""
    p = np.asarray(patch_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    g = np.asarray(gt_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    # pycocotools' crowd IoU is intersection over the area of the first argument.
    return _as_matrix(mask_utils.iou(p, g, [1] * len(g)), len(p), len(g)).T


def mask_iop(patch_rles: Sequence[Rle], gt_rles: Sequence[Rle]) -> np.ndarray:
    """(G, P) |patch ∩ GT| / |patch| on RLEs."""
    return _as_matrix(
        mask_utils.iou(list(patch_rles), list(gt_rles), [1] * len(gt_rles)),
        len(patch_rles),
        len(gt_rles),
    ).T


def box_iou(patch_boxes_xywh: np.ndarray, gt_boxes_xywh: np.ndarray) -> np.ndarray:
    """(G, P) box IoU."""
    p = np.asarray(patch_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    g = np.asarray(gt_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    return _as_matrix(mask_utils.iou(p, g, [0] * len(g)), len(p), len(g)).T


def mask_iou(patch_rles: Sequence[Rle], gt_rles: Sequence[Rle]) -> np.ndarray:
    """(G, P) mask IoU on RLEs."""
    return _as_matrix(
        mask_utils.iou(list(patch_rles), list(gt_rles), [0] * len(gt_rles)),
        len(patch_rles),
        len(gt_rles),
    ).T


def gt_affinity(
    iop_box: np.ndarray,
    iop_mask: np.ndarray,
    iou: np.ndarray | None,
    *,
    tau: float = 0.8,
    ignore_low: float | None = 0.5,
    low_quality_iou: float | None = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """The matching matrix G and its ignore mask from precomputed overlaps (all (G, P)).

    Args:
        iop_box: box IoP of every (GT, patch) pair.
        iop_mask: mask IoP of every pair.
        iou: the IoU used for low-quality matching, or None to disable it.
        tau: positive threshold on min(iop_box, iop_mask) (section 3.2.3: 0.8).
        ignore_low: lower end of the ignore band [ignore_low, tau); None disables the band.
        low_quality_iou: IoU a low-quality positive must exceed; None disables low-quality matching.

    Returns:
        (pos, ignore): two (G, P) bool arrays, disjoint.
    """
    overlap = np.minimum(
        np.asarray(iop_box, dtype=np.float64), np.asarray(iop_mask, dtype=np.float64)
    )
    pos = overlap >= tau
    if ignore_low is None:
        ignore = np.zeros_like(pos)
    else:
        ignore = (overlap >= ignore_low) & ~pos
    if iou is not None and low_quality_iou is not None and pos.size:
        iou = np.asarray(iou, dtype=np.float64)
        best_pos_iou = np.where(pos, iou, 0.0).max(axis=1, keepdims=True)
        pos = pos | ((iou > best_pos_iou) & (iou > low_quality_iou))
        ignore = ignore & ~pos
    return pos, ignore


def _union_boxes_xyxy(pos: np.ndarray, patch_xyxy: np.ndarray) -> np.ndarray:
    """(G, 4) union box of each row's positive patches (zeros for an empty row)."""
    out = np.zeros((pos.shape[0], 4), dtype=np.float64)
    for g in range(pos.shape[0]):
        sel = patch_xyxy[pos[g]]
        if len(sel):
            out[g] = [sel[:, 0].min(), sel[:, 1].min(), sel[:, 2].max(), sel[:, 3].max()]
    return out


def _xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def _paired_box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, :2], b[:, :2])
    rb = np.minimum(a[:, 2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def build_image_targets(
    patch_rles: Sequence[Rle],
    patch_boxes_xywh: np.ndarray,
    gt_rles: Sequence[Rle],
    gt_labels: Sequence[int],
    gt_iscrowd: Sequence[bool],
    thing_classes: Sequence[bool],
    image_size: tuple[int, int],
    config: AffinityConfig,
) -> ImageTargets:
    """All supervision of one image from RLEs.

    Args:
        patch_rles: P COCO RLEs of the cached patches (original image size).
        patch_boxes_xywh: (P, 4) patch boxes, XYWH original pixels (pycocotools.mask.toBbox).
        gt_rles: S GT segments (panoptic segments or instance masks) as COCO RLEs.
        gt_labels: (S,) contiguous class index 0..K-1 of each segment.
        gt_iscrowd: (S,) crowd flags; crowd segments join the Type-I union of their class but are
            never Type-II targets.
        thing_classes: (K,) True for thing classes; only non-crowd thing segments are Type-II GTs.
        image_size: (H, W) original size.
        config: thresholds (tau, ignore band, low-quality matching).

    Returns:
        ImageTargets on the CPU.
    """
    num_classes = len(thing_classes)
    thing = np.asarray(thing_classes, dtype=bool)
    labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    crowd = np.asarray(gt_iscrowd, dtype=bool).reshape(-1)
    if len(labels) != len(gt_rles) or len(crowd) != len(gt_rles):
        raise ValueError("gt_rles, gt_labels and gt_iscrowd must have the same length")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"gt_labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    patch_rles = list(patch_rles)
    num_patches = len(patch_rles)
    patch_xywh = np.asarray(patch_boxes_xywh, dtype=np.float64).reshape(num_patches, 4)
    patch_xyxy = _xywh_to_xyxy(patch_xywh)
    h, w = image_size
    scale = np.array([w, h, w, h], dtype=np.float64)

    # Type-II: non-crowd segments of thing classes.
    inst = [i for i in range(len(labels)) if thing[labels[i]] and not crowd[i]]
    inst_rles = [gt_rles[i] for i in inst]
    inst_xywh = (
        np.asarray(mask_utils.toBbox(inst_rles), dtype=np.float64).reshape(-1, 4)
        if inst_rles
        else np.zeros((0, 4))
    )
    iop_b = box_iop(patch_xywh, inst_xywh)
    iop_m = mask_iop(patch_rles, inst_rles)
    lq_iou = None
    if config.low_quality_match:
        kind = config.low_quality_iou_kind
        if kind == "box":
            lq_iou = box_iou(patch_xywh, inst_xywh)
        elif kind == "mask":
            lq_iou = mask_iou(patch_rles, inst_rles)
        else:
            lq_iou = np.minimum(box_iou(patch_xywh, inst_xywh), mask_iou(patch_rles, inst_rles))
    pos, ignore = gt_affinity(
        iop_b,
        iop_m,
        lq_iou,
        tau=config.tau,
        ignore_low=config.ignore_low,
        low_quality_iou=config.low_quality_iou if config.low_quality_match else None,
    )
    inst_xyxy = _xywh_to_xyxy(inst_xywh)
    union = _union_boxes_xyxy(pos, patch_xyxy)
    usable = pos.any(axis=1) & (_paired_box_iou(union, inst_xyxy) > config.min_usable_box_iou)

    # Type-I: one row per class against the union of its segments.
    sem_pos = np.zeros((num_classes, num_patches), dtype=bool)
    sem_ignore = np.zeros((num_classes, num_patches), dtype=bool)
    present = np.zeros(num_classes, dtype=bool)
    classes = sorted(set(labels.tolist()))
    if classes:
        unions = [
            mask_utils.merge([gt_rles[i] for i in np.flatnonzero(labels == c)], intersect=False)
            for c in classes
        ]
        u_xywh = np.asarray(mask_utils.toBbox(unions), dtype=np.float64).reshape(-1, 4)
        s_pos, s_ign = gt_affinity(
            box_iop(patch_xywh, u_xywh),
            mask_iop(patch_rles, unions),
            None,
            tau=config.tau,
            ignore_low=config.ignore_low if config.semantic_ignore_band else None,
            low_quality_iou=None,
        )
        sem_pos[classes] = s_pos
        sem_ignore[classes] = s_ign
        present[classes] = True

    return ImageTargets(
        inst_labels=torch.as_tensor(labels[inst], dtype=torch.long),
        inst_pos=torch.as_tensor(pos, dtype=torch.bool).reshape(len(inst), num_patches),
        inst_ignore=torch.as_tensor(ignore, dtype=torch.bool).reshape(len(inst), num_patches),
        inst_boxes=torch.as_tensor(inst_xyxy / scale, dtype=torch.float32).reshape(len(inst), 4),
        inst_usable=torch.as_tensor(usable, dtype=torch.bool).reshape(len(inst)),
        sem_pos=torch.as_tensor(sem_pos),
        sem_ignore=torch.as_tensor(sem_ignore),
        sem_present=torch.as_tensor(present),
    )


def patch_mask_crops(
    patch_rles: Sequence[Rle], patch_boxes_xywh: np.ndarray, size: int, chunk: int = 32
) -> Tensor:
    """(P, size, size) float RoI-aligned crops of the patch masks inside their own boxes.

    The same `roi_align(aligned=True)` convention as the model's MaskRoI, so crop cell (i, j) covers
    the same part of the box as RoI feature cell (i, j). Values are the mask's coverage in [0, 1].
    Decodes at most `chunk` masks at a time.
    """
    patch_rles = list(patch_rles)
    out = torch.zeros((len(patch_rles), size, size), dtype=torch.float32)
    boxes = torch.as_tensor(_xywh_to_xyxy(np.asarray(patch_boxes_xywh)), dtype=torch.float32)
    for start in range(0, len(patch_rles), chunk):
        part = patch_rles[start : start + chunk]
        masks = mask_utils.decode(part)  # (H, W, n) uint8
        masks = torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1))).float()[:, None]
        n = masks.shape[0]
        rois = torch.cat(
            [torch.arange(n, dtype=torch.float32)[:, None], boxes[start : start + n]], dim=1
        )
        out[start : start + n] = roi_align(
            masks, rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )[:, 0]
    return out
