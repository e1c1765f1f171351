"""samcp.models.compose: the Mask2Former rule for binary masks and SAM-CP's region composition."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samcp.models import compose
from samcp.models.compose import (
    NO_CLASS,
    compose_masks,
    compose_regions,
    semantic_label_map,
    union_rle,
)
from samcp.models.heads import CompositionParams

H, W = 6, 8


def rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def box(r0: int, r1: int, c0: int, c1: int, h: int = H, w: int = W) -> np.ndarray:
    """Rows r0..r1-1, columns c0..c1-1."""
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


def params(**kw) -> CompositionParams:
    return CompositionParams(
        **{"score_thresh": 0.5, "overlap_thresh": 0.8, "stuff_area_min": 0, **kw}
    )


# --- compose_masks: panoptic ------------------------------------------------------------------


def test_mask_hidden_70_percent_is_dropped() -> None:
    a = box(0, H, 0, 4)  # 24 px
    b = np.zeros((H, W), bool)  # 10 px, 7 under a
    b[5, 0:4] = True
    b[4, 0:3] = True
    b[4, 5:8] = True
    probs = np.array([[0.9, 0.1], [0.8, 0.2]])
    isthing = np.array([True, True])
    res = compose_masks("x", H, W, [rle(a), rle(b)], probs, isthing, params())
    assert [s["id"] for s in res.segments] == [1]
    assert res.segments[0] == {"id": 1, "label": 0, "isthing": True, "score": 0.9, "area": 24}
    assert (res.panoptic[a] == 1).all() and (res.panoptic[~a] == 0).all()  # b's own part is void
    kept = compose_masks("x", H, W, [rle(a), rle(b)], probs, isthing, params(overlap_thresh=0.3))
    assert [(s["id"], s["area"]) for s in kept.segments] == [(1, 24), (2, 3)]
    assert (kept.panoptic[4, 5:8] == 2).all()


def test_higher_score_wins_contested_pixels_and_ties_go_to_lower_index() -> None:
    a, b = box(0, H, 0, 5), box(0, H, 3, 8)  # overlap: columns 3-4
    probs = np.array([[0.7, 0.0], [0.0, 0.9]])
    res = compose_masks(
        "x", H, W, [rle(a), rle(b)], probs, np.array([True, True]), params(overlap_thresh=0.5)
    )
    expected = np.zeros((H, W), np.int32)
    expected[:, 3:] = 1  # b, the better, is created first
    expected[:, :3] = 2
    np.testing.assert_array_equal(res.panoptic, expected)
    assert [(s["label"], s["area"]) for s in res.segments] == [(1, 30), (0, 18)]
    tie = np.array([[0.8, 0.0], [0.0, 0.8]])
    res = compose_masks(
        "x", H, W, [rle(a), rle(b)], tie, np.array([True, True]), params(overlap_thresh=0.5)
    )
    assert res.segments[0]["label"] == 0 and (res.panoptic[:, :5] == 1).all()


def test_stuff_masks_of_one_class_merge_and_small_stuff_is_void() -> None:
    thing, left, right, small = box(0, 2, 0, 8), box(2, H, 0, 3), box(2, H, 5, 8), box(2, 4, 3, 5)
    probs = np.array([[0.95, 0.0, 0.0], [0.0, 0.8, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 0.9]])
    isthing = np.array([True, False, False])
    rles = [rle(m) for m in (thing, left, right, small)]
    res = compose_masks("x", H, W, rles, probs, isthing, params(stuff_area_min=5))
    assert res.segments == [
        {"id": 1, "label": 0, "isthing": True, "score": 0.95, "area": 16},
        {"id": 2, "label": 1, "isthing": False, "score": 0.8, "area": 24},
    ]
    expected = np.zeros((H, W), np.int32)
    expected[thing] = 1
    expected[left | right] = 2
    np.testing.assert_array_equal(res.panoptic, expected)  # small (4 px) is void
    for s in res.segments:
        assert type(s["id"]) is int and type(s["score"]) is float and type(s["area"]) is int
        assert type(s["label"]) is int and type(s["isthing"]) is bool


def test_score_threshold_and_empty_masks() -> None:
    a, b = box(0, 3, 0, 8), box(3, H, 0, 8)
    empty = np.zeros((H, W), bool)
    probs = np.array([[0.9, 0.1], [0.4, 0.3], [1.0, 0.0]])
    res = compose_masks(
        "x", H, W, [rle(a), rle(b), rle(empty)], probs, np.array([True, True]), params()
    )
    assert [s["score"] for s in res.segments] == [0.9]
    assert (res.panoptic[b] == 0).all()
    assert (res.semantic[b] == 0).all()  # semantic uses every mask
    assert res.instance_scores.tolist() == pytest.approx([0.9, 0.4, 0.3, 0.1])  # no empty mask


# --- compose_masks: semantic and instances ----------------------------------------------------


def test_semantic_sum_beats_single_higher_score() -> None:
    m = box(0, 3, 0, 4)
    probs = np.array([[0.9, 0.1], [0.1, 0.6], [0.1, 0.6]])
    extra = box(3, H, 0, 2)
    rles = [rle(m), rle(m), rle(m), rle(extra)]
    probs = np.vstack([probs, [0.7, 0.3]])
    res = compose_masks("x", H, W, rles, probs, np.array([True, True]), params())
    expected = np.full((H, W), NO_CLASS, np.int32)
    expected[m] = 1  # 1.3 for class 1 beats 1.1 for class 0 (though 0.9 is the best single score)
    expected[extra] = 0
    np.testing.assert_array_equal(res.semantic, expected)


def test_semantic_chunks_match_dense(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    h, w, n, k = 7, 9, 5, 4  # 63 pixels: not a multiple of 8
    masks = rng.random((n, h, w)) < 0.4
    probs = rng.random((n, k))
    votes = np.einsum("nc,nhw->chw", probs, masks.astype(float))
    dense = np.where(masks.any(0), votes.argmax(0), NO_CLASS)
    monkeypatch.setattr(compose, "_SEMANTIC_CHUNK_ENTRIES", 16)  # chunks of 8 pixels
    res = compose_masks("x", h, w, [rle(m) for m in masks], probs, np.ones(k, bool), params())
    np.testing.assert_array_equal(res.semantic, dense)


def test_instances_are_top_k_thing_pairs() -> None:
    a, b, c = box(0, 2, 0, 8), box(2, 4, 0, 8), box(4, H, 0, 8)
    probs = np.array([[0.5, 0.4, 0.1], [0.2, 0.7, 0.1], [0.0, 0.3, 0.0]])
    isthing = np.array([True, False, True])
    rles = [rle(a), rle(b), rle(c)]
    mask_scores = np.array([1.0, 0.5, 1.0])
    res = compose_masks(
        "x", H, W, rles, probs, isthing, params(max_instances=3), mask_scores=mask_scores
    )
    # pairs: (a, 0) .5, (a, 2) .1, (b, 0) .2 * .5 = .1 (tie: lower mask first), (b, 2) .05
    assert res.instance_labels.tolist() == [0, 2, 0]
    assert res.instance_scores.tolist() == pytest.approx([0.5, 0.1, 0.1])
    assert [r["counts"] for r in res.instance_rles] == [rles[i]["counts"] for i in (0, 0, 1)]
    res = compose_masks("x", H, W, rles, probs, isthing, params(max_instances=10))
    # every positive thing pair, stuff class 1 never, the zero pairs of mask c dropped
    assert res.instance_labels.tolist() == [0, 0, 2, 2]
    assert res.instance_scores.tolist() == pytest.approx([0.5, 0.2, 0.1, 0.1])
    assert res.instance_scores.dtype == np.float32 and res.instance_labels.dtype == np.int64


def test_empty_input() -> None:
    res = compose_masks("x", H, W, [], np.zeros((0, 3)), np.ones(3, bool), params())
    assert res.segments == [] and res.instance_rles == []
    assert (res.panoptic == 0).all() and (res.semantic == NO_CLASS).all()
    assert res.panoptic.shape == (H, W)


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError):
        compose_masks(
            "x", H, W, [rle(box(0, 1, 0, 1))], np.zeros((2, 3)), np.ones(3, bool), params()
        )
    with pytest.raises(ValueError):
        compose_masks(
            "x", H, W, [rle(box(0, 1, 0, 1))], np.zeros((1, 3)), np.ones(2, bool), params()
        )


# --- compose_regions (SAM-CP) -----------------------------------------------------------------


def test_compose_regions_hand_case() -> None:
    isthing = np.array([True, False, False, False])
    sem_rles = [
        rle(box(0, H, 6, 8)),
        rle(box(0, 3, 0, 8)),
        rle(box(2, H, 0, 8)),
        rle(box(0, 1, 0, 2)),
    ]
    sem_scores = np.array([0.9, 0.6, 0.7, 0.65])
    a, b, c = box(0, 4, 5, 8), box(2, H, 6, 8), box(4, H, 0, 2)
    res = compose_regions(
        "x",
        H,
        W,
        sem_rles,
        sem_scores,
        [rle(a), rle(b), rle(c)],
        np.array([0, 0, 0]),
        np.array([0.95, 0.8, 0.4]),
        isthing,
        params(stuff_area_min=5, max_instances=2),
    )
    expected_sem = np.array(
        [
            [3, 3, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0],
            [2, 2, 2, 2, 2, 2, 0, 0],
            [2, 2, 2, 2, 2, 2, 0, 0],
            [2, 2, 2, 2, 2, 2, 0, 0],
            [2, 2, 2, 2, 2, 2, 0, 0],
        ]
    )
    np.testing.assert_array_equal(res.semantic, expected_sem)
    # a paints first; b is half hidden (dropped); c is under the score threshold; stuff 1 and 2
    # fill what is left of their regions; stuff 3 (2 px) is below stuff_area_min: void.
    expected_ids = np.array(
        [
            [0, 0, 2, 2, 2, 1, 1, 1],
            [2, 2, 2, 2, 2, 1, 1, 1],
            [3, 3, 3, 3, 3, 1, 1, 1],
            [3, 3, 3, 3, 3, 1, 1, 1],
            [3, 3, 3, 3, 3, 3, 0, 0],
            [3, 3, 3, 3, 3, 3, 0, 0],
        ]
    )
    np.testing.assert_array_equal(res.panoptic, expected_ids)
    assert res.segments == [
        {"id": 1, "label": 0, "isthing": True, "score": 0.95, "area": 12},
        {"id": 2, "label": 1, "isthing": False, "score": 0.6, "area": 8},
        {"id": 3, "label": 2, "isthing": False, "score": 0.7, "area": 22},
    ]
    assert res.instance_scores.tolist() == pytest.approx([0.95, 0.8])
    assert res.instance_labels.tolist() == [0, 0]
    assert len(res.instance_rles) == 2


def test_semantic_label_map_and_union_rle() -> None:
    a, b = box(0, 2, 0, 4), box(1, 3, 2, 6)
    out = semantic_label_map([rle(a), None, rle(b)], np.array([0.5, 0.9, 0.5]), H, W)
    assert out[1, 2] == 2  # tie: the higher class index is painted last
    assert out[0, 0] == 0 and out[5, 7] == NO_CLASS and not (out == 1).any()
    merged = union_rle([rle(a), rle(b)], np.array([True, True]))
    np.testing.assert_array_equal(mask_utils.decode(merged).astype(bool), a | b)
    assert union_rle([rle(a)], np.array([False])) is None
