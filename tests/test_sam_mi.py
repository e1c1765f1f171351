"""SAM-MI (paper 003): TSPP targets and draws, online SAM, SMAgg, DMI, the two stages, the grid
prompter and initialising stage 2 from stage 1. Tiny shapes, CPU, random weights."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from skimage.morphology import disk

from samcp.models.costagg import CostAggregationNet
from samcp.models.heads import CacheInfo, GroundTruth, ImageInputs
from samcp.models.registry import get_head, save_head
from samcp.models.sam_mi import (
    HighFrequencyInjection,
    LowFrequencyInjection,
    SamMiConfig,
    SamMiNet,
    intra_mask_context,
    matching_scores,
    shallow_mask_aggregation,
    tspp_targets,
)
from samcp.models.sam_mi.plugin import load_init_weights
from samcp.models.sam_mi.targets import grid_labels, points_per_mask
from samcp.models.sam_mi.tspp import draw_points, point_grid_frame

S = 64  # CLIP frame; res5 8 x 8 at stride 8
CLIP_C, TEXT_D = 12, 8
SAM_SHAPE = (32, 16, 16)  # samcp's vit_test SAM: 256-pixel frame


def cache_info(sam: bool = True) -> CacheInfo:
    return CacheInfo(
        clip_model="test",
        clip_input_size=S,
        clip_levels=("clip_res5",),
        clip_strides={"clip_res5": 8},
        clip_channels={"clip_res5": CLIP_C},
        text_dim=TEXT_D,
        image_arrays=frozenset({"clip_res5", "sam_embed"} if sam else {"clip_res5"}),
        sam_embed_shape=SAM_SHAPE if sam else None,
    )


def config(**kw) -> SamMiConfig:
    base = dict(clip_head_source="learned", cost_grid=8)
    base.update(kw)
    return SamMiConfig.tiny(**base)


def rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def image(seed: int = 0, height: int = 40, width: int = 56, with_gt: bool = True):
    """A random cached image: two classes (left / right halves), two proposals."""
    rng = np.random.default_rng(seed)
    left = np.zeros((height, width), bool)
    left[:, : width // 2] = True
    inputs = ImageInputs(
        image_id=f"img{seed}",
        height=height,
        width=width,
        image_arrays={
            "clip_res5": rng.standard_normal((CLIP_C, 8, 8)).astype(np.float16),
            "sam_embed": rng.standard_normal(SAM_SHAPE).astype(np.float16),
        },
        rles=[rle(left), rle(~left)],
        boxes=np.zeros((2, 4), np.float32),
        areas=np.array([left.sum(), (~left).sum()]),
    )
    gt = GroundTruth([rle(left), rle(~left)], np.array([0, 2]), np.zeros(2, bool), np.ones(3, bool))
    return inputs, (gt if with_gt else None)


def make(plugin, cfg, seed: int, with_gt: bool = True):
    inputs, gt = image(seed, with_gt=with_gt)
    return plugin.sample(inputs, cfg, 10, gt)


# ------------------------------------------------------------------------------------------------
# TSPP targets (eqs. 3-5)


def test_targets_sum_to_p_k_on_each_class_and_vanish_elsewhere():
    labels = np.full((12, 12), -1, np.int16)
    labels[1:4, 1:4] = 0  # 9 points: P = ceil(9 / 5) = 2
    labels[5:12, 0:12] = 3  # 84 points: P = min(17, 10) = 10 (the cap)
    labels[0, 8] = 3  # a second, detached piece of class 3: one semantic mask, one skeleton
    p = tspp_targets(labels, g_p=5, m_p=10)
    assert p[labels == 0].sum() == pytest.approx(2.0, abs=1e-5)
    assert p[labels == 3].sum() == pytest.approx(10.0, abs=1e-5)
    assert np.all(p[labels < 0] == 0)
    assert np.all(p[labels >= 0] > 0)


def test_disk_target_puts_more_than_one_on_its_centre():
    m = disk(2).astype(bool)  # 13 cells whose skeleton is the centre
    labels = np.where(m, 1, -1)
    p = tspp_targets(labels, g_p=5, m_p=10)
    assert points_per_mask(13, 5, 10) == 3
    # d = 0 (1), 1 (x4), sqrt 2 (x4), 2 (x4); sigma = 2 / 3
    w = [1.0] + [math.exp(-(d**2) / (2 * (2 / 3) ** 2)) for d in (1, 1, 1, 1)]
    w += [math.exp(-2 / (2 * (2 / 3) ** 2))] * 4 + [math.exp(-4 / (2 * (2 / 3) ** 2))] * 4
    assert p[2, 2] == pytest.approx(3 / sum(w), rel=1e-5)
    assert p[2, 2] > 1.08  # p can exceed 1; the draw clamps it


@pytest.mark.parametrize("cells", [[(3, c) for c in range(7)], [(4, 4)]])
def test_a_mask_that_is_its_own_skeleton_gets_uniform_targets(cells):
    labels = np.full((9, 9), -1, np.int16)
    for r, c in cells:
        labels[r, c] = 0  # a one-cell-wide line / a single point: sigma = 0
    p = tspp_targets(labels, g_p=5, m_p=10)
    assert np.all(np.isfinite(p))
    expect = points_per_mask(len(cells), 5, 10) / len(cells)
    assert np.allclose(p[labels == 0], expect)


def test_mask_sizes_are_counted_on_the_grid_not_in_pixels():
    label_map = np.full((320, 320), -1, np.int16)
    label_map[:40, :40] = 2  # 1600 pixels would hit m_p; on an 8 x 8 grid it is one point
    labels = grid_labels(label_map, 8)
    assert (labels == 2).sum() == 1
    assert tspp_targets(labels, 5, 10).sum() == pytest.approx(1.0)


def test_the_draw_is_seeded_and_its_count_matches_the_clamped_sum():
    rng = np.random.default_rng(0)
    prob = torch.from_numpy(rng.uniform(-0.2, 1.4, (8, 8)).astype(np.float32))
    assert torch.equal(draw_points(prob, 7, 64), draw_points(prob, 7, 64))
    counts = [draw_points(prob, s, 64).numel() for s in range(400)]
    expect = float(prob.clamp(0, 1).sum())
    assert np.mean(counts) == pytest.approx(expect, rel=0.03)
    capped = draw_points(prob, 7, 3)
    assert capped.numel() == 3 and bool(prob.flatten()[capped].min() >= 0)


def test_grid_points_cover_the_image_part_of_the_frame():
    where = point_grid_frame(torch.tensor([[50, 100]]), 4)  # landscape: rows fill half the frame
    xs = (where[0, 0, :, 0] + 1) / 2
    ys = (where[0, :, 0, 1] + 1) / 2
    assert torch.allclose(xs, torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.allclose(ys, torch.tensor([0.0625, 0.1875, 0.3125, 0.4375]))


# ------------------------------------------------------------------------------------------------
# SMAgg (eqs. 6-7)


def test_smagg_joins_a_60_40_mask_to_its_class_and_keeps_a_30_30_40_mask_alone():
    text = torch.zeros(1, 10, dtype=torch.long)  # M^text of a 1 x 10 grid over classes 0, 1, 2
    text[0, 3:6] = 1
    text[0, 6:] = 2
    a = torch.zeros(1, 10)
    a[0, 3:5] = 1  # inside class 1
    b = torch.zeros(1, 10)
    b[0, 3:6] = 1
    b[0, 6:8] = 1  # 3 / 5 on class 1, 2 / 5 on class 2
    c = torch.zeros(1, 10)
    c[0, 0:3] = 1
    c[0, 3:6] = 1
    c[0, 6:10] = 1  # 3 / 3 / 4 tenths: no class above 0.5
    masks = torch.stack([a, b, c])
    scores = matching_scores(masks, text, 3)
    assert torch.all(scores.sum(1) <= 1 + 1e-6)
    assert torch.allclose(scores[1], torch.tensor([0.0, 0.6, 0.4]), atol=1e-5)
    merged, origin = shallow_mask_aggregation(masks, scores, 0.5)
    assert origin.tolist() == [1, -1]
    assert torch.equal(merged[0], torch.maximum(a, b))  # class 1 = A u B
    assert torch.equal(merged[1], c)


# ------------------------------------------------------------------------------------------------
# DMI (eqs. 8-12)


def test_intra_mask_context_by_hand_on_a_2x2_map():
    f = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])[None]  # (1, D=1, 2, 2)
    m1 = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # top row: mean 1.5
    m2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # right column: mean 3
    masks = torch.stack([m1, m2])[None]
    intra, tokens, counts = intra_mask_context(f, masks, torch.ones(1, 2, dtype=torch.bool))
    assert tokens[0, :, 0].tolist() == [1.5, 3.0]
    # eq. 9 adds every covering mask's mean (the top-right cell gets both)
    assert intra[0, 0].tolist() == [[2.5, 6.5], [3.0, 7.0]]
    assert counts.all()


def _masks(n: int, side: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, n, side, side, generator=g) > 0.6).float()


def test_injections_do_not_depend_on_the_order_of_masks():
    torch.manual_seed(0)
    low = LowFrequencyInjection(8, 2).eval()
    high = HighFrequencyInjection(4, 3, 1.0).eval()
    f, g = torch.randn(1, 8, 6, 6), torch.randn(1, 4, 12, 12)
    masks6, masks12 = _masks(5, 6, 1), _masks(5, 12, 2)
    valid = torch.tensor([[True, True, True, True, False]])  # the last slot is padding
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        a = low(f, masks6, valid)
        b = low(f, masks6[:, perm], valid[:, perm])
        c = high(g, masks12, valid)
        d = high(g, masks12[:, perm], valid[:, perm])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c, d)
    assert not torch.allclose(a, f) and not torch.allclose(c, g)


def test_no_masks_means_no_injection():
    torch.manual_seed(0)
    low, high = LowFrequencyInjection(8, 2), HighFrequencyInjection(4, 3, 1.0)
    f, g = torch.randn(2, 8, 6, 6, requires_grad=True), torch.randn(2, 4, 12, 12)
    for n in (0, 3):  # no masks at all / only padding slots
        masks, valid = _masks(n, 6, 0).expand(2, -1, -1, -1), torch.zeros(2, n, dtype=torch.bool)
        assert torch.equal(low(f, masks, valid), f)
        assert torch.equal(high(g, _masks(n, 12, 0).expand(2, -1, -1, -1), valid), g)
    # one image with masks, one without: the second is untouched, gradients stay finite
    masks, valid = _masks(3, 6, 0).expand(2, -1, -1, -1), torch.tensor([[1, 1, 0], [0, 0, 0]]) > 0
    out = low(f, masks, valid)
    assert torch.equal(out[1], f[1]) and not torch.equal(out[0], f[0])
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in low.parameters())


def test_with_no_masks_sam_mi_is_its_cost_aggregation_network():
    cfg = config(prompter="grid")
    torch.manual_seed(0)
    net = SamMiNet(cfg).eval()
    base = CostAggregationNet(cfg).eval()
    base.load_state_dict(net.costagg.state_dict())
    clip, text = torch.randn(2, CLIP_C, 8, 8), torch.randn(3, TEXT_D)
    r = cfg.mask_res
    with torch.no_grad():
        out = net(
            clip,
            [],
            text,
            torch.tensor([[40, 56], [56, 40]]),
            torch.zeros(2, dtype=torch.long),
            masks=torch.zeros(2, 0, r, r),
            mask_valid=torch.zeros(2, 0, dtype=torch.bool),
        )
        ref = base(clip, [], text)
    torch.testing.assert_close(out.logits, ref.logits)
    assert out.num_masks.tolist() == [0, 0]


def test_high_injection_starts_with_gamma_one():
    net = SamMiNet(config(guidance_levels=("clip_res4",), guidance_channels=(6,)))
    assert [h.gamma.item() for h in net.high] == [1.0]


# ------------------------------------------------------------------------------------------------
# SAM online, the plugin, the stages


def test_each_point_gets_sams_best_multimask_output(tmp_path):
    from samcp.models.sam_decoder import decode_points_reference
    from samcp.pipeline.foundation import load_sam, make_random_sam_checkpoint

    path = make_random_sam_checkpoint(tmp_path / "sam.pth", "vit_test", seed=3)
    cfg = config(sam_checkpoint=str(path), max_points=64)
    plugin = get_head("sam_mi")
    net = plugin.build(cfg)
    plugin.init_from_cache(net, cfg, cache_info())
    ref = load_sam("vit_test", path)
    for name, t in ref.mask_decoder.state_dict().items():
        assert torch.equal(net.sam.mask_decoder.state_dict()[name], t)
    embed = torch.randn(1, *SAM_SHAPE)
    prob = torch.zeros(1, 8, 8)
    prob[0, 2, 5] = prob[0, 6, 1] = 1.0  # exactly these two grid points
    sizes = torch.tensor([[128, 256]])  # landscape: the image is the top half of SAM's frame
    masks, valid, count = net.sam_masks(prob, embed, sizes, torch.zeros(1, dtype=torch.long))
    assert count.tolist() == [2]
    # points (x, y) = ((j + .5) W / 8, (i + .5) H / 8) scaled to the 256 frame (x 1)
    coords = torch.tensor([[5.5 * 32, 2.5 * 16], [1.5 * 32, 6.5 * 16]])
    with torch.no_grad():
        logits, iou = decode_points_reference(ref, embed, coords)
    best = logits[torch.arange(2), iou.argmax(1)] > 0
    best[:, 32:, :] = False  # rows past the image (the frame's padding) are cleared
    expect = torch.nn.functional.adaptive_avg_pool2d(best[:, None].float(), cfg.mask_res)[:, 0]
    keep = expect.flatten(1).sum(1) > 0
    torch.testing.assert_close(masks[0][valid[0]], expect[keep])


def test_stage_1_trains_tspp_alone():
    plugin = get_head("sam_mi")
    cfg = config(stage=1)
    d = {**cfg.to_dict(), **plugin.configure(cfg.to_dict(), cache_info())}
    cfg = SamMiConfig.from_dict(d)
    net = plugin.build(cfg)
    assert net.sam is None  # stage 1 prompts nothing
    samples = [make(plugin, cfg, i) for i in range(2)]
    batch = plugin.collate(samples, torch.randn(3, TEXT_D), cfg, "cpu")
    loss = plugin.criterion(cfg)(net(**batch), samples)
    assert "loss_ce" not in loss
    loss["loss"].backward()
    for name, p in net.named_parameters():
        got = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert got == name.startswith("tspp."), name
        assert p.requires_grad == name.startswith("tspp."), name


def test_stage_2_gradients_reach_costagg_tspp_and_dmi_but_not_sam():
    plugin = get_head("sam_mi")
    cfg = config()
    net = plugin.build(cfg)
    plugin.init_from_cache(net, cfg, cache_info())
    with torch.no_grad():
        net.tspp.prob_head.bias.fill_(1.0)  # every grid point likely: SAM runs
    samples = [make(plugin, cfg, i) for i in range(2)]
    batch = plugin.collate(samples, torch.randn(3, TEXT_D), cfg, "cpu")
    out = net(**batch)
    assert int(out.num_points.sum()) > 0 and int(out.num_masks.sum()) > 0
    plugin.criterion(cfg)(out, samples)["loss"].backward()
    grads = {n for n, p in net.named_parameters() if p.grad is not None}
    assert any(n.startswith("tspp.") for n in grads)
    assert any(n.startswith("low.") for n in grads) and any(n.startswith("costagg.") for n in grads)
    assert not any(n.startswith("sam.") for n in grads)
    assert not any(p.requires_grad for p in net.sam.parameters())


def test_grid_prompter_needs_no_sam():
    plugin = get_head("sam_mi")
    with pytest.raises(ValueError, match="--store-sam-embeddings"):
        plugin.configure(config().to_dict(), cache_info(sam=False))
    d = config(prompter="grid").to_dict()
    d.update(plugin.configure(d, cache_info(sam=False)))
    cfg = SamMiConfig.from_dict(d)
    assert "sam_embed" not in plugin.needs(cfg)[0]
    net = plugin.build(cfg)
    assert net.sam is None
    plugin.init_from_cache(net, cfg, cache_info(sam=False))  # no checkpoint asked for
    inputs, gt = image(0)
    inputs.image_arrays.pop("sam_embed")
    sample = plugin.sample(inputs, cfg, 10, gt)
    assert sample.sam_embed is None and sample.masks.shape == (2, cfg.mask_res, cfg.mask_res)
    out = net(**plugin.collate([sample], torch.randn(3, TEXT_D), cfg, "cpu"))
    assert out.num_points.tolist() == [0] and out.num_masks.tolist() == [2]


def test_sam_mi_logits_follow_the_order_of_classes():
    cfg = config(prompter="grid")
    plugin = get_head("sam_mi")
    torch.manual_seed(0)
    net = plugin.build(cfg).eval()
    samples = [make(plugin, cfg, i, with_gt=False) for i in range(2)]
    text = torch.randn(5, TEXT_D)
    perm = torch.tensor([3, 1, 4, 0, 2])
    with torch.no_grad():
        a = net(**plugin.collate(samples, text, cfg, "cpu")).logits
        b = net(**plugin.collate(samples, text[perm], cfg, "cpu")).logits
    torch.testing.assert_close(a[:, perm], b, atol=1e-4, rtol=1e-4)


def test_a_stage_1_run_initialises_stage_2(tmp_path):
    plugin = get_head("sam_mi")
    torch.manual_seed(1)
    stage1 = config(stage=1)
    net1 = plugin.build(stage1)
    with torch.no_grad():
        for p in net1.tspp.parameters():
            p.add_(1.0)  # "trained"
    save_head(net1, stage1, tmp_path / "run1" / "model")
    stage2 = dataclasses.replace(config(), init_from=str(tmp_path / "run1"))
    torch.manual_seed(2)
    net2 = plugin.build(stage2)
    sam_before = {k: v.clone() for k, v in net2.sam.state_dict().items()}
    plugin.init_from_cache(net2, stage2, cache_info())
    for (n, a), b in zip(net1.tspp.state_dict().items(), net2.tspp.state_dict().values()):
        assert torch.equal(a, b), n
    for k, v in net2.sam.state_dict().items():
        assert torch.equal(v, sam_before[k])  # SAM comes from sam_checkpoint, not the run
    for off in ("low_injection", "high_injection"):  # an ablation starts from the same run
        load_init_weights(
            plugin.build(dataclasses.replace(stage2, **{off: False})), tmp_path / "run1"
        )
    other = dataclasses.replace(stage2, tspp_dim=16, tspp_guidance_dim=16)
    with pytest.raises(ValueError, match="does not fit"):
        load_init_weights(plugin.build(other), tmp_path / "run1")
    with pytest.raises(ValueError, match="no saved sam_mi head"):
        load_init_weights(net2, tmp_path)


def test_stage_2_with_tspp_asks_for_the_sam_checkpoint():
    plugin = get_head("sam_mi")
    cfg = config(sam_checkpoint="")
    with pytest.raises(ValueError, match="sam_checkpoint=PATH"):
        plugin.init_from_cache(plugin.build(cfg), cfg, cache_info())
    cfg = config(sam_checkpoint="/no/such/sam.pth")
    with pytest.raises(ValueError, match="not found"):
        plugin.init_from_cache(plugin.build(cfg), cfg, cache_info())
    with pytest.raises(ValueError, match="sam_arch=vit_test"):
        plugin.configure(config(sam_arch="vit_b").to_dict(), cache_info())


def test_flipped_samples_carry_the_mirrored_targets():
    plugin = get_head("sam_mi")
    cfg = config(prompter="grid")
    inputs, gt = image(0)
    s = plugin.sample(inputs, cfg, 10, gt)
    f = plugin.augment(s, cfg, flip=True)
    assert torch.equal(f.grid_labels, torch.flip(s.grid_labels, dims=[1]))
    # rebuilt from the mirrored labels (a skeleton is not exactly mirror-symmetric on a grid)
    expect = tspp_targets(f.grid_labels.numpy(), cfg.g_p, cfg.m_p)
    torch.testing.assert_close(f.target, torch.from_numpy(expect))
    # the proposals (left / right halves) swap places
    torch.testing.assert_close(f.masks[0].float(), s.masks[1].float(), atol=1, rtol=0)
    g = plugin.augment(s, cfg, flip=False, rng=np.random.default_rng(0))
    assert g.seed != s.seed  # training draws afresh each step


def test_stage_2_trains_tspp_at_a_reduced_learning_rate():
    plugin = get_head("sam_mi")
    for stage in (1, 2):
        net = plugin.build(config(stage=stage))
        groups = plugin.param_groups(net, config(stage=stage), 2e-4)
        ids = [id(p) for g in groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in net.parameters())  # each once
        lrs = [g.get("lr", 2e-4) for g in groups]
        assert lrs == ([2e-4] if stage == 1 else [2e-4, pytest.approx(2e-5)])
