"""Semantic segmentation metrics: mIoU, fwIoU, pixel accuracy and mean accuracy.

A confusion matrix is accumulated over the whole dataset, then reduced with detectron2's rule
(``detectron2/evaluation/sem_seg_evaluation.py``: a class's IoU counts only where the class has
ground-truth pixels) or mmseg's (``mmseg/evaluation/metrics/iou_metric.py``: every class whose union
is non-empty counts, so a class predicted but absent from the ground truth adds an IoU of 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from samcp.pipeline.errors import SamcpError

SemanticRule = Literal["detectron2", "mmseg"]
SEMANTIC_RULES: tuple[str, ...] = ("detectron2", "mmseg")


def confusion_from_labels(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, *, where: str = "image"
) -> np.ndarray:
    """Counts the (predicted, ground-truth) class of every pixel.

    Args:
        pred: Predicted class index per pixel; ``num_classes`` means unlabelled.
        gt: Ground-truth class index per pixel; ``num_classes`` means ignore.
        num_classes: K.
        where: Names the image in error messages.

    Returns:
        An int64 matrix of shape (K + 1, K + 1), indexed ``[pred, gt]`` like detectron2's; row K
        holds unlabelled predictions, column K ignored ground truth.

    Raises:
        SamcpError: If a label is outside [0, K] or the shapes differ.
    """
    if pred.shape != gt.shape:
        raise SamcpError(
            f"{where}: semantic prediction has shape {pred.shape}, ground truth {gt.shape}; "
            "predict at the original image size"
        )
    k1 = num_classes + 1
    pred = pred.astype(np.int64, copy=False).ravel()
    gt = gt.astype(np.int64, copy=False).ravel()
    if pred.size and (pred.min() < 0 or pred.max() > num_classes):
        raise SamcpError(
            f"{where}: semantic prediction has class {int(pred.max())} but there are only "
            f"{num_classes} classes; use contiguous indices and 255 for unlabelled"
        )
    if gt.size and (gt.min() < 0 or gt.max() > num_classes):
        raise SamcpError(f"{where}: ground-truth semantic label outside [0, {num_classes}]")
    return np.bincount(k1 * pred + gt, minlength=k1 * k1).reshape(k1, k1)


def confusion_from_pairs(
    pred_cls: np.ndarray, gt_cls: np.ndarray, counts: np.ndarray, num_classes: int
) -> np.ndarray:
    """Like :func:`confusion_from_labels` from (pred class, gt class, pixel count) triples."""
    k1 = num_classes + 1
    flat = np.bincount(
        k1 * pred_cls.astype(np.int64) + gt_cls.astype(np.int64),
        weights=counts.astype(np.float64),
        minlength=k1 * k1,
    )
    # Pixel counts are integers far below 2^53, so the float64 weights are exact.
    return flat.astype(np.int64).reshape(k1, k1)


def labels_from_png(
    label: np.ndarray,
    num_classes: int,
    ignore_label: int = 255,
    lut: np.ndarray | None = None,
    *,
    where: str = "image",
) -> np.ndarray:
    """Maps a semantic PNG's ``ignore_label`` to K, the unlabelled index of the confusion matrix.

    Args:
        label: The PNG's values.
        num_classes: K.
        ignore_label: The PNG's "unlabelled" value.
        lut: From :func:`semantic_lut` when the values index another category list than the
            ground truth's; None when they are ground-truth class indices already.
        where: Names the image and file in error messages.

    Raises:
        SamcpError: If ``lut`` maps a value of the PNG to no ground-truth class.
    """
    if lut is None:
        out = label.astype(np.int64)
        out[label == ignore_label] = num_classes
        return out
    out = lut[label.astype(np.int64)]
    if (out < 0).any():
        bad = int(label[out < 0].min())
        raise SamcpError(
            f"{where}: semantic value {bad} names no ground-truth category through "
            "panoptic.json's 'categories'; write positions in that list of ground-truth "
            f"categories, {ignore_label} for unlabelled"
        )
    return out


def semantic_lut(
    pred_category_ids: Sequence[int],
    gt_index: Mapping[int, int],
    num_classes: int,
    ignore_label: int = 255,
    size: int = 256,
) -> np.ndarray:
    """Ground-truth class index of each semantic PNG value when the values index another list.

    ``samcp predict`` writes semantic PNGs that index its panoptic.json's ``categories`` (e.g. a
    run's training classes only); this translates them to the ground truth's order.

    Args:
        pred_category_ids: The category id that each PNG value names, in value order.
        gt_index: Ground-truth category id -> contiguous class index.
        num_classes: K.
        ignore_label: The PNG's "unlabelled" value, mapped to K.
        size: The number of possible PNG values: 256 for 8-bit PNGs, 65536 for 16-bit ones.

    Returns:
        (size,) int64; -1 for values that name no ground-truth category.
    """
    lut = np.full(size, -1, np.int64)
    for v, cid in enumerate(pred_category_ids[:size]):
        lut[v] = gt_index.get(int(cid), -1)
    lut[ignore_label] = num_classes
    return lut


@dataclass
class SemanticResult:
    """Dataset-level semantic metrics in percent (None when undefined).

    Attributes:
        miou: Mean IoU under ``rule``.
        fwiou: Frequency-weighted IoU (detectron2's definition).
        pacc: Pixel accuracy over labelled ground-truth pixels.
        macc: Mean per-class accuracy over classes with ground-truth pixels.
        rule: "detectron2" or "mmseg".
        n: Number of classes averaged in mIoU.
        per_class: ``class index -> {iou, acc}`` in percent (None where a class does not count).
    """

    miou: float | None
    fwiou: float | None
    pacc: float | None
    macc: float | None
    rule: str
    n: int
    per_class: dict[int, dict[str, Any]] = field(default_factory=dict)


def semantic_metrics(confusion: np.ndarray, rule: SemanticRule = "detectron2") -> SemanticResult:
    """Reduces a dataset-level confusion matrix to mIoU, fwIoU, pACC and mACC.

    Unlabelled predictions (row K) on labelled ground truth count as wrong: they are in the
    ground-truth total of their true class but in no class's prediction total. Ignored ground
    truth (column K) counts nowhere.

    Args:
        confusion: (K + 1, K + 1) matrix from :func:`confusion_from_labels`, summed over images.
        rule: "detectron2" (a class counts where it has ground-truth pixels) or "mmseg" (a class
            counts where its union is non-empty).

    Returns:
        The metrics, in percent.
    """
    if rule not in SEMANTIC_RULES:
        raise SamcpError(f"unknown semantic rule {rule!r}; use one of {', '.join(SEMANTIC_RULES)}")
    k = confusion.shape[0] - 1
    conf = confusion.astype(np.float64)
    tp = np.diagonal(conf)[:k]
    # Ground-truth pixels of each class, whatever was predicted there (unlabelled included).
    pos_gt = conf[:, :k].sum(axis=0)
    # Pixels predicted as each class on labelled ground truth (ignored pixels excluded).
    pos_pred = conf[:k, :k].sum(axis=1)
    union = pos_gt + pos_pred - tp
    has_gt = pos_gt > 0
    acc = np.full(k, np.nan)
    acc[has_gt] = tp[has_gt] / pos_gt[has_gt]
    iou = np.full(k, np.nan)
    if rule == "detectron2":
        # detectron2: iou_valid = (pos_gt > 0) & (union > 0).
        valid = has_gt & (union > 0)
    else:
        # mmseg: nanmean of I / U, so every class with a non-empty union counts.
        valid = union > 0
    iou[valid] = tp[valid] / union[valid]
    n = int(valid.sum())
    total_gt = pos_gt.sum()
    miou = float(iou[valid].mean()) * 100 if n else None
    macc = float(acc[has_gt].mean()) * 100 if has_gt.any() else None
    pacc = float(tp.sum() / total_gt) * 100 if total_gt > 0 else None
    if total_gt > 0:
        weights = pos_gt / total_gt
        fw_valid = has_gt & (union > 0)
        fwiou: float | None = float((iou[fw_valid] * weights[fw_valid]).sum()) * 100
    else:
        fwiou = None
    per_class = {
        i: {
            "iou": None if np.isnan(iou[i]) else float(iou[i]) * 100,
            "acc": None if np.isnan(acc[i]) else float(acc[i]) * 100,
            "gt_pixels": int(pos_gt[i]),
            "pred_pixels": int(pos_pred[i]),
        }
        for i in range(k)
    }
    return SemanticResult(miou, fwiou, pacc, macc, rule, n, per_class)


def class_lookup(
    segments: Sequence[Mapping[str, Any]], class_index: Mapping[int, int], num_classes: int
) -> dict[int, int]:
    """Maps segment ids to contiguous class indices; ids not listed (void) map to K."""
    out = {0: num_classes}
    for s in segments:
        out[int(s["id"])] = class_index.get(int(s["category_id"]), num_classes)
    return out


def label_lut(
    class_index: Mapping[int, int], num_classes: int, ignore_label: int, size: int = 65536
) -> np.ndarray:
    """Class index of each value of a ground-truth label file whose values are class ids.

    Args:
        class_index: Class id -> contiguous class index.
        num_classes: K.
        ignore_label: The files' "no class" value, mapped to K (ignored).
        size: The number of possible values (65536 covers 8-bit and 16-bit files).

    Returns:
        (size,) int64; -1 for values that are neither a class id nor the ignore label.
    """
    lut = np.full(size, -1, np.int64)
    for cid, idx in class_index.items():
        if 0 <= int(cid) < size:
            lut[int(cid)] = idx
    lut[ignore_label] = num_classes
    return lut
