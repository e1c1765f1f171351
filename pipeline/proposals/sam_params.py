"""SAM everything-mode parameters, apart from the torch code so that reading them (the CLI, the
cache, `samcp eval`) does not import torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SamEverythingParams:
    """Everything-mode knobs (SAM-CP appendix B.1 defaults).

    points_per_side: the prompt grid is points_per_side x points_per_side over the image.
    points_per_batch: prompts decoded together. Higher may be faster but uses more memory.
    pred_iou_thresh: keep masks whose predicted IoU is above this (0 disables the filter).
    stability_score_thresh: keep masks whose stability score is at least this (0 disables it).
    stability_score_offset: logit offset used to compute the stability score.
    box_nms_thresh: box IoU above which the lower-scored mask is removed (1.0 keeps all).
    upsample_chunk: masks upsampled to full resolution at once; bounds peak memory. 0 picks per
        device: 4 on a CPU (each chunk's full-resolution maps stay in cache, about 1.5x faster
        post-processing than 32 there) and 64 on a GPU.
    """

    points_per_side: int = 48
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.9
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    upsample_chunk: int = 0

    def cache_params(self) -> dict:
        """The parameters that decide the output (recorded in the cache; batch sizes do not)."""
        d = asdict(self)
        d.pop("points_per_batch")
        d.pop("upsample_chunk")
        return d
