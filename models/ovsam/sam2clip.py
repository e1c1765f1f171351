"""SAM2CLIP (Open-Vocabulary SAM, sec. 3.2, eq. 3): SAM's image embedding distilled from the frozen
CLIP's feature pyramid.

    L_distill = MSE(F_sam, A_sam2clip(Fusion(E_I^i)))                         (eq. 3)

Layout (the authors' ``MultiLayerTransformerNeck``, where the paper is silent):

* every CLIP level i is brought to SAM's grid (64 x 64 at 1024, stride 16) by its own patch
  embedding to ``embed_dim`` channels: a k x k convolution of stride k for a finer level
  (res2 k=4, res3 k=2, res4 k=1), a 2 x 2 transposed convolution of stride 2 for res5; a level
  whose grid is no integer multiple or divisor of SAM's is projected (1 x 1) and resized
  bilinearly (the paper's "bilinear upsampling");
* a learned level embedding is added to each, the levels are summed ("addition"), a position
  embedding is added (the code copies SAM-H's; here it is learned from zero, see docs/heads/ovsam.md);
* ``depth`` (5) SAM-ViT blocks (segment_anything's ``Block``: 16 heads, relative positions,
  window 14, the last block global);
* SAM's neck: 1 x 1 conv to 256, LayerNorm2d, 3 x 3 conv, LayerNorm2d -> (256, 64, 64).

Pure torch + segment_anything; imports nothing from samcp.pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..heads import ImageInputs

#: config fields that are tuples (JSON / YAML give lists)
_TUPLES = ("clip_levels", "clip_channels", "clip_strides", "global_attn_indexes")


def tuple_fields(cls, data: Mapping[str, Any], names: Sequence[str], head: str) -> Any:
    """``cls(**data)`` with unknown keys refused and the ``names`` fields made tuples."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {head} config keys: {', '.join(unknown)}")
    d = dict(data)
    for k in names:
        if k in d and d[k] is not None:
            d[k] = tuple(d[k])
    return cls(**d)


@dataclass(frozen=True)
class Sam2ClipConfig:
    """The SAM2CLIP neck; defaults are the authors' (SAM-H student of a ConvNeXt/RN CLIP).

    The CLIP fields are filled from the cache by ``configure``: every cached level by default
    (the code feeds all four of res2..res5; the paper's table 5: multi-scale beats single-scale).
    """

    # --- inputs (the cache dictates them) ---
    clip_levels: tuple[str, ...] = ()  # code: all levels; configure: every cached clip_<level>
    clip_channels: tuple[int, ...] = ()  # per level (configure)
    clip_strides: tuple[int, ...] = ()  # per level, w.r.t. the CLIP input (configure)
    clip_input_size: int = 1024  # S of the CLIP frame (configure)
    sam_dim: int = 256  # SAM's embedding channels (the target, cached sam_embed)
    sam_grid: int = 64  # SAM's 64 x 64 grid at 1024

    # --- the neck (code: MultiLayerTransformerNeck) ---
    embed_dim: int = 1280  # code: SAM-H's width
    depth: int = 5  # code: 5 blocks
    num_heads: int = 16  # code
    mlp_ratio: float = 4.0  # code / SAM
    window_size: int = 14  # code / SAM
    global_attn_indexes: tuple[int, ...] = (4,)  # code: the last block attends globally
    use_rel_pos: bool = True  # code / SAM: decomposed relative positions

    def __post_init__(self) -> None:
        n = len(self.clip_levels)
        if len(self.clip_channels) != n or len(self.clip_strides) != n:
            raise ValueError(
                "clip_levels, clip_channels and clip_strides must have one entry per level"
            )
        for name in ("clip_input_size", "sam_dim", "sam_grid", "embed_dim", "depth", "num_heads"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"sam2clip {name} must be a positive integer")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be a multiple of num_heads")
        if any(not str(lv).startswith("clip_") for lv in self.clip_levels):
            raise ValueError(f"clip_levels must name cached clip_<level> maps: {self.clip_levels}")
        if any(c <= 0 for c in self.clip_channels) or any(s <= 0 for s in self.clip_strides):
            raise ValueError("clip_channels and clip_strides must be positive")
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            raise ValueError(f"global_attn_indexes must lie in [0, {self.depth})")

    def level_grid(self, i: int) -> int:
        """Side of level i's map in the cache (the CLIP input side over its stride)."""
        return self.clip_input_size // self.clip_strides[i]

    @classmethod
    def tiny(cls, **overrides: Any) -> Sam2ClipConfig:
        """Small enough for CPU tests in seconds (SAM's layout, tiny widths)."""
        params: dict[str, Any] = dict(
            clip_levels=("clip_res5",),
            clip_channels=(24,),
            clip_strides=(8,),
            clip_input_size=64,
            sam_dim=32,
            sam_grid=16,
            embed_dim=32,
            depth=2,
            num_heads=2,
            window_size=4,
            global_attn_indexes=(1,),
        )
        params.update(overrides)
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if k in _TUPLES else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sam2ClipConfig:
        return tuple_fields(cls, data, _TUPLES, "sam2clip")


def level_to_grid(in_channels: int, out_channels: int, grid_in: int, grid_out: int) -> nn.Module:
    """The code's per-level patch embedding onto SAM's grid (conv k=s for a finer level,
    transposed conv k=s for a coarser one); 1 x 1 projection + bilinear resize otherwise."""
    if grid_in >= grid_out and grid_in % grid_out == 0:
        k = grid_in // grid_out
        return nn.Conv2d(in_channels, out_channels, k, stride=k)
    if grid_out % grid_in == 0:
        k = grid_out // grid_in
        return nn.ConvTranspose2d(in_channels, out_channels, k, stride=k)
    return _ProjectResize(in_channels, out_channels, grid_out)


class _ProjectResize(nn.Module):
    def __init__(self, cin: int, cout: int, grid: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1)
        self.grid = grid

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False)


@dataclass
class Sam2ClipOutput:
    """``embed``: (B, sam_dim, G, G), the distilled SAM image embedding."""

    embed: Tensor


class Sam2ClipNeck(nn.Module):
    """A_sam2clip(Fusion(E_I^i)): cached CLIP levels -> SAM's (sam_dim, G, G) embedding."""

    def __init__(self, config: Sam2ClipConfig) -> None:
        super().__init__()
        from segment_anything.modeling.common import LayerNorm2d
        from segment_anything.modeling.image_encoder import Block

        if not config.clip_levels:
            raise ValueError("sam2clip needs at least one CLIP level (configure fills them)")
        self.config = config
        g, e = config.sam_grid, config.embed_dim
        self.patch_embeds = nn.ModuleList(
            level_to_grid(c, e, config.level_grid(i), g) for i, c in enumerate(config.clip_channels)
        )
        self.level_embed = nn.Parameter(torch.randn(len(config.clip_levels), e))  # code: N(0, 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, e))
        self.blocks = nn.ModuleList(
            Block(
                dim=e,
                num_heads=config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                act_layer=nn.GELU,
                use_rel_pos=config.use_rel_pos,
                rel_pos_zero_init=True,
                window_size=0 if i in config.global_attn_indexes else config.window_size,
                input_size=(g, g),
            )
            for i in range(config.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(e, config.sam_dim, 1, bias=False),
            LayerNorm2d(config.sam_dim),
            nn.Conv2d(config.sam_dim, config.sam_dim, 3, padding=1, bias=False),
            LayerNorm2d(config.sam_dim),
        )

    def forward(self, levels: Sequence[Tensor]) -> Sam2ClipOutput:
        """``levels``: one (B, C_i, h_i, w_i) map per configured level, shallow to deep."""
        if len(levels) != len(self.patch_embeds):
            raise ValueError(f"sam2clip takes {len(self.patch_embeds)} levels, got {len(levels)}")
        x = 0
        for i, (feat, embed) in enumerate(zip(levels, self.patch_embeds)):
            want = self.config.level_grid(i)
            if tuple(feat.shape[-2:]) != (want, want):
                raise ValueError(
                    f"{self.config.clip_levels[i]} is {tuple(feat.shape[-2:])}, the neck was "
                    f"built for {want} x {want} (clip_input_size / stride)"
                )
            x = x + embed(feat).permute(0, 2, 3, 1) + self.level_embed[i]
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return Sam2ClipOutput(self.neck(x.permute(0, 3, 1, 2)))


# ----------------------------------------------------------------------------------------------
# Samples, batches, loss.
# ----------------------------------------------------------------------------------------------


@dataclass
class Sam2ClipSample:
    """One cached image: its CLIP levels (float16, as cached) and, for training, its sam_embed."""

    image_id: str
    height: int
    width: int
    levels: list[Tensor]
    target: Tensor | None


def cached_array(inputs: ImageInputs, name: str, flag: str) -> Tensor:
    """A per-image cache array as a float16 tensor; ValueError naming the precompute flag."""
    if name not in inputs.image_arrays:
        raise ValueError(f"cache row {inputs.image_id} has no {name}; {flag}")
    return torch.from_numpy(np.ascontiguousarray(inputs.image_arrays[name])).to(torch.float16)


LEVELS_FLAG = (
    "re-run samcp precompute with --clip-checkpoint PATH --clip-levels res2,res3,res4,res5"
)
SAM_EMBED_FLAG = "re-run samcp precompute with --store-sam-embeddings --sam-checkpoint PATH"


def make_sam2clip_sample(
    inputs: ImageInputs, config: Sam2ClipConfig, with_target: bool
) -> Sam2ClipSample:
    levels = [cached_array(inputs, lv, LEVELS_FLAG) for lv in config.clip_levels]
    target = None
    if with_target:
        target = cached_array(inputs, "sam_embed", SAM_EMBED_FLAG)
        want = (config.sam_dim, config.sam_grid, config.sam_grid)
        if tuple(target.shape) != want:
            raise ValueError(f"sam_embed of {inputs.image_id} is {tuple(target.shape)}, not {want}")
    return Sam2ClipSample(inputs.image_id, int(inputs.height), int(inputs.width), levels, target)


def collate_levels(samples: Sequence[Any], device) -> list[Tensor]:
    """The batch's CLIP levels, float32 on ``device``."""
    n = len(samples[0].levels)
    return [torch.stack([s.levels[i] for s in samples]).to(device).float() for i in range(n)]


class Sam2ClipCriterion(nn.Module):
    """Eq. 3: per-pixel MSE between the neck's output and the cached SAM embedding."""

    def forward(self, outputs: Sam2ClipOutput, samples: Sequence[Sam2ClipSample]) -> dict:
        if any(s.target is None for s in samples):
            raise ValueError("sam2clip samples need their sam_embed target (built with gt)")
        target = torch.stack([s.target for s in samples]).to(outputs.embed.device).float()
        loss = F.mse_loss(outputs.embed.float(), target)
        return {"loss": loss, "loss_distill": loss.detach()}
