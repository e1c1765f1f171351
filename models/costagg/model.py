"""The cost-aggregation network (CAT-Seg, Cho et al. CVPR 2024, sec. 3; code: ``Aggregator`` in
cat_seg/modeling/transformer/model.py), on cached dense CLIP maps.

    E = proj(LN(F_res5))                          per-pixel image embeddings in the text space
    C(i, n) = E(i) . T(n) / (|E(i)| |T(n)|)        cost volume, (B, K, h, w)
    F(:, n) = Conv7x7(C(:, n))                     cost embedding, per class
    F' = SpatialAgg(F, proj(E))                    2 Swin blocks per class
    F'' = ClassAgg(F', proj(T))                    linear attention across classes
    logits(n) = Decoder(F''(:, n), lateral(res4), lateral(res3))

Hook points for the heads built on it (SAM-MI, ESC-Net; docs/heads/costagg.md):

* :meth:`CostAggregationNet.encode` -> :class:`Encoded` (cost, cost embedding, guidances);
* :meth:`CostAggregationNet.aggregate` runs the layers, calling ``hook(index, features)`` after
  each one (ESC-Net inserts blocks there; SAM-MI's low-frequency injection acts on the result);
* :meth:`CostAggregationNet.decoder_guidance` -> the projected guidance maps (SAM-MI's
  high-frequency injection edits them);
* :meth:`CostAggregationNet.decode` (features, guidance) -> per-class logits.

Tensors are (B, C, K, h, w) between the stages: batch, channels, classes, space (CAT-Seg's
``B C T H W``). Pure torch; no ``einops``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cliphead import ClipHead
from .config import CostAggConfig

#: attention bias of keys a query must not see (Swin uses -100 between shifted regions)
_MASKED = -100.0


@dataclass
class CostAggOutput:
    """What the head returns.

    Attributes:
        logits: (B, K, H', W') per-class logits on the CLIP frame at the decoder's output stride
            (``clip_level``'s stride / 2^stages; stride 8 on a 1024 frame with res5 and 2 stages).
        cost: (B, K, h, w) the raw cosine cost volume on the ``clip_level`` grid (SAM-MI's TSPP
            reads pixel-text costs).
    """

    logits: Tensor
    cost: Tensor


@dataclass
class Encoded:
    """The cost volume and everything the aggregation layers read (:meth:`encode`'s output).

    Attributes:
        cost: (B, K, h, w) cosine similarities of the per-pixel embeddings with the classes.
        features: (B, hidden, K, h, w) the embedded cost volume.
        appearance: (B, A, h, w) projected per-pixel embeddings (spatial aggregation guidance).
        text: (K, Tg) projected class embeddings (class aggregation guidance).
        embed: (B, D, h, w) the per-pixel image embeddings in the text space.
    """

    cost: Tensor
    features: Tensor
    appearance: Tensor
    text: Tensor
    embed: Tensor


# ----------------------------------------------------------------------------------------------
# Per-pixel image embeddings: the CLIP tower's head applied at every cell.
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Spatial aggregation: Swin blocks over each class's cost map, guided by the image embeddings.
# ----------------------------------------------------------------------------------------------


def _mlp(dim: int, ratio: float, act: type[nn.Module]) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim))


def window_bias(height: int, width: int, window: int, shift: int, device: torch.device) -> Tensor:
    """(num_windows, N, N) attention bias of a (height, width) map padded to whole windows.

    A key gets ``_MASKED`` when it lies in the padding, or (shifted windows) in another region of
    the cyclically shifted map than the query (Swin's shifted-window mask). Windows are in
    row-major order of the padded, shifted map, as :func:`_windows` makes them.
    """
    hp = -(-height // window) * window
    wp = -(-width // window) * window
    valid = torch.zeros(hp, wp, dtype=torch.bool, device=device)
    valid[:height, :width] = True
    region = torch.zeros(hp, wp, device=device)
    if shift > 0:
        cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        n = 0
        for hs in cuts:
            for ws in cuts:
                region[hs, ws] = n
                n += 1
        valid = torch.roll(valid, shifts=(-shift, -shift), dims=(0, 1))
    # Padding gets region -1 so that it never matches an image cell.
    region = torch.where(valid, region, torch.full_like(region, -1.0))
    r = _windows(region[None, :, :, None], window).squeeze(-1)[:, :, None]  # (nW, N, 1)
    v = _windows(valid[None, :, :, None].float(), window).squeeze(-1)  # (nW, N)
    allowed = (r == r.transpose(1, 2)) & (v[:, None, :] > 0)
    return torch.where(allowed, 0.0, _MASKED)


def _windows(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of ``window`` -> (B * nW, window * window, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def _unwindow(x: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`_windows`: (B * nW, window * window, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    x = x.reshape(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


class GuidedWindowAttention(nn.Module):
    """Multi-head window self-attention whose queries and keys also see a guidance vector per
    token (code: ``WindowAttention``: q, k from [x, guidance], v from x; no relative position
    bias)."""

    def __init__(self, dim: int, guidance_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, guided: Tensor, bias: Tensor) -> Tensor:
        """x (B', N, C), guided (B', N, C + G), bias (nW, N, N) with B' = batch * nW."""
        b, n, c = x.shape
        h = self.heads
        q = self.q(guided).reshape(b, n, h, -1).transpose(1, 2)
        k = self.k(guided).reshape(b, n, h, -1).transpose(1, 2)
        v = self.v(x).reshape(b, n, h, -1).transpose(1, 2)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B', h, N, N)
        nw = bias.shape[0]
        attn = attn.reshape(b // nw, nw, h, n, n) + bias[None, :, None].to(attn.dtype)
        attn = attn.reshape(b, h, n, n).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class SwinBlock(nn.Module):
    """One (shifted-)window transformer block with appearance guidance (code:
    ``SwinTransformerBlock``): pre-norm window attention and MLP, both residual.

    Maps whose sides are not multiples of the window are padded, and the padding is masked out
    of attention (CAT-Seg's 24 x 24 maps are two 12-cell windows wide; a cached 1024 frame's res5
    is 32 x 32).
    """

    def __init__(
        self, dim: int, guidance_dim: int, heads: int, window: int, shift: bool, mlp_ratio: float
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GuidedWindowAttention(dim, guidance_dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_ratio, nn.GELU)

    def forward(self, x: Tensor, guidance: Tensor | None) -> Tensor:
        """x (B', h, w, C); guidance (B', h, w, G) or None."""
        b, h, w, c = x.shape
        window = min(self.window, h, w)
        # As Swin / CAT-Seg: no shift when one window covers the map.
        shift = window // 2 if self.shift and min(h, w) > self.window else 0
        y = self.norm1(x)
        guided = y if guidance is None else torch.cat([y, guidance], dim=-1)
        both = torch.cat([y, guided], dim=-1)
        ph, pw = (-h) % window, (-w) % window
        if ph or pw:
            both = F.pad(both, (0, 0, 0, pw, 0, ph))
        if shift:
            both = torch.roll(both, shifts=(-shift, -shift), dims=(1, 2))
        hp, wp = h + ph, w + pw
        win = _windows(both, window)
        bias = window_bias(h, w, window, shift, x.device)
        out = self.attn(win[..., :c], win[..., c:], bias)
        out = _unwindow(out, window, hp, wp)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        x = x + out[:, :h, :w]
        return x + self.mlp(self.norm2(x))


class SpatialAggregation(nn.Module):
    """Two Swin blocks (window, shifted window) over every class's cost embedding, sharing the
    image's appearance guidance (code: ``SwinTransformerBlockWrapper``)."""

    def __init__(
        self, dim: int, guidance_dim: int, heads: int, window: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        self.block1 = SwinBlock(dim, guidance_dim, heads, window, False, mlp_ratio)
        self.block2 = SwinBlock(dim, guidance_dim, heads, window, True, mlp_ratio)
        self.guidance_norm = nn.LayerNorm(guidance_dim)

    def forward(self, x: Tensor, appearance: Tensor) -> Tensor:
        """x (B, C, K, h, w), appearance (B, G, h, w) -> (B, C, K, h, w)."""
        b, c, k, h, w = x.shape
        t = x.permute(0, 2, 3, 4, 1).reshape(b * k, h, w, c)
        g = self.guidance_norm(appearance.permute(0, 2, 3, 1))
        g = g[:, None].expand(b, k, h, w, g.shape[-1]).reshape(b * k, h, w, -1)
        t = self.block2(self.block1(t, g), g)
        return t.reshape(b, k, h, w, c).permute(0, 4, 1, 2, 3)


# ----------------------------------------------------------------------------------------------
# Class aggregation: linear attention across the classes at every (pooled) location.
# ----------------------------------------------------------------------------------------------


def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """Katharopoulos et al.'s linear attention with the elu + 1 feature map (code:
    ``LinearAttention``): ``phi(Q) (phi(K)^T V) / (phi(Q) sum_j phi(K_j))``.

    Args:
        q, k, v: (N, L, H, d) queries, keys, values (L tokens, H heads).

    Returns:
        (N, L, H, d). Every token attends to every token with no position information, so the
        output is equivariant to the order of the L tokens and works for any L.
    """
    q = F.elu(q) + 1
    k = F.elu(k) + 1
    length = v.shape[1]
    v = v / length  # keeps half-precision sums in range, undone below
    kv = torch.einsum("nlhd,nlhe->nhde", k, v)
    z = 1.0 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhde,nlh->nlhe", q, kv, z) * length


class ClassAggregation(nn.Module):
    """Linear attention across classes (code: ``ClassTransformerLayer``): the cost embedding is
    average-pooled over ``pool`` x ``pool`` cells, the K class tokens of every location attend to
    each other (queries and keys also see the projected class text), an MLP follows, and the
    result is upsampled back and added. Fewer than ``pad_len`` classes are padded with a learned
    token (and a learned text guidance) so that the attention's normaliser sees a fixed number of
    tokens; with K >= pad_len nothing is padded (CAT-Seg would keep the pad_len classes of
    highest cost instead; see docs/heads/costagg.md).
    """

    def __init__(
        self, dim: int, guidance_dim: int, heads: int, pool: int, pad_len: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        self.heads = heads
        self.pool = pool
        self.pad_len = pad_len
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_ratio, nn.ReLU)
        self.pad_token = nn.Parameter(torch.zeros(dim)) if pad_len > 0 else None
        self.pad_guidance = nn.Parameter(torch.zeros(guidance_dim)) if pad_len > 0 else None

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        """x (B, C, K, h, w), text (K, G) -> (B, C, K, h, w)."""
        b, c, k, h, w = x.shape
        t = x.permute(0, 2, 1, 3, 4).reshape(b * k, c, h, w)
        if self.pool > 1:
            t = F.avg_pool2d(t, self.pool)
        hh, ww = t.shape[-2:]
        tokens = t.reshape(b, k, c, hh * ww).permute(0, 3, 1, 2).reshape(b * hh * ww, k, c)
        guide = text.to(tokens.dtype)
        n_pad = self.pad_len - k if self.pad_token is not None else 0
        if n_pad > 0:
            tokens = torch.cat([tokens, self.pad_token.expand(tokens.shape[0], n_pad, c)], 1)
            guide = torch.cat([guide, self.pad_guidance.expand(n_pad, -1)], 0)
        guide = guide[None].expand(tokens.shape[0], -1, -1)
        y = self.norm1(tokens)
        yg = torch.cat([y, guide], dim=-1)
        n, length, _ = y.shape
        q = self.q(yg).reshape(n, length, self.heads, -1)
        kk = self.k(yg).reshape(n, length, self.heads, -1)
        v = self.v(y).reshape(n, length, self.heads, -1)
        tokens = tokens + linear_attention(q, kk, v).reshape(n, length, c)
        tokens = tokens + self.mlp(self.norm2(tokens))
        tokens = tokens[:, :k]
        t = tokens.reshape(b, hh, ww, k, c).permute(0, 3, 4, 1, 2).reshape(b * k, c, hh, ww)
        if (hh, ww) != (h, w):
            t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=True)
        return x + t.reshape(b, k, c, h, w).permute(0, 2, 1, 3, 4)


class AggregationLayer(nn.Module):
    """Spatial then class aggregation (code: ``AggregatorLayer``)."""

    def __init__(self, config: CostAggConfig) -> None:
        super().__init__()
        c = config
        self.spatial = SpatialAggregation(
            c.hidden_dim, c.appearance_guidance_proj_dim, c.num_heads, c.window_size, c.mlp_ratio
        )
        self.classes = ClassAggregation(
            c.hidden_dim,
            c.text_guidance_proj_dim,
            c.num_heads,
            c.pooling_size,
            c.pad_len,
            c.mlp_ratio,
        )

    def forward(self, x: Tensor, appearance: Tensor, text: Tensor) -> Tensor:
        return self.classes(self.spatial(x, appearance), text)


# ----------------------------------------------------------------------------------------------
# Upsampling decoder guided by the finer CLIP levels.
# ----------------------------------------------------------------------------------------------


def _groups(channels: int) -> int:
    """GroupNorm groups: CAT-Seg's channels // 16, at least 1, dividing ``channels``."""
    g = max(1, channels // 16)
    while channels % g:
        g -= 1
    return g


class UpBlock(nn.Module):
    """x2 transposed convolution, concatenation with the stage's projected guidance, two
    3 x 3 conv + GroupNorm + ReLU (code: ``Up`` / ``DoubleConv``). The transposed convolution
    makes ``in - guidance`` channels so that the concatenation has ``in`` channels again."""

    def __init__(self, in_dim: int, out_dim: int, guidance_dim: int) -> None:
        super().__init__()
        self.guidance_dim = guidance_dim
        self.up = nn.ConvTranspose2d(in_dim, in_dim - guidance_dim, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            nn.Conv2d(in_dim, out_dim, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(out_dim), out_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(out_dim), out_dim),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor, guidance: Tensor | None) -> Tensor:
        """x (B * K, C, h, w); guidance (B, G, 2h, 2w) or None (unguided stage)."""
        x = self.up(x)
        if self.guidance_dim:
            if guidance is None:
                raise ValueError("this decoder stage is guided but got no guidance map")
            if guidance.shape[-2:] != x.shape[-2:]:
                raise ValueError(
                    f"decoder guidance is {tuple(guidance.shape[-2:])}, the stage works at "
                    f"{tuple(x.shape[-2:])}: a guidance level must have half the stride of the "
                    "previous stage"
                )
            k = x.shape[0] // guidance.shape[0]
            g = guidance[:, None].expand(-1, k, -1, -1, -1).reshape(x.shape[0], -1, *x.shape[-2:])
            x = torch.cat([x, g.to(x.dtype)], dim=1)
        return self.conv(x)


# ----------------------------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------------------------


#: ``hook(layer_index, features) -> features``, called after each aggregation layer
AggregationHook = Callable[[int, Tensor], Tensor]


class CostAggregationNet(nn.Module):
    """CAT-Seg's cost-aggregation network on cached CLIP maps (see the module doc).

    ``forward(clip_map, guidance, text_embed)`` takes the ``clip_level`` map (B, C, h, w), the
    guidance levels' maps (a list, finest last, each (B, C_i, h * 2^(i+1), w * 2^(i+1))) and the
    class text embeddings (K, D), and returns :class:`CostAggOutput`.
    """

    def __init__(self, config: CostAggConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        # The CLIP tower's head (open_clip layout). Built random here; with clip_head_source
        # "cache" (the default) the plugin copies the cache's frozen head in before training
        # (CostAggPlugin.init_from_cache), and it is saved with the model.
        self.clip_head = ClipHead.random(
            c.clip_proj, c.clip_channels, c.text_dim, c.clip_norm_eps, c.clip_input_size
        )
        self.corr_embed = nn.Conv2d(1, c.hidden_dim, c.corr_kernel, padding=c.corr_kernel // 2)
        self.appearance_proj = nn.Sequential(
            nn.Conv2d(c.text_dim, c.appearance_guidance_proj_dim, 3, padding=1), nn.ReLU()
        )
        self.text_proj = nn.Sequential(nn.Linear(c.text_dim, c.text_guidance_proj_dim), nn.ReLU())
        self.layers = nn.ModuleList(AggregationLayer(c) for _ in range(c.num_layers))
        self.guidance_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch, g, 3, padding=1), nn.ReLU())
            for ch, g in zip(c.guidance_channels, c.decoder_guidance_proj_dims)
        )
        ins = (c.hidden_dim, *c.decoder_dims[:-1])
        self.decoder = nn.ModuleList(
            UpBlock(
                i_dim,
                o_dim,
                c.decoder_guidance_proj_dims[i] if i < len(c.guidance_levels) else 0,
            )
            for i, (i_dim, o_dim) in enumerate(zip(ins, c.decoder_dims))
        )
        self.head = nn.Conv2d(c.decoder_dims[-1], 1, 3, padding=1)

    @property
    def output_stride_factor(self) -> int:
        """How many times finer the logits are than the ``clip_level`` grid."""
        return 2 ** len(self.decoder)

    # --- hooks --------------------------------------------------------------------------------

    def embed_image(self, clip_map: Tensor) -> Tensor:
        """(B, C, h, w) cached map -> (B, D, h, w) per-pixel embeddings in the text space."""
        return self.clip_head.dense(clip_map)

    def encode(self, clip_map: Tensor, text_embed: Tensor) -> Encoded:
        """Cost volume, its embedding and the two aggregation guidances."""
        embed = self.embed_image(clip_map)
        text = F.normalize(text_embed.to(embed.dtype), dim=-1)
        cost = torch.einsum("bdhw,kd->bkhw", F.normalize(embed, dim=1), text)
        b, k, h, w = cost.shape
        features = self.corr_embed(cost.reshape(b * k, 1, h, w))
        features = features.reshape(b, k, -1, h, w).transpose(1, 2)
        return Encoded(
            cost=cost,
            features=features,
            appearance=self.appearance_proj(embed),
            text=self.text_proj(text),
            embed=embed,
        )

    def aggregate(self, encoded: Encoded, hook: AggregationHook | None = None) -> Tensor:
        """The aggregation layers on ``encoded.features`` -> (B, hidden, K, h, w).

        ``hook(i, features)`` runs after layer i and returns the features the next layer gets
        (ESC-Net's blocks between layers).
        """
        x = encoded.features
        for i, layer in enumerate(self.layers):
            x = layer(x, encoded.appearance, encoded.text)
            if hook is not None:
                x = hook(i, x)
        return x

    def decoder_guidance(self, guidance: Sequence[Tensor]) -> list[Tensor | None]:
        """Lateral projections of the guidance levels, one per decoder stage (None: unguided)."""
        if len(guidance) != len(self.guidance_proj):
            raise ValueError(
                f"got {len(guidance)} guidance maps for {len(self.guidance_proj)} guidance levels"
            )
        out: list[Tensor | None] = [proj(g) for proj, g in zip(self.guidance_proj, guidance)]
        return out + [None] * (len(self.decoder) - len(out))

    def decode(self, features: Tensor, guidance: Sequence[Tensor | None]) -> Tensor:
        """(B, hidden, K, h, w) aggregated features + projected guidance -> (B, K, H', W')."""
        b, c, k, h, w = features.shape
        x = features.transpose(1, 2).reshape(b * k, c, h, w)
        for block, g in zip(self.decoder, guidance):
            x = block(x, g)
        x = self.head(x)
        return x.reshape(b, k, *x.shape[-2:])

    def forward(
        self, clip_map: Tensor, guidance: Sequence[Tensor], text_embed: Tensor
    ) -> CostAggOutput:
        encoded = self.encode(clip_map, text_embed)
        features = self.aggregate(encoded)
        logits = self.decode(features, self.decoder_guidance(guidance))
        return CostAggOutput(logits=logits, cost=encoded.cost)


def build_costagg_head(config: CostAggConfig) -> CostAggregationNet:
    """The cost-aggregation network of ``config``."""
    return CostAggregationNet(config)
