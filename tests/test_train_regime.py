"""The training regime (issue 11, item 5): epochs and the code's LR schedule, per-head optimiser
defaults, and the affinity head's rescale + crop augmentation on the cached maps.

The crop test is the issue's: a crop of a cached image gives the same MaskRoI features as the
uncropped image on the kept region (patches fully inside the window), with masks and ground truth
carried along consistently.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from safetensors.torch import load_file

from samcp.models.affinity import AffinityConfig
from samcp.models.affinity.augment import ScaleCrop, draw_scale_crop, scale_crop_sample
from samcp.models.affinity.data import make_sample
from samcp.models.affinity.model import build_affinity_head
from samcp.models.affinity.targets import patch_mask_crops
from samcp.models.heads import GroundTruth, ImageInputs
from samcp.models.registry import get_head
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.train import (
    EPOCHS_LR_DROP,
    CacheSampler,
    TrainConfig,
    epochs_to_steps,
    lr_milestones,
    resolve_train_config,
    run_training,
)

# ---- epochs, LR milestones -------------------------------------------------------------------


def _plain(**kw) -> TrainConfig:
    return TrainConfig(cache="c", dataset="d", out="o", **kw)


def test_epochs_become_steps_and_the_lr_drops_at_8_and_11_twelfths():
    assert epochs_to_steps(12, 100, 4) == 300
    assert lr_milestones(EPOCHS_LR_DROP, 300) == [200, 275]  # after epochs 8 and 11 of 12
    assert epochs_to_steps(1, 10, 4) == 3  # a partial last batch still counts
    assert epochs_to_steps(12, 118287, 32) == 44358  # COCO train2017, the paper's batch 32
    assert lr_milestones(EPOCHS_LR_DROP, 44358) == [29572, 40661]
    assert lr_milestones((0.8,), 2000) == [1600]
    assert lr_milestones((0.5,), 1) == [1]  # never step 0

    # Epochs: steps from the image count and the global batch; the code's two drops.
    r = resolve_train_config(_plain(epochs=12, batch_size=4), num_images=100, world_size=2)
    assert r.steps == 150 and r.epochs == 12 and r.lr_drop == EPOCHS_LR_DROP
    # Steps (or nothing): the old default and one drop at 80%.
    r = resolve_train_config(_plain(), num_images=100)
    assert r.steps == 2000 and r.epochs is None and r.lr_drop == (0.8,)
    r = resolve_train_config(_plain(steps=10), num_images=100)
    assert r.steps == 10 and r.lr_drop == (0.8,)
    # The user's lr_drop wins over either schedule.
    r = resolve_train_config(_plain(epochs=2, lr_drop=(0.5,)), num_images=8)
    assert r.steps == 4 and r.lr_drop == (0.5,) and lr_milestones(r.lr_drop, r.steps) == [2]


def test_steps_and_epochs_are_exclusive():
    with pytest.raises(SamcpError, match="not both"):
        _plain(steps=10, epochs=2).validate()
    with pytest.raises(SamcpError, match="epochs"):
        _plain(epochs=0).validate()
    with pytest.raises(SamcpError, match="epochs"):
        _plain(epochs=1.5).validate()


def test_the_command_line_length_replaces_the_files(tmp_path, monkeypatch, capsys):
    import samcp.pipeline.train as train
    from samcp.cli.main import main

    seen = []
    monkeypatch.setattr(
        train,
        "run_training",
        lambda cfg, resume=False: (
            seen.append(cfg) or {"run": cfg.out, "steps_done": 0, "images_per_s": 0.0, "last": {}}
        ),
    )
    yaml = tmp_path / "run.yaml"
    yaml.write_text("steps: 100\nweight_decay: 0.01\n")
    base = ["train", "--cache", "c", "--dataset", "d", "--out", str(tmp_path / "r")]
    main([*base, "--config", str(yaml), "--epochs", "3"])
    assert (seen[-1].epochs, seen[-1].steps, seen[-1].weight_decay) == (3, None, 0.01)
    main([*base, "--config", str(yaml), "--weight-decay", "0.2"])
    assert (seen[-1].steps, seen[-1].weight_decay) == (100, 0.2)
    main(base)
    assert (seen[-1].steps, seen[-1].epochs, seen[-1].weight_decay, seen[-1].lr) == (None,) * 4


# ---- per-head optimiser defaults ----------------------------------------------------------------


def test_weight_decay_is_the_heads_unless_the_user_sets_it():
    assert get_head("affinity").train_defaults["weight_decay"] == 1e-4  # the authors' code
    aff = resolve_train_config(_plain(head="affinity"), num_images=4)
    assert aff.weight_decay == 1e-4 and aff.lr == 2e-4 and aff.clip_grad == 0.1
    pos = resolve_train_config(_plain(head="possam"), num_images=4)
    assert pos.weight_decay == 0.05  # PosSAM's paper
    user = resolve_train_config(_plain(head="affinity", weight_decay=0.05, lr=1e-3), 4)
    assert user.weight_decay == 0.05 and user.lr == 1e-3
    zero = resolve_train_config(_plain(head="affinity", weight_decay=0.0), 4)
    assert zero.weight_decay == 0.0  # an explicit 0 is a value, not "unset"


# ---- runs on the tiny cache ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMCP_CACHE_DIR", str(tmp_path / "samcp-cache"))


def _cfg(setup, out, **kw) -> TrainConfig:
    root, data, clip_ckpt = setup
    kw.setdefault("batch_size", 2)
    return TrainConfig(
        cache=str(root / "cache"),
        dataset=str(data),
        out=str(out),
        preset="tiny",
        clip_checkpoint=str(clip_ckpt),
        log_every=1,
        ckpt_every=4,
        progress=False,
        **kw,
    )


def test_a_run_writes_its_resolved_regime(tiny_train_cache, tmp_path):
    run = tmp_path / "run"
    summary = run_training(_cfg(tiny_train_cache, run, epochs=1))
    assert summary["steps_done"] == 2  # 4 cached images, 2 a step
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["epochs"] == 1 and saved["steps"] == 2
    assert saved["weight_decay"] == 1e-4 and saved["lr"] == 2e-4
    assert saved["lr_drop"] == pytest.approx(list(EPOCHS_LR_DROP))
    assert saved["defaults_from"] == {
        "lr": "head",
        "weight_decay": "head",
        "clip_grad": "head",
        "lr_drop": "samcp",
        "steps": "epochs",
    }
    assert saved["head_config"]["scale_crop_aug"] is True
    state = torch.load(run / "checkpoints" / "step_0000002" / "train_state.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 1e-4
    # The user's value is what the optimiser gets; resuming with another one is refused.
    run2 = tmp_path / "run2"
    run_training(_cfg(tiny_train_cache, run2, steps=1, weight_decay=0.05))
    saved = json.loads((run2 / "train_config.json").read_text())
    assert saved["weight_decay"] == 0.05 and "weight_decay" not in saved["defaults_from"]
    with pytest.raises(SamcpError, match="weight_decay"):
        run_training(_cfg(tiny_train_cache, run2, steps=1), resume=True)
    with pytest.raises(SamcpError, match="epochs"):
        run_training(_cfg(tiny_train_cache, run, epochs=2), resume=True)


def test_resume_by_epochs_with_augmentation_is_exact(tiny_train_cache, tmp_path):
    """The uninterrupted and the interrupted + resumed run reach the same weights: crops, scales
    and flips are drawn from (seed, epoch, step, position), not from a running generator."""
    kw = dict(epochs=4, lr=1e-3)  # 8 steps; the rescale + crop is on (the default)
    run_training(_cfg(tiny_train_cache, tmp_path / "a", **kw))
    run_training(_cfg(tiny_train_cache, tmp_path / "b", **kw), stop_after=4)
    assert not (tmp_path / "b" / "model").exists()
    run_training(_cfg(tiny_train_cache, tmp_path / "b", **kw), resume=True)
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    # Milestones 5 and 7 (floor(8/12 * 8), floor(11/12 * 8)): the logged lr after each step.
    assert lrs == pytest.approx([1e-3] * 4 + [1e-4] * 2 + [1e-5] * 2)


def _sampler(setup, tmp_path, **kw) -> CacheSampler:
    from samcp.pipeline.cache import CacheReader
    from samcp.pipeline.datasets import CocoPanopticDataset
    from samcp.pipeline.headdata import ClassSpace
    from samcp.pipeline.train import head_config_for_cache

    cfg = _cfg(setup, tmp_path / "unused", steps=4, **kw)
    reader = CacheReader(cfg.cache)
    dataset = CocoPanopticDataset(Path(cfg.dataset), cfg.split or "train2017")
    return CacheSampler(
        reader, dataset, ClassSpace(dataset.categories), head_config_for_cache(cfg, reader), cfg
    )


def _fingerprint(samples) -> list:
    out = []
    for s in samples:
        t = s.targets
        out.append(
            (
                s.image_id,
                s.height,
                s.width,
                s.flipped,
                s.patch_boxes.numpy().round(4).tobytes(),
                s.patch_masks.numpy().round(4).tobytes(),
                {k: v.float().numpy().round(3).tobytes() for k, v in s.clip_feats.items()},
                t.inst_pos.numpy().tobytes(),
                t.inst_boxes.numpy().round(5).tobytes(),
                t.sem_pos.numpy().tobytes(),
            )
        )
    return out


def test_augmentation_is_a_function_of_the_seed_and_the_step(tiny_train_cache, tmp_path):
    first = _sampler(tiny_train_cache, tmp_path)
    again = _sampler(tiny_train_cache, tmp_path)
    other = _sampler(tiny_train_cache, tmp_path, seed=1)
    a = [(step, _fingerprint(b)) for step, b in zip(range(6), (x for _, x in first.batches(0)))]
    b = [(step, _fingerprint(b)) for step, b in zip(range(6), (x for _, x in again.batches(0)))]
    assert a == b
    # Starting at a later step (resume) gives that step's batch, augmentation included.
    later = next(iter(again.batches(3)))[1]
    assert _fingerprint(later) == a[3][1]
    # Another seed draws other windows, and the augmentation does change the images.
    c = [(step, _fingerprint(b)) for step, b in zip(range(6), (x for _, x in other.batches(0)))]
    assert a != c
    sizes = {(s[1], s[2]) for _, batch in a for s in batch}
    assert len(sizes) > 1, sizes  # not every image kept its 96 x 128 geometry
    # Off: the samples are the memoised ones (flips aside).
    plain = _sampler(tiny_train_cache, tmp_path, flip=False)
    plain.head_cfg = replace(plain.head_cfg, scale_crop_aug=False)
    for s in next(iter(plain.batches(0)))[1]:
        assert (s.height, s.width) == (96, 128) and not s.flipped


# ---- the crop keeps features, masks and ground truth aligned ------------------------------------

H, W = 96, 128
CLIP_SIZE, STRIDE, CHANNELS, TEXT = 256, 8, 16, 12


def _smooth_map(rng) -> np.ndarray:
    """(C, 32, 32) features that vary smoothly over the frame (period >= 20 cells), zero on the
    padding below the 96 x 128 image (rows >= 24 of the 32)."""
    cells = CLIP_SIZE // STRIDE
    y, x = np.meshgrid(np.arange(cells) + 0.5, np.arange(cells) + 0.5, indexing="ij")
    f = np.zeros((CHANNELS, cells, cells), np.float32)
    for c in range(CHANNELS):
        a, b = rng.uniform(-1, 1, 2) * 2 * np.pi / 20
        f[c] = np.sin(a * x + b * y + rng.uniform(0, 2 * np.pi)) + 0.5 * np.cos(b * x - a * y)
    f[:, round(H / W * cells) :] = 0
    return f.astype(np.float16)


def _rle(m: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))


def _rect(x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _disc(cx, cy, r) -> np.ndarray:
    y, x = np.mgrid[:H, :W]
    return ((x - cx) ** 2 + (y - cy) ** 2 <= r * r).astype(np.uint8)


def _config() -> AffinityConfig:
    return AffinityConfig.tiny(
        clip_levels=("clip_res5",),
        clip_channels=(CHANNELS,),
        clip_strides=(STRIDE,),
        clip_input_size=CLIP_SIZE,
        text_dim=TEXT,
        roi_size=7,
    )


@pytest.fixture(scope="module")
def image():
    """A cached image: smooth maps, 7 patches (some inside the window below, one outside, two cut
    by it) and 4 GT segments (2 thing instances, 2 stuff)."""
    rng = np.random.default_rng(0)
    patches = [
        _rect(40, 30, 60, 50),  # inside
        _disc(80, 45, 9),  # inside
        _rect(30, 20, 50, 40) * (1 - _disc(45, 35, 5)),  # inside, with a hole
        _rect(100, 10, 120, 30),  # outside (right of the window)
        _rect(5, 60, 40, 80),  # cut by the window's left edge
        _disc(95, 75, 8),  # cut by the window's right/bottom edges
        _rect(62, 52, 75, 70),  # inside
    ]
    gt_masks = [_rect(40, 30, 60, 50), _disc(80, 45, 9), _rect(100, 5, 125, 35)]
    stuff = np.ones((H, W), np.uint8)
    for m in gt_masks:
        stuff = stuff * (1 - m)
    gt = GroundTruth(
        rles=[_rle(m) for m in gt_masks] + [_rle(stuff)],
        labels=np.array([0, 1, 1, 2]),
        iscrowd=np.zeros(4, bool),
        isthing=np.array([True, True, False]),
    )
    rles = [_rle(m) for m in patches]
    inputs = ImageInputs(
        image_id="img",
        height=H,
        width=W,
        image_arrays={"clip_res5": _smooth_map(rng)},
        rles=rles,
        boxes=mask_utils.toBbox(rles).astype(np.float32),
        areas=mask_utils.area(rles).astype(np.int64),
        mask_arrays={"clip_mask_embed": rng.standard_normal((7, TEXT)).astype(np.float16)},
    )
    return inputs, gt, patches


WINDOW = (20, 15, 80, 60)  # x0, y0, w, h: keeps x in [20, 100), y in [15, 75)


def _maskroi(model, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's MaskRoI features of every patch as its forward pass pools them: the RoI cells
    times the mask crop (the input of the RoI MLP) and the encoder's feature (its LayerNorm)."""
    from samcp.models.affinity.data import collate

    seen: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(_module, inputs, output):
            seen.setdefault(name, (inputs[0] if name == "pooled" else output).detach())

        return hook

    enc = model.patch_encoder
    hooks = [
        enc.roi_mlp.register_forward_hook(grab("pooled")),
        enc.roi_norm.register_forward_hook(grab("feature")),
    ]
    try:
        with torch.no_grad():
            model(**collate(samples, torch.randn(3, TEXT), "cpu"))
    finally:
        for h in hooks:
            h.remove()
    return seen["pooled"], seen["feature"]


@pytest.mark.parametrize(
    "size",
    [(60, 80), (75, 100), (100, 133)],
    ids=["crop-r1-zoom1.6", "crop-r0.8-zoom1.28", "crop-r0.6-zoom0.96"],
)
def test_a_crop_gives_the_same_maskroi_features_on_the_kept_region(image, size):
    inputs, gt, _ = image
    config = _config()
    s = make_sample(inputs, config, 100, gt)
    aug = ScaleCrop(WINDOW, size)
    c, keep = scale_crop_sample(s, aug, config)
    assert keep.tolist() == [0, 1, 2, 4, 5, 6]  # the patch right of the window is dropped
    assert (c.height, c.width) == size
    inside = [0, 1, 2, 6]  # patches entirely inside the window
    torch.manual_seed(0)
    model = build_affinity_head(config).eval()
    pooled_a, feat_a = _maskroi(model, [s])
    pooled_b, feat_b = _maskroi(model, [c])
    rows_b = [keep.tolist().index(i) for i in inside]
    a, b = pooled_a[inside], pooled_b[rows_b]
    rel = (a - b).norm(dim=1) / a.norm(dim=1)
    # Bilinear resampling of the map, then RoIAlign: close (0.2-0.5% here), not equal.
    assert rel.max() < 0.02, rel
    torch.testing.assert_close(feat_b[rows_b], feat_a[inside], atol=0.03, rtol=0)
    # The tolerance is tight: the same crop with its maps one cell off is far outside it.
    off = replace(c, clip_feats={k: v.roll(1, dims=-1) for k, v in c.clip_feats.items()})
    pooled_off = _maskroi(model, [off])[0][rows_b]
    assert ((a - pooled_off).norm(dim=1) / a.norm(dim=1)).min() > 0.05
    # The inside patches keep their mask crops; their boxes move with the window.
    torch.testing.assert_close(c.patch_masks[rows_b], s.patch_masks[inside])
    shifted = s.patch_boxes[inside] - torch.tensor([WINDOW[0], WINDOW[1], 0, 0])
    torch.testing.assert_close(c.patch_boxes[rows_b], shifted)


def test_a_crop_carries_masks_and_ground_truth_along(image):
    inputs, gt, patches = image
    config = _config()
    s = make_sample(inputs, config, 100, gt)
    c, keep = scale_crop_sample(s, ScaleCrop(WINDOW, (75, 100)), config)
    x0, y0, w, h = WINDOW
    # Patches cut by the window: boxes clipped to it (within a pixel of the cropped mask's own box:
    # a clipped box is not re-tightened, as in the authors' code) and re-cropped masks that match
    # the crop of the cropped mask in that box, up to the resolution of the 7 x 7 crop they are
    # resampled from (a rectangle is exact, the half disc is blurred).
    for i, tol in ((4, 1e-6), (5, 0.15)):
        cropped = patches[i][y0 : y0 + h, x0 : x0 + w]
        rle = _rle(cropped)
        row = keep.tolist().index(i)
        np.testing.assert_allclose(c.patch_boxes[row].numpy(), mask_utils.toBbox(rle), atol=1.0)
        want = patch_mask_crops([rle], c.patch_boxes[row][None].numpy(), config.roi_size)[0]
        assert (c.patch_masks[row] - want).abs().mean() <= tol
    # Ground truth: the instance right of the window is dropped; the two inside keep their
    # full-image affinities (the authors' offline overlaps, indexed by the kept ids).
    t0, t1 = s.targets, c.targets
    assert t0.inst_labels.tolist() == [0, 1, 1] and t1.inst_labels.tolist() == [0, 1]
    assert torch.equal(t1.inst_pos, t0.inst_pos[:2][:, keep])
    assert torch.equal(t1.inst_ignore, t0.inst_ignore[:2][:, keep])
    assert torch.equal(t1.sem_pos, t0.sem_pos[:, keep])
    assert torch.equal(t1.sem_present, t0.sem_present)
    assert t1.inst_usable.tolist() == [True, True]
    # Instance boxes: the same pixels, shifted into the window and normalised by the new size.
    old_px = t0.inst_boxes[:2] * torch.tensor([W, H, W, H])
    new_px = t1.inst_boxes * torch.tensor([100, 75, 100, 75])
    torch.testing.assert_close(new_px, old_px - torch.tensor([x0, y0, x0, y0]), atol=1e-3, rtol=0)
    # The patches' positives still sit on their GT: patch 0 is GT 0, patch 1 is GT 1.
    assert t1.inst_pos[0, keep.tolist().index(0)] and t1.inst_pos[1, keep.tolist().index(1)]


def test_flip_after_crop_and_the_drawn_windows(image):
    inputs, gt, _ = image
    config = _config()
    s = make_sample(inputs, config, 100, gt)
    head = get_head("affinity")
    a = head.augment(s, config, True, rng=np.random.default_rng([0, 0, 0, 2, 1]))
    b = head.augment(s, config, True, rng=np.random.default_rng([0, 0, 0, 2, 1]))
    assert _fingerprint([a]) == _fingerprint([b]) and a.flipped
    assert head.augment(s, config, False) is s  # no generator: no rescale / crop
    off = replace(config, scale_crop_aug=False)
    assert head.augment(s, off, False, rng=np.random.default_rng(0)) is s
    # The drawn windows stay inside the image and the scale in the configured range.
    rng = np.random.default_rng(5)
    cropped = 0
    for _ in range(200):
        aug = draw_scale_crop(rng, H, W, config)
        x0, y0, w, h = aug.window
        assert 0 <= x0 and x0 + w <= W and 0 <= y0 and y0 + h <= H
        assert w >= config.crop_min * W - 1 and h >= config.crop_min * H - 1
        r = max(w, h) / max(aug.size)
        assert config.scale_range[0] - 0.02 <= r <= config.scale_range[1] + 1e-9
        cropped += aug.window != (0, 0, W, H)
    assert 70 < cropped < 130  # crop_prob 0.5
