"""SAM's ViT image encoder with a memory-friendly attention.

:func:`encode_image` computes what ``model.image_encoder(x)`` computes (segment_anything's
``ImageEncoderViT``: patch embedding, absolute position embedding, windowed / global attention blocks with
decomposed relative position bias, neck) up to float rounding, re-running the encoder's own submodules
(patch embedding, norms, MLPs, neck) and its attention weights, but with the attention restructured:

* The reference materialises every (batch x heads, L, L) score tensor at once -- for a 64x64 global
  attention block with 12 heads that is 805 MB -- and streams it through memory five times (score
  matmul, two broadcast adds of the relative-position terms that each allocate a new tensor, softmax,
  value matmul). Here the scores are computed tile by tile (a chunk of heads x a chunk of query rows,
  sized to stay in the last-level cache): ``(q * scale) @ k^T`` into a reused buffer, the two
  relative-position terms added in place (in the reference's order), softmax in place, ``@ v`` straight
  into the output. Same operations, same order of additions; only the matmul blocking differs.
* Windowed blocks: the reference zero-pads the normalised tokens to a multiple of the window size and runs
  the qkv projection on the padded map (a zero token projects exactly to the qkv bias), and runs the
  output projection on the padded windows before cropping. Here qkv runs on the H x W real tokens only
  and the padding is filled with the bias; the output is cropped before the projection (a per-token
  linear map), so ~16% fewer projection FLOPs for a 64x64 map with 14x14 windows.

Encoders that are not segment_anything's exact classes (subclasses, hooks, other attention modules), or
calls that need autograd, fall back to :func:`encode_image_reference`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Bytes of one attention score tile (a chunk of heads x a chunk of queries x all keys). On a CPU the
#: sweet spot is a trade-off, measured with vit_b on a shared 2-core, 32 MiB-L3 machine: on an idle
#: machine 32 MiB (about the L3) was best for a global block, 128 MiB ~10% slower there (~0.15 s per
#: image); but every tile costs five parallel regions, and when other processes compete for the cores
#: each region waits for a descheduled thread: under load, 128 MiB tiles encoded an image in ~12-14 s
#: against ~16-17 s with 32 MiB (reference ~22 s). Peak memory is still ~2 GB below the reference's.
#: On a GPU, just a memory bound.
TILE_BYTES = {"cpu": 128 << 20, "cuda": 256 << 20}


def encode_image(model: nn.Module, input_image: torch.Tensor) -> torch.Tensor:
    """``model.image_encoder(input_image)`` for a segment_anything Sam, computed faster.

    Args:
        model: a segment_anything Sam (only its ``image_encoder`` is used).
        input_image: (B, 3, S, S) preprocessed image (``model.preprocess`` output).

    Returns:
        (B, out_chans, S/16, S/16) image embedding, on the input's device.
    """
    enc = model.image_encoder
    needs_grad = torch.is_grad_enabled() and (
        input_image.requires_grad or any(p.requires_grad for p in enc.parameters())
    )
    if needs_grad or not _fast_supported(enc):
        return encode_image_reference(model, input_image)
    with torch.no_grad():
        return _encode_fast(enc, input_image)


def encode_image_reference(model: nn.Module, input_image: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`encode_image`, through segment_anything's own module (slow, exact)."""
    return model.image_encoder(input_image)


def embed_image(
    model: nn.Module, image: np.ndarray, image_format: str = "RGB", transform=None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM's image embedding of one HxWx3 uint8 image, computed as ``SamPredictor.set_image`` does:
    channel order to the model's, ``ResizeLongestSide(img_size)`` (``transform``, the predictor's
    own when given), ``model.preprocess`` (normalise, pad to square), then :func:`encode_image`.

    The one code path for SAM embeddings: :func:`set_image_fast` (SAM proposals, whose embedding is
    the same encoder pass) and an embedding-only SAM pass (``sam_embed`` for other proposals) both
    run it.

    Returns:
        ``(features, input_size)``: the (1, out_chans, S/16, S/16) embedding on the model's device,
        and the resized image's (h, w) before padding.
    """
    assert image_format in ["RGB", "BGR"], (
        f"image_format must be in ['RGB', 'BGR'], is {image_format}."
    )
    if transform is None:
        from segment_anything.utils.transforms import ResizeLongestSide

        transform = ResizeLongestSide(model.image_encoder.img_size)
    if image_format != model.image_format:
        image = image[..., ::-1]
    input_image = transform.apply_image(image)
    input_image_torch = torch.as_tensor(input_image, device=model.device)
    input_image_torch = input_image_torch.permute(2, 0, 1).contiguous()[None, :, :, :]

    img_size = model.image_encoder.img_size
    assert (
        len(input_image_torch.shape) == 4
        and input_image_torch.shape[1] == 3
        and max(*input_image_torch.shape[2:]) == img_size
    ), f"set_torch_image input must be BCHW with long side {img_size}."
    input_size = tuple(input_image_torch.shape[-2:])
    with torch.no_grad():
        features = encode_image(model, model.preprocess(input_image_torch))
    return features, input_size


def sam_embed_array(features: torch.Tensor) -> np.ndarray:
    """The cache's ``sam_embed`` row of a (1, C, h, w) embedding: (C, h, w) float16 on the CPU."""
    return features[0].float().cpu().numpy().astype(np.float16)


def set_image_fast(predictor, image: np.ndarray, image_format: str = "RGB") -> None:
    """``predictor.set_image(image, image_format)`` for a segment_anything SamPredictor, with the image
    embedding computed by :func:`embed_image` (:func:`encode_image`): same resize transform, same
    preprocessing; sets ``features``, ``original_size``, ``input_size`` and ``is_image_set`` the same
    way."""
    features, input_size = embed_image(
        predictor.model, image, image_format, transform=predictor.transform
    )
    predictor.reset_image()
    predictor.original_size = image.shape[:2]
    predictor.input_size = input_size
    predictor.features = features
    predictor.is_image_set = True


# --------------------------------------------------------------------------------------------------
# Structure check


def _no_hooks(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks)


def _fast_supported(enc: nn.Module) -> bool:
    """True when ``enc`` is segment_anything's exact ImageEncoderViT (blocks and attentions included),
    so that re-implementing its, its blocks' and its attentions' forward is exact."""
    try:
        from segment_anything.modeling.image_encoder import Attention, Block, ImageEncoderViT
    except ImportError:  # pragma: no cover - segment_anything is a dependency
        return False
    if type(enc) is not ImageEncoderViT or not _no_hooks(enc):
        return False
    for name in ("patch_embed", "blocks", "neck"):
        if not isinstance(getattr(enc, name, None), nn.Module):
            return False
    for blk in enc.blocks:
        if type(blk) is not Block or not _no_hooks(blk):
            return False
        attn = blk.attn
        if type(attn) is not Attention or not _no_hooks(attn):
            return False
        if type(attn.qkv) is not nn.Linear or type(attn.proj) is not nn.Linear:
            return False
        if not (_no_hooks(attn.qkv) and _no_hooks(attn.proj)):
            return False
        nh = attn.num_heads
        if attn.qkv.out_features % (3 * nh) or attn.proj.in_features != attn.qkv.out_features // 3:
            return False
        if attn.use_rel_pos:
            d = attn.qkv.out_features // (3 * nh)
            if attn.rel_pos_h.shape[-1] != d or attn.rel_pos_w.shape[-1] != d:
                return False
    return True


# --------------------------------------------------------------------------------------------------
# Fast path


def _encode_fast(enc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = enc.patch_embed(x)
    if enc.pos_embed is not None:
        x = x + enc.pos_embed
    for blk in enc.blocks:
        x = x + _block_attention(blk.attn, blk.norm1(x), blk.window_size)
        x = x + blk.mlp(blk.norm2(x))
    return enc.neck(x.permute(0, 3, 1, 2))


def _block_attention(attn: nn.Module, x: torch.Tensor, window: int) -> torch.Tensor:
    """A Block's attention branch on its normalised (B, H, W, C) tokens ``x``: ``attn`` over the whole
    map (``window`` == 0) or, like window_partition -> attn -> window_unpartition, over zero-padded
    ``window`` x ``window`` windows. Returns (B, H, W, C), before the residual add."""
    b, h, w, _ = x.shape
    nh = attn.num_heads
    d = attn.qkv.out_features // (3 * nh)
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)  # (B, H, W, 3C')
    if window > 0:
        ph = (window - h % window) % window
        pw = (window - w % window) % window
        if ph or pw:
            # The reference pads the normalised tokens with zeros; a zero token's qkv is the bias.
            padded = qkv.new_empty(b, h + ph, w + pw, qkv.shape[-1])
            fill = attn.qkv.bias if attn.qkv.bias is not None else 0.0
            padded[:, h:] = fill
            padded[:, :h, w:] = fill
            padded[:, :h, :w] = qkv
            qkv = padded
        hp, wp = h + ph, w + pw
        nwh, nww = hp // window, wp // window
        # (B, nWh, ws, nWw, ws, 3, nh, d) -> (3, B * nW * nh, ws * ws, d), window-major like the reference.
        qkv = qkv.view(b, nwh, window, nww, window, 3, nh, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = qkv.reshape(3, b * nwh * nww * nh, window * window, d).unbind(0)
        o = _attend(attn, q, k, v, (window, window))  # (B * nW * nh, ws * ws, d)
        o = o.view(b, nwh, nww, nh, window, window, d).permute(0, 1, 4, 2, 5, 3, 6)
        o = o.reshape(b, hp, wp, nh * d)[:, :h, :w]
    else:
        qkv = qkv.view(b, h * w, 3, nh, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * nh, h * w, d).unbind(0)
        o = _attend(attn, q, k, v, (h, w))  # (B * nh, H * W, d)
        o = o.view(b, nh, h, w, d).permute(0, 2, 3, 1, 4).reshape(b, h, w, nh * d)
    return F.linear(o, attn.proj.weight, attn.proj.bias)


def _rel_pos(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """(size, size, d) relative position embeddings R[i, j] = rel_pos[i - j + size - 1] for a query and
    key axis of the same length, after linear interpolation of the table to 2 * size - 1 entries when its
    length differs (segment_anything's get_rel_pos with q_size == k_size)."""
    n = 2 * size - 1
    if rel_pos.shape[0] != n:
        table = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=n, mode="linear"
        )
        table = table.reshape(-1, n).permute(1, 0)
    else:
        table = rel_pos
    idx = torch.arange(size, device=rel_pos.device)
    return table[idx[:, None] - idx[None, :] + (size - 1)]


def _attend(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """softmax((q * scale) @ k^T + rel_h + rel_w) @ v for (N, L, d) q, k, v over an (h, w) token grid,
    tile by tile. Returns (N, L, d)."""
    n, length, d = q.shape
    h, w = hw
    rel_h = rel_w = None
    if attn.use_rel_pos:
        # The reference's decomposed terms, from the unscaled queries: (N, L, h) and (N, L, w).
        rq = q.reshape(n, h, w, d)
        rh, rw = _rel_pos(h, attn.rel_pos_h), _rel_pos(w, attn.rel_pos_w)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, rh).reshape(n, length, h)
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, rw).reshape(n, length, w)
    qs = q * attn.scale
    kt = k.transpose(1, 2)
    out = q.new_empty(n, length, d)

    # Tiles: whole (L, L) score matrices of as many batch entries (windows x heads) as fit, or, when one
    # does not fit (global attention), as many query rows of one batch entry as fit.
    es = q.element_size()
    tile = TILE_BYTES.get(q.device.type, TILE_BYTES["cuda"])
    per_row = length * es  # one query's scores
    if length * per_row <= tile:
        nb, m = max(1, min(n, tile // (length * per_row))), length
    else:
        nb, m = 1, max(1, tile // per_row)
    in_place = q.device.type == "cpu"  # CPU softmax kernel works row by row: out= input is safe
    buf = q.new_empty(nb * m * length)
    for b0 in range(0, n, nb):
        b1 = min(n, b0 + nb)
        for i0 in range(0, length, m):
            i1 = min(length, i0 + m)
            # (b1-b0, i1-i0, d) output slices are contiguous: either m == length or nb == 1.
            s = buf[: (b1 - b0) * (i1 - i0) * length].view(b1 - b0, i1 - i0, length)
            torch.bmm(qs[b0:b1, i0:i1], kt[b0:b1], out=s)
            if rel_h is not None:
                # attn + rel_h[..., None] + rel_w[..., None, :], in the reference's order.
                s4 = s.view(b1 - b0, i1 - i0, h, w)
                s4.add_(rel_h[b0:b1, i0:i1, :, None])
                s4.add_(rel_w[b0:b1, i0:i1, None, :])
            if in_place:
                torch.ops.aten._softmax.out(s, -1, False, out=s)
            else:
                s = torch.softmax(s, dim=-1)
            torch.bmm(s, v[b0:b1], out=out[b0:b1, i0:i1])
    return out
