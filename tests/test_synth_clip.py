"""samcp's synthetic-world CLIP: trained through the cache's own pooling path, loadable through
open_clip like any checkpoint, reproducible for a seed, and it classifies cached masks zero-shot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from samcp.cli.main import main
from samcp.pipeline.clip import (
    TEST_MODEL_CONFIGS,
    ClipConfig,
    ClipFeatureExtractor,
    load_clip,
    make_random_clip_checkpoint,
    register_test_models,
)
from samcp.pipeline.datasets import CocoPanopticDataset, load_image_rgb
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
from samcp.pipeline.proposals import ProposalConfig
from samcp.pipeline.proposals.slic import SlicGenerator
from samcp.pipeline.synth import make_synthetic_dataset
from samcp.pipeline.synthclip import (
    SYNTH_CLIP_MODEL,
    assign_superpixels,
    region_embeddings,
    region_text_loss,
    train_synth_clip,
    zero_shot_mask_accuracy,
)


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory) -> Path:
    """4 train + 2 val synthetic images of 96 x 128 (read-only for tests)."""
    root = tmp_path_factory.mktemp("synthclip")
    return make_synthetic_dataset(
        root / "syn", seed=3, num_train=4, num_val=2, height=96, width=128
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_synth, tmp_path_factory) -> Path:
    """A synthetic CLIP trained for 2 steps at 128 px on 2 images."""
    out = tmp_path_factory.mktemp("ckpt") / "clip.pt"
    train_synth_clip(tiny_synth, out, steps=2, input_size=128, limit=2, progress=False)
    return out


def _random_model(seed: int = 0) -> torch.nn.Module:
    register_test_models()
    torch.manual_seed(seed)
    return open_clip.create_model(SYNTH_CLIP_MODEL)


def test_shipped_config_has_convnext_large_d_layout():
    register_test_models()
    assert SYNTH_CLIP_MODEL in open_clip.list_models()
    vision = open_clip.get_model_config(SYNTH_CLIP_MODEL)["vision_cfg"]
    reference = open_clip.get_model_config("convnext_large_d_320")["vision_cfg"]
    for key in ("timm_pool", "timm_proj"):
        assert vision[key] == reference[key]
    assert TEST_MODEL_CONFIGS[SYNTH_CLIP_MODEL]["vision_cfg"]["timm_model_name"] == "test_convnext"


def test_assign_superpixels_by_iop():
    seg = np.zeros((4, 4), np.int32)
    seg[:, :2] = 1  # segment 0: left half
    seg[:, 2:] = 2  # segment 1: right half
    seg[0, :] = 0  # void top row
    masks = np.zeros((4, 4, 4), bool)
    masks[0, 1:, :2] = True  # all in segment 0
    masks[1, 1:, 1:3] = True  # half / half: IoP 0.5 each, the first segment wins the tie
    masks[2, :2, 2:] = True  # 2 void + 2 segment-1 pixels: IoP exactly 0.5
    masks[3, 0, :] = True  # all void
    assert assign_superpixels(seg, masks).tolist() == [0, 0, 1, -1]
    assert assign_superpixels(seg, masks, min_iop=0.6).tolist() == [0, -1, -1, -1]
    assert assign_superpixels(np.zeros((4, 4), np.int32), masks).tolist() == [-1] * 4


def test_region_text_loss_weights_and_symmetric_term():
    captions = torch.eye(3)[None].repeat(2, 1, 1)  # two draws, class k's caption = e_k
    regions = torch.eye(3)[[0, 0, 1, 2]]
    target = torch.tensor([0, 0, 1, 2])
    aligned, logits = region_text_loss(regions, captions, target, 10.0)
    shuffled, _ = region_text_loss(regions, captions, target.roll(1), 10.0)
    # Image->text is ~0; text->image: class 0 has two equally good regions, so its caption can
    # give each at most 1/2, a floor of ln(2) for that class (mean over the 3 classes).
    assert abs(aligned - math.log(2) / 3) < 0.01 and shuffled > 1.0
    only_i2t, _ = region_text_loss(regions, captions, target, 10.0, text_to_region=False)
    assert only_i2t < 0.01
    assert logits.shape == (4, 3) and not logits.requires_grad
    # Image->text only, with class weights: sum_i w[y_i] * ce_i / sum_i w[y_i], by hand.
    regions = torch.nn.functional.normalize(
        torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=1
    )
    weight = torch.tensor([0.5, 2.0, 1.0])
    loss, _ = region_text_loss(regions, captions, target, 5.0, weight, text_to_region=False)
    ce = -torch.log_softmax(5.0 * regions @ torch.eye(3), dim=1)[torch.arange(4), target]
    torch.testing.assert_close(loss, (weight[target] * ce).sum() / weight[target].sum())


def test_training_path_equals_the_cache_path(tiny_synth):
    """region_embeddings (what training differentiates) gives the extractor's clip_mask_embed."""
    extractor = ClipFeatureExtractor(
        ClipConfig(model=SYNTH_CLIP_MODEL, input_size=128, store_dense=False), model=_random_model()
    )
    rec = CocoPanopticDataset(tiny_synth, "train2017").records[0]
    image = load_image_rgb(rec.file_name)
    proposals = SlicGenerator().generate(image)
    _, mask_arrays = extractor.extract(image, proposals)
    dense, _ = extractor.dense_features(image)
    cache_path = extractor.mask_embeddings(dense, proposals)
    weights = extractor.mask_weights(torch.from_numpy(proposals.decode()), tuple(dense.shape[1:]))
    with torch.enable_grad():
        trained = region_embeddings(extractor, [image, image], [weights, weights[:3]])
    assert trained.shape == (len(proposals) + 3, 64)
    torch.testing.assert_close(trained[: len(proposals)].detach(), cache_path, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        trained[len(proposals) :].detach(), cache_path[:3], atol=1e-5, rtol=0
    )
    stored = torch.from_numpy(mask_arrays["clip_mask_embed"]).float()
    torch.testing.assert_close(trained[: len(proposals)].detach(), stored, atol=2e-3, rtol=0)


def test_checkpoint_loads_through_open_clip_and_load_clip(tiny_checkpoint):
    saved = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    register_test_models()
    model = open_clip.create_model(SYNTH_CLIP_MODEL, pretrained=str(tiny_checkpoint))
    loaded, preprocess = load_clip(SYNTH_CLIP_MODEL, tiny_checkpoint)
    assert set(preprocess) >= {"mean", "std"}
    for m in (model, loaded):
        state = m.state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k], saved[k]) for k in saved)
    # Training changed the weights (the same seed's random init differs from the result).
    init = _random_model(0).state_dict()
    assert any(not torch.equal(init[k], saved[k]) for k in saved)
    assert not list(tiny_checkpoint.parent.glob(".*tmp*"))  # the temporary file was renamed


def test_training_is_reproducible_for_a_seed(tiny_synth, tiny_checkpoint, tmp_path):
    again = train_synth_clip(
        tiny_synth, tmp_path / "again.pt", steps=2, input_size=128, limit=2, progress=False
    )
    assert (tmp_path / "again.pt").read_bytes() == tiny_checkpoint.read_bytes()
    other = train_synth_clip(
        tiny_synth,
        tmp_path / "other.pt",
        steps=2,
        input_size=128,
        limit=2,
        seed=1,
        progress=False,
    )
    assert other.checkpoint_sha256 != again.checkpoint_sha256
    assert again.images == 2 and again.classes == 11 and again.names == 32
    assert again.gt_regions > 0 and again.superpixel_regions > again.gt_regions


def test_zero_shot_accuracy_reads_the_cache_and_checks_its_checkpoint(
    tiny_synth, tiny_checkpoint, tmp_path
):
    cache = tmp_path / "cache.zarr"
    run_precompute(
        PrecomputeConfig(
            source=str(tiny_synth),
            out=str(cache),
            split="val2017",
            proposals=ProposalConfig(source="slic"),
            num_workers=0,
            progress=False,
            clip=ClipConfig(
                model=SYNTH_CLIP_MODEL, checkpoint=str(tiny_checkpoint), input_size=128
            ),
        )
    )
    result = zero_shot_mask_accuracy(tiny_synth, cache, tiny_checkpoint)
    val = CocoPanopticDataset(tiny_synth, "val2017")
    want = sum(len(val.load_panoptic(r.image_id)[1]) for r in val.records)
    assert result.segments == want
    assert 0.0 <= result.accuracy <= 1.0 and 0.0 < result.mean_best_iou <= 1.0
    other = make_random_clip_checkpoint(tmp_path / "other.pt", SYNTH_CLIP_MODEL)
    with pytest.raises(SamcpError, match="is not the CLIP checkpoint"):
        zero_shot_mask_accuracy(tiny_synth, cache, other)


def test_cli_trains_and_writes_the_checkpoint(tiny_synth, tmp_path, capsys):
    out = tmp_path / "sub" / "clip.pt"
    options = "--steps 1 --input-size 128 --no-progress".split()
    main(["synth-clip", str(tiny_synth), "--out", str(out), *options])
    stdout = capsys.readouterr().out
    assert f"--clip-model {SYNTH_CLIP_MODEL} --clip-checkpoint {out}" in stdout
    model, _ = load_clip(SYNTH_CLIP_MODEL, out)
    assert model.visual.trunk.stages[-1].blocks[0].conv_dw.weight.shape[0] == 64


def test_cli_defaults_are_the_library_defaults():
    from samcp.cli import synth_clip as cli_module
    from samcp.pipeline import synthclip

    for name in ("SYNTH_CLIP_MODEL", "DEFAULT_STEPS", "DEFAULT_BATCH_SIZE", "DEFAULT_INPUT_SIZE"):
        assert getattr(cli_module, name) == getattr(synthclip, name), name


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing dataset", "does not exist"),
        ("dataset is a file", "is not a folder"),
        ("out is a folder", "is a folder"),
        ("out under a file", "lies under the file"),
        ("input size", "not a positive multiple of 32"),
        ("steps", "--steps must be at least 1"),
        ("no annotations", "panoptic annotations"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(case, needle, tiny_synth, tmp_path, capsys):
    dataset, out, extra = str(tiny_synth), tmp_path / "clip.pt", []
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    if case == "missing dataset":
        dataset = str(tmp_path / "nope")
    elif case == "dataset is a file":
        dataset = str(blocker)
    elif case == "out is a folder":
        out = tmp_path
    elif case == "out under a file":
        out = blocker / "clip.pt"
    elif case == "input size":
        extra = ["--input-size", "100"]
    elif case == "steps":
        extra = ["--steps", "0"]
    elif case == "no annotations":
        dataset = str(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["synth-clip", dataset, "--out", str(out), "--no-progress", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err
    assert not (tmp_path / "clip.pt").exists()
    assert not list(tmp_path.glob(".clip.pt.tmp*"))


def test_library_refuses_an_unknown_model(tiny_synth, tmp_path):
    with pytest.raises(SamcpError, match="unknown CLIP model 'nope'"):
        train_synth_clip(tiny_synth, tmp_path / "c.pt", model_name="nope", progress=False)
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.slow
def test_zero_shot_mask_classification_beats_a_random_clip(tmp_path):
    """Train on a small set, cache its val split with SLIC + the trained CLIP, classify each
    segment's best proposal against the 11 class texts: far above chance (9%) and a random CLIP.

    512 px keeps things 1.5-4.5 feature cells across (3-9 at the demo's 1024) at a quarter of the
    cost; 150 steps take about 25 s on two idle cores and reach 84% here (91% at 250 steps).
    """
    data = make_synthetic_dataset(
        tmp_path / "syn", seed=5, num_train=16, num_val=6, height=96, width=128
    )
    size = 512
    trained = tmp_path / "synth.pt"
    train_synth_clip(data, trained, steps=150, input_size=size, progress=False)
    random = make_random_clip_checkpoint(tmp_path / "random.pt", SYNTH_CLIP_MODEL, seed=0)
    acc = {}
    for name, ckpt in (("trained", trained), ("random", random)):
        cache = tmp_path / f"cache_{name}.zarr"
        run_precompute(
            PrecomputeConfig(
                source=str(data),
                out=str(cache),
                split="val2017",
                shard_size=4,
                proposals=ProposalConfig(source="slic"),
                num_workers=0,
                progress=False,
                clip=ClipConfig(model=SYNTH_CLIP_MODEL, checkpoint=str(ckpt), input_size=size),
            )
        )
        acc[name] = zero_shot_mask_accuracy(data, cache, ckpt)
    print(json.dumps({k: v.to_dict() for k, v in acc.items()}, indent=1))
    assert acc["trained"].segments == acc["random"].segments > 30
    assert acc["trained"].accuracy >= 0.7
    assert acc["trained"].primary_name_accuracy >= 0.7
    assert acc["trained"].synonym_accuracy >= 0.7
    assert acc["trained"].accuracy >= acc["random"].accuracy + 0.4


def test_an_existing_checkpoint_is_replaced_only_with_overwrite(tiny_synth, tmp_path):
    out = tmp_path / "mine.pt"
    out.write_bytes(b"someone's file")
    kw = dict(steps=2, input_size=128, limit=2, progress=False)
    with pytest.raises(SamcpError, match="--overwrite"):
        train_synth_clip(tiny_synth, out, **kw)
    assert out.read_bytes() == b"someone's file"
    train_synth_clip(tiny_synth, out, overwrite=True, **kw)
    assert out.read_bytes() != b"someone's file"


def test_a_batch_larger_than_the_training_set_is_refused(tiny_synth, tmp_path):
    with pytest.raises(SamcpError, match="--batch-size 3 is more than the 2 training images"):
        train_synth_clip(
            tiny_synth, tmp_path / "c.pt", steps=1, input_size=128, limit=2, batch_size=3,
            progress=False,
        )
    assert not (tmp_path / "c.pt").exists()
