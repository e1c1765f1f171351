"""The proposal oracle: IoP assignment, merging, painting order, crowd, and its evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.evaluation import build_oracle_predictions, evaluate, read_panoptic_png
from samcp.pipeline.evaluation.formats import write_panoptic_folder

CATS = [
    {"id": 1, "name": "thing", "isthing": 1},
    {"id": 2, "name": "stuff", "isthing": 0},
    {"id": 3, "name": "other", "isthing": 1},
]
H, W = 10, 12


def rle(mask: np.ndarray) -> dict:
    # Cache style: bytes counts.
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def gt_image() -> tuple[np.ndarray, list[dict]]:
    ids = np.full((H, W), 5, dtype=np.uint32)  # stuff background, id 5
    ids[1:5, 1:5] = 1  # thing, 16 px
    ids[6:9, 6:11] = 2  # thing, 15 px
    ids[0:3, 8:12] = 3  # crowd of "other"
    ids[9, :] = 0  # void row
    segs = [
        {"id": 5, "category_id": 2, "iscrowd": 0, "area": int((ids == 5).sum())},
        {"id": 1, "category_id": 1, "iscrowd": 0, "area": 16},
        {"id": 2, "category_id": 1, "iscrowd": 0, "area": 15},
        {"id": 3, "category_id": 3, "iscrowd": 1, "area": 12},
    ]
    return ids, segs


@pytest.fixture
def gt(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    ids, segs = gt_image()
    write_panoptic_folder(tmp_path / "gt.json", tmp_path / "gt", [("a", ids, segs)], CATS)
    return tmp_path / "gt.json", tmp_path / "gt", ids


def test_exact_proposals_give_a_perfect_oracle(gt, tmp_path):
    gj, gp, ids = gt
    props = {"a": [rle(ids == i) for i in (5, 1, 2, 3)]}
    stats = build_oracle_predictions(gj, gp, props, tmp_path / "oracle")
    assert (stats.proposals, stats.assigned, stats.images_without_proposals) == (4, 4, 0)
    r = evaluate(gj, gp, tmp_path / "oracle", workers=1)
    assert r.panoptic.all.pq == pytest.approx(100.0)
    assert r.semantic.miou == pytest.approx(100.0)  # crowd pixels get their class
    assert r.instance is not None and r.instance.ap == pytest.approx(100.0)


def test_fragments_are_merged_and_labelled_with_the_true_class(gt, tmp_path):
    gj, gp, ids = gt
    left = (ids == 1) & (np.arange(W) < 3)
    right = (ids == 1) & (np.arange(W) >= 3)
    build_oracle_predictions(gj, gp, {"a": [rle(left), rle(right)]}, tmp_path / "o")
    pan = read_panoptic_png(tmp_path / "o" / "panoptic" / "a.png")
    assert np.array_equal(pan == 1, ids == 1)
    info = json.loads((tmp_path / "o" / "panoptic.json").read_text())["annotations"][0]
    assert info["segments_info"] == [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 16}]


def test_iop_threshold_is_exclusive(gt, tmp_path):
    gj, gp, ids = gt
    # 8 px on thing 1 and 8 px on stuff: IoP 0.5 with both -> assigned to nobody.
    half = np.zeros((H, W), bool)
    half[1:5, 3:7] = True
    assert (half & (ids == 1)).sum() == 8 and (half & (ids == 5)).sum() == 8
    stats = build_oracle_predictions(gj, gp, {"a": [rle(half)]}, tmp_path / "o")
    assert stats.assigned == 0
    stats = build_oracle_predictions(gj, gp, {"a": [rle(half)]}, tmp_path / "o", threshold=0.4)
    assert stats.assigned == 1  # tie: the first listed segment (stuff, id 5) wins


def test_smaller_merged_masks_are_painted_on_top(gt, tmp_path):
    gj, gp, ids = gt
    big = ids == 5  # whole stuff region
    sloppy = (ids == 1).copy()
    sloppy[1:5, 5] = True  # spills 4 px onto the stuff
    build_oracle_predictions(gj, gp, {"a": [rle(big), rle(sloppy)]}, tmp_path / "o")
    pan = read_panoptic_png(tmp_path / "o" / "panoptic" / "a.png")
    assert np.array_equal(pan == 1, sloppy)


def test_crowd_is_void_in_panoptic_and_absent_from_instances(gt, tmp_path):
    gj, gp, ids = gt
    build_oracle_predictions(gj, gp, {"a": [rle(ids == 3)]}, tmp_path / "o")
    pan = read_panoptic_png(tmp_path / "o" / "panoptic" / "a.png")
    assert (pan == 0).all()
    assert json.loads((tmp_path / "o" / "instances.json").read_text()) == []
    from PIL import Image

    sem = np.asarray(Image.open(tmp_path / "o" / "semantic" / "a.png"))
    assert (sem[ids == 3] == 2).all() and (sem[ids != 3] == 255).all()


def test_images_without_proposals_are_all_void(gt, tmp_path):
    gj, gp, _ = gt
    stats = build_oracle_predictions(gj, gp, [], tmp_path / "o")
    assert stats.images_without_proposals == 1
    r = evaluate(gj, gp, tmp_path / "o", workers=1)
    assert r.panoptic.all.pq == 0.0


def test_unknown_image_is_an_error_and_leaves_nothing(gt, tmp_path):
    gj, gp, ids = gt
    with pytest.raises(SamcpError, match="image zz is not in the ground truth"):
        build_oracle_predictions(gj, gp, [("zz", [rle(ids == 1)])], tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_wrong_proposal_size_is_an_error(gt, tmp_path):
    gj, gp, _ = gt
    with pytest.raises(SamcpError, match="original image size"):
        build_oracle_predictions(gj, gp, {"a": [rle(np.ones((4, 4), bool))]}, tmp_path / "o")


def test_multiprocess_output_equals_single_process(gt, tmp_path):
    gj, gp, ids = gt
    props = {"a": [rle(ids == 1), rle(ids == 5), rle((ids == 2) | (ids == 1))]}
    build_oracle_predictions(gj, gp, props, tmp_path / "o1", workers=1)
    build_oracle_predictions(gj, gp, props, tmp_path / "o2", workers=2)
    for f in ("panoptic.json", "instances.json"):
        assert (tmp_path / "o1" / f).read_text() == (tmp_path / "o2" / f).read_text()
    png = "panoptic/a.png"
    assert (tmp_path / "o1" / png).read_bytes() == (tmp_path / "o2" / png).read_bytes()
