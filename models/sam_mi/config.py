"""Configuration of the SAM-MI head (Chen et al., "SAM-MI: A Mask-Injected Framework for Enhancing
Open-Vocabulary Semantic Segmentation with SAM"; /work/shared/papers/003): the cost-aggregation
network of samcp.models.costagg plus TSPP, online SAM, SMAgg and DMI.

:class:`SamMiConfig` extends :class:`~samcp.models.costagg.config.CostAggConfig` (every costagg
field keeps its meaning and default) with the fields below. Each default says where it comes from:
"paper" (SAM-MI sec. 3 / implementation details), "SAM" (segment_anything) or "ours" (the paper is
silent; docs/heads/sam_mi.md says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..costagg.config import CostAggConfig
from ..sam_decoder import SAM_DECODER_SIZES

PROMPTERS = ("tspp", "grid")
STAGES = (1, 2)

#: ``sam_checkpoint`` value that keeps the frozen SAM decoder at its random init (tests only)
RANDOM_SAM = "random"


@dataclass(frozen=True)
class SamMiConfig(CostAggConfig):
    """Every knob of SAM-MI; costagg's fields (inherited) configure the aggregation network.

    Grids and frames: TSPP's point grid is ``grid_size`` x ``grid_size`` points spread over the
    image (SAM's everything-mode grid, cell centres); the cost volume lives on the CLIP frame;
    SAM's masks come out at 4 x ``sam_grid`` cells of SAM's frame. Both frames hold the image at
    the top-left with its longer side filling the frame, so they share normalised coordinates.
    SAM masks are kept as coverage fractions on ``mask_res`` x ``mask_res`` frame cells (the
    decoder's output grid), and pooled from there to each resolution DMI needs.
    """

    # --- training stage and prompter ---
    stage: int = 2  # paper sec. 3.5: 1 = TSPP alone (L_tspp; nothing else trains), 2 = all
    init_from: str = ""  # ours: a samcp run folder (or a saved model folder) of this head whose
    #   weights start this run (stage 2 from stage 1); its SAM decoder weights are not taken
    prompter: str = "tspp"  # paper: "tspp" (sparse learned points, SAM online) | "grid" (the
    #   cached everything-mode proposals instead: table 3's "w/o TSPP"; no SAM needed)
    low_injection: bool = True  # paper eqs. 8-10 (table 4's "low" column)
    high_injection: bool = True  # paper eqs. 11-12 (table 4's "high" column)
    smagg: bool = True  # paper eqs. 6-7 (table 3's "w/o SMAgg" row when False)

    # --- TSPP (paper sec. 3.2) ---
    grid_size: int = 32  # paper: d_h = d_w = 32 (SAM's 32 x 32 everything grid)
    g_p: int = 5  # paper: grid points per expected sample (eq. 5)
    m_p: int = 10  # paper: most expected samples per class mask (eq. 5)
    lambda_mse: float = 0.5  # paper: L_tspp = L_ce^mask + lambda_mse L_mse
    lambda_tspp: float = 0.1  # paper: stage 2 loss L_ce + lambda_tspp L_tspp
    tspp_lr_mult: float = 0.1  # paper: TSPP at "a reduced learning rate" in stage 2 (ours: x0.1)
    tspp_dim: int = 64  # ours: TSPP's width ("lightweight MLP layer and attention block")
    tspp_heads: int = 4  # ours
    tspp_guidance_dim: int = 64  # ours: TSPP's own appearance / text guidance projections
    max_points: int = 128  # ours: cap on the Bernoulli draw (the most likely points are kept)
    point_seed: int = 0  # ours: added to each image's seed (crc32 of its id) at inference

    # --- SAM (frozen; paper: SAM-H at 1024) ---
    sam_arch: str = "vit_h"  # SAM: segment_anything registry name, or samcp's vit_tiny / vit_test
    sam_checkpoint: str = ""  # the .pth the cache's sam_embed was made with (needed by stage 2
    #   with the tspp prompter); "random" keeps a random decoder (tests only)
    sam_dim: int = 256  # SAM: prompt_embed_dim = cached sam_embed channels (configure)
    sam_grid: int = 64  # SAM: cached sam_embed side (configure)
    cost_grid: int = 32  # side of the clip_level map (configure: clip_input_size / its stride)
    mask_threshold: float = 0.0  # SAM: mask logit > 0

    # --- SMAgg (paper sec. 3.3) ---
    alpha_sma: float = 0.5  # paper: aggregation threshold of eq. 7

    # --- DMI (paper sec. 3.4) ---
    dmi_heads: int = 8  # ours: heads of eq. 10's cross-attention over mask tokens
    dw_kernel: int = 3  # ours: eq. 12's depthwise convolution kernel
    gamma_init: float = 1.0  # paper: gamma of eq. 12 initialised to 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")
        if self.prompter not in PROMPTERS:
            raise ValueError(f"prompter must be one of {PROMPTERS}, got {self.prompter!r}")
        if self.sam_arch not in SAM_DECODER_SIZES:
            raise ValueError(
                f"sam_arch must be one of {', '.join(SAM_DECODER_SIZES)}, got {self.sam_arch!r}"
            )
        positive = {
            "grid_size": self.grid_size,
            "g_p": self.g_p,
            "m_p": self.m_p,
            "tspp_dim": self.tspp_dim,
            "tspp_heads": self.tspp_heads,
            "tspp_guidance_dim": self.tspp_guidance_dim,
            "max_points": self.max_points,
            "sam_dim": self.sam_dim,
            "sam_grid": self.sam_grid,
            "cost_grid": self.cost_grid,
            "dmi_heads": self.dmi_heads,
            "dw_kernel": self.dw_kernel,
        }
        bad = [k for k, v in positive.items() if not (isinstance(v, int) and v > 0)]
        if bad:
            raise ValueError(f"these sam_mi config fields must be positive integers: {bad}")
        if self.tspp_dim % self.tspp_heads:
            raise ValueError(
                f"tspp_dim {self.tspp_dim} must be a multiple of tspp_heads {self.tspp_heads}"
            )
        if self.text_dim % self.dmi_heads:
            raise ValueError(
                f"text_dim {self.text_dim} must be a multiple of dmi_heads {self.dmi_heads} "
                "(eq. 10 attends in the CLIP text space)"
            )
        if self.dw_kernel % 2 == 0:
            raise ValueError(f"dw_kernel must be odd, got {self.dw_kernel}")
        if not 0.0 <= self.alpha_sma < 1.0:
            raise ValueError(f"alpha_sma must be in [0, 1), got {self.alpha_sma}")
        if self.lambda_mse < 0 or self.lambda_tspp < 0:
            raise ValueError("lambda_mse and lambda_tspp must be >= 0")
        if not self.tspp_lr_mult >= 0:
            raise ValueError(f"tspp_lr_mult must be >= 0, got {self.tspp_lr_mult}")

    @property
    def sam_image_size(self) -> int:
        """SAM's input frame in pixels (16-pixel patches)."""
        return 16 * self.sam_grid

    @property
    def mask_res(self) -> int:
        """Side of the frame grid SAM masks are kept on: the decoder's output grid."""
        return self.cost_grid * 2 ** len(self.decoder_dims)

    @property
    def uses_sam(self) -> bool:
        """Whether the module runs SAM online (stage 2 with the TSPP prompter)."""
        return self.stage == 2 and self.prompter == "tspp"

    @classmethod
    def tiny(cls, **overrides: Any) -> SamMiConfig:
        """Costagg's tiny preset plus small TSPP / DMI widths and samcp's test-size SAM
        (``vit_test``: 32 x 16 x 16 embeddings) with a random decoder."""
        params: dict[str, Any] = dict(
            grid_size=8,
            tspp_dim=8,
            tspp_heads=2,
            tspp_guidance_dim=8,
            max_points=8,
            sam_arch="vit_test",
            sam_checkpoint=RANDOM_SAM,
            sam_dim=32,
            sam_grid=16,
            dmi_heads=2,
            cost_grid=8,
        )
        params.update(overrides)
        return super().tiny(**params)
