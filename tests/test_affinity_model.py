"""SAM-CP affinity head: Algorithm 1, refinement, DCA, padding, save/load, a few training steps, inference."""

import json
import math

import pytest
import torch

from samcp.models.affinity import (
    AffinityConfig,
    AffinityCriterion,
    AffinityHead,
    ImageTargets,
    load_head,
    open_vocab_scores,
    predict_image,
    query_clip_logits,
    save_head,
)
from samcp.models.affinity.model import AffinityDecoderLayer, AffinitySimilarity
from samcp.models.registry import build_config, build_head, list_heads


def make_batch(cfg: AffinityConfig, b: int = 2, p: int = 6, k: int = 4, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    s = cfg.clip_input_size
    h = s // cfg.clip_strides[0]
    sizes = torch.tensor([[48, 64], [64, 40], [30, 30]][:b])
    xy = torch.rand(b, p, 2, generator=gen) * 25
    wh = torch.rand(b, p, 2, generator=gen) * 15 + 3
    valid = torch.ones(b, p, dtype=torch.bool)
    if b > 1:
        valid[1, p - 2 :] = False
    return {
        "clip_feats": {
            cfg.clip_levels[0]: torch.randn(b, cfg.clip_channels[0], h, h, generator=gen)
        },
        "image_sizes": sizes,
        "patch_boxes": torch.cat([xy, wh], dim=-1),
        "patch_masks": (torch.rand(b, p, cfg.roi_size, cfg.roi_size, generator=gen) > 0.3).float(),
        "patch_valid": valid,
        "text_embed": torch.randn(k, cfg.text_dim, generator=gen),
        "patch_clip_embed": torch.nn.functional.normalize(
            torch.randn(b, p, cfg.text_dim, generator=gen), dim=-1
        ),
    }


def make_targets(batch: dict) -> list[ImageTargets]:
    k = batch["text_embed"].shape[0]
    out = []
    for i in range(batch["patch_valid"].shape[0]):
        n = int(batch["patch_valid"][i].sum())
        pos = torch.zeros(2, n, dtype=torch.bool)
        pos[0, 0] = pos[0, 1] = True
        pos[1, 2] = True
        sem_pos = torch.zeros(k, n, dtype=torch.bool)
        sem_pos[1, :3] = True
        sem_pos[3, 3] = True
        out.append(
            ImageTargets(
                inst_labels=torch.tensor([1, 1]),
                inst_pos=pos,
                inst_ignore=torch.zeros(2, n, dtype=torch.bool),
                inst_boxes=torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.3, 0.2, 0.7, 0.9]]),
                inst_usable=torch.tensor([True, True]),
                sem_pos=sem_pos,
                sem_ignore=torch.zeros(k, n, dtype=torch.bool),
                sem_present=torch.tensor([False, True, False, True]),
            )
        )
    return out


def test_algorithm1_affinity_similarity_matches_the_paper_formula():
    torch.manual_seed(0)
    d, heads = 8, 2
    mod = AffinitySimilarity(d, heads, mlp_layers=2, prior_prob=0.01)
    with torch.no_grad():
        mod.logit_scale.fill_(0.3)
        mod.bias_k.normal_()
    q, k = torch.randn(1, 3, d), torch.randn(1, 4, d)
    got = mod(q, k)[0]
    fq, fk = mod.fc_q(q[0]), mod.fc_k(k[0])  # lines 1-2
    per_head = torch.stack(
        [
            fq[:, h * 4 : (h + 1) * 4] @ fk[:, h * 4 : (h + 1) * 4].t() / math.sqrt(d / heads)
            for h in range(heads)
        ],
        dim=-1,
    )  # lines 3-5: (M, N, eta)
    mixed = mod.mix(per_head).squeeze(-1)  # lines 6-7
    expected = mixed / math.exp(0.3) + (fk @ mod.bias_k + mod.bias0)[None]  # line 8
    torch.testing.assert_close(got, expected)
    # With the MLP silenced the score is exactly the 0.01 prior (b1 = 0 at init).
    fresh = AffinitySimilarity(d, heads, mlp_layers=2, prior_prob=0.01)
    with torch.no_grad():
        fresh.mix.layers[-1].weight.zero_()
    torch.testing.assert_close(fresh(q, k).sigmoid(), torch.full((1, 3, 4), 0.01))


@pytest.mark.parametrize("refine", [True, False])
def test_affinity_refinement_accumulates_layer_logits(refine):
    cfg = AffinityConfig.tiny(use_affinity_refinement=refine)
    torch.manual_seed(0)
    model = AffinityHead(cfg).eval()
    per_layer = []
    hooks = [
        layer.affinity.register_forward_hook(lambda m, i, o: per_layer.append(o))
        for layer in model.layers
    ]
    batch = make_batch(cfg)
    with torch.no_grad():
        out = model.forward_batch(batch)
    for h in hooks:
        h.remove()
    assert len(per_layer) == cfg.num_decoder_layers
    for layer in range(cfg.num_decoder_layers):
        expected = sum(per_layer[: layer + 1]) if refine else per_layer[layer]
        torch.testing.assert_close(out.affinity_logits[layer], expected)
    # Every layer's (refined) score starts near the 0.01 prior.
    mean_prob = out.affinity_logits[:, 0].sigmoid().mean(dim=(1, 2))
    assert ((mean_prob > 0.002) & (mean_prob < 0.05)).all(), mean_prob


def test_dca_query_attends_only_to_its_positive_patches():
    cfg = AffinityConfig.tiny()
    torch.manual_seed(0)
    layer = AffinityDecoderLayer(cfg, cfg.prior_prob).eval()
    d, m, n = cfg.embed_dim, 3, 5
    queries, qpos = torch.randn(1, m, d), torch.randn(1, m, d)
    patches, ppos = torch.randn(1, n, d), torch.randn(1, n, d)
    qpad = torch.zeros(1, m, dtype=torch.bool)
    ppad = torch.zeros(1, n, dtype=torch.bool)
    block = torch.zeros(1, m, n, dtype=torch.bool)
    block[0, 0, 2:] = True  # query 0 may see patches 0 and 1 only
    block[0, 2, :] = True  # query 2 sees nothing: the guard lets it attend to all patches
    with torch.no_grad():
        ref, _ = layer(queries, qpos, qpad, patches, ppos, ppad, block)
        perturbed = patches.clone()
        perturbed[0, 3] += 5 * torch.randn(d)
        out, _ = layer(queries, qpos, qpad, perturbed, ppos, ppad, block)
        unmasked, _ = layer(queries, qpos, qpad, patches, ppos, ppad, None)
    torch.testing.assert_close(out[0, 0], ref[0, 0])  # blocked patch changed: query 0 unaffected
    assert (out[0, 1] - ref[0, 1]).abs().max() > 1e-3  # query 1 sees patch 3
    assert (out[0, 2] - ref[0, 2]).abs().max() > 1e-3
    torch.testing.assert_close(ref[0, 2], unmasked[0, 2])  # all-blocked row == no mask
    assert torch.isfinite(ref).all()


def test_padding_does_not_leak_and_batching_matches_single_images():
    cfg = AffinityConfig.tiny()
    torch.manual_seed(0)
    model = AffinityHead(cfg).eval()
    batch = make_batch(cfg)
    with torch.no_grad():
        out = model.forward_batch(batch)
        garbage = dict(batch)
        garbage["patch_boxes"] = batch["patch_boxes"].clone()
        garbage["patch_boxes"][1, -2:] = torch.tensor([1.0, 2.0, 30.0, 5.0])
        garbage["patch_masks"] = batch["patch_masks"].clone()
        garbage["patch_masks"][1, -2:] = 1.0
        out2 = model.forward_batch(garbage)
        n = int(batch["patch_valid"][1].sum())
        single = {
            "clip_feats": {k: v[1:2] for k, v in batch["clip_feats"].items()},
            "image_sizes": batch["image_sizes"][1:2],
            "patch_boxes": batch["patch_boxes"][1:2, :n],
            "patch_masks": batch["patch_masks"][1:2, :n],
            "patch_valid": batch["patch_valid"][1:2, :n],
            "text_embed": batch["text_embed"],
        }
        out1 = model.forward_batch(single)
    k = out.num_semantic
    rows = torch.cat([torch.arange(k), k + torch.arange(n)])
    torch.testing.assert_close(
        out2.affinity_logits[:, 1][:, rows, :n], out.affinity_logits[:, 1][:, rows, :n]
    )
    torch.testing.assert_close(out2.class_logits[:, 1][:, rows], out.class_logits[:, 1][:, rows])
    torch.testing.assert_close(
        out1.affinity_logits[:, 0], out.affinity_logits[:, 1][:, rows, :n], rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(
        out1.class_logits[:, 0], out.class_logits[:, 1][:, rows], rtol=1e-4, atol=1e-4
    )
    assert out.affinity_logits.shape == (cfg.num_decoder_layers, 2, k + 6, 6)
    assert out.class_logits.shape == (cfg.num_decoder_layers, 2, k + 6, k)
    assert out.query_valid[1].tolist() == [True] * (k + n) + [False] * (6 - n)


def test_images_without_patches_stay_finite():
    cfg = AffinityConfig.tiny()
    model = AffinityHead(cfg).eval()
    batch = make_batch(cfg)
    targets = make_targets(batch)[:1]
    batch["patch_valid"][1] = False
    with torch.no_grad():
        out = model.forward_batch(batch)
        empty = dict(
            batch,
            patch_boxes=batch["patch_boxes"][:, :0],
            patch_masks=batch["patch_masks"][:, :0],
            patch_valid=batch["patch_valid"][:, :0],
        )
        out0 = model.forward_batch(empty)
    assert torch.isfinite(out.affinity_logits).all() and torch.isfinite(out.class_logits).all()
    assert torch.isfinite(out0.class_logits).all() and out0.patch_valid.shape == (2, 1)
    targets.append(
        ImageTargets(
            inst_labels=torch.zeros(0, dtype=torch.long),
            inst_pos=torch.zeros(0, 0, dtype=torch.bool),
            inst_ignore=torch.zeros(0, 0, dtype=torch.bool),
            inst_boxes=torch.zeros(0, 4),
            inst_usable=torch.zeros(0, dtype=torch.bool),
            sem_pos=torch.zeros(4, 0, dtype=torch.bool),
            sem_ignore=torch.zeros(4, 0, dtype=torch.bool),
            sem_present=torch.zeros(4, dtype=torch.bool),
        )
    )
    losses = AffinityCriterion(cfg)(out, targets)
    assert torch.isfinite(losses["loss"])


def test_save_load_round_trip(tmp_path):
    cfg = AffinityConfig.tiny(tau=0.75)
    torch.manual_seed(0)
    model = build_head("affinity", cfg).eval()
    batch = make_batch(cfg)
    save_head(model, cfg, tmp_path / "head")
    assert (tmp_path / "head" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "head" / "config.json").read_text())
    assert meta["head"] == "affinity" and meta["config"]["tau"] == 0.75
    loaded, cfg2 = load_head(tmp_path / "head")
    assert cfg2 == cfg
    with torch.no_grad():
        a, b = model.forward_batch(batch), loaded.forward_batch(batch)
    torch.testing.assert_close(a.affinity_logits, b.affinity_logits)
    torch.testing.assert_close(a.class_logits, b.class_logits)
    with pytest.raises(FileNotFoundError):
        load_head(tmp_path / "nothing")


def test_config_dict_round_trip_and_registry():
    cfg = AffinityConfig.tiny(
        clip_levels=("clip_res4", "clip_res5"), clip_channels=(8, 16), clip_strides=(16, 32)
    )
    assert AffinityConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert hash(cfg) == hash(AffinityConfig.from_dict(cfg.to_dict()))
    assert build_config("affinity", cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown affinity config keys: bogus"):
        AffinityConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError):
        AffinityConfig(clip_channels=(1, 2))
    with pytest.raises(KeyError, match="unknown head"):
        build_head("nope", cfg)
    assert "affinity" in list_heads()
    assert isinstance(build_head("affinity", AffinityConfig.tiny().to_dict()), AffinityHead)


def test_two_level_features_run():
    cfg = AffinityConfig.tiny(
        clip_levels=("clip_res4", "clip_res5"), clip_channels=(8, 16), clip_strides=(4, 8)
    )
    model = AffinityHead(cfg).eval()
    batch = make_batch(AffinityConfig.tiny())
    batch["clip_feats"] = {
        "clip_res4": torch.randn(2, 8, 16, 16),
        "clip_res5": torch.randn(2, 16, 8, 8),
    }
    with torch.no_grad():
        out = model.forward_batch(batch)
    assert torch.isfinite(out.affinity_logits).all()
    with pytest.raises(KeyError, match="clip_res4"):
        model.forward_batch(dict(batch, clip_feats={"clip_res5": batch["clip_feats"]["clip_res5"]}))


def test_adam_steps_reduce_the_loss_on_a_fixed_batch():
    cfg = AffinityConfig.tiny()
    torch.manual_seed(0)
    model = AffinityHead(cfg).train()
    batch = make_batch(cfg)
    targets = make_targets(batch)
    criterion = AffinityCriterion(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(25):
        losses = criterion(model.forward_batch(batch), targets)
        opt.zero_grad()
        losses["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        history.append(float(losses["loss"].detach()))
    assert history[-1] < 0.6 * history[0], history


def test_open_vocab_fusion_and_clip_pooling():
    cls = torch.tensor([[0.0, 2.0, -1.0]])
    clip = torch.tensor([[1.0, 0.0, 3.0]])
    torch.testing.assert_close(open_vocab_scores(cls, clip, 0.0), cls.sigmoid())
    torch.testing.assert_close(open_vocab_scores(cls, clip, 1.0), clip.softmax(-1))
    expected = cls.sigmoid() ** 0.6 * clip.softmax(-1) ** 0.4
    torch.testing.assert_close(open_vocab_scores(cls, clip, 0.4), expected)
    torch.testing.assert_close(open_vocab_scores(cls, None, 0.4), cls.sigmoid())
    # Area-weighted pooling of member patches' CLIP embeddings.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    members = torch.tensor([[True, True, False], [False, False, True]])
    logits = query_clip_logits(members, emb, text, torch.tensor([3.0, 1.0, 1.0]), logit_scale=10.0)
    pooled = torch.nn.functional.normalize(torch.tensor([3.0, 1.0]), dim=0)
    torch.testing.assert_close(logits[0], 10 * pooled)
    torch.testing.assert_close(logits[1], torch.tensor([6.0, 8.0]))


def test_predict_image_hand_case():
    cfg = AffinityConfig.tiny(max_instances=2)
    k, p = 2, 3
    big = 8.0
    aff = torch.full((k + p, p), -big)
    aff[0, 0] = aff[0, 1] = big  # class 0 region: patches 0, 1
    aff[1, :] = -3.0  # class 1: nothing above min_affinity -> empty region
    aff[2, 0] = big  # instance query 0: patch 0
    aff[3, 1] = aff[3, 2] = big  # instance query 1: patches 1, 2
    # instance query 2 selects nothing.
    cls = torch.full((k + p, k), -big)
    cls[0, 0] = 2.0
    cls[1, 1] = -1.0
    cls[2, 1] = 1.0
    cls[3, 0] = 3.0
    cls[4, 0] = 5.0  # confident, but empty: never an instance
    valid = torch.ones(p, dtype=torch.bool)
    pred = predict_image(aff, cls, valid, k, cfg)
    assert pred.semantic_members.tolist() == [[True, True, False], [False, False, False]]
    torch.testing.assert_close(pred.semantic_scores, torch.tensor([2.0, -1.0]).sigmoid())
    assert pred.instance_queries.tolist() == [1, 0]
    assert pred.instance_labels.tolist() == [0, 1]
    torch.testing.assert_close(pred.instance_scores, torch.tensor([3.0, 1.0]).sigmoid())
    assert pred.instance_members.tolist() == [[False, True, True], [True, False, False]]
    # Restricting instances to class 0 (the thing classes) drops the class-1 instance.
    only0 = predict_image(aff, cls, valid, k, cfg, instance_classes=torch.tensor([True, False]))
    assert only0.instance_queries.tolist()[0] == 1 and only0.instance_labels.tolist() == [0, 0]
    # (query 0, class 0) is kept by the top-k with a near-zero score.
    assert float(only0.instance_scores[1]) < 1e-3
