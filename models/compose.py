"""The composition every head uses: masks and class scores -> panoptic, semantic and instances.

Two entry points, both returning :class:`samcp.models.heads.ImageResult`:

* :func:`compose_masks` -- mask-classification heads (one class distribution per binary mask):
  Mask2Former / FC-CLIP's inference rules.
* :func:`compose_regions` -- class regions and ranked instances (the affinity head's
  ``composition: regions``; its default, the authors' rule, goes through :func:`compose_masks`):
  the semantic map paints regions by score, the panoptic map takes instances first and fills
  stuff from the semantic map.

Masks are COCO RLE dicts (pycocotools) at (height, width). Pure numpy / pycocotools; imports
nothing from ``samcp.pipeline``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from samcp.models.heads import CompositionParams, ImageResult

#: "No class covers this pixel" in class-index maps.
NO_CLASS = -1

#: Budget, in matrix entries, of one pixel chunk of the semantic rule ((chunk, max(N, K)) floats).
_SEMANTIC_CHUNK_ENTRIES = 1 << 22

__all__ = [
    "NO_CLASS",
    "compose_masks",
    "compose_regions",
    "semantic_label_map",
    "union_rle",
]


# ----------------------------------------------------------------------------------------------
# RLE helpers.
# ----------------------------------------------------------------------------------------------


def _decode(rle: dict) -> np.ndarray:
    """(H, W) bool mask of one RLE."""
    return mask_utils.decode(rle).astype(bool)


def union_rle(rles: Sequence[dict], members: np.ndarray) -> dict | None:
    """The union of the member masks (RLE operations only).

    Args:
        rles: candidate RLEs.
        members: (len(rles),) bool, which to merge.

    Returns:
        The merged RLE, or None when no member is selected.
    """
    idx = np.flatnonzero(members)
    if idx.size == 0:
        return None
    return mask_utils.merge([rles[i] for i in idx.tolist()], intersect=0)


def _rle_areas(rles: Sequence[dict]) -> np.ndarray:
    """(N,) int64 pixel areas of RLEs (no decoding)."""
    if not rles:
        return np.zeros(0, np.int64)
    return np.asarray(mask_utils.area(list(rles)), np.int64).reshape(len(rles))


def _pack_masks(rles: Sequence[dict], height: int, width: int) -> np.ndarray:
    """(N, ceil(H*W / 8)) uint8: the masks, decoded one at a time, bit-packed in C pixel order."""
    packed = np.zeros((len(rles), (height * width + 7) // 8), np.uint8)
    for n, rle in enumerate(rles):
        packed[n] = np.packbits(_decode(rle).ravel())
    return packed


def _unpack_mask(packed_row: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of one row of :func:`_pack_masks`."""
    return np.unpackbits(packed_row, count=height * width).astype(bool).reshape(height, width)


# ----------------------------------------------------------------------------------------------
# compose_masks: Mask2Former / FC-CLIP inference for binary masks.
# ----------------------------------------------------------------------------------------------


def _check_mask_inputs(
    rles: Sequence[dict], probs: np.ndarray, isthing: np.ndarray, mask_scores: np.ndarray | None
) -> None:
    """Raises ValueError on shapes that do not fit together."""
    if probs.ndim != 2 or probs.shape[0] != len(rles):
        raise ValueError(f"probs must be ({len(rles)}, K), got {probs.shape}")
    if isthing.shape != (probs.shape[1],):
        raise ValueError(f"isthing must be ({probs.shape[1]},), got {isthing.shape}")
    if mask_scores is not None and np.shape(mask_scores) != (len(rles),):
        raise ValueError(f"mask_scores must be ({len(rles)},), got {np.shape(mask_scores)}")


def _pixel_owners(packed: np.ndarray, order: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) int32 index of the mask that wins each pixel, -1 for none.

    Masks are visited in ``order`` (best first); a pixel goes to the first mask covering it.
    """
    owner = np.full((height, width), -1, np.int32)
    for n in order.tolist():
        mask = _unpack_mask(packed[n], height, width)
        owner[mask & (owner < 0)] = n
    return owner


def _panoptic_from_masks(
    packed: np.ndarray,
    areas: np.ndarray,
    probs: np.ndarray,
    isthing: np.ndarray,
    params: CompositionParams,
    height: int,
    width: int,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The panoptic map and segments of :func:`compose_masks` (see there for the rule)."""
    n_masks = probs.shape[0]
    scores = probs.max(axis=1)
    labels = probs.argmax(axis=1)
    kept = np.flatnonzero((scores >= params.score_thresh) & (areas > 0))
    # Descending score, ties -> lower index (stable sort of the negated scores).
    order = kept[np.argsort(-scores[kept], kind="stable")]
    owner = _pixel_owners(packed, order, height, width)
    visible = np.bincount(owner.ravel() + 1, minlength=n_masks + 1)[1:]

    groups: list[dict[str, Any]] = []  # in creation order
    stuff_group: dict[int, dict[str, Any]] = {}
    for n in order.tolist():
        vis = int(visible[n])
        if vis == 0 or vis / int(areas[n]) < params.overlap_thresh:
            continue
        label = int(labels[n])
        thing = bool(isthing[label])
        if not thing and label in stuff_group:
            group = stuff_group[label]
            group["members"].append(n)
            group["area"] += vis
            group["score"] = max(group["score"], float(scores[n]))
            continue
        group = {
            "label": label,
            "isthing": thing,
            "score": float(scores[n]),
            "area": vis,
            "members": [n],
        }
        groups.append(group)
        if not thing:
            stuff_group[label] = group

    lut = np.zeros(n_masks + 1, np.int32)  # owner + 1 -> segment id
    segments: list[dict[str, Any]] = []
    for group in groups:
        if not group["isthing"] and group["area"] < params.stuff_area_min:
            continue
        seg_id = len(segments) + 1
        lut[np.asarray(group["members"]) + 1] = seg_id
        segments.append(
            {
                "id": seg_id,
                "label": group["label"],
                "isthing": group["isthing"],
                "score": group["score"],
                "area": int(group["area"]),
            }
        )
    return lut[owner + 1], segments


def _coverage_patterns(packed: np.ndarray, n_pix: int, chunk: int) -> np.ndarray:
    """(H*W, ceil(N / 8)) uint8: per pixel the bit-packed set of masks covering it.

    Args:
        packed: (N, ceil(H*W / 8)) masks from :func:`_pack_masks`.
        n_pix: H*W.
        chunk: pixels per step, a multiple of 8.
    """
    out = np.zeros((n_pix, (packed.shape[0] + 7) // 8), np.uint8)
    for start in range(0, n_pix, chunk):
        stop = min(start + chunk, n_pix)
        bits = np.unpackbits(packed[:, start // 8 : (stop + 7) // 8], axis=1)[:, : stop - start]
        out[start:stop] = np.packbits(bits, axis=0).T
    return out


def _semantic_from_masks(
    packed: np.ndarray, probs: np.ndarray, height: int, width: int
) -> np.ndarray:
    """(H, W) int32: per pixel ``argmax_c sum_n probs[n, c] * mask_n`` (ties -> lower class);
    ``NO_CLASS`` where no class gets positive evidence (no mask covers the pixel, or only masks
    whose probabilities are all 0).

    Pixels covered by the same set of masks get the same votes, so the votes are computed once
    per distinct coverage set (far fewer than pixels for real proposals), in chunks so the
    (sets, K) score matrix stays small.
    """
    n_pix = height * width
    n_masks, n_classes = probs.shape
    chunk = max(8, (_SEMANTIC_CHUNK_ENTRIES // max(n_masks, n_classes, 1)) // 8 * 8)
    patterns = _coverage_patterns(packed, n_pix, chunk)
    keys = np.ascontiguousarray(patterns).view(np.dtype((np.void, patterns.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    unique = patterns[first]
    weights = probs.astype(np.float32)
    labels = np.full(len(unique), NO_CLASS, np.int32)
    for start in range(0, len(unique), chunk):
        stop = min(start + chunk, len(unique))
        cover = np.unpackbits(unique[start:stop], axis=1, count=n_masks).astype(np.float32)
        votes = cover @ weights  # (sets, K)
        best = votes.argmax(axis=1)
        has = votes[np.arange(stop - start), best] > 0
        labels[start:stop] = np.where(has, best, NO_CLASS)
    return labels[inverse.reshape(-1)].reshape(height, width)


def _instances_from_masks(
    rles: Sequence[dict],
    areas: np.ndarray,
    probs: np.ndarray,
    isthing: np.ndarray,
    mask_scores: np.ndarray | None,
    max_instances: int,
) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Top ``max_instances`` (mask, thing class) pairs by ``probs[n, c] * mask_scores[n]``.

    Pairs with a non-positive score or an empty mask are dropped; ties -> lower mask, then lower
    class index.
    """
    things = np.flatnonzero(isthing)
    if max_instances == 0 or things.size == 0:
        return [], np.zeros(0, np.int64), np.zeros(0, np.float32)
    per_mask = np.ones(len(rles)) if mask_scores is None else np.asarray(mask_scores, np.float64)
    pair = probs[:, things].astype(np.float64) * per_mask[:, None]  # (N, T)
    pair[areas == 0] = 0.0
    flat = pair.ravel()
    order = np.argsort(-flat, kind="stable")[:max_instances]
    order = order[flat[order] > 0]
    mask_idx, thing_idx = np.divmod(order, things.size)
    return (
        [dict(rles[n]) for n in mask_idx.tolist()],
        things[thing_idx].astype(np.int64),
        flat[order].astype(np.float32),
    )


def compose_masks(
    image_id: str,
    height: int,
    width: int,
    rles: Sequence[dict],
    probs: np.ndarray,
    isthing: np.ndarray,
    params: CompositionParams,
    mask_scores: np.ndarray | None = None,
) -> ImageResult:
    """Mask2Former / FC-CLIP inference for a mask-classification head with binary masks.

    * Panoptic: each mask's score is its largest class probability and its label the argmax; masks
      scoring at least ``params.score_thresh`` (and non-empty) are kept. Every pixel goes to the
      highest-scoring kept mask covering it (ties -> lower index). Kept masks are then visited by
      descending score: one whose won pixels are less than ``overlap_thresh`` of its area is
      dropped; a thing mask becomes one segment; all kept masks of one stuff class merge into one
      segment (score = the largest). A stuff segment smaller than ``stuff_area_min`` pixels is
      dropped. Dropped masks' pixels are void; segment ids are 1..n in creation order.
    * Semantic, by ``params.semantic_from``: ``"all"`` (default), per pixel
      ``argmax_c sum_n probs[n, c] * mask_n`` over all masks (ties -> lower class), -1 where no
      class gets positive evidence (no mask covers the pixel); ``"kept"``, the same sum over the
      masks scoring at least ``score_thresh`` only; ``"panoptic"``, the class of the pixel's
      panoptic segment, -1 on void (so the two maps agree pixel for pixel, as SAM-CP's code).
    * Instances: the top ``params.max_instances`` (mask, thing class) pairs by
      ``probs[n, c] * mask_scores[n]`` (1 without mask scores), score descending; pairs scoring 0
      and empty masks are dropped.

    Each mask is decoded once and kept bit-packed (N * H * W / 8 bytes).

    Args:
        image_id: the image.
        height: H.
        width: W.
        rles: (N) COCO RLEs at (H, W).
        probs: (N, K) class probabilities of each mask (void excluded).
        isthing: (K,) bool.
        params: thresholds.
        mask_scores: (N,) optional per-mask quality multiplying the instance scores.

    Returns:
        The image's :class:`ImageResult`; ``ImageResult.empty`` for N = 0.
    """
    probs = np.asarray(probs, dtype=np.float64)
    isthing = np.asarray(isthing, dtype=bool)
    if len(rles) == 0:
        return ImageResult.empty(image_id, height, width)
    _check_mask_inputs(rles, probs, isthing, mask_scores)
    areas = _rle_areas(rles)
    packed = _pack_masks(rles, height, width)
    panoptic, segments = _panoptic_from_masks(packed, areas, probs, isthing, params, height, width)
    if params.semantic_from == "panoptic":
        seg_labels = np.array([NO_CLASS] + [s["label"] for s in segments], np.int32)
        semantic = seg_labels[panoptic]  # segment ids are 1..n in list order, 0 = void
    else:
        votes = probs
        if params.semantic_from == "kept":
            votes = np.where((probs.max(axis=1) >= params.score_thresh)[:, None], probs, 0.0)
        semantic = _semantic_from_masks(packed, votes, height, width)
    inst_rles, inst_labels, inst_scores = _instances_from_masks(
        rles, areas, probs, isthing, mask_scores, params.max_instances
    )
    return ImageResult(
        image_id, height, width, panoptic, segments, semantic, inst_rles, inst_labels, inst_scores
    )


# ----------------------------------------------------------------------------------------------
# compose_regions: class regions and ranked instances (the affinity head's composition: regions).
# ----------------------------------------------------------------------------------------------


def semantic_label_map(
    region_rles: Sequence[dict | None], scores: np.ndarray, height: int, width: int
) -> np.ndarray:
    """(H, W) int32: per pixel the class whose region covers it with the highest score.

    Regions are painted in ascending score order, so the best-scoring one ends on top (ties: the
    higher class index). Pixels no region covers are ``NO_CLASS`` (-1).

    Args:
        region_rles: (K) one region per class, None for a class without a region.
        scores: (K,) region scores.
        height: H.
        width: W.

    Returns:
        The class-index map.
    """
    out = np.full((height, width), NO_CLASS, np.int32)
    for k in np.argsort(np.asarray(scores, np.float64), kind="stable").tolist():
        rle = region_rles[k]
        if rle is not None:
            out[_decode(rle)] = k
    return out


def _paint_instances(
    instance_rles: Sequence[dict | None],
    instance_labels: np.ndarray,
    instance_scores: np.ndarray,
    params: CompositionParams,
    ids: np.ndarray,
    painted: np.ndarray,
    segments: list[dict[str, Any]],
) -> None:
    """Step 1 of :func:`compose_regions`' panoptic rule; paints ``ids`` / ``painted`` in place."""
    order = np.argsort(-np.asarray(instance_scores, np.float64), kind="stable")
    for i in order.tolist():
        score = float(instance_scores[i])
        if score < params.score_thresh:
            break
        if instance_rles[i] is None:
            continue
        mask = _decode(instance_rles[i])
        area = int(mask.sum())
        if area == 0:
            continue
        mask &= ~painted
        free = int(mask.sum())
        if free == 0 or free / area < params.overlap_thresh:
            continue
        seg_id = len(segments) + 1
        ids[mask] = seg_id
        painted |= mask
        segments.append(
            {
                "id": seg_id,
                "label": int(instance_labels[i]),
                "isthing": True,
                "score": score,
                "area": free,
            }
        )


def _fill_stuff(
    semantic: np.ndarray,
    semantic_scores: np.ndarray,
    isthing: np.ndarray,
    params: CompositionParams,
    ids: np.ndarray,
    painted: np.ndarray,
    segments: list[dict[str, Any]],
) -> None:
    """Step 2 of :func:`compose_regions`' panoptic rule; paints ``ids`` / ``painted`` in place."""
    for c in np.unique(semantic[semantic >= 0]).tolist():
        if isthing[c]:
            continue
        mask = (semantic == c) & ~painted
        area = int(mask.sum())
        if area == 0 or area < params.stuff_area_min:
            continue
        seg_id = len(segments) + 1
        ids[mask] = seg_id
        painted |= mask
        segments.append(
            {
                "id": seg_id,
                "label": int(c),
                "isthing": False,
                "score": float(semantic_scores[c]),
                "area": area,
            }
        )


def compose_regions(
    image_id: str,
    height: int,
    width: int,
    semantic_rles: Sequence[dict | None],
    semantic_scores: np.ndarray,
    instance_rles: Sequence[dict | None],
    instance_labels: np.ndarray,
    instance_scores: np.ndarray,
    isthing: np.ndarray,
    params: CompositionParams,
) -> ImageResult:
    """SAM-CP's composition of class regions and ranked instances.

    * Semantic: :func:`semantic_label_map` (regions painted in ascending score order).
    * Panoptic: (1) instances by descending score, while score >= ``score_thresh``: one whose
      unpainted part is at least ``overlap_thresh`` of its area paints that part, any other is
      dropped; (2) each stuff class c fills the still-unpainted pixels where the semantic map says
      c, a fill smaller than ``stuff_area_min`` pixels is dropped. Pixels whose best class is a
      thing no kept instance covers stay void (as in Panoptic FPN). Segment ids 1..n in creation
      order.
    * Instances: the given instances by descending score (stable, so an already ranked list keeps
      its order), truncated to ``max_instances``; None masks are skipped.

    Args:
        image_id: the image.
        height: H.
        width: W.
        semantic_rles: (K) per class its region, None for none.
        semantic_scores: (K,) region scores (a stuff segment's score).
        instance_rles: (N) instance masks (None entries are skipped).
        instance_labels: (N,) class index.
        instance_scores: (N,) score.
        isthing: (K,) bool.
        params: thresholds.

    Returns:
        The image's :class:`ImageResult`.
    """
    semantic_scores = np.asarray(semantic_scores, np.float64)
    instance_labels = np.asarray(instance_labels, np.int64).reshape(-1)
    instance_scores = np.asarray(instance_scores, np.float64).reshape(-1)
    isthing = np.asarray(isthing, bool)
    if not len(instance_rles) == instance_labels.size == instance_scores.size:
        raise ValueError("instance_rles, instance_labels and instance_scores differ in length")
    semantic = semantic_label_map(semantic_rles, semantic_scores, height, width)
    panoptic = np.zeros((height, width), np.int32)
    painted = np.zeros((height, width), bool)
    segments: list[dict[str, Any]] = []
    _paint_instances(
        instance_rles, instance_labels, instance_scores, params, panoptic, painted, segments
    )
    _fill_stuff(semantic, semantic_scores, isthing, params, panoptic, painted, segments)
    order = np.argsort(-instance_scores, kind="stable")
    order = [i for i in order.tolist() if instance_rles[i] is not None][: params.max_instances]
    return ImageResult(
        image_id,
        height,
        width,
        panoptic,
        segments,
        semantic,
        [instance_rles[i] for i in order],
        instance_labels[order].astype(np.int64),
        instance_scores[order].astype(np.float32),
    )
