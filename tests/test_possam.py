"""PosSAM head (samcp.models.possam): LDP, targets, losses, flip, plugin inference. CPU, tiny."""

from __future__ import annotations

import dataclasses

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from samcp.models.heads import (
    CacheInfo,
    CompositionParams,
    GroundTruth,
    ImageInputs,
    ImageResult,
    InferContext,
)
from samcp.models.possam import (
    PossamConfig,
    PossamCriterion,
    build_possam_head,
    collate,
    flip_sample,
    frame_coverage,
    frame_to_image,
    make_sample,
    masked_average_pool,
    proposal_targets,
)
from samcp.models.possam.losses import hungarian, point_sample
from samcp.models.possam.plugin import PossamPlugin, class_probs
from samcp.models.possam.targets import VOID, frame_logits_to_rles, mask_targets

H, W = 64, 48  # portrait: the content is 48/64 of the frame's width (12 of 16 cells, 6 of 8)
K = 4
ISTHING = np.array([True, False, True, False])


def rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def box(r0: int, r1: int, c0: int, c1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


# GT: A (thing 0) top-left, B (stuff 1) top-right, C (class 2) the bottom half, a crowd region.
GT_MASKS = [box(0, 32, 0, 24), box(0, 32, 24, 48), box(32, 64, 0, 48)]
GT_LABELS = np.array([0, 1, 2])
GT_CROWD = np.array([False, False, True])
# Proposals: A exactly, 2/3 of A, a strip across A and B, C exactly, half of C, an asymmetric one.
PROPOSALS = [
    box(0, 32, 0, 24),
    box(0, 32, 0, 16),
    box(0, 32, 16, 32),
    box(32, 64, 0, 48),
    box(32, 64, 0, 24),
    box(4, 20, 4, 12),
]


def make_inputs(
    seed: int = 0, cfg: PossamConfig | None = None, n: int | None = None
) -> ImageInputs:
    cfg = cfg or PossamConfig.tiny()
    g = torch.Generator().manual_seed(seed)
    props = PROPOSALS[:n] if n is not None else PROPOSALS
    rles = [rle(m) for m in props]
    clip_grid = cfg.clip_input_size // 8
    return ImageInputs(
        image_id=f"img{seed}",
        height=H,
        width=W,
        image_arrays={
            "sam_embed": torch.randn(cfg.sam_dim, cfg.sam_grid, cfg.sam_grid, generator=g)
            .half()
            .numpy(),
            cfg.clip_level: torch.randn(cfg.clip_channels, clip_grid, clip_grid, generator=g)
            .half()
            .numpy(),
        },
        rles=rles,
        boxes=np.asarray(mask_utils.toBbox(rles) if rles else [], np.float32).reshape(-1, 4),
        areas=np.asarray(mask_utils.area(rles) if rles else [], np.int64),
        mask_arrays={
            "clip_mask_embed": torch.randn(len(rles), cfg.text_dim, generator=g).half().numpy()
        },
    )


def make_gt() -> GroundTruth:
    return GroundTruth([rle(m) for m in GT_MASKS], GT_LABELS, GT_CROWD, ISTHING)


def text_embed(cfg: PossamConfig, seed: int = 7) -> torch.Tensor:
    return torch.randn(K, cfg.text_dim, generator=torch.Generator().manual_seed(seed))


def random_batch(cfg: PossamConfig, b: int = 2, n: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[-1, n - 2 :] = False
    return {
        "sam_embed": torch.randn(b, cfg.sam_dim, cfg.sam_grid, cfg.sam_grid, generator=g),
        "clip_map": torch.randn(b, cfg.clip_channels, 8, 8, generator=g),
        "masks": torch.rand(b, n, cfg.sam_grid, cfg.sam_grid, generator=g) * valid[..., None, None],
        "valid": valid,
        "text_embed": torch.randn(K, cfg.text_dim, generator=g),
        "clip_embed": torch.randn(b, n, cfg.text_dim, generator=g),
    }


# ----------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------


def test_config_round_trip_and_unknown_keys():
    for cfg in (PossamConfig(), PossamConfig.tiny(mask_source="decoder", classifier="ldp")):
        assert PossamConfig.from_dict(cfg.to_dict()) == cfg
    d = PossamConfig.tiny().to_dict()
    d["bogus"] = 1
    d["also_bogus"] = 2
    with pytest.raises(ValueError, match="also_bogus, bogus"):
        PossamConfig.from_dict(d)
    with pytest.raises(ValueError, match="mask_source"):
        PossamConfig(mask_source="sam2")
    with pytest.raises(ValueError, match="classifier"):
        PossamConfig(classifier="max")
    with pytest.raises(ValueError, match="alpha"):
        PossamConfig(alpha=1.5)
    d = PossamConfig().to_dict()
    assert (d["num_queries"], d["alpha"], d["beta"], d["loss_cls"], d["loss_mask_bce"]) == (
        250,
        0.4,
        0.8,
        2.0,
        5.0,
    )


# ----------------------------------------------------------------------------------------------
# Frames and pooling.
# ----------------------------------------------------------------------------------------------


def test_frame_coverage_is_exact_area():
    rles = [rle(m) for m in PROPOSALS] + [rle(box(3, 17, 5, 30))]
    cov = frame_coverage(rles, H, W, 16)  # cells of 4 x 4 pixels
    cell = max(H, W) / 16
    np.testing.assert_allclose(cov.sum((1, 2)) * cell**2, mask_utils.area(rles), rtol=1e-5)
    assert torch.all(cov[0, :8, :6] == 1) and cov[0, 8:].sum() == 0 and cov[0, :, 6:].sum() == 0
    assert cov[:, :, 12:].sum() == 0  # the padding columns of a portrait image
    # a 7 x 7 grid: cells straddle pixels, coverage is still exact
    cov7 = frame_coverage(rles, H, W, 7)
    np.testing.assert_allclose(cov7.sum((1, 2)) * (64 / 7) ** 2, mask_utils.area(rles), rtol=1e-5)


def test_frame_to_image_recovers_cell_aligned_masks():
    cov = frame_coverage([rle(m) for m in PROPOSALS], H, W, 16)
    logits = (cov - 0.5) * 20
    back = frame_to_image(logits, H, W).numpy() > 0
    # bilinear at pixel centres: exact along edges, only a box's outer corner pixel is lost
    wrong = back != np.stack(PROPOSALS)
    assert (wrong.sum((1, 2)) <= 4).all() and not (back & wrong).any()
    rles = frame_logits_to_rles(logits, H, W, chunk=4)
    np.testing.assert_array_equal(mask_utils.decode(rles).transpose(2, 0, 1).astype(bool), back)


def test_pooling_a_constant_map_returns_the_constant():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 5, 16, 16, generator=g)
    for size in ((16, 16), (8, 8), (32, 32)):
        feat = torch.full((2, 3, *size), 2.5)
        feat[:, 1] = -1.25
        pooled = masked_average_pool(feat, masks)
        assert pooled.shape == (2, 5, 3)
        torch.testing.assert_close(pooled[..., 0], torch.full((2, 5), 2.5))
        torch.testing.assert_close(pooled[..., 1], torch.full((2, 5), -1.25))
    empty = masked_average_pool(torch.ones(1, 3, 8, 8), torch.zeros(1, 2, 16, 16))
    assert torch.all(empty == 0)


# ----------------------------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["ldp", "sam", "clip"])
def test_ldp_is_equivariant_to_mask_order(pooling):
    torch.manual_seed(0)
    cfg = PossamConfig.tiny(pooling=pooling)
    model = build_possam_head(cfg).eval()
    batch = random_batch(cfg)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = dict(batch)
    for key in ("masks", "valid", "clip_embed"):
        permuted[key] = batch[key][:, perm]
    with torch.no_grad():
        a = model(**batch)
        b = model(**permuted)
    for name in ("class_logits", "iou", "clip_logits", "masks"):
        x, y = getattr(a, name), getattr(b, name)
        va = a.valid[:, perm]
        torch.testing.assert_close(x[:, perm][va], y[va], rtol=1e-4, atol=1e-5)
    assert a.class_logits.shape == (2, 6, K + 1) and a.iou.shape == (2, 6)
    assert torch.all((a.iou >= 0) & (a.iou <= 1))


@pytest.mark.parametrize("source", ["proposals", "decoder"])
def test_no_gradient_reaches_cached_inputs(source):
    torch.manual_seed(0)
    cfg = PossamConfig.tiny(mask_source=source)
    model = build_possam_head(cfg)
    samples = [make_sample(make_inputs(s, cfg), cfg, 100, make_gt()) for s in range(2)]
    batch = collate(samples, text_embed(cfg), "cpu")
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    before = {k: (v.clone(), v._version) for k, v in tensors.items()}
    out = model(**batch)
    crit = PossamCriterion(cfg)
    targets = [s.targets if source == "proposals" else s.gt for s in samples]
    loss = crit(out, targets)["loss"]
    loss.backward()
    for k, v in tensors.items():
        assert not v.requires_grad and v.grad is None, k
        assert v._version == before[k][1], f"{k} was written in place"
        assert torch.equal(v, before[k][0]), k
    assert out.clip_logits is not None and not out.clip_logits.requires_grad
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_decoder_outputs():
    torch.manual_seed(0)
    cfg = PossamConfig.tiny(mask_source="decoder")
    out = build_possam_head(cfg)(**random_batch(cfg))
    q, g = cfg.num_queries, cfg.sam_grid
    assert out.class_logits.shape == (2, q, K + 1)
    assert out.mask_logits.shape == (2, q, 4 * g, 4 * g)
    assert out.masks.shape == (2, q, g, g) and out.valid.all()
    assert out.clip_logits.shape == (2, q, K)
    assert len(out.aux_mask_logits) == cfg.dec_layers
    torch.testing.assert_close(
        out.masks, torch.nn.functional.avg_pool2d(out.mask_logits.sigmoid(), 4)
    )


# ----------------------------------------------------------------------------------------------
# Targets and losses.
# ----------------------------------------------------------------------------------------------


def test_proposal_targets_hand_case():
    t = proposal_targets(
        [rle(m) for m in PROPOSALS], [rle(m) for m in GT_MASKS], GT_LABELS, GT_CROWD, 0.5
    )
    # A exactly -> 0; 2/3 of A (IoU 2/3) -> 0; strip (IoU .25 with A and B) -> void;
    # C exactly and half of C (best match the crowd segment, IoU 1 and .5) -> ignored;
    # the small box inside A (IoU 128/768) -> void.
    assert t.labels.tolist() == [0, 0, VOID, VOID, VOID, VOID]
    assert t.ignore.tolist() == [False, False, False, True, True, False]
    np.testing.assert_allclose(t.iou.numpy(), [1.0, 2 / 3, 0.25, 0.0, 0.0, 128 / 768], rtol=1e-6)
    # no ground truth: all void, IoU 0
    t0 = proposal_targets([rle(m) for m in PROPOSALS], [], np.zeros(0), np.zeros(0, bool))
    assert t0.labels.tolist() == [VOID] * 6 and t0.iou.sum() == 0 and not t0.ignore.any()
    # Every proposal lies on annotated pixels (the crowd segment counts as annotated) ...
    assert t.iou_known.all()
    # ... until segments are void (an unseen class turned to void): without B (top-right), the
    # strip is half on void (kept: not more than half), and with only C annotated the top
    # proposals are entirely on void (their IoU is unknown: no IoU loss).
    t1 = proposal_targets(
        [rle(m) for m in PROPOSALS], [rle(GT_MASKS[0]), rle(GT_MASKS[2])], [0, 2], [False, True]
    )
    assert t1.iou_known.tolist() == [True] * 6
    t2 = proposal_targets([rle(m) for m in PROPOSALS], [rle(GT_MASKS[2])], [2], [False], 0.5)
    assert t2.iou_known.tolist() == [False, False, False, True, True, False]
    t3 = proposal_targets(
        [rle(m) for m in PROPOSALS], [rle(GT_MASKS[2])], [2], [False], 0.5, iou_void_ignore=1.0
    )
    assert t3.iou_known.all()
    assert not t0.iou_known.any()  # no annotation at all: nothing is known


def test_mask_targets_drop_crowd():
    t = mask_targets([rle(m) for m in GT_MASKS], GT_LABELS, GT_CROWD, H, W, 64)
    assert t.labels.tolist() == [0, 1]
    assert t.masks.shape == (2, 64, 64) and t.masks.dtype == torch.bool
    assert int(t.masks[0].sum()) == 32 * 24 and int(t.masks[1].sum()) == 32 * 24


def test_hungarian_matches_perfect_predictions():
    cfg = PossamConfig.tiny()
    gt = torch.zeros(3, 32, 32)
    gt[0, :16], gt[1, 16:, :16], gt[2, 16:, 16:] = 1, 1, 1
    pred = torch.full((5, 32, 32), -8.0)
    pred[4][gt[0] > 0] = 8  # query 4 <- GT 0
    pred[1][gt[1] > 0] = 8  # query 1 <- GT 1
    pred[2][gt[2] > 0] = 8  # query 2 <- GT 2
    pts = torch.rand(400, 2, generator=torch.Generator().manual_seed(0))
    rows, cols = hungarian(
        point_sample(pred, pts), point_sample(gt, pts), None, torch.tensor([0, 1, 2]), cfg
    )
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 4, 1: 1, 2: 2}


@pytest.mark.parametrize("source", ["proposals", "decoder"])
def test_loss_decreases_on_a_fixed_batch(source):
    torch.manual_seed(0)
    small = {"sam_grid": 8, "train_points": 256} if source == "decoder" else {}
    cfg = PossamConfig.tiny(mask_source=source, **small)
    model = build_possam_head(cfg)
    plugin = PossamPlugin()
    samples = [plugin.sample(make_inputs(s, cfg), cfg, 100, make_gt()) for s in range(2)]
    batch = plugin.collate(samples, text_embed(cfg), cfg, "cpu")
    crit = plugin.criterion(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        terms = crit(model(**batch), samples)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"].detach()))
    assert all(np.isfinite(losses))
    expected = {"loss", "loss_cls", "loss_iou"}
    if source == "decoder":
        expected |= {"loss_mask_bce", "loss_mask_dice", "loss_aux"}
    assert set(terms) == expected
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


def test_proposal_class_loss_ignores_crowd_and_padding():
    cfg = PossamConfig.tiny()
    samples = [
        make_sample(make_inputs(0, cfg), cfg, 100, make_gt()),
        make_sample(make_inputs(1, cfg, n=2), cfg, 100, make_gt()),
    ]
    batch = collate(samples, text_embed(cfg), "cpu")
    model = build_possam_head(cfg)
    out = model(**batch)
    # changing the logits of ignored (crowd) and padded masks changes nothing
    terms = PossamCriterion(cfg)(out, [s.targets for s in samples])
    logits = out.class_logits.detach().clone()
    logits[0, 3:5] += 5.0  # the two crowd-matched proposals of image 0
    logits[1, 2:] -= 5.0  # padding of image 1
    iou = out.iou.detach().clone()
    iou[1, 2:] = 0.123
    out2 = dataclasses.replace(out, class_logits=logits, iou=iou)
    terms2 = PossamCriterion(cfg)(out2, [s.targets for s in samples])
    torch.testing.assert_close(terms["loss_cls"], terms2["loss_cls"])
    torch.testing.assert_close(terms["loss_iou"], terms2["loss_iou"])


# ----------------------------------------------------------------------------------------------
# Samples and flip.
# ----------------------------------------------------------------------------------------------


def test_sample_contents():
    cfg = PossamConfig.tiny()
    s = make_sample(make_inputs(0, cfg), cfg, 4, make_gt())
    assert s.num_masks == 4 and len(s.rles) == 4
    assert s.masks.shape == (4, 16, 16) and s.masks.dtype == torch.float16
    assert s.sam_embed.shape == (cfg.sam_dim, 16, 16) and s.sam_embed.dtype == torch.float16
    assert s.clip_embed.shape == (4, cfg.text_dim)
    assert s.targets.labels.tolist() == [0, 0, VOID, VOID] and s.gt is None
    d = make_sample(make_inputs(0, cfg), PossamConfig.tiny(mask_source="decoder"), 4, make_gt())
    assert d.targets is None and d.gt.masks.shape == (2, 64, 64)


@pytest.mark.parametrize("source", ["proposals", "decoder"])
def test_flip_twice_is_identity(source):
    cfg = PossamConfig.tiny(mask_source=source)
    inputs = make_inputs(0, cfg)
    s = make_sample(inputs, cfg, 100, make_gt())
    f = flip_sample(s)
    ff = flip_sample(f)
    assert f.flipped and not ff.flipped
    for name in ("masks", "sam_embed", "clip_map"):
        assert not torch.equal(getattr(f, name), getattr(s, name)), name
        assert torch.equal(getattr(ff, name), getattr(s, name)), name
    if source == "decoder":
        assert torch.equal(ff.gt.masks, s.gt.masks) and not torch.equal(f.gt.masks, s.gt.masks)
        flipped_gt = mask_targets(
            [rle(m[:, ::-1]) for m in GT_MASKS], GT_LABELS, GT_CROWD, H, W, 64
        )
        assert torch.equal(f.gt.masks, flipped_gt.masks)
    else:
        assert f.targets is s.targets
    # the mirrored masks are the coverage of the mirrored proposals; padding columns untouched
    mirrored = frame_coverage([rle(m[:, ::-1]) for m in PROPOSALS], H, W, 16).half()
    assert torch.equal(f.masks, mirrored)
    assert torch.equal(f.sam_embed[..., 12:], s.sam_embed[..., 12:])
    assert torch.equal(f.sam_embed[..., :12], s.sam_embed[..., :12].flip(-1))
    assert torch.equal(f.clip_map[..., :6], s.clip_map[..., :6].flip(-1))


# ----------------------------------------------------------------------------------------------
# Plugin.
# ----------------------------------------------------------------------------------------------


def cache_info(**kw) -> CacheInfo:
    base = dict(
        clip_model="convnext",
        clip_input_size=64,
        clip_levels=("clip_res4", "clip_res5"),
        clip_strides={"clip_res4": 16, "clip_res5": 32},
        clip_channels={"clip_res4": 6, "clip_res5": 12},
        text_dim=8,
        image_arrays=frozenset({"clip_res4", "clip_res5", "sam_embed"}),
        mask_arrays=frozenset({"clip_mask_embed"}),
    )
    base.update(kw)
    return CacheInfo(**base)


def test_plugin_configure_and_needs():
    plugin = PossamPlugin()
    assert plugin.name == "possam" and plugin.config_cls is PossamConfig and plugin.summary
    d = plugin.configure(PossamConfig().to_dict(), cache_info())
    assert d == {
        "clip_level": "clip_res5",
        "clip_channels": 12,
        "clip_input_size": 64,
        "text_dim": 8,
    }
    d = plugin.configure({"clip_level": "clip_res4"}, cache_info())
    assert d["clip_level"] == "clip_res4" and d["clip_channels"] == 6
    only4 = cache_info(
        clip_levels=("clip_res3", "clip_res4"), clip_channels={"clip_res3": 3, "clip_res4": 6}
    )
    assert plugin.configure(PossamConfig().to_dict(), only4)["clip_level"] == "clip_res4"
    with pytest.raises(ValueError, match="clip_res2"):
        plugin.configure({"clip_level": "clip_res2"}, cache_info())
    with pytest.raises(ValueError, match="--store-sam-embeddings"):
        plugin.configure({}, cache_info(image_arrays=frozenset({"clip_res5"})))
    with pytest.raises(ValueError, match="--clip-checkpoint"):
        plugin.configure({}, cache_info(mask_arrays=frozenset()))
    cfg = PossamConfig.tiny()
    assert plugin.needs(cfg) == (["sam_embed", "clip_res5"], ["clip_mask_embed"])
    p = plugin.default_params(cfg)
    assert (p.score_thresh, p.overlap_thresh, p.stuff_area_min, p.max_instances) == (
        cfg.score_thresh,
        0.8,
        0,
        100,
    )


def test_class_probs_variants():
    g = torch.Generator().manual_seed(0)
    p_l = torch.rand(3, K, generator=g).softmax(-1)
    p_c = torch.rand(3, K, generator=g).softmax(-1)
    iou = torch.tensor([1.0, 0.5, 0.25])
    seen = torch.tensor([True, True, False, False])
    torch.testing.assert_close(
        class_probs(p_l, p_c, iou, "ldp", seen, 0.4, 0.8), p_l * iou[:, None]
    )
    torch.testing.assert_close(
        class_probs(p_l, p_c, iou, "clip", seen, 0.4, 0.8), p_c * iou[:, None]
    )
    geo = class_probs(p_l, p_c, iou, "geometric", seen, 0.4, 0.8)
    torch.testing.assert_close(geo[:, 0], p_l[:, 0] ** 0.6 * p_c[:, 0] ** 0.4)
    torch.testing.assert_close(geo[:, 3], p_l[:, 3] ** 0.2 * p_c[:, 3] ** 0.8)
    # MASE with alpha = beta = 0 is the IoU-weighted LDP probability
    torch.testing.assert_close(class_probs(p_l, p_c, iou, "mase", seen, 0, 0), p_l * iou[:, None])


@pytest.mark.parametrize(
    "source,classifier",
    [("proposals", "mase"), ("proposals", "geometric"), ("decoder", "mase"), ("decoder", "clip")],
)
def test_infer_returns_one_result_per_sample(source, classifier):
    torch.manual_seed(0)
    cfg = PossamConfig.tiny(mask_source=source, classifier=classifier)
    plugin = PossamPlugin()
    model = plugin.build(cfg).eval()
    samples = [
        plugin.sample(make_inputs(0, cfg), cfg, 100),
        plugin.sample(make_inputs(1, cfg, n=0), cfg, 100),
    ]
    text = text_embed(cfg)
    with torch.no_grad():
        out = model(**plugin.collate(samples, text, cfg, "cpu"))
    ctx = InferContext(
        text_embed=text,
        isthing=ISTHING,
        seen=np.array([True, True, False, False]),
        params=CompositionParams(score_thresh=0.0),
        device=torch.device("cpu"),
    )
    results = plugin.infer(out, samples, cfg, ctx)
    assert len(results) == 2 and all(isinstance(r, ImageResult) for r in results)
    for r, s in zip(results, samples):
        assert r.image_id == s.image_id and (r.height, r.width) == (H, W)
        assert r.panoptic.shape == (H, W) and r.semantic.shape == (H, W)
        assert len(r.instance_rles) == len(r.instance_labels) == len(r.instance_scores)
        assert all(ISTHING[c] for c in r.instance_labels)
        assert set(np.unique(r.panoptic)) - {0} == {seg["id"] for seg in r.segments}
        assert all(0 <= seg["label"] < K for seg in r.segments)
        assert r.semantic.max() < K
    if source == "proposals":
        assert results[1].segments == [] and len(results[0].segments) > 0
    else:
        # the decoder predicts masks even without proposals (uniform CLIP for them)
        assert results[0].semantic.min() >= -1
