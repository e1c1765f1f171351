"""ESC-Net (Lee et al., CVPR 2025, arXiv 2411.14723) on the cost-aggregation backbone.

    E = proj(LN(F_res5)), C(n) = cos(E, T_n)                 costagg.encode: the correlation
    X_0 = LN2d(Conv1x1(E))                                   CLIP features at SAM's width
    for block i = 0 .. N-1:                                  the ESC blocks
        S_i = C (i = 0) | C + readout_i(F_i)                 the correlation PPG reads
        P_i = softmax over classes of S_i / T                PPG: points + masks per class
        X_i^n = TwoWay_i(X_i + dense(masks_n), [tokens, sparse(points_n)])   per class
        X_{i+1} = Conv1x1(mean_n X_i^n)                      fused back (identity init)
        F_{i+1} = ClassAgg_i(Swin_i(F_i, ReLU(Conv3x3(X_{i+1}))), T)          VLF
    logits = costagg.decode(F_N, guidance)

F_0 is the embedded correlation (costagg's ``corr_embed``, 1 x 1 here); Swin_i and ClassAgg_i are
costagg's ``layers[i].spatial`` / ``.classes``: the Swin block whose queries and keys see the
(SAM-enhanced) image features, then text-guided linear attention across classes without
positional embeddings (VLF (a) and (b)). TwoWay_i is a copy of the two TwoWayAttentionBlocks of
SAM's mask decoder (segment_anything's own classes and weights), with SAM's output tokens; the
frozen prompt encoder is SAM's. Every per-class part (PPG, SAM blocks, Swin, decoder) runs on
``class_chunk`` classes at a time; only the class softmax and the class aggregation see all
classes at once. Design choices: docs/heads/esc-net.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..costagg.model import CostAggOutput, CostAggregationNet
from ..sam_decoder import SamDecoderSize, build_prompt_decoder, load_state_part
from .config import EscNetConfig
from .ppg import PseudoPrompts, class_log_probs, pseudo_prompts

# ----------------------------------------------------------------------------------------------
# SAM's parts: built from segment_anything's classes, weights from a segment_anything checkpoint.
# ----------------------------------------------------------------------------------------------


def fresh_sam_parts(config: EscNetConfig) -> tuple[nn.Module, nn.ModuleList, Tensor]:
    """A randomly initialised (PromptEncoder, the two TwoWayAttentionBlocks, output tokens (5, C))
    with the config's sizes: segment_anything's parts as ``_build_sam`` makes them
    (:func:`samcp.models.sam_decoder.build_prompt_decoder`); the output tokens are the mask
    decoder's iou_token (1) and mask_tokens (num_multimask_outputs + 1 = 4)."""
    size = SamDecoderSize(
        config.sam_dim, config.sam_mlp_dim, config.sam_heads, 256, config.sam_image_size
    )
    pe, md = build_prompt_decoder(size)
    tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight]).detach()
    return pe, md.transformer.layers, tokens


def two_way_blocks(
    layers: Sequence[nn.Module], tokens: Tensor, image: Tensor, image_pe: Tensor
) -> tuple[Tensor, Tensor]:
    """SAM's TwoWayTransformer minus its final token-to-image attention (which only updates the
    tokens): ``(queries, keys)`` after the blocks.

    Args:
        layers: segment_anything TwoWayAttentionBlocks.
        tokens: (N, T, C) the prompt tokens (also their positional encoding, as in SAM).
        image: (N, L, C) image tokens (image embedding + dense prompt embedding).
        image_pe: (1 or N, L, C) their positional encoding.
    """
    queries, keys = tokens, image
    for layer in layers:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=image_pe)
    return queries, keys


def _chunks(k: int, chunk: int) -> list[tuple[int, int]]:
    step = k if chunk <= 0 else chunk
    return [(s, min(s + step, k)) for s in range(0, k, max(step, 1))]


def per_class_chunks(
    fn: Callable[[Tensor], Tensor], x: Tensor, dim: int, chunk: int, out_dim: int | None = None
) -> Tensor:
    """``fn`` on ``chunk`` classes of ``x`` (classes along ``dim``) at a time, the outputs
    concatenated along ``out_dim`` (default ``dim``)."""
    k = x.shape[dim]
    if chunk <= 0 or k <= chunk:
        return fn(x)
    parts = [fn(x.narrow(dim, s, e - s)) for s, e in _chunks(k, chunk)]
    return torch.cat(parts, dim=dim if out_dim is None else out_dim)


# ----------------------------------------------------------------------------------------------
# The ESC block's SAM part: PPG -> prompt encoder -> SAM's two-way blocks per class -> fusion.
# ----------------------------------------------------------------------------------------------


class SamPromptedBlock(nn.Module):
    """One ESC block's SAM side: per class, its pseudo prompts drive a copy of SAM's two-way
    blocks over the image tokens; the per-class outputs are averaged over the classes and fused
    by a 1 x 1 convolution (identity at initialisation), and projected to the VLF's guidance."""

    def __init__(self, config: EscNetConfig, layers: nn.ModuleList, tokens: Tensor) -> None:
        super().__init__()
        c = config.sam_dim
        self.layers = copy.deepcopy(layers)
        self.output_tokens = nn.Parameter(tokens.clone())  # SAM's iou + mask tokens
        self.fuse = nn.Conv2d(c, c, 1)
        with torch.no_grad():
            self.fuse.weight.copy_(torch.eye(c)[..., None, None])
            self.fuse.bias.zero_()
        self.guidance = nn.Sequential(
            nn.Conv2d(c, config.appearance_guidance_proj_dim, 3, padding=1), nn.ReLU()
        )

    def sam_parameters(self) -> list[nn.Parameter]:
        """The parameters that are SAM's (the small learning rate's group)."""
        return [self.output_tokens, *self.layers.parameters()]

    def forward(
        self,
        image: Tensor,
        log_prob: Tensor,
        image_pe: Tensor,
        prompt_encoder: nn.Module,
        config: EscNetConfig,
    ) -> Tensor:
        """image (B, C, h, w), log_prob (B, K, h, w) class log-probabilities -> fused
        (B, C, h, w)."""
        b, c, h, w = image.shape
        k = log_prob.shape[1]
        if k == 0 or config.sam_blocks == "none":
            return self.fuse(image)
        pe = image_pe.flatten(1).T[None]  # (1, hw, C)
        total = image.new_zeros(b, h * w, c)
        for s, e in _chunks(k, config.class_chunk):
            p = log_prob[:, s:e].reshape(-1, h, w)  # (B * k, h, w), batch-major
            sparse, dense = encode_prompts(prompt_encoder, p, config)
            tokens = self.output_tokens.to(sparse.dtype)
            tokens = torch.cat([tokens.expand(p.shape[0], -1, -1), sparse], 1)
            src = (image[:, None] + dense.reshape(b, e - s, c, h, w)).reshape(-1, c, h * w)
            _, keys = two_way_blocks(self.layers, tokens, src.transpose(1, 2), pe)
            total = total + keys.reshape(b, e - s, h * w, c).sum(1)
        mean = (total / k).transpose(1, 2).reshape(b, c, h, w)
        return self.fuse(mean)


def encode_prompts(
    prompt_encoder: nn.Module, log_prob: Tensor, config: EscNetConfig
) -> tuple[Tensor, Tensor]:
    """PPG and SAM's prompt encoder on M log-probability maps (M, h, w).

    Returns:
        sparse (M, N_o + 1, C): the N_o point prompts (padding slots labelled -1) and SAM's own
        padding point (no box prompt); dense (M, C, h, w): the mean of the N_o region masks'
        embeddings (SAM's ``mask_downscaling`` on masks at 4h x 4w), ``no_mask_embed`` where a
        map has no region.
    """
    m, h, w = log_prob.shape
    prompts: PseudoPrompts = pseudo_prompts(
        log_prob, config.ppg_alpha, config.num_prompts, config.kmeans_iters
    )
    s = float(config.sam_image_size)
    # Cell centres in SAM's input frame (the prompt encoder adds 0.5 back before normalising).
    coords = (prompts.points.float() + 0.5) * torch.tensor(
        [s / w, s / h], device=log_prob.device
    ) - 0.5
    sparse, _ = prompt_encoder(points=(coords, prompts.labels), boxes=None, masks=None)

    # Mask prompts in SAM's unit (logits): logit(P) inside the region, -L outside.
    lim = config.mask_prompt_logit
    lp = log_prob.clamp(max=-1e-7)  # logit(P) = log P - log(1 - P), stable near P = 1
    logit = (lp - torch.log(-torch.expm1(lp))).clamp(-lim, lim)
    masks = torch.where(prompts.regions, logit[:, None], torch.full_like(logit[:, None], -lim))
    masks = F.interpolate(masks.reshape(-1, 1, h, w), scale_factor=4.0, mode="nearest")
    down = prompt_encoder.mask_downscaling
    # The last layer is a 1 x 1 conv (linear): the mean of the embeddings is the conv of the mean.
    hidden = down[:-1](masks.to(down[0].weight.dtype))
    hidden = hidden.reshape(m, config.num_prompts, -1, h, w)
    weight = prompts.valid.to(hidden.dtype)[..., None, None, None]
    mean = (hidden * weight).sum(1) / weight.sum(1).clamp_min(1.0)
    dense = down[-1](mean)
    none = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(dense.dtype)
    dense = torch.where(prompts.valid.any(1)[:, None, None, None], dense, none)
    return sparse, dense


# ----------------------------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------------------------


class EscNet(nn.Module):
    """ESC-Net on cached CLIP maps (see the module doc). ``forward(clip_map, guidance,
    text_embed)`` has costagg's signature and returns its :class:`CostAggOutput`."""

    def __init__(self, config: EscNetConfig) -> None:
        super().__init__()
        from segment_anything.modeling.common import LayerNorm2d

        c = config
        self.config = c
        self.costagg = CostAggregationNet(c)
        # The VLF's image guidance is the SAM-enhanced features (SamPromptedBlock.guidance), not
        # CAT-Seg's projection of the CLIP embeddings: the backbone's projection is not used.
        self.costagg.appearance_proj = nn.Identity()
        pe, layers, tokens = fresh_sam_parts(c)
        self.prompt_encoder = pe.requires_grad_(False)  # frozen (paper)
        # CLIP's per-pixel embeddings at SAM's width, normalised as SAM's neck leaves its tokens.
        self.image_proj = nn.Sequential(nn.Conv2d(c.text_dim, c.sam_dim, 1), LayerNorm2d(c.sam_dim))
        self.blocks = nn.ModuleList(
            SamPromptedBlock(c, layers, tokens) for _ in range(c.num_layers)
        )
        # Blocks >= 1 prompt from the refined correlation: the cost plus a learned read-out of the
        # aggregated features, zero at initialisation (so every block starts from CLIP's cost).
        self.readouts = nn.ModuleList(nn.Linear(c.hidden_dim, 1) for _ in range(c.num_layers - 1))
        for r in self.readouts:
            nn.init.zeros_(r.weight)
            nn.init.zeros_(r.bias)
        self.set_sam_trainable()

    def set_sam_trainable(self) -> None:
        """requires_grad of SAM's parts per ``sam_trainable`` (the prompt encoder stays frozen)."""
        mode = "none" if self.config.sam_blocks == "none" else self.config.sam_trainable
        self.readouts.requires_grad_(self.config.sam_blocks != "none")  # no PPG without SAM
        for block in self.blocks:
            block.output_tokens.requires_grad_(mode == "all")
            for layer in block.layers:
                layer.requires_grad_(mode == "all")
                if mode == "attention":
                    for attn in (
                        layer.self_attn,
                        layer.cross_attn_token_to_image,
                        layer.cross_attn_image_to_token,
                    ):
                        attn.requires_grad_(True)

    def sam_parameters(self) -> list[nn.Parameter]:
        """SAM's blocks and tokens in every ESC block (trained at ``sam_lr_mult`` x lr)."""
        return [p for block in self.blocks for p in block.sam_parameters()]

    @torch.no_grad()
    def load_sam(self, state: dict[str, Tensor]) -> None:
        """SAM's weights from a checkpoint state (``samcp.models.sam_decoder.sam_checkpoint_state``): the prompt encoder,
        and with ``sam_blocks: pretrained`` every block's two-way layers and output tokens."""
        arch = self.config.sam_arch
        load_state_part(self.prompt_encoder, state, "prompt_encoder.", arch)
        if self.config.sam_blocks != "pretrained":
            return
        tokens = torch.cat(
            [state["mask_decoder.iou_token.weight"], state["mask_decoder.mask_tokens.weight"]]
        )
        for block in self.blocks:
            load_state_part(block.layers, state, "mask_decoder.transformer.layers.", arch)
            if tokens.shape != block.output_tokens.shape:
                raise ValueError(
                    f"the SAM checkpoint has {tokens.shape[0]} output tokens of width "
                    f"{tokens.shape[1]}, sam_arch {arch} expects {tuple(block.output_tokens.shape)}"
                )
            block.output_tokens.copy_(tokens)

    def image_pe(self, h: int, w: int) -> Tensor:
        """SAM's dense positional encoding on an (h, w) grid (C, h, w): SAM's random-Fourier
        encoding evaluated at the grid's cell centres, i.e. its 64 x 64 encoding resized."""
        return self.prompt_encoder.pe_layer((h, w))

    def forward(
        self, clip_map: Tensor, guidance: Sequence[Tensor], text_embed: Tensor
    ) -> CostAggOutput:
        cfg = self.config
        agg = self.costagg
        enc = agg.encode(clip_map, text_embed)
        h, w = enc.cost.shape[-2:]
        image = self.image_proj(enc.embed)
        pe = self.image_pe(h, w).to(image.dtype)
        x = enc.features
        for i, (block, layer) in enumerate(zip(self.blocks, agg.layers)):
            score = enc.cost
            if i > 0:
                score = score + self.readouts[i - 1](x.permute(0, 2, 3, 4, 1)).squeeze(-1)
            log_prob = class_log_probs(score, cfg.ppg_temperature)  # softmax over the classes
            image = block(image, log_prob, pe, self.prompt_encoder, cfg)
            appearance = block.guidance(image)
            spatial = partial(layer.spatial, appearance=appearance)
            x = per_class_chunks(spatial, x, 2, cfg.class_chunk)
            x = layer.classes(x, enc.text)
        decode = partial(agg.decode, guidance=agg.decoder_guidance(guidance))
        logits = per_class_chunks(decode, x, 2, cfg.class_chunk, out_dim=1)
        return CostAggOutput(logits=logits, cost=enc.cost)


def build_esc_net(config: EscNetConfig) -> EscNet:
    """The module, with random SAM parts: ``samcp train`` loads SAM's weights into it
    (EscNetPlugin.init_from_cache); a saved model carries them."""
    return EscNet(config)
