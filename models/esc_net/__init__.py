"""ESC-Net head (Lee et al., "Effective SAM Combination for Open-Vocabulary Semantic
Segmentation", CVPR 2025, arXiv 2411.14723) on the cost-aggregation backbone.

Public API:
    EscNetConfig                      the frozen config (a CostAggConfig plus ESC-Net's fields)
    EscNet, build_esc_net             the torch module (costagg's forward signature and output)
    SamPromptedBlock, two_way_blocks  an ESC block's SAM side; SAM's two-way blocks
    encode_prompts                    PPG + SAM's prompt encoder (SAM weights: samcp.models.sam_decoder)
    PseudoPrompts, pseudo_prompts, kmeans_regions, class_log_probs   the pseudo prompt generator

The plugin (``samcp.models.esc_net.plugin.EscNetPlugin``, registered as "esc_net") is imported
by samcp.models.registry. Design and choices: docs/heads/esc-net.md.
"""

from .config import EscNetConfig
from .model import (
    EscNet,
    SamPromptedBlock,
    build_esc_net,
    encode_prompts,
    two_way_blocks,
)
from .ppg import PseudoPrompts, class_log_probs, kmeans_regions, pseudo_prompts

__all__ = [
    "EscNet",
    "EscNetConfig",
    "PseudoPrompts",
    "SamPromptedBlock",
    "build_esc_net",
    "class_log_probs",
    "encode_prompts",
    "kmeans_regions",
    "pseudo_prompts",
    "two_way_blocks",
]
