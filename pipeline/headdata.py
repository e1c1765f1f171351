"""From the cache and the dataset to what a head plugin is handed (samcp.models.heads).

Shared by training and prediction: cache rows become :class:`~samcp.models.heads.ImageInputs`,
panoptic annotations become :class:`~samcp.models.heads.GroundTruth`, the cache's attributes become
a :class:`~samcp.models.heads.CacheInfo`. The heads build their own samples from these.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
from pycocotools import mask as mask_utils

from samcp.models.heads import CacheInfo, GroundTruth, ImageInputs
from samcp.pipeline.cache import CachedImage, CacheReader
from samcp.pipeline.errors import SamcpError


class ClassSpace:
    """The training classes as a contiguous class index (the order of the text embeddings).

    Args:
        categories: The training classes' dataset categories (``id``, ``name``, ``isthing``), in
            class-index order.
        void_ids: Dataset category ids that are not training classes (open-vocabulary training
            on a subset): their ground-truth segments are void, i.e. left out of the targets, as
            COCO leaves ADE20K-only classes unlabelled.
    """

    def __init__(self, categories: list[dict], void_ids: Collection[int] = ()) -> None:
        self.categories = list(categories)
        self.ids = [int(c["id"]) for c in self.categories]
        self.index = {cid: i for i, cid in enumerate(self.ids)}
        self.isthing = np.array([bool(c.get("isthing", 1)) for c in self.categories])
        self.names = [str(c["name"]) for c in self.categories]
        self.void_ids = frozenset(int(i) for i in void_ids)
        if self.void_ids & set(self.ids):
            raise ValueError("a category cannot be both a class and void")

    def __len__(self) -> int:
        return len(self.ids)


def ground_truth_rles(id_map: np.ndarray, segments: list[dict], classes: ClassSpace) -> GroundTruth:
    """Panoptic PNG ids + segments_info -> per-segment RLEs, labels and crowd flags.

    Segments of ``classes.void_ids`` are dropped (their pixels are void); any other category that
    is not a class is an error.
    """
    rles, labels, crowd = [], [], []
    for seg in segments:
        if int(seg["category_id"]) in classes.void_ids:
            continue
        m = id_map == seg["id"]
        if not m.any():
            continue
        if int(seg["category_id"]) not in classes.index:
            raise SamcpError(
                f"ground-truth category {seg['category_id']} is not in the class list; "
                "train with the dataset's own categories"
            )
        rles.append(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
        labels.append(classes.index[int(seg["category_id"])])
        crowd.append(bool(seg.get("iscrowd", 0)))
    return GroundTruth(
        rles, np.asarray(labels, np.int64), np.asarray(crowd, bool), classes.isthing.copy()
    )


def image_inputs(row: CachedImage) -> ImageInputs:
    """A cache row as a head sees it (every array the row carries)."""
    return ImageInputs(
        image_id=row.image_id,
        height=row.height,
        width=row.width,
        image_arrays=row.image_arrays,
        rles=row.proposals.coco_rles(),
        boxes=np.asarray(row.proposals.bbox, np.float32),
        areas=np.asarray(row.proposals.area),
        mask_arrays=row.mask_arrays,
    )


def cache_info(reader: CacheReader) -> CacheInfo:
    """What the cache offers a head: CLIP geometry and the arrays its rows carry (from the root
    attributes and the first complete shard)."""
    clip = reader.attrs.get("clip") or {}
    dense = bool(clip) and clip.get("store_dense", True)
    levels = tuple(f"clip_{lv}" for lv in clip.get("levels", [])) if dense else ()
    image_arrays: set[str] = set()
    mask_arrays: set[str] = set()
    channels: dict[str, int] = {}
    sam_shape = None
    for sid in reader.shard_ids[:1]:
        g = reader.shard_group(sid)
        image_arrays.update(g.attrs.get("image_arrays", []))
        mask_arrays.update(g.attrs.get("mask_arrays", []))
        for name in image_arrays:
            if name.startswith("clip_"):
                channels[name] = int(g[name].shape[1])
        if "sam_embed" in image_arrays:
            sam_shape = tuple(int(v) for v in g["sam_embed"].shape[1:])
    if reader.shard_ids and levels and not all(lv in channels for lv in levels):
        missing = [lv for lv in levels if lv not in channels]
        raise SamcpError(f"cache {reader.path} lists {', '.join(missing)} but stores none")
    strides = {f"clip_{k}": int(v) for k, v in (clip.get("strides") or {}).items()}
    return CacheInfo(
        clip_model=clip.get("model"),
        clip_input_size=int(clip.get("input_size", 0) or 0),
        clip_levels=levels,
        clip_strides=strides,
        clip_channels=channels,
        text_dim=int(clip.get("embed_dim", 0) or 0),
        image_arrays=frozenset(image_arrays),
        mask_arrays=frozenset(mask_arrays),
        sam_embed_shape=sam_shape,
        clip_head=reader.clip_head(),
    )
