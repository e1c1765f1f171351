"""Panoptic quality: hand-built cases for each of panopticapi's rules, and synth invariants."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.evaluation import evaluate
from samcp.pipeline.evaluation.formats import Category, write_panoptic_folder
from samcp.pipeline.evaluation.panoptic import (
    PQCounts,
    count_pairs,
    pq_average,
    pq_image,
    summarize_panoptic,
)

A, B = 1, 2  # a thing and a stuff category
CATS = {A: Category(A, "a", True, 0), B: Category(B, "b", False, 1)}
COCO_CATS = [{"id": A, "name": "a", "isthing": 1}, {"id": B, "name": "b", "isthing": 0}]


def ids(rows: list[str]) -> np.ndarray:
    """A small id map from strings: '.' is 0 (void), digits are segment ids."""
    return np.array([[0 if ch == "." else int(ch) for ch in row] for row in rows], dtype=np.uint32)


def seg(sid: int, cat: int, area: int | None = None, crowd: int = 0) -> dict:
    s = {"id": sid, "category_id": cat, "iscrowd": crowd}
    if area is not None:
        s["area"] = area
    return s


def run(gt: np.ndarray, gt_segs: list[dict], pred: np.ndarray, pred_segs: list[dict]):
    return pq_image(count_pairs(gt, pred), gt_segs, pred_segs, CATS, where="img")


def counts(stats: dict, cat: int) -> tuple[float, int, int, int]:
    c = stats.get(cat, PQCounts())
    return c.iou, c.tp, c.fp, c.fn


def test_iou_exactly_half_does_not_match():
    gt = ids(["1111"])
    # Prediction covers 2 of 4 pixels and nothing else: IoU = 2 / 4 = 0.5, not > 0.5.
    stats = run(gt, [seg(1, A, 4)], ids(["2233"]), [seg(2, A), seg(3, B)])
    assert counts(stats, A) == (0.0, 0, 1, 1)
    # Three of four pixels: IoU 0.75 matches.
    stats = run(gt, [seg(1, A, 4)], ids(["2223"]), [seg(2, A), seg(3, B)])
    assert counts(stats, A) == (0.75, 1, 0, 0)


def test_void_overlap_shrinks_the_union():
    gt = ids(["1111", "...."])
    pred = ids(["2223", "2223"])
    # Pred 2 has 3 px on segment 1 and 3 px on void: union = 6 + 4 - 3 - 3 = 4, IoU 0.75.
    # Without the void term it would be 3 / 7 < 0.5 and not match.
    stats = run(gt, [seg(1, A, 4)], pred, [seg(2, A), seg(3, B)])
    iou, tp, fp, fn = counts(stats, A)
    assert (tp, fp, fn) == (1, 0, 0)
    assert iou == pytest.approx(0.75)


@pytest.mark.parametrize("void_px,expect_fp", [(2, 1), (3, 0)])
def test_false_positive_ignored_only_above_half_on_void(void_px, expect_fp):
    # An unmatched 4-px prediction of A on stuff B and void: exactly 50% on void is still an FP.
    gt = ids(["." * void_px + "1" * (4 - void_px) + "1111"])
    pred = ids(["2222" + "3333"])
    stats = run(gt, [seg(1, B, 8 - void_px)], pred, [seg(2, A), seg(3, B)])
    assert counts(stats, A)[2] == expect_fp


def test_crowd_absorbs_predictions_of_its_own_category_only():
    gt = ids(["1112", "1112"])
    pred = ids(["3333", "3333"])  # 6 px on crowd 1, 2 px on segment 2 (stuff B)
    crowd_a = [seg(1, A, 6, crowd=1), seg(2, B, 2)]
    # Same category as the crowd: 6/8 of the prediction lies on crowd -> ignored, and the crowd
    # is never a false negative.
    stats = run(gt, crowd_a, pred, [seg(3, A)])
    assert counts(stats, A) == (0.0, 0, 0, 0)
    assert counts(stats, B) == (0.0, 0, 0, 1)
    # Crowd of another category does not absorb it.
    crowd_b = [seg(1, B, 6, crowd=1), seg(2, B, 2)]
    stats = run(gt, crowd_b, pred, [seg(3, A)])
    assert counts(stats, A) == (0.0, 0, 1, 0)
    assert counts(stats, B) == (0.0, 0, 0, 1)


def test_crowd_is_never_a_true_positive():
    gt = ids(["11.."])
    stats = run(gt, [seg(1, A, 2, crowd=1)], ids(["22.."]), [seg(2, A)])
    assert counts(stats, A) == (0.0, 0, 0, 0)


def test_last_crowd_of_a_category_is_the_one_that_absorbs():
    # panopticapi keeps one crowd per category in a dict, so the last listed wins.
    gt = ids(["1122"])
    pred = ids(["3333"])
    first_listed_last = [seg(2, A, 2, crowd=1), seg(1, A, 2, crowd=1)]
    stats = run(gt, first_listed_last, pred, [seg(3, A)])
    # Crowd 1 absorbs 2 of 4 px: exactly half, so it is a false positive.
    assert counts(stats, A)[2] == 1


def test_ground_truth_area_comes_from_json_not_png():
    gt = ids(["1111"])
    pred = ids(["2222"])
    # PNG has 4 px but the JSON says 6: IoU = 4 / (4 + 6 - 4) = 2/3.
    iou, tp, _, _ = counts(run(gt, [seg(1, A, 6)], pred, [seg(2, A)]), A)
    assert tp == 1 and iou == pytest.approx(2 / 3)
    # JSON says 8: IoU = 4 / 8 = 0.5, no match.
    assert counts(run(gt, [seg(1, A, 8)], pred, [seg(2, A)]), A) == (0.0, 0, 1, 1)
    # No area in the JSON: the PNG count is used.
    assert counts(run(gt, [seg(1, A)], pred, [seg(2, A)]), A) == (1.0, 1, 0, 0)


def test_different_category_never_matches():
    stats = run(ids(["1111"]), [seg(1, A, 4)], ids(["2222"]), [seg(2, B)])
    assert counts(stats, A) == (0.0, 0, 0, 1)
    assert counts(stats, B) == (0.0, 0, 1, 0)


def test_category_with_only_false_positives_counts_absent_one_is_excluded():
    cats = [Category(1, "a", True, 0), Category(2, "b", True, 1), Category(3, "c", False, 2)]
    totals = {1: PQCounts(iou=1.0, tp=1), 2: PQCounts(fp=3)}
    summary, per_class = pq_average(totals, cats, None)
    assert summary.n == 2
    assert summary.pq == pytest.approx(50.0)  # (100 + 0) / 2; category 3 is left out
    assert per_class[2]["pq"] == 0.0 and per_class[2]["fp"] == 3
    assert per_class[3]["pq"] is None


def test_sq_is_zero_when_there_is_no_true_positive():
    cats = [Category(1, "a", True, 0)]
    summary, _per_class = pq_average({1: PQCounts(fn=2, fp=1)}, cats, None)
    assert (summary.pq, summary.sq, summary.rq, summary.n) == (0.0, 0.0, 0.0, 1)


def test_empty_split_is_not_applicable():
    cats = [Category(1, "a", True, 0), Category(2, "b", False, 1)]
    res = summarize_panoptic({1: PQCounts(iou=0.9, tp=1)}, cats)
    assert res.things.pq == pytest.approx(90.0)
    assert res.stuff.pq is None and res.stuff.n == 0
    assert res.all.pq == pytest.approx(90.0) and res.all.n == 1


def test_per_class_pq_is_sq_times_rq():
    cats = [Category(1, "a", True, 0)]
    summary, _ = pq_average({1: PQCounts(iou=2.4, tp=3, fp=1, fn=2)}, cats, None)
    assert summary.rq == pytest.approx(100 * 3 / 4.5)
    assert summary.sq == pytest.approx(80.0)
    assert summary.pq == pytest.approx(summary.sq * summary.rq / 100)


# ---------------------------------------------------------------------------------------------
# End to end through files.


def write_case(root: Path, gt_images, pred_images, categories=COCO_CATS):
    write_panoptic_folder(root / "gt.json", root / "gt", gt_images, categories)
    write_panoptic_folder(root / "pred" / "panoptic.json", root / "pred" / "panoptic", pred_images)
    return root / "gt.json", root / "gt", root / "pred"


def test_counts_are_summed_over_the_dataset_before_averaging(tmp_path):
    gt = ids(["1111"])
    images_gt = [("x", gt, [seg(1, A, 4)]), ("y", gt, [seg(1, A, 4)])]
    images_pred = [("x", ids(["1111"]), [seg(1, A)]), ("y", ids(["...."]), [])]
    gj, gp, pd = write_case(tmp_path, images_gt, images_pred)
    report = evaluate(gj, gp, pd, workers=1)
    # One TP (IoU 1) and one FN summed: PQ = 1 / (1 + 0.5) = 66.7, not the mean of 100 and 0.
    assert report.panoptic.all.pq == pytest.approx(200 / 3)
    assert report.panoptic.things.n == 1 and report.panoptic.stuff.pq is None


def test_string_and_int_image_ids_are_compared_as_strings(tmp_path):
    gt = ids(["1122"])
    segs = [seg(1, A, 2), seg(2, B, 2)]
    gj, gp, pd = write_case(
        tmp_path, [(7, gt, segs), ("img-b", gt, segs)], [("7", gt, segs), ("img-b", gt, segs)]
    )
    report = evaluate(gj, gp, pd, workers=1)
    assert report.panoptic.all.pq == pytest.approx(100.0)
    assert report.num_images == 2


def test_category_id_zero_is_a_real_class(tmp_path):
    cats = [{"id": 0, "name": "zero", "isthing": 1}, {"id": 5, "name": "five", "isthing": 0}]
    gt = ids(["1122"])
    gj, gp, pd = write_case(
        tmp_path,
        [("a", gt, [seg(1, 0, 2), seg(2, 5, 2)])],
        [("a", ids(["11.."]), [seg(1, 0)])],
        cats,
    )
    report = evaluate(gj, gp, pd, workers=1)
    assert report.panoptic.per_class[0]["tp"] == 1
    assert report.panoptic.per_class[5]["fn"] == 1
    assert report.panoptic.things.pq == pytest.approx(100.0)
    assert report.panoptic.all.pq == pytest.approx(50.0) and report.panoptic.all.n == 2


@pytest.mark.parametrize(
    "pred_segs,pred_map,match",
    [
        ([seg(1, A)], ids(["1133"]), "segment id 3 is in the predicted PNG"),
        ([seg(1, A), seg(3, 99)], ids(["1133"]), "unknown category_id 99"),
        ([seg(1, A), seg(4, A)], ids(["1111"]), r"segment ids \[4\]"),
    ],
)
def test_inconsistent_predictions_name_the_image_and_segment(tmp_path, pred_segs, pred_map, match):
    gj, gp, pd = write_case(
        tmp_path, [("im1", ids(["1111"]), [seg(1, A, 4)])], [("im1", pred_map, pred_segs)]
    )
    with pytest.raises(SamcpError, match=match) as info:
        evaluate(gj, gp, pd, workers=1)
    assert "im1" in str(info.value)


def test_missing_prediction_for_a_ground_truth_image(tmp_path):
    gj, gp, pd = write_case(
        tmp_path,
        [("a", ids(["11"]), [seg(1, A, 2)]), ("b", ids(["11"]), [seg(1, A, 2)])],
        [("a", ids(["11"]), [seg(1, A)])],
    )
    with pytest.raises(SamcpError, match="no prediction for ground-truth image b"):
        evaluate(gj, gp, pd, workers=1)


def test_prediction_png_of_the_wrong_size(tmp_path):
    gj, gp, pd = write_case(
        tmp_path, [("a", ids(["11"]), [seg(1, A, 2)])], [("a", ids(["111"]), [seg(1, A)])]
    )
    with pytest.raises(SamcpError, match="original image size"):
        evaluate(gj, gp, pd, workers=1)


# ---------------------------------------------------------------------------------------------
# Randomized: synth data with perturbed predictions.


@pytest.fixture(scope="module")
def synth_gt(tmp_path_factory):
    from samcp.pipeline.evaluation import resolve_ground_truth
    from samcp.pipeline.synth import make_synthetic_dataset

    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("synth") / "ds",
        seed=11,
        num_train=0,
        num_val=24,
        height=64,
        width=96,
        crowd_fraction=0.5,
    )
    return resolve_ground_truth(root, "val2017")


def test_perfect_prediction_scores_100_on_synth(synth_gt, tmp_path):
    from samcp.pipeline.evaluation.perturb import write_perturbed_predictions

    gj, gp = synth_gt
    pd = write_perturbed_predictions(gj, gp, tmp_path / "pred")
    r = evaluate(gj, gp, pd, workers=1)
    for s in (r.panoptic.all, r.panoptic.things, r.panoptic.stuff):
        assert (s.pq, s.sq, s.rq) == (pytest.approx(100.0),) * 3
    assert r.semantic.miou == pytest.approx(100.0)
    assert r.instance is not None and r.instance.ap == pytest.approx(100.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perturbed_predictions_obey_invariants(synth_gt, tmp_path, seed):
    import json

    from samcp.pipeline.evaluation.perturb import write_perturbed_predictions

    gj, gp = synth_gt
    pd = write_perturbed_predictions(
        gj, gp, tmp_path / "pred", seed=seed, p_drop=0.2, p_relabel=0.2, p_shift=0.4
    )
    r = evaluate(gj, gp, pd, workers=1)
    assert 0 < r.panoptic.all.pq < 100
    for row in r.panoptic.per_class.values():
        if row["pq"] is None:
            continue
        assert row["pq"] == pytest.approx(row["sq"] * row["rq"] / 100)
        assert 0 <= row["pq"] <= row["rq"] <= 100
        # Every matched segment has IoU > 0.5.
        assert row["tp"] == 0 or row["sq"] > 50
    # Every non-crowd ground-truth segment is either a TP or an FN.
    gt = json.loads(Path(gj).read_text())
    non_crowd = sum(1 for a in gt["annotations"] for s in a["segments_info"] if not s["iscrowd"])
    per = r.panoptic.per_class.values()
    assert sum(row["tp"] + row["fn"] for row in per) == non_crowd
    pred = json.loads((pd / "panoptic.json").read_text())
    assert sum(row["tp"] + row["fp"] for row in per) <= sum(
        len(a["segments_info"]) for a in pred["annotations"]
    )
    # Results do not depend on the number of worker processes.
    r2 = evaluate(gj, gp, pd, workers=2)
    assert r2.to_dict(per_class=True) == r.to_dict(per_class=True)
    assert not math.isnan(r.semantic.miou)


def test_ids_round_trip_through_png_with_all_three_channels(tmp_path):
    from samcp.pipeline.evaluation import read_panoptic_png, write_panoptic_png

    ids = np.array([[0, 1, 255, 256], [65535, 65536, 16777215, 4_000_000]], dtype=np.uint32)
    write_panoptic_png(tmp_path / "x.png", ids)
    assert np.array_equal(read_panoptic_png(tmp_path / "x.png"), ids)
