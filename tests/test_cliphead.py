"""The frozen CLIP head stored in the cache, and SAM-CP's S_CLIP of merged segments pooled from the
dense map (issue 11 item 6)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from samcp.models.affinity.config import AffinityConfig
from samcp.models.affinity.model import dense_query_clip_embed
from samcp.models.affinity.plugin import AffinityPlugin, _dense_clip_fn
from samcp.models.cliphead import ClipHead, ClipHeadWeights
from samcp.models.heads import CompositionParams, InferContext
from samcp.pipeline.cache import CacheReader
from samcp.pipeline.clip import (
    TEST_MODEL_CONFIGS,
    ClipConfig,
    ClipFeatureExtractor,
    export_clip_head,
    register_test_models,
)
from samcp.pipeline.headdata import cache_info, image_inputs


def _model(name: str = "samcp-test-convnext", proj: str | None = None):
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    register_test_models()
    if proj is not None:
        cfg = copy.deepcopy(TEST_MODEL_CONFIGS[name])
        cfg["vision_cfg"]["timm_proj"] = proj
        name = f"{name}-{proj}-cliphead-test"
        _MODEL_CONFIGS[name] = cfg
    torch.manual_seed(0)
    return open_clip.create_model(name).eval(), name


@pytest.mark.parametrize("proj", [None, "linear"])
def test_clip_head_equals_the_models_own_head(proj):
    model, name = _model(proj=proj)
    weights = export_clip_head(model, 256)
    assert weights is not None and weights.kind == ("mlp" if proj is None else "linear")
    ext = ClipFeatureExtractor(ClipConfig(model=name, input_size=256), model=model)
    pooled = torch.randn(7, weights.in_channels) * 3
    want = ext.embed_pooled(pooled)
    got = ClipHead(weights)(pooled)
    assert got.shape == (7, weights.embed_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_clip_head_weights_refuse_missing_tensors():
    with pytest.raises(ValueError, match="lack fc1_weight"):
        ClipHeadWeights("mlp", 1e-5, {"norm_weight": np.ones(4), "norm_bias": np.zeros(4)}, 64)
    with pytest.raises(ValueError, match="kind"):
        ClipHeadWeights("attn", 1e-5, {}, 64)


def test_precompute_stores_the_head_and_it_reproduces_the_cached_embeddings(tiny_train_cache):
    folder, _, _ = tiny_train_cache
    reader = CacheReader(folder / "cache")
    weights = reader.clip_head()
    assert weights is not None and weights.input_size == 256 and weights.level == "clip_res5"
    assert cache_info(reader).clip_head is not None
    head = ClipHead(weights)
    row = next(reader.iter_images(arrays=["clip_res5", "clip_mask_embed"]))
    masks = torch.from_numpy(mask_utils.decode(row.rles).transpose(2, 0, 1).copy()).bool()
    dense = torch.from_numpy(np.asarray(row.image_arrays["clip_res5"]))
    got = head.embed_masks(dense, masks)
    cached = torch.from_numpy(np.asarray(row.mask_arrays["clip_mask_embed"])).float()
    # Same pooling and head; only the float16 storage of the map and embeddings differs.
    cos = (got * F.normalize(cached, dim=-1)).sum(-1)
    assert float(cos.min()) > 0.999


def _union_embed(head, dense, masks, members):
    union = (members.float() @ masks.flatten(1).float() > 0).view(-1, *masks.shape[1:])
    return head.embed_masks(dense, union)


def test_merged_segment_embedding_is_pooled_over_the_union_mask():
    model, _ = _model()
    head = ClipHead(export_clip_head(model, 64))
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(head.norm.normalized_shape[0], 2, 2, generator=g)
    masks = torch.zeros(3, 40, 48, dtype=torch.bool)
    masks[0, :20, :24] = True
    masks[1, 20:, :] = True
    masks[2, :20, 24:] = True
    members = torch.tensor(
        [[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool
    )
    out = dense_query_clip_embed(members, masks, dense, head, chunk=1)
    assert out.shape == (5, 32)
    torch.testing.assert_close(out[0], head.embed_masks(dense, masks[:1])[0])
    torch.testing.assert_close(out[1], _union_embed(head, dense, masks, members[1:2])[0])
    torch.testing.assert_close(out[4], _union_embed(head, dense, masks, members[4:5])[0])
    torch.testing.assert_close(out[1], out[3])  # same member set, same embedding
    assert torch.count_nonzero(out[2]) == 0  # no members: zero (uniform softmax after scaling)
    # Pooling the union is not the mean of the members' embeddings (the patch-mean fallback).
    mean = F.normalize(out[0] + head.embed_masks(dense, masks[1:2])[0], dim=-1)
    assert not torch.allclose(out[1], mean, atol=1e-3)


def _ctx(reader, k, merged_head=True):
    w = reader.clip_head()
    return InferContext(
        text_embed=torch.randn(k, 32),
        isthing=np.ones(k, bool),
        seen=np.ones(k, bool),
        params=CompositionParams(),
        device=torch.device("cpu"),
        clip_head=ClipHead(w) if merged_head else None,
    )


def test_affinity_infer_uses_the_dense_map_when_the_cache_has_a_head(tiny_train_cache):
    folder, _, _ = tiny_train_cache
    reader = CacheReader(folder / "cache")
    plugin = AffinityPlugin()
    cfg = AffinityConfig.from_dict(
        {**AffinityConfig.tiny().to_dict(), **plugin.configure({"multi_level": False},
                                                               cache_info(reader))}
    )
    image_arrays, mask_arrays = plugin.needs(cfg)
    row = next(reader.iter_images(arrays=[*image_arrays, *mask_arrays]))
    sample = plugin.sample(image_inputs(row), cfg, 50)
    fn = _dense_clip_fn(sample, cfg, _ctx(reader, 3))
    assert fn is not None
    n = sample.num_patches
    eye = torch.eye(n, dtype=torch.bool)
    singles = fn(eye)
    cached = F.normalize(sample.patch_clip_embed.float(), dim=-1)
    assert float((singles * cached).sum(-1).min()) > 0.999
    # Fallbacks: patch_mean asked for, no head in the cache, another CLIP geometry.
    assert _dense_clip_fn(sample, cfg, _ctx(reader, 3, merged_head=False)) is None
    pm = AffinityConfig.from_dict({**cfg.to_dict(), "merged_clip": "patch_mean"})
    assert _dense_clip_fn(sample, pm, _ctx(reader, 3)) is None
    other = AffinityConfig.from_dict({**cfg.to_dict(), "clip_input_size": 512})
    assert _dense_clip_fn(sample, other, _ctx(reader, 3)) is None


def test_merged_clip_is_validated_and_old_runs_keep_patch_mean():
    with pytest.raises(ValueError, match="merged_clip"):
        AffinityConfig.from_dict({**AffinityConfig.tiny().to_dict(), "merged_clip": "pooled"})
    assert AffinityConfig().merged_clip == "dense"
    assert AffinityPlugin.legacy_defaults["merged_clip"] == "patch_mean"
    assert "merged_clip" in AffinityPlugin.inference_fields


def test_rerunning_precompute_adds_the_head_to_an_older_cache(tiny_train_cache, tmp_path):
    import shutil

    from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
    from samcp.pipeline.proposals import ProposalConfig
    from samcp.pipeline.proposals.slic import SlicParams

    folder, data, clip_ckpt = tiny_train_cache
    cache = tmp_path / "cache"
    shutil.copytree(folder / "cache", cache)
    shutil.rmtree(cache / "clip_head")  # as written before the head was stored
    assert CacheReader(cache).clip_head() is None
    summary = run_precompute(
        PrecomputeConfig(
            source=str(data),
            out=str(cache),
            split="train2017",
            shard_size=2,
            proposals=ProposalConfig(source="slic", slic=SlicParams(n_segments=(12, 40))),
            num_workers=0,
            progress=False,
            clip=ClipConfig(model="samcp-test-convnext", checkpoint=str(clip_ckpt), input_size=256),
        )
    )
    assert summary.shards_done == 0 and summary.shards_skipped == summary.num_shards
    again = CacheReader(cache).clip_head()
    want = CacheReader(folder / "cache").clip_head()
    assert again is not None and again.kind == want.kind
    for k, v in want.tensors.items():
        np.testing.assert_array_equal(again.tensors[k], v)
