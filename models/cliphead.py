"""The frozen CLIP image head on mask-pooled dense features, and the mask pooling geometry.

The proposal cache stores dense ConvNeXt-CLIP maps (``clip_res5`` ...) and, for each proposal, the
embedding of its mask: the final map pooled under the mask (FC-CLIP's MaskPooling) and passed
through the model's own head (timm's ``forward_head``: LayerNorm; open_clip's ``visual.head``:
a linear or MLP projection into the text space), L2-normalised. Heads that need the embedding of a
mask the cache does not hold (SAM-CP's merged segments, a prompt's mask) pool the cached map over
it and apply the same head: :class:`ClipHead`, rebuilt from the weights precompute stores in the
cache (``clip_head/``, docs/cache-format.md). ``samcp.pipeline.clip`` computes the cached
embeddings with the functions here, so both sides use one geometry and one pooling rule.

Pure torch: ``samcp.models`` never imports ``samcp.pipeline``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# FC-CLIP's denominator epsilon in MaskPooling.
POOL_EPS = 1e-8

#: the head layouts :class:`ClipHead` rebuilds: LayerNorm then a linear or an MLP projection
#: (open_clip's ``timm_proj`` "linear" / "mlp", as in every open_clip ConvNeXt CLIP).
HEAD_KINDS = ("linear", "mlp")


def resized_size(height: int, width: int, input_size: int) -> tuple[int, int]:
    """(h, w) of an image inside the padded CLIP input: the longer side becomes ``input_size``."""
    s = input_size / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def mask_pool_weights(masks: Tensor, input_size: int, feat_hw: tuple[int, int]) -> Tensor:
    """Pooling weights (m, fh*fw) of masks (m, H, W) given at the original image size.

    The masks go through the image's own geometry (bilinear, antialiased resize to the resized
    image; zero pad to ``input_size`` square), then are resized bilinearly (align_corners=False) to
    the feature map, as FC-CLIP resizes its mask logits. A mask too small to reach any feature
    cell's sampling point falls back to the fraction of each cell it covers (area pooling), so it
    still pools the cells it lies in.
    """
    h, w = resized_size(*masks.shape[-2:], input_size)
    m = masks[:, None].float()
    if (h, w) != tuple(masks.shape[-2:]):
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    m = F.pad(m, (0, input_size - w, 0, input_size - h))
    wts = F.interpolate(m, size=feat_hw, mode="bilinear", align_corners=False).flatten(1)
    empty = wts.sum(1) <= 0
    if bool(empty.any()):
        wts[empty] = F.adaptive_avg_pool2d(m[empty], feat_hw).flatten(1)
    return wts


def mask_pool(flat: Tensor, weights: Tensor) -> Tensor:
    """FC-CLIP's MaskPooling: ``sum(f * m) / (sum(m) + eps)`` over a feature map.

    Args:
        flat: (C, fh*fw) feature map, flattened.
        weights: (m, fh*fw) pooling weights (:func:`mask_pool_weights`).

    Returns:
        (m, C) pooled features.
    """
    return (weights @ flat.T) / (weights.sum(1, keepdim=True) + POOL_EPS)


@dataclass(frozen=True)
class ClipHeadWeights:
    """The frozen CLIP head of a cache's CLIP, as precompute stores it (float32 numpy arrays).

    Attributes:
        kind: ``"linear"`` (``proj_weight`` (D, C), optional ``proj_bias``) or ``"mlp"``
            (``fc1_weight`` (2D, C), ``fc1_bias``, GELU, ``fc2_weight`` (D, 2D), optional
            ``fc2_bias``), after a LayerNorm over channels (``norm_weight``, ``norm_bias``).
        norm_eps: the LayerNorm's epsilon.
        tensors: the arrays named above.
        input_size: S, the side of the padded square CLIP input the cached maps were made at.
        level: the cached map the head pools (the trunk's final stage, ``clip_res5``).
    """

    kind: str
    norm_eps: float
    tensors: Mapping[str, np.ndarray]
    input_size: int
    level: str = "clip_res5"

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"CLIP head kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        need = ["norm_weight", "norm_bias"] + (
            ["proj_weight"] if self.kind == "linear" else ["fc1_weight", "fc1_bias", "fc2_weight"]
        )
        missing = [k for k in need if k not in self.tensors]
        if missing:
            raise ValueError(f"CLIP head weights lack {', '.join(missing)}")

    @property
    def in_channels(self) -> int:
        return int(self.tensors["norm_weight"].shape[0])

    @property
    def embed_dim(self) -> int:
        last = "proj_weight" if self.kind == "linear" else "fc2_weight"
        return int(self.tensors[last].shape[0])


class ClipHead(nn.Module):
    """The frozen CLIP head: (M, C) mask-pooled trunk features -> (M, D) L2-normalised embeddings.

    Equals ``ClipFeatureExtractor.embed_pooled`` of the CLIP the weights came from (tested), i.e.
    FC-CLIP's ``visual_prediction_forward_convnext`` on pooled features.
    """

    def __init__(self, weights: ClipHeadWeights) -> None:
        super().__init__()
        t = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in weights.tensors.items()}
        c = weights.in_channels
        self.kind = weights.kind
        self.input_size = int(weights.input_size)
        self.level = weights.level
        self.norm = nn.LayerNorm(c, eps=weights.norm_eps)
        self.norm.weight.data.copy_(t["norm_weight"])
        self.norm.bias.data.copy_(t["norm_bias"])
        if weights.kind == "linear":
            self.proj = _linear(t["proj_weight"], t.get("proj_bias"))
        else:
            self.proj = nn.Sequential(
                _linear(t["fc1_weight"], t["fc1_bias"]),
                nn.GELU(),
                _linear(t["fc2_weight"], t.get("fc2_bias")),
            )
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def random(
        cls,
        kind: str,
        channels: int,
        dim: int,
        norm_eps: float = 1e-5,
        input_size: int = 0,
        level: str = "clip_res5",
    ) -> ClipHead:
        """A head of the given layout with random weights (``nn.Linear``'s default init, unit
        LayerNorm), trainable: for heads that learn the projection when the cache stores none.
        The layout is open_clip's: ``mlp`` is Linear(C, 2D) + GELU + Linear(2D, D, no bias),
        ``linear`` is Linear(C, D, no bias)."""

        def lin(i: int, o: int, bias: bool) -> dict[str, np.ndarray]:
            m = nn.Linear(i, o, bias=bias)
            out = {"weight": m.weight.detach().numpy().copy()}
            if bias:
                out["bias"] = m.bias.detach().numpy().copy()
            return out

        t: dict[str, np.ndarray] = {
            "norm_weight": np.ones(channels, np.float32),
            "norm_bias": np.zeros(channels, np.float32),
        }
        if kind == "mlp":
            fc1, fc2 = lin(channels, 2 * dim, True), lin(2 * dim, dim, False)
            t.update(fc1_weight=fc1["weight"], fc1_bias=fc1["bias"], fc2_weight=fc2["weight"])
        else:
            t["proj_weight"] = lin(channels, dim, False)["weight"]
        head = cls(ClipHeadWeights(kind, norm_eps, t, input_size, level))
        return head.requires_grad_(True)

    def load_weights(self, weights: ClipHeadWeights) -> None:
        """Copies ``weights`` into this head (same layout and shapes), e.g. a cache's head into a
        model built with :meth:`random`.

        Raises:
            ValueError: another layout or other shapes.
        """
        other = ClipHead(weights)
        mine, theirs = self.state_dict(), other.state_dict()
        if weights.kind != self.kind or {k: v.shape for k, v in mine.items()} != {
            k: v.shape for k, v in theirs.items()
        }:
            shapes = {k: list(v.shape) for k, v in theirs.items()}
            raise ValueError(
                f"the cache's CLIP head ({weights.kind}, {shapes}) does not fit this model's "
                f"({self.kind}, { {k: list(v.shape) for k, v in mine.items()} })"
            )
        with torch.no_grad():
            for k, v in theirs.items():
                mine[k].copy_(v)
        self.norm.eps = other.norm.eps
        self.input_size, self.level = other.input_size, other.level

    def project(self, pooled: Tensor) -> Tensor:
        """(..., C) -> (..., D) embeddings before the L2 normalisation."""
        return self.proj(self.norm(pooled.to(self.norm.weight.dtype)))

    def forward(self, pooled: Tensor) -> Tensor:
        return F.normalize(self.project(pooled), dim=-1)

    def dense(self, maps: Tensor) -> Tensor:
        """The head at every cell of (B, C, h, w) maps -> (B, D, h, w), not normalised (on a
        1 x 1 map: the cached ``clip_mask_embed`` of a pooled feature before normalisation)."""
        return self.project(maps.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def embed_masks(self, dense: Tensor, masks: Tensor) -> Tensor:
        """(m, D) embeddings of masks (m, H, W) at the original image size, pooled from the
        cached final map ``dense`` (C, fh, fw) exactly as precompute pools proposals."""
        c, fh, fw = dense.shape
        flat = dense.float().reshape(c, fh * fw)
        if masks.shape[0] == 0:
            return self(flat.new_zeros((0, c)))
        wts = mask_pool_weights(masks.to(flat.device), self.input_size, (fh, fw))
        return self(mask_pool(flat, wts))


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    out, inp = weight.shape
    lin = nn.Linear(inp, out, bias=bias is not None)
    lin.weight.data.copy_(weight)
    if bias is not None:
        lin.bias.data.copy_(bias)
    return lin
