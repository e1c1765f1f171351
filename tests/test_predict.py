"""`samcp predict`: prediction folders, the composition rules, open-vocabulary fusion, eval --run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils

from samcp.models.compose import compose_regions
from samcp.models.heads import CompositionParams, ImageResult
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.evaluation import evaluate, read_panoptic_png, resolve_ground_truth
from samcp.pipeline.predict import (
    LabelSpace,
    PredictionWriter,
    Predictor,
    predict_run,
    prediction_notes,
)

H, W = 96, 128


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthetic dataset, train/val caches (SLIC + random CLIP) and a 10-step tiny run."""
    from samcp.cli.precompute import command as precompute
    from samcp.pipeline.clip import make_random_clip_checkpoint
    from samcp.pipeline.synth import make_synthetic_dataset
    from samcp.pipeline.train import TrainConfig, run_training

    root = tmp_path_factory.mktemp("predict")
    mp = pytest.MonkeyPatch()
    mp.setenv("SAMCP_CACHE_DIR", str(root / "textcache"))
    ds = make_synthetic_dataset(root / "syn", num_train=4, num_val=3, height=H, width=W)
    clip = root / "clip.pt"
    make_random_clip_checkpoint(clip)
    caches = {}
    for split in ("train", "val"):
        out = root / f"cache_{split}"
        res = CliRunner().invoke(
            precompute,
            [
                str(ds),
                "--split",
                f"{split}2017",
                "--out",
                str(out),
                "--proposals",
                "slic",
                "--num-workers",
                "0",
                "--clip-model",
                "samcp-test-convnext",
                "--clip-checkpoint",
                str(clip),
                "--clip-input-size",
                "128",
            ],
        )
        assert res.exit_code == 0, res.output
        caches[split] = out
    run = root / "run"
    run_training(
        TrainConfig(
            cache=str(caches["train"]),
            dataset=str(ds),
            out=str(run),
            preset="tiny",
            # An untrained head's affinities are all below the 0.3 floor; merge by rank only.
            head_overrides={"min_affinity": 0.0},
            clip_checkpoint=str(clip),
            steps=10,
            batch_size=2,
            progress=False,
        )
    )
    yield {"root": root, "ds": ds, "clip": clip, "cache": caches["val"], "run": run}
    mp.undo()


def _classes(run: Path) -> list[dict]:
    return json.loads((run / "classes.json").read_text())


# ------------------------------------------------------------------------------------------------
# Composition rules on hand-built cases


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _gt_outputs(ds: Path) -> tuple[list[ImageResult], LabelSpace, dict]:
    """The ground truth itself as ImageResults: class regions and thing instances, composed by
    the affinity head's composition."""
    gj, gp = resolve_ground_truth(ds, "val2017")
    data = json.loads(gj.read_text())
    labels = LabelSpace.from_categories(data["categories"], "gt")
    index = {c["id"]: i for i, c in enumerate(data["categories"])}
    k = len(labels)
    outs, stems = [], {}
    for ann in data["annotations"]:
        ids = read_panoptic_png(gp / ann["file_name"])
        regions = [np.zeros(ids.shape, bool) for _ in range(k)]
        inst, inst_labels = [], []
        for s in ann["segments_info"]:
            m = ids == s["id"]
            c = index[s["category_id"]]
            regions[c] |= m
            if labels.isthing[c] and not s.get("iscrowd", 0):
                inst.append(_rle(m))
                inst_labels.append(c)
        outs.append(
            compose_regions(
                str(ann["image_id"]),
                *ids.shape,
                [_rle(r) if r.any() else None for r in regions],
                np.array([1.0 if r.any() else 0.0 for r in regions]),
                inst,
                np.array(inst_labels, np.int64),
                np.linspace(0.99, 0.9, len(inst)),
                labels.isthing,
                CompositionParams(stuff_area_min=0),
            )
        )
        stems[str(ann["image_id"])] = Path(ann["file_name"]).stem
    return outs, labels, stems


def test_the_ground_truth_written_as_a_prediction_scores_perfectly(setup, tmp_path):
    outs, labels, stems = _gt_outputs(setup["ds"])
    writer = PredictionWriter(tmp_path / "pred", labels, stems)
    for o in outs:
        writer.add(o)
    pred = writer.finish({"notes": []})
    assert not (tmp_path / "pred.tmp").exists()
    gj, gp = resolve_ground_truth(setup["ds"], "val2017")
    report = evaluate(gj, gp, pred, workers=1)
    assert report.semantic_source == "semantic"
    assert report.panoptic.all.pq == pytest.approx(100.0)
    assert report.semantic.miou == pytest.approx(100.0)
    assert report.instance is not None and report.instance.ap == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------
# A trained run end to end


def test_predict_writes_a_complete_consistent_folder(setup, tmp_path):
    out = predict_run(
        setup["run"],
        setup["cache"],
        tmp_path / "pred",
        score_thresh=0.0,
        stuff_area_min=0,
        progress=False,
    )
    classes = _classes(setup["run"])
    cat_ids = {c["id"] for c in classes}
    pan = json.loads((out / "panoptic.json").read_text())
    gj, _ = resolve_ground_truth(setup["ds"], "val2017")
    gt = json.loads(gj.read_text())
    assert {a["image_id"] for a in pan["annotations"]} == {a["image_id"] for a in gt["annotations"]}
    assert {a["file_name"] for a in pan["annotations"]} == {
        a["file_name"] for a in gt["annotations"]
    }
    painted = 0
    for ann in pan["annotations"]:
        ids = read_panoptic_png(out / "panoptic" / ann["file_name"])
        assert ids.shape == (H, W)
        seg_ids = [s["id"] for s in ann["segments_info"]]
        assert len(seg_ids) == len(set(seg_ids)) and 0 not in seg_ids
        assert set(np.unique(ids).tolist()) - {0} == set(seg_ids)
        for s in ann["segments_info"]:
            assert s["category_id"] in cat_ids
            assert s["area"] == int((ids == s["id"]).sum())
        painted += int((ids > 0).sum())
        sem = np.asarray(Image.open(out / "semantic" / ann["file_name"]))
        assert sem.shape == (H, W) and sem.dtype == np.uint8
        assert set(np.unique(sem).tolist()) <= set(range(len(classes))) | {255}
    assert painted > 0
    instances = json.loads((out / "instances.json").read_text())
    assert instances
    for d in instances:
        assert isinstance(d["segmentation"]["counts"], str)
        assert d["category_id"] in {c["id"] for c in classes if c["isthing"]}
        m = mask_utils.decode({**d["segmentation"], "counts": d["segmentation"]["counts"].encode()})
        assert m.shape == (H, W) and m.any()
    report = evaluate(gj, None, out, workers=1)
    assert report.num_images == 3 and report.instance is not None
    assert prediction_notes(out) == []

    # A second prediction into the same folder replaces it whole. At score 1.0 nothing is
    # painted: the joint composition thresholds stuff regions as well as instances.
    predict_run(setup["run"], setup["cache"], out, score_thresh=1.0, progress=False)
    pan2 = json.loads((out / "panoptic.json").read_text())
    assert all(not a["segments_info"] for a in pan2["annotations"])
    assert len(pan2["annotations"]) == 3
    assert not Path(str(out) + ".tmp").exists() and not Path(str(out) + ".old").exists()


def test_refuses_a_foreign_output_folder(setup, tmp_path):
    (tmp_path / "data.txt").write_text("mine")
    with pytest.raises(SamcpError, match="samcp did not make"):
        predict_run(setup["run"], setup["cache"], tmp_path, progress=False)
    assert (tmp_path / "data.txt").read_text() == "mine"


def test_falls_back_to_the_latest_checkpoint_with_a_note(setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run, ignore=shutil.ignore_patterns("tb"))
    shutil.rmtree(run / "model")
    out = predict_run(run, setup["cache"], tmp_path / "pred", progress=False)
    assert any("checkpoint step_0000010" in n for n in prediction_notes(out))


def _first_sample(predictor: Predictor, cache: Path):
    from samcp.pipeline.cache import CacheReader

    row = next(CacheReader(cache).iter_images())
    return predictor.sample(row)


def test_kappa_one_follows_clip_and_kappa_zero_the_classifier(setup):
    from samcp.models.affinity import collate, predict_image
    from samcp.pipeline.cache import CacheReader

    attrs = CacheReader(setup["cache"]).attrs
    p1 = Predictor.from_run(setup["run"], attrs, kappa=1.0, device="cpu")
    p0 = Predictor.from_run(setup["run"], attrs, kappa=0.0, device="cpu")
    sample = _first_sample(p1, setup["cache"])
    n = sample.num_patches
    assert n > 0
    thing = int(np.flatnonzero(p1.labels.isthing)[0])
    # Every patch's CLIP embedding is exactly class `thing`'s text embedding: CLIP says `thing`.
    sample.patch_clip_embed = p1.text_embed[thing].expand(n, -1).half()
    (o1,) = p1.predict([sample])
    assert o1.instance_labels[0] == thing
    assert (o1.instance_labels[o1.instance_scores > 0.5] == thing).all()

    # kappa = 0: exactly the learned classifier (no CLIP), whatever the CLIP embeddings say.
    (o0,) = p0.predict([sample])
    out = p0.model(**collate([sample], p0.text_embed, "cpu"))
    k = len(p0.labels)
    ref = predict_image(
        out.affinity_logits[-1, 0, : k + n, :n],
        out.class_logits[-1, 0, : k + n],
        out.patch_valid[0, :n],
        k,
        p0.head_cfg,
        instance_classes=torch.from_numpy(p0.labels.isthing),
    )
    np.testing.assert_array_equal(o0.instance_labels, ref.instance_labels.numpy())
    np.testing.assert_allclose(o0.instance_scores, ref.instance_scores.numpy(), rtol=1e-5)
    assert not np.allclose(o0.instance_scores, o1.instance_scores)


def test_open_vocabulary_category_ids_and_thing_stuff(setup, tmp_path):
    classes = _classes(setup["run"])
    # The dataset's own class file (with synonyms) matches its categories: thing/stuff is known.
    out = predict_run(
        setup["run"],
        setup["cache"],
        tmp_path / "same",
        vocabulary=str(setup["ds"] / "classes.txt"),
        clip_checkpoint=str(setup["clip"]),
        score_thresh=0.0,
        stuff_area_min=0,
        progress=False,
    )
    info = json.loads((out / "predict_info.json").read_text())
    assert info["thing_stuff_source"].endswith("classes.json") and info["notes"] == []
    pan = json.loads((out / "panoptic.json").read_text())
    assert [c["id"] for c in pan["categories"]] == [c["id"] for c in classes]
    evaluate(resolve_ground_truth(setup["ds"], "val2017")[0], None, out, workers=1)

    # A free vocabulary: ids from the file, every class a thing.
    voc = tmp_path / "free.txt"
    voc.write_text("1:ball,sphere\n77:cube\n78:sky,clouds\n")
    out = predict_run(
        setup["run"],
        setup["cache"],
        tmp_path / "free",
        vocabulary=str(voc),
        clip_checkpoint=str(setup["clip"]),
        kappa=1.0,
        score_thresh=0.0,
        progress=False,
    )
    assert any("treated as a thing" in n for n in prediction_notes(out))
    pan = json.loads((out / "panoptic.json").read_text())
    assert [c["id"] for c in pan["categories"]] == [1, 77, 78]
    segs = [s for a in pan["annotations"] for s in a["segments_info"]]
    assert segs and {s["category_id"] for s in segs} <= {1, 77, 78}
    assert all(s["isthing"] for s in segs)
    inst = json.loads((out / "instances.json").read_text())
    assert {d["category_id"] for d in inst} <= {1, 77, 78}

    # Cached now: the same vocabulary needs no checkpoint any more; a new one does.
    predict_run(
        setup["run"], setup["cache"], tmp_path / "free2", vocabulary=str(voc), progress=False
    )
    voc.write_text("1:ball\n")
    with pytest.raises(SamcpError, match="--clip-checkpoint"):
        predict_run(
            setup["run"], setup["cache"], tmp_path / "x", vocabulary=str(voc), progress=False
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.samcp-partial").exists()


def test_render_prediction_colours_segments(setup, tmp_path):
    from samcp.pipeline.viz import prediction_segments, render_segments

    out = predict_run(
        setup["run"],
        setup["cache"],
        tmp_path / "pred",
        score_thresh=0.0,
        stuff_area_min=0,
        progress=False,
    )
    ann = json.loads((out / "panoptic.json").read_text())["annotations"][0]
    image = np.full((H, W, 3), 128, np.uint8)
    drawn = render_segments(image, prediction_segments(out, str(ann["image_id"])))
    ids = read_panoptic_png(out / "panoptic" / ann["file_name"])
    assert drawn.shape == (H, W, 3) and drawn.dtype == np.uint8
    assert (drawn[ids > 0] != 128).any(axis=-1).all()
    with pytest.raises(SamcpError, match="no prediction"):
        prediction_segments(out, "nope")


def test_viz_pred_draws_a_prediction_over_the_image(setup, tmp_path):
    from PIL import Image

    from samcp.cli.main import main as samcp_main
    from samcp.pipeline.cache import CacheReader
    from samcp.pipeline.viz import find_image, prediction_segments, render_segments

    out = predict_run(
        setup["run"],
        setup["cache"],
        tmp_path / "pred",
        score_thresh=0.0,
        stuff_area_min=0,
        progress=False,
    )
    image_id = json.loads((out / "panoptic.json").read_text())["annotations"][0]["image_id"]
    png = tmp_path / "p.png"
    samcp_main(["viz", str(setup["cache"]), str(image_id), "--pred", str(out), "--out", str(png)])
    reader = CacheReader(setup["cache"])
    pixels, _ = find_image(reader, reader.get(str(image_id)))
    want = render_segments(pixels, prediction_segments(out, str(image_id)))
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), want)


def test_eval_run_cache_predicts_then_evaluates(setup, tmp_path):
    from samcp.cli.eval import command

    js = tmp_path / "res.json"
    res = CliRunner().invoke(
        command,
        [
            "--run",
            str(setup["run"]),
            "--cache",
            str(setup["cache"]),
            "--json",
            str(js),
            "--workers",
            "1",
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "PQ" in res.output and "mIoU" in res.output and "AP50" in res.output
    data = json.loads(js.read_text())
    pred = setup["run"] / "predictions" / setup["cache"].name
    assert data["predictions"] == str(pred) and (pred / "panoptic.json").is_file()
    assert data["ground_truth"].endswith("panoptic_val2017.json")
    assert data["num_images"] == 3 and data["semantic"]["source"] == "semantic"

    res = CliRunner().invoke(command, ["--run", str(setup["run"]), "--no-progress"])
    assert res.exit_code != 0 and "--cache" in str(res.exception)


def test_batching_and_empty_images_do_not_change_predictions(setup):
    from dataclasses import replace

    from samcp.pipeline.cache import CacheReader
    from samcp.pipeline.proposals.base import Proposals

    reader = CacheReader(setup["cache"])
    p = Predictor.from_run(setup["run"], reader.attrs, device="cpu")
    rows = list(reader.iter_images())[:2]
    r = rows[0]
    empty_row = replace(
        r,
        image_id="empty",
        proposals=Proposals(
            r.height,
            r.width,
            [],
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.int64),
            np.zeros(0, np.float32),
            np.zeros(0, np.float32),
            np.zeros((0, 2), np.float32),
        ),
        mask_arrays={k: v[:0] for k, v in r.mask_arrays.items()},
    )
    samples = [p.sample(x) for x in (*rows, empty_row)]
    assert samples[0].num_patches != samples[1].num_patches  # padding happens in the batch
    batched = p.predict(samples)
    for s, b in zip(samples[:2], batched[:2], strict=True):
        (one,) = p.predict([s])
        np.testing.assert_array_equal(b.instance_labels, one.instance_labels)
        np.testing.assert_allclose(b.instance_scores, one.instance_scores, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(b.semantic, one.semantic)
        np.testing.assert_array_equal(b.panoptic, one.panoptic)
    e = batched[2]
    assert e.image_id == "empty" and not e.instance_rles
    assert (e.semantic == -1).all() and not e.segments


def test_failed_rows_are_predicted_void_with_a_note(setup, tmp_path):
    import zarr

    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    root = zarr.open_group(str(cache), mode="r+")
    (sid,) = list(root["shards"].group_keys())
    status = root["shards"][sid]["status"]
    st = status[...]
    st[0] = 1
    status[...] = st
    out = predict_run(setup["run"], cache, tmp_path / "pred", score_thresh=0.0, progress=False)
    assert any("1 images failed" in n for n in prediction_notes(out))
    pan = json.loads((out / "panoptic.json").read_text())
    assert len(pan["annotations"]) == 3
    first = pan["annotations"][0]
    assert first["segments_info"] == []
    assert not read_panoptic_png(out / "panoptic" / first["file_name"]).any()
    sem = np.asarray(Image.open(out / "semantic" / first["file_name"]))
    assert (sem == 255).all()
