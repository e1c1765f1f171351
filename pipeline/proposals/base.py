"""The one shape every proposal source produces, and helpers to build it from binary masks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils


@dataclass
class Proposals:
    """Class-agnostic mask proposals of one image, as stored in the cache.

    Attributes:
        height, width: original image size.
        rles: COCO compressed RLE ``counts`` (bytes) at the original size, one per mask.
        bbox: (M, 4) float32 XYWH boxes in original pixels, as pycocotools' ``toBbox`` gives them.
        area: (M,) int64 pixel counts.
        predicted_iou: (M,) float32 the generator's own quality estimate (1.0 where it has none).
        stability_score: (M,) float32 SAM's stability score (1.0 where it has none).
        point_coords: (M, 2) float32 the (x, y) prompt that produced each mask (a centroid for
            sources without prompts).
    """

    height: int
    width: int
    rles: list[bytes] = field(default_factory=list)
    bbox: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    area: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    predicted_iou: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    stability_score: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    point_coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))

    def __len__(self) -> int:
        return len(self.rles)

    def coco_rles(self) -> list[dict]:
        """The masks as pycocotools RLE dicts (``{"size": [h, w], "counts": bytes}``)."""
        size = [self.height, self.width]
        return [{"size": size, "counts": c} for c in self.rles]

    def decode(self) -> np.ndarray:
        """All masks as a (M, H, W) bool array."""
        if not self.rles:
            return np.zeros((0, self.height, self.width), bool)
        return np.ascontiguousarray(mask_utils.decode(self.coco_rles()).transpose(2, 0, 1)).astype(
            bool
        )

    @classmethod
    def from_rles(
        cls,
        height: int,
        width: int,
        rles: list[bytes],
        predicted_iou: np.ndarray | None = None,
        stability_score: np.ndarray | None = None,
        point_coords: np.ndarray | None = None,
    ) -> Proposals:
        """Builds proposals from compressed RLE counts; boxes and areas come from the RLEs."""
        m = len(rles)
        if m == 0:
            return cls(height, width)
        coco = [{"size": [height, width], "counts": c} for c in rles]
        bbox = mask_utils.toBbox(coco).astype(np.float32).reshape(m, 4)
        area = rle_area(coco)
        ones = np.ones(m, np.float32)
        if point_coords is None:
            point_coords = np.stack([bbox[:, 0] + bbox[:, 2] / 2, bbox[:, 1] + bbox[:, 3] / 2], 1)
        return cls(
            height,
            width,
            list(rles),
            bbox,
            area,
            ones if predicted_iou is None else np.asarray(predicted_iou, np.float32).reshape(m),
            ones if stability_score is None else np.asarray(stability_score, np.float32).reshape(m),
            np.asarray(point_coords, np.float32).reshape(m, 2),
        )


def rle_area(rles: list[dict]) -> np.ndarray:
    """Pixel counts of COCO RLEs as int64.

    pycocotools' ``area`` overflows on lists longer than 255 under NumPy 2 (it sizes an internal
    array by a uint8 count), so it is called on chunks.
    """
    out = [mask_utils.area(rles[i : i + 255]) for i in range(0, len(rles), 255)]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def encode_masks_wh(masks_whm: np.ndarray) -> list[bytes]:
    """COCO-RLE-encodes masks given as a Fortran-ordered (H, W, M) uint8 view, in one C call.

    pycocotools wants column-major masks; a C-contiguous (M, W, H) array transposed is exactly that,
    so callers that produce masks transposed avoid a copy.
    """
    if masks_whm.shape[-1] == 0:
        return []
    # asfortranarray is free when the caller already has the layout (the intended path).
    return [r["counts"] for r in mask_utils.encode(np.asfortranarray(masks_whm, dtype=np.uint8))]


def encode_masks(masks: np.ndarray) -> list[bytes]:
    """COCO-RLE-encodes a (M, H, W) bool/uint8 mask stack."""
    mwh = np.ascontiguousarray(masks.transpose(0, 2, 1), dtype=np.uint8)
    return encode_masks_wh(mwh.transpose(2, 1, 0))
