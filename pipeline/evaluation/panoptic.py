"""Panoptic quality (PQ, SQ, RQ) with the rules of cocodataset/panopticapi's ``pq_compute``.

Every rule below is panopticapi's (``panopticapi/evaluation.py``), re-implemented, so numbers are
comparable with the papers' tables. docs/eval.md lists the rules with their origin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from typing_extensions import Self

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.evaluation.formats import OFFSET, VOID, Category, segments_by_id


@dataclass
class PQCounts:
    """Matching counts of one category, summed over images.

    Attributes:
        iou: Sum of the IoUs of the true positives.
        tp: True positives (matched pairs).
        fp: False positives (unmatched, not ignored predictions).
        fn: False negatives (unmatched, non-crowd ground-truth segments).
    """

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: PQCounts) -> Self:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


@dataclass
class PairCounts:
    """Pixel counts of one image pair: how many pixels each (gt id, pred id) pair shares.

    Attributes:
        gt_ids: Ground-truth segment id of each pair (0 = void).
        pred_ids: Predicted segment id of each pair (0 = void).
        counts: Number of pixels of each pair.
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    counts: np.ndarray


def count_pairs(gt: np.ndarray, pred: np.ndarray) -> PairCounts:
    """Counts the pixels of every (ground-truth id, predicted id) pair of one image.

    panopticapi packs the pair as ``gt * OFFSET + pred`` in uint64 and counts with ``np.unique``;
    the result is sorted by (gt id, pred id), the order in which panopticapi visits pairs.
    """
    packed = gt.astype(np.uint64) * np.uint64(OFFSET) + pred.astype(np.uint64)
    labels, counts = np.unique(packed.ravel(), return_counts=True)
    return PairCounts(labels // OFFSET, labels % OFFSET, counts.astype(np.int64))


def pq_image(
    pairs: PairCounts,
    gt_segments: Sequence[Mapping[str, Any]],
    pred_segments: Sequence[Mapping[str, Any]],
    categories: Mapping[int, Category],
    *,
    where: str = "image",
) -> dict[int, PQCounts]:
    """Matches the segments of one image and returns per-category counts.

    Args:
        pairs: :func:`count_pairs` of the ground-truth and predicted id maps.
        gt_segments: Ground-truth ``segments_info`` (``id``, ``category_id``, ``iscrowd``,
            ``area``; a missing ``area`` falls back to the PNG's pixel count, a missing
            ``iscrowd`` to 0).
        pred_segments: Predicted ``segments_info`` (``id``, ``category_id``).
        categories: Known categories by id.
        where: Names the image and files in error messages.

    Returns:
        ``category_id -> PQCounts`` for every category this image touches.

    Raises:
        SamcpError: If the prediction is inconsistent: an id in the PNG missing from
            segments_info, a segment in segments_info absent from the PNG, or an unknown
            category (panopticapi raises on the same cases).
    """
    gt_segms = segments_by_id(gt_segments)
    pred_segms = segments_by_id(pred_segments)
    for gid, seg in gt_segms.items():
        if int(seg["category_id"]) not in categories:
            raise SamcpError(
                f"{where}: ground-truth segment {gid} has category_id {seg['category_id']} that "
                "is not in the ground-truth categories; fix the ground-truth JSON"
            )

    # The pixel counts of each id, from the pair counts (sums over the other side).
    pred_area: dict[int, int] = {}
    gt_png_area: dict[int, int] = {}
    pair: dict[tuple[int, int], int] = {}
    for g, p, n in zip(pairs.gt_ids.tolist(), pairs.pred_ids.tolist(), pairs.counts.tolist()):
        pair[(g, p)] = n
        pred_area[p] = pred_area.get(p, 0) + n
        gt_png_area[g] = gt_png_area.get(g, 0) + n

    # panopticapi: a prediction's area is its pixel count; PNG and JSON must agree exactly.
    for pid in sorted(pred_area):
        if pid == VOID:
            continue
        if pid not in pred_segms:
            raise SamcpError(
                f"{where}: segment id {pid} is in the predicted PNG but not in its segments_info; "
                "list every non-zero id of the PNG in panoptic.json"
            )
        cat = int(pred_segms[pid]["category_id"])
        if cat not in categories:
            raise SamcpError(
                f"{where}: predicted segment {pid} has unknown category_id {cat}; use the "
                "ground truth's category ids"
            )
    missing = sorted(set(pred_segms) - set(pred_area))
    if missing:
        raise SamcpError(
            f"{where}: segment ids {missing} are in segments_info but have no pixels in the "
            "predicted PNG; drop empty segments from panoptic.json"
        )

    def gt_area(gid: int) -> int:
        # panopticapi takes a ground-truth segment's area from the JSON, not from the PNG.
        area = gt_segms[gid].get("area")
        return int(area) if area is not None else gt_png_area.get(gid, 0)

    def is_crowd(gid: int) -> bool:
        return int(gt_segms[gid].get("iscrowd", 0)) == 1

    stats: dict[int, PQCounts] = {}

    def stat(cat: int) -> PQCounts:
        if cat not in stats:
            stats[cat] = PQCounts()
        return stats[cat]

    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    # Pairs are visited in (gt id, pred id) order, as np.unique sorts them in panopticapi.
    for (g, p), inter in pair.items():
        if g not in gt_segms or p not in pred_segms or is_crowd(g):
            continue
        cat = int(gt_segms[g]["category_id"])
        if cat != int(pred_segms[p]["category_id"]):
            continue
        # The union leaves out the prediction's pixels on void: unlabelled pixels are not held
        # against a prediction.
        union = pred_area[p] + gt_area(g) - inter - pair.get((VOID, p), 0)
        iou = inter / union
        # panopticapi: strictly greater than 0.5, which also makes the matching unique.
        if iou > 0.5:
            s = stat(cat)
            s.tp += 1
            s.iou += iou
            gt_matched.add(g)
            pred_matched.add(p)

    # Unmatched ground truth: crowd regions are never false negatives; they are remembered, one
    # per category (the last one listed wins, as in panopticapi's dict), to absorb predictions.
    crowd_of_category: dict[int, int] = {}
    for g, seg in gt_segms.items():
        if g in gt_matched:
            continue
        cat = int(seg["category_id"])
        if is_crowd(g):
            crowd_of_category[cat] = g
            continue
        stat(cat).fn += 1

    # Unmatched predictions are false positives unless more than half of them lies on void or on a
    # crowd region of their own category.
    for p, seg in pred_segms.items():
        if p in pred_matched:
            continue
        cat = int(seg["category_id"])
        ignored = pair.get((VOID, p), 0)
        if cat in crowd_of_category:
            ignored += pair.get((crowd_of_category[cat], p), 0)
        if ignored / pred_area[p] > 0.5:
            continue
        stat(cat).fp += 1
    return stats


@dataclass
class PQSummary:
    """PQ, SQ, RQ (in percent) averaged over the categories of one split.

    ``pq``, ``sq`` and ``rq`` are None when no category of the split has tp + fp + fn > 0.
    """

    pq: float | None
    sq: float | None
    rq: float | None
    n: int


@dataclass
class PanopticResult:
    """Dataset-level panoptic quality.

    Attributes:
        all: Summary over all categories.
        things: Summary over thing categories.
        stuff: Summary over stuff categories.
        per_class: ``category_id -> {pq, sq, rq (percent or None), tp, fp, fn, iou}``.
    """

    all: PQSummary
    things: PQSummary
    stuff: PQSummary
    per_class: dict[int, dict[str, Any]] = field(default_factory=dict)


def pq_average(
    counts: Mapping[int, PQCounts], categories: Sequence[Category], isthing: bool | None
) -> tuple[PQSummary, dict[int, dict[str, Any]]]:
    """Averages per-category PQ over the categories of a split, as panopticapi's ``pq_average``.

    A category counts only when tp + fp + fn > 0 over the whole dataset; a category with only
    false positives counts with PQ 0, one absent everywhere is left out. SQ is 0 when tp = 0.

    Args:
        counts: Dataset-level counts by category id.
        categories: All categories, in ground-truth order.
        isthing: True for things, False for stuff, None for all.

    Returns:
        The split's summary and the per-class results of its categories.
    """
    total_pq = total_sq = total_rq = 0.0
    n = 0
    per_class: dict[int, dict[str, Any]] = {}
    for cat in categories:
        if isthing is not None and cat.isthing != isthing:
            continue
        c = counts.get(cat.id, PQCounts())
        row: dict[str, Any] = {"tp": c.tp, "fp": c.fp, "fn": c.fn, "iou": c.iou}
        if c.tp + c.fp + c.fn == 0:
            row.update(pq=None, sq=None, rq=None)
            per_class[cat.id] = row
            continue
        n += 1
        denom = c.tp + 0.5 * c.fp + 0.5 * c.fn
        pq = c.iou / denom
        sq = c.iou / c.tp if c.tp != 0 else 0.0
        rq = c.tp / denom
        row.update(pq=100 * pq, sq=100 * sq, rq=100 * rq)
        per_class[cat.id] = row
        total_pq += pq
        total_sq += sq
        total_rq += rq
    if n == 0:
        # panopticapi divides by zero here; an empty split is "not applicable" instead.
        return PQSummary(None, None, None, 0), per_class
    return PQSummary(100 * total_pq / n, 100 * total_sq / n, 100 * total_rq / n, n), per_class


def summarize_panoptic(
    counts: Mapping[int, PQCounts], categories: Sequence[Category]
) -> PanopticResult:
    """Turns dataset-level counts into PQ/SQ/RQ for all categories, things and stuff."""
    summary_all, per_class = pq_average(counts, categories, None)
    things, _ = pq_average(counts, categories, True)
    stuff, _ = pq_average(counts, categories, False)
    return PanopticResult(summary_all, things, stuff, per_class)


def accumulate(total: dict[int, PQCounts], image: Mapping[int, PQCounts]) -> None:
    """Adds one image's counts into the dataset totals (counts are summed, then averaged)."""
    for cat, c in image.items():
        if cat not in total:
            total[cat] = PQCounts()
        total[cat] += c
