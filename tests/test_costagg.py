"""The cost-aggregation head (CAT-Seg): shapes, class-order equivariance, any vocabulary size,
flips, the loss's ignored cells, a training step, the CLIP head per pixel, configure's errors.

Everything runs the tiny preset (with decoder guidance from res4/res3-like maps) on random maps.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from samcp.models.costagg import (
    OUTSIDE,
    VOID,
    CostAggConfig,
    CostAggCriterion,
    build_costagg_head,
    collate,
    flip_sample,
    frame_label_grid,
    make_sample,
    semantic_bce,
    semantic_label_map,
)
from samcp.models.costagg.model import SwinBlock
from samcp.models.costagg.plugin import CostAggPlugin, semantic_from_frame_logits
from samcp.models.heads import (
    CacheInfo,
    CompositionParams,
    GroundTruth,
    Head,
    ImageInputs,
    InferContext,
)
from samcp.models.registry import get_head

S = 64  # CLIP frame
LEVELS = {"clip_res5": (12, 8), "clip_res4": (10, 4), "clip_res3": (6, 2)}  # channels, stride ...
# ... as in a 64-pixel frame with strides 8 / 4 / 2: maps 8x8, 16x16, 32x32


def config(**kw) -> CostAggConfig:
    # Random maps, no cache: the CLIP head is learned (the cache's head is tested on its own).
    base = dict(
        guidance_levels=("clip_res4", "clip_res3"),
        guidance_channels=(10, 6),
        clip_head_source="learned",
    )
    base.update(kw)
    return CostAggConfig.tiny(**base)


def rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def inputs(height: int, width: int, seed: int = 0, image_id: str = "img") -> ImageInputs:
    rng = np.random.default_rng(seed)
    arrays = {
        name: rng.standard_normal((c, S // s, S // s)).astype(np.float16)
        for name, (c, s) in LEVELS.items()
    }
    return ImageInputs(image_id, height, width, arrays, [], np.zeros((0, 4), np.float32), [])


def ground_truth(height: int, width: int) -> GroundTruth:
    """Class 0 on the left third, class 2 (crowd) on the bottom-right block, void elsewhere."""
    a = np.zeros((height, width), bool)
    a[:, : width // 3] = True
    b = np.zeros((height, width), bool)
    b[height // 2 :, 2 * width // 3 :] = True
    return GroundTruth(
        [rle(a), rle(b)], np.array([0, 2]), np.array([False, True]), np.array([True, False, True])
    )


def text(k: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(k, dim, generator=g), dim=-1)


def model_and_batch(cfg: CostAggConfig, k: int, b: int = 2):
    torch.manual_seed(0)
    model = build_costagg_head(cfg).eval()
    samples = [make_sample(inputs(48, 64, seed=i), cfg, ground_truth(48, 64)) for i in range(b)]
    return model, samples, collate(samples, text(k), "cpu")


# --- the network ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 50])
def test_logits_have_one_map_per_class_at_the_decoders_stride(k):
    cfg = config()
    model, _, batch = model_and_batch(cfg, k)
    with torch.no_grad():
        out = model(**batch)
    assert out.cost.shape == (2, k, 8, 8)
    assert out.logits.shape == (2, k, 32, 32)  # two x2 stages: the res3 grid
    assert torch.isfinite(out.logits).all()
    assert out.cost.abs().max() <= 1 + 1e-5  # cosine similarities


@pytest.mark.parametrize("k", [5, 12])  # fewer and more classes than pad_len = 8
def test_permuting_the_classes_permutes_the_logits(k):
    cfg = config()
    model, _, batch = model_and_batch(cfg, k)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(**batch).logits
        b = model(**{**batch, "text_embed": batch["text_embed"][perm]}).logits
    torch.testing.assert_close(b, a[:, perm], rtol=1e-4, atol=1e-5)


def test_class_aggregation_mixes_classes():
    """The logits of a class depend on the other classes (class aggregation is not a no-op)."""
    cfg = config()
    model, _, batch = model_and_batch(cfg, 4)
    with torch.no_grad():
        a = model(**batch).logits[:, :1]
        b = model(**{**batch, "text_embed": batch["text_embed"][:1]}).logits
    assert not torch.allclose(a, b, atol=1e-4)


def test_hooks_compose_to_forward_and_run_between_layers():
    cfg = config(num_layers=3)
    model, _, batch = model_and_batch(cfg, 3)
    seen = []

    def hook(i, x):
        seen.append(i)
        return x

    with torch.no_grad():
        enc = model.encode(batch["clip_map"], batch["text_embed"])
        feats = model.aggregate(enc, hook=hook)
        guidance = model.decoder_guidance(batch["guidance"])
        logits = model.decode(feats, guidance)
        ref = model(**batch)
    assert seen == [0, 1, 2]
    assert feats.shape == (2, cfg.hidden_dim, 3, 8, 8)
    assert [g.shape[-1] for g in guidance] == [16, 32]
    torch.testing.assert_close(logits, ref.logits)
    torch.testing.assert_close(enc.cost, ref.cost)


def test_a_head_without_guidance_runs_on_res5_alone():
    cfg = CostAggConfig.tiny()
    model = build_costagg_head(cfg).eval()
    s = make_sample(inputs(40, 64), cfg)
    assert s.guidance == []
    with torch.no_grad():
        out = model(**collate([s], text(3), "cpu"))
    assert out.logits.shape == (1, 3, 32, 32)


def test_padded_windows_do_not_leak_into_the_map():
    """A 6 x 6 map in 4-cell windows is padded to 8 x 8; the padding must not change the output,
    so values far from a cell's window cannot reach it: compare with an explicit reference where
    the map sits inside a larger map whose extra cells are masked by construction."""
    torch.manual_seed(0)
    block = SwinBlock(dim=8, guidance_dim=4, heads=2, window=4, shift=False, mlp_ratio=2).eval()
    x = torch.randn(1, 6, 6, 8)
    g = torch.randn(1, 6, 6, 4)
    with torch.no_grad():
        out = block(x, g)
        # The top-left 4 x 4 window holds only image cells: the same as running it alone.
        alone = block(x[:, :4, :4], g[:, :4, :4])
        # The bottom-right window holds 2 x 2 image cells: the same as a 2 x 2 map alone.
        corner = block(x[:, 4:, 4:], g[:, 4:, 4:])
    torch.testing.assert_close(out[:, :4, :4], alone)
    torch.testing.assert_close(out[:, 4:, 4:], corner)


# --- the CLIP head per pixel ---------------------------------------------------------------------


def _cache_info(weights, channels, dim, levels=("clip_res5",)):
    return CacheInfo(
        clip_model="samcp-test-convnext",
        clip_input_size=64,
        clip_levels=levels,
        clip_strides={"clip_res5": 32},
        clip_channels={lv: channels for lv in levels},
        text_dim=dim,
        clip_head=weights,
    )


def test_the_caches_clip_head_goes_in_frozen_and_reproduces_the_mask_embeddings():
    """The cache's CLIP head, copied into the model by init_from_cache and applied to one cell,
    gives the embedding precompute computes for a mask pooled to that feature."""
    import open_clip

    from samcp.pipeline.clip import (
        ClipConfig,
        ClipFeatureExtractor,
        export_clip_head,
        register_test_models,
    )

    register_test_models()
    torch.manual_seed(3)
    clip = open_clip.create_model("samcp-test-convnext").eval()
    ext = ClipFeatureExtractor(ClipConfig(model="samcp-test-convnext", input_size=64), model=clip)
    weights = export_clip_head(clip, 64)
    channels, dim = weights.in_channels, weights.embed_dim
    plugin = CostAggPlugin()
    info = _cache_info(weights, channels, dim)
    base = CostAggConfig.tiny().to_dict()
    cfg = CostAggConfig.from_dict({**base, **plugin.configure(base, info)})
    assert (cfg.clip_proj, cfg.clip_norm_eps) == ("mlp", 1e-5)  # dictated by the cache's head
    model = build_costagg_head(cfg)
    assert all(p.requires_grad for p in model.clip_head.parameters())  # random until init
    plugin.init_from_cache(model, cfg, info)
    assert not any(p.requires_grad for p in model.clip_head.parameters())  # frozen CLIP
    feats = torch.randn(5, channels)
    ref = ext.embed_pooled(feats)
    with torch.no_grad():
        got = F.normalize(model.embed_image(feats[:, :, None, None])[:, :, 0, 0], dim=-1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # "learned" leaves the random, trainable head alone.
    learned = CostAggConfig.from_dict({**cfg.to_dict(), "clip_head_source": "learned"})
    m2 = build_costagg_head(learned)
    plugin.init_from_cache(m2, learned, info)
    assert all(p.requires_grad for p in m2.clip_head.parameters())


def test_a_cache_without_a_clip_head_or_with_another_shape_is_refused():
    import open_clip

    from samcp.pipeline.clip import export_clip_head, register_test_models

    register_test_models()
    plugin = CostAggPlugin()
    base = CostAggConfig.tiny().to_dict()
    with pytest.raises(ValueError, match="re-run the same samcp precompute"):
        plugin.configure(base, _cache_info(None, 64, 32))
    torch.manual_seed(0)
    weights = export_clip_head(open_clip.create_model("samcp-test-convnext").eval(), 64)
    cfg = CostAggConfig.tiny(clip_channels=weights.in_channels * 2, text_dim=weights.embed_dim)
    with pytest.raises(ValueError, match="does not fit"):
        plugin.init_from_cache(build_costagg_head(cfg), cfg, _cache_info(weights, 128, 32))


# --- targets, flips, loss ------------------------------------------------------------------------


def test_semantic_targets_label_crowd_and_leave_the_rest_void():
    gt = ground_truth(6, 9)
    m = semantic_label_map(gt, 6, 9)
    assert (m[:, :3] == 0).all()
    assert (m[3:, 6:] == 2).all()  # the crowd segment is labelled
    assert (m[:3, 3:] == VOID).all()


def test_frame_label_grid_marks_the_padding_outside():
    m = np.arange(12, dtype=np.int16).reshape(3, 4)  # 3 x 4 image in a 4 x 4 frame grid
    grid = frame_label_grid(m, 4)
    np.testing.assert_array_equal(grid[:3], m)
    assert (grid[3] == OUTSIDE).all()
    half = frame_label_grid(m, 2)  # centres at 1 and 3 original pixels
    np.testing.assert_array_equal(half, [[m[1, 1], m[1, 3]], [OUTSIDE, OUTSIDE]])


@pytest.mark.parametrize("size", [(64, 64), (48, 64), (64, 40)])
def test_flip_mirrors_maps_and_targets_together(size):
    h, w = size
    cfg = config()
    gt = ground_truth(h, w)
    s = make_sample(inputs(h, w), cfg, gt)
    f = flip_sample(s)
    # Targets: those of the mirrored ground truth.
    mirrored = GroundTruth(
        [rle(mask_utils.decode(r)[:, ::-1]) for r in gt.rles], gt.labels, gt.iscrowd, gt.isthing
    )
    ref = make_sample(inputs(h, w), cfg, mirrored)
    assert torch.equal(f.labels, ref.labels)
    # Maps: mirrored about the same line as the labels (exactly, where the content edge falls
    # on a cell boundary of every level: all three sizes here).
    for a, b, scale in zip([s.clip_map, *s.guidance], [f.clip_map, *f.guidance], [8, 16, 32]):
        n = round(w / max(h, w) * scale)
        torch.testing.assert_close(b[..., :n], a[..., :n].flip(-1))
        torch.testing.assert_close(b[..., n:], a[..., n:])  # padding columns stay
    # A feature aligned with a label stays aligned: the label grid and the res3-level map
    # (both 16/32 cells) are mirrored about the same content column.
    back = flip_sample(f)
    assert torch.equal(back.labels, s.labels) and torch.equal(back.clip_map, s.clip_map)
    assert f.flipped is not s.flipped


def test_flip_keeps_a_label_painted_feature_on_its_label():
    """Paint the res5-level map with the label grid (one channel = class 0 indicator): after the
    flip the painted feature is still where class 0 is."""
    h, w = 64, 64
    cfg = config(label_stride=8)  # label grid = 8 x 8 = the res5 grid
    gt = ground_truth(h, w)
    s = make_sample(inputs(h, w), cfg, gt)
    s.clip_map[0] = (s.labels == 0).to(torch.float16)
    f = flip_sample(s)
    assert torch.equal(f.clip_map[0] > 0.5, f.labels == 0)


def test_loss_ignores_void_and_outside_cells_as_configured():
    torch.manual_seed(0)
    labels = torch.tensor([[[0, 1], [VOID, OUTSIDE]]])
    logits = torch.randn(1, 3, 2, 2)
    bumped = logits.clone()
    bumped[..., 1, :] += 5.0  # change only the VOID and OUTSIDE cells
    ign = semantic_bce(logits, labels, "ignore")
    assert torch.isclose(ign, semantic_bce(bumped, labels, "ignore"))
    # By hand: two counted cells x 3 classes.
    target = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    counted = torch.stack([logits[0, :, 0, 0], logits[0, :, 0, 1]])
    ref = F.binary_cross_entropy_with_logits(counted, target)
    torch.testing.assert_close(ign, ref)
    # CAT-Seg's rule: VOID cells are negatives for every class; OUTSIDE never counts.
    neg = semantic_bce(logits, labels, "negative")
    counted = torch.cat([counted, logits[0, :, 1, 0][None]])
    target = torch.cat([target, torch.zeros(1, 3)])
    torch.testing.assert_close(neg, F.binary_cross_entropy_with_logits(counted, target))
    outside_only = bumped.clone()
    outside_only[..., 1, 0] = logits[..., 1, 0]
    assert torch.isclose(neg, semantic_bce(outside_only, labels, "negative"))
    # Nothing counted: zero with a graph.
    none = semantic_bce(logits.requires_grad_(), torch.full((1, 2, 2), OUTSIDE), "negative")
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_a_training_step_reduces_the_loss_on_a_fixed_batch():
    cfg = config()
    torch.manual_seed(0)
    model = build_costagg_head(cfg).train()
    samples = [make_sample(inputs(48, 64, seed=i), cfg, ground_truth(48, 64)) for i in range(2)]
    batch = collate(samples, text(3), "cpu")
    crit = CostAggCriterion(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = crit(model(**batch), samples)["loss"]
    opt.zero_grad()
    before.backward()
    opt.step()
    after = crit(model(**batch), samples)["loss"]
    assert float(after.detach()) < float(before.detach())
    assert batch["clip_map"].grad is None  # cached maps never receive gradients


# --- the plugin ----------------------------------------------------------------------------------


def cache_info(levels=("clip_res3", "clip_res4", "clip_res5")) -> CacheInfo:
    return CacheInfo(
        clip_model="samcp-test-convnext",
        clip_input_size=S,
        clip_levels=tuple(levels),
        clip_strides={lv: LEVELS[lv][1] for lv in levels},
        clip_channels={lv: LEVELS[lv][0] for lv in levels},
        text_dim=8,
        image_arrays=frozenset(levels),
    )


def test_configure_takes_the_caches_channels_and_names_the_missing_levels():
    head = get_head("costagg")
    assert isinstance(head, CostAggPlugin) and head.outputs == ("semantic",)
    assert Head.outputs == ("panoptic", "semantic", "instances")
    d = config().to_dict()
    got = head.configure(d, cache_info())
    assert got["clip_channels"] == 12 and got["guidance_channels"] == [10, 6]
    with pytest.raises(ValueError, match="--clip-levels res3,res4,res5"):
        head.configure(d, cache_info(("clip_res5",)))
    with pytest.raises(ValueError, match="--clip-levels"):
        head.configure({**d, "clip_level": "clip_res2"}, cache_info())
    with pytest.raises(ValueError, match="coarse to fine"):
        head.configure({**d, "guidance_levels": ["clip_res3", "clip_res4"]}, cache_info())
    assert head.needs(config()) == (["clip_res5", "clip_res4", "clip_res3"], [])
    # A YAML list round-trips to the same frozen config.
    cfg = CostAggConfig.from_dict({**d, "guidance_levels": list(d["guidance_levels"])})
    assert cfg == config()
    with pytest.raises(ValueError, match="unknown costagg config keys: nope"):
        CostAggConfig.from_dict({"nope": 1})


def test_predicts_a_semantic_map_for_any_vocabulary():
    head = get_head("costagg")
    cfg = config()
    torch.manual_seed(0)
    model = build_costagg_head(cfg).eval()
    samples = [head.sample(inputs(30, 50, seed=i, image_id=f"i{i}"), cfg, 0) for i in range(2)]
    for k in (1, 7):
        t = text(k)
        ctx = InferContext(t, np.ones(k, bool), np.zeros(k, bool), CompositionParams(), "cpu")
        with torch.no_grad():
            results = head.infer(model(**head.collate(samples, t, cfg, "cpu")), samples, cfg, ctx)
        assert [r.image_id for r in results] == ["i0", "i1"]
        for r in results:
            assert r.semantic.shape == (30, 50) and r.semantic.dtype == np.int32
            assert r.semantic.min() >= 0 and r.semantic.max() < k
            assert not r.panoptic.any() and r.segments == [] and r.instance_rles == []


def test_semantic_map_samples_the_frame_at_pixel_centres():
    # A 2 x 4 image in a 4 x 4 frame grid: class 1 wins on the left two columns, class 0 right.
    logits = torch.zeros(2, 4, 4)
    logits[1, :, :2] = 1.0
    logits[0, :, 2:] = 1.0
    got = semantic_from_frame_logits(logits, 2, 4)
    np.testing.assert_array_equal(got, [[1, 1, 0, 0], [1, 1, 0, 0]])
    big = semantic_from_frame_logits(logits, 20, 40, chunk=1)  # upsampled, chunked
    assert (big[:, :18] == 1).all() and (big[:, 22:] == 0).all()
    assert semantic_from_frame_logits(torch.zeros(0, 4, 4), 2, 3).tolist() == [[-1] * 3] * 2


def test_tiny_and_default_configs_are_valid_and_serialisable():
    for cfg in (CostAggConfig(), CostAggConfig.tiny(), config()):
        assert CostAggConfig.from_dict(cfg.to_dict()) == cfg
    d = dataclasses.asdict(CostAggConfig())
    assert d["num_layers"] == 2 and d["window_size"] == 12 and d["hidden_dim"] == 128
    with pytest.raises(ValueError, match="one width per guidance level"):
        CostAggConfig.tiny(guidance_levels=("clip_res4",))
