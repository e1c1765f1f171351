"""SAM-CP's affinity head over cached frozen-CLIP features (Chen et al., sections 3.2-3.3, appendix A.1).

Data flow for a batch of B images, P (padded) patches per image and K classes:

    clip maps --1x1 proj--> RoIAlign(patch box) x patch mask crop --MLP, LN--> f_n   (MaskRoI, A.1)
    f_n + box position --omega self-attention layers--> patch features K=V           (3.2.1)
    queries: K Type-I from text embeddings, P Type-II = patch features (PasQ)          (3.2.2)
    per decoder layer: self-attn -> affinity (Algorithm 1, + refinement) -> dynamic cross-attn
                       -> FFN -> query enhancement (RoI of the merged box)
    outputs per layer: affinity logits (B, K+P, P), class logits (B, K+P, K)          (eq. 1)

All tensors in, all tensors out; the data loader supplies the batch described in `AffinityHead.forward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ..layers import MLP
from ..openvocab import geometric_ensemble, kappa_fusion
from .config import AffinityConfig
from .denoising import DenoisingQueries, denoising_attn_mask

# ----------------------------------------------------------------------------------------------
# Small tensor helpers shared by the model, the matcher and inference.
# ----------------------------------------------------------------------------------------------


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    return torch.cat(
        [(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], dim=-1
    )


def normalized_affinity(logits: Tensor, patch_valid: Tensor, eps: float = 1e-6) -> Tensor:
    """sigmoid(A) min-max normalised over each query's valid patches (the official code's
    `with_score_norm`; section 3.3's "normalized and quantized affinity").

    Args:
        logits: (..., Q, P) affinity logits.
        patch_valid: (..., P) bool.

    Returns:
        (..., Q, P) in [0, 1]; 0 on padded patches; 1 on every valid patch of a row whose
        affinities are all equal (a degenerate row keeps every patch rather than none).
    """
    valid = patch_valid.unsqueeze(-2)
    prob = logits.sigmoid()
    hi = prob.masked_fill(~valid, -1.0).amax(-1, keepdim=True)
    lo = prob.masked_fill(~valid, 2.0).amin(-1, keepdim=True)
    span = hi - lo
    norm = torch.where(span > eps, (prob - lo) / span.clamp_min(eps), torch.ones_like(prob))
    return norm.masked_fill(~valid, 0.0)


def merge_patches(
    logits: Tensor, patch_valid: Tensor, threshold: float = 0.5, min_affinity: float = 0.0
) -> Tensor:
    """(..., Q, P) bool: patch n belongs to query q (binarised normalised affinity).

    `min_affinity` additionally requires sigmoid(A) > min_affinity, so a query that likes no patch
    has an empty row (rows are never empty after min-max normalisation alone).
    """
    members = normalized_affinity(logits, patch_valid) > threshold
    if min_affinity > 0:
        members = members & (logits.sigmoid() > min_affinity)
    return members & patch_valid.unsqueeze(-2)


def union_boxes(members: Tensor, boxes: Tensor, fallback: Tensor) -> Tensor:
    """Union box of each query's member patches (appendix A.1: merge the patches' rectangles).

    Args:
        members: (B, Q, P) bool.
        boxes: (B, P, 4) xyxy.
        fallback: (B, 4) box for a query with no member (the whole image).

    Returns:
        (B, Q, 4) xyxy.
    """
    big = torch.finfo(boxes.dtype).max
    m = members.unsqueeze(-1)
    b = boxes.unsqueeze(1)
    lo = torch.where(m, b[..., :2], torch.full_like(b[..., :2], big)).amin(2)
    hi = torch.where(m, b[..., 2:], torch.full_like(b[..., 2:], -big)).amax(2)
    out = torch.cat([lo, hi], dim=-1)
    empty = ~members.any(-1, keepdim=True)
    return torch.where(empty, fallback.unsqueeze(1).expand_as(out), out)


def box_sine_embedding(boxes: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """(..., 4) normalised cxcywh -> (..., 2 * dim) sine/cosine features (DAB-DETR style).

    Each coordinate gets dim / 2 features (dim must be a multiple of 4).
    """
    half = dim // 2
    i = torch.arange(half, device=boxes.device, dtype=boxes.dtype)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / half)
    x = boxes.unsqueeze(-1) * (2 * math.pi) / freq  # (..., 4, half)
    x = torch.stack([x[..., 0::2].sin(), x[..., 1::2].cos()], dim=-1).flatten(-2)
    return x.flatten(-2)


def assign_roi_levels(
    boxes: Tensor,
    strides: Sequence[int],
    canonical_size: float = 224.0,
    canonical_level: int = 4,
) -> Tensor:
    """The FPN level rule: index into ``strides`` of the level each box is pooled from.

    k = floor(k0 + log2(sqrt(w h) / s0 + 1e-6)) selects the level of stride 2^k; the chosen level is
    the coarsest listed one with stride <= 2^k, or the finest listed level when every one is coarser
    (so with contiguous levels this is the usual clamp to [k_min, k_max]). With s0 = 224, k0 = 4 it
    is detectron2's ``assign_boxes_to_levels`` and the authors' mmdet ``map_roi_levels`` (finest_scale
    56 at stride 4: floor(log2(s / 56)) + 2 = floor(4 + log2(s / 224))), up to the epsilon.

    Args:
        boxes: (N, 4) xyxy in the pixels of the frame the strides refer to (the padded CLIP input).
        strides: stride of each level, any order.
        canonical_size, canonical_level: s0 and k0.

    Returns:
        (N,) long.
    """
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0)
    scale = (wh[:, 0] * wh[:, 1]).sqrt()
    target = torch.floor(canonical_level + torch.log2(scale / canonical_size + 1e-6))
    k = torch.tensor([math.log2(s) for s in strides], dtype=target.dtype, device=target.device)
    fits = k.unsqueeze(0) <= target.unsqueeze(1) + 1e-6  # (N, L)
    best = torch.where(fits, k, torch.full_like(k, -math.inf)).argmax(1)
    return torch.where(fits.any(1), best, k.argmin().expand_as(best))


def query_attention_mask(num_semantic: int, num_patch: int, device=None) -> Tensor:
    """(K + P, K + P) bool self-attention mask of the decoder's queries, True = blocked.

    The authors' ``sem_attn_mask`` (``CdnQueryGenerator_plus.generate_dn_mask`` with the K
    semantic queries as K one-query "denoising groups"): Type-II (patch) queries do not attend to
    Type-I (semantic) queries; a Type-I query attends to itself and to every Type-II query but not
    to the other Type-I queries. The instance queries then never see the vocabulary.
    """
    q = num_semantic + num_patch
    mask = torch.zeros(q, q, dtype=torch.bool, device=device)
    mask[:, :num_semantic] = True
    idx = torch.arange(num_semantic, device=device)
    mask[idx, idx] = False
    return mask


def _safe_block(block: Tensor, key_pad: Tensor) -> Tensor:
    """Unblock rows that would attend to nothing: first to all valid keys, else to all keys.

    A query whose binarised affinity selects no patch (or an image with no patch) would otherwise
    get NaN from the softmax. Padded keys stay blocked whenever the image has a valid key.
    """
    full = block.all(-1, keepdim=True)
    block = torch.where(full, key_pad.unsqueeze(-2).expand_as(block), block)
    return block & ~block.all(-1, keepdim=True)


class _FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------------------------
# Patch encoder (section 3.2.1, MaskRoI of appendix A.1)
# ----------------------------------------------------------------------------------------------


class PatchEncoderLayer(nn.Module):
    """Post-norm self-attention layer (DETR encoder layer); position added to queries and keys."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = _FFN(dim, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor, pad: Tensor) -> Tensor:
        qk = x + pos
        # key_padding_mask cannot express "attend to all" for an image with no patch; fold it into a
        # per-row mask that _safe_block keeps finite.
        block = _safe_block(pad.unsqueeze(1).expand(-1, x.shape[1], -1), pad)
        mask = block.repeat_interleave(self.self_attn.num_heads, dim=0)
        x = self.norm1(x + self.self_attn(qk, qk, x, attn_mask=mask, need_weights=False)[0])
        return self.norm2(x + self.ffn(x))


class PatchEncoder(nn.Module):
    """MaskRoI features of the patches -> MLP -> LayerNorm, box position, omega self-attention layers.

    Each dense level has its own trainable lateral projection to `embed_dim` (a 1x1 conv + GroupNorm
    on the map, or Linear + LayerNorm on the RoI cells with ``project_after_roi``); the frozen maps
    themselves get no gradient. With ``multi_level`` each RoI is pooled from the level its box size
    selects (FPN rule); otherwise every level is RoI-aligned with its own stride and summed.
    """

    def __init__(self, config: AffinityConfig) -> None:
        super().__init__()
        d = config.embed_dim
        self.config = config
        if config.project_after_roi:
            # Per-RoI-cell projection: RoIAlign then runs on the frozen cached maps, which need no
            # gradient, so training skips RoIAlign's (slow, scatter-add) backward entirely.
            self.input_proj = nn.ModuleList(
                nn.Sequential(nn.Linear(c, d), nn.LayerNorm(d)) for c in config.clip_channels
            )
        else:
            self.input_proj = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(math.gcd(32, d), d))
                for c in config.clip_channels
            )
        self.roi_mlp = MLP(d * config.roi_size**2, config.roi_mlp_hidden, d, 2)
        self.roi_norm = nn.LayerNorm(d)
        self.pos_head = MLP(2 * d, d, d, 2)
        self.layers = nn.ModuleList(
            PatchEncoderLayer(d, config.num_heads, config.ffn_dim, config.dropout)
            for _ in range(config.num_encoder_layers)
        )

    def project(self, clip_feats: Sequence[Tensor]) -> list[Tensor]:
        """Project each dense level to embed_dim channels (deferred to the RoIs when
        ``project_after_roi``: then the maps are returned as they are)."""
        if self.config.project_after_roi:
            return list(clip_feats)
        return [proj(f) for proj, f in zip(self.input_proj, clip_feats)]

    def roi_features(
        self, proj_feats: Sequence[Tensor], rois: Tensor, masks: Tensor | None
    ) -> Tensor:
        """(N, d) features of RoIs; `rois` (N, 5) = (batch index, x1, y1, x2, y2) in input pixels.

        With `masks` (N, R, R) this is MaskRoI: the RoI feature times the patch's mask crop. With
        ``multi_level`` and several levels each RoI is pooled from the one level its box size selects
        (:func:`assign_roi_levels`); otherwise every level is pooled and the levels are summed.
        """
        cfg = self.config
        r = cfg.roi_size
        levels = None
        if cfg.multi_level and len(proj_feats) > 1:
            levels = assign_roi_levels(
                rois[:, 1:], cfg.clip_strides, cfg.roi_canonical_size, cfg.roi_canonical_level
            )
        feats: Tensor | int = 0
        for level, (f, stride) in enumerate(zip(proj_feats, cfg.clip_strides)):
            sel = None
            if levels is not None:
                sel = (levels == level).nonzero(as_tuple=True)[0]
                if not len(sel):
                    continue
            roi = roi_align(
                f,
                rois if sel is None else rois[sel],
                output_size=r,
                spatial_scale=1.0 / stride,
                sampling_ratio=cfg.roi_sampling_ratio,
                aligned=True,
            )
            if cfg.project_after_roi:  # (N, C, R, R) -> (N, d, R, R)
                roi = self.input_proj[level](roi.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            if sel is None:
                feats = feats + roi
            else:  # scatter this level's RoIs into their rows
                if not isinstance(feats, Tensor):
                    feats = roi.new_zeros((rois.shape[0], *roi.shape[1:]))
                feats = feats.index_copy(0, sel, roi)
        if not isinstance(feats, Tensor):  # no RoI at all
            feats = rois.new_zeros((0, cfg.embed_dim, r, r))
        if masks is not None:
            feats = feats * masks.unsqueeze(1).to(feats.dtype)
        return self.roi_norm(self.roi_mlp(feats.flatten(1)))

    def position(self, boxes_in: Tensor) -> Tensor:
        """Position embedding of xyxy boxes in input pixels."""
        s = float(self.config.clip_input_size)
        return self.pos_head(
            box_sine_embedding(xyxy_to_cxcywh(boxes_in / s), self.config.embed_dim)
        )

    def forward(
        self,
        proj_feats: Sequence[Tensor],
        boxes_in: Tensor,
        patch_masks: Tensor,
        patch_valid: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Encode the patches.

        Args:
            proj_feats: projected dense maps, each (B, d, h, w).
            boxes_in: (B, P, 4) xyxy patch boxes in padded-input pixels.
            patch_masks: (B, P, R, R) mask crops.
            patch_valid: (B, P) bool.

        Returns:
            (features, position): both (B, P, d); padded rows are zero features.
        """
        b, p = patch_valid.shape
        d = self.config.embed_dim
        idx = patch_valid.nonzero(as_tuple=False)
        feats = boxes_in.new_zeros((b, p, d))
        if len(idx):
            rois = torch.cat([idx[:, :1].to(boxes_in.dtype), boxes_in[idx[:, 0], idx[:, 1]]], dim=1)
            feats[idx[:, 0], idx[:, 1]] = self.roi_features(
                proj_feats, rois, patch_masks[idx[:, 0], idx[:, 1]]
            )
        pos = self.position(boxes_in)
        pad = ~patch_valid
        for layer in self.layers:
            feats = layer(feats, pos, pad)
        return feats, pos


# ----------------------------------------------------------------------------------------------
# Unified affinity decoder (section 3.2.2, appendix A.1, Algorithm 1)
# ----------------------------------------------------------------------------------------------


class AffinitySimilarity(nn.Module):
    """Algorithm 1: per-head scaled dot products, mixed by an MLP into one map, scaled and biased.

    A_hat = MLP_eta( (fc_Q(Q))_h (fc_K(K))_h^T / sqrt(D/eta) ) / s + b,   b = b1 . K + b0,
    with learnable s = exp(logit_scale) (init 1), b1 = 0 and b0 = -log((1 - prior) / prior), so the
    initial affinity is about `prior` (0.01) for the focal loss. With affinity refinement the score
    of a later layer is the sum over layers, so only the first layer carries the prior bias and later
    layers start at b0 = 0 (`prior_prob=None`): every layer's refined score then starts near 0.01
    (the official code gives every layer -4.6, so layer l starts near sigmoid(-4.6 l)). b1 . K uses the projected K (line 8
    of Algorithm 1 follows line 2); b0 is a scalar (the paper's "b0 in R^D" cannot be added to the
    (N,) vector b1 . K; the official code uses a scalar too).
    """

    def __init__(self, dim: int, heads: int, mlp_layers: int, prior_prob: float | None) -> None:
        super().__init__()
        self.heads = heads
        self.fc_q = nn.Linear(dim, dim)
        self.fc_k = nn.Linear(dim, dim)
        self.mix = MLP(heads, heads, 1, mlp_layers)
        for layer in self.mix.layers:
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.bias_k = nn.Parameter(torch.zeros(dim))  # b1
        b0 = 0.0 if prior_prob is None else -math.log((1 - prior_prob) / prior_prob)
        self.bias0 = nn.Parameter(torch.tensor(b0))  # b0

    def forward(self, queries: Tensor, keys: Tensor) -> Tensor:
        """(B, M, d) queries, (B, N, d) patch features -> (B, M, N) affinity logits of this layer."""
        b, m, d = queries.shape
        n = keys.shape[1]
        q = self.fc_q(queries).view(b, m, self.heads, d // self.heads).transpose(1, 2)
        k = self.fc_k(keys)
        bias = k @ self.bias_k + self.bias0  # (B, N)
        k = k.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        sim = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # (B, eta, M, N)
        sim = self.mix(sim.permute(0, 2, 3, 1)).squeeze(-1)  # (B, M, N)
        return sim / self.logit_scale.exp() + bias.unsqueeze(1)


class AffinityDecoderLayer(nn.Module):
    """Self-attention over queries -> affinity -> dynamic cross-attention to patches -> FFN.

    The affinity of this layer is computed from the queries after self-attention (position added to
    both sides, as in the official code); the cross-attention is masked by the binarised affinity of
    the previous layer (`block`, True = masked), so the first layer attends to every patch (A = 1).
    """

    def __init__(self, config: AffinityConfig, prior_prob: float | None) -> None:
        super().__init__()
        d, h = config.embed_dim, config.num_heads
        self.self_attn = nn.MultiheadAttention(d, h, dropout=config.dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d)
        self.affinity = AffinitySimilarity(d, h, config.affinity_mlp_layers, prior_prob)
        self.cross_attn = nn.MultiheadAttention(d, h, dropout=config.dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = _FFN(d, config.ffn_dim, config.dropout)
        self.norm3 = nn.LayerNorm(d)

    def forward(
        self,
        queries: Tensor,
        query_pos: Tensor,
        query_pad: Tensor,
        patches: Tensor,
        patch_pos: Tensor,
        patch_pad: Tensor,
        block: Tensor | None,
        self_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns the updated queries (B, M, d) and this layer's affinity logits (B, M, N).

        `self_mask` (M, M) or (B, M, M), True = blocked, is added to the padding mask of the
        self-attention (:func:`query_attention_mask`).
        """
        m = queries.shape[1]
        heads = self.self_attn.num_heads
        qk = queries + query_pos
        self_block = query_pad.unsqueeze(1).expand(-1, m, -1)
        if self_mask is not None:
            self_block = self_block | self_mask
        self_block = _safe_block(self_block, query_pad)
        x = self.self_attn(
            qk, qk, queries, attn_mask=self_block.repeat_interleave(heads, 0), need_weights=False
        )[0]
        queries = self.norm1(queries + x)

        logits = self.affinity(queries + query_pos, patches + patch_pos)

        cross_block = patch_pad.unsqueeze(1).expand(-1, m, -1)
        if block is not None:
            cross_block = cross_block | block
        cross_block = _safe_block(cross_block, patch_pad)
        x = self.cross_attn(
            queries + query_pos,
            patches + patch_pos,
            patches,
            attn_mask=cross_block.repeat_interleave(heads, 0),
            need_weights=False,
        )[0]
        queries = self.norm2(queries + x)
        queries = self.norm3(queries + self.ffn(queries))
        return queries, logits


class TextClassifier(nn.Module):
    """Eq. (1): S_cls = (1/s) Q_hat . e_hat + b, a GLIP-style vision-language classifier.

    Q_hat is the L2-normalised linear projection of the query; e_hat is a linear projection of the
    L2-normalised text embedding (scaled by 10 first, as the official code does); b = e . b1 + b0
    per class, with b0 set for a `prior` initial probability. Shared by all decoder layers.
    """

    def __init__(self, dim: int, text_dim: int, prior_prob: float) -> None:
        super().__init__()
        self.query_proj = nn.Linear(dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.bias_text = nn.Parameter(torch.zeros(text_dim))  # b1
        self.bias0 = nn.Parameter(torch.tensor(-math.log((1 - prior_prob) / prior_prob)))  # b0

    def forward(self, hidden: Tensor, text: Tensor) -> Tensor:
        """(..., M, d) queries, (K, D) L2-normalised text -> (..., M, K) logits."""
        q = F.normalize(self.query_proj(hidden), dim=-1)
        e = self.text_proj(text / 0.1)
        bias = text @ self.bias_text + self.bias0
        return q @ e.t() / self.logit_scale.exp() + bias


@dataclass
class AffinityOutput:
    """What the head returns for a batch. Q = K + P queries: Type-I first, then one per patch.

    Attributes:
        affinity_logits: (L, B, Q, P) affinity logits of every decoder layer (refined, i.e. summed
            over the layers so far); use [-1] at inference.
        class_logits: (L, B, Q, K) classifier logits S_cls of every layer.
        query_valid: (B, Q) bool; Type-II queries of padded patches are False.
        patch_valid: (B, P) bool.
        patch_boxes: (B, P, 4) patch boxes, xyxy normalised by the original (W, H).
        num_semantic: K, the number of Type-I queries (= classes).
        dn_affinity_logits: (L, B, Nd, P) of the denoising queries (training only, else None);
            kept apart from the Q normal rows so matching and inference never see them.
        dn_class_logits: (L, B, Nd, K) or None.
        denoising: the DenoisingQueries they were built from (their targets), or None.
    """

    affinity_logits: Tensor
    class_logits: Tensor
    query_valid: Tensor
    patch_valid: Tensor
    patch_boxes: Tensor
    num_semantic: int
    dn_affinity_logits: Tensor | None = None
    dn_class_logits: Tensor | None = None
    denoising: DenoisingQueries | None = None

    @property
    def num_layers(self) -> int:
        return int(self.affinity_logits.shape[0])


BATCH_KEYS = (
    "clip_feats",
    "image_sizes",
    "patch_boxes",
    "patch_masks",
    "patch_valid",
    "text_embed",
)


class AffinityHead(nn.Module):
    """SAM-CP's patch encoder + unified affinity decoder + classifier, on cached CLIP features."""

    def __init__(self, config: AffinityConfig) -> None:
        super().__init__()
        d = config.embed_dim
        self.config = config
        self.patch_encoder = PatchEncoder(config)
        self.semantic_query = nn.Sequential(nn.Linear(config.text_dim, d), nn.LayerNorm(d))
        self.semantic_reference = nn.Linear(config.text_dim, 4)  # learned cxcywh box logits
        self.query_pos_head = MLP(2 * d, d, d, 2)
        self.layers = nn.ModuleList(
            AffinityDecoderLayer(
                config, config.prior_prob if i == 0 or not config.use_affinity_refinement else None
            )
            for i in range(config.num_decoder_layers)
        )
        self.out_norm = nn.LayerNorm(d)
        self.classifier = TextClassifier(d, config.text_dim, config.prior_prob)
        # Content of a denoising query: its (noised) class's text embedding through an MLP (the
        # official generator's use_text_as_label branch; samcp's vocabulary comes at run time).
        self.dn_label_mlp = (
            MLP(config.text_dim, d, d, 2) if config.num_denoising_queries > 0 else None
        )

    def forward_batch(self, batch: Mapping[str, object]) -> AffinityOutput:
        """`forward` on a batch dict; keys beyond BATCH_KEYS (e.g. patch_clip_embed) are ignored,
        except the optional training-only "denoising"."""
        return self(**{k: batch[k] for k in BATCH_KEYS}, denoising=batch.get("denoising"))

    def forward(
        self,
        clip_feats: Mapping[str, Tensor] | Sequence[Tensor],
        image_sizes: Tensor,
        patch_boxes: Tensor,
        patch_masks: Tensor,
        patch_valid: Tensor,
        text_embed: Tensor,
        denoising: DenoisingQueries | None = None,
    ) -> AffinityOutput:
        """Run the head.

        Args:
            clip_feats: dense CLIP maps, `{level: (B, C_l, h_l, w_l)}` keyed by `config.clip_levels`
                (or a sequence in that order), at the padded square input of side clip_input_size.
            image_sizes: (B, 2) original (H, W) of each image.
            patch_boxes: (B, P, 4) patch boxes, XYWH in original pixels (padding rows: anything).
            patch_masks: (B, P, R, R) RoI-aligned patch mask crops (`targets.patch_mask_crops`).
            patch_valid: (B, P) bool, False for padding.
            text_embed: (K, D) class text embeddings (K >= 1), normalised here.
            denoising: training-only DINO denoising queries (`denoising.build_denoising_queries`);
                used only in training mode. They run after the K + P normal queries under an
                attention mask the normal queries cannot see through, and come back apart
                (`dn_affinity_logits`, `dn_class_logits`); the normal outputs are unchanged.

        Returns:
            AffinityOutput.
        """
        cfg = self.config
        if isinstance(clip_feats, Mapping):
            missing = [k for k in cfg.clip_levels if k not in clip_feats]
            if missing:
                raise KeyError(
                    f"clip_feats lacks level(s) {missing}; config expects {list(cfg.clip_levels)}"
                )
            feats = [clip_feats[k] for k in cfg.clip_levels]
        else:
            feats = list(clip_feats)
        if text_embed.ndim != 2 or text_embed.shape[0] < 1:
            raise ValueError(f"text_embed must be (K >= 1, D), got {tuple(text_embed.shape)}")
        patch_valid = patch_valid.bool()
        b = patch_valid.shape[0]
        if patch_valid.shape[1] == 0:  # keep attention shapes non-empty
            patch_boxes = patch_boxes.new_zeros((b, 1, 4))
            patch_masks = patch_masks.new_zeros((b, 1, *patch_masks.shape[2:]))
            patch_valid = patch_valid.new_zeros((b, 1))
        # Cached fp16 maps are computed in the head's dtype.
        dtype = self.classifier.query_proj.weight.dtype
        feats = [f.to(dtype) for f in feats]
        patch_boxes = patch_boxes.to(dtype)
        sizes = image_sizes.to(dtype)  # (B, 2) = (H, W)
        scale = cfg.clip_input_size / sizes.amax(-1)  # resize factor into the padded input
        boxes_xyxy = xywh_to_xyxy(patch_boxes)
        boxes_in = boxes_xyxy * scale[:, None, None]
        wh = sizes.flip(-1).repeat(1, 2)  # (W, H, W, H)
        boxes_norm = boxes_xyxy / wh[:, None, :]
        image_box_in = torch.cat([torch.zeros_like(wh[:, :2]), wh[:, :2] * scale[:, None]], dim=-1)

        proj = self.patch_encoder.project(feats)
        patch_feats, patch_pos = self.patch_encoder(
            proj, boxes_in, patch_masks.to(dtype), patch_valid
        )

        text = F.normalize(text_embed.to(dtype), dim=-1)
        k = text.shape[0]
        sem_q = self.semantic_query(text).unsqueeze(0).expand(b, -1, -1)
        # A learned reference box (cxcywh in [0, 1]) per class for the first layer's position.
        sem_ref = self.semantic_reference(text).sigmoid().unsqueeze(0).expand(b, -1, -1)
        queries = torch.cat([sem_q, patch_feats], dim=1)  # patch-as-query: e_n^I = f_n
        ref = torch.cat([sem_ref, xyxy_to_cxcywh(boxes_in / cfg.clip_input_size)], dim=1)
        query_pos = self.query_pos_head(box_sine_embedding(ref, cfg.embed_dim))
        query_valid = torch.cat([patch_valid.new_ones((b, k)), patch_valid], dim=1)
        patch_pad = ~patch_valid
        self_mask = None
        if cfg.query_attn_mask:  # instance queries never see the vocabulary (official code)
            self_mask = query_attention_mask(k, patch_valid.shape[1], patch_valid.device)
        m = queries.shape[1]  # K + P normal queries; denoising queries (training) come after
        dn = denoising if self.training and self.dn_label_mlp is not None else None
        if dn is not None and dn.num_queries > 0:
            dn = dn.to(queries.device)
            dn_q = self.dn_label_mlp(text[dn.labels.clamp(0, k - 1)])
            dn_q = dn_q * dn.valid.unsqueeze(-1).to(dtype)
            dn_in = dn.boxes.to(dtype) * (wh * scale[:, None])[:, None, :]  # input pixels
            queries = torch.cat([queries, dn_q], dim=1)
            ref = torch.cat([ref, xyxy_to_cxcywh(dn_in / cfg.clip_input_size)], dim=1)
            query_pos = self.query_pos_head(box_sine_embedding(ref, cfg.embed_dim))
            query_valid = torch.cat([query_valid, dn.valid], dim=1)
            if cfg.dn_attn_mask:
                full = denoising_attn_mask(m, dn, queries.device)
                if self_mask is not None:
                    full[:m, :m] |= self_mask
                self_mask = full
            elif self_mask is not None:
                self_mask = F.pad(self_mask, (0, dn.num_queries, 0, dn.num_queries))
        else:
            dn = None
            if self.training and self.dn_label_mlp is not None and torch.is_grad_enabled():
                # No denoising this step: keep the MLP in the graph (DDP wants every parameter).
                queries = queries + 0.0 * sum(p.sum() for p in self.dn_label_mlp.parameters())

        all_logits, all_classes = [], []
        accumulated: Tensor | None = None
        block: Tensor | None = None
        for layer in self.layers:
            queries, logits = layer(
                queries,
                query_pos,
                ~query_valid,
                patch_feats,
                patch_pos,
                patch_pad,
                block,
                self_mask,
            )
            if cfg.use_affinity_refinement and accumulated is not None:
                # Algorithm 1, l.9-11 (AR): add the refined logits of the previous stages.
                logits = logits + accumulated
            accumulated = logits
            with torch.no_grad():
                members = merge_patches(logits.detach(), patch_valid, cfg.binarize_threshold)
                block = ~members if cfg.use_dca else None
                boxes = union_boxes(members, boxes_in, image_box_in)  # (B, Q, 4) input pixels
            if cfg.use_query_enhancement:
                index = torch.arange(b, device=boxes.device, dtype=dtype)
                index = index.repeat_interleave(boxes.shape[1])[:, None]
                rois = torch.cat([index, boxes.reshape(-1, 4)], dim=1)
                roi = self.patch_encoder.roi_features(proj, rois, None).view_as(queries)
                queries = (roi + queries) / 2
            query_pos = self.query_pos_head(
                box_sine_embedding(xyxy_to_cxcywh(boxes / cfg.clip_input_size), cfg.embed_dim)
            )
            hidden = self.out_norm(queries)
            all_logits.append(logits)
            all_classes.append(self.classifier(hidden, text))

        aff_all, cls_all = torch.stack(all_logits), torch.stack(all_classes)
        return AffinityOutput(
            affinity_logits=aff_all[:, :, :m],
            class_logits=cls_all[:, :, :m],
            query_valid=query_valid[:, :m],
            patch_valid=patch_valid,
            patch_boxes=boxes_norm,
            num_semantic=k,
            dn_affinity_logits=None if dn is None else aff_all[:, :, m:],
            dn_class_logits=None if dn is None else cls_all[:, :, m:],
            denoising=dn,
        )


def build_affinity_head(config: AffinityConfig) -> AffinityHead:
    """Builds the head from its config (the plugin's `build`)."""
    return AffinityHead(config)


# ----------------------------------------------------------------------------------------------
# Inference (section 3.3): pure tensor ops on one image; the caller turns members into RLE unions.
# ----------------------------------------------------------------------------------------------


def query_clip_logits(
    members: Tensor,
    patch_clip_embed: Tensor,
    text_embed: Tensor,
    patch_areas: Tensor | None = None,
    logit_scale: float = 100.0,
) -> Tensor:
    """S_CLIP of each query: cosine of its mask-pooled CLIP embedding with each class text, scaled.

    FC-CLIP mask-pools the dense CLIP map over the predicted mask. The cache holds one mask-pooled,
    L2-normalised embedding per patch, so the query's embedding is the area-weighted mean of its
    member patches' embeddings (exactly mask pooling when patches are disjoint and embeddings are
    pooled sums; an approximation otherwise), re-normalised.

    Args:
        members: (Q, P) bool or float weights.
        patch_clip_embed: (P, D).
        text_embed: (K, D).
        patch_areas: (P,) pixel areas, or None for equal weights.
        logit_scale: CLIP's logit scale (100).

    Returns:
        (Q, K) logits; rows without members are 0 (uniform after softmax).
    """
    w = members.to(patch_clip_embed.dtype)
    if patch_areas is not None:
        w = w * patch_areas.to(w.dtype).unsqueeze(0)
    pooled = F.normalize(w @ patch_clip_embed, dim=-1)
    return logit_scale * pooled @ F.normalize(text_embed.to(pooled.dtype), dim=-1).t()


def dense_query_clip_embed(
    members: Tensor, patch_masks: Tensor, dense: Tensor, clip_head: nn.Module, chunk: int = 32
) -> Tensor:
    """The CLIP embedding of each query's merged segment, pooled from the dense map (S_CLIP of
    section 3.3 and FC-CLIP's out-of-vocabulary branch): the union of the member patches' masks at
    the image size, mask-pooled from the cached final CLIP map and passed through the frozen CLIP
    head, exactly as precompute embeds a proposal (``ClipHead.embed_masks``).

    Queries with the same member set share one pooling.

    Args:
        members: (Q, P) bool.
        patch_masks: (P, H, W) bool masks of the patches at the image size.
        dense: (C, fh, fw) the cached final map (``clip_res5``).
        clip_head: :class:`samcp.models.cliphead.ClipHead`.
        chunk: unions pooled per batched op (memory: chunk x input_size^2 floats).

    Returns:
        (Q, D) L2-normalised embeddings; rows without members are 0.
    """
    q, p = members.shape
    has = members.bool().any(-1)
    if p == 0 or not bool(has.any()):
        d = clip_head(dense.new_zeros((1, dense.shape[0]), dtype=torch.float32)).shape[-1]
        return dense.new_zeros((q, d), dtype=torch.float32)
    rows, inverse = torch.unique(members[has].to(torch.uint8), dim=0, return_inverse=True)
    flat = patch_masks.flatten(1).to(torch.float32)
    emb = []
    for i in range(0, rows.shape[0], chunk):
        union = (rows[i : i + chunk].to(torch.float32) @ flat) > 0
        emb.append(clip_head.embed_masks(dense, union.view(-1, *patch_masks.shape[1:])))
    pooled = torch.cat(emb)
    out = pooled.new_zeros((q, pooled.shape[-1]))
    out[has] = pooled[inverse]
    return out


def open_vocab_scores(class_logits: Tensor, clip_logits: Tensor | None, kappa: float) -> Tensor:
    """S_ov = sigmoid(S_cls)^(1-kappa) * softmax(S_CLIP)^kappa (section 3.3; the geometric mean that
    table 9 ablates; the '+' printed in section 3.3 contradicts "geometric average"). Without CLIP
    logits, sigmoid(S_cls). The shared classifier's geometric ensemble with alpha = beta = kappa
    (:func:`samcp.models.openvocab.kappa_fusion`)."""
    return kappa_fusion(class_logits, clip_logits, kappa)


@dataclass
class ImagePrediction:
    """Merged segments of one image; masks are unions of the listed patches.

    Attributes:
        semantic_scores: (K,) score of class c's own Type-I query for class c.
        semantic_members: (K, P) bool patches merged into class c's region.
        instance_queries: (N,) index of the Type-II query (= its patch index).
        instance_labels: (N,) class index.
        instance_scores: (N,) score, descending.
        instance_members: (N, P) bool patches of each instance.
        class_probs: (K + P, K) fused class probabilities of all queries (for panoptic composition).
    """

    semantic_scores: Tensor
    semantic_members: Tensor
    instance_queries: Tensor
    instance_labels: Tensor
    instance_scores: Tensor
    instance_members: Tensor
    class_probs: Tensor


@torch.no_grad()
def predict_image(
    affinity_logits: Tensor,
    class_logits: Tensor,
    patch_valid: Tensor,
    num_semantic: int,
    config: AffinityConfig,
    *,
    patch_clip_embed: Tensor | None = None,
    text_embed: Tensor | None = None,
    patch_areas: Tensor | None = None,
    instance_classes: Tensor | None = None,
    seen: Tensor | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    query_clip_embed: Callable[[Tensor], Tensor] | None = None,
) -> ImagePrediction:
    """Section 3.3 for one image (use the last layer's outputs).

    Semantic: row c of the Type-I queries merges the patches with normalised affinity above
    `binarize_threshold` (and sigmoid above `min_affinity`); its score is the fused probability of
    class c. Instances: every non-empty Type-II row is a candidate; the top `max_instances`
    (query, class) pairs by score are kept (the official code's top-k over sigmoid scores).

    Args:
        affinity_logits: (Q, P), Q = K + P.
        class_logits: (Q, K).
        patch_valid: (P,) bool.
        num_semantic: K.
        config: thresholds, kappa, score mode.
        patch_clip_embed, text_embed, patch_areas: enable the open-vocabulary fusion when given.
        instance_classes: (K,) bool classes an instance may take (thing classes); None = all.
        seen, alpha, beta: the shared geometric ensemble (samcp.models.openvocab) with CLIP weight
            alpha on the ``seen`` (training-vocabulary) classes and beta on the others; None
            takes ``config.kappa`` for both (SAM-CP's fusion, alpha = beta = kappa).
        query_clip_embed: members (Q, P) -> (Q, D) CLIP embeddings of the merged segments
            (:func:`dense_query_clip_embed`); with ``text_embed`` it replaces the patch-mean
            embedding of :func:`query_clip_logits`.

    Returns:
        ImagePrediction.
    """
    k = num_semantic
    members = merge_patches(
        affinity_logits, patch_valid, config.binarize_threshold, config.min_affinity
    )
    clip_logits = None
    if query_clip_embed is not None and text_embed is not None:
        emb = query_clip_embed(members)
        text = F.normalize(text_embed.to(emb.dtype), dim=-1)
        clip_logits = config.clip_logit_scale * emb @ text.t()  # rows without members: 0
    elif patch_clip_embed is not None and text_embed is not None:
        clip_logits = query_clip_logits(
            members, patch_clip_embed, text_embed, patch_areas, config.clip_logit_scale
        )
    a = config.kappa if alpha is None else alpha
    b = config.kappa if beta is None else beta
    if clip_logits is None:
        probs = class_logits.sigmoid()
    else:
        if seen is None:
            seen = torch.ones(num_semantic, dtype=torch.bool, device=class_logits.device)
        probs = geometric_ensemble(class_logits.sigmoid(), clip_logits.softmax(-1), seen, a, b)

    ar = torch.arange(k, device=probs.device)
    sem_scores = probs[ar, ar]
    sem_members = members[:k]

    inst_probs = probs[k:]
    inst_members = members[k:]
    if config.score_mode == "cls_x_affinity":
        aff = affinity_logits[k:].sigmoid()
        mean_aff = (aff * inst_members).sum(-1) / inst_members.sum(-1).clamp_min(1)
        inst_probs = inst_probs * mean_aff.unsqueeze(-1)
    usable = (inst_members.any(-1) & patch_valid).unsqueeze(-1)
    if instance_classes is not None:
        usable = usable & instance_classes.bool().to(usable.device).unsqueeze(0)
    flat = inst_probs.masked_fill(~usable, -1.0).flatten()
    top = min(config.max_instances, int(usable.sum()))
    scores, idx = flat.topk(top)
    queries = idx // k
    labels = idx % k
    return ImagePrediction(
        semantic_scores=sem_scores,
        semantic_members=sem_members,
        instance_queries=queries,
        instance_labels=labels,
        instance_scores=scores,
        instance_members=inst_members[queries],
        class_probs=probs,
    )
