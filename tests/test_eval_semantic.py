"""Semantic metrics: confusion matrix, ignore label, detectron2's and mmseg's mIoU rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.evaluation import evaluate
from samcp.pipeline.evaluation.formats import write_panoptic_folder
from samcp.pipeline.evaluation.semantic import (
    confusion_from_labels,
    labels_from_png,
    semantic_metrics,
)

K = 4
# Pixels 0-5 are labelled, 6-7 are ignore (255).
GT = np.array([[0, 0, 0, 0, 1, 1, 255, 255]], dtype=np.uint8)
# Pixel 3 is unlabelled (255) on class 0: it counts as wrong. Class 2 is predicted only on
# ignored ground truth; class 3 is predicted on a class-1 pixel but has no ground truth.
PRED = np.array([[0, 0, 1, 255, 1, 3, 0, 2]], dtype=np.uint8)


def conf() -> np.ndarray:
    return confusion_from_labels(labels_from_png(PRED, K), labels_from_png(GT, K), K)


def test_confusion_ignores_255_ground_truth():
    c = conf()
    assert c.shape == (K + 1, K + 1)
    assert c[:, :K].sum() == 6  # only labelled ground-truth pixels
    assert c[K, 0] == 1  # unlabelled prediction on class 0


def test_detectron2_rule_counts_only_classes_with_ground_truth():
    r = semantic_metrics(conf(), "detectron2")
    # class 0: tp 2, gt 4, pred 2 -> IoU 2/4; class 1: tp 1, gt 2, pred 2 -> IoU 1/3.
    assert r.per_class[0]["iou"] == pytest.approx(50.0)
    assert r.per_class[1]["iou"] == pytest.approx(100 / 3)
    assert r.per_class[2]["iou"] is None and r.per_class[3]["iou"] is None
    assert r.n == 2
    assert r.miou == pytest.approx((50.0 + 100 / 3) / 2)
    assert r.pacc == pytest.approx(50.0)  # 3 correct of 6 labelled
    assert r.macc == pytest.approx(50.0)  # (2/4 + 1/2) / 2
    assert r.fwiou == pytest.approx(100 * (4 / 6 * 0.5 + 2 / 6 / 3))


def test_mmseg_rule_also_counts_predicted_only_classes():
    r = semantic_metrics(conf(), "mmseg")
    # Class 3 has union 1 and IoU 0; class 2's only prediction is on ignore, so union 0.
    assert r.per_class[3]["iou"] == 0.0
    assert r.per_class[2]["iou"] is None
    assert r.n == 3
    assert r.miou == pytest.approx((50.0 + 100 / 3 + 0.0) / 3)
    assert r.pacc == pytest.approx(50.0) and r.macc == pytest.approx(50.0)


def test_unlabelled_prediction_is_wrong_not_ignored():
    perfect = np.array([[0, 0, 0, 0, 1, 1, 7, 7]], dtype=np.uint8)
    perfect[0, 6:] = 255
    c_ok = confusion_from_labels(labels_from_png(perfect, K), labels_from_png(GT, K), K)
    holey = perfect.copy()
    holey[0, 0] = 255
    c_hole = confusion_from_labels(labels_from_png(holey, K), labels_from_png(GT, K), K)
    assert semantic_metrics(c_ok).miou == pytest.approx(100.0)
    r = semantic_metrics(c_hole)
    assert r.per_class[0]["iou"] == pytest.approx(75.0)
    assert r.pacc == pytest.approx(500 / 6)


def test_all_ignored_gives_not_applicable():
    c = np.zeros((K + 1, K + 1), dtype=np.int64)
    c[0, K] = 10
    r = semantic_metrics(c)
    assert r.miou is None and r.pacc is None and r.n == 0


def test_out_of_range_prediction_is_an_error():
    with pytest.raises(SamcpError, match="only 4 classes"):
        confusion_from_labels(np.array([[9]]), np.array([[0]]), K)


def test_unknown_rule_is_an_error():
    with pytest.raises(SamcpError, match="unknown semantic rule"):
        semantic_metrics(conf(), "voc")  # type: ignore[arg-type]


def test_confusion_is_accumulated_over_images():
    a = confusion_from_labels(np.array([[0, 0]]), np.array([[0, 1]]), 2)
    b = confusion_from_labels(np.array([[1, 1, 1, 1]]), np.array([[1, 1, 1, 1]]), 2)
    r = semantic_metrics(a + b)
    # Class 1: tp 4, gt 5, pred 4 -> 80%; averaging per image would give (0 + 100) / 2.
    assert r.per_class[1]["iou"] == pytest.approx(80.0)


# ---------------------------------------------------------------------------------------------
# End to end: semantic from the panoptic output vs from the model's semantic PNGs.

CATS = [{"id": 3, "name": "a", "isthing": 1}, {"id": 9, "name": "b", "isthing": 0}]


def _case(tmp_path: Path) -> Path:
    gt = np.array([[1, 1, 2, 2, 0, 0]], dtype=np.uint32)
    segs = [
        {"id": 1, "category_id": 3, "iscrowd": 0, "area": 2},
        {"id": 2, "category_id": 9, "iscrowd": 1, "area": 2},
    ]
    write_panoptic_folder(tmp_path / "gt.json", tmp_path / "gt", [("i", gt, segs)], CATS)
    pred = np.array([[5, 0, 6, 6, 6, 5]], dtype=np.uint32)
    write_panoptic_folder(
        tmp_path / "pred" / "panoptic.json",
        tmp_path / "pred" / "panoptic",
        [("i", pred, [{"id": 5, "category_id": 3}, {"id": 6, "category_id": 9}])],
    )
    return tmp_path


def test_semantic_derived_from_panoptic_output(tmp_path):
    root = _case(tmp_path)
    r = evaluate(root / "gt.json", root / "gt", root / "pred", workers=1)
    assert r.semantic_source == "panoptic"
    # Crowd pixels are labelled with their class in the semantic ground truth.
    # Class a (idx 0): gt 2 px, pred on labelled gt 1 px (pixel 0), void at pixel 1 -> IoU 1/2.
    # Class b (idx 1): gt 2 px, predicted there 2 px -> IoU 1.
    assert r.semantic.per_class[0]["iou"] == pytest.approx(50.0)
    assert r.semantic.per_class[1]["iou"] == pytest.approx(100.0)
    assert r.semantic.pacc == pytest.approx(75.0)


def test_semantic_png_is_used_when_present(tmp_path):
    root = _case(tmp_path)
    (root / "pred" / "semantic").mkdir()
    sem = np.array([[0, 0, 1, 0, 255, 255]], dtype=np.uint8)
    Image.fromarray(sem).save(root / "pred" / "semantic" / "i.png")
    r = evaluate(root / "gt.json", root / "gt", root / "pred", workers=1)
    assert r.semantic_source == "semantic"
    assert r.semantic.per_class[0]["iou"] == pytest.approx(100 * 2 / 3)
    assert r.semantic.per_class[1]["iou"] == pytest.approx(50.0)
    r2 = evaluate(root / "gt.json", root / "gt", root / "pred", workers=1, semantic_rule="mmseg")
    assert r2.semantic.miou == pytest.approx(r.semantic.miou)


def test_missing_semantic_png_is_an_error(tmp_path):
    root = _case(tmp_path)
    (root / "pred" / "semantic").mkdir()
    with pytest.raises(SamcpError, match="i.png"):
        evaluate(root / "gt.json", root / "gt", root / "pred", workers=1)
