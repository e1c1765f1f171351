"""Instance AP through pycocotools on ground truth derived from panoptic annotations."""

from __future__ import annotations

import numpy as np
import pytest

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.evaluation.formats import Category
from samcp.pipeline.evaluation.instance import (
    encode_mask,
    evaluate_instances,
    ground_truth_instances,
)

# Category id 0 is a real thing class here on purpose.
CATS = [Category(0, "zero", True, 0), Category(7, "seven", True, 1), Category(9, "sky", False, 2)]
BY_ID = {c.id: c for c in CATS}
H, W = 20, 30


def image() -> tuple[np.ndarray, list[dict]]:
    ids = np.zeros((H, W), dtype=np.uint32)
    ids[:, :] = 9  # sky
    ids[2:8, 2:8] = 1  # zero #1
    ids[10:18, 15:25] = 2  # zero #2
    ids[2:6, 20:28] = 3  # seven (crowd)
    segs = [
        {"id": 9, "category_id": 9, "iscrowd": 0},
        {"id": 1, "category_id": 0, "iscrowd": 0},
        {"id": 2, "category_id": 0, "iscrowd": 0},
        {"id": 3, "category_id": 7, "iscrowd": 1},
    ]
    return ids, segs


def det(img, cat, mask, score):
    return {"image_id": img, "category_id": cat, "segmentation": encode_mask(mask), "score": score}


def setup():
    ids, segs = image()
    gt = {"img-a": ground_truth_instances(ids, segs, BY_ID)}
    return ids, gt, {"img-a": (H, W)}


def test_ground_truth_holds_things_only_with_crowd_flag():
    ids, segs = image()
    anns = ground_truth_instances(ids, segs, BY_ID)
    assert [(a["category_id"], a["iscrowd"]) for a in anns] == [(0, 0), (0, 0), (7, 1)]
    assert anns[1]["area"] == 80.0 and anns[1]["bbox"] == [15.0, 10.0, 10.0, 8.0]


def test_perfect_predictions_give_ap_100():
    ids, gt, sizes = setup()
    dets = [det("img-a", 0, ids == 1, 0.9), det("img-a", 0, ids == 2, 0.8)]
    r = evaluate_instances(gt, sizes, CATS, dets)
    assert r.ap == pytest.approx(100.0) and r.ap50 == pytest.approx(100.0)
    assert r.per_class[0]["ap"] == pytest.approx(100.0)
    # Category 7 has only a crowd region: nothing to evaluate.
    assert r.per_class[7]["ap"] is None


def test_one_of_two_found_gives_the_101_point_value():
    ids, gt, sizes = setup()
    r = evaluate_instances(gt, sizes, CATS, [det("img-a", 0, ids == 2, 0.9)])
    # Recall reaches 0.5 with precision 1: recall thresholds 0.00..0.50 (51 of 101) score 1.
    assert r.ap == pytest.approx(100 * 51 / 101)
    assert r.ap75 == pytest.approx(100 * 51 / 101)


def test_false_positive_ranked_first_halves_precision():
    ids, gt, sizes = setup()
    background = np.zeros((H, W), dtype=bool)
    background[12:18, 0:6] = True
    dets = [det("img-a", 0, background, 0.95), det("img-a", 0, ids == 1, 0.5)]
    r = evaluate_instances(gt, sizes, CATS, dets)
    # Precision 1/2 at recall 1/2, interpolated over recall 0.00..0.50.
    assert r.ap == pytest.approx(100 * 0.5 * 51 / 101)


def test_detection_on_crowd_is_ignored():
    ids, gt, sizes = setup()
    dets = [
        det("img-a", 7, ids == 3, 0.99),
        det("img-a", 0, ids == 1, 0.5),
        det("img-a", 0, ids == 2, 0.4),
    ]
    r = evaluate_instances(gt, sizes, CATS, dets)
    assert r.ap == pytest.approx(100.0)


def test_stuff_detections_are_not_evaluated_and_counted():
    ids, gt, sizes = setup()
    dets = [
        det("img-a", 0, ids == 1, 0.9),
        det("img-a", 0, ids == 2, 0.9),
        det("img-a", 9, ids == 9, 0.9),
    ]
    r = evaluate_instances(gt, sizes, CATS, dets)
    assert r.ap == pytest.approx(100.0)
    assert r.ignored_stuff_detections == 1 and r.num_detections == 2


def test_no_detections_gives_zero():
    _, gt, sizes = setup()
    r = evaluate_instances(gt, sizes, CATS, [])
    assert r.ap == 0.0


def test_bytes_counts_are_accepted():
    ids, gt, sizes = setup()
    d = det("img-a", 0, ids == 1, 0.9)
    d["segmentation"]["counts"] = d["segmentation"]["counts"].encode()
    r = evaluate_instances(gt, sizes, CATS, [d, det("img-a", 0, ids == 2, 0.8)])
    assert r.ap == pytest.approx(100.0)


def test_no_thing_class_gives_none():
    cats = [Category(9, "sky", False, 0)]
    assert evaluate_instances({"a": []}, {"a": (H, W)}, cats, []) is None


@pytest.mark.parametrize(
    "change,match",
    [
        ({"image_id": "nope"}, "image_id nope"),
        ({"category_id": 42}, "unknown category_id 42"),
        ({"segmentation": encode_mask(np.ones((5, 5), bool))}, "original image size"),
        ({"score": None}, "needs image_id"),
    ],
)
def test_bad_detections_are_errors(change, match):
    ids, gt, sizes = setup()
    d = det("img-a", 0, ids == 1, 0.9)
    d.update(change)
    with pytest.raises(SamcpError, match=match):
        evaluate_instances(gt, sizes, CATS, [d])
