"""SAM-MI (paper 003: "SAM-MI: A Mask-Injected Framework for Enhancing Open-Vocabulary Semantic
Segmentation with SAM") on the cost-aggregation head of samcp.models.costagg.

Public API:
    SamMiConfig                    the frozen config (costagg's fields + SAM-MI's; ``tiny()``)
    SamMiNet, build_sam_mi_head    the torch module (TSPP, online SAM, SMAgg, DMI, costagg)
    SamMiOutput                    what it returns
    SamMiCriterion, point_mse      L_ce + lambda_tspp (L_ce^mask + lambda_mse L_mse)
    tspp_targets, grid_labels      TSPP's targets on the point grid (eqs. 3-5)
    matching_scores, shallow_mask_aggregation     SMAgg (eqs. 6-7)
    LowFrequencyInjection, HighFrequencyInjection DMI (eqs. 8-12)

The plugin (``samcp.models.sam_mi.plugin.SamMiPlugin``, registered as "sam_mi") is imported by
samcp.models.registry. docs/heads/sam_mi.md describes the head.
"""

from .config import SamMiConfig
from .injection import (
    HighFrequencyInjection,
    LowFrequencyInjection,
    intra_mask_context,
    matching_scores,
    shallow_mask_aggregation,
)
from .losses import SamMiCriterion, point_mse
from .model import SamMiNet, SamMiOutput, build_sam_mi_head
from .targets import grid_labels, tspp_targets

__all__ = [
    "HighFrequencyInjection",
    "LowFrequencyInjection",
    "SamMiConfig",
    "SamMiCriterion",
    "SamMiNet",
    "SamMiOutput",
    "build_sam_mi_head",
    "grid_labels",
    "intra_mask_context",
    "matching_scores",
    "point_mse",
    "shallow_mask_aggregation",
    "tspp_targets",
]
