"""PosSAM supervision from RLEs, and masks moved between the image and the cache's square frame.

Proposal path (``mask_source="proposals"``, ours; the paper trains its own decoder's masks):

* class target of a proposal: the label of the ground-truth segment with the highest mask IoU if
  that IoU >= ``match_iou`` (0.5: in a panoptic ground truth the segments do not overlap, so above
  0.5 a proposal matches at most one segment, as in PQ's matching), else void;
* a proposal whose best match is a crowd segment with IoU >= ``match_iou`` is ignored in the class
  loss (it is a good mask of a region whose class is known but whose instances are not, so
  neither the class nor void is right for it);
* IoU target: the best IoU with any non-crowd segment, 0 when the image has none. This is what the
  IoU head estimates at inference ("the IoU score between predicted binary masks and their
  corresponding ground truths", sec. 3.3), with the best-matching segment as the corresponding one.
* a proposal lying mostly (> ``iou_void_ignore``, 0.5) on void pixels, which no segment covers, is
  left out of the IoU loss: void means *unannotated* (COCO's unlabelled regions, the unseen
  classes of an open-vocabulary split), so a good mask there would otherwise learn "IoU 0" and
  MASE, which weighs every class score by the predicted IoU, would suppress exactly the objects of
  unseen classes.

Decoder path (``mask_source="decoder"``): the non-crowd segments as binary masks on the stride-4
mask grid of the frame, plus their labels (Mask2Former's panoptic mapper drops crowd segments).

Frame geometry: an image of size (H, W) sits at the top-left of a square of side L = max(H, W);
a ``grid``-sided map of the frame has cells of L / grid pixels. :func:`frame_coverage` gives the
exact fraction of each cell covered by a mask (separable area resampling), :func:`frame_to_image`
the way back (bilinear at pixel centres).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from torch import Tensor

Rle = dict

#: label of a void (unmatched) proposal in ProposalTargets.labels
VOID = -1


@dataclass
class ProposalTargets:
    """Supervision of N proposals.

    Attributes:
        labels: (N,) long class index, ``VOID`` (-1) for void.
        ignore: (N,) bool, left out of the class loss (best match is a crowd segment).
        iou: (N,) float32 best IoU with a non-crowd segment.
        iou_known: (N,) bool, False for a proposal lying mostly on unannotated (void) pixels:
            its quality is unknown, so it is left out of the IoU loss.
    """

    labels: Tensor
    ignore: Tensor
    iou: Tensor
    iou_known: Tensor

    def to(self, device) -> ProposalTargets:
        return ProposalTargets(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def flip(self) -> ProposalTargets:
        """Targets of the mirrored sample: IoUs and labels are flip-invariant."""
        return self


@dataclass
class MaskTargets:
    """Supervision of the decoder path: S non-crowd segments on the frame's mask grid.

    Attributes:
        masks: (S, G4, G4) bool, coverage >= 0.5 of each cell of the stride-4 frame grid.
        labels: (S,) long class index.
    """

    masks: Tensor
    labels: Tensor

    def to(self, device) -> MaskTargets:
        return MaskTargets(self.masks.to(device), self.labels.to(device))


def mask_iou_matrix(a: Sequence[Rle], b: Sequence[Rle]) -> np.ndarray:
    """(len(a), len(b)) mask IoU of RLEs at the same image size (pycocotools, no crowd rule)."""
    a, b = list(a), list(b)
    if not a or not b:
        return np.zeros((len(a), len(b)), np.float64)
    out = np.asarray(mask_utils.iou(a, b, [0] * len(b)), np.float64).reshape(len(a), len(b))
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def proposal_targets(
    proposal_rles: Sequence[Rle],
    gt_rles: Sequence[Rle],
    gt_labels: np.ndarray,
    gt_iscrowd: np.ndarray,
    match_iou: float = 0.5,
    iou_void_ignore: float = 0.5,
) -> ProposalTargets:
    """Class and IoU targets of the proposals (rule in the module docstring).

    Args:
        proposal_rles: N COCO RLEs at the image size.
        gt_rles: S ground-truth segments, RLEs at the image size.
        gt_labels: (S,) contiguous class index.
        gt_iscrowd: (S,) bool.
        match_iou: a proposal matches its best segment when their IoU >= this.
        iou_void_ignore: a proposal with more than this fraction of its area on pixels no
            segment covers (void: unannotated, e.g. the unseen classes of an open-vocabulary
            split) is left out of the IoU loss; 1 keeps every proposal.
    """
    labels_in = np.asarray(gt_labels, np.int64).reshape(-1)
    crowd = np.asarray(gt_iscrowd, bool).reshape(-1)
    if len(labels_in) != len(gt_rles) or len(crowd) != len(gt_rles):
        raise ValueError("gt_rles, gt_labels and gt_iscrowd must have the same length")
    n = len(proposal_rles)
    iou = mask_iou_matrix(proposal_rles, gt_rles)  # (N, S)
    labels = np.full(n, VOID, np.int64)
    ignore = np.zeros(n, bool)
    best_iou = np.zeros(n, np.float32)
    if iou.shape[1]:
        best = iou.argmax(axis=1)
        hit = iou[np.arange(n), best] >= match_iou
        ignore = hit & crowd[best]
        take = hit & ~crowd[best]
        labels[take] = labels_in[best[take]]
        if (~crowd).any():
            best_iou = iou[:, ~crowd].max(axis=1).astype(np.float32)
    known = np.ones(n, bool)
    if n and iou_void_ignore < 1.0:
        if gt_rles:
            union = mask_utils.merge(list(gt_rles), intersect=0)
            # iscrowd=1 makes pycocotools' "iou" the fraction of each proposal inside the union.
            inside = np.asarray(mask_utils.iou(list(proposal_rles), [union], [1]))
            inside = inside.reshape(n)
        else:
            inside = np.zeros(n)
        known = (1.0 - inside) <= iou_void_ignore
    return ProposalTargets(
        labels=torch.from_numpy(labels),
        ignore=torch.from_numpy(ignore),
        iou=torch.from_numpy(best_iou),
        iou_known=torch.from_numpy(known),
    )


def _area_weights(length: int, side: int, grid: int) -> np.ndarray:
    """(grid, length): fraction of frame cell i covered by image pixel x (pixels of a square of
    ``side`` pixels, cells of side / grid pixels; pixels past ``length`` are padding)."""
    cell = side / grid
    edges = np.arange(grid + 1, dtype=np.float64) * cell
    px = np.arange(length, dtype=np.float64)
    lo = np.maximum(edges[:-1, None], px[None])
    hi = np.minimum(edges[1:, None], px[None] + 1.0)
    return (np.clip(hi - lo, 0.0, None) / cell).astype(np.float32)


def frame_coverage(
    rles: Sequence[Rle], height: int, width: int, grid: int, chunk: int = 32
) -> Tensor:
    """(n, grid, grid) float32: the fraction of each frame cell covered by each mask.

    The image is placed at the top-left of a square of side max(height, width) and area-downsampled
    to grid x grid exactly (a cell straddling pixels takes their overlap-weighted share), so
    ``coverage.sum() * (L / grid)**2`` is the mask's pixel area.
    """
    rles = list(rles)
    out = torch.zeros(len(rles), grid, grid)
    if not rles:
        return out
    side = max(height, width)
    rows = torch.from_numpy(_area_weights(height, side, grid))  # (g, H)
    cols = torch.from_numpy(_area_weights(width, side, grid))  # (g, W)
    for start in range(0, len(rles), chunk):
        dec = mask_utils.decode(rles[start : start + chunk])  # (H, W, n) uint8
        if dec.ndim == 2:
            dec = dec[..., None]
        m = torch.from_numpy(np.ascontiguousarray(dec.transpose(2, 0, 1))).float()
        out[start : start + m.shape[0]] = rows @ m @ cols.t()
    return out


def frame_to_image(maps: Tensor, height: int, width: int, chunk: int = 16) -> Tensor:
    """(n, height, width) float: frame maps (n, g, g) sampled bilinearly at the image's pixel
    centres (the image is the top-left height x width of the frame's max(height, width) side)."""
    n, g = maps.shape[0], maps.shape[-1]
    side = max(height, width)
    ys = (torch.arange(height, device=maps.device, dtype=torch.float32) + 0.5) / side * 2 - 1
    xs = (torch.arange(width, device=maps.device, dtype=torch.float32) + 0.5) / side * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
    out = torch.empty(n, height, width, device=maps.device)
    for s in range(0, n, chunk):
        part = maps[s : s + chunk].float().reshape(-1, 1, g, g)
        gr = grid[None].expand(part.shape[0], -1, -1, -1)
        out[s : s + part.shape[0]] = F.grid_sample(
            part, gr, mode="bilinear", padding_mode="border", align_corners=False
        )[:, 0]
    return out


def encode_masks(masks: Tensor) -> list[Rle]:
    """COCO RLEs (``counts`` bytes, as the cache's) of (n, H, W) bool masks."""
    if masks.shape[0] == 0:
        return []
    arr = np.asfortranarray(masks.to(torch.uint8).cpu().numpy().transpose(1, 2, 0))
    return list(mask_utils.encode(arr))


def frame_logits_to_rles(logits: Tensor, height: int, width: int, chunk: int = 16) -> list[Rle]:
    """RLEs at (height, width) of frame mask logits (n, g, g) binarised at 0, ``chunk`` masks at
    a time (so n full-size float masks never exist at once)."""
    rles: list[Rle] = []
    for s in range(0, logits.shape[0], chunk):
        rles += encode_masks((frame_to_image(logits[s : s + chunk], height, width) > 0).cpu())
    return rles


def mask_targets(
    gt_rles: Sequence[Rle],
    gt_labels: np.ndarray,
    gt_iscrowd: np.ndarray,
    height: int,
    width: int,
    grid: int,
) -> MaskTargets:
    """The decoder path's targets: non-crowd segments as bool masks on the frame's ``grid``."""
    labels = np.asarray(gt_labels, np.int64).reshape(-1)
    crowd = np.asarray(gt_iscrowd, bool).reshape(-1)
    keep = [i for i in range(len(labels)) if not crowd[i]]
    cov = frame_coverage([gt_rles[i] for i in keep], height, width, grid)
    return MaskTargets(masks=cov >= 0.5, labels=torch.from_numpy(labels[keep].copy()))
