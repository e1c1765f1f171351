"""The fast SAM image encoder against segment_anything's own ImageEncoderViT."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

import samcp.pipeline.proposals.sam_encoder as se
from samcp.pipeline.foundation import build_sam_arch
from samcp.pipeline.proposals.sam_encoder import (
    _fast_supported,
    encode_image,
    encode_image_reference,
    set_image_fast,
)

RTOL = 1e-5  # max abs difference relative to the output's max abs value


def _randomise(sam: torch.nn.Module) -> torch.nn.Module:
    """Non-zero relative / absolute position embeddings (they are zero-initialised), so that the
    relative-position terms and the position embedding actually matter."""
    enc = sam.image_encoder
    with torch.no_grad():
        if enc.pos_embed is not None:
            enc.pos_embed.normal_(0.0, 0.5)
        for blk in enc.blocks:
            if blk.attn.use_rel_pos:
                blk.attn.rel_pos_h.normal_(0.0, 0.5)
                blk.attn.rel_pos_w.normal_(0.0, 0.5)
    return sam.eval()


def tiny_sam() -> torch.nn.Module:
    torch.manual_seed(0)
    return _randomise(build_sam_arch("vit_test"))


class _EncoderOnly(torch.nn.Module):
    """A stand-in for Sam: encode_image only uses ``image_encoder``."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.image_encoder = encoder


def custom_encoder(
    use_rel_pos: bool,
    num_heads: int,
    img_size: int = 192,
    window_size: int = 5,
    global_attn_indexes: tuple[int, ...] = (1,),
    depth: int = 3,
    embed_dim: int = 48,
    seed: int = 1,
) -> torch.nn.Module:
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(seed)
    enc = ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=2.0,
        out_chans=24,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=use_rel_pos,
        window_size=window_size,
        global_attn_indexes=global_attn_indexes,
    )
    return _randomise(_EncoderOnly(enc))


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _check(model: torch.nn.Module, x: torch.Tensor) -> None:
    assert _fast_supported(model.image_encoder)
    with torch.no_grad():
        ref = encode_image_reference(model, x)
        fast = encode_image(model, x)
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    diff = _rel_diff(fast, ref)
    assert diff <= RTOL, diff


@pytest.mark.parametrize("tile_bytes", [None, 4096, 400 << 10])
def test_vit_test_matches_reference(monkeypatch, tile_bytes):
    # vit_test: a 16x16 token map, block 0 windowed (14x14 windows, padded to 28x28), block 1 global.
    # Small tiles split the global attention by query rows and the windows into several chunks.
    if tile_bytes is not None:
        monkeypatch.setitem(se.TILE_BYTES, "cpu", tile_bytes)
    sam = tiny_sam()
    enc = sam.image_encoder
    assert [b.window_size for b in enc.blocks] == [14, 0]
    torch.manual_seed(2)
    _check(sam, torch.randn(1, 3, enc.img_size, enc.img_size))


def test_batch_of_two():
    sam = tiny_sam()
    torch.manual_seed(3)
    _check(sam, torch.randn(2, 3, 256, 256))


@pytest.mark.parametrize("tile_bytes", [None, 4096])
def test_custom_encoder_without_rel_pos(monkeypatch, tile_bytes):
    if tile_bytes is not None:
        monkeypatch.setitem(se.TILE_BYTES, "cpu", tile_bytes)
    model = custom_encoder(use_rel_pos=False, num_heads=3)
    torch.manual_seed(4)
    _check(model, torch.randn(1, 3, 192, 192))


@pytest.mark.parametrize("tile_bytes", [None, 4096])
def test_custom_encoder_with_rel_pos_and_heads(monkeypatch, tile_bytes):
    # 12x12 tokens, 5x5 windows (padded to 15x15), 4 heads, global block in the middle.
    if tile_bytes is not None:
        monkeypatch.setitem(se.TILE_BYTES, "cpu", tile_bytes)
    model = custom_encoder(use_rel_pos=True, num_heads=4)
    torch.manual_seed(5)
    _check(model, torch.randn(1, 3, 192, 192))


def test_windows_without_padding_and_all_global():
    model = custom_encoder(use_rel_pos=True, num_heads=2, window_size=4, global_attn_indexes=())
    torch.manual_seed(6)
    _check(model, torch.randn(1, 3, 192, 192))
    model = custom_encoder(use_rel_pos=True, num_heads=2, window_size=0, depth=2)
    _check(model, torch.randn(1, 3, 192, 192))


def test_interpolated_rel_pos():
    # A relative-position table of another length than 2 * size - 1 is linearly interpolated.
    model = custom_encoder(use_rel_pos=True, num_heads=2)
    torch.manual_seed(7)
    for blk in model.image_encoder.blocks:
        d = blk.attn.rel_pos_h.shape[1]
        blk.attn.rel_pos_h = torch.nn.Parameter(torch.randn(7, d) * 0.5)
        blk.attn.rel_pos_w = torch.nn.Parameter(torch.randn(30, d) * 0.5)
    _check(model, torch.randn(1, 3, 192, 192))


def test_unsupported_structures_fall_back():
    from segment_anything.modeling import ImageEncoderViT

    class MyEncoder(ImageEncoderViT):
        pass

    sam = tiny_sam()
    enc = sam.image_encoder
    assert _fast_supported(enc)
    sub = MyEncoder(
        img_size=256, embed_dim=32, depth=1, num_heads=2, out_chans=32, use_rel_pos=True
    )
    assert not _fast_supported(sub)
    handle = enc.blocks[0].attn.register_forward_hook(lambda m, i, o: o * 2)
    try:
        assert not _fast_supported(enc)
        x = torch.randn(1, 3, 256, 256)
        with torch.no_grad():
            torch.testing.assert_close(encode_image(sam, x), encode_image_reference(sam, x))
    finally:
        handle.remove()
    assert _fast_supported(enc)


def test_autograd_uses_reference():
    sam = tiny_sam()
    x = torch.randn(1, 3, 256, 256)
    out = encode_image(sam, x)  # grad enabled, parameters require grad
    assert out.requires_grad
    with torch.no_grad():
        assert _rel_diff(out.detach(), encode_image_reference(sam, x)) == 0.0


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_set_image_fast_matches_predictor(image_format):
    from segment_anything import SamPredictor

    sam = tiny_sam()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(150, 200, 3), dtype=np.uint8)  # non-square
    ref = SamPredictor(sam)
    ref.set_image(image, image_format)
    fast = SamPredictor(sam)
    set_image_fast(fast, image, image_format)
    assert fast.is_image_set and ref.is_image_set
    assert fast.original_size == ref.original_size == (150, 200)
    assert fast.input_size == ref.input_size == (192, 256)
    assert fast.features.shape == ref.features.shape
    assert not fast.features.requires_grad
    assert _rel_diff(fast.features, ref.features) <= RTOL
