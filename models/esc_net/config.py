"""Configuration of the ESC-Net head (Lee et al., "Effective SAM Combination for Open-Vocabulary
Semantic Segmentation", CVPR 2025, arXiv 2411.14723; no public code).

ESC-Net runs on the cost-aggregation backbone (samcp.models.costagg), so its config *is* a
:class:`CostAggConfig` (every CAT-Seg knob keeps its name, so ``--set guidance_levels=[]`` etc.
work) with the ESC-Net fields added. Where a default comes from: "paper" (the summary of the
paper, /work/shared/papers/004), "SAM" (segment_anything's ``_build_sam``), "ours" (the paper is
silent; docs/heads/esc-net.md says why).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..costagg.config import CostAggConfig
from ..sam_decoder import SAM_DECODER_SIZES

SAM_BLOCKS = ("pretrained", "random", "none")
SAM_TRAINABLE = ("attention", "all", "none")


@dataclass(frozen=True)
class EscNetConfig(CostAggConfig):
    """CAT-Seg's knobs (see :class:`CostAggConfig`) plus ESC-Net's; ``num_layers`` is the number
    of ESC blocks (each: PPG -> SAM blocks -> VLF, VLF being one CAT-Seg aggregation layer)."""

    num_layers: int = 4  # paper: N = 4 ESC blocks
    corr_kernel: int = 1  # paper: the correlation map is embedded by a 1 x 1 conv (CAT-Seg: 7)

    # --- SAM's decoder blocks (loaded by `samcp train` from the checkpoint: init_from_cache) ---
    sam_arch: str = "vit_b"  # paper: SAM ViT-B's decoder; segment_anything registry name or
    #   samcp's vit_tiny / vit_test
    sam_checkpoint: str = ""  # the segment_anything .pth the blocks and prompt encoder come from
    sam_blocks: str = "pretrained"  # "pretrained" | "random": the paper's random-init ablation
    #   (the two-way blocks and output tokens random; the frozen prompt encoder still SAM's)
    #   | "none": the paper's "w/o SAM block" (no PPG, no SAM: the guidance is the projected CLIP)
    sam_dim: int = 256  # SAM's prompt_embed_dim (from sam_arch)
    sam_mlp_dim: int = 2048  # SAM's two-way MLP width (from sam_arch)
    sam_heads: int = 8  # SAM's decoder heads (from sam_arch)
    sam_image_size: int = 1024  # SAM's input frame: point prompts are normalised by it
    sam_trainable: str = "attention"  # paper: SAM blocks fine-tune their attention layers
    #   | "all" | "none" (the MLPs, LayerNorms and output tokens stay SAM's with "attention")
    sam_lr_mult: float = 0.01  # paper: SAM attention at 2e-6 against 2e-4 for the rest

    # --- pseudo prompt generator (PPG) ---
    num_prompts: int = 5  # paper: N_o = 5 k-means regions per class
    ppg_alpha: float = 0.5  # ours: foreground = P(class n | pixel) > alpha (softmax over classes)
    ppg_temperature: float = 0.01  # ours: softmax(cost / T); CLIP's logit scale 100
    kmeans_iters: int = 10  # ours: Lloyd iterations after the farthest-point initialisation
    mask_prompt_logit: float = 10.0  # ours: mask prompt = logit(P) inside the region, clamped to
    #   +-this, and -this outside (SAM's mask input is low-resolution logits)

    # --- inference ---
    class_chunk: int = 64  # ours: classes per chunk in the per-class parts (SAM blocks, Swin,
    #   decoder); bounds memory for large vocabularies, the output does not depend on it; 0 = all

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sam_blocks not in SAM_BLOCKS:
            raise ValueError(f"sam_blocks must be one of {SAM_BLOCKS}, got {self.sam_blocks!r}")
        if self.sam_trainable not in SAM_TRAINABLE:
            raise ValueError(
                f"sam_trainable must be one of {SAM_TRAINABLE}, got {self.sam_trainable!r}"
            )
        positive = {
            "sam_dim": self.sam_dim,
            "sam_mlp_dim": self.sam_mlp_dim,
            "sam_heads": self.sam_heads,
            "sam_image_size": self.sam_image_size,
            "num_prompts": self.num_prompts,
        }
        bad = [k for k, v in positive.items() if not (isinstance(v, int) and v > 0)]
        if bad:
            raise ValueError(f"these esc_net config fields must be positive integers: {bad}")
        if self.sam_dim % self.sam_heads or self.sam_dim % 4:
            raise ValueError(f"sam_dim {self.sam_dim} must be a multiple of sam_heads and of 4")
        if self.kmeans_iters < 0 or self.class_chunk < 0:
            raise ValueError("kmeans_iters and class_chunk must be >= 0")
        if not 0.0 < self.ppg_alpha < 1.0:
            raise ValueError(f"ppg_alpha must be in (0, 1), got {self.ppg_alpha}")
        if not (self.ppg_temperature > 0 and self.mask_prompt_logit > 0 and self.sam_lr_mult >= 0):
            raise ValueError("ppg_temperature and mask_prompt_logit must be > 0, sam_lr_mult >= 0")

    @classmethod
    def tiny(cls, **overrides: Any) -> EscNetConfig:
        """CostAggConfig.tiny's backbone, 2 ESC blocks and samcp's 32-wide test SAM with random
        blocks (no checkpoint needed); pass ``sam_arch="vit_tiny", sam_blocks="pretrained",
        sam_checkpoint=PATH`` for SAM's real decoder width."""
        vit_test = SAM_DECODER_SIZES["vit_test"]
        params: dict[str, Any] = dict(
            num_layers=2,
            corr_kernel=1,
            sam_arch="vit_test",
            sam_blocks="random",
            sam_dim=vit_test.dim,
            sam_mlp_dim=vit_test.mlp_dim,
            sam_heads=vit_test.heads,
            sam_image_size=vit_test.image_size,
            num_prompts=3,
            kmeans_iters=3,
            class_chunk=4,
        )
        params.update(overrides)
        return super().tiny(**params)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EscNetConfig:
        """Build from a YAML/JSON mapping; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown esc_net config keys: {', '.join(unknown)}")
        return cls(**dict(data))
