"""Configuration of the PosSAM head (Vs et al., "PosSAM: Panoptic Open-vocabulary Segment Anything",
sections 3.3-3.5, Algorithm 1, appendix A).

One frozen dataclass covers the inputs (what the cache holds), the Local Discriminative Pooling
(LDP) module, the IoU head, the optional mask decoder (FPN + Mask2Former on ``sam_embed``), the
losses and the inference (MASE and the composition thresholds). Every default says where it comes
from: "paper" (PosSAM), "M2F" (Mask2Former, which PosSAM follows for its decoder and losses),
"FC-CLIP" (whose ensemble PosSAM extends) or "ours" (the paper is silent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MASK_SOURCES = ("proposals", "decoder")
POOLINGS = ("ldp", "sam", "clip")
CLASSIFIERS = ("mase", "geometric", "ldp", "clip")


@dataclass(frozen=True)
class PossamConfig:
    """Every knob of the PosSAM head; defaults are the paper's (COCO panoptic training).

    ``mask_source`` picks the masks the head classifies:

    * ``"proposals"`` (default, samcp-native): the cached SAM proposals are the masks. The head
      trains LDP and the IoU head only; the class target of a proposal is the GT segment it
      matches (IoU >= ``match_iou``), the IoU target its best IoU with a GT segment.
    * ``"decoder"`` (faithful to section 3.3): an FPN on the cached ``sam_embed`` and a
      Mask2Former decoder predict ``num_queries`` masks, trained with Hungarian matching.

    Frames: ``sam_embed`` is (sam_dim, sam_grid, sam_grid) at SAM's 1024 frame (image resized so
    its longer side is 1024, at the top-left, padded bottom/right); the dense CLIP map
    ``clip_level`` is at the CLIP frame (longer side ``clip_input_size``, padded the same way).
    Both frames have the same normalised coordinates, so one mask in normalised frame
    coordinates pools both maps.
    """

    # --- which masks ---
    mask_source: str = "proposals"  # ours: "proposals" (cached SAM masks) | "decoder" (sec. 3.3)

    # --- inputs (must agree with the proposal cache; `configure` fills them) ---
    sam_dim: int = 256  # paper: channels of F_sam, SAM's neck output (= cached sam_embed)
    sam_grid: int = 64  # paper/SAM: F_sam is 64 x 64 at the 1024 frame (stride 16)
    clip_level: str = "clip_res5"  # ours: the dense CLIP map LDP pools (FC-CLIP pools res5)
    clip_channels: int = 1536  # ConvNeXt-L res5 (paper app. A: ConvNeXt-L CLIP)
    clip_input_size: int = 1024  # S of the cached CLIP frame (the cache's setting)
    text_dim: int = 768  # D of the CLIP text space (ConvNeXt-L)

    # --- Local Discriminative Pooling (sec. 3.4) ---
    ldp_dim: int = 256  # ours: width of each projected stream (paper: "project"; SAM's 256)
    ldp_heads: int = 8  # ours (M2F's attention heads); paper silent
    ldp_layers: int = 1  # ours: one self-attention block ("fused using self-attention")
    ffn: int = 1024  # ours: FFN width of the LDP block (4 x 256)
    pooling: str = "ldp"  # paper table 5: "ldp" (both streams) | "sam" | "clip" (one stream)
    dropout: float = 0.0  # ours (M2F's decoder uses 0.0)
    init_temperature: float = 0.07  # paper: learnable tau; CLIP's initial 0.07

    # --- IoU head (sec. 3.3) ---
    iou_hidden: int = 256  # ours: MLP hidden width (paper: "IoU head", width unstated)
    iou_layers: int = 3  # ours: MLP depth (SAM's IoU head is a 3-layer MLP)
    iou_features: str = "sam"  # ours, proposals path: "sam" (mask-pooled F_sam, class-agnostic as
    #   sec. 3.3 asks) | "ldp" (LDP's fused features, which carry CLIP's classes; see model.py)

    # --- losses (eq. 1-4, appendix A "following [13]" = Mask2Former) ---
    loss_cls: float = 2.0  # paper app. A: gamma_a
    loss_mask_bce: float = 5.0  # paper app. A: gamma_b (M2F's mask BCE weight)
    loss_mask_dice: float = 5.0  # M2F: dice weight (paper eq. 1 shows BCE only; "following [13]")
    loss_iou: float = 1.0  # paper app. A: gamma_c
    void_weight: float = 0.1  # M2F no-object weight in the class CE

    # --- proposal targets (mask_source="proposals"; ours) ---
    match_iou: float = 0.5  # ours: PQ's matching IoU; above 0.5 a proposal matches one GT only
    iou_void_ignore: float = 0.5  # ours: no IoU loss for a proposal mostly on void (unannotated)
    #   pixels; 1.0 trains them towards IoU 0 (targets.py says why that hurts unseen classes)

    # --- inference (sec. 3.5, Algorithm 1) ---
    classifier: str = "mase"  # paper table 7: "mase" | "geometric" | "ldp" | "clip"
    alpha: float = 0.4  # paper table 7 / FC-CLIP: CLIP's weight on seen classes (app. A swaps)
    beta: float = 0.8  # paper table 7 / FC-CLIP: CLIP's weight on unseen classes
    clip_logit_scale: float = 100.0  # CLIP's logit scale (FC-CLIP / OVSAM use 100)
    # composition (samcp.models.compose):
    score_thresh: float = 0.2  # ours: MASE scores are IoU x class probability; 0.2 ~ the match
    #   IoU 0.5 times a class probability of 0.4 (M2F's 0.8 is on un-weighted probabilities and
    #   would drop almost every mask; FC-CLIP's ADE setting 0.0 paints every junk mask)
    overlap_thresh: float = 0.8  # M2F / FC-CLIP overlap_threshold: visible fraction to keep
    stuff_area_min: int = 0  # M2F / FC-CLIP: no minimum stuff area
    max_instances: int = 100  # COCO: top-100 instances per image

    # --- decoder path (mask_source="decoder"; sec. 3.3) ---
    num_queries: int = 250  # paper sec. 4.1: N = 250
    dec_layers: int = 9  # M2F: 9 decoder layers (paper silent)
    hidden: int = 256  # M2F: decoder width (paper: 256 output channels, app. B)
    mask_dim: int = 256  # M2F: per-pixel mask feature width
    dec_heads: int = 8  # M2F: attention heads
    dec_ffn: int = 2048  # M2F: decoder FFN width
    train_points: int = 12544  # M2F: points sampled per mask for matching and the mask losses
    deep_supervision: bool = True  # M2F: mask + IoU losses after every decoder layer too

    def __post_init__(self) -> None:
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {MASK_SOURCES}, got {self.mask_source!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.iou_features not in ("sam", "ldp"):
            raise ValueError(f"iou_features must be sam or ldp, got {self.iou_features!r}")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
        positive = {
            "sam_dim": self.sam_dim,
            "sam_grid": self.sam_grid,
            "clip_channels": self.clip_channels,
            "clip_input_size": self.clip_input_size,
            "text_dim": self.text_dim,
            "ldp_dim": self.ldp_dim,
            "ldp_heads": self.ldp_heads,
            "ffn": self.ffn,
            "iou_hidden": self.iou_hidden,
            "iou_layers": self.iou_layers,
            "num_queries": self.num_queries,
            "dec_layers": self.dec_layers,
            "hidden": self.hidden,
            "mask_dim": self.mask_dim,
            "dec_heads": self.dec_heads,
            "dec_ffn": self.dec_ffn,
            "train_points": self.train_points,
        }
        bad = [k for k, v in positive.items() if not (isinstance(v, int) and v > 0)]
        if bad:
            raise ValueError(f"these PosSAM config fields must be positive integers: {bad}")
        if self.ldp_layers < 0:
            raise ValueError(f"ldp_layers must be >= 0, got {self.ldp_layers}")
        width = self.ldp_dim * (2 if self.pooling == "ldp" else 1)
        if width % self.ldp_heads:
            raise ValueError(
                f"the LDP width {width} (ldp_dim x streams) must be a multiple of ldp_heads "
                f"{self.ldp_heads}"
            )
        if self.hidden % self.dec_heads:
            raise ValueError(
                f"hidden {self.hidden} must be a multiple of dec_heads {self.dec_heads}"
            )
        if self.hidden % 4:
            raise ValueError(f"hidden {self.hidden} must be a multiple of 4 (2-D sine encoding)")
        if not self.clip_level.startswith("clip_"):
            raise ValueError(
                f"clip_level must name a cached clip_<level> map, got {self.clip_level!r}"
            )
        for name in ("loss_cls", "loss_mask_bce", "loss_mask_dice", "loss_iou", "void_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.iou_void_ignore <= 1.0:
            raise ValueError(f"iou_void_ignore must be in [0, 1], got {self.iou_void_ignore}")
        if not 0.0 < self.match_iou <= 1.0:
            raise ValueError(f"match_iou must be in (0, 1], got {self.match_iou}")
        for name in ("alpha", "beta", "score_thresh", "overlap_thresh", "dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.init_temperature > 0 or not self.clip_logit_scale > 0:
            raise ValueError("init_temperature and clip_logit_scale must be positive")
        if self.stuff_area_min < 0 or self.max_instances < 0:
            raise ValueError("stuff_area_min and max_instances must be >= 0")

    @property
    def mask_grid(self) -> int:
        """Side of the stride-4 mask grid of the decoder path (256 for SAM's 64 x 64 at 1024)."""
        return 4 * self.sam_grid

    @property
    def ldp_width(self) -> int:
        """Width of the fused LDP features (two streams concatenated, or one)."""
        return self.ldp_dim * (2 if self.pooling == "ldp" else 1)

    @classmethod
    def tiny(cls, **overrides: Any) -> PossamConfig:
        """A deliberately small variant that runs the real code path on a CPU in seconds."""
        params: dict[str, Any] = dict(
            sam_dim=16,
            sam_grid=16,
            clip_channels=12,
            clip_input_size=64,
            text_dim=8,
            ldp_dim=16,
            ldp_heads=2,
            ffn=32,
            iou_hidden=16,
            num_queries=16,
            dec_layers=2,
            hidden=32,
            mask_dim=32,
            dec_heads=2,
            dec_ffn=64,
            train_points=512,
        )
        params.update(overrides)
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PossamConfig:
        """Build from a YAML/JSON mapping; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown possam config keys: {', '.join(unknown)}")
        return cls(**dict(data))
