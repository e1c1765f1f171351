"""Instance segmentation AP through pycocotools' COCOeval (iouType "segm") on thing classes.

The ground truth is derived from the panoptic annotations the way panopticapi's
``converters/panoptic2detection_coco_format.py`` does: one instance per thing segment, its mask from
the PNG, ``area``, ``bbox`` and ``iscrowd`` from segments_info (pixel count and mask box when absent).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.evaluation.formats import Category, check_instance_results

# COCOeval.stats order for iouType "segm".
AP_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encodes a binary (H, W) mask as COCO RLE with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def ground_truth_instances(
    ids: np.ndarray, segments: Sequence[Mapping[str, Any]], categories: Mapping[int, Category]
) -> list[dict[str, Any]]:
    """Builds COCO instance annotations for the thing segments of one panoptic image.

    Args:
        ids: The image's (H, W) segment-id map.
        segments: Its ground-truth segments_info.
        categories: Categories by id.

    Returns:
        Annotations with ``category_id`` (dataset id), ``segmentation`` (RLE), ``area``, ``bbox``
        and ``iscrowd``; no ``id`` or ``image_id`` yet.
    """
    out = []
    for s in segments:
        cat = categories.get(int(s["category_id"]))
        if cat is None or not cat.isthing:
            continue
        rle = encode_mask(ids == int(s["id"]))
        area = s.get("area")
        bbox = s.get("bbox")
        out.append(
            {
                "category_id": cat.id,
                "segmentation": rle,
                "area": float(area) if area is not None else float(mask_utils.area(rle)),
                "bbox": [float(v) for v in (bbox if bbox is not None else mask_utils.toBbox(rle))],
                "iscrowd": int(s.get("iscrowd", 0)),
            }
        )
    return out


@dataclass
class InstanceResult:
    """COCO segm AP in percent (None where COCOeval reports -1: nothing to evaluate).

    Attributes:
        ap, ap50, ap75, aps, apm, apl: COCOeval's first six stats.
        num_detections: Detections evaluated.
        ignored_stuff_detections: Detections of stuff categories, which are not evaluated.
        per_class: ``category_id -> {"ap": percent or None}``.
        groups: ``group name -> {ap, ap50, ap75, aps, apm, apl, n}`` over the group's thing
            categories (see :func:`accumulate_instances`); empty when no groups were asked for.
    """

    ap: float | None
    ap50: float | None
    ap75: float | None
    aps: float | None
    apm: float | None
    apl: float | None
    num_detections: int
    ignored_stuff_detections: int = 0
    per_class: dict[int, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)


def _percent(v: float) -> float | None:
    return None if v < 0 else float(v) * 100


@dataclass(frozen=True)
class InstanceKeys:
    """Integer keys for pycocotools: image ids and category ids re-numbered from 1.

    pycocotools treats an annotation id of 0 as "unmatched" and sorts image ids, so string image
    ids and category id 0 are mapped to 1-based integers, in ground-truth order.

    Attributes:
        images: ``str(image_id) -> key`` in ground-truth order.
        categories: ``thing category id -> key``.
        sizes: ``str(image_id) -> (height, width)``.
        things: The thing categories.
    """

    images: dict[str, int]
    categories: dict[int, int]
    sizes: dict[str, tuple[int, int]]
    things: tuple[Category, ...]


def make_keys(
    image_ids: Sequence[str], sizes: Mapping[str, tuple[int, int]], categories: Sequence[Category]
) -> InstanceKeys | None:
    """Builds the pycocotools keys; None when there is no thing category."""
    things = tuple(c for c in categories if c.isthing)
    if not things:
        return None
    return InstanceKeys(
        {img: i + 1 for i, img in enumerate(image_ids)},
        {c.id: i + 1 for i, c in enumerate(things)},
        {img: tuple(sizes[img]) for img in image_ids},
        things,
    )


def prepare_detections(
    detections: Sequence[Mapping[str, Any]],
    keys: InstanceKeys,
    categories: Sequence[Category],
    *,
    source: str = "instances.json",
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Checks COCO results against the ground truth and groups them by image, with pycocotools
    keys.

    The results' fields must already have been checked by
    :func:`~samcp.pipeline.evaluation.formats.check_instance_results` (the loaders and
    :func:`evaluate_instances` do).

    Returns:
        ``str(image_id) -> detections`` and the number of stuff detections left out.

    Raises:
        SamcpError: If a detection names an unknown image or category, or has a mask of the
            wrong size.
    """
    by_id = {c.id: c for c in categories}
    out: dict[str, list[dict[str, Any]]] = {}
    ignored_stuff = 0
    # The fields were checked where the results entered (check_instance_results).
    for i, d in enumerate(detections):
        img = str(d["image_id"])
        cid = int(d["category_id"])
        seg = d["segmentation"]
        score = float(d["score"])
        size = [int(v) for v in seg["size"]]
        counts = seg["counts"]
        if img not in keys.images:
            raise SamcpError(
                f"{source}: result {i} has image_id {img} that is not in the ground truth"
            )
        if cid not in by_id:
            raise SamcpError(
                f"{source}: result {i} has unknown category_id {cid}; use the ground truth's ids"
            )
        if not by_id[cid].isthing:
            ignored_stuff += 1
            continue
        if tuple(size) != tuple(keys.sizes[img]):
            raise SamcpError(
                f"{source}: result {i} (image {img}) has a mask of size {size} but the image is "
                f"{list(keys.sizes[img])}; encode masks at the original image size"
            )
        rle = {
            "size": size,
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
        out.setdefault(img, []).append(
            {"category_id": keys.categories[cid], "segmentation": rle, "score": score}
        )
    return out, ignored_stuff


def evaluate_images(
    gt: Mapping[str, Sequence[Mapping[str, Any]]],
    dt: Mapping[str, Sequence[Mapping[str, Any]]],
    keys: InstanceKeys,
) -> dict[int, list[Any]]:
    """Runs COCOeval's per-image matching (``evaluate``) on a subset of images.

    COCOeval matches each (image, category) on its own, so splitting the images across processes
    and concatenating the per-image results gives exactly the single-process ``evalImgs``.

    Args:
        gt: ``str(image_id) -> ground truth`` from :func:`ground_truth_instances` (dataset ids).
        dt: ``str(image_id) -> detections`` from :func:`prepare_detections`.
        keys: The pycocotools keys.

    Returns:
        ``image key -> [evalImg for each (category, area range)]`` in COCOeval's order.
    """
    img_keys = sorted(keys.images[img] for img in gt)
    images = []
    for img in gt:
        h, w = keys.sizes[img]
        images.append({"id": keys.images[img], "height": h, "width": w})
    gt_anns: list[dict[str, Any]] = []
    for img, anns in gt.items():
        for a in anns:
            gt_anns.append(
                {
                    **a,
                    "id": len(gt_anns) + 1,
                    "image_id": keys.images[img],
                    "category_id": keys.categories[a["category_id"]],
                }
            )
    dt_anns: list[dict[str, Any]] = []
    for img, dets in dt.items():
        for d in dets:
            rle = d["segmentation"]
            dt_anns.append(
                {
                    **d,
                    "id": len(dt_anns) + 1,
                    "image_id": keys.images[img],
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    cats = [{"id": k} for k in keys.categories.values()]
    # COCO() and COCOeval print progress on stdout; keep the terminal table clean.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": gt_anns, "categories": cats}
        coco_gt.createIndex()
        coco_dt = COCO()
        # Built directly rather than with loadRes, which fails on an empty results list.
        coco_dt.dataset = {"images": images, "annotations": dt_anns, "categories": cats}
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.imgIds = img_keys
        ev.params.catIds = sorted(keys.categories.values())
        ev.evaluate()
    n_img = len(img_keys)
    per_image: dict[int, list[Any]] = {k: [] for k in img_keys}
    # evalImgs is ordered [category][area range][image]. accumulate() reads only these four
    # fields, and only the truth of dtMatches; keeping just them makes results cheap to send back.
    for j, e in enumerate(ev.evalImgs):
        if e is not None:
            e = {
                "dtScores": e["dtScores"],
                "dtMatches": np.asarray(e["dtMatches"]) != 0,
                "dtIgnore": e["dtIgnore"],
                "gtIgnore": e["gtIgnore"],
            }
        per_image[img_keys[j % n_img]].append(e)
    return per_image


def accumulate_instances(
    per_image: Mapping[int, Sequence[Any]],
    keys: InstanceKeys,
    num_detections: int,
    ignored_stuff_detections: int = 0,
    groups: Mapping[str, Collection[int]] | None = None,
) -> InstanceResult:
    """COCOeval's ``accumulate`` and ``summarize`` over the per-image results of all images.

    Args:
        per_image: ``image key -> evalImgs`` from :func:`evaluate_images`.
        keys: The pycocotools keys.
        num_detections: Detections evaluated (reported).
        ignored_stuff_detections: Stuff detections left out (reported).
        groups: Optional ``name -> category ids`` (e.g. seen / unseen classes): each group's six
            AP numbers are COCOeval's ``summarize`` over the group's thing categories only, i.e.
            what ``params.catIds = group`` gives. COCOeval accumulates every category on its
            own, so the group's slice of the accumulated precision/recall arrays is exactly that
            run's; AP is then the mean of per-category AP over the group's categories with
            ground truth, the same definition as the all-class AP.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(iouType="segm")
        ev.params.imgIds = sorted(keys.images.values())
        ev.params.catIds = sorted(keys.categories.values())
        ev._paramsEval = copy.deepcopy(ev.params)
        n_cells = len(ev.params.catIds) * len(ev.params.areaRng)
        ev.evalImgs = [per_image[img][cell] for cell in range(n_cells) for img in ev.params.imgIds]
        ev.accumulate()
        ev.summarize()
    stats = [_percent(v) for v in ev.stats[: len(AP_KEYS)]]
    # Per-class AP as detectron2 reports it: precision at all IoUs, area "all", maxDets 100.
    precision = ev.eval["precision"]
    per_class: dict[int, dict[str, Any]] = {}
    for c in keys.things:
        p = precision[:, :, keys.categories[c.id] - 1, 0, -1]
        p = p[p > -1]
        per_class[c.id] = {"ap": float(p.mean()) * 100 if p.size else None}
    group_results = {
        name: _summarize_categories(ev, keys, ids, per_class)
        for name, ids in (groups or {}).items()
    }
    return InstanceResult(
        *stats,
        num_detections=num_detections,
        ignored_stuff_detections=ignored_stuff_detections,
        per_class=per_class,
        groups=group_results,
    )


def _summarize_categories(
    ev: COCOeval,
    keys: InstanceKeys,
    category_ids: Collection[int],
    per_class: Mapping[int, Mapping[str, Any]],
) -> dict[str, Any]:
    """COCOeval's six AP stats restricted to some categories (stuff ids are skipped)."""
    wanted = set(category_ids)
    ids = [c.id for c in keys.things if c.id in wanted]
    out: dict[str, Any] = {k.lower(): None for k in AP_KEYS}
    out["n"] = sum(per_class[c]["ap"] is not None for c in ids)
    if not ids:
        return out
    # Category axis 2 of precision (T, R, K, A, M) and 1 of recall (T, K, A, M).
    pos = [keys.categories[c] - 1 for c in ids]
    sub = copy.copy(ev)
    sub.eval = {
        **ev.eval,
        "precision": ev.eval["precision"][:, :, pos],
        "recall": ev.eval["recall"][:, pos],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        sub.summarize()
    out.update({k.lower(): _percent(v) for k, v in zip(AP_KEYS, sub.stats, strict=False)})
    return out


def evaluate_instances(
    gt_instances: Mapping[str, Sequence[Mapping[str, Any]]],
    image_sizes: Mapping[str, tuple[int, int]],
    categories: Sequence[Category],
    detections: Sequence[Mapping[str, Any]],
    *,
    source: str = "instances.json",
    groups: Mapping[str, Collection[int]] | None = None,
) -> InstanceResult | None:
    """Runs COCOeval (segm) on thing classes, in one process.

    Image ids are compared as strings and category ids may be any int (0 included).

    Args:
        gt_instances: ``str(image_id) -> annotations`` from :func:`ground_truth_instances`, for every
            evaluated image (empty lists included).
        image_sizes: ``str(image_id) -> (height, width)``.
        categories: All categories; only things are evaluated.
        detections: COCO results: ``image_id``, ``category_id``, ``segmentation`` (RLE at the
            image's size, ``counts`` str or bytes) and ``score``.
        source: Names the detections' file in error messages.
        groups: Optional ``name -> category ids``; see :func:`accumulate_instances`.

    Returns:
        The AP metrics, or None when the ground truth has no thing category.

    Raises:
        SamcpError: If a detection names an unknown image or category, lacks fields, has a
            score that is not a finite number, or has a mask of the wrong size.
    """
    check_instance_results(detections, source)
    keys = make_keys(list(gt_instances), image_sizes, categories)
    if keys is None:
        return None
    dt, ignored = prepare_detections(detections, keys, categories, source=source)
    per_image = evaluate_images(gt_instances, dt, keys)
    return accumulate_instances(per_image, keys, sum(map(len, dt.values())), ignored, groups)
