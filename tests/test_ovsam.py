"""Open-Vocabulary SAM heads: SAM2CLIP's neck, CLIP2SAM's decoder, prompts and recognition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from samcp.models.heads import CacheInfo
from samcp.models.ovsam import (
    Clip2SamConfig,
    Clip2SamHead,
    Prompts,
    Sam2ClipConfig,
    Sam2ClipNeck,
    centre_point,
    ground_truth_prompts,
    sample_training_prompts,
)
from samcp.models.ovsam.clip2sam import mask_boxes, roi_levels
from samcp.models.ovsam.plugin import collate_clip2sam, make_clip2sam_sample
from samcp.models.registry import get_head


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def test_neck_maps_every_clip_level_to_sams_256x64x64_grid():
    """res2..res5 at a 1024 input (strides 4..32: conv k=4, 2, 1, transposed conv 2) and a level
    whose grid divides nothing (bilinear) all land on 64 x 64; the output is SAM's shape."""
    cfg = Sam2ClipConfig(
        clip_levels=("clip_res2", "clip_res3", "clip_res4", "clip_res5"),
        clip_channels=(3, 4, 5, 6),
        clip_strides=(4, 8, 16, 32),
        clip_input_size=1024,
        embed_dim=16,
        depth=1,
        num_heads=2,
        global_attn_indexes=(0,),
    )
    neck = Sam2ClipNeck(cfg).eval()
    levels = [torch.randn(1, c, 1024 // s, 1024 // s) for c, s in zip((3, 4, 5, 6), (4, 8, 16, 32))]
    for embed, x in zip(neck.patch_embeds, levels):
        assert embed(x).shape == (1, 16, 64, 64)
    assert [type(e).__name__ for e in neck.patch_embeds] == [
        "Conv2d",
        "Conv2d",
        "Conv2d",
        "ConvTranspose2d",
    ]
    with torch.no_grad():
        assert neck(levels).embed.shape == (1, 256, 64, 64)
    odd = Sam2ClipConfig(
        clip_levels=("clip_res5",), clip_channels=(6,), clip_strides=(32,), clip_input_size=640,
        embed_dim=16, depth=1, num_heads=2, global_attn_indexes=(0,),
    )  # fmt: skip
    with torch.no_grad():
        assert Sam2ClipNeck(odd)([torch.randn(1, 6, 20, 20)]).embed.shape == (1, 256, 64, 64)


def _sam_checkpoint(tmp_path):
    from samcp.pipeline.foundation import load_sam, make_random_sam_checkpoint

    path = make_random_sam_checkpoint(tmp_path / "sam_vit_test.pth", "vit_test", seed=1)
    return path, load_sam("vit_test", path)


def _prompts_batch(cfg, n_box=3, n_point=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.sam_image_size
    xy0 = torch.rand(n_box, 2, generator=g) * s / 2
    boxes = torch.cat([xy0, xy0 + 20 + torch.rand(n_box, 2, generator=g) * s / 2], 1)
    points = torch.rand(n_point, 2, generator=g) * s
    p = n_box + n_point
    return {
        "boxes": torch.cat([boxes, torch.zeros(n_point, 4)])[None],
        "points": torch.cat([torch.zeros(n_box, 2), points])[None],
        "is_box": (torch.arange(p) < n_box)[None],
        "roi_boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0]]).expand(p, 4)[None],
        "roi_from_mask": torch.zeros(1, p, dtype=torch.bool),
        "valid": torch.ones(1, p, dtype=torch.bool),
    }


@pytest.mark.parametrize("label_token", [False, True])
def test_decoder_at_init_equals_segment_anything_without_the_recognition_branch(
    tmp_path, label_token
):
    """Loaded from a segment_anything checkpoint, with no label token, the decoder's masks are
    SAM's own single-mask output for the same prompts; a label token in the queries changes them."""
    path, sam = _sam_checkpoint(tmp_path)
    cfg = Clip2SamConfig.tiny(sam_checkpoint=str(path), label_token=label_token)
    model = Clip2SamHead(cfg).eval()
    for name, value in sam.mask_decoder.state_dict().items():
        torch.testing.assert_close(model.mask_decoder.state_dict()[name], value, rtol=0, atol=0)
    torch.manual_seed(0)
    embed = torch.randn(1, 32, 16, 16)
    batch = _prompts_batch(cfg)
    text = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    levels = [torch.randn(1, 24, 8, 8)]
    with torch.no_grad():
        ours = model(embed, levels, text_embed=text, **batch).mask_logits[0]
        ref = []
        for i in range(6):
            if batch["is_box"][0, i]:
                sparse, dense = sam.prompt_encoder(
                    points=None, boxes=batch["boxes"][0, i : i + 1], masks=None
                )
            else:
                pt = batch["points"][0, i : i + 1, None]
                sparse, dense = sam.prompt_encoder(
                    points=(pt, torch.ones(1, 1, dtype=torch.int)), boxes=None, masks=None
                )
            masks, _ = sam.mask_decoder(
                image_embeddings=embed,
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            ref.append(masks[0, 0])
        ref = torch.stack(ref)
    assert ref.std() > 0.5  # the scaled random SAM gives distinct, non-trivial masks
    if label_token:
        assert (ours - ref).abs().max() > 1e-3
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_prompt_sampler_points_lie_inside_their_masks_and_half_are_boxes():
    rng = np.random.default_rng(0)
    h, w = 60, 80
    masks = []
    for k in range(7):
        m = np.zeros((h, w), bool)
        y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
        m[y : y + 3 + k, x : x + 12 - k] = True
        m[y, x + 12 - k : x + 14 - k] = k % 2 == 0  # ragged shapes
        masks.append(m)
    rles = [_rle(m) for m in masks]
    boxes = np.array([[*b[:2], b[0] + b[2], b[1] + b[3]] for b in mask_utils.toBbox(rles)])
    for num in (40, 5):
        p = sample_training_prompts(rles, boxes, num, np.random.default_rng(num))
        assert len(p) == num
        assert p.is_box.sum() == num - round(num * 0.5)
        if num == 40:  # fewer segments than prompts: every segment is prompted
            assert set(p.target.tolist()) == set(range(7))
        for (x, y), t in zip(p.points, p.target):
            assert masks[t][int(y), int(x)], (x, y, t)
        np.testing.assert_array_equal(p.boxes, boxes[p.target])
        assert not p.roi_from_mask.any()  # training RoIs: the segment's box (the code)
    assert len(sample_training_prompts([], np.zeros((0, 4)), 40, rng)) == 0


def test_centre_point_is_farthest_from_the_border_and_gt_points_use_mask_rois():
    m = np.zeros((50, 70), bool)
    m[10:31, 20:41] = True  # 21 x 21: the one farthest pixel is (30, 20)
    np.testing.assert_allclose(centre_point(_rle(m)), [30.5, 20.5])
    wide = np.zeros((50, 70), bool)
    wide[10:31, 20:61] = True  # a ridge of farthest pixels: the first one, as the code's argmax
    np.testing.assert_allclose(centre_point(_rle(wide)), [30.5, 20.5])
    ring = np.zeros((50, 50), bool)
    ring[5:45, 5:45] = True
    ring[15:35, 15:35] = False
    x, y = centre_point(_rle(ring))
    assert ring[int(y), int(x)]
    p = ground_truth_prompts([_rle(m), _rle(ring)], "gt-points")
    assert not p.is_box.any() and p.roi_from_mask.all()
    b = ground_truth_prompts([_rle(m)], "gt-boxes")
    np.testing.assert_allclose(b.boxes[0], [20, 10, 41, 31])
    assert b.is_box.all() and not b.roi_from_mask.any()


def test_roi_levels_follow_mmdet_and_void_logit_is_zero():
    boxes = torch.tensor([[0, 0, 50.0, 50], [0, 0, 112, 112], [0, 0, 300, 300], [0, 0, 900, 900]])
    assert roi_levels(boxes, (4, 8, 16, 32), 56.0).tolist() == [0, 1, 2, 3]
    # Only res3..res5 cached: small boxes go to the finest one.
    assert roi_levels(boxes, (8, 16, 32), 56.0).tolist() == [0, 0, 1, 2]
    logits = torch.zeros(2, 8, 8)
    logits[0, 2:5, 3:7] = 1
    bx, nonempty = mask_boxes(logits, 64.0)
    assert bx[0].tolist() == [24.0, 16.0, 56.0, 40.0] and nonempty.tolist() == [True, False]
    cfg = Clip2SamConfig.tiny()
    model = Clip2SamHead(cfg)
    text = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    out = model.class_logits(torch.randn(3, 16), text)
    assert out.shape == (3, 5) and torch.equal(out[:, -1], torch.zeros(3))
    assert float(out[:, :-1].abs().max()) <= 100.0 + 1e-4


def _tiny_inputs(h=48, w=64, seed=0):
    from samcp.models.heads import GroundTruth, ImageInputs

    rng = np.random.default_rng(seed)
    masks = []
    for y, x in ((4, 4), (20, 30), (30, 8)):
        m = np.zeros((h, w), bool)
        m[y : y + 14, x : x + 20] = True
        masks.append(m)
    rles = [_rle(m) for m in masks]
    inputs = ImageInputs(
        image_id="7",
        height=h,
        width=w,
        image_arrays={
            "sam_embed": rng.standard_normal((32, 16, 16)).astype(np.float16),
            "clip_res5": rng.standard_normal((24, 8, 8)).astype(np.float16),
        },
        rles=rles,
        boxes=mask_utils.toBbox(rles).astype(np.float32),
        areas=mask_utils.area(rles).astype(np.int64),
    )
    gt = GroundTruth(rles, np.array([0, 1, 2]), np.zeros(3, bool), np.ones(3, bool))
    return inputs, gt


def test_training_touches_no_frozen_parameter(tmp_path):
    """AdamW with weight decay (samcp train's optimiser) over CLIP2SAM: the prompt encoder and
    SAM's unused outputs stay bit-identical, the decoder and the recognition branch move."""
    path, _ = _sam_checkpoint(tmp_path)
    head = get_head("clip2sam")
    cfg = Clip2SamConfig.tiny(sam_checkpoint=str(path), clip_levels=("clip_res5",))
    torch.manual_seed(0)
    model = head.build(cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("prompt_encoder.") for n in frozen)
    assert not any(n.startswith("prompt_encoder.") for n in trained)
    assert "mask_decoder.iou_prediction_head.layers.0.weight" in frozen
    inputs, gt = _tiny_inputs()
    sample = head.sample(inputs, cfg, 10, gt)
    crit = head.criterion(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    text = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    model.train()
    assert not model.prompt_encoder.training
    for step in range(3):
        s = head.augment(sample, cfg, False, np.random.default_rng(step))
        loss = crit(model(**head.collate([s], text, cfg, "cpu")), [s])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(model.named_parameters())
    for n, v in frozen.items():
        assert torch.equal(params[n], v), n
    moved = [n for n, v in trained.items() if not torch.equal(params[n], v)]
    assert any(n.startswith("mask_decoder.transformer.") for n in moved)
    assert any(n.startswith("fpn.") for n in moved) and "label_token.weight" in moved


def test_training_prompts_and_targets_agree():
    """Each prompt's class and mask target is the segment it was drawn from."""
    head = get_head("clip2sam")
    cfg = Clip2SamConfig.tiny()
    inputs, gt = _tiny_inputs()
    s = head.augment(head.sample(inputs, cfg, 10, gt), cfg, False, np.random.default_rng(3))
    assert len(s.prompts) == cfg.num_prompts
    batch = collate_clip2sam([s], torch.randn(3, 16), cfg, "cpu")
    n = len(s.prompts)
    # Box prompts are in SAM's 256 frame (the image's longer side 64 -> x4).
    np.testing.assert_allclose(batch["boxes"][0, :n][s.prompts.is_box].numpy(),
                               4 * s.prompts.boxes[s.prompts.is_box])  # fmt: skip
    np.testing.assert_allclose(batch["roi_boxes"][0, :n].numpy(), s.prompts.boxes)  # CLIP: 64
    cov = s.gt_masks.float()
    for t in s.prompts.target:  # coverage of SAM's 64 x 64 mask frame is the mask, area-resampled
        assert float(cov[t].sum()) * (64 / 64) ** 2 == pytest.approx(14 * 20, rel=1e-3)
    # prediction samples prompt with the cached proposals' boxes
    pred = make_clip2sam_sample(inputs, cfg, 2)
    assert len(pred.prompts) == 2 and pred.prompts.is_box.all()


def _cache(**kw) -> CacheInfo:
    base = dict(
        clip_model="m",
        clip_input_size=64,
        clip_levels=("clip_res4", "clip_res5"),
        clip_strides={"clip_res4": 4, "clip_res5": 8},
        clip_channels={"clip_res4": 12, "clip_res5": 24},
        text_dim=16,
        image_arrays=frozenset({"clip_res4", "clip_res5", "sam_embed"}),
        sam_embed_shape=(32, 16, 16),
    )
    base.update(kw)
    return CacheInfo(**base)


def test_configure_names_the_precompute_flags():
    for name in ("sam2clip", "clip2sam"):
        head = get_head(name)
        d = head.config_cls.tiny().to_dict()
        d["clip_levels"] = []
        got = head.configure(d, _cache())
        assert got["clip_levels"] == ["clip_res4", "clip_res5"]
        assert got["clip_strides"] == [4, 8]
        with pytest.raises(ValueError, match="--store-sam-embeddings"):
            head.configure(d, _cache(image_arrays=frozenset({"clip_res5"}), sam_embed_shape=None))
        with pytest.raises(ValueError, match="--clip-levels res2,res3,res4,res5"):
            head.configure(d, _cache(clip_levels=()))
        with pytest.raises(ValueError, match="no clip_res2"):
            head.configure({**d, "clip_levels": ["clip_res2"]}, _cache())
    with pytest.raises(ValueError, match="sam_arch"):  # vit_h's decoder on a vit_test cache
        get_head("clip2sam").configure({"sam_arch": "vit_h"}, _cache())


def test_prompts_from_user_order_boxes_then_points():
    p = Prompts.from_user(boxes=[[1, 2, 11, 22]], points=[[5, 6], [7, 8]])
    assert p.is_box.tolist() == [True, False, False]
    assert p.roi_from_mask.tolist() == [False, True, True]
    np.testing.assert_allclose(p.points[0], [6, 12])
