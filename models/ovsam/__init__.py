"""Open-Vocabulary SAM (Yuan et al., "Open-Vocabulary SAM: Segment and Recognize Twenty-thousand
Classes Interactively"): SAM2CLIP and CLIP2SAM as samcp heads.

Public API:
    Sam2ClipConfig, Sam2ClipNeck          the distillation neck (eq. 3)
    Clip2SamConfig, Clip2SamHead          SAM's fine-tuned decoder + the RoI recognition branch
    Clip2SamCriterion                     2 CE + 5 BCE + 5 Dice on sampled points
    Prompts, sample_training_prompts, ground_truth_prompts, centre_point   visual prompts
    Clip2SamSample, make_clip2sam_sample, collate_clip2sam, prompt_predictions

The plugins (``samcp.models.ovsam.plugin``: "sam2clip", "clip2sam") are imported by
samcp.models.registry.
"""

from .clip2sam import Clip2SamConfig, Clip2SamCriterion, Clip2SamHead, Clip2SamOutput
from .plugin import Clip2SamSample, collate_clip2sam, make_clip2sam_sample, prompt_predictions
from .prompts import Prompts, centre_point, ground_truth_prompts, sample_training_prompts
from .sam2clip import Sam2ClipConfig, Sam2ClipNeck, Sam2ClipOutput

__all__ = [
    "Clip2SamConfig",
    "Clip2SamCriterion",
    "Clip2SamHead",
    "Clip2SamOutput",
    "Clip2SamSample",
    "Prompts",
    "Sam2ClipConfig",
    "Sam2ClipNeck",
    "Sam2ClipOutput",
    "centre_point",
    "collate_clip2sam",
    "ground_truth_prompts",
    "make_clip2sam_sample",
    "prompt_predictions",
    "sample_training_prompts",
]
