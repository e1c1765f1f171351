"""SAM-CP training aids: the "BG" self-affinity of negative queries (table 4) and DINO denoising
queries (appendix A.3): targets, construction, attention mask, exclusion from inference, training."""

import pytest
import torch
from test_affinity_model import make_batch, make_targets

from samcp.models.affinity import (
    AffinityConfig,
    AffinityCriterion,
    AffinityHead,
    AffinitySample,
    ImageTargets,
    collate,
    load_head,
    predict_image,
    save_head,
)
from samcp.models.affinity.denoising import (
    DenoisingQueries,
    build_denoising_queries,
    denoising_attn_mask,
    denoising_targets,
)
from samcp.models.affinity.model import AffinityOutput


def _targets(labels, boxes, n=3, k=5, pos=None):
    g = len(labels)
    inst_pos = torch.zeros(g, n, dtype=torch.bool) if pos is None else pos
    return ImageTargets(
        inst_labels=torch.tensor(labels, dtype=torch.long),
        inst_pos=inst_pos,
        inst_ignore=torch.zeros(g, n, dtype=torch.bool),
        inst_boxes=torch.tensor(boxes, dtype=torch.float32).reshape(g, 4),
        inst_usable=inst_pos.any(-1),
        sem_pos=torch.zeros(k, n, dtype=torch.bool),
        sem_ignore=torch.zeros(k, n, dtype=torch.bool),
        sem_present=torch.zeros(k, dtype=torch.bool),
    )


# ----------------------------------------------------------------------------------------------
# BG self-affinity
# ----------------------------------------------------------------------------------------------


def test_bg_self_affinity_target_on_a_hand_case():
    """Type-II queries 0..3 of 4 patches (patch 3 padding): query 0 matched, query 1 ignored
    (matched to an unusable GT), query 2 unmatched -> BG: target 1 on patch 2 only."""
    cfg = AffinityConfig.tiny()
    k, p = 2, 4
    torch.manual_seed(0)
    aff = torch.randn(1, p, p, requires_grad=True)
    patch_valid = torch.tensor([[True, True, True, False]])
    out = AffinityOutput(
        affinity_logits=torch.zeros(1, 1, k + p, p),
        class_logits=torch.zeros(1, 1, k + p, k),
        query_valid=torch.cat([torch.ones(1, k, dtype=torch.bool), patch_valid], 1),
        patch_valid=patch_valid,
        patch_boxes=torch.zeros(1, p, 4),
        num_semantic=k,
    )
    eps = torch.tensor([[True, False, False, False]])
    cls_w = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    t = AffinityCriterion(cfg)._bg_terms(aff, out, eps, cls_w)
    assert float(t["num_pos"]) == 1.0
    # By hand: row 2 against e_2 over the three valid patches.
    row = aff[0, 2, :3]
    target = torch.tensor([0.0, 0.0, 1.0])
    fl = torch.nn.functional.binary_cross_entropy_with_logits(row, target, reduction="none")
    prob = row.sigmoid()
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    want_mfl = (alpha_t * fl * (1 - p_t) ** 2).sum() / 1.0
    want_dice = 1 - (2 * prob[2] + 1) / (prob.sum() + 1 + 1)
    torch.testing.assert_close(t["mfl"], want_mfl)
    torch.testing.assert_close(t["dice"], want_dice)
    # Only row 2 gets a gradient; the padded patch column none.
    (t["mfl"] + t["dice"]).backward()
    grad = aff.grad[0]
    assert grad[[0, 1, 3]].abs().sum() == 0
    assert grad[2, 3] == 0 and grad[2, :3].abs().sum() > 0
    # A row that already has affinity only with itself costs (almost) nothing.
    good = torch.full((1, p, p), -12.0)
    good[0, 2, 2] = 12.0
    t2 = AffinityCriterion(cfg)._bg_terms(good, out, eps, cls_w)
    assert float(t2["mfl"]) < 1e-6 and float(t2["dice"]) < 1e-4


def test_bg_terms_in_the_criterion_cover_the_unmatched_queries_only():
    cfg = AffinityConfig.tiny()
    batch = make_batch(cfg)  # image 0: 6 patches, image 1: 4 valid patches; 2 GTs each
    targets = make_targets(batch)
    torch.manual_seed(0)
    model = AffinityHead(cfg).eval()
    out = model.forward_batch(batch)
    losses = AffinityCriterion(cfg)(out, targets)
    # Every valid Type-II query is matched (2 per image) or BG.
    assert float(losses["num_pos_bg"]) == (6 - 2) + (4 - 2)
    assert float(losses["num_pos_ins"]) == 4
    off = AffinityCriterion(AffinityConfig.tiny(bg_self_affinity=False))(out, targets)
    assert "bg_mfl" not in off and "bg_mfl" in losses
    for key in ("sem_cls", "ins_cls", "ins_mfl", "ins_dice"):
        torch.testing.assert_close(off[key], losses[key])
    extra = sum(
        cfg.loss_mfl_weight * losses[f"layer{i}/bg_mfl"]
        + cfg.loss_dice_weight * losses[f"layer{i}/bg_dice"]
        for i in range(cfg.num_decoder_layers)
    )
    torch.testing.assert_close(losses["loss"] - off["loss"], extra, rtol=1e-5, atol=1e-5)


def test_bg_with_no_gt_in_the_image_covers_every_valid_query():
    cfg = AffinityConfig.tiny()
    batch = make_batch(cfg, b=1, p=5)
    tg = _targets([], [], n=5, k=4)
    out = AffinityHead(cfg).eval().forward_batch(batch)
    losses = AffinityCriterion(cfg)(out, [tg])
    assert float(losses["num_pos_bg"]) == 5 and torch.isfinite(losses["loss"])


# ----------------------------------------------------------------------------------------------
# Denoising queries: construction
# ----------------------------------------------------------------------------------------------


def test_denoising_queries_layout_and_determinism():
    cfg = AffinityConfig.tiny(num_denoising_queries=7)
    t0 = _targets([1, 2, 3], [[0.1, 0.1, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8], [0.2, 0.6, 0.4, 0.9]])
    t1 = _targets([4], [[0.3, 0.3, 0.6, 0.6]])
    a = build_denoising_queries([t0, t1], 5, cfg, torch.Generator().manual_seed(3))
    b = build_denoising_queries([t0, t1], 5, cfg, torch.Generator().manual_seed(3))
    c = build_denoising_queries([t0, t1], 5, cfg, torch.Generator().manual_seed(4))
    assert a.num_groups == 7 // 3 and a.group_size == 6 and a.num_queries == 12
    for f in ("labels", "boxes", "valid", "positive", "gt_index"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.boxes, c.boxes)
    # Group g: 3 positive slots then 3 negative slots; image 1 fills one slot of each half.
    want_valid = torch.tensor([[1] * 12, [1, 0, 0] * 4], dtype=torch.bool)
    assert torch.equal(a.valid, want_valid)
    assert torch.equal(a.positive[0], torch.tensor([1, 1, 1, 0, 0, 0] * 2, dtype=torch.bool))
    assert torch.equal(a.gt_index[0], torch.tensor([0, 1, 2] * 4))
    assert torch.equal(a.gt_index[1], torch.tensor([0, -1, -1] * 4))
    assert not a.positive[~a.valid].any()
    # No GT anywhere, or denoising off: no queries.
    assert build_denoising_queries([_targets([], [])], 5, cfg) is None
    assert build_denoising_queries([t0], 5, AffinityConfig.tiny(num_denoising_queries=0)) is None
    # More GTs than the budget: still one group.
    assert (
        build_denoising_queries([t0], 5, AffinityConfig.tiny(num_denoising_queries=2)).num_groups
        == 1
    )


def test_denoising_noise_matches_the_stated_scales():
    cfg = AffinityConfig()  # the paper's 300 queries, label noise 0.5, box noise 1.0
    assert (cfg.num_denoising_queries, cfg.dn_label_noise, cfg.dn_box_noise) == (300, 0.5, 1.0)
    gt = [0.4, 0.4, 0.6, 0.7]  # w = 0.2, h = 0.3, centred: no clamping for positives
    k = 10
    tg = _targets([7], [gt], k=k)
    dn = build_denoising_queries([tg], k, cfg, torch.Generator().manual_seed(0))
    assert dn.num_groups == 300 and dn.num_queries == 600
    labels, boxes, pos = dn.labels[0], dn.boxes[0], dn.positive[0]
    # Label noise: with probability 0.5 / 2 a label is redrawn uniformly from the K classes.
    changed = (labels != 7).float().mean()
    expect = 0.25 * (1 - 1 / k)
    assert abs(float(changed) - expect) < 0.06, float(changed)
    assert labels.min() >= 0 and labels.max() < k
    # Box noise: positives move each corner by less than half the side; negatives by 1-2 halves.
    half = torch.tensor([0.1, 0.15, 0.1, 0.15])
    delta = (boxes - torch.tensor(gt)).abs() / half
    assert (delta[pos] < 1 + 1e-5).all()
    neg = boxes[~pos]
    ok = (
        ((neg[:, 2:] - neg[:, :2]) > 2e-3).all(-1) & (neg > 1e-6).all(-1) & (neg < 1 - 1e-6).all(-1)
    )
    assert ok.sum() > 50  # most negatives stay well-formed boxes inside the image
    assert (delta[~pos][ok] > 1 - 1e-5).all() and (delta[~pos][ok] < 2 + 1e-5).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) > 0).all()  # always a proper box
    assert (boxes >= 0).all() and (boxes <= 1).all()
    # Without noise the copies are the GT.
    clean = build_denoising_queries(
        [tg], k, AffinityConfig(dn_label_noise=0.0, dn_box_noise=0.0), torch.Generator()
    )
    assert (clean.labels[0] == 7).all()
    torch.testing.assert_close(clean.boxes[0], torch.tensor(gt).expand(600, 4))


def test_denoising_attention_mask_pattern():
    dn = DenoisingQueries(
        labels=torch.zeros(1, 4, dtype=torch.long),
        boxes=torch.zeros(1, 4, 4),
        valid=torch.ones(1, 4, dtype=torch.bool),
        positive=torch.tensor([[True, False, True, False]]),
        gt_index=torch.zeros(1, 4, dtype=torch.long),
        num_groups=2,
        group_size=2,
    )
    mask = denoising_attn_mask(3, dn)
    x, o = True, False
    want = torch.tensor(
        [
            [o, o, o, x, x, x, x],  # normal queries: never see denoising queries
            [o, o, o, x, x, x, x],
            [o, o, o, x, x, x, x],
            [o, o, o, o, o, x, x],  # group 0: itself and the normal queries
            [o, o, o, o, o, x, x],
            [o, o, o, x, x, o, o],  # group 1
            [o, o, o, x, x, o, o],
        ]
    )
    assert torch.equal(mask, want)


def test_denoising_targets_hand_case():
    # GT 0 has positive patches {0, 1} (patch 2 in its ignore band); GT 1 has none.
    pos = torch.tensor([[True, True, False], [False, False, False]])
    tg = _targets([3, 1], [[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]], n=3, k=4, pos=pos)
    tg.inst_ignore[0, 2] = True
    cfg = AffinityConfig.tiny(num_denoising_queries=2, dn_label_noise=1.0)
    dn = build_denoising_queries([tg], 4, cfg, torch.Generator().manual_seed(0))
    assert dn.num_queries == 4  # one group: [pos GT0, pos GT1, neg GT0, neg GT1]
    patch_valid = torch.ones(1, 3, dtype=torch.bool)
    aff_t, aff_w, eps, cls_t, cls_w = denoising_targets(dn, [tg], patch_valid, 4)
    assert eps.tolist() == [[True, False, False, False]]
    assert cls_w.tolist() == [[1.0, 0.0, 1.0, 1.0]]  # GT 1 has no patch: its copy is ignored
    assert aff_t[0, 0].tolist() == [1.0, 1.0, 0.0] and aff_w[0, 0].tolist() == [1.0, 1.0, 0.0]
    assert aff_w[0, 1:].sum() == 0  # negatives: classification only
    # The class target is the GT's true class whatever noise the input label got.
    assert cls_t[0, 0].tolist() == [0.0, 0.0, 0.0, 1.0] and cls_t[0, 1:].sum() == 0


# ----------------------------------------------------------------------------------------------
# Denoising queries in the head
# ----------------------------------------------------------------------------------------------


def _dn_for(batch, cfg, seed=0):
    return build_denoising_queries(
        make_targets(batch), batch["text_embed"].shape[0], cfg, torch.Generator().manual_seed(seed)
    )


def test_denoising_queries_never_change_the_normal_outputs():
    cfg = AffinityConfig.tiny()
    batch = make_batch(cfg)
    dn = _dn_for(batch, cfg)
    torch.manual_seed(0)
    model = AffinityHead(cfg).train()  # dropout 0: train mode is deterministic
    plain = model.forward_batch(batch)
    with_dn = model.forward_batch(dict(batch, denoising=dn))
    assert plain.dn_affinity_logits is None and plain.denoising is None
    n_layers, b, q, p = plain.affinity_logits.shape
    assert with_dn.affinity_logits.shape == (n_layers, b, q, p)
    assert with_dn.dn_affinity_logits.shape == (n_layers, b, dn.num_queries, p)
    assert with_dn.dn_class_logits.shape == (n_layers, b, dn.num_queries, q - p)
    torch.testing.assert_close(with_dn.affinity_logits, plain.affinity_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(with_dn.class_logits, plain.class_logits, rtol=0, atol=1e-5)
    assert torch.equal(with_dn.query_valid, plain.query_valid)
    # ... and so neither do the matching and the normal losses.
    tg = make_targets(batch)
    la, lb = AffinityCriterion(cfg)(plain, tg), AffinityCriterion(cfg)(with_dn, tg)
    for key in la:
        if key != "loss":
            torch.testing.assert_close(la[key], lb[key], rtol=0, atol=1e-4, msg=key)
    assert "dn_cls" in lb and "dn_cls" not in la
    # Without the attention mask the normal queries do see them (the test has teeth).
    open_cfg = AffinityConfig.tiny(dn_attn_mask=False)
    leaky = AffinityHead(open_cfg).train()
    leaky.load_state_dict(model.state_dict())
    diff = leaky.forward_batch(dict(batch, denoising=dn)).affinity_logits - plain.affinity_logits
    assert diff.abs().max() > 1e-3


def test_denoising_is_training_only_and_inference_is_unchanged():
    cfg = AffinityConfig.tiny()
    batch = make_batch(cfg)
    dn = _dn_for(batch, cfg)
    torch.manual_seed(0)
    model = AffinityHead(cfg).eval()
    with torch.no_grad():
        a = model.forward_batch(batch)
        b = model.forward_batch(dict(batch, denoising=dn))
    assert b.dn_affinity_logits is None and b.denoising is None
    assert torch.equal(a.affinity_logits, b.affinity_logits)
    k = a.num_semantic
    pa = predict_image(a.affinity_logits[-1, 0], a.class_logits[-1, 0], a.patch_valid[0], k, cfg)
    pb = predict_image(b.affinity_logits[-1, 0], b.class_logits[-1, 0], b.patch_valid[0], k, cfg)
    assert torch.equal(pa.instance_queries, pb.instance_queries)
    assert torch.equal(pa.instance_scores, pb.instance_scores)


def _sample(i, targets, n):
    return AffinitySample(
        image_id=str(i),
        height=48,
        width=64,
        clip_feats={"clip_res5": torch.zeros(16, 8, 8)},
        patch_rles=[],
        patch_boxes=torch.tensor([[2.0, 2.0, 10.0, 10.0]]).repeat(n, 1),
        patch_masks=torch.ones(n, 4, 4),
        patch_clip_embed=None,
        patch_areas=torch.full((n,), 64.0),
        targets=targets,
    )


def test_collate_builds_denoising_only_for_training_samples():
    cfg = AffinityConfig.tiny()
    text = torch.randn(5, cfg.text_dim)
    tg = _targets([1, 2], [[0.1, 0.1, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8]], n=3)
    train = [_sample(0, tg, 3), _sample(1, tg, 3)]
    torch.manual_seed(0)
    batch = collate(train, text, "cpu", cfg)
    assert isinstance(batch["denoising"], DenoisingQueries)
    assert batch["denoising"].num_groups == cfg.num_denoising_queries // 2
    torch.manual_seed(0)
    again = collate(train, text, "cpu", cfg)["denoising"]
    assert torch.equal(again.boxes, batch["denoising"].boxes)  # deterministic for a seed
    assert "denoising" not in collate([_sample(0, None, 3)], text, "cpu", cfg)  # prediction
    assert "denoising" not in collate(train, text, "cpu")  # no config: the plain batch
    off = AffinityConfig.tiny(num_denoising_queries=0)
    assert "denoising" not in collate(train, text, "cpu", off)


def test_loss_with_denoising_decreases_on_a_tiny_batch():
    cfg = AffinityConfig.tiny()
    batch = make_batch(cfg)
    targets = make_targets(batch)
    torch.manual_seed(0)
    model = AffinityHead(cfg).train()
    criterion = AffinityCriterion(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    totals, dn_terms = [], []
    for _ in range(15):
        dn = build_denoising_queries(targets, batch["text_embed"].shape[0], cfg, gen)
        losses = criterion(model.forward_batch(dict(batch, denoising=dn)), targets)
        opt.zero_grad()
        losses["loss"].backward()
        # The denoising content MLP learns from the denoising loss.
        assert model.dn_label_mlp.layers[0].weight.grad.abs().sum() > 0
        opt.step()
        totals.append(float(losses["loss"].detach()))
        dn_terms.append(float(losses["dn_cls"] + losses["dn_mfl"] + losses["dn_dice"]))
    assert sum(totals[-3:]) < 0.7 * sum(totals[:3]), totals
    assert sum(dn_terms[-3:]) < 0.7 * sum(dn_terms[:3]), dn_terms


def test_a_step_without_denoising_still_reaches_every_parameter():
    """DDP needs a gradient for every parameter, also in a batch without GT instances."""
    cfg = AffinityConfig.tiny()
    batch = make_batch(cfg)
    model = AffinityHead(cfg).train()
    out = model.forward_batch(batch)
    (out.affinity_logits.sum() + out.class_logits.sum()).backward()
    for name, prm in model.dn_label_mlp.named_parameters():
        assert prm.grad is not None, name


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def test_config_round_trip_and_validation(tmp_path):
    cfg = AffinityConfig.tiny(
        bg_self_affinity=False,
        num_denoising_queries=12,
        dn_label_noise=0.3,
        dn_box_noise=0.4,
        dn_attn_mask=False,
    )
    d = cfg.to_dict()
    assert d["num_denoising_queries"] == 12 and d["bg_self_affinity"] is False
    assert AffinityConfig.from_dict(d) == cfg
    default = AffinityConfig()
    assert default.bg_self_affinity and default.dn_attn_mask
    assert AffinityConfig.from_dict(default.to_dict()) == default
    for bad in (
        {"num_denoising_queries": -1},
        {"dn_label_noise": 1.5},
        {"dn_box_noise": -0.1},
    ):
        with pytest.raises(ValueError):
            AffinityConfig.tiny(**bad)
    # Saved heads carry the denoising MLP only when denoising is on.
    assert AffinityHead(AffinityConfig.tiny(num_denoising_queries=0)).dn_label_mlp is None
    model = AffinityHead(cfg)
    save_head(model, cfg, tmp_path / "m")
    loaded, cfg2 = load_head(tmp_path / "m")
    assert cfg2 == cfg and loaded.dn_label_mlp is not None
