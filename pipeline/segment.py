"""Prompted segmentation with a trained CLIP2SAM run (Open-Vocabulary SAM): a box or a point gives
a mask and its class, and the paper's prompted evaluation (Table 1) over ground-truth prompts.

* :func:`segment_cached_image` -- ``samcp segment``: prompts on one *cached* image (its cached
  ``sam_embed`` and CLIP levels; images not in the cache are refused for now, the frozen encoders
  are not run here) -> one :class:`PromptResult` per prompt; :func:`write_segment_outputs` writes
  them as COCO results JSON (RLE) and an overlay PNG.
* :func:`evaluate_prompts` -- mask IoU and class accuracy over ground-truth prompts
  (``gt-boxes``: each segment's box; ``gt-points``: its centre point), for all, seen and unseen
  classes, the metrics of the paper's Table 1 (IoU_b / IoU_n = mean IoU of the masks of base /
  novel classes; Acc = fraction of prompts whose top class is the segment's).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from samcp.pipeline.cache import CachedImage, CacheReader
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.headdata import image_inputs
from samcp.pipeline.predict import Predictor

PROMPT_MODES = ("gt-boxes", "gt-points")
HEAD = "clip2sam"


@dataclass
class PromptResult:
    """One prompt's answer. ``box`` / ``point`` in image pixels (the prompt), ``bbox`` the mask's
    XYWH box, ``rle`` its COCO RLE at the image size (``counts`` as str)."""

    prompt: str
    kind: str
    class_index: int
    class_id: int
    class_name: str
    score: float
    area: int
    bbox: list[float]
    rle: dict


def load_prompted_run(
    run: str | Path,
    cache: CacheReader,
    *,
    vocabulary: str | None = None,
    clip_checkpoint: str | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    device: str = "auto",
) -> Predictor:
    """A CLIP2SAM run ready for prompts on ``cache`` (samcp.pipeline.predict.Predictor)."""
    pred = Predictor.from_run(
        run,
        cache,
        vocabulary=vocabulary,
        clip_checkpoint=clip_checkpoint,
        alpha=alpha,
        beta=beta,
        device=device,
    )
    if pred.head.name != HEAD:
        raise SamcpError(
            f"run {run} trained the {pred.head.name} head; prompted segmentation needs a "
            f"{HEAD} run (samcp train --head {HEAD})"
        )
    return pred


def find_cached_image(reader: CacheReader, image: str) -> CachedImage:
    """The cache row of an image id, or of an image file whose name names a cached id
    (``000000000139.jpg`` -> ``139``).

    Raises:
        SamcpError: the image is not cached (segmenting uncached images is not supported yet).
    """
    stem = Path(image).stem
    candidates = [str(image), stem]
    if stem.isdigit():
        candidates.append(str(int(stem)))
    for cand in candidates:
        try:
            return reader.get(cand)
        except SamcpError:
            continue
    raise SamcpError(
        f"image {image!r} is not in cache {reader.path}; samcp segment works on cached images "
        "only for now: precompute it first (with --store-sam-embeddings and the run's CLIP levels)"
    )


def _check_prompts(boxes: np.ndarray, points: np.ndarray, height: int, width: int) -> None:
    for b in boxes:
        x0, y0, x1, y1 = (float(v) for v in b)
        if not all(math.isfinite(v) for v in b) or x1 <= x0 or y1 <= y0:
            raise SamcpError(f"--box {x0:g},{y0:g},{x1:g},{y1:g} needs x0 < x1 and y0 < y1")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise SamcpError(
                f"--box {x0:g},{y0:g},{x1:g},{y1:g} lies outside the {width}x{height} image"
            )
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise SamcpError(f"--point {x:g},{y:g} lies outside the {width}x{height} image")


@torch.no_grad()
def run_prompts(
    predictor: Predictor,
    row: CachedImage,
    prompts,
    chunk: int = 64,
) -> tuple[list[dict], np.ndarray]:
    """(mask RLEs, (P, K) class scores) of CLIP2SAM on ``prompts`` (samcp.models.ovsam.Prompts)
    of one cached image, ``chunk`` prompts per forward pass."""
    from dataclasses import replace

    from samcp.models.ovsam import make_clip2sam_sample, prompt_predictions
    from samcp.models.ovsam.prompts import Prompts

    cfg, head = predictor.head_cfg, predictor.head
    try:
        base = make_clip2sam_sample(image_inputs(row), cfg, 0)
    except ValueError as exc:
        raise SamcpError(str(exc)) from None
    rles: list[dict] = []
    scores = []
    ctx = predictor.context()
    alpha = cfg.alpha if ctx.alpha is None else float(ctx.alpha)
    beta = cfg.beta if ctx.beta is None else float(ctx.beta)
    for s in range(0, len(prompts), chunk):
        part = Prompts(*(getattr(prompts, f)[s : s + chunk] for f in prompts.__dataclass_fields__))
        sample = replace(base, prompts=part)
        batch = head.collate([sample], predictor.text_embed, cfg, predictor.device)
        out = predictor.model(**batch)
        r, p, _ = prompt_predictions(
            out, 0, sample, cfg, ctx.text_embed, ctx.seen, alpha, beta, ctx.clip_head
        )
        rles += r
        scores.append(p)
    k = len(predictor.labels)
    return rles, (np.concatenate(scores) if scores else np.zeros((0, k), np.float32))


def segment_cached_image(
    predictor: Predictor,
    row: CachedImage,
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[Sequence[float]] = (),
) -> list[PromptResult]:
    """Masks and classes of box (XYXY) and point (x, y) prompts, in image pixels, on a cached
    image: boxes first, then points, in the order given."""
    from samcp.models.ovsam.prompts import Prompts

    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    p = np.asarray(points, np.float32).reshape(-1, 2)
    if not len(b) and not len(p):
        raise SamcpError("give at least one --box x0,y0,x1,y1 or --point x,y")
    _check_prompts(b, p, row.height, row.width)
    prompts = Prompts.from_user(b, p)
    rles, scores = run_prompts(predictor, row, prompts)
    labels = predictor.labels
    names = [f"box {','.join(f'{v:g}' for v in x)}" for x in b]
    names += [f"point {x:g},{y:g}" for x, y in p]
    out = []
    for i, (rle, sc) in enumerate(zip(rles, scores)):
        k = int(np.argmax(sc))
        cat = labels.categories[k]
        counts = rle["counts"]
        out.append(
            PromptResult(
                prompt=names[i],
                kind="box" if prompts.is_box[i] else "point",
                class_index=k,
                class_id=int(cat["id"]),
                class_name=str(cat["name"]),
                score=float(sc[k]),
                area=int(mask_utils.area(rle)),
                bbox=[float(v) for v in mask_utils.toBbox(rle)],
                rle={
                    "size": list(rle["size"]),
                    "counts": counts.decode() if isinstance(counts, bytes) else counts,
                },
            )
        )
    return out


def write_segment_outputs(
    results: Sequence[PromptResult],
    reader: CacheReader,
    row: CachedImage,
    json_path: str | Path,
    png_path: str | Path | None = None,
    image_root: str | Path | None = None,
) -> list[str]:
    """COCO results JSON (one entry per prompt, with its prompt) and an overlay PNG of the masks
    and their class names over the image (a grey canvas when the image file is not found).
    Returns warnings."""
    from samcp.pipeline.viz import find_image, render_overlay, write_png

    json_path = Path(json_path)
    entries = [
        {
            "image_id": int(row.image_id) if row.image_id.isdigit() else row.image_id,
            "category_id": r.class_id,
            "category_name": r.class_name,
            "score": r.score,
            "bbox": r.bbox,
            "area": r.area,
            "segmentation": r.rle,
            "prompt": r.prompt,
        }
        for r in results
    ]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_name(f".{json_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(entries, indent=1))
    os.replace(tmp, json_path)
    warnings: list[str] = []
    if png_path is not None:
        pixels, why = find_image(reader, row, image_root)
        if pixels is None:
            warnings.append(f"image {row.image_id} not found ({why}); overlay on a grey canvas")
            pixels = np.full((row.height, row.width, 3), 128, np.uint8)
        masks = np.stack(
            [mask_utils.decode({**r.rle, "counts": r.rle["counts"].encode()}) for r in results]
        ).astype(bool)
        labels = [f"{r.class_name} {r.score:.2f}" for r in results]
        write_png(render_overlay(pixels, masks, labels=labels), png_path)
    return warnings


def results_table(results: Sequence[PromptResult]) -> list[tuple[str, str, str, str]]:
    """Rows (prompt, class, score, mask area) for printing."""
    return [(r.prompt, r.class_name, f"{r.score:.3f}", str(r.area)) for r in results]


# ----------------------------------------------------------------------------------------------
# Prompted evaluation (the paper's Table 1).
# ----------------------------------------------------------------------------------------------


@dataclass
class GroupScore:
    """Mean mask IoU and class accuracy over the prompts of a group of classes."""

    prompts: int = 0
    miou: float = float("nan")
    accuracy: float = float("nan")


@dataclass
class PromptEvaluation:
    """``samcp eval --prompts MODE``: per group (all / seen / unseen) prompts, mIoU, accuracy."""

    mode: str
    images: int
    groups: dict[str, GroupScore] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [f"prompted evaluation ({self.mode}, {self.images} images)"]
        lines.append(f"{'group':<8}{'prompts':>9}{'mIoU':>8}{'Acc':>8}")
        for name, g in self.groups.items():
            lines.append(f"{name:<8}{g.prompts:>9}{100 * g.miou:>8.1f}{100 * g.accuracy:>8.1f}")
        return "\n".join(lines + self.notes)


def evaluate_prompts(
    run: str | Path,
    cache: str | Path | CacheReader,
    gt: str | Path,
    mode: str = "gt-boxes",
    *,
    split: str | None = None,
    vocabulary: str | None = None,
    clip_checkpoint: str | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    device: str = "auto",
    limit: int | None = None,
) -> PromptEvaluation:
    """Mask IoU and class accuracy of a CLIP2SAM run over ground-truth prompts (Table 1).

    Every non-crowd segment of every cached image of ``gt`` is one prompt: its box
    (``gt-boxes``) or its centre point, the pixel farthest from its border (``gt-points``). The
    prompt's mask IoU is with its segment; it is correct when its top class is the segment's.
    A class is *seen* when the run trained on it (samcp.models.openvocab.seen_classes: by name or
    synonym), as in ``samcp eval --seen-classes``.

    Args:
        run: a clip2sam run folder.
        cache: the cache of the evaluated images (with sam_embed and the run's CLIP levels).
        gt: the COCO-panoptic dataset root with those images' annotations.
        mode: ``gt-boxes`` or ``gt-points``.
        split: the annotation split [the cache's recorded split, else val2017].
        vocabulary: the classes to predict [the dataset's ``classes.txt`` when present (every
            class, seen and unseen), else the run's training classes].
        clip_checkpoint: the cache's CLIP, when the vocabulary's text embeddings are not cached.
        alpha, beta: CLIP's weight on seen / unseen classes [the run's: 0.1 / 0.9].
        device: auto, cpu or cuda.
        limit: only the first N images.
    """
    from samcp.models.ovsam.prompts import ground_truth_prompts
    from samcp.pipeline.datasets import CocoPanopticDataset
    from samcp.pipeline.headdata import ClassSpace, ground_truth_rles

    if mode not in PROMPT_MODES:
        raise SamcpError(f"--prompts {mode!r}: choose one of {', '.join(PROMPT_MODES)}")
    reader = cache if isinstance(cache, CacheReader) else CacheReader(cache)
    src = reader.attrs.get("dataset_source") or {}
    split = split or src.get("split") or "val2017"
    ds = CocoPanopticDataset(gt, split)
    if vocabulary is None and (Path(gt) / "classes.txt").is_file():
        vocabulary = str(Path(gt) / "classes.txt")
    pred = load_prompted_run(
        run,
        reader,
        vocabulary=vocabulary,
        clip_checkpoint=clip_checkpoint,
        alpha=alpha,
        beta=beta,
        device=device,
    )
    index = {int(cid): k for k, cid in enumerate(pred.labels.ids)}
    classes = ClassSpace(ds.categories)
    known = {str(r.image_id) for r in ds.records}
    ious: list[float] = []
    correct: list[bool] = []
    seen_flags: list[bool] = []
    images = 0
    missing: set[int] = set()
    for row in reader.iter_images(arrays=list(pred.head.needs(pred.head_cfg)[0])):
        if row.image_id not in known:
            continue
        if limit is not None and images >= limit:
            break
        images += 1
        id_map, segs = ds.load_panoptic(row.image_id)
        g = ground_truth_rles(id_map, segs, classes)
        keep = [i for i in range(len(g.rles)) if not g.iscrowd[i]]
        rles = [g.rles[i] for i in keep]
        cat_ids = [classes.ids[int(g.labels[i])] for i in keep]
        if not rles:
            continue
        prompts = ground_truth_prompts(rles, mode)
        masks, scores = run_prompts(pred, row, prompts)
        iou = np.asarray(mask_utils.iou(masks, rles, [0] * len(rles)), np.float64)
        for j, cid in enumerate(cat_ids):
            k = index.get(cid)
            if k is None:
                missing.add(cid)
                continue
            ious.append(float(iou[j, j]))
            correct.append(int(np.argmax(scores[j])) == k)
            seen_flags.append(bool(pred.seen[k]))
    if images == 0:
        raise SamcpError(
            f"no image of cache {reader.path} is in {ds.json_path}; pass the dataset the cache "
            "was made from"
        )
    iou_a, ok_a, seen_a = np.asarray(ious), np.asarray(correct), np.asarray(seen_flags, bool)
    result = PromptEvaluation(mode, images)
    for name, sel in (("all", np.ones_like(seen_a)), ("seen", seen_a), ("unseen", ~seen_a)):
        n = int(sel.sum())
        result.groups[name] = GroupScore(
            n,
            float(iou_a[sel].mean()) if n else float("nan"),
            float(ok_a[sel].mean()) if n else float("nan"),
        )
    if missing:
        result.notes.append(
            f"note: ground-truth classes {sorted(missing)} are not in the vocabulary; their "
            "prompts are left out (pass --vocabulary with every class)"
        )
    return result
