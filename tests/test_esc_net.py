"""ESC-Net: the pseudo prompt generator (deterministic k-means, points in their regions, padding),
SAM's two-way blocks loaded from a segment_anything checkpoint equal to segment_anything's own
TwoWayTransformer, class-order equivariance, chunked = unchunked, the learning-rate groups.

Tiny shapes throughout; SAM is a random vit_tiny checkpoint (the real 256-wide decoder) written by
samcp.pipeline.foundation.write_random_sam_checkpoint and read through the real loading path.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from samcp.models.esc_net import (
    EscNetConfig,
    build_esc_net,
    encode_prompts,
    kmeans_regions,
    pseudo_prompts,
    two_way_blocks,
)
from samcp.models.esc_net.plugin import EscNetPlugin
from samcp.models.heads import CacheInfo, Head
from samcp.models.registry import get_head

H = W = 8  # the correlation grid of a 64-pixel CLIP frame at stride 8


def tiny(**kw) -> EscNetConfig:
    return EscNetConfig.tiny(clip_head_source="learned", **kw)


def vit_tiny(path, **kw) -> EscNetConfig:
    from samcp.models.sam_decoder import SAM_DECODER_SIZES

    d = SAM_DECODER_SIZES["vit_tiny"]
    dim, mlp, heads, size = d.dim, d.mlp_dim, d.heads, d.image_size
    params = dict(
        sam_arch="vit_tiny",
        sam_blocks="pretrained",
        sam_checkpoint=str(path),
        sam_dim=dim,
        sam_mlp_dim=mlp,
        sam_heads=heads,
        sam_image_size=size,
    )
    return tiny(**{**params, **kw})


@pytest.fixture(scope="module")
def sam_ckpt(tmp_path_factory):
    from samcp.pipeline.foundation import write_random_sam_checkpoint

    return write_random_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam.pth", model="vit_b")


@pytest.fixture(scope="module")
def loaded(sam_ckpt):
    """(ESC-Net with SAM's weights loaded as `samcp train` loads them, segment_anything's SAM)."""
    from samcp.pipeline.foundation import load_sam

    cfg = vit_tiny(sam_ckpt, num_prompts=5)
    torch.manual_seed(0)
    model = build_esc_net(cfg).eval()
    EscNetPlugin().init_from_cache(model, cfg, cache_info())
    return model, load_sam("vit_tiny", sam_ckpt)


def cache_info() -> CacheInfo:
    return CacheInfo(None, 64, ("clip_res5",), {"clip_res5": 8}, {"clip_res5": 12}, 8)


def probability_maps(m: int, seed: int = 0) -> torch.Tensor:
    """(m, H, W) maps with a few blobs each (softmax over m 'classes' per pixel)."""
    g = torch.Generator().manual_seed(seed)
    logits = F.interpolate(torch.randn(1, m, 3, 3, generator=g) * 4, size=(H, W), mode="bilinear")
    return logits[0].softmax(0)


def batch(cfg: EscNetConfig, k: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "clip_map": torch.randn(2, cfg.clip_channels, H, W, generator=g),
        "guidance": [],
        "text_embed": torch.randn(k, cfg.text_dim, generator=g),
    }


# --- PPG ----------------------------------------------------------------------------------------


def test_kmeans_is_deterministic_and_every_point_lies_in_its_region():
    prob = probability_maps(6)
    a = pseudo_prompts(prob.log(), 0.3, 5, 10)
    b = pseudo_prompts(prob.log(), 0.3, 5, 10)
    for x, y in zip(vars(a).values(), vars(b).values()):
        assert torch.equal(x, y)
    fg = prob > 0.3
    assert fg.sum() > 20 and (a.valid.sum(1) == 5).sum() >= 3  # a non-trivial case
    for i in range(prob.shape[0]):
        regions = a.regions[i]
        assert not (regions.sum(0) > 1).any()  # disjoint
        assert torch.equal(regions.any(0), fg[i])  # together, the foreground
        for j in range(5):
            if not a.valid[i, j]:
                assert not regions[j].any()
                continue
            x, y = a.points[i, j].tolist()
            assert regions[j, y, x]  # the point is inside its region ...
            inside = prob[i][regions[j]]
            assert prob[i, y, x] == inside.max()  # ... at its highest probability
    # A class's prompts depend on its own map only (class order, chunking).
    for i in range(prob.shape[0]):
        one = pseudo_prompts(prob[i : i + 1].log(), 0.3, 5, 10)
        assert torch.equal(one.regions[0], a.regions[i]) and torch.equal(one.points[0], a.points[i])


def test_kmeans_separates_distant_blobs():
    fg = torch.zeros(1, 12, 12, dtype=torch.bool)
    fg[0, 0:3, 0:3] = True
    fg[0, 8:11, 9:12] = True
    assign, valid = kmeans_regions(fg, torch.tensor([0]), 2, 5)
    assert valid.all()
    a = assign.reshape(12, 12)
    assert (a[0:3, 0:3] == a[0, 0]).all() and (a[8:11, 9:12] == a[8, 9]).all()
    assert a[0, 0] != a[8, 9]


def test_fewer_foreground_pixels_than_regions_pad_cleanly(loaded):
    model, _ = loaded
    prob = torch.full((3, H, W), 0.1)
    prob[0, 2, 3] = prob[0, 5, 6] = 0.9  # two foreground pixels for N_o = 5
    prob[2] = 0.95  # everything foreground
    p = pseudo_prompts(prob.log(), 0.5, 5, 10)
    assert p.valid.sum(1).tolist() == [2, 0, 5]
    assert p.labels[0].tolist() == [1, 1, -1, -1, -1] and (p.labels[1] == -1).all()
    assert {tuple(xy) for xy in p.points[0, :2].tolist()} == {(3, 2), (6, 5)}
    assert not p.regions[0, 2:].any() and not p.regions[1].any()

    sparse, dense = encode_prompts(model.prompt_encoder, prob.log(), model.config)
    assert sparse.shape == (3, 6, 256) and dense.shape == (3, 256, H, W)
    assert torch.isfinite(sparse).all() and torch.isfinite(dense).all()
    pe = model.prompt_encoder
    not_a_point = pe.not_a_point_embed.weight[0]
    assert torch.equal(sparse[0, 2], not_a_point) and torch.equal(sparse[1, 0], not_a_point)
    no_mask = pe.no_mask_embed.weight[0][:, None, None].expand(-1, H, W)
    assert torch.equal(dense[1], no_mask) and not torch.allclose(dense[0], no_mask)


def test_point_prompts_sit_at_their_cells_in_sams_positional_encoding(loaded):
    """A point at cell (x, y) gets SAM's encoding of that cell's centre: the dense image PE at
    (y, x) (the PE resized to the map) plus SAM's foreground-point embedding."""
    model, _ = loaded
    prob = torch.full((1, H, W), 0.1)
    prob[0, 5, 2] = 0.9
    sparse, _ = encode_prompts(model.prompt_encoder, prob.log(), model.config)
    pe = model.image_pe(H, W)
    fg = model.prompt_encoder.point_embeddings[1].weight[0]
    torch.testing.assert_close(sparse[0, 0], pe[:, 5, 2] + fg, rtol=1e-5, atol=1e-5)


# --- SAM's blocks -------------------------------------------------------------------------------


def test_loaded_two_way_blocks_equal_segment_anythings_transformer(loaded):
    model, sam = loaded
    tr = sam.mask_decoder.transformer
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 256, H, W, generator=g)
    pe = model.image_pe(H, W)[None]
    tokens = torch.randn(3, 11, 256, generator=g)
    with torch.no_grad():
        _, want = tr(image, pe, tokens)
        for block in model.blocks:  # every ESC block starts from SAM's weights
            _, got = two_way_blocks(block.layers, tokens, image.flatten(2).transpose(1, 2),
                                    pe.flatten(2).transpose(1, 2))  # fmt: skip
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    md = sam.mask_decoder
    sam_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight])
    assert torch.equal(model.blocks[0].output_tokens, sam_tokens)
    for key, value in sam.prompt_encoder.state_dict().items():
        assert torch.equal(model.prompt_encoder.state_dict()[key], value)


def test_an_esc_blocks_sam_side_is_sams_decoder_on_the_pseudo_prompts(loaded):
    """One class with one foreground pixel, so one region: the block's output (fusion at its
    identity initialisation) is segment_anything's prompt encoder + TwoWayTransformer on the CLIP
    tokens with that point and that region's mask prompt (logit(P) in the region, -L outside, at
    4x the map), the other four point slots padded."""
    model, sam = loaded
    cfg = model.config
    prob = torch.full((1, 1, H, W), 0.2)
    prob[0, 0, 3, 4] = 0.9
    image = torch.randn(1, 256, H, W, generator=torch.Generator().manual_seed(1))
    block = model.blocks[0]
    with torch.no_grad():
        got = block(image, prob.log(), model.image_pe(H, W), model.prompt_encoder, cfg)

        lim = cfg.mask_prompt_logit
        mask = torch.full((H, W), -lim)
        mask[3, 4] = torch.logit(torch.tensor(0.9))
        mask = mask.repeat_interleave(4, 0).repeat_interleave(4, 1)[None, None]
        point = torch.tensor([[[(4 + 0.5) * 1024 / W - 0.5, (3 + 0.5) * 1024 / H - 0.5]]])
        labels = torch.tensor([[1, -1, -1, -1, -1]])
        points = torch.cat([point, torch.zeros(1, 4, 2)], 1)
        sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=mask)
        md = sam.mask_decoder
        tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight])[None]
        pe = sam.prompt_encoder.pe_layer((H, W))[None]
        _, keys = md.transformer(image + dense, pe, torch.cat([tokens, sparse], 1))
    torch.testing.assert_close(got, keys.transpose(1, 2).reshape(1, 256, H, W), rtol=1e-4,
                               atol=1e-4)  # fmt: skip


def test_random_blocks_are_not_sams_and_keep_sams_prompt_encoder(sam_ckpt, loaded):
    _, sam = loaded
    cfg = vit_tiny(sam_ckpt, sam_blocks="random")
    torch.manual_seed(0)
    model = build_esc_net(cfg)
    EscNetPlugin().init_from_cache(model, cfg, cache_info())
    want = sam.mask_decoder.transformer.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(model.blocks[0].layers[0].self_attn.q_proj.weight, want)
    assert torch.equal(
        model.prompt_encoder.mask_downscaling[0].weight,
        sam.prompt_encoder.mask_downscaling[0].weight,
    )


# --- the network --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [5, 12])  # fewer and more classes than pad_len = 8
def test_permuting_the_classes_permutes_the_logits(loaded, k):
    model, _ = loaded
    b = batch(model.config, k)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(**b).logits
        c = model(**{**b, "text_embed": b["text_embed"][perm]}).logits
    torch.testing.assert_close(c, a[:, perm], rtol=1e-4, atol=1e-5)


def test_chunked_prediction_equals_unchunked(loaded):
    model, _ = loaded
    b = batch(model.config, 11, seed=3)
    whole = build_esc_net(dataclasses.replace(model.config, class_chunk=0)).eval()
    whole.load_state_dict(model.state_dict())
    with torch.no_grad():
        chunked = model(**b).logits  # class_chunk 4: chunks of 4, 4, 3
        plain = whole(**b).logits
    assert model.config.class_chunk == 4
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)


def test_the_prompts_change_the_output_and_the_refined_correlation_is_trained(loaded):
    """The SAM side is not a no-op, and the read-outs that blocks >= 1 prompt from get gradients
    (through the mask prompts' logit(P))."""
    model, _ = loaded
    model = build_esc_net(model.config)
    model.load_state_dict(loaded[0].state_dict())
    b = batch(model.config, 4)
    out = model(**b).logits
    out.square().mean().backward()
    assert (
        model.readouts[0].weight.grad is not None and model.readouts[0].weight.grad.abs().sum() > 0
    )
    layer = model.blocks[0].layers[0]
    assert layer.cross_attn_image_to_token.q_proj.weight.grad.abs().sum() > 0
    assert layer.mlp.lin1.weight.grad is None  # sam_trainable: attention
    assert not any(p.requires_grad for p in model.prompt_encoder.parameters())
    with torch.no_grad():
        model.blocks[0].fuse.weight.zero_()  # cut the SAM side off
        assert not torch.allclose(model(**b).logits, out, atol=1e-4)


def test_sam_blocks_get_the_small_learning_rate():
    cfg = tiny()
    model = build_esc_net(cfg)
    groups = get_head("esc_net").param_groups(model, cfg, 2e-4)
    assert [g.get("lr") for g in groups] == [None, pytest.approx(2e-6)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    sam = {id(p) for p in groups[1]["params"]}
    assert id(model.blocks[1].layers[0].self_attn.q_proj.weight) in sam
    assert id(model.blocks[1].fuse.weight) not in sam
    # The default of every other head: one group with every parameter.
    plain = Head().param_groups(model, cfg, 1.0)
    assert len(plain) == 1 and len(plain[0]["params"]) == len(list(model.parameters()))


def test_configure_takes_sams_sizes_and_asks_for_a_checkpoint(tmp_path):
    head = get_head("esc_net")
    assert head.outputs == ("semantic",)
    base = {"guidance_levels": [], "clip_head_source": "learned"}
    out = head.configure({**base, "sam_arch": "vit_tiny", "sam_checkpoint": "x.pth"}, cache_info())
    assert (out["sam_dim"], out["sam_mlp_dim"], out["sam_heads"]) == (256, 2048, 8)
    with pytest.raises(ValueError, match="sam_checkpoint=PATH"):
        head.configure(base, cache_info())
    with pytest.raises(ValueError, match="unknown sam_arch"):
        head.configure({**base, "sam_arch": "vit_xl", "sam_blocks": "random"}, cache_info())
    cfg = vit_tiny(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="SAM checkpoint not found"):
        head.init_from_cache(build_esc_net(cfg), cfg, cache_info())


def test_configs_are_valid_and_round_trip():
    for cfg in (EscNetConfig(), tiny()):
        assert EscNetConfig.from_dict(cfg.to_dict()) == cfg
    assert EscNetConfig().num_layers == 4 and EscNetConfig().num_prompts == 5
    with pytest.raises(ValueError, match="unknown esc_net config keys: nope"):
        EscNetConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="sam_blocks"):
        tiny(sam_blocks="frozen")


def test_without_sam_blocks_the_guidance_is_the_projected_clip():
    """``sam_blocks: none`` (the paper's "w/o SAM block"): no prompt changes anything and no
    SAM or read-out parameter trains."""
    cfg = tiny(sam_blocks="none")
    torch.manual_seed(0)
    model = build_esc_net(cfg).eval()
    b = batch(cfg, 4)
    with torch.no_grad():
        a = model(**b).logits
        for block in model.blocks:
            block.layers[0].self_attn.q_proj.weight.mul_(3.0)
        assert torch.equal(model(**b).logits, a)
    sam = {id(p) for p in model.sam_parameters()} | {id(p) for p in model.readouts.parameters()}
    assert not any(p.requires_grad for p in model.parameters() if id(p) in sam)
