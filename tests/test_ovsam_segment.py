"""Prompted segmentation and the prompted evaluation on a tiny real cache and a trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samcp.pipeline.errors import SamcpError


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    """A 3-image synthetic val split cached with SLIC, a vit_test SAM's embeddings and a tiny
    random CLIP's res4 + res5, and a clip2sam run trained 3 steps on its seen classes."""
    from samcp.pipeline.cache import CacheReader
    from samcp.pipeline.clip import ClipConfig, make_random_clip_checkpoint
    from samcp.pipeline.foundation import make_random_sam_checkpoint
    from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
    from samcp.pipeline.proposals import ProposalConfig
    from samcp.pipeline.synth import make_synthetic_dataset
    from samcp.pipeline.train import TrainConfig, run_training

    root = tmp_path_factory.mktemp("ovsam")
    data = make_synthetic_dataset(
        root / "syn", seed=5, num_train=0, num_val=3, height=96, width=128
    )
    sam = make_random_sam_checkpoint(root / "sam.pth", "vit_test")
    clip = make_random_clip_checkpoint(root / "clip.pt")
    cache = root / "cache"
    run_precompute(
        PrecomputeConfig(
            source=str(data),
            out=str(cache),
            split="val2017",
            shard_size=2,
            proposals=ProposalConfig(source="slic", sam_model="vit_test", sam_checkpoint=str(sam)),
            store_sam_embeddings=True,
            num_workers=0,
            progress=False,
            clip=ClipConfig(
                model="samcp-test-convnext",
                checkpoint=str(clip),
                input_size=256,
                levels=("res4", "res5"),
            ),
        )
    )
    run = root / "run"
    run_training(
        TrainConfig(
            cache=str(cache),
            dataset=str(data),
            split="val2017",
            out=str(run),
            head="clip2sam",
            preset="tiny",
            head_overrides={"sam_checkpoint": str(sam)},
            classes=str(data / "classes_seen.txt"),
            clip_checkpoint=str(clip),
            steps=3,
            batch_size=2,
            progress=False,
        )
    )
    return {"data": data, "cache": cache, "run": run, "clip": clip, "reader": CacheReader(cache)}


def test_segment_gives_a_mask_class_and_score_per_prompt_and_writes_them(prompted, tmp_path):
    from samcp.pipeline.datasets import CocoPanopticDataset
    from samcp.pipeline.segment import (
        find_cached_image,
        load_prompted_run,
        segment_cached_image,
        write_segment_outputs,
    )

    reader = prompted["reader"]
    rec = CocoPanopticDataset(prompted["data"], "val2017").records[0]
    row = find_cached_image(reader, rec.file_name)  # an image file naming a cached id
    assert row.image_id == rec.image_id
    pred = load_prompted_run(prompted["run"], reader, device="cpu")
    res = segment_cached_image(pred, row, boxes=[[10, 10, 60, 50]], points=[[80, 40]])
    assert [r.kind for r in res] == ["box", "point"]
    names = {c["name"] for c in pred.labels.categories}
    for r in res:
        assert r.rle["size"] == [row.height, row.width]
        assert r.class_name in names and 0.0 <= r.score <= 1.0
        assert r.area == int(mask_utils.area({**r.rle, "counts": r.rle["counts"].encode()}))
    again = segment_cached_image(pred, row, boxes=[[10, 10, 60, 50]])
    assert again[0].rle == res[0].rle  # a prompt's answer does not depend on the others
    warnings = write_segment_outputs(res, reader, row, tmp_path / "s.json", tmp_path / "s.png")
    assert warnings == []
    back = json.loads((tmp_path / "s.json").read_text())
    assert [b["segmentation"] for b in back] == [r.rle for r in res]
    assert [b["category_id"] for b in back] == [r.class_id for r in res]
    assert (tmp_path / "s.png").stat().st_size > 0
    with pytest.raises(SamcpError, match="outside"):
        segment_cached_image(pred, row, points=[[500, 5]])
    with pytest.raises(SamcpError, match="x0 < x1"):
        segment_cached_image(pred, row, boxes=[[50, 10, 20, 40]])
    with pytest.raises(SamcpError, match="cached images only"):
        find_cached_image(reader, "no_such_image.png")


@pytest.mark.parametrize("mode", ["gt-boxes", "gt-points"])
def test_prompted_evaluation_reports_iou_and_accuracy_for_seen_and_unseen(prompted, mode):
    from samcp.pipeline.datasets import CocoPanopticDataset
    from samcp.pipeline.headdata import ClassSpace, ground_truth_rles
    from samcp.pipeline.segment import (
        evaluate_prompts,
        find_cached_image,
        load_prompted_run,
        segment_cached_image,
    )

    result = evaluate_prompts(
        prompted["run"], prompted["cache"], prompted["data"], mode, device="cpu",
        clip_checkpoint=str(prompted["clip"]),
    )  # fmt: skip
    ds = CocoPanopticDataset(prompted["data"], "val2017")
    classes = ClassSpace(ds.categories)
    gts = [ground_truth_rles(*ds.load_panoptic(r.image_id), classes) for r in ds.records]
    n = sum(int((~g.iscrowd).sum()) for g in gts)
    g = result.groups
    assert result.images == 3 and g["all"].prompts == n
    assert g["seen"].prompts + g["unseen"].prompts == n and g["unseen"].prompts > 0
    for grp in g.values():
        assert 0.0 <= grp.miou <= 1.0 and 0.0 <= grp.accuracy <= 1.0
    assert "mIoU" in result.table()
    if mode == "gt-boxes":  # the same prompt through samcp segment gives the same mask
        first = ds.records[0].image_id
        rle = [r for r, c in zip(gts[0].rles, gts[0].iscrowd) if not c][0]
        x, y, w, h = mask_utils.toBbox(rle)
        pred = load_prompted_run(
            prompted["run"], prompted["reader"], vocabulary=str(prompted["data"] / "classes.txt"),
            clip_checkpoint=str(prompted["clip"]), device="cpu",
        )  # fmt: skip
        row = find_cached_image(prompted["reader"], first)
        one = segment_cached_image(pred, row, boxes=[[x, y, x + w, y + h]])[0]
        iou = mask_utils.iou([{**one.rle, "counts": one.rle["counts"].encode()}], [rle], [0])
        assert 0.0 <= float(np.asarray(iou).ravel()[0]) <= 1.0


def test_prompted_evaluation_refuses_other_heads_and_modes(prompted):
    from samcp.pipeline.segment import evaluate_prompts

    with pytest.raises(SamcpError, match="gt-boxes, gt-points"):
        evaluate_prompts(prompted["run"], prompted["cache"], prompted["data"], "gt-masks")


def test_eval_prompts_on_the_command_line(prompted, tmp_path):
    import json

    from click.testing import CliRunner

    from samcp.cli.main import cli

    out = tmp_path / "prompts.json"
    args = ["eval", "--run", str(prompted["run"]), "--cache", str(prompted["cache"])]
    args += ["--gt", str(prompted["data"]), "--split", "val2017", "--device", "cpu"]
    args += ["--vocabulary", str(prompted["data"] / "classes.txt")]
    args += ["--clip-checkpoint", str(prompted["clip"])]
    res = CliRunner().invoke(cli, [*args, "--prompts", "gt-points", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "prompted evaluation (gt-points, 3 images)" in res.output
    data = json.loads(out.read_text())
    assert data["mode"] == "gt-points" and data["groups"]["all"]["prompts"] > 0
    # --prompts without a run is refused with one line naming the fix.
    bad = CliRunner().invoke(cli, ["eval", "--pred", str(tmp_path), "--prompts", "gt-boxes"])
    assert bad.exit_code != 0 and "--prompts goes with --run" in str(bad.exception)
