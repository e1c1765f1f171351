"""The PosSAM head (sec. 3.3-3.4): Local Discriminative Pooling, the IoU head, the frozen CLIP
branch and, for ``mask_source="decoder"``, an FPN + Mask2Former mask decoder on ``sam_embed``.

Pure torch. Inputs are the cache's maps and masks, all in one normalised frame (the image at the
top-left of a square, padded bottom/right):

* ``sam_embed`` (B, sam_dim, G, G): F_sam, SAM's 256 x 64 x 64 neck output at its 1024 frame;
* ``clip_map`` (B, C, h, w): one dense CLIP map (``clip_level``) at the CLIP frame;
* ``masks`` (B, N, G, G): the proposals' coverage of the G x G frame cells (soft, in [0, 1]);
* ``clip_embed`` (B, N, D): the cache's frozen CLIP mask embeddings of the proposals (G_clip).

Choices where the paper is silent (for docs/heads/possam.md):

* LDP pools ``sam_embed`` (F_sam) on the SAM side. The paper says "ROI Pool on output region
  features F_masked"; F_sam is what both mask sources share, and it keeps LDP independent of the
  decoder (the decoder path detaches its masks before pooling, so the class loss trains LDP and
  never bends the masks).
* LDP's self-attention runs across the masks of one image (tokens = masks, no positional
  encoding, padding masked out), so LDP is equivariant to the order of the masks. The paper only
  says the concatenated streams are "fused using self-attention".
* The IoU head must be class-agnostic ("trained in a category-agnostic manner and can easily
  generalize to unseen classes", sec. 3.3), so it reads SAM-side features only: the decoder's
  query features (F_masked) on the decoder path, the mask-pooled F_sam on the proposals path
  (``iou_features="sam"``). Reading LDP's fused features (``iou_features="ldp"``) lets CLIP's
  semantics in: trained on seen classes, the head then predicts a low IoU for good masks of unseen
  classes (measured on the synthetic split: mean predicted IoU 0.07 for unseen-class proposals
  with true IoU 0.83, against 0.59 for seen ones), and MASE, which weighs every score by it,
  suppresses the unseen classes.
* Decoder path, CLIP branch: the cache has one CLIP embedding per *proposal*, not per predicted
  mask. A predicted mask's G_clip is the normalised mean of the proposals' unit embeddings
  weighted by |pred ∩ proposal| / |proposal| on the G-grid soft masks. This is a deviation: exact
  mask pooling of the predicted mask would need CLIP's pooling head at predict time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import MLP
from ..openvocab import OpenVocabClassifier, text_logits
from .config import PossamConfig

POOL_EPS = 1e-6


@dataclass
class PossamOutput:
    """What :class:`PossamHead` returns.

    Attributes:
        class_logits: (B, N, K + 1) LDP logits, void last.
        iou: (B, N) predicted IoU in [0, 1].
        clip_logits: (B, N, K) frozen CLIP logits (``clip_logit_scale`` x cosine), or None without
            CLIP mask embeddings.
        masks: (B, N, G, G) soft masks on the SAM grid (proposals: the input coverage; decoder:
            the area-downsampled sigmoid masks).
        mask_logits: (B, N, 4G, 4G) decoder path only (None for proposals).
        valid: (B, N) bool.
        aux_mask_logits: decoder path: the mask logits before the last layer (initial queries and
            each intermediate layer), for deep supervision.
    """

    class_logits: Tensor
    iou: Tensor
    clip_logits: Tensor | None
    masks: Tensor
    mask_logits: Tensor | None
    valid: Tensor
    aux_mask_logits: tuple[Tensor, ...] = field(default_factory=tuple)


# ----------------------------------------------------------------------------------------------
# Mask pooling.
# ----------------------------------------------------------------------------------------------


def resize_coverage(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., h, w) coverage masks resampled to ``size`` on the same frame.

    Downsampling averages cells (area; exact for integer factors), upsampling is bilinear.
    """
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:])
    if size[0] <= masks.shape[-2] and size[1] <= masks.shape[-1]:
        out = F.interpolate(flat, size=size, mode="area")
    else:
        out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def masked_average_pool(feat: Tensor, masks: Tensor) -> Tensor:
    """(B, N, C) ``sum m F / sum m`` of (B, C, h, w) features under (B, N, h', w') soft masks
    (resized to the map's grid first); 0 for a mask that covers nothing on the map."""
    m = resize_coverage(masks.to(feat.dtype), tuple(feat.shape[-2:])).flatten(2)  # (B, N, hw)
    num = torch.bmm(m, feat.flatten(2).transpose(1, 2))  # (B, N, C)
    den = m.sum(-1, keepdim=True)
    return torch.where(den > POOL_EPS, num / den.clamp_min(POOL_EPS), torch.zeros_like(num))


# ----------------------------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------------------------


class SelfAttentionBlock(nn.Module):
    """Post-norm self-attention + FFN over the tokens of each batch row (Mask2Former style)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        a = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        x = self.norm1(x + self.drop(a))
        return self.norm2(x + self.drop(self.ffn(x)))


def _key_padding(valid: Tensor) -> Tensor:
    """Key padding mask from (B, N) validity; a row without any valid mask attends to everything
    (its outputs are ignored) so softmax never sees an all -inf row."""
    pad = ~valid
    return pad & valid.any(-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# Local Discriminative Pooling (sec. 3.4).
# ----------------------------------------------------------------------------------------------


class LocalDiscriminativePooling(nn.Module):
    """Mask-pool the SAM and CLIP maps, project each stream (Linear -> ldp_dim), concatenate, fuse
    with self-attention across the masks, project to the text space (Linear) and LayerNorm -> G_ldp.

    With ``pooling="sam"`` / ``"clip"`` only that stream is used (paper table 5's mask-pooling
    baselines, here still followed by the same fusion and projection).
    """

    def __init__(self, config: PossamConfig) -> None:
        super().__init__()
        self.use_sam = config.pooling in ("ldp", "sam")
        self.use_clip = config.pooling in ("ldp", "clip")
        self.sam_proj = nn.Linear(config.sam_dim, config.ldp_dim) if self.use_sam else None
        self.clip_proj = nn.Linear(config.clip_channels, config.ldp_dim) if self.use_clip else None
        width = config.ldp_width
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(width, config.ldp_heads, config.ffn, config.dropout)
            for _ in range(config.ldp_layers)
        )
        self.to_text = nn.Linear(width, config.text_dim)
        self.norm = nn.LayerNorm(config.text_dim)

    def forward(
        self, sam_embed: Tensor, clip_map: Tensor, masks: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Returns (fused features (B, N, width), G_ldp (B, N, text_dim))."""
        streams = []
        if self.sam_proj is not None:
            streams.append(self.sam_proj(masked_average_pool(sam_embed, masks)))
        if self.clip_proj is not None:
            streams.append(self.clip_proj(masked_average_pool(clip_map, masks)))
        x = torch.cat(streams, dim=-1)
        pad = _key_padding(valid)
        for block in self.blocks:
            x = block(x, pad)
        return x, self.norm(self.to_text(x))


# ----------------------------------------------------------------------------------------------
# Decoder path: FPN on F_sam and a Mask2Former decoder (sec. 3.3).
# ----------------------------------------------------------------------------------------------


def _conv_gn(cin: int, cout: int, k: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
        nn.GroupNorm(_groups(cout), cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class SamFPN(nn.Module):
    """F_sam (stride 16) -> maps at strides 32, 16, 8, 4 of the frame by convolutions and
    deconvolutions (the paper's "combination of convolutions and deconvolution layers"; the
    layout is ViTDet's simple feature pyramid), then a top-down FPN pixel decoder (Mask2Former's
    FPN variant; the paper keeps M2F's pixel decoder, whose multi-scale deformable attention we
    leave out). Returns the three coarse maps (strides 32, 16, 8) and the stride-4 mask features.
    """

    def __init__(self, config: PossamConfig) -> None:
        super().__init__()
        c, h = config.sam_dim, config.hidden
        self.down32 = nn.Sequential(
            nn.Conv2d(c, h, 3, stride=2, padding=1), nn.GroupNorm(_groups(h), h)
        )
        self.same16 = nn.Sequential(nn.Conv2d(c, h, 1), nn.GroupNorm(_groups(h), h))
        self.up8 = nn.Sequential(nn.ConvTranspose2d(c, h, 2, stride=2), nn.GroupNorm(_groups(h), h))
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(c, h, 2, stride=2),
            nn.GroupNorm(_groups(h), h),
            nn.GELU(),
            nn.ConvTranspose2d(h, h, 2, stride=2),
            nn.GroupNorm(_groups(h), h),
        )
        self.lateral = nn.ModuleList(_conv_gn(h, h, 1, relu=False) for _ in range(3))
        self.output = nn.ModuleList(_conv_gn(h, h, 3) for _ in range(4))
        self.mask_features = nn.Conv2d(h, config.mask_dim, 1)

    def forward(self, sam_embed: Tensor) -> tuple[list[Tensor], Tensor]:
        pyramid = [
            self.down32(sam_embed),
            self.same16(sam_embed),
            self.up8(sam_embed),
            self.up4(sam_embed),
        ]
        y = self.output[0](pyramid[0])
        outs = [y]
        for i, lvl in enumerate(pyramid[1:]):
            y = self.lateral[i](lvl) + F.interpolate(y, size=lvl.shape[-2:], mode="nearest")
            y = self.output[i + 1](y)
            outs.append(y)
        return outs[:3], self.mask_features(outs[3])


def sine_position(x: Tensor, dim: int) -> Tensor:
    """(B, h*w, dim) normalised 2-D sine positional encoding of a (B, C, h, w) map (DETR / M2F)."""
    b, _, h, w = x.shape
    half = dim // 2
    ys = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    t = 10000 ** (2 * (torch.arange(half, device=x.device) // 2) / half)
    py = ys[:, None] / t  # (h, half)
    px = xs[:, None] / t  # (w, half)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], dim=2).flatten(1)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], dim=2).flatten(1)
    pos = torch.cat(
        [py[:, None, :].expand(h, w, half), px[None, :, :].expand(h, w, half)], dim=-1
    ).reshape(1, h * w, 2 * half)
    return pos.expand(b, -1, -1).to(x.dtype)


class MaskedDecoderLayer(nn.Module):
    """Mask2Former decoder layer: masked cross-attention, self-attention, FFN (post-norm)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.cross = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_self = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim)
        )
        self.norm_ffn = nn.LayerNorm(dim)

    def forward(
        self, q: Tensor, qpos: Tensor, memory: Tensor, mpos: Tensor, attn_mask: Tensor
    ) -> Tensor:
        a = self.cross(q + qpos, memory + mpos, memory, attn_mask=attn_mask, need_weights=False)[0]
        q = self.norm_cross(q + a)
        a = self.self_attn(q + qpos, q + qpos, q, need_weights=False)[0]
        q = self.norm_self(q + a)
        return self.norm_ffn(q + self.ffn(q))


class MaskDecoder(nn.Module):
    """FPN + Mask2Former transformer decoder on F_sam -> (mask logits per prediction, queries).

    Layer i cross-attends to coarse level i mod 3 (strides 32, 16, 8 of the frame, M2F's
    round-robin), masked by the previous prediction (sigmoid < 0.5 is hidden; a query whose mask
    hides everything sees everything). Masks are ``mask_embed(query) . mask_features`` at stride 4.
    """

    def __init__(self, config: PossamConfig) -> None:
        super().__init__()
        h = config.hidden
        self.fpn = SamFPN(config)
        self.query_feat = nn.Embedding(config.num_queries, h)
        self.query_pos = nn.Embedding(config.num_queries, h)
        self.level_embed = nn.Embedding(3, h)
        self.layers = nn.ModuleList(
            MaskedDecoderLayer(h, config.dec_heads, config.dec_ffn, config.dropout)
            for _ in range(config.dec_layers)
        )
        self.norm = nn.LayerNorm(h)
        self.mask_embed = MLP(h, h, config.mask_dim, 3)
        self.heads = config.dec_heads

    def _predict(
        self, q: Tensor, mask_features: Tensor, size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        qn = self.norm(q)
        logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(qn), mask_features)
        with torch.no_grad():
            m = F.interpolate(logits.detach(), size=size, mode="bilinear", align_corners=False)
            hide = m.flatten(2).sigmoid() < 0.5  # (B, Q, hw)
            hide[hide.all(-1)] = False
            hide = hide.repeat_interleave(self.heads, dim=0)
        return logits, qn, hide

    def forward(self, sam_embed: Tensor) -> tuple[list[Tensor], Tensor]:
        """Returns ([mask logits (B, Q, 4G, 4G) of each prediction, last = final], final queries)."""
        levels, mask_features = self.fpn(sam_embed)
        b = sam_embed.shape[0]
        mems = [
            lv.flatten(2).transpose(1, 2) + self.level_embed.weight[i]
            for i, lv in enumerate(levels)
        ]
        poss = [sine_position(lv, lv.shape[1]) for lv in levels]
        q = self.query_feat.weight[None].expand(b, -1, -1)
        qpos = self.query_pos.weight[None].expand(b, -1, -1)
        logits, qn, hide = self._predict(q, mask_features, tuple(levels[0].shape[-2:]))
        preds = [logits]
        for i, layer in enumerate(self.layers):
            lvl = i % 3
            q = layer(q, qpos, mems[lvl], poss[lvl], hide)
            nxt = tuple(levels[(i + 1) % 3].shape[-2:])
            logits, qn, hide = self._predict(q, mask_features, nxt)
            preds.append(logits)
        return preds, qn


# ----------------------------------------------------------------------------------------------
# The head.
# ----------------------------------------------------------------------------------------------


def overlap_clip_embed(
    pred: Tensor, proposals: Tensor, valid: Tensor, clip_embed: Tensor
) -> Tensor:
    """(B, Q, D) CLIP embedding of predicted masks from the proposals' cached embeddings.

    ``normalise(sum_p w_qp e_p / |e_p|)`` with ``w_qp = |pred_q ∩ proposal_p| / |proposal_p|`` on
    the soft G-grid masks; a prediction overlapping no proposal gets the zero vector (CLIP logits
    0, i.e. a uniform CLIP distribution).
    """
    p = proposals.flatten(2) * valid[..., None]
    inter = torch.bmm(pred.flatten(2), p.transpose(1, 2))  # (B, Q, N)
    w = inter / p.sum(-1).clamp_min(POOL_EPS)[:, None, :]
    return F.normalize(torch.bmm(w, F.normalize(clip_embed, dim=-1)), dim=-1)


class PossamHead(nn.Module):
    """LDP + IoU head (+ the mask decoder for ``mask_source="decoder"``); see the module doc."""

    def __init__(self, config: PossamConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = MaskDecoder(config) if config.mask_source == "decoder" else None
        self.ldp = LocalDiscriminativePooling(config)
        self.classifier = OpenVocabClassifier(config.text_dim, config.init_temperature)
        if self.decoder is not None:
            iou_in = config.hidden
        else:
            iou_in = config.sam_dim if config.iou_features == "sam" else config.ldp_width
        self.iou_head = MLP(iou_in, config.iou_hidden, 1, config.iou_layers)

    def forward(
        self,
        sam_embed: Tensor,
        clip_map: Tensor,
        masks: Tensor,
        valid: Tensor,
        text_embed: Tensor,
        clip_embed: Tensor | None = None,
    ) -> PossamOutput:
        """Args: see the module docstring; ``text_embed`` (K, D) class embeddings."""
        cfg = self.config
        aux: tuple[Tensor, ...] = ()
        if self.decoder is None:
            out_masks, out_valid, mask_logits = masks, valid, None
            feats, g_ldp = self.ldp(sam_embed, clip_map, masks, valid)
            if cfg.iou_features == "sam":  # class-agnostic: SAM's features only
                feats = masked_average_pool(sam_embed, masks)
            iou = self.iou_head(feats).squeeze(-1).sigmoid()
        else:
            preds, queries = self.decoder(sam_embed)
            mask_logits = preds[-1]
            aux = tuple(preds[:-1])
            g = cfg.sam_grid
            out_masks = resize_coverage(mask_logits.detach().sigmoid(), (g, g))
            out_valid = torch.ones(out_masks.shape[:2], dtype=torch.bool, device=out_masks.device)
            _, g_ldp = self.ldp(sam_embed, clip_map, out_masks, out_valid)
            iou = self.iou_head(queries).squeeze(-1).sigmoid()
        class_logits = self.classifier(g_ldp, text_embed)
        clip_logits = None
        if clip_embed is not None:
            with torch.no_grad():
                emb = clip_embed
                if self.decoder is not None:
                    emb = overlap_clip_embed(out_masks, masks, valid, clip_embed)
                clip_logits = text_logits(emb.float(), text_embed.float(), cfg.clip_logit_scale)
        return PossamOutput(
            class_logits=class_logits,
            iou=iou,
            clip_logits=clip_logits,
            masks=out_masks,
            mask_logits=mask_logits,
            valid=out_valid,
            aux_mask_logits=aux,
        )


def build_possam_head(config: PossamConfig) -> PossamHead:
    return PossamHead(config)
