"""Affinity head, issue 11 items 2 and 4: multi-level MaskRoI pooling (FPN level rule, per-level
lateral projections) and the decoder's query self-attention mask (instances never see the
vocabulary)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import roi_align

from samcp.models.affinity import AffinityConfig, AffinityCriterion, AffinityHead, ImageTargets
from samcp.models.affinity.model import assign_roi_levels, query_attention_mask
from samcp.models.heads import CacheInfo, ImageInputs
from samcp.models.registry import get_head

LEVELS3 = ("clip_res3", "clip_res4", "clip_res5")


def _square(side: float) -> list[float]:
    return [10.0, 20.0, 10.0 + side, 20.0 + side]


# ----------------------------------------------------------------------------------------------
# The level rule
# ----------------------------------------------------------------------------------------------


def test_level_rule_hand_cases_res3_to_res5():
    strides = (8, 16, 32)
    cases = [  # (box side in input pixels, expected level index)
        (224, 1),  # canonical box -> k0 = 4 -> stride 16 (res4)
        (223, 0),  # just below -> k = 3 -> res3
        (112, 0),  # k = 3
        (111, 0),  # k = 2, clamped to the finest listed level (res3)
        (5, 0),
        (447, 1),
        (448, 2),  # k = 5 -> res5
        (1000, 2),  # k = 6, clamped to res5
    ]
    boxes = torch.tensor([_square(s) for s, _ in cases])
    got = assign_roi_levels(boxes, strides).tolist()
    assert got == [lv for _, lv in cases]
    # The size is sqrt(w h): a 100 x 400 box is a 200-pixel box (k = 3); a degenerate box is finest.
    thin = torch.tensor([[0.0, 0.0, 100.0, 400.0], [0.0, 0.0, 0.0, 500.0], [0.0, 0.0, 500, 500]])
    assert assign_roi_levels(thin, strides).tolist() == [0, 0, 2]


def test_level_rule_with_res2_other_orders_and_gaps():
    boxes = torch.tensor([_square(s) for s in (50, 111, 112, 224, 448)])
    # res2..res5 (strides 4..32): the authors' four FPN levels.
    assert assign_roi_levels(boxes, (4, 8, 16, 32)).tolist() == [0, 0, 1, 2, 3]
    # Levels listed deep to shallow: the index follows the list.
    assert assign_roi_levels(boxes, (32, 16, 8)).tolist() == [2, 2, 2, 1, 0]
    # A gap (res3, res5): a res4-sized box falls to the finer level.
    assert assign_roi_levels(boxes, (8, 32)).tolist() == [0, 0, 0, 0, 1]
    # One level: always it.
    assert assign_roi_levels(boxes, (32,)).tolist() == [0] * 5
    # Other constants (config fields) move the boundaries.
    assert assign_roi_levels(boxes, (8, 16, 32), 112.0, 4).tolist() == [0, 0, 1, 2, 2]


def test_level_rule_matches_mmdet_and_detectron2_constants():
    """The authors' mmdet SingleRoIExtractor.map_roi_levels (finest_scale 56, strides 4..32) and
    detectron2's assign_boxes_to_levels (canonical 224 at level 4), away from exact boundaries."""
    gen = torch.Generator().manual_seed(0)
    wh = torch.rand(2000, 2, generator=gen) * 1200 + 1
    boxes = torch.cat([torch.zeros(2000, 2), wh], dim=1)
    scale = wh.prod(1).sqrt()
    away = (torch.log2(scale / 56) - torch.log2(scale / 56).round()).abs() > 1e-3
    mmdet = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3).long()
    d2 = (torch.floor(4 + torch.log2(scale / 224 + 1e-8)).clamp(2, 5) - 2).long()
    ours = assign_roi_levels(boxes, (4, 8, 16, 32))
    assert away.sum() > 1900
    assert torch.equal(ours[away], mmdet[away])
    assert torch.equal(ours[away], d2[away])


# ----------------------------------------------------------------------------------------------
# The head on several levels
# ----------------------------------------------------------------------------------------------


def _level_config(**overrides) -> AffinityConfig:
    params = dict(
        clip_levels=LEVELS3,
        clip_channels=(4, 6, 8),
        clip_strides=(8, 16, 32),
        clip_input_size=1024,
    )
    params.update(overrides)
    return AffinityConfig.tiny(**params)


def _feats(cfg: AffinityConfig, b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    s = cfg.clip_input_size
    return {
        lv: torch.randn(b, c, s // st, s // st, generator=gen)
        for lv, c, st in zip(cfg.clip_levels, cfg.clip_channels, cfg.clip_strides)
    }


def _count_level_calls(model: AffinityHead) -> list[list[int]]:
    calls: list[list[int]] = [[] for _ in model.patch_encoder.input_proj]
    for i, proj in enumerate(model.patch_encoder.input_proj):
        proj.register_forward_hook(lambda mod, inp, out, i=i: calls[i].append(inp[0].shape[0]))
    return calls


def test_each_patch_is_pooled_from_the_level_of_its_size_in_the_clip_frame():
    """Boxes are in original pixels; the level is chosen by their size in the CLIP input frame
    (here x2: a 512-wide image in a 1024 frame)."""
    cfg = _level_config(use_query_enhancement=False)
    torch.manual_seed(0)
    model = AffinityHead(cfg).eval()
    calls = _count_level_calls(model)
    # XYWH original pixels -> input side: 56 -> 112 (res3), 112 -> 224 (res4), 224 -> 448 (res5),
    # 20 x 300 -> sqrt(40 x 600) = 155 (res3).
    boxes = torch.tensor(
        [[[0, 0, 56, 56], [30, 10, 112, 112], [100, 20, 224, 224], [5, 5, 20, 300.0]]]
    )
    feats = _feats(cfg, 1)
    masks = torch.ones(1, 4, cfg.roi_size, cfg.roi_size)
    with torch.no_grad():
        model(
            feats,
            torch.tensor([[256, 512]]),
            boxes,
            masks,
            torch.ones(1, 4, dtype=torch.bool),
            torch.randn(2, cfg.text_dim),
        )
    assert [c[0] if c else 0 for c in calls] == [2, 1, 1]

    # The pooled feature of each patch is exactly MaskRoI on its own level.
    enc = model.patch_encoder
    rois = torch.cat(
        [torch.zeros(4, 1), torch.cat([boxes[0, :, :2], boxes[0, :, :2] + boxes[0, :, 2:]], 1) * 2],
        1,
    )
    masks1 = (torch.rand(4, cfg.roi_size, cfg.roi_size) > 0.4).float()
    with torch.no_grad():
        got = enc.roi_features(enc.project(list(feats.values())), rois, masks1)
        for i, level in enumerate([0, 1, 2, 0]):
            f = roi_align(
                feats[LEVELS3[level]],
                rois[i : i + 1],
                cfg.roi_size,
                spatial_scale=1 / cfg.clip_strides[level],
                sampling_ratio=cfg.roi_sampling_ratio,
                aligned=True,
            )
            f = enc.input_proj[level](f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * masks1[i]
            want = enc.roi_norm(enc.roi_mlp(f.flatten(1)))
            torch.testing.assert_close(got[i : i + 1], want)


def _level_batch(cfg: AffinityConfig, k: int = 3, seed: int = 0) -> dict:
    """Two 480 x 640 images (x 1.6 into the 1024 frame) with patches of every level."""
    gen = torch.Generator().manual_seed(seed)
    sides = torch.tensor([20.0, 60.0, 120.0, 150.0, 200.0, 300.0, 400.0])  # input 32 .. 640
    p = len(sides)
    xy = torch.rand(2, p, 2, generator=gen) * 200
    boxes = torch.cat([xy, sides[None, :, None].expand(2, p, 2)], dim=-1)
    valid = torch.ones(2, p, dtype=torch.bool)
    valid[1, -2:] = False
    return {
        "clip_feats": _feats(cfg, 2, seed),
        "image_sizes": torch.tensor([[480, 640], [480, 640]]),
        "patch_boxes": boxes,
        "patch_masks": (torch.rand(2, p, cfg.roi_size, cfg.roi_size, generator=gen) > 0.3).float(),
        "patch_valid": valid,
        "text_embed": torch.randn(k, cfg.text_dim, generator=gen),
    }


@pytest.mark.parametrize("project_after_roi", [True, False])
def test_lateral_projections_get_gradients_and_frozen_maps_do_not(project_after_roi):
    cfg = _level_config(project_after_roi=project_after_roi)
    torch.manual_seed(0)
    model = AffinityHead(cfg).train()
    batch = _level_batch(cfg)
    calls = _count_level_calls(model)
    out = model.forward_batch(batch)
    (out.affinity_logits.sigmoid().mean() + out.class_logits.sigmoid().mean()).backward()
    assert all(calls), calls  # every level was pooled from
    for level, proj in enumerate(model.patch_encoder.input_proj):
        grads = [p.grad for p in proj.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), level
        assert any(g.abs().sum() > 0 for g in grads), level
    for f in batch["clip_feats"].values():
        assert not f.requires_grad and f.grad is None


@pytest.mark.parametrize("levels", [("clip_res4", "clip_res5"), LEVELS3])
def test_forward_backward_tiny_on_several_levels(levels):
    n = len(levels)
    cfg = AffinityConfig.tiny(
        clip_levels=levels,
        clip_channels=(4, 6, 8)[-n:],
        clip_strides=(8, 16, 32)[-n:],
        clip_input_size=256,
        roi_canonical_size=64.0,  # spread the tiny image's patches over the levels
    )
    torch.manual_seed(0)
    model = AffinityHead(cfg).train()
    calls = _count_level_calls(model)
    gen = torch.Generator().manual_seed(1)
    # 48 x 64 image, x4 into the 256 frame: sides 8 / 16 / 40 -> input 32 / 64 / 160 -> k 3 / 4 / 5
    boxes = torch.tensor([[[2, 2, 8, 8], [10, 5, 16, 16], [20, 4, 40, 40], [1, 30, 9, 9.0]]])
    batch = {
        "clip_feats": _feats(cfg, 1),
        "image_sizes": torch.tensor([[48, 64]]),
        "patch_boxes": boxes,
        "patch_masks": (torch.rand(1, 4, cfg.roi_size, cfg.roi_size, generator=gen) > 0.3).float(),
        "patch_valid": torch.ones(1, 4, dtype=torch.bool),
        "text_embed": torch.randn(3, cfg.text_dim, generator=gen),
    }
    pos = torch.zeros(1, 4, dtype=torch.bool)
    pos[0, :2] = True
    sem_pos = torch.zeros(3, 4, dtype=torch.bool)
    sem_pos[1, 2:] = True
    targets = [
        ImageTargets(
            inst_labels=torch.tensor([0]),
            inst_pos=pos,
            inst_ignore=torch.zeros(1, 4, dtype=torch.bool),
            inst_boxes=torch.tensor([[0.0, 0.0, 0.4, 0.5]]),
            inst_usable=torch.tensor([True]),
            sem_pos=sem_pos,
            sem_ignore=torch.zeros(3, 4, dtype=torch.bool),
            sem_present=torch.tensor([False, True, False]),
        )
    ]
    loss = AffinityCriterion(cfg)(model.forward_batch(batch), targets)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert all(calls), calls
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(p.grad is not None for p in model.patch_encoder.input_proj.parameters())


def test_single_level_behaviour_is_unchanged():
    """With one level, multi_level on or off is the same head; off with several levels sums them."""
    one = AffinityConfig.tiny()
    assert one.clip_levels == ("clip_res5",)
    batch = _level_batch(
        _level_config(clip_levels=("clip_res5",), clip_channels=(8,), clip_strides=(32,))
    )
    cfg_on = _level_config(clip_levels=("clip_res5",), clip_channels=(8,), clip_strides=(32,))
    cfg_off = _level_config(
        clip_levels=("clip_res5",), clip_channels=(8,), clip_strides=(32,), multi_level=False
    )
    torch.manual_seed(0)
    a = AffinityHead(cfg_on).eval()
    b = AffinityHead(cfg_off).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            a.forward_batch(batch).affinity_logits, b.forward_batch(batch).affinity_logits
        )
    summed = AffinityHead(_level_config(multi_level=False)).eval()
    calls = _count_level_calls(summed)
    with torch.no_grad():
        out = summed.forward_batch(_level_batch(_level_config()))
    assert torch.isfinite(out.affinity_logits).all()
    n = int(_level_batch(_level_config())["patch_valid"].sum())
    assert [c[0] for c in calls] == [n, n, n]  # every patch pooled from every level


# ----------------------------------------------------------------------------------------------
# The plugin's configure and the samples
# ----------------------------------------------------------------------------------------------


def _cache(levels=("res2", "res3", "res4", "res5")) -> CacheInfo:
    chans = {"res2": 192, "res3": 384, "res4": 768, "res5": 1536}
    return CacheInfo(
        clip_model="convnext_large_d_320",
        clip_input_size=1024,
        clip_levels=tuple(f"clip_{lv}" for lv in levels),
        clip_strides={f"clip_{lv}": 2 ** (int(lv[-1])) for lv in levels},
        clip_channels={f"clip_{lv}": chans[lv] for lv in levels},
        text_dim=768,
        image_arrays=frozenset(f"clip_{lv}" for lv in levels),
        mask_arrays=frozenset({"clip_mask_embed"}),
    )


def test_configure_takes_res3_to_res5_and_names_the_precompute_flag():
    plugin = get_head("affinity")
    d = AffinityConfig().to_dict()
    got = plugin.configure(d, _cache())
    assert got["clip_levels"] == list(LEVELS3)
    assert got["clip_strides"] == [8, 16, 32]
    assert got["clip_channels"] == [384, 768, 1536]
    assert AffinityConfig.from_dict({**d, **got}).clip_levels == LEVELS3
    with pytest.raises(ValueError, match="samcp precompute --clip-levels res3,res4,res5") as exc:
        plugin.configure(d, _cache(("res5",)))
    assert "clip_res3, clip_res4" in str(exc.value)
    # What the config asks for.
    asked = plugin.configure(
        {**d, "clip_levels": ["clip_res4", "clip_res5"]}, _cache(("res4", "res5"))
    )
    assert asked["clip_levels"] == ["clip_res4", "clip_res5"]
    assert asked["clip_strides"] == [16, 32] and asked["clip_channels"] == [768, 1536]
    # Single level (multi_level=False): the deepest cached level, as before issue 11.
    single = plugin.configure({**d, "multi_level": False}, _cache(("res5",)))
    assert single["clip_levels"] == ["clip_res5"] and single["clip_strides"] == [32]
    # The tiny preset asks for res5 only; a config saved before issue 11 still configures the same.
    assert plugin.configure(AffinityConfig.tiny().to_dict(), _cache(("res5",)))["clip_levels"] == [
        "clip_res5"
    ]
    old = {
        k: v
        for k, v in AffinityConfig.tiny().to_dict().items()
        if k not in ("multi_level", "roi_canonical_size", "roi_canonical_level", "query_attn_mask")
    }
    assert AffinityConfig.from_dict(old) == AffinityConfig.tiny()


def test_samples_of_three_levels_flip_collate_and_run():
    cfg = _level_config(clip_input_size=256, roi_canonical_size=64.0)
    plugin = get_head("affinity")
    h, w = 96, 128
    rles = []
    for x, y, s in [(2, 2, 8), (20, 10, 20), (40, 30, 60), (100, 70, 20)]:
        m = np.zeros((h, w), np.uint8)
        m[y : y + s, x : x + s] = 1
        rles.append(mask_utils.encode(np.asfortranarray(m)))
    rng = np.random.default_rng(0)
    inputs = ImageInputs(
        image_id="a",
        height=h,
        width=w,
        image_arrays={
            lv: rng.standard_normal((c, 256 // st, 256 // st)).astype(np.float16)
            for lv, c, st in zip(cfg.clip_levels, cfg.clip_channels, cfg.clip_strides)
        },
        rles=rles,
        boxes=mask_utils.toBbox(rles).astype(np.float32),
        areas=mask_utils.area(rles).astype(np.int64),
        mask_arrays={"clip_mask_embed": rng.standard_normal((4, cfg.text_dim)).astype(np.float16)},
    )
    assert plugin.needs(cfg)[0] == list(LEVELS3)
    sample = plugin.sample(inputs, cfg, 10)
    flipped = plugin.augment(sample, cfg, flip=True)
    assert set(flipped.clip_feats) == set(LEVELS3)
    batch = plugin.collate([sample, flipped], torch.randn(3, cfg.text_dim), cfg, "cpu")
    torch.manual_seed(0)
    model = AffinityHead(cfg).eval()
    calls = _count_level_calls(model)
    with torch.no_grad():
        out = model.forward_batch(batch)
    assert torch.isfinite(out.affinity_logits).all()
    assert all(calls), calls


# ----------------------------------------------------------------------------------------------
# The query attention mask
# ----------------------------------------------------------------------------------------------


def test_query_attention_mask_pattern():
    t, f = True, False
    expected = torch.tensor(
        [  # keys: sem0 sem1 | p0 p1 p2   (True = blocked)
            [f, t, f, f, f],  # sem0: itself and the patch queries
            [t, f, f, f, f],  # sem1
            [t, t, f, f, f],  # p0: patch queries only
            [t, t, f, f, f],  # p1
            [t, t, f, f, f],  # p2
        ]
    )
    assert torch.equal(query_attention_mask(2, 3), expected)
    assert AffinityConfig().query_attn_mask is True


def _vocab_batches(cfg: AffinityConfig):
    batch = _level_batch(cfg, k=3, seed=2)
    gen = torch.Generator().manual_seed(5)
    text_a = batch["text_embed"]
    # A new vocabulary at transfer time: two unseen classes, the old ones reordered.
    text_b = torch.cat([torch.randn(2, cfg.text_dim, generator=gen), text_a[[2, 0, 1]]])
    return batch, dict(batch, text_embed=text_b), [3, 4, 2]  # a's class c is b's column map[c]


@pytest.mark.parametrize("train", [False, True])
def test_instance_outputs_do_not_depend_on_the_vocabulary(train):
    cfg = _level_config()
    torch.manual_seed(0)
    model = AffinityHead(cfg).train(train)
    batch_a, batch_b, col = _vocab_batches(cfg)
    with torch.no_grad():
        a, b = model.forward_batch(batch_a), model.forward_batch(batch_b)
    ka, kb = a.num_semantic, b.num_semantic
    assert (ka, kb) == (3, 5)
    # Every layer's affinity rows of the patch queries, and their class logits of every class
    # both vocabularies share.
    torch.testing.assert_close(a.affinity_logits[:, :, ka:], b.affinity_logits[:, :, kb:])
    torch.testing.assert_close(a.class_logits[:, :, ka:], b.class_logits[:, :, kb:, col])
    # A semantic query attends to itself and the patch queries only, so a class's own Type-I row
    # does not depend on the other classes either.
    torch.testing.assert_close(a.affinity_logits[:, :, :ka], b.affinity_logits[:, :, col])
    torch.testing.assert_close(a.class_logits[:, :, :ka], b.class_logits[:, :, col][..., col])


def test_without_the_mask_instances_depend_on_the_vocabulary():
    """The control: the property above is the mask's doing."""
    cfg = _level_config(query_attn_mask=False)
    torch.manual_seed(0)
    model = AffinityHead(cfg).eval()
    batch_a, batch_b, _ = _vocab_batches(cfg)
    with torch.no_grad():
        a, b = model.forward_batch(batch_a), model.forward_batch(batch_b)
    diff = (a.affinity_logits[-1, :, 3:] - b.affinity_logits[-1, :, 5:]).abs().max()
    assert diff > 1e-3, float(diff)
    assert math.isfinite(float(diff))
