"""SAM's prompt encoder + mask decoder on a batch of single-point prompts.

:func:`decode_points` computes exactly what ``model.mask_decoder(..., multimask_output=True)`` computes
(up to float rounding) but restructured for the "everything mode" case where every prompt shares one
image embedding. The per-prompt cost of segment_anything's decoder is dominated by linear projections of
the N = h*w image tokens (q/k/v/out projections of every cross attention, for every prompt), while the
token side has only T = 7 tokens (iou token, 4 mask tokens, the point and the padding point). The fast
path uses only exact algebraic identities:

* Layer 0: the image tokens (image embedding + dense no-mask embedding) are the same for every prompt, so
  the token->image attention's key/value projections and the image->token attention's query projection
  are computed once, with batch 1.
* Image->token attention: the output for image token i is ``out_proj(concat_h A_h V_h)``; since
  ``out_proj`` is linear this is ``sum_h A_h (V_h W_out_h^T) + b``: the T x C products ``U_h`` are tiny,
  and the update is one (N x H*T) @ (H*T x C) product per prompt instead of an N x C x C/2 projection.
  The out_proj bias is folded into ``U`` (each head's attention weights sum to one).
* Token->image attention with per-prompt image tokens (layers >= 1 and the final attention): the key
  projection is folded into the H*T query vectors (``q_h . (W_k x + b_k) = (W_k_h^T q_h) . x + const``,
  and the constant drops out of the softmax over image tokens), and the value projection is applied after
  the attention-weighted sum of raw tokens (the weights sum to one, so the bias passes through).
* Image->token attention in layers >= 1: the query projection is folded into the keys the same way
  (``(W_q x + b_q) . k = x . (W_q^T k) + b_q . k``; here the constant is kept, the softmax is over tokens).
* The final token->image attention only runs for the tokens whose outputs are used (the iou token and the
  multimask tokens), and only those hypernetwork MLPs run.
* The output upscaling (two stride-2 2x2 transposed convolutions) is written as per-pixel matrix products
  with the (i, j, channel) sub-pixel layout, so the 2d LayerNorm is a plain last-dim LayerNorm; it runs
  in chunks of prompts to bound memory.

Models whose decoder does not have segment_anything's structure fall back to
:func:`decode_points_reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Bytes of the output upscaling's largest (chunk, 16N, C/8) intermediate per chunk of prompts: on a
#: CPU, small enough that the chunk's intermediates stay in the last-level cache (measured fastest with
#: one 64x64 vit_b prompt per chunk); on a GPU, just a memory bound.
UPSCALE_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 1 << 30}
#: Bytes of the (chunk, N, C) per-prompt image tokens per chunk of prompts in the decoder's per-prompt
#: part (a CPU cache / a GPU memory bound). 16 MiB (four 64x64 vit_b prompts) measured best on a CPU.
CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 1 << 30}

_ELEMENTWISE_ACTS = (
    nn.GELU,
    nn.ReLU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Hardswish,
    nn.Identity,
)


def decode_points(
    model: torch.nn.Module, features: torch.Tensor, coords: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution mask logits and predicted IoUs for single positive point prompts.

    Args:
        model: a segment_anything Sam.
        features: (1, C, h, w) image embedding from the model's encoder.
        coords: (B, 2) prompt coordinates in the model's input frame (after ResizeLongestSide).

    Returns:
        (B, 3, 4h, 4w) mask logits and (B, 3) predicted IoUs: the multimask outputs.
    """
    if features.shape[0] != 1 or not _fast_supported(model):
        return decode_points_reference(model, features, coords)
    return _decode_points_fast(model, features, coords)


def decode_points_reference(
    model: torch.nn.Module, features: torch.Tensor, coords: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`decode_points`, through segment_anything's own modules (slow, exact)."""
    labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=coords.device)
    sparse, dense = model.prompt_encoder(
        points=(coords[:, None, :], labels), boxes=None, masks=None
    )
    return model.mask_decoder(
        image_embeddings=features,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )


# --------------------------------------------------------------------------------------------------
# Structure check


def _is_plain_convt(m: nn.Module) -> bool:
    return (
        type(m) is nn.ConvTranspose2d
        and tuple(m.kernel_size) == (2, 2)
        and tuple(m.stride) == (2, 2)
        and tuple(m.padding) == (0, 0)
        and tuple(m.output_padding) == (0, 0)
        and tuple(m.dilation) == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )


def _fast_supported(model: nn.Module) -> bool:
    """True when the model's prompt encoder and mask decoder are segment_anything's exact classes."""
    try:
        from segment_anything.modeling.common import LayerNorm2d
        from segment_anything.modeling.mask_decoder import MaskDecoder
        from segment_anything.modeling.prompt_encoder import PromptEncoder
        from segment_anything.modeling.transformer import (
            Attention,
            TwoWayAttentionBlock,
            TwoWayTransformer,
        )
    except ImportError:  # pragma: no cover - segment_anything is a dependency
        return False
    pe = getattr(model, "prompt_encoder", None)
    md = getattr(model, "mask_decoder", None)
    if type(pe) is not PromptEncoder or type(md) is not MaskDecoder:
        return False
    tr = md.transformer
    if type(tr) is not TwoWayTransformer or len(tr.layers) < 1:
        return False
    if md.num_mask_tokens < 2 or md.num_mask_tokens != md.num_multimask_outputs + 1:
        return False
    attns = [tr.final_attn_token_to_image]
    for layer in tr.layers:
        if type(layer) is not TwoWayAttentionBlock:
            return False
        attns += [layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
    if any(type(a) is not Attention for a in attns):
        return False
    up = md.output_upscaling
    if not (isinstance(up, nn.Sequential) and len(up) == 5):
        return False
    ct1, ln, act1, ct2, act2 = up
    if not (_is_plain_convt(ct1) and _is_plain_convt(ct2) and type(ln) is LayerNorm2d):
        return False
    if type(act1) not in _ELEMENTWISE_ACTS or type(act2) not in _ELEMENTWISE_ACTS:
        return False
    return ct1.out_channels == ln.weight.shape[0] == ct2.in_channels


# --------------------------------------------------------------------------------------------------
# Fast path


def _heads(attn: nn.Module) -> tuple[int, int, float]:
    h = attn.num_heads
    d = attn.internal_dim // h
    return h, d, 1.0 / math.sqrt(d)


def _token_to_image_shared(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """attn(q=q, ...) for (B, T, C) queries and image tokens shared by all prompts, given their key and
    value projections k (H, d, N) and v (H, N, d) (see :func:`_shared_kv`)."""
    b, t, _ = q.shape
    h, d, scale = _heads(attn)
    qp = F.linear(q, attn.q_proj.weight, attn.q_proj.bias).mul_(scale)  # (B, T, D)
    qp = qp.reshape(b * t, h, d).transpose(0, 1)  # (H, BT, d)
    a = torch.bmm(qp, k).softmax(dim=-1)  # (H, BT, N)
    o = torch.bmm(a, v).transpose(0, 1).reshape(b, t, h * d)  # (B, T, D)
    return F.linear(o, attn.out_proj.weight, attn.out_proj.bias)


def _shared_kv(attn, k_in: torch.Tensor, v_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key (H, d, N) and value (H, N, d) projections of (N, C) image tokens shared by all prompts."""
    n = k_in.shape[0]
    h, d, _ = _heads(attn)
    k = F.linear(k_in, attn.k_proj.weight, attn.k_proj.bias).reshape(n, h, d).permute(1, 2, 0)
    v = F.linear(v_in, attn.v_proj.weight, attn.v_proj.bias).reshape(n, h, d).transpose(0, 1)
    return k, v


def _shared_q(attn, q_in: torch.Tensor) -> torch.Tensor:
    """Scaled query projection (H, d, N) of (N, C) image tokens shared by all prompts."""
    n = q_in.shape[0]
    h, d, scale = _heads(attn)
    qi = F.linear(q_in, attn.q_proj.weight, attn.q_proj.bias).mul_(scale)
    return qi.reshape(n, h, d).permute(1, 2, 0)


def _token_to_image(attn, q: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
    """attn(q=q, k=k_in, v=v_in) for (B, T, C) queries and per-prompt (B, N, C) image tokens.

    The key projection is folded into the queries and the value projection applied after the
    attention-weighted sum, so no (B, N, D) projection of the image tokens is formed.
    """
    b, t, c = q.shape
    h, d, scale = _heads(attn)
    qp = F.linear(q, attn.q_proj.weight, attn.q_proj.bias).mul_(scale).reshape(b, t, h, d)
    wk = attn.k_proj.weight.reshape(h, d, c)
    # q_h . (W_k_h x + b_k_h): the bias term is constant over image tokens, so the softmax ignores it.
    qk = torch.einsum("bthd,hdc->bhtc", qp, wk).reshape(b, h * t, c)
    a = torch.bmm(qk, k_in.transpose(1, 2)).softmax(dim=-1)  # (B, HT, N)
    ws = torch.bmm(a, v_in).reshape(b, h, t, c)  # attention-weighted raw tokens
    wv = attn.v_proj.weight.reshape(h, d, c)
    o = torch.einsum("bhtc,hdc->bthd", ws, wv) + attn.v_proj.bias.reshape(h, d)
    return F.linear(o.reshape(b, t, h * d), attn.out_proj.weight, attn.out_proj.bias)


def _image_update(attn, a_t: torch.Tensor, v: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + out_proj(concat_h A_h V_h) as residual + A @ U with U_h = V_h W_out_h^T (+ b_out / H).

    a_t: (B, H*T, N) attention weights, transposed (for each image token and head they sum to one over
    the T tokens); v: (B, T, C) token values; residual: (B, N, C), updated in place, or (N, C) shared.
    """
    b, ht, n = a_t.shape
    h = attn.num_heads
    t = ht // h
    d = attn.internal_dim // h
    c = attn.out_proj.weight.shape[0]
    vt = F.linear(v, attn.v_proj.weight, attn.v_proj.bias).reshape(b, t, h, d)
    wo = attn.out_proj.weight.reshape(c, h, d)
    u = torch.einsum("bthd,chd->bhtc", vt, wo)
    u = (u + attn.out_proj.bias / h).reshape(b, ht, c)
    if residual.dim() == 2:
        return torch.baddbmm(residual.unsqueeze(0).expand(b, n, c), a_t.transpose(1, 2), u)
    return residual.baddbmm_(a_t.transpose(1, 2), u)


def _image_to_token_shared(attn, qi: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual):
    """residual + attn(q=..., k=k, v=v) for image queries shared by all prompts, given their scaled
    query projection qi (H, d, N) (see :func:`_shared_q`); residual (N, C) is shared too."""
    b, t, _ = k.shape
    h, d, _ = _heads(attn)
    n = qi.shape[-1]
    kt = (
        F.linear(k, attn.k_proj.weight, attn.k_proj.bias).reshape(b * t, h, d).transpose(0, 1)
    )  # (H, BT, d)
    # Scores laid out with the token axis before the image axis: a softmax over a short last axis is slow.
    s = torch.bmm(kt, qi).reshape(h, b, t, n).softmax(dim=2)
    a_t = s.transpose(0, 1).reshape(b, h * t, n)
    return _image_update(attn, a_t, v, residual)


def _image_to_token(attn, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual):
    """residual + attn(q=q_in, k=k, v=v) for per-prompt (B, N, C) image queries (residual updated in place).

    The query projection is folded into the keys: (W_q x + b_q) . k_h = x . (W_q_h^T k_h) + b_q_h . k_h.
    """
    b, t, c = k.shape
    n = q_in.shape[1]
    h, d, scale = _heads(attn)
    kt = F.linear(k, attn.k_proj.weight, attn.k_proj.bias).mul_(scale).reshape(b, t, h, d)
    wq = attn.q_proj.weight.reshape(h, d, c)
    kq = torch.einsum("bthd,hdc->bhtc", kt, wq).reshape(b, h * t, c)
    kb = torch.einsum("bthd,hd->bht", kt, attn.q_proj.bias.reshape(h, d)).reshape(b, h * t, 1)
    s = torch.baddbmm(kb, kq, q_in.transpose(1, 2)).reshape(b, h, t, n).softmax(dim=2)
    return _image_update(attn, s.reshape(b, h * t, n), v, residual)


def _convt_as_linear(ct: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_in, 4*C_out) weight and bias of a 2x2 stride-2 transposed conv, outputs ordered (i, j, c_out)."""
    cin, cout = ct.weight.shape[:2]
    w = ct.weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout)
    bias = ct.bias if ct.bias is not None else ct.weight.new_zeros(cout)
    return w, bias.repeat(4)


def _upscale_and_predict(
    md, keys: torch.Tensor, hyper: torch.Tensor, h: int, w: int, out: torch.Tensor
):
    """Writes hyper @ output_upscaling(keys) for (B, N, C) image tokens and (B, M, C/8) hypernetwork
    outputs into out (B, M, 4h, 4w)."""
    ct1, ln, act1, ct2, act2 = md.output_upscaling
    w1, b1 = _convt_as_linear(ct1)
    w2, b2 = _convt_as_linear(ct2)
    c1 = ct1.out_channels
    b, n, c = keys.shape
    m = hyper.shape[1]
    out = out.view(b, m, h, 2, 2, w, 2, 2)  # (B, M, y, i1, i2, x, j1, j2)
    chunk = _chunk(
        keys.device, UPSCALE_CHUNK_BYTES, 16 * n * ct2.out_channels * keys.element_size()
    )
    for s in range(0, b, chunk):
        e = min(s + chunk, b)
        y = torch.addmm(b1, keys[s:e].reshape(-1, c), w1).reshape(-1, c1)  # rows (b, y, x, i1, j1)
        y = act1(F.layer_norm(y, (c1,), ln.weight, ln.bias, ln.eps))
        z = act2(torch.addmm(b2, y, w2))  # rows (b, y, x, i1, j1), cols (i2, j2, c2)
        z = z.reshape(e - s, n * 16, -1)  # (b, (y, x, i1, j1, i2, j2), c2)
        logits = torch.bmm(hyper[s:e], z.transpose(1, 2))  # (b, M, y*x*i1*j1*i2*j2)
        out[s:e] = logits.reshape(e - s, m, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)


def _chunk(device: torch.device, budgets: dict[str, int], bytes_per_prompt: int) -> int:
    budget = budgets.get(device.type, budgets["cuda"])
    return max(1, budget // max(1, bytes_per_prompt))


def _decode_points_fast(
    model: nn.Module, features: torch.Tensor, coords: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    pe_enc = model.prompt_encoder
    md = model.mask_decoder
    tr = md.transformer
    b = coords.shape[0]
    _, c, h, w = features.shape
    n = h * w
    n_mask = md.num_mask_tokens
    if b == 0:  # (segment_anything's decoder fails on an empty batch)
        return features.new_empty(0, n_mask - 1, 4 * h, 4 * w), features.new_empty(0, n_mask - 1)
    labels = torch.ones(b, 1, dtype=torch.int, device=coords.device)
    sparse, dense = pe_enc(points=(coords[:, None, :], labels), boxes=None, masks=None)
    image_pe = pe_enc.get_dense_pe()
    # Work shared by all prompts: layer 0's image tokens (image embedding + the dense no-mask embedding,
    # the same for every prompt) and their projections.
    x0 = (features + dense[:1]).flatten(2).transpose(1, 2)[0].contiguous()  # (N, C)
    pos = image_pe.flatten(2).transpose(1, 2)[0].contiguous()  # (N, C)
    x0_pos = x0 + pos
    layer0 = tr.layers[0]
    kv0 = _shared_kv(layer0.cross_attn_token_to_image, x0_pos, x0)
    qi0 = _shared_q(layer0.cross_attn_image_to_token, x0_pos)

    out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
    tokens = torch.cat(
        (out_tokens.unsqueeze(0).expand(b, -1, -1), sparse.to(out_tokens.dtype)), dim=1
    )
    masks = x0.new_empty(b, n_mask - 1, 4 * h, 4 * w)
    iou_pred = x0.new_empty(b, n_mask - 1)
    # The rest is per prompt: run it on chunks of prompts (on a CPU, chunks whose (chunk, N, C) image
    # tokens stay in cache).
    chunk = _chunk(x0.device, CHUNK_BYTES, n * c * x0.element_size())
    for s in range(0, b, chunk):
        e = min(s + chunk, b)
        iou_pred[s:e] = _decode_chunk(md, tokens[s:e], x0, pos, x0_pos, kv0, qi0, h, w, masks[s:e])
    return masks, iou_pred


def _decode_chunk(md, tokens, x0, pos, x0_pos, kv0, qi0, h, w, masks_out) -> torch.Tensor:
    """The per-prompt part of the decoder: writes the multimask logits into masks_out, returns the IoUs."""
    tr = md.transformer
    query_pe = tokens
    queries = tokens
    keys = None  # per-prompt (B, N, C) image tokens; None while they are still x0 for every prompt

    for layer in tr.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)

        q = queries + query_pe
        if keys is None:
            attn_out = _token_to_image_shared(layer.cross_attn_token_to_image, q, *kv0)
        else:
            keys_pos = keys + pos
            attn_out = _token_to_image(layer.cross_attn_token_to_image, q, keys_pos, keys)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))

        k = queries + query_pe
        if keys is None:
            keys = _image_to_token_shared(layer.cross_attn_image_to_token, qi0, k, queries, x0)
        else:
            keys = _image_to_token(layer.cross_attn_image_to_token, keys_pos, k, queries, keys)
            del keys_pos
        keys = layer.norm4(keys)

    # Final token->image attention, only for the tokens whose outputs are used: the iou token and the
    # multimask tokens 1..M (mask token 0 is the single-mask output).
    n_mask = md.num_mask_tokens
    sel = [0] + list(range(2, 1 + n_mask))
    q = (queries + query_pe)[:, sel]
    attn_out = _token_to_image(tr.final_attn_token_to_image, q, keys + pos, keys)
    hs = tr.norm_final_attn(queries[:, sel] + attn_out)

    hyper = torch.stack(
        [md.output_hypernetworks_mlps[i](hs[:, i]) for i in range(1, n_mask)], dim=1
    )
    _upscale_and_predict(md, keys, hyper, h, w, masks_out)
    return md.iou_prediction_head(hs[:, 0])[:, 1:]


# ----------------------------------------------------------------------------------------------
# SAM's prompt encoder + mask decoder for the heads that run them online (SAM-MI, OVSAM's CLIP2SAM,
# ESC-Net): one table of sizes, one builder, one checkpoint reader.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamDecoderSize:
    """The prompt encoder's and mask decoder's sizes of a SAM architecture (the arguments
    segment_anything's ``_build_sam`` gives them).

    Attributes:
        dim: prompt_embed_dim (the image embedding's channels).
        mlp_dim: the two-way transformer's MLP width.
        heads: its attention heads.
        iou_hidden: the IoU head's hidden width.
        image_size: SAM's input side (the embedding grid is image_size / 16).
    """

    dim: int
    mlp_dim: int
    heads: int
    iou_hidden: int
    image_size: int

    @property
    def grid(self) -> int:
        return self.image_size // 16


#: Decoder sizes per SAM architecture: segment_anything's vit_h/l/b, and samcp's test-size
#: vit_tiny (the real decoder on a tiny encoder) and vit_test (samcp.pipeline.foundation.SAM_ARCHS;
#: tests/test_sam_decoder.py checks they agree).
SAM_DECODER_SIZES: dict[str, SamDecoderSize] = {
    "vit_h": SamDecoderSize(256, 2048, 8, 256, 1024),
    "vit_l": SamDecoderSize(256, 2048, 8, 256, 1024),
    "vit_b": SamDecoderSize(256, 2048, 8, 256, 1024),
    "vit_tiny": SamDecoderSize(256, 2048, 8, 256, 1024),
    "vit_test": SamDecoderSize(32, 64, 2, 32, 256),
}


def build_prompt_decoder(size: SamDecoderSize) -> tuple[nn.Module, nn.Module]:
    """A randomly initialised (PromptEncoder, MaskDecoder) of segment_anything's own classes."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    g, s, c = size.grid, size.image_size, size.dim
    pe = PromptEncoder(
        embed_dim=c, image_embedding_size=(g, g), input_image_size=(s, s), mask_in_chans=16
    )
    md = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=c, mlp_dim=size.mlp_dim, num_heads=size.heads
        ),
        transformer_dim=c,
        iou_head_depth=3,
        iou_head_hidden_dim=size.iou_hidden,
    )
    return pe, md


def sam_checkpoint_state(path: str, arch: str, owner: str, fix: str) -> dict[str, torch.Tensor]:
    """The ``prompt_encoder.*`` and ``mask_decoder.*`` weights of a segment_anything checkpoint.

    vit_b / vit_l / vit_h go through ``segment_anything.sam_model_registry[arch](checkpoint=)``,
    which checks the whole file against the architecture; samcp's test-size archs are read as the
    state dict the file is (as samcp.pipeline.foundation.load_sam does).

    Args:
        path: the checkpoint.
        arch: its architecture.
        owner: the head asking, named in errors (``"sam_mi"``).
        fix: what to pass instead, named in the not-found error.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file does not hold a SAM of ``arch``.
    """
    import errno
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(
            errno.ENOENT, f"SAM checkpoint not found ({owner} sam_checkpoint; {fix})", path
        )
    from segment_anything import sam_model_registry

    if arch in sam_model_registry and arch != "default":
        try:
            sam = sam_model_registry[arch](checkpoint=path)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:120]
            raise ValueError(
                f"SAM checkpoint {path} does not fit sam_arch {arch} ({first})"
            ) from None
        state = {f"prompt_encoder.{k}": v for k, v in sam.prompt_encoder.state_dict().items()}
        state.update({f"mask_decoder.{k}": v for k, v in sam.mask_decoder.state_dict().items()})
        return state
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}


def load_state_part(module: nn.Module, state: dict, prefix: str, arch: str) -> None:
    """``module.load_state_dict`` (strict) of the ``prefix`` entries of ``state``; a mismatch is
    a ValueError naming the part and the fix."""
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(sub, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:120]
        raise ValueError(
            f"the SAM checkpoint's {prefix.rstrip('.')} does not fit sam_arch {arch} ({first}); "
            "set sam_arch to the checkpoint's architecture"
        ) from None
