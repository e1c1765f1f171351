"""Frozen-CLIP features: loading through open_clip's real path, dense maps and FC-CLIP mask pooling."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from samcp.pipeline.clip import (
    LEVEL_STRIDES,
    ClipConfig,
    ClipFeatureExtractor,
    load_clip,
    make_random_clip_checkpoint,
)
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.foundation import file_sha256, make_random_sam_checkpoint
from samcp.pipeline.proposals.base import Proposals, encode_masks

TEST_MODEL = "samcp-test-convnext"
TEST_CHANNELS = {"res2": 24, "res3": 32, "res4": 48, "res5": 64}  # timm test_convnext dims
ALL_LEVELS = ("res2", "res3", "res4", "res5")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_random_clip_checkpoint(tmp_path_factory.mktemp("clip") / "clip_test.pt", TEST_MODEL)


@pytest.fixture(scope="module")
def extractor(ckpt):
    cfg = ClipConfig(model=TEST_MODEL, checkpoint=ckpt, input_size=128, levels=ALL_LEVELS)
    return ClipFeatureExtractor(cfg, "cpu")


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 120 + 60).astype(np.uint8)
    img[h // 4 : h // 2, w // 5 : w // 2] = [230, 30, 30]
    return img


def _masks(h: int, w: int) -> np.ndarray:
    """Everything, a big box, a disc, a 2x2 speck between cell centres, a 1-pixel speck."""
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((5, h, w), bool)
    m[0] = True
    m[1, h // 4 : 3 * h // 4, w // 8 : w // 2] = True
    m[2] = (yy - 0.6 * h) ** 2 + (xx - 0.7 * w) ** 2 < (0.2 * min(h, w)) ** 2
    m[3, 1:3, 1:3] = True
    m[4, h - 2, w // 2] = True
    return m


# --- an independent, plain computation of the documented rule -----------------------------------


def _resize_into_input(t: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> longer side `size` (bilinear, antialiased), zero-padded to size x size."""
    h0, w0 = t.shape[-2:]
    s = size / max(h0, w0)
    h, w = max(1, round(h0 * s)), max(1, round(w0 * s))
    if (h, w) != (h0, w0):
        t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return F.pad(t, (0, size - w, 0, size - h))


@torch.no_grad()
def _reference(model, image: np.ndarray, rles: list[dict], size: int):
    visual = model.visual
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    h0, w0 = image.shape[:2]
    s = size / max(h0, w0)
    h, w = max(1, round(h0 * s)), max(1, round(w0 * s))
    if (h, w) != (h0, w0):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(visual.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(visual.image_std).view(1, 3, 1, 1)
    x = F.pad((x - mean) / std, (0, size - w, 0, size - h))

    # FC-CLIP's extract_features_convnext: stem, the four stages, norm_pre.
    trunk = visual.trunk
    f = trunk.stem(x)
    stages = {}
    for i, stage in enumerate(trunk.stages):
        f = stage(f)
        stages[f"res{i + 2}"] = f[0]
    dense = trunk.norm_pre(f)[0]
    fh, fw = dense.shape[-2:]
    stride = size // fh

    embeds = []
    for rle in rles:
        m = torch.from_numpy(mask_utils.decode(rle).astype(np.float32))[None, None]
        m = _resize_into_input(m, size)
        wts = F.interpolate(m, size=(fh, fw), mode="bilinear", align_corners=False)[0, 0]
        if wts.sum() <= 0:  # documented fallback: fraction of each cell the mask covers
            wts = F.avg_pool2d(m, kernel_size=stride)[0, 0]
        pooled = (dense * wts).sum((1, 2)) / (wts.sum() + 1e-8)
        # FC-CLIP's visual_prediction_forward_convnext: trunk.head on a 1x1 map, then visual.head.
        e = visual.head(trunk.head(pooled.view(1, -1, 1, 1)))[0]
        embeds.append(e / e.norm())
    return stages, torch.stack(embeds)


# --- loading -------------------------------------------------------------------------------------


def test_load_goes_through_open_clip_and_equals_saved_weights(ckpt, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("open_clip was asked to download")

    import open_clip.factory

    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_download)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", no_download)
    calls = []
    real_create = open_clip.create_model

    def spy(name, *args, **kwargs):
        calls.append((name, kwargs.get("pretrained")))
        return real_create(name, *args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", spy)
    model, pp = load_clip(TEST_MODEL, ckpt)
    assert calls == [(TEST_MODEL, str(ckpt.resolve()))]
    saved = torch.load(ckpt, map_location="cpu")
    loaded = model.state_dict()
    assert saved.keys() == loaded.keys()
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tuple(pp["mean"]) == tuple(model.visual.image_mean)


def test_random_checkpoints_differ_by_seed(tmp_path, ckpt):
    other = make_random_clip_checkpoint(tmp_path / "other.pt", TEST_MODEL, seed=1)
    again = make_random_clip_checkpoint(tmp_path / "again.pt", TEST_MODEL, seed=0)
    a, b, c = (torch.load(p) for p in (ckpt, other, again))
    key = "visual.head.mlp.fc1.weight"
    assert not torch.equal(a[key], b[key])
    assert torch.equal(a[key], c[key])


def test_missing_checkpoint(tmp_path):
    with pytest.raises(SamcpError, match="not found.*--clip-checkpoint"):
        load_clip(TEST_MODEL, tmp_path / "nope.pt")


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(SamcpError, match="cannot read CLIP checkpoint"):
        load_clip(TEST_MODEL, bad)


def test_mismatched_checkpoints(tmp_path, ckpt):
    sam = make_random_sam_checkpoint(tmp_path / "sam.pth", "vit_test")
    with pytest.raises(SamcpError, match="does not fit --clip-model samcp-test-convnext"):
        load_clip(TEST_MODEL, sam)
    sd = torch.load(ckpt)
    sd["visual.head.mlp.fc2.weight"] = torch.zeros(16, 64)  # wrong embed_dim
    wrong = tmp_path / "wrong.pt"
    torch.save(sd, wrong)
    with pytest.raises(SamcpError, match="does not fit"):
        load_clip(TEST_MODEL, wrong)


def test_unknown_and_remote_model_names(ckpt):
    with pytest.raises(SamcpError, match="unknown CLIP model 'convnext_gigantic'"):
        load_clip("convnext_gigantic", ckpt)
    with pytest.raises(SamcpError, match="--clip-model"):
        load_clip("hf-hub:laion/CLIP-convnext_large_d_320", ckpt)


def test_test_model_is_registered_for_open_clip():
    import samcp.pipeline.clip  # noqa: F401  (registration is lazy, triggered by the calls above)

    ClipConfig(model=TEST_MODEL).cache_attrs("0" * 64)
    assert TEST_MODEL in open_clip.list_models()
    cfg = open_clip.get_model_config(TEST_MODEL)
    ref = open_clip.get_model_config("convnext_large_d_320")
    for key in ("timm_pool", "timm_proj", "timm_model_pretrained"):
        assert cfg["vision_cfg"][key] == ref["vision_cfg"][key]


# --- config --------------------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(SamcpError, match="res6"):
        ClipConfig(levels=("res5", "res6"))
    with pytest.raises(SamcpError, match="multiple of 32"):
        ClipConfig(input_size=1000)
    with pytest.raises(SamcpError, match="repeat"):
        ClipConfig(levels=("res5", "res5"))


def test_cache_attrs(ckpt):
    cfg = ClipConfig(model=TEST_MODEL, checkpoint=ckpt, input_size=128, levels=["res5", "res3"])
    attrs = cfg.cache_attrs()
    assert attrs["checkpoint_sha256"] == file_sha256(ckpt)
    assert attrs["levels"] == ["res3", "res5"]
    assert attrs["strides"] == {"res3": 8, "res5": 32}
    assert attrs["embed_dim"] == 32 and attrs["input_size"] == 128 and attrs["model"] == TEST_MODEL
    assert json.loads(json.dumps(attrs)) == attrs  # survives the zarr attrs round trip unchanged
    lean = ClipConfig(model=TEST_MODEL, checkpoint=ckpt, store_dense=False).cache_attrs("x")
    assert lean["levels"] == [] and lean["store_dense"] is False


# --- extraction ----------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(96, 80), (150, 200), (128, 128)])
def test_mask_embeddings_equal_plain_fcclip_pooling(extractor, hw):
    """Upscaled, downscaled (antialiased) and untouched images; big, tiny and 1-pixel masks."""
    h, w = hw
    image = _image(h, w)
    props = Proposals.from_rles(h, w, encode_masks(_masks(h, w)))
    image_arrays, mask_arrays = extractor.extract(image, props)
    emb = mask_arrays["clip_mask_embed"]
    assert emb.dtype == np.float16 and emb.shape == (len(props), 32)

    stages, ref = _reference(extractor.model, image, props.coco_rles(), 128)
    np.testing.assert_allclose(emb.astype(np.float32), ref.numpy(), atol=2e-3, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    for level in ALL_LEVELS:
        got = image_arrays[f"clip_{level}"]
        want = stages[level].numpy()
        assert got.dtype == np.float16 and got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-2, rtol=1e-2)
    # Different masks give different embeddings (nothing collapsed to one vector).
    assert np.abs(emb[0].astype(np.float32) - emb[2].astype(np.float32)).max() > 1e-2


def test_tiny_mask_falls_back_to_the_cells_it_covers(extractor):
    """A 2x2 speck misses every feature cell's sampling point; it must still pool its own cell."""
    h, w = 128, 128  # no resize: feature cells are exactly 32x32 pixels
    image = _image(h, w, seed=3)
    specks = np.zeros((3, h, w), bool)
    specks[0, 1:3, 1:3] = True  # inside cell (0, 0), far from its centre (15.5, 15.5)
    specks[1, 0:32, 0:32] = True  # the whole of cell (0, 0)
    specks[2, 97:99, 97:99] = True  # inside cell (3, 3)
    _, mask_arrays = extractor.extract(image, Proposals.from_rles(h, w, encode_masks(specks)))
    emb = mask_arrays["clip_mask_embed"].astype(np.float32)
    np.testing.assert_allclose(emb[0], emb[1], atol=2e-3)
    assert np.abs(emb[0] - emb[2]).max() > 1e-2


def test_full_mask_of_square_image_equals_open_clip_encode_image(extractor):
    """Pooling everything at the model's own geometry is CLIP's global average pool + head."""
    image = _image(128, 128, seed=5)
    props = Proposals.from_rles(128, 128, encode_masks(np.ones((1, 128, 128), bool)))
    _, mask_arrays = extractor.extract(image, props)
    x = extractor.preprocess(image)
    with torch.no_grad():
        want = extractor.model.encode_image(x, normalize=True)[0].numpy()
    np.testing.assert_allclose(
        mask_arrays["clip_mask_embed"][0].astype(np.float32), want, atol=2e-3
    )


def test_dense_shapes_follow_strides(ckpt):
    cfg = ClipConfig(model=TEST_MODEL, checkpoint=ckpt, input_size=192, levels=ALL_LEVELS)
    image_arrays, _ = ClipFeatureExtractor(cfg).extract(_image(60, 90), Proposals(60, 90))
    for level, stride in LEVEL_STRIDES.items():
        assert image_arrays[f"clip_{level}"].shape == (
            TEST_CHANNELS[level],
            192 // stride,
            192 // stride,
        )


def test_zero_proposals_and_no_dense(ckpt):
    cfg = ClipConfig(model=TEST_MODEL, checkpoint=ckpt, input_size=64, store_dense=False)
    image_arrays, mask_arrays = ClipFeatureExtractor(cfg).extract(_image(40, 50), Proposals(40, 50))
    assert image_arrays == {}
    assert mask_arrays["clip_mask_embed"].shape == (0, 32)
    assert mask_arrays["clip_mask_embed"].dtype == np.float16


def test_chunking_does_not_change_results(ckpt):
    h, w = 70, 90
    image = _image(h, w, seed=9)
    props = Proposals.from_rles(h, w, encode_masks(_masks(h, w)))
    outs = []
    for chunk in (1, 2, 64):
        cfg = ClipConfig(model=TEST_MODEL, checkpoint=ckpt, input_size=96, mask_chunk=chunk)
        outs.append(ClipFeatureExtractor(cfg).extract(image, props)[1]["clip_mask_embed"])
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0].astype(np.float32), outs[2].astype(np.float32), atol=1e-3)


def test_bad_inputs(extractor):
    with pytest.raises(SamcpError, match="proposals are for a 10x10 image"):
        extractor.extract(_image(20, 20), Proposals(10, 10))
    with pytest.raises(SamcpError, match="HxWx3 uint8"):
        extractor.extract(np.zeros((20, 20), np.uint8), Proposals(20, 20))


def test_vit_towers_are_refused_with_the_supported_list():
    vit = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    )
    with pytest.raises(SamcpError, match="VisionTransformer image tower.*timm ConvNeXt"):
        ClipFeatureExtractor(ClipConfig(model="ViT-B-16"), model=vit)
