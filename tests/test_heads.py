"""Every registered head, through the plugin interface, on its tiny preset (the timm pattern).

For each head: configure from a cache description, a forward pass, a loss that goes down over a few
steps, a save/load round trip that gives the same outputs, and inference written by the prediction
writer and read back by `samcp eval`. A new head is covered by registering it.

The inputs are made without a cache: a synthetic dataset's validation images, with proposals that
are the ground-truth segments (plus a few spurious masks) and random cached arrays of the right
shapes, so the test runs in seconds and checks the interface, not the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from samcp.models.heads import CacheInfo, GroundTruth, ImageInputs, InferContext
from samcp.models.registry import build_head, get_head, list_heads, load_head, save_head

TEXT_DIM = 16
CLIP_SIZE = 64
CLIP_STRIDE = 8
CLIP_CHANNELS = 24
SAM_SHAPE = (32, 16, 16)  # a small stand-in for SAM's (256, 64, 64) embedding


def _cache_info() -> CacheInfo:
    return CacheInfo(
        clip_model="samcp-test-convnext",
        clip_input_size=CLIP_SIZE,
        clip_levels=("clip_res5",),
        clip_strides={"clip_res5": CLIP_STRIDE},
        clip_channels={"clip_res5": CLIP_CHANNELS},
        text_dim=TEXT_DIM,
        image_arrays=frozenset({"clip_res5", "sam_embed"}),
        mask_arrays=frozenset({"clip_mask_embed"}),
        sam_embed_shape=SAM_SHAPE,
        clip_head=_clip_head(),
    )


def _clip_head():
    """A random frozen CLIP head of the cache's shapes (open_clip's MLP layout)."""
    from samcp.models.cliphead import ClipHeadWeights

    rng = np.random.default_rng(0)
    c, d = CLIP_CHANNELS, TEXT_DIM
    t = {
        "norm_weight": np.ones(c, np.float32),
        "norm_bias": np.zeros(c, np.float32),
        "fc1_weight": rng.normal(0, c**-0.5, (2 * d, c)).astype(np.float32),
        "fc1_bias": np.zeros(2 * d, np.float32),
        "fc2_weight": rng.normal(0, (2 * d) ** -0.5, (d, 2 * d)).astype(np.float32),
    }
    return ClipHeadWeights("mlp", 1e-5, t, CLIP_SIZE, "clip_res5")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic val images as head inputs with their ground truth, and the label space."""
    from samcp.pipeline.datasets import CocoPanopticDataset
    from samcp.pipeline.headdata import ClassSpace, ground_truth_rles
    from samcp.pipeline.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("heads") / "synth"
    make_synthetic_dataset(root, seed=3, num_train=1, num_val=3, height=48, width=64)
    ds = CocoPanopticDataset(root, "val2017")
    classes = ClassSpace(ds.categories)
    rng = np.random.default_rng(0)
    items = []
    for rec in ds.records:
        id_map, segs = ds.load_panoptic(rec.image_id)
        gt = ground_truth_rles(id_map, segs, classes)
        spurious = []
        for _ in range(3):
            m = np.zeros((rec.height, rec.width), np.uint8)
            y, x = rng.integers(0, rec.height - 8), rng.integers(0, rec.width - 8)
            m[y : y + 8, x : x + 8] = 1
            spurious.append(mask_utils.encode(np.asfortranarray(m)))
        rles = list(gt.rles) + spurious
        n = len(rles)
        inputs = ImageInputs(
            image_id=rec.image_id,
            height=rec.height,
            width=rec.width,
            image_arrays={
                "clip_res5": rng.standard_normal(
                    (CLIP_CHANNELS, CLIP_SIZE // CLIP_STRIDE, CLIP_SIZE // CLIP_STRIDE)
                ).astype(np.float16),
                "sam_embed": rng.standard_normal(SAM_SHAPE).astype(np.float16),
            },
            rles=rles,
            boxes=mask_utils.toBbox(rles).astype(np.float32),
            areas=mask_utils.area(rles).astype(np.int64),
            mask_arrays={
                "clip_mask_embed": rng.standard_normal((n, TEXT_DIM)).astype(np.float16)
            },
        )
        items.append((inputs, gt))
    text = torch.nn.functional.normalize(torch.randn(len(classes), TEXT_DIM), dim=-1)
    return {"root": root, "items": items, "classes": classes, "text": text}


def _config(name: str):
    head = get_head(name)
    d = head.config_cls.tiny().to_dict()
    d.update(head.configure(d, _cache_info()))
    return head, head.config_cls.from_dict(d)


@pytest.mark.parametrize("name", list_heads())
def test_every_head_trains_saves_and_predicts(name, world, tmp_path):
    from samcp.pipeline.evaluation import evaluate, resolve_ground_truth
    from samcp.pipeline.predict import LabelSpace, PredictionWriter, gt_file_stems

    head, cfg = _config(name)
    torch.manual_seed(0)
    model = build_head(name, cfg)
    head.init_from_cache(model, cfg, _cache_info())  # as samcp train does
    items = world["items"]
    samples = [head.sample(x, cfg, 50, gt) for x, gt in items]
    assert isinstance(items[0][1], GroundTruth)
    criterion = head.criterion(cfg)
    text = world["text"]

    # A loss that goes down on a fixed batch.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(15):
        batch = head.collate(
            [head.augment(s, cfg, flip=step % 2 == 1) for s in samples], text, cfg, "cpu"
        )
        loss = criterion(model(**batch), samples)["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses

    # Save / load gives the same module.
    save_head(model, cfg, tmp_path / "model")
    loaded, cfg2 = load_head(tmp_path / "model")
    assert cfg2 == cfg
    model.eval()
    plain = [head.sample(x, cfg, 50) for x, _ in items]
    batch = head.collate(plain, text, cfg, "cpu")
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    for key, va in vars(a).items():
        vb = getattr(b, key)
        if isinstance(va, torch.Tensor):
            torch.testing.assert_close(va, vb)

    # Inference -> prediction writer -> eval.
    labels = LabelSpace.from_categories(world["classes"].categories)
    ctx = InferContext(
        text_embed=text,
        isthing=labels.isthing,
        seen=np.ones(len(labels), bool),
        params=head.default_params(cfg),
        device=torch.device("cpu"),
    )
    with torch.no_grad():
        results = head.infer(loaded(**batch), plain, cfg, ctx)
    assert [r.image_id for r in results] == [x.image_id for x, _ in items]
    gt_json, gt_png = resolve_ground_truth(Path(world["root"]), "val2017")
    writer = PredictionWriter(tmp_path / "pred", labels, gt_file_stems(gt_json))
    for r in results:
        assert r.panoptic.shape == (r.height, r.width) == r.semantic.shape
        assert set(np.unique(r.panoptic)) <= {0} | {s["id"] for s in r.segments}
        writer.add(r)
    pred = writer.finish({"notes": [], "outputs": list(head.outputs)})
    assert json.loads((pred / "panoptic.json").read_text())["annotations"]
    assert (pred / "instances.json").is_file() == ("instances" in head.outputs)
    report = evaluate(gt_json, gt_png, pred, workers=1)
    assert 0.0 <= report.semantic.miou <= 100.0
    if "panoptic" in head.outputs:
        assert 0.0 <= report.panoptic.all.pq <= 100.0
    else:  # a semantic head: its empty panoptic output is not scored
        assert report.panoptic is None and report.instance is None
        assert any("semantics only" in n for n in report.notes)


def test_registry_lists_builtin_heads_and_refuses_unknown_names():
    assert {"affinity", "possam"} <= set(list_heads())
    with pytest.raises(KeyError, match="known heads: .*affinity"):
        get_head("no_such_head")


@pytest.mark.parametrize("name", [n for n in list_heads() if get_head(n).legacy_defaults])
def test_a_head_saved_before_new_config_fields_loads_as_it_was(name, tmp_path):
    """A config.json without the fields added later rebuilds the model it was saved with."""
    head, cfg = _config(name)
    old = head.config_cls.from_dict({**cfg.to_dict(), **head.legacy_defaults})
    save_head(build_head(name, old), old, tmp_path / "model")
    path = tmp_path / "model" / "config.json"
    meta = json.loads(path.read_text())
    for key in head.legacy_defaults:
        del meta["config"][key]
    path.write_text(json.dumps(meta))
    _, loaded = load_head(tmp_path / "model")  # strict state-dict load
    assert loaded == old
