"""Cost-aggregation head (CAT-Seg: Cho et al., "CAT-Seg: Cost Aggregation for Open-Vocabulary
Semantic Segmentation", CVPR 2024), the base of SAM-MI and ESC-Net.

Public API:
    CostAggConfig                          the frozen config dataclass (`CostAggConfig.tiny()`)
    CostAggregationNet, build_costagg_head the torch module, with the hooks encode / aggregate /
                                           decoder_guidance / decode (docs/heads/costagg.md)
    CostAggOutput, Encoded                 what the module and its encode hook return
    CostAggCriterion, semantic_bce         CAT-Seg's per-class BCE
    CostAggSample, make_sample, flip_sample, collate   samples from cached images
    semantic_label_map, frame_label_grid   semantic targets from ground-truth RLEs

The plugin (``samcp.models.costagg.plugin.CostAggPlugin``, registered as "costagg") is imported
by samcp.models.registry.
"""

from .config import CostAggConfig
from .data import (
    OUTSIDE,
    VOID,
    CostAggSample,
    collate,
    flip_sample,
    frame_label_grid,
    make_sample,
    semantic_label_map,
)
from .losses import CostAggCriterion, semantic_bce
from .model import (
    CostAggOutput,
    CostAggregationNet,
    Encoded,
    build_costagg_head,
)

__all__ = [
    "OUTSIDE",
    "VOID",
    "CostAggConfig",
    "CostAggCriterion",
    "CostAggOutput",
    "CostAggSample",
    "CostAggregationNet",
    "Encoded",
    "build_costagg_head",
    "collate",
    "flip_sample",
    "frame_label_grid",
    "make_sample",
    "semantic_bce",
    "semantic_label_map",
]
