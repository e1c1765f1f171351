"""The open-vocabulary protocol on the synthetic set: the fixed seen/unseen split, training on the
seen classes (the others void), and the all / seen / unseen evaluation report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from safetensors.torch import load_file

from samcp.pipeline.cache import CacheReader
from samcp.pipeline.datasets import CocoPanopticDataset
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.evaluation import evaluate, format_report, read_seen_classes
from samcp.pipeline.evaluation.formats import write_json_atomic, write_panoptic_folder
from samcp.pipeline.evaluation.instance import (
    encode_mask,
    evaluate_instances,
    ground_truth_instances,
)
from samcp.pipeline.synth import (
    SEEN_CLASS_IDS,
    SYNTH_CLASSES,
    UNSEEN_CLASS_IDS,
    make_synthetic_dataset,
)
from samcp.pipeline.train import (
    CacheSampler,
    TrainConfig,
    head_config_for_cache,
    run_training,
    training_classes,
)
from samcp.pipeline.vocab import read_vocabulary


@pytest.fixture(autouse=True)
def _text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMCP_CACHE_DIR", str(tmp_path / "samcp-cache"))


# ---------------------------------------------------------------------------------------------
# The fixed split.


def test_the_split_is_five_things_two_stuff_seen_and_written_as_a_class_file(tiny_train_cache):
    _, data, _ = tiny_train_cache
    by_id = {c.id: c for c in SYNTH_CLASSES}
    assert set(SEEN_CLASS_IDS) | set(UNSEEN_CLASS_IDS) == set(by_id)
    assert not set(SEEN_CLASS_IDS) & set(UNSEEN_CLASS_IDS)
    seen_things = [i for i in SEEN_CLASS_IDS if by_id[i].isthing]
    unseen_things = [i for i in UNSEEN_CLASS_IDS if by_id[i].isthing]
    assert (len(seen_things), len(SEEN_CLASS_IDS) - len(seen_things)) == (5, 2)
    assert (len(unseen_things), len(UNSEEN_CLASS_IDS) - len(unseen_things)) == (2, 2)
    assert {by_id[i].name for i in UNSEEN_CLASS_IDS} == {"kite", "pill", "wall", "water"}
    # No unseen name or synonym is a name of a seen class.
    seen_names = {n for i in SEEN_CLASS_IDS for n in (by_id[i].name, *by_id[i].synonyms)}
    assert not seen_names & {n for i in UNSEEN_CLASS_IDS for n in by_id[i].synonyms}
    # classes_seen.txt is the seen subset of classes.txt, line for line.
    seen = read_vocabulary(data / "classes_seen.txt")
    full = read_vocabulary(data / "classes.txt")
    assert seen.ids == SEEN_CLASS_IDS
    assert seen.names == tuple(n for i, n in zip(full.ids, full.names) if i in SEEN_CLASS_IDS)


# ---------------------------------------------------------------------------------------------
# Seen / unseen evaluation on a case computed by hand.

# Non-contiguous ids in a GT order that is not id order: a class-index / id mix-up shows.
A, B, C, D = 7, 20, 3, 11  # A thing seen, B stuff seen, C thing unseen, D stuff unseen
GT_CATS = [
    {"id": A, "name": "a", "isthing": 1},
    {"id": B, "name": "b", "isthing": 0},
    {"id": C, "name": "c", "isthing": 1},
    {"id": D, "name": "d", "isthing": 0},
]


def _ids(rows: list[str]) -> np.ndarray:
    return np.array([[int(ch) for ch in row] for row in rows], dtype=np.uint32)


def _hand_case(root: Path) -> tuple[Path, Path, Path]:
    """GT: A | B on top, C | D below, 6 pixels each. Prediction: A one pixel short (B takes it),
    C exact, D predicted as A."""
    gt = _ids(["111111222222", "333333444444"])
    gt_segs = [
        {"id": 1, "category_id": A, "area": 6, "iscrowd": 0},
        {"id": 2, "category_id": B, "area": 6, "iscrowd": 0},
        {"id": 3, "category_id": C, "area": 6, "iscrowd": 0},
        {"id": 4, "category_id": D, "area": 6, "iscrowd": 0},
    ]
    pred = _ids(["111112222222", "333333555555"])
    pred_segs = [
        {"id": 1, "category_id": A},
        {"id": 2, "category_id": B},
        {"id": 3, "category_id": C},
        {"id": 5, "category_id": A},
    ]
    write_panoptic_folder(root / "gt.json", root / "gt", [("x", gt, gt_segs)], GT_CATS)
    pred_dir = root / "pred"
    # The prediction lists its categories in another order than the GT; its semantic PNG indexes
    # that list, as samcp predict writes it for a run trained on a subset.
    pred_cats = [GT_CATS[3], GT_CATS[2], GT_CATS[1], GT_CATS[0]]
    write_panoptic_folder(
        pred_dir / "panoptic.json", pred_dir / "panoptic", [("x", pred, pred_segs)], pred_cats
    )
    position = {c["id"]: i for i, c in enumerate(pred_cats)}
    cat_of = {s["id"]: s["category_id"] for s in pred_segs}
    sem = np.vectorize(lambda v: position[cat_of[int(v)]])(pred).astype(np.uint8)
    (pred_dir / "semantic").mkdir()
    Image.fromarray(sem).save(pred_dir / "semantic" / "x.png")
    dets = [
        {"image_id": "x", "category_id": A, "segmentation": encode_mask(pred == 1), "score": 0.9},
        {"image_id": "x", "category_id": C, "segmentation": encode_mask(pred == 3), "score": 0.8},
        {"image_id": "x", "category_id": A, "segmentation": encode_mask(pred == 5), "score": 0.3},
    ]
    write_json_atomic(pred_dir / "instances.json", dets)
    return root / "gt.json", root / "gt", pred_dir


def test_seen_and_unseen_means_equal_the_hand_computed_case(tmp_path):
    gj, gp, pred = _hand_case(tmp_path)
    report = evaluate(gj, gp, pred, workers=1, seen=read_seen_classes(f"{A},{B}"))
    # Per class: A tp 1 (IoU 5/6) + fp 1 (the D region); B tp 1 (IoU 6/7); C tp 1 (IoU 1);
    # D fn 1. PQ = sum IoU / (tp + fp/2 + fn/2).
    pq = {A: (5 / 6) / 1.5, B: 6 / 7, C: 1.0, D: 0.0}
    sq = {A: 5 / 6, B: 6 / 7, C: 1.0, D: 0.0}
    rq = {A: 1 / 1.5, B: 1.0, C: 1.0, D: 0.0}
    # IoU per class from the pixels: A 5 / (6 + 11 - 5), B 6 / 7, C 1, D 0.
    iou = {A: 5 / 12, B: 6 / 7, C: 1.0, D: 0.0}
    # COCO AP: A's detection has IoU 5/6, a true positive at thresholds 0.50..0.80 (7 of 10);
    # the false A detection scores lower, so it never lowers the precision envelope. C: exact.
    ap = {A: 0.7, C: 1.0}
    groups = {"seen": (A, B), "unseen": (C, D)}
    for name, (thing, stuff) in groups.items():
        g = report.groups[name]
        assert g.category_ids == ([A, B] if name == "seen" else [C, D])
        assert g.panoptic["all"].pq == pytest.approx(100 * (pq[thing] + pq[stuff]) / 2)
        assert g.panoptic["all"].sq == pytest.approx(100 * (sq[thing] + sq[stuff]) / 2)
        assert g.panoptic["all"].rq == pytest.approx(100 * (rq[thing] + rq[stuff]) / 2)
        assert g.panoptic["things"].pq == pytest.approx(100 * pq[thing])
        assert g.panoptic["stuff"].pq == pytest.approx(100 * pq[stuff])
        assert g.miou == pytest.approx(100 * (iou[thing] + iou[stuff]) / 2)
        assert g.miou_n == 2
        assert g.instance is not None
        assert g.instance["ap"] == pytest.approx(100 * ap[thing])
        assert g.instance["n"] == 1
    # The all-class numbers are the means over all four, with the same rules.
    assert report.panoptic.all.pq == pytest.approx(100 * sum(pq.values()) / 4)
    assert report.semantic.miou == pytest.approx(100 * sum(iou.values()) / 4)
    assert report.instance is not None and report.instance.ap == pytest.approx(100 * 0.85)

    data = report.to_dict(per_class=True)
    assert data["groups"]["seen"]["panoptic"]["all"]["pq"] == pytest.approx(
        100 * (pq[A] + pq[B]) / 2
    )
    assert data["groups"]["unseen"]["semantic"]["miou"] == pytest.approx(50.0)
    assert data["seen_classes"] == f"{A},{B}"
    assert {r["category_id"]: r["group"] for r in data["per_class"]} == {
        A: "seen",
        B: "seen",
        C: "unseen",
        D: "unseen",
    }
    table = format_report(report)
    assert "Open vocabulary: 2 seen classes" in table
    unseen_row = next(line for line in table.splitlines() if line.startswith("Unseen"))
    assert unseen_row.split("|")[1].split()[0] == "50.0"  # PQ of the unseen group
    # Without seen classes there are no groups.
    plain = evaluate(gj, gp, pred, workers=1)
    assert plain.to_dict()["groups"] is None and "Open vocabulary" not in format_report(plain)


def test_seen_classes_are_read_from_class_files_runs_and_ids(tmp_path):
    (tmp_path / "seen.txt").write_text(f"{B}:b,bee\n{A}:a\n")
    assert read_seen_classes(tmp_path / "seen.txt").ids == (B, A)
    run = tmp_path / "run"
    run.mkdir()
    (run / "classes.json").write_text(json.dumps([{"id": A, "name": "a", "isthing": 1}]))
    assert read_seen_classes(run).ids == (A,)
    assert read_seen_classes(run / "classes.json").ids == (A,)
    assert read_seen_classes(" 7, 20,7 ").ids == (A, B)
    with pytest.raises(SamcpError, match="not a list of ids"):
        read_seen_classes(tmp_path / "missing.txt")
    gj, gp, pred = _hand_case(tmp_path / "case")
    with pytest.raises(SamcpError, match=r"seen class id\(s\) 99 are not categories"):
        evaluate(gj, gp, pred, workers=1, seen=read_seen_classes("7,99"))


def test_group_ap_equals_cocoeval_restricted_to_the_group(tmp_path):
    """A group's AP = COCOeval run on the group's categories alone (params.catIds)."""
    from samcp.pipeline.evaluation import resolve_ground_truth
    from samcp.pipeline.evaluation.formats import load_ground_truth, read_panoptic_png
    from samcp.pipeline.evaluation.perturb import write_perturbed_predictions

    ds = make_synthetic_dataset(
        tmp_path / "ds", seed=4, num_train=0, num_val=4, height=48, width=64
    )
    gj, gp = resolve_ground_truth(ds, "val2017")
    pred = write_perturbed_predictions(
        gj, gp, tmp_path / "pred", seed=1, p_relabel=0.3, p_shift=0.5
    )
    gt = load_ground_truth(gj, gp)
    cats = gt.category_by_id
    instances, sizes = {}, {}
    for ann in gt.annotations:
        ids = read_panoptic_png(gp / ann["file_name"])
        instances[str(ann["image_id"])] = ground_truth_instances(ids, ann["segments_info"], cats)
        sizes[str(ann["image_id"])] = ids.shape
    dets = json.loads((pred / "instances.json").read_text())
    groups = {"seen": set(SEEN_CLASS_IDS), "unseen": set(UNSEEN_CLASS_IDS)}
    full = evaluate_instances(instances, sizes, gt.categories, dets, groups=groups)
    assert full is not None
    for name, ids in groups.items():
        alone = evaluate_instances(
            {k: [a for a in v if a["category_id"] in ids] for k, v in instances.items()},
            sizes,
            [c for c in gt.categories if c.id in ids],
            [d for d in dets if d["category_id"] in ids],
        )
        assert alone is not None
        for key in ("ap", "ap50", "ap75", "aps", "apm", "apl"):
            assert full.groups[name][key] == pytest.approx(getattr(alone, key)), (name, key)
        # And it is the mean of the group's per-class APs (categories with ground truth).
        per = [v["ap"] for c, v in full.per_class.items() if c in ids and v["ap"] is not None]
        assert full.groups[name]["ap"] == pytest.approx(np.mean(per))
        assert full.groups[name]["n"] == len(per)


# ---------------------------------------------------------------------------------------------
# Training on the seen classes.


def _cfg(tiny_train_cache, out: Path, **kw) -> TrainConfig:
    root, data, clip_ckpt = tiny_train_cache
    kw.setdefault("steps", 2)
    return TrainConfig(
        cache=str(root / "cache"),
        dataset=str(data),
        out=str(out),
        preset="tiny",
        clip_checkpoint=str(clip_ckpt),
        batch_size=2,
        log_every=1,
        ckpt_every=1,
        progress=False,
        **kw,
    )


def test_training_on_seen_classes_voids_the_unseen_segments(tiny_train_cache, tmp_path):
    root, data, _ = tiny_train_cache
    cfg = _cfg(tiny_train_cache, tmp_path / "run", classes=str(data / "classes_seen.txt"))
    dataset = CocoPanopticDataset(data, "train2017")
    classes, vocab = training_classes(dataset.categories, cfg.classes, dataset.json_path)
    assert classes.ids == list(SEEN_CLASS_IDS) and vocab.ids == SEEN_CLASS_IDS
    assert classes.void_ids == set(UNSEEN_CLASS_IDS)
    reader = CacheReader(cfg.cache)
    head_cfg = head_config_for_cache(cfg, reader)
    sampler = CacheSampler(reader, dataset, classes, head_cfg, cfg)
    k = len(SEEN_CLASS_IDS)
    unseen_segments = 0
    for key in sampler.epoch_order(0):
        sample = sampler.sample(key)
        id_map, segs = dataset.load_panoptic(sample.image_id)
        seen_segs = [s for s in segs if s["category_id"] in SEEN_CLASS_IDS]
        unseen = [s for s in segs if s["category_id"] in UNSEEN_CLASS_IDS]
        unseen_segments += len(unseen)
        t = sample.targets
        assert t is not None
        # Only the seen classes exist for the head: K rows, labels < K.
        assert t.sem_pos.shape[0] == k and t.sem_present.shape == (k,)
        present = {SEEN_CLASS_IDS[i] for i in np.flatnonzero(t.sem_present.numpy())}
        assert present == {int(s["category_id"]) for s in seen_segs}
        things = [s for s in seen_segs if classes.isthing[classes.index[s["category_id"]]]]
        assert len(t.inst_labels) == sum(1 for s in things if not s.get("iscrowd", 0))
        assert all(int(lbl) < k for lbl in t.inst_labels)
        # The ground truth the targets are made of holds no unseen pixel.
        from samcp.pipeline.headdata import ground_truth_rles

        gt = ground_truth_rles(id_map, segs, classes)
        assert len(gt.rles) == len(seen_segs)
        covered = mask_utils.decode(mask_utils.merge(gt.rles, intersect=0)).astype(bool)
        for s in unseen:
            assert not covered[id_map == s["id"]].any()
    assert unseen_segments > 0  # the images do hold unseen classes, so the check means something

    run_training(cfg)
    run = tmp_path / "run"
    assert [c["id"] for c in json.loads((run / "classes.json").read_text())] == list(SEEN_CLASS_IDS)
    assert load_file(str(run / "text_embed.safetensors"))["text_embed"].shape[0] == k
    assert json.loads((run / "train_config.json").read_text())["classes"] == cfg.classes
    # Resuming it on other classes is refused.
    with pytest.raises(SamcpError, match="cannot resume .* trained on classes"):
        run_training(_cfg(tiny_train_cache, run, steps=2), resume=True)


def test_a_seen_class_run_predicts_seen_or_all_classes_and_evaluates(tiny_train_cache, tmp_path):
    """The protocol end to end: train on the seen classes, then `samcp eval --run` with the
    seen classes (default) and with every class (--vocabulary classes.txt), split seen/unseen."""
    from click.testing import CliRunner

    from samcp.cli.eval import command

    root, data, clip_ckpt = tiny_train_cache
    run = tmp_path / "run"
    run_training(_cfg(tiny_train_cache, run, classes=str(data / "classes_seen.txt")))
    base = ["--run", str(run), "--cache", str(root / "cache"), "--seen-classes", str(run)]
    base += ["--workers", "1", "--no-progress", "--per-class"]
    results = {}
    for label, extra in (
        ("seen", []),
        ("all", ["--vocabulary", str(data / "classes.txt"), "--clip-checkpoint", str(clip_ckpt)]),
    ):
        out = tmp_path / f"{label}.json"
        res = CliRunner().invoke(command, [*base, *extra, "--json", str(out)])
        assert res.exit_code == 0, res.output
        assert "Open vocabulary: 7 seen classes" in res.output
        results[label] = json.loads(out.read_text())
    for data_json in results.values():
        assert data_json["groups"]["seen"]["category_ids"] == list(SEEN_CLASS_IDS)
        assert data_json["groups"]["unseen"]["category_ids"] == list(UNSEEN_CLASS_IDS)
    # Predicting the training classes: categories are the seen ones, no unseen class is ever
    # predicted (no unseen tp / fp, no unseen IoU).
    seen_pred = json.loads((run / "predictions" / "cache" / "panoptic.json").read_text())
    assert [c["id"] for c in seen_pred["categories"]] == list(SEEN_CLASS_IDS)
    rows = {r["category_id"]: r for r in results["seen"]["per_class"]}
    for cid in UNSEEN_CLASS_IDS:
        assert rows[cid]["tp"] == 0 and rows[cid]["fp"] == 0
        assert rows[cid]["iou"] in (None, 0.0)
    # Predicting every class: all 11 categories, with the dataset's thing/stuff.
    all_pred = json.loads((run / "predictions" / "cache.classes" / "panoptic.json").read_text())
    assert {c["id"]: c["isthing"] for c in all_pred["categories"]} == {
        c.id: c.isthing for c in SYNTH_CLASSES
    }


# ---------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing written.


def test_unknown_class_ids_are_refused_in_one_line(tiny_train_cache, tmp_path, capsys):
    from samcp.cli.main import main

    root, data, clip_ckpt = tiny_train_cache
    bad = tmp_path / "bad.txt"
    bad.write_text("1:ball\n9:unicorn\n")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(
            [
                "train",
                "--cache",
                str(root / "cache"),
                "--dataset",
                str(data),
                "--split",
                "train2017",
                "--out",
                str(out),
                "--classes",
                str(bad),
                "--preset",
                "tiny",
                "--clip-checkpoint",
                str(clip_ckpt),
                "--steps",
                "1",
                "--no-progress",
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert str(bad) in err and "class id(s) 9 are not categories" in err
    assert not out.exists()

    gj, gp, pred = _hand_case(tmp_path / "case")
    with pytest.raises(SystemExit) as info:
        main(
            [
                "eval",
                "--gt",
                str(gj),
                "--pred",
                str(pred),
                "--seen-classes",
                str(bad),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert str(bad) in err and "seen class id(s) 1, 9 are not categories of" in err
