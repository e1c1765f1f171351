"""The fast SAM point decoder against segment_anything's own prompt encoder + mask decoder."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import samcp.models.sam_decoder as sd
from samcp.models.sam_decoder import (
    _fast_supported,
    decode_points,
    decode_points_reference,
)
from samcp.pipeline.foundation import build_sam_arch


def _spread_logits(sam: torch.nn.Module, scale: float = 30.0) -> torch.nn.Module:
    # Like make_random_sam_checkpoint: a random SAM's logits are ~0 everywhere otherwise.
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(scale)
    return sam.eval()


def tiny_sam() -> torch.nn.Module:
    torch.manual_seed(0)
    return _spread_logits(build_sam_arch("vit_test"))


def decoder_sam(
    embed_size: tuple[int, int] = (16, 16),
    dim: int = 256,
    heads: int = 8,
    mlp_dim: int = 2048,
    depth: int = 2,
    num_multimask_outputs: int = 3,
    seed: int = 1,
) -> torch.nn.Module:
    """A random SAM with the given decoder sizes (defaults: the real vit_b/l/h decoder) and a small
    image; the image encoder is a tiny stand-in (never run here)."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(seed)
    eh, ew = embed_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=1,
            embed_dim=16,
            img_size=16 * max(eh, ew),
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=False,
            global_attn_indexes=[0],
            window_size=0,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(eh, ew),
            input_image_size=(16 * eh, 16 * ew),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=depth, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=heads
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=64,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return _spread_logits(sam)


def random_inputs(
    sam: torch.nn.Module, num: int, seed: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    eh, ew = sam.prompt_encoder.image_embedding_size
    ih, iw = sam.prompt_encoder.input_image_size
    dim = sam.prompt_encoder.embed_dim
    features = torch.randn(1, dim, eh, ew, generator=g)
    # float64 like SamEverything's coordinates; include the corners.
    coords = torch.rand(num, 2, generator=g, dtype=torch.float64) * torch.tensor(
        [iw, ih], dtype=torch.float64
    )
    coords[0] = 0.0
    coords[-1] = torch.tensor([iw - 1, ih - 1], dtype=torch.float64)
    return features, coords


def assert_matches(sam: torch.nn.Module, features: torch.Tensor, coords: torch.Tensor) -> None:
    with torch.inference_mode():
        ref_logits, ref_iou = decode_points_reference(sam, features, coords)
        logits, iou = decode_points(sam, features, coords)
    assert logits.shape == ref_logits.shape and iou.shape == ref_iou.shape
    assert logits.dtype == ref_logits.dtype == torch.float32
    scale = ref_logits.abs().max().item()
    assert scale > 1.0  # the comparison is not vacuous
    assert (logits - ref_logits).abs().max().item() <= 1e-4 * scale
    assert (iou - ref_iou).abs().max().item() <= 1e-5 * max(1.0, ref_iou.abs().max().item())


def test_tiny_sam_matches_reference():
    sam = tiny_sam()
    assert _fast_supported(sam)
    features, coords = random_inputs(sam, 23)
    assert_matches(sam, features, coords)


def test_real_decoder_widths_match_reference():
    sam = decoder_sam()  # 256-dim tokens, 8 heads, MLP 2048; 16x16 embedding
    assert _fast_supported(sam)
    features, coords = random_inputs(sam, 12)
    assert_matches(sam, features, coords)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"embed_size": (12, 20)},  # non-square embedding
        {"dim": 48, "heads": 3, "mlp_dim": 96},  # odd head count / head dim
        {"dim": 32, "heads": 2, "mlp_dim": 64, "depth": 1},
        {"dim": 32, "heads": 2, "mlp_dim": 64, "depth": 3},
        {"dim": 32, "heads": 2, "mlp_dim": 64, "num_multimask_outputs": 2},
    ],
)
def test_other_architectures_match_reference(kwargs):
    sam = decoder_sam(**kwargs)
    assert _fast_supported(sam)
    features, coords = random_inputs(sam, 9)
    assert_matches(sam, features, coords)


def test_chunking_matches_unchunked(monkeypatch):
    sam = tiny_sam()
    features, coords = random_inputs(sam, 7)
    with torch.inference_mode():
        whole = decode_points(sam, features, coords)
    for name in ("CHUNK_BYTES", "UPSCALE_CHUNK_BYTES"):
        monkeypatch.setattr(sd, name, {"cpu": 1, "cuda": 1})  # one prompt per chunk
    with torch.inference_mode():
        chunked = decode_points(sam, features, coords)
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=1e-6)
    assert_matches(sam, features, coords)


def test_empty_batch_and_grad_mode():
    sam = tiny_sam()
    features, coords = random_inputs(sam, 3)
    with torch.inference_mode():
        logits, iou = decode_points(sam, features, coords[:0])
    assert logits.shape == (0, 3, 64, 64) and iou.shape == (0, 3)
    # Outside inference mode too (the fast path's in-place ops must not upset autograd).
    logits, iou = decode_points(sam, features, coords)
    ref_logits, ref_iou = decode_points_reference(sam, features, coords)
    assert logits.requires_grad  # the path ran with autograd recording
    torch.testing.assert_close(
        logits, ref_logits, rtol=0, atol=1e-4 * ref_logits.abs().max().item()
    )
    torch.testing.assert_close(iou, ref_iou, rtol=0, atol=1e-5)


def test_unsupported_structure_falls_back_to_reference():
    from segment_anything.modeling.mask_decoder import MaskDecoder

    class CustomAct(torch.nn.Module):  # not known to be elementwise
        def forward(self, x):
            return torch.nn.functional.gelu(x) + 0.1 * x.mean(1, keepdim=True)

    class CustomDecoder(MaskDecoder):
        pass

    sam = tiny_sam()
    sam.mask_decoder.output_upscaling[2] = CustomAct()
    assert not _fast_supported(sam)
    features, coords = random_inputs(sam, 5)
    with torch.inference_mode():
        for got, want in zip(
            decode_points(sam, features, coords), decode_points_reference(sam, features, coords)
        ):
            assert torch.equal(got, want)

    sam = tiny_sam()
    sam.mask_decoder.__class__ = CustomDecoder  # a subclass may override forward: don't guess
    assert not _fast_supported(sam)


def test_the_heads_sam_decoder_sizes_agree_with_the_pipelines_sam_architectures():
    from samcp.models.sam_decoder import SAM_DECODER_SIZES, build_prompt_decoder
    from samcp.pipeline.foundation import SAM_ARCHS

    assert set(SAM_DECODER_SIZES) == set(SAM_ARCHS)
    for arch, d in SAM_DECODER_SIZES.items():
        a = SAM_ARCHS[arch]
        want = (a.prompt_embed_dim, a.decoder_mlp_dim, a.decoder_num_heads, a.iou_head_hidden_dim)
        assert (*want, a.image_size) == (d.dim, d.mlp_dim, d.heads, d.iou_hidden, d.image_size)
    pe, md = build_prompt_decoder(SAM_DECODER_SIZES["vit_test"])
    assert tuple(pe.image_embedding_size) == (16, 16) and md.transformer_dim == 32


def test_sam_checkpoint_state_names_what_is_missing_and_what_does_not_fit(tmp_path):
    import pytest
    import torch

    from samcp.models.sam_decoder import (
        SAM_DECODER_SIZES,
        build_prompt_decoder,
        load_state_part,
        sam_checkpoint_state,
    )
    from samcp.pipeline.foundation import make_random_sam_checkpoint

    with pytest.raises(FileNotFoundError, match="sam_mi sam_checkpoint; pass it"):
        sam_checkpoint_state(str(tmp_path / "none.pth"), "vit_test", "sam_mi", "pass it")
    path = make_random_sam_checkpoint(tmp_path / "sam.pth", "vit_test")
    state = sam_checkpoint_state(str(path), "vit_test", "x", "y")
    assert state and all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in state)
    pe, md = build_prompt_decoder(SAM_DECODER_SIZES["vit_test"])
    load_state_part(md, state, "mask_decoder.", "vit_test")
    want = torch.load(path, map_location="cpu", weights_only=True)["mask_decoder.iou_token.weight"]
    torch.testing.assert_close(md.iou_token.weight, want)
    _, big = build_prompt_decoder(SAM_DECODER_SIZES["vit_tiny"])
    with pytest.raises(ValueError, match="mask_decoder does not fit sam_arch vit_tiny"):
        load_state_part(big, state, "mask_decoder.", "vit_tiny")
