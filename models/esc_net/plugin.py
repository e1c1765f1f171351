"""ESC-Net as a samcp head plugin: costagg's data, loss and inference, ESC-Net's module, SAM's
weights loaded when training starts, and a small learning rate for SAM's blocks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..costagg.plugin import CostAggPlugin
from ..heads import CacheInfo
from ..registry import register_head
from ..sam_decoder import SAM_DECODER_SIZES, sam_checkpoint_state
from .config import EscNetConfig
from .model import EscNet, build_esc_net


@register_head
class EscNetPlugin(CostAggPlugin):
    """ESC-Net: pseudo prompts from the CLIP correlation drive SAM's pre-trained two-way decoder
    blocks over the CLIP features, then VLF, on the cost-aggregation backbone. Semantic only."""

    name = "esc_net"
    config_cls = EscNetConfig
    summary = (
        "ESC-Net: pseudo point/mask prompts from the CLIP correlation (k-means regions) drive "
        "SAM's pre-trained two-way decoder blocks over cached CLIP features, VLF, on costagg"
    )
    outputs = ("semantic",)
    # Paper: lr 2e-4 (SAM's attention at 2e-6: sam_lr_mult); CAT-Seg's weight decay and clipping.
    train_defaults = {"lr": 2e-4, "weight_decay": 1e-4, "clip_grad": 0.01}
    inference_fields = ("class_chunk",)

    def configure(self, config: Mapping[str, Any], cache: CacheInfo) -> dict[str, Any]:
        out = super().configure(config, cache)
        arch = config.get("sam_arch", EscNetConfig.sam_arch)
        if arch not in SAM_DECODER_SIZES:
            raise ValueError(
                f"unknown sam_arch {arch!r} for esc_net; choose one of {', '.join(SAM_DECODER_SIZES)}"
            )
        blocks = config.get("sam_blocks", EscNetConfig.sam_blocks)
        if blocks == "pretrained" and not config.get("sam_checkpoint"):
            raise ValueError(
                "esc_net loads SAM's pre-trained decoder blocks: --set sam_checkpoint=PATH "
                f"(the segment_anything .pth of sam_arch, now {arch}), or --set sam_blocks=random"
            )
        d = SAM_DECODER_SIZES[arch]
        out.update(
            sam_dim=d.dim, sam_mlp_dim=d.mlp_dim, sam_heads=d.heads, sam_image_size=d.image_size
        )
        return out

    def build(self, config: EscNetConfig) -> nn.Module:
        return build_esc_net(config)

    def init_from_cache(self, module: nn.Module, config: EscNetConfig, cache: CacheInfo) -> None:
        """The cache's frozen CLIP head (as costagg), then SAM's prompt encoder and, with
        ``sam_blocks: pretrained``, its two-way blocks and output tokens from ``sam_checkpoint``
        (read once here; saved with the model, so predict needs no SAM checkpoint)."""
        assert isinstance(module, EscNet)
        super().init_from_cache(module.costagg, config, cache)
        if config.sam_checkpoint:
            try:
                fix = (
                    f"pass the {config.sam_arch} .pth with --set sam_checkpoint=PATH, or --set "
                    "sam_blocks=random"
                )
                state = sam_checkpoint_state(config.sam_checkpoint, config.sam_arch, "esc_net", fix)
            except FileNotFoundError as exc:
                raise ValueError(f"{exc.strerror}: {exc.filename}") from None
            module.load_sam(state)
        elif config.sam_blocks == "pretrained":  # (random: SAM's parts random; none: unused)
            raise ValueError(
                "esc_net sam_blocks=pretrained needs --set sam_checkpoint=PATH (or "
                "--set sam_blocks=random)"
            )

    def param_groups(self, module: nn.Module, config: EscNetConfig, lr: float) -> list[dict]:
        """Everything at ``lr`` except SAM's blocks and tokens at ``sam_lr_mult * lr`` (paper:
        2e-6 against 2e-4)."""
        assert isinstance(module, EscNet)
        sam = module.sam_parameters()
        ids = {id(p) for p in sam}
        rest = [p for p in module.parameters() if id(p) not in ids]
        return [{"params": rest}, {"params": sam, "lr": lr * config.sam_lr_mult}]
