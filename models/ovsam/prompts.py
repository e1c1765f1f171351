"""Visual prompts of Open-Vocabulary SAM: sampled from the ground truth for training, read from the
user or from a mask for evaluation, and placed in the cache's square frames.

Training (the authors' ``OVSAMDataPreprocessor`` with ``use_point_det``, ``num_proposals=40``):
the image's instances are repeated until there are at least ``num_prompts`` and cut to
``num_prompts``; each gets a point drawn uniformly among its mask's pixels; the prompts are shuffled
and the first half become boxes (the instance's box), the second half points. Evaluation with
points (the paper's "mask center point", Table 1) uses the pixel farthest from the mask's border
(the code's ``get_center_coords``: argmax of the distance transform).

Frames: an image of size (H, W) sits at the top-left of a square of side max(H, W); SAM's input
frame and the CLIP input frame are that square scaled to ``sam_image_size`` and
``clip_input_size`` pixels (docs/cache-format.md), so a prompt in image pixels goes to either frame
by one factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils
from scipy.ndimage import distance_transform_edt

Rle = dict


@dataclass
class Prompts:
    """P visual prompts of one image, in original image pixels.

    Attributes:
        boxes: (P, 4) float32 XYXY; for a point prompt, its target's box (the code's RoI at
            training) or zeros when unknown.
        points: (P, 2) float32 (x, y); for a box prompt, the box centre (unused).
        is_box: (P,) bool, True for a box prompt, False for a point prompt.
        target: (P,) int64 index of the ground-truth segment each prompt was drawn from, -1 for
            a user prompt.
        roi_from_mask: (P,) bool, the recognition RoI of the prompt is the box of its predicted
            mask (point prompts at inference, the paper's rule); else ``boxes`` (box prompts, and
            point prompts in training, whose RoI is their segment's box as in the code).
    """

    boxes: np.ndarray
    points: np.ndarray
    is_box: np.ndarray
    target: np.ndarray
    roi_from_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.is_box.shape[0])

    @classmethod
    def from_user(
        cls, boxes: Sequence[Sequence[float]] = (), points: Sequence[Sequence[float]] = ()
    ) -> Prompts:
        """Box prompts (XYXY) then point prompts (x, y), as a user gives them."""
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        p = np.asarray(points, np.float32).reshape(-1, 2)
        centres = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)
        return cls(
            boxes=np.concatenate([b, np.zeros((len(p), 4), np.float32)]),
            points=np.concatenate([centres.astype(np.float32), p]),
            is_box=np.concatenate([np.ones(len(b), bool), np.zeros(len(p), bool)]),
            target=np.full(len(b) + len(p), -1, np.int64),
            roi_from_mask=np.concatenate([np.zeros(len(b), bool), np.ones(len(p), bool)]),
        )

    @classmethod
    def empty(cls) -> Prompts:
        return cls(
            np.zeros((0, 4), np.float32),
            np.zeros((0, 2), np.float32),
            np.zeros(0, bool),
            np.zeros(0, np.int64),
            np.zeros(0, bool),
        )


def rle_boxes_xyxy(rles: Sequence[Rle]) -> np.ndarray:
    """(n, 4) float32 XYXY boxes of RLEs (pycocotools' XYWH, converted)."""
    if not len(rles):
        return np.zeros((0, 4), np.float32)
    xywh = np.asarray(mask_utils.toBbox(list(rles)), np.float32).reshape(-1, 4)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)


def random_point_in_mask(rle: Rle, rng: np.random.Generator) -> np.ndarray:
    """(x, y) pixel centre of a pixel drawn uniformly from a non-empty mask."""
    ys, xs = np.nonzero(mask_utils.decode(rle))
    if len(ys) == 0:
        raise ValueError("cannot draw a point inside an empty mask")
    i = int(rng.integers(len(ys)))
    return np.array([xs[i] + 0.5, ys[i] + 0.5], np.float32)


def centre_point(rle: Rle) -> np.ndarray:
    """(x, y) pixel centre of the mask pixel farthest from the mask's border (the paper's "mask
    center point", the code's distance-transform argmax; first such pixel in raster order)."""
    m = mask_utils.decode(rle).astype(bool)
    if not m.any():
        raise ValueError("an empty mask has no centre point")
    dist = distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), m.shape)
    return np.array([x + 0.5, y + 0.5], np.float32)


def sample_training_prompts(
    rles: Sequence[Rle],
    boxes: np.ndarray,
    num_prompts: int,
    rng: np.random.Generator,
    point_ratio: float = 0.5,
) -> Prompts:
    """The code's training prompts of one image: ``num_prompts`` prompts over its S segments.

    Args:
        rles: the S usable ground-truth segments (non-empty, not crowd).
        boxes: (S, 4) XYXY boxes of the segments.
        num_prompts: prompts per image (40); with fewer segments they repeat, in order.
        rng: draws the points, the shuffle and hence which segments get boxes.
        point_ratio: fraction of point prompts (0.5: "half boxes, half points").

    Returns:
        Prompts with ``target`` the segment index; empty when S == 0.
    """
    s = len(rles)
    if s == 0 or num_prompts == 0:
        return Prompts.empty()
    reps = -(-num_prompts // s)  # ceil: the code tiles num_proposals // S + 1 copies, then cuts
    order = np.tile(np.arange(s), reps)[:num_prompts]
    order = order[rng.permutation(len(order))]
    n = len(order)
    num_points = int(round(n * point_ratio))
    is_box = np.arange(n) < n - num_points
    points = np.stack([random_point_in_mask(rles[int(t)], rng) for t in order])
    return Prompts(
        boxes=np.asarray(boxes, np.float32)[order].copy(),
        points=points,
        is_box=is_box,
        target=order.astype(np.int64),
        roi_from_mask=np.zeros(n, bool),
    )


def to_frame(xy: np.ndarray, height: int, width: int, frame_size: int) -> np.ndarray:
    """Image-pixel coordinates (any trailing pairs of x, y) in a square frame of ``frame_size``."""
    return np.asarray(xy, np.float32) * np.float32(frame_size / max(height, width))


def ground_truth_prompts(rles: Sequence[Rle], mode: str) -> Prompts:
    """One prompt per segment for the paper's prompted evaluation (Table 1).

    ``"gt-boxes"``: the segment's box; ``"gt-points"``: its centre point (:func:`centre_point`),
    whose RoI is then the box of the predicted mask (no ground-truth box is used).
    """
    if mode not in ("gt-boxes", "gt-points"):
        raise ValueError(f"prompt mode must be gt-boxes or gt-points, got {mode!r}")
    n = len(rles)
    if n == 0:
        return Prompts.empty()
    boxes = rle_boxes_xyxy(rles)
    if mode == "gt-boxes":
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
        return Prompts(
            boxes, centres.astype(np.float32), np.ones(n, bool), np.arange(n), np.zeros(n, bool)
        )
    points = np.stack([centre_point(r) for r in rles])
    return Prompts(
        np.zeros((n, 4), np.float32), points, np.zeros(n, bool), np.arange(n), np.ones(n, bool)
    )
