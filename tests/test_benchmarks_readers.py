"""Benchmark readers (samcp.pipeline.benchmarks) on every layout, their evaluation, hand-checked
figures on 4x4 cases, and the one-line error of a wrongly laid-out root."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from benchmark_layouts import CLASS_IDS, write_layout
from PIL import Image

from samcp.pipeline.benchmarks import (
    BENCHMARKS,
    PanopticBenchmark,
    SemanticBenchmark,
    canonical_split,
    open_benchmark,
)
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.evaluation import evaluate_benchmark, format_report
from samcp.pipeline.evaluation.formats import id_to_rgb
from samcp.pipeline.synth import make_synthetic_dataset

ALL = list(BENCHMARKS)
SEMANTIC = [n for n, b in BENCHMARKS.items() if b.task == "semantic"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("bsyn") / "syn", seed=3, num_train=0, num_val=3, height=48,
        width=64,
    )


@pytest.fixture(scope="module")
def layouts(synth, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name in ALL:
        root = tmp_path_factory.mktemp(name)
        out[name] = write_layout(name, synth, root)
    return out


def _perfect_prediction(bench, out: Path) -> Path:
    """The ground truth written as a prediction folder."""
    out.mkdir()
    if bench.task == "semantic":
        (out / "semantic").mkdir()
        for it in bench.items:
            label = np.asarray(Image.open(it.label))
            Image.fromarray(label).save(out / "semantic" / f"{it.stem}.png")
        return out
    gt = bench.ground_truth()
    shutil.copytree(gt.png_dir, out / "panoptic")
    doc = {"annotations": gt.annotations}
    (out / "panoptic.json").write_text(json.dumps(doc))
    return out


# ------------------------------------------------------------------------------------------------
# Every layout: reader and evaluation


@pytest.mark.parametrize("name", ALL)
def test_reader_lists_the_images_with_the_benchmarks_classes(name, layouts, synth):
    bench = open_benchmark(name, layouts[name], "val")
    info = BENCHMARKS[name]
    assert len(bench.records) == 3
    for r in bench.records:
        assert Path(r.file_name).is_file()
        assert (r.height, r.width) == (48, 64)
    if name != "coco_panoptic":
        assert len(bench.categories) == info.num_classes
    if isinstance(bench, SemanticBenchmark):
        labels = bench.load_labels(bench.items[0].image_id)
        assert labels.dtype == (np.uint16 if info.label_bits == 16 else np.uint8)
        present = set(np.unique(labels).tolist())
        assert present <= set(CLASS_IDS[name]) | {info.ignore_label}
        assert info.ignore_label in present  # the synthetic void blobs
    else:
        assert isinstance(bench, PanopticBenchmark)
        ids = {c.id for c in bench.ground_truth().categories}
        if name == "cityscapes":
            assert ids == set(range(19))  # label ids 7..33 mapped to the 19 train ids
            segs = bench.ground_truth().annotations[0]["segments_info"]
            assert {s["category_id"] for s in segs} <= set(CLASS_IDS["cityscapes"])
        if name == "ade20k_150":
            assert ids == set(range(150))


@pytest.mark.parametrize("name", ALL)
def test_the_ground_truth_as_a_prediction_scores_100(name, layouts, tmp_path):
    bench = open_benchmark(name, layouts[name], "validation")
    report = evaluate_benchmark(bench, _perfect_prediction(bench, tmp_path / "pred"), workers=1)
    assert report.semantic.miou == pytest.approx(100.0)
    assert report.semantic.pacc == pytest.approx(100.0)
    assert report.semantic.fwiou == pytest.approx(100.0)
    if bench.task == "panoptic":
        assert report.panoptic is not None and report.panoptic.all.pq == pytest.approx(100.0)
        if name in ("ade20k_150", "cityscapes"):
            assert bench.semantic_files() is not None  # mIoU on the benchmark's own labels
    else:
        assert report.panoptic is None
        assert "Semantic" in format_report(report) and "PQ" not in format_report(report)
        assert report.semantic.n == len(set(CLASS_IDS[name]))


def test_split_spellings_and_the_dataset_folder_itself_as_root(layouts):
    assert [canonical_split(s) for s in ("val", "validation", "val2017", "training")] == [
        "val", "val", "val", "train"
    ]
    a = open_benchmark("pascal_context_59", layouts["pascal_context_59"], "val")
    b = open_benchmark("pascal_context_59", layouts["pascal_context_59"] / "pascal_ctx_d2", "val")
    assert [r.image_id for r in a.records] == [r.image_id for r in b.records]
    with pytest.raises(SamcpError, match="unknown split"):
        open_benchmark("pascal_context_59", layouts["pascal_context_59"], "trainval")
    with pytest.raises(SamcpError, match="unknown dataset 'ade20k'; use one of"):
        open_benchmark("ade20k", layouts["pascal_context_59"])


def test_ade20k_150_without_panoptic_json_is_read_as_semantic(synth, tmp_path):
    root = write_layout("ade20k_150", synth, tmp_path / "d")
    (root / "ADEChallengeData2016" / "ade20k_panoptic_val.json").unlink()
    bench = open_benchmark("ade20k_150", root, "val")
    assert bench.task == "semantic" and len(bench.items) == 3


# ------------------------------------------------------------------------------------------------
# A wrongly laid-out root: one line naming the missing path and the expected layout


@pytest.mark.parametrize(
    "name, remove, missing",
    [
        ("ade20k_847", "ADE20K_2021_17_01/annotations_detectron2",
         "ADE20K_2021_17_01/annotations_detectron2/validation"),
        ("pascal_context_459", "pascal_ctx_d2/images", "pascal_ctx_d2/images/validation"),
        ("pascal_voc_20", "pascal_voc_d2/annotations_pascal20",
         "pascal_voc_d2/annotations_pascal20/validation"),
        ("coco_stuff_171", "coco/stuffthingmaps_detectron2",
         "coco/stuffthingmaps_detectron2/val2017"),
        ("ade20k_150", "ADEChallengeData2016/ade20k_panoptic_val",
         "ADEChallengeData2016/ade20k_panoptic_val"),
        ("cityscapes", "cityscapes/leftImg8bit", "cityscapes/leftImg8bit/val"),
    ],
)
def test_a_wrong_root_fails_with_one_line_naming_the_missing_path(
    name, remove, missing, synth, tmp_path
):
    root = write_layout(name, synth, tmp_path / "d")
    shutil.rmtree(root / remove)
    with pytest.raises(SamcpError) as err:
        open_benchmark(name, root, "val")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{root / missing} not found" in msg
    assert "expected" in msg and BENCHMARKS[name].folder in msg


def test_cli_wrong_root_is_one_error_line(tmp_path, capsys):
    from samcp.cli.main import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["eval", "--dataset", "pascal_context_59", "--gt", str(tmp_path / "empty"),
              "--pred", str(tmp_path), "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: pascal_context_59: ") and "\n" not in err
    assert "pascal_ctx_d2/annotations_ctx59/validation not found" in err


# ------------------------------------------------------------------------------------------------
# Hand-checked figures on 4x4 cases


def _hand_semantic(root: Path, name: str, ids: tuple[int, int, int], ignore: int, dtype, ext):
    """One 4x4 image: GT classes a (top left), b (top right), c (bottom left), ignore (bottom
    right); the prediction gets 3 of 4 pixels of each class right (see the test)."""
    layout = BENCHMARKS[name].layouts[0]
    base = root / layout.folder
    img_dir = base / layout.images.format(split=layout.splits["val"])
    lab_dir = base / layout.labels.format(split=layout.splits["val"])
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    a, b, c = ids
    x = ignore
    gt = np.array([[a, a, b, b], [a, a, b, b], [c, c, x, x], [c, c, x, x]], dtype)
    pred = np.array([[a, a, a, b], [a, b, b, b], [c, c, c, x], [x, c, c, c]], dtype)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(img_dir / "img1.jpg")
    Image.fromarray(gt).save(lab_dir / f"img1{ext}")
    return pred


@pytest.mark.parametrize(
    "name, ids, ignore, dtype, ext",
    [
        ("pascal_context_59", (5, 6, 7), 255, np.uint8, ".png"),
        ("pascal_context_459", (300, 301, 302), 65535, np.uint16, ".tif"),
        ("ade20k_847", (700, 2, 846), 65535, np.uint16, ".tif"),
        ("coco_stuff_171", (0, 100, 170), 255, np.uint8, ".png"),
    ],
)
def test_hand_checked_semantic_figures(name, ids, ignore, dtype, ext, tmp_path):
    pred = _hand_semantic(tmp_path / "d", name, ids, ignore, dtype, ext)
    (tmp_path / "pred" / "semantic").mkdir(parents=True)
    Image.fromarray(pred).save(tmp_path / "pred" / "semantic" / "img1.png")
    bench = open_benchmark(name, tmp_path / "d", "val")
    report = evaluate_benchmark(bench, tmp_path / "pred", workers=1)
    # a: tp 3, gt 4, pred 4 (one on b) -> 3/5; b: 3/5 likewise; c: tp 3, gt 4 (one predicted
    # unlabelled), pred 3 on labelled pixels (3 on ignore) -> 3/4.
    sem = report.semantic
    assert sem.n == 3
    assert sem.miou == pytest.approx(100 * (0.6 + 0.6 + 0.75) / 3)  # 65.0
    assert sem.pacc == pytest.approx(75.0)  # 9 of 12 labelled pixels
    assert sem.macc == pytest.approx(75.0)
    assert sem.fwiou == pytest.approx(65.0)  # equal class frequencies
    idx = {c["id"]: i for i, c in enumerate(bench.categories)}
    assert sem.per_class[idx[ids[2]]]["iou"] == pytest.approx(75.0)


# GT: stuff segment 1 (left half), thing segment 2 (top right), void (bottom right).
_GT_IDS = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 0, 0], [1, 1, 0, 0]])
# Prediction: stuff 5 takes 7 of segment 1 and one pixel of 2 (IoU 7/9); thing 6 takes 3 of
# segment 2 and one void pixel (IoU 3 / (4 + 4 - 3 - 1) = 3/4).
_PRED_IDS = np.array([[5, 5, 5, 6], [5, 5, 6, 6], [5, 5, 6, 0], [5, 0, 0, 0]])
_PQ = 100 * (7 / 9 + 3 / 4) / 2  # 76.39: both matched, RQ 100
_MIOU = 100 * (7 / 9 + 3 / 4) / 2  # stuff 7/9, thing 3/(4+3-3)


def _pred_folder(out: Path, stem: str, image_id: str, stuff: int, thing: int) -> Path:
    (out / "panoptic").mkdir(parents=True)
    Image.fromarray(id_to_rgb(_PRED_IDS)).save(out / "panoptic" / f"{stem}.png")
    segs = [{"id": 5, "category_id": stuff}, {"id": 6, "category_id": thing}]
    doc = {"annotations": [{"image_id": image_id, "file_name": f"{stem}.png",
                            "segments_info": segs}]}
    (out / "panoptic.json").write_text(json.dumps(doc))
    return out


def test_hand_checked_ade20k_150_panoptic(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for d in ("images/validation", "ade20k_panoptic_val", "annotations_detectron2/validation"):
        (base / d).mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(base / "images/validation/ADE_val_1.jpg")
    Image.fromarray(id_to_rgb(_GT_IDS)).save(base / "ade20k_panoptic_val/ADE_val_1.png")
    sem = np.where(_GT_IDS == 1, 0, np.where(_GT_IDS == 2, 12, 255)).astype(np.uint8)
    Image.fromarray(sem).save(base / "annotations_detectron2/validation/ADE_val_1.png")
    cats = [{"id": i, "name": f"c{i}", "isthing": int(i == 12)} for i in range(150)]
    segs = [{"id": 1, "category_id": 0, "iscrowd": 0}, {"id": 2, "category_id": 12, "iscrowd": 0}]
    (base / "ade20k_panoptic_val.json").write_text(json.dumps({
        "images": [{"id": "ADE_val_1", "file_name": "ADE_val_1.jpg", "height": 4, "width": 4}],
        "annotations": [{"image_id": "ADE_val_1", "file_name": "ADE_val_1.png",
                         "segments_info": segs}],
        "categories": cats,
    }))
    pred = _pred_folder(tmp_path / "pred", "ADE_val_1", "ADE_val_1", 0, 12)
    report = evaluate_benchmark(open_benchmark("ade20k_150", tmp_path, "val"), pred, workers=1)
    assert report.panoptic.all.pq == pytest.approx(_PQ)
    assert report.panoptic.all.rq == pytest.approx(100.0)
    assert report.panoptic.things.pq == pytest.approx(75.0)
    assert report.semantic.miou == pytest.approx(_MIOU)
    # The semantic ground truth is annotations_detectron2, not the panoptic PNG: label the void
    # quarter as class 0 there and the one predicted void pixel on it becomes a miss.
    sem[2:, 2:] = 0
    Image.fromarray(sem).save(base / "annotations_detectron2/validation/ADE_val_1.png")
    report = evaluate_benchmark(open_benchmark("ade20k_150", tmp_path, "val"), pred, workers=1)
    # class 0: gt 12 px, tp 7, pred 8 on labelled -> 7/13; class 12: gt 4, tp 3, pred 4 -> 3/5
    assert report.semantic.miou == pytest.approx(100 * (7 / 13 + 3 / 5) / 2)
    assert report.panoptic.all.pq == pytest.approx(_PQ)


def test_hand_checked_cityscapes_label_ids_map_to_train_ids(tmp_path):
    base = tmp_path / "cityscapes"
    (base / "leftImg8bit/val/aachen").mkdir(parents=True)
    (base / "gtFine/cityscapes_panoptic_val").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
        base / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png"
    )
    # road (label id 7, train id 0) as stuff segment id 7; car (label id 26, train id 13) as
    # instance 26001, cityscapesscripts' encoding.
    gt_ids = np.where(_GT_IDS == 1, 7, np.where(_GT_IDS == 2, 26001, 0))
    Image.fromarray(id_to_rgb(gt_ids)).save(
        base / "gtFine/cityscapes_panoptic_val/aachen_000000_000019_gtFine_panoptic.png"
    )
    from samcp.pipeline.benchmarks import CITYSCAPES_LABEL_IDS, CITYSCAPES_NAMES

    cats = [{"id": lid, "name": CITYSCAPES_NAMES[t], "isthing": int(t >= 11)}
            for t, lid in enumerate(CITYSCAPES_LABEL_IDS)]
    segs = [{"id": 7, "category_id": 7, "iscrowd": 0, "area": 8},
            {"id": 26001, "category_id": 26, "iscrowd": 0, "area": 4}]
    (base / "gtFine/cityscapes_panoptic_val.json").write_text(json.dumps({
        "images": [{"id": "aachen_000000_000019", "height": 4, "width": 4,
                    "file_name": "aachen_000000_000019_leftImg8bit.png"}],
        "annotations": [{"image_id": "aachen_000000_000019",
                         "file_name": "aachen_000000_000019_gtFine_panoptic.png",
                         "segments_info": segs}],
        "categories": cats,
    }))
    bench = open_benchmark("cityscapes", tmp_path, "val")
    assert bench.semantic_files() is None  # no labelTrainIds: derived from the panoptic PNG
    assert Path(bench.records[0].file_name).is_file()
    assert bench.file_stems() == {"aachen_000000_000019": "aachen_000000_000019_gtFine_panoptic"}
    pred = _pred_folder(
        tmp_path / "pred", "aachen_000000_000019_gtFine_panoptic", "aachen_000000_000019", 0, 13
    )
    report = evaluate_benchmark(bench, pred, workers=1)
    assert report.panoptic.all.pq == pytest.approx(_PQ)
    assert report.panoptic.stuff.n == 1 and report.panoptic.things.n == 1
    assert report.semantic.miou == pytest.approx(_MIOU)
    # a prediction in label ids (26 for car) is not in the benchmark's label space
    bad = _pred_folder(tmp_path / "bad", "aachen_000000_000019_gtFine_panoptic",
                       "aachen_000000_000019", 7, 26)
    with pytest.raises(SamcpError, match="unknown category_id 26"):
        evaluate_benchmark(bench, bad, workers=1)


def test_semantic_eval_refuses_a_value_outside_the_label_space(tmp_path):
    pred = _hand_semantic(tmp_path / "d", "pascal_voc_20", (1, 2, 3), 255, np.uint8, ".png")
    pred[0, 0] = 40
    (tmp_path / "pred" / "semantic").mkdir(parents=True)
    Image.fromarray(pred).save(tmp_path / "pred" / "semantic" / "img1.png")
    with pytest.raises(SamcpError, match="class 40 but there are only 20 classes"):
        evaluate_benchmark(open_benchmark("pascal_voc_20", tmp_path / "d"), tmp_path / "pred",
                           workers=1)
