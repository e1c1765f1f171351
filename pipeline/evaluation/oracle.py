"""The oracle: the best panoptic, semantic and instance output the cached proposals allow.

Each proposal is given to the ground-truth segment that holds the largest part of it: the segment
with the highest intersection-over-proposal (IoP = |proposal ∩ segment| / |proposal|), if that IoP
is above ``threshold``. The proposals of a segment are merged (union) and labelled with its true
class. The result is written as an ordinary prediction folder, so it is evaluated by exactly the
code that evaluates a model.

Choices (documented in docs/eval.md):

- Crowd segments are targets too, so proposals on a crowd region do not spill into neighbours. Their
  merged masks are painted with the crowd's class in the semantic output (the semantic ground truth
  labels crowd pixels), as void in the panoptic output and are left out of instances.json (crowd
  regions are never true positives in PQ or AP).
- Painting order: merged masks are painted from the largest to the smallest (ties by segment id), so
  where merged masks overlap the smaller one stays visible, as a small object in front of a large
  background usually is. Pixels no assigned proposal covers are void / unlabelled.
- Panoptic segments keep their ground-truth segment id; a segment entirely painted over is dropped.
- instances.json holds each merged thing mask unoccluded, with score 1.0.
"""

from __future__ import annotations

import multiprocessing
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.evaluation.formats import (
    IGNORE_LABEL,
    Category,
    load_ground_truth,
    png_stem,
    read_panoptic_png,
    write_json_atomic,
    write_panoptic_png,
)
from samcp.pipeline.evaluation.instance import encode_mask
from samcp.pipeline.outputs import prepare_output_dir, staging_path, write_marker

ProposalSource = (
    Mapping[str, Sequence[Mapping[str, Any]]] | Iterable[tuple[str, Sequence[Mapping[str, Any]]]]
)


@dataclass
class OracleStats:
    """What the oracle did.

    Attributes:
        images: Ground-truth images written.
        images_without_proposals: Ground-truth images the proposal source did not cover (written
            as all void, so they count against the oracle).
        proposals: Proposals read.
        assigned: Proposals assigned to a ground-truth segment.
        images_not_in_source: Of ``images_without_proposals``, those the proposal source does
            not list at all (not even as a failed row), e.g. because a cache is unfinished.
    """

    images: int
    images_without_proposals: int
    proposals: int
    assigned: int
    images_not_in_source: int = 0


@dataclass(frozen=True)
class _OracleTask:
    image_id: str
    file_name: str
    gt_png: str
    gt_segments: list[dict[str, Any]] | None  # None: the image is not in the ground truth
    rles: list[dict[str, Any]]


@dataclass(frozen=True)
class _OracleContext:
    categories: tuple[Category, ...]
    threshold: float
    out: str
    write_semantic: bool


_CTX: _OracleContext | None = None


def _init(ctx: _OracleContext) -> None:
    global _CTX
    _CTX = ctx


def assign_proposals(
    compact: np.ndarray, num_segments: int, rles: Sequence[Mapping[str, Any]], threshold: float
) -> tuple[list[np.ndarray | None], int]:
    """Assigns proposals to segments by highest IoP and merges them per segment.

    Args:
        compact: (H, W) map of segment index 1..S per pixel, 0 where no segment is listed.
        num_segments: S.
        rles: COCO RLE proposals at the image's size (``counts`` bytes or str).
        threshold: Minimum IoP, exclusive.

    Returns:
        The merged mask of each segment (None when nothing was assigned) and the number of
        proposals assigned. With ties in IoP the lower segment index wins.
    """
    merged: list[np.ndarray | None] = [None] * num_segments
    assigned = 0
    for rle in rles:
        counts = rle["counts"]
        r = {
            "size": list(rle["size"]),
            "counts": counts.encode() if isinstance(counts, str) else counts,
        }
        m = mask_utils.decode(r).astype(bool)
        if m.shape != compact.shape:
            raise SamcpError(
                f"a proposal has size {m.shape} but the image is {compact.shape}; proposals must "
                "be at the original image size"
            )
        area = int(m.sum())
        if area == 0 or num_segments == 0:
            continue
        inter = np.bincount(compact[m], minlength=num_segments + 1)[1:]
        best = int(np.argmax(inter))
        if inter[best] / area > threshold:
            merged[best] = m if merged[best] is None else (merged[best] | m)
            assigned += 1
    return merged, assigned


def _oracle_image(task: _OracleTask) -> tuple[str, list[dict], list[dict], int, int]:
    ctx = _CTX
    assert ctx is not None and task.gt_segments is not None
    cats = {c.id: c for c in ctx.categories}
    gt = read_panoptic_png(Path(task.gt_png))
    segs = task.gt_segments
    index = {int(s["id"]): i + 1 for i, s in enumerate(segs)}
    ids, inverse = np.unique(gt, return_inverse=True)
    lut = np.array([index.get(x, 0) for x in ids.tolist()], dtype=np.int64)
    compact = lut[inverse.reshape(gt.shape)]
    try:
        merged, assigned = assign_proposals(compact, len(segs), task.rles, ctx.threshold)
    except SamcpError as exc:
        raise SamcpError(f"image {task.image_id}: {exc}") from None

    areas = [0 if m is None else int(m.sum()) for m in merged]
    order = sorted(
        (i for i in range(len(segs)) if merged[i] is not None),
        key=lambda i: (-areas[i], int(segs[i]["id"])),
    )
    pan = np.zeros(gt.shape, dtype=np.uint32)
    sem = np.full(gt.shape, IGNORE_LABEL, dtype=np.uint8)
    for i in order:
        s = segs[i]
        crowd = int(s.get("iscrowd", 0)) == 1
        pan[merged[i]] = 0 if crowd else int(s["id"])
        if ctx.write_semantic:
            sem[merged[i]] = cats[int(s["category_id"])].index

    visible, counts = np.unique(pan, return_counts=True)
    area_of = dict(zip(visible.tolist(), counts.tolist()))
    segments_info = []
    instances = []
    for i, s in enumerate(segs):
        sid = int(s["id"])
        if merged[i] is None or int(s.get("iscrowd", 0)) == 1:
            continue
        if sid in area_of:
            segments_info.append(
                {
                    "id": sid,
                    "category_id": int(s["category_id"]),
                    "iscrowd": 0,
                    "area": int(area_of[sid]),
                }
            )
        if cats[int(s["category_id"])].isthing:
            instances.append(
                {
                    "image_id": task.image_id,
                    "category_id": int(s["category_id"]),
                    "segmentation": encode_mask(merged[i]),
                    "score": 1.0,
                }
            )
    out = Path(ctx.out)
    write_panoptic_png(out / "panoptic" / task.file_name, pan)
    if ctx.write_semantic:
        Image.fromarray(sem).save(out / "semantic" / f"{png_stem(task.file_name)}.png")
    return task.image_id, segments_info, instances, len(task.rles), assigned


def _iter_pairs(proposals: ProposalSource) -> Iterator[tuple[str, Sequence[Mapping[str, Any]]]]:
    if isinstance(proposals, Mapping):
        yield from proposals.items()
    else:
        yield from proposals


def _prepare_out(out_dir: Path, option: str) -> Path:
    """Checks that the oracle may write ``out_dir`` and makes a fresh staging folder beside it.

    Only a missing or empty folder, or an oracle folder samcp wrote, is accepted; the staging
    folder is new (never an existing path), so nothing of the user's is ever deleted.
    """
    prepare_output_dir(out_dir, "oracle", reuse=True, option=option)
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out_dir, "partial")
    staging.mkdir()  # fails rather than reuse anything already there
    (staging / "panoptic").mkdir()
    (staging / "semantic").mkdir()
    return staging


def _publish(staging: Path, out_dir: Path, option: str) -> None:
    """Moves the finished staging folder to ``out_dir``, replacing an oracle folder there."""
    # Checked again: the folder may have changed while the oracle ran.
    replace = prepare_output_dir(out_dir, "oracle", reuse=True, option=option)
    write_marker(staging, "oracle")
    if replace:
        old = staging_path(out_dir, "old")
        old.mkdir()
        out_dir.rename(old / "oracle")
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out_dir.is_dir():  # empty
            out_dir.rmdir()
        staging.rename(out_dir)


def build_oracle_predictions(
    gt_json: Path,
    gt_png_dir: Path | None,
    proposals: ProposalSource,
    out_dir: Path,
    *,
    threshold: float = 0.5,
    workers: int = 1,
    progress: bool = False,
    option: str = "--oracle-out",
) -> OracleStats:
    """Writes the oracle's prediction folder for a ground truth and a set of proposals.

    Args:
        gt_json: Ground-truth COCO panoptic JSON.
        gt_png_dir: Its PNG folder (default: the JSON's path without ``.json``).
        proposals: ``image_id -> COCO RLE proposals`` (a mapping, or an iterable of pairs such as a
            cache reader's rows), at the original image size.
        out_dir: Prediction folder to write (panoptic.json, panoptic/, semantic/, instances.json).
            It is written beside and moved into place when complete. It must be missing, empty
            or an oracle folder samcp wrote (which is replaced); any other folder is refused,
            never deleted.
        threshold: Minimum intersection-over-proposal (exclusive) to assign a proposal.
        workers: Processes; 1 runs in-process.
        progress: Show a tqdm bar on stderr.
        option: The option that named ``out_dir``, for messages.

    Returns:
        Counts of what was done.

    Raises:
        SamcpError: If ``out_dir`` may not be written, a proposal names an image that is not in
            the ground truth, an image appears twice, or a proposal's size differs from its
            image's.
    """
    if not 0.0 <= threshold < 1.0:
        raise SamcpError(f"oracle threshold {threshold} must be in [0, 1)")
    gt = load_ground_truth(Path(gt_json), gt_png_dir)
    out_dir = Path(out_dir)
    staging = _prepare_out(out_dir, option)
    by_id = {str(a["image_id"]): a for a in gt.annotations}
    ctx = _OracleContext(
        tuple(gt.categories), threshold, str(staging), len(gt.categories) < IGNORE_LABEL
    )
    seen: set[str] = set()

    def task(image_id: str, rles: Sequence[Mapping[str, Any]]) -> _OracleTask:
        ann = by_id.get(image_id)
        if ann is None or image_id in seen:
            # Reported by the main process when the result comes back.
            return _OracleTask(image_id, "", "", None, [])
        seen.add(image_id)
        return _OracleTask(
            image_id,
            ann["file_name"],
            str(gt.png_dir / ann["file_name"]),
            list(ann["segments_info"]),
            [dict(r) for r in rles],
        )

    not_in_source = 0

    def tasks() -> Iterator[_OracleTask]:
        nonlocal not_in_source
        for image_id, rles in _iter_pairs(proposals):
            yield task(str(image_id), rles)
        not_in_source = len(by_id) - len(seen)
        for image_id in by_id:
            if image_id not in seen:
                yield task(image_id, [])

    results: dict[str, tuple[list[dict], list[dict]]] = {}
    n_props = n_assigned = 0
    covered = 0
    bar = tqdm(total=len(by_id), desc="oracle", unit="img", file=sys.stderr, disable=not progress)
    try:
        if workers <= 1:
            _init(ctx)
            stream: Iterable[Any] = map(_run_task, tasks())
        else:
            pool = multiprocessing.get_context().Pool(workers, initializer=_init, initargs=(ctx,))
            # imap keeps the order of the tasks, so the output does not depend on the workers.
            stream = pool.imap(_run_task, tasks(), chunksize=4)
        for image_id, r in stream:
            if r is None:
                why = "is not in the ground truth" if image_id not in by_id else "appears twice"
                raise SamcpError(
                    f"proposals for image {image_id} {why} ({gt.json_path}); use a cache built "
                    "from the same dataset split"
                )
            _, segments_info, instances, n, assigned = r
            results[image_id] = (segments_info, instances)
            n_props += n
            n_assigned += assigned
            covered += n > 0
            bar.update(1)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bar.close()
        if workers > 1:
            pool.terminate()

    annotations = []
    instances_all: list[dict] = []
    for ann in gt.annotations:
        segments_info, instances = results[str(ann["image_id"])]
        annotations.append(
            {
                "image_id": ann["image_id"],
                "file_name": ann["file_name"],
                "segments_info": segments_info,
            }
        )
        instances_all.extend(instances)
    categories = [{"id": c.id, "name": c.name, "isthing": int(c.isthing)} for c in gt.categories]
    try:
        write_json_atomic(
            staging / "panoptic.json", {"annotations": annotations, "categories": categories}
        )
        write_json_atomic(staging / "instances.json", instances_all)
        if not ctx.write_semantic:
            shutil.rmtree(staging / "semantic")
        _publish(staging, out_dir, option)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return OracleStats(len(by_id), len(by_id) - covered, n_props, n_assigned, not_in_source)


def _run_task(t: _OracleTask) -> tuple[str, tuple[str, list[dict], list[dict], int, int] | None]:
    return t.image_id, (None if t.gt_segments is None else _oracle_image(t))


def cache_proposals(cache: str | Path) -> Iterator[tuple[str, list[dict]]]:
    """(image_id, proposals as COCO RLE dicts) for every row of a proposal cache, shard order.

    A failed row has no proposals; the oracle writes that image as all void.
    """
    from samcp.pipeline.cache import CacheReader

    for row in CacheReader(cache).iter_images(include_failed=True):
        yield str(row.image_id), (row.rles if int(row.status) == 0 else [])


def unfinished_cache_note(cache: str | Path) -> str | None:
    """Says that a proposal cache is unfinished (its precompute stopped early), else None.

    A cache is unfinished when a shard group was left without ``complete=true`` (a worker
    stopped mid-write) or, where precompute recorded how many images it planned, when the
    complete shards hold fewer. Readers skip such shards, so their images have no proposals.

    Returns:
        A one-line message naming the cache, what is missing and the fix, or None.
    """
    from samcp.pipeline.cache import CacheReader

    note = CacheReader(cache).unfinished_note()
    return None if note is None else f"{note}; re-run the same `samcp precompute` to finish it"


def check_cache_covers(cache: str | Path, gt_json: Path, gt_png_dir: Path | None = None) -> None:
    """Refuses to predict for evaluation from an unfinished proposal cache.

    Predictions of an unfinished cache lack the images it does not hold, so the evaluation could
    not be complete; checking before any prediction is made lets the message name the cause (and
    how many ground-truth images are affected) instead of a missing prediction.

    Args:
        cache: The proposal cache to predict from.
        gt_json: The ground-truth panoptic JSON.
        gt_png_dir: Its PNG folder.

    Raises:
        SamcpError: The cache is unfinished.
    """
    note = unfinished_cache_note(cache)
    if note is None:
        return
    from samcp.pipeline.cache import CacheReader

    reader = CacheReader(cache)
    cached = reader.image_sizes()
    wanted = [str(a["image_id"]) for a in load_ground_truth(gt_json, gt_png_dir).annotations]
    lacking = [i for i in wanted if i not in cached]
    if lacking:
        raise SamcpError(
            f"{len(lacking)} of the {len(wanted)} ground-truth images (e.g. {lacking[0]}) have no "
            f"proposals because {note}, then evaluate again"
        )
    raise SamcpError(f"{note}, then evaluate again")
