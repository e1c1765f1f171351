"""Configuration of the cost-aggregation head (CAT-Seg: Cho et al., "CAT-Seg: Cost Aggregation for
Open-Vocabulary Semantic Segmentation", CVPR 2024; code github.com/cvlab-kaist/CAT-Seg).

One frozen dataclass covers the inputs (what the cache holds), the per-pixel CLIP embedding, the
cost embedding, the aggregation layers (spatial: Swin blocks; class: linear attention), the
upsampling decoder and the loss. Every default says where it comes from: "code" (CAT-Seg's
released configs ``configs/vitb_384.yaml`` / ``vitl_336.yaml`` and ``cat_seg/modeling``),
"ConvNeXt-L" (the cached CLIP, docs/clip-features.md) or "ours" (CAT-Seg is silent or does
something the cache cannot).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CLIP_PROJECTIONS = ("mlp", "linear")
VOID_LOSSES = ("negative", "ignore")


@dataclass(frozen=True)
class CostAggConfig:
    """Every knob of the cost-aggregation head; defaults are CAT-Seg's released configs.

    Frames: ``clip_level`` (the cost volume's map, ``clip_res5``) and the ``guidance_levels``
    (``clip_res4``, ``clip_res3``) are cached at the CLIP frame: the image resized so its longer
    side is ``clip_input_size``, at the top-left, zero-padded bottom/right. Logits live on that
    frame at the decoder's output stride; targets are rasterised on it every ``label_stride``
    pixels.
    """

    # --- inputs (must agree with the proposal cache; `configure` fills the channels) ---
    clip_level: str = "clip_res5"  # ours: the map the CLIP head applies to (FC-CLIP pools res5)
    clip_channels: int = 1536  # ConvNeXt-L res5
    clip_input_size: int = 1024  # S of the cached CLIP frame (the cache's setting)
    text_dim: int = 768  # D of the CLIP text space (ConvNeXt-L)
    guidance_levels: tuple[str, ...] = ("clip_res4", "clip_res3")  # ours: the decoder's guidance,
    #   one per upsampling stage, strides /2 and /4 of clip_level (code: ViT layers 8 and 16
    #   upsampled x2 / x4; a ConvNeXt pyramid has them natively). () trains without guidance.
    guidance_channels: tuple[int, ...] = (768, 384)  # ConvNeXt-L res4, res3

    # --- per-pixel image embeddings in the text space ---
    clip_proj: str = "mlp"  # the tower head's projection: "mlp" (convnext_large_d_320: LayerNorm,
    #   Linear(C, 2D), GELU, Linear(2D, D)) | "linear" (LayerNorm, Linear(C, D))
    clip_norm_eps: float = 1e-6  # ConvNeXt-L head LayerNorm eps (timm's test_convnext: 1e-5)
    clip_head_source: str = "cache"  # ours: "cache" copies the cache's frozen CLIP head
    #   (clip_head/, written by precompute) into the model and keeps it frozen, so the cost volume
    #   is CLIP's own; "learned" trains the projection from a random init (see docs).

    # --- cost embedding and aggregation (code: Aggregator) ---
    hidden_dim: int = 128  # code HIDDEN_DIMS
    num_layers: int = 2  # code NUM_LAYERS (vitb_384 / vitl_336; the base config.yaml says 4)
    num_heads: int = 4  # code NUM_HEADS
    window_size: int = 12  # code WINDOW_SIZES (Swin window, cells of the cost map)
    mlp_ratio: float = 4.0  # code: Swin MLP ratio; class-aggregation MLP is 4x too
    pooling_size: int = 2  # code POOLING_SIZES [2, 2]: avg-pool before class aggregation
    appearance_guidance_proj_dim: int = 128  # code APPEARANCE_GUIDANCE_PROJ_DIM
    text_guidance_proj_dim: int = 128  # code TEXT_GUIDANCE_PROJ_DIM
    pad_len: int = 256  # code: class aggregation sees at least pad_len tokens (learned padding)
    corr_kernel: int = 7  # code: conv1, 7 x 7 cost embedding

    # --- upsampling decoder (code: Up x 2 + head) ---
    decoder_dims: tuple[int, ...] = (64, 32)  # code DECODER_DIMS
    decoder_guidance_proj_dims: tuple[int, ...] = (32, 16)  # code DECODER_GUIDANCE_PROJ_DIMS

    # --- loss (code: CATSeg.forward) ---
    void_loss: str = "negative"  # code: unlabelled pixels are all-negative BCE targets
    #   | "ignore": left out of the loss. Frame padding (outside the image) is always left out.
    label_stride: int = 4  # ours: targets every 4 frame pixels (code: the 384 crop's pixels)

    def __post_init__(self) -> None:
        for name in ("guidance_levels", "guidance_channels", "decoder_dims"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(
            self, "decoder_guidance_proj_dims", tuple(self.decoder_guidance_proj_dims)
        )
        if self.clip_head_source not in ("cache", "learned"):
            raise ValueError(
                f"clip_head_source must be 'cache' or 'learned', got {self.clip_head_source!r}"
            )
        if self.clip_proj not in CLIP_PROJECTIONS:
            raise ValueError(f"clip_proj must be one of {CLIP_PROJECTIONS}, got {self.clip_proj!r}")
        if self.void_loss not in VOID_LOSSES:
            raise ValueError(f"void_loss must be one of {VOID_LOSSES}, got {self.void_loss!r}")
        positive = {
            "clip_channels": self.clip_channels,
            "clip_input_size": self.clip_input_size,
            "text_dim": self.text_dim,
            "hidden_dim": self.hidden_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "window_size": self.window_size,
            "pooling_size": self.pooling_size,
            "appearance_guidance_proj_dim": self.appearance_guidance_proj_dim,
            "text_guidance_proj_dim": self.text_guidance_proj_dim,
            "corr_kernel": self.corr_kernel,
            "label_stride": self.label_stride,
        }
        bad = [k for k, v in positive.items() if not (isinstance(v, int) and v > 0)]
        if bad:
            raise ValueError(f"these costagg config fields must be positive integers: {bad}")
        if self.pad_len < 0:
            raise ValueError(f"pad_len must be >= 0, got {self.pad_len}")
        if self.corr_kernel % 2 == 0:
            raise ValueError(f"corr_kernel must be odd, got {self.corr_kernel}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim {self.hidden_dim} must be a multiple of num_heads {self.num_heads}"
            )
        if not self.decoder_dims or any(d <= 0 for d in self.decoder_dims):
            raise ValueError(f"decoder_dims must be positive, got {self.decoder_dims}")
        if len(self.decoder_guidance_proj_dims) != len(self.decoder_dims):
            raise ValueError(
                "decoder_guidance_proj_dims needs one entry per decoder stage "
                f"({len(self.decoder_dims)}), got {self.decoder_guidance_proj_dims}"
            )
        if len(self.guidance_levels) > len(self.decoder_dims):
            raise ValueError(
                f"{len(self.guidance_levels)} guidance levels for {len(self.decoder_dims)} "
                "decoder stages; give at most one level per stage"
            )
        if len(self.guidance_channels) != len(self.guidance_levels):
            raise ValueError(
                f"guidance_channels {self.guidance_channels} must give one width per guidance "
                f"level {self.guidance_levels}"
            )
        ins = (self.hidden_dim, *self.decoder_dims[:-1])
        for i, level in enumerate(self.guidance_levels):
            g = self.decoder_guidance_proj_dims[i]
            if not 0 < g < ins[i]:
                raise ValueError(
                    f"decoder stage {i} ({level}) projects its guidance to {g} channels; it must "
                    f"be positive and below the stage's input width {ins[i]}"
                )
        for name in (self.clip_level, *self.guidance_levels):
            if not name.startswith("clip_"):
                raise ValueError(f"{name!r} must name a cached clip_<level> map")
        if not self.mlp_ratio > 0 or not self.clip_norm_eps > 0:
            raise ValueError("mlp_ratio and clip_norm_eps must be positive")
        if self.clip_input_size % self.label_stride:
            raise ValueError(
                f"label_stride {self.label_stride} must divide clip_input_size "
                f"{self.clip_input_size}"
            )

    @property
    def label_grid(self) -> int:
        """Side of the square frame grid the training targets are rasterised on."""
        return self.clip_input_size // self.label_stride

    @classmethod
    def tiny(cls, **overrides: Any) -> CostAggConfig:
        """A deliberately small variant that runs the real code path on a CPU in seconds.

        It needs only ``clip_res5`` (no decoder guidance); add
        ``guidance_levels=("clip_res4", "clip_res3")`` for a cache that stores them.
        """
        params: dict[str, Any] = dict(
            clip_channels=12,
            clip_input_size=64,
            text_dim=8,
            guidance_levels=(),
            guidance_channels=(),
            clip_norm_eps=1e-5,
            hidden_dim=16,
            num_layers=1,
            num_heads=2,
            window_size=4,
            pooling_size=1,
            appearance_guidance_proj_dim=8,
            text_guidance_proj_dim=8,
            pad_len=8,
            corr_kernel=3,
            decoder_dims=(16, 16),
            decoder_guidance_proj_dims=(4, 4),
            label_stride=4,
        )
        params.update(overrides)
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostAggConfig:
        """Build from a YAML/JSON mapping; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown costagg config keys: {', '.join(unknown)}")
        return cls(**dict(data))
