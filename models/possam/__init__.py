"""PosSAM head (Vs et al., "PosSAM: Panoptic Open-vocabulary Segment Anything", sec. 3.3-3.5).

Public API:
    PossamConfig                          the frozen config dataclass (`PossamConfig.tiny()` for tests)
    PossamHead, build_possam_head         the torch module (LDP, IoU head, CLIP branch, decoder)
    PossamOutput                          what the head returns
    PossamCriterion                       losses for both mask sources (Hungarian for the decoder)
    ProposalTargets, proposal_targets     class / IoU targets of cached proposals from RLEs
    MaskTargets, mask_targets             decoder-path GT masks on the frame's stride-4 grid
    PossamSample, make_sample, flip_sample, collate   samples from cached images
    frame_coverage, frame_to_image        masks between the image and the cache's square frame
    masked_average_pool                   soft mask pooling of a frame map

The plugin (``samcp.models.possam.plugin.PossamPlugin``, registered as "possam") is imported by
samcp.models.registry.
"""

from .config import PossamConfig
from .data import PossamSample, collate, flip_sample, make_sample
from .losses import PossamCriterion
from .model import PossamHead, PossamOutput, build_possam_head, masked_average_pool
from .targets import (
    MaskTargets,
    ProposalTargets,
    frame_coverage,
    frame_to_image,
    mask_targets,
    proposal_targets,
)

__all__ = [
    "MaskTargets",
    "PossamConfig",
    "PossamCriterion",
    "PossamHead",
    "PossamOutput",
    "PossamSample",
    "ProposalTargets",
    "build_possam_head",
    "collate",
    "flip_sample",
    "frame_coverage",
    "frame_to_image",
    "make_sample",
    "mask_targets",
    "masked_average_pool",
    "proposal_targets",
]
