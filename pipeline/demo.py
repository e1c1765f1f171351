"""`make demo`: the main job end to end on embedded defaults (synthetic data, local Ray, local Zarr).

synth -> precompute (SLIC proposals, or SAM everything mode when SAM_CHECKPOINT is set) -> a summary
of the cache -> the proposal-oracle PQ/mIoU/AP on the validation split. Later stages (train, predict)
join as they land.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
from samcp.pipeline.proposals import ProposalConfig
from samcp.pipeline.proposals.sam import SamEverythingParams


def run_demo(out: Path, echo: Callable[[str], None] = print, num_workers: int = 2) -> dict:
    """Runs the demo into ``out`` (re-running resumes) and returns its figures."""
    from samcp.pipeline.synth import make_synthetic_dataset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = out / "synth"
    if not (data / "annotations").exists():
        echo(f"[1/3] synth: writing a synthetic COCO-panoptic dataset to {data}")
        make_synthetic_dataset(data, seed=0)
    else:
        echo(f"[1/3] synth: reusing {data}")

    ckpt = os.environ.get("SAM_CHECKPOINT")
    if ckpt:
        model = os.environ.get("SAM_MODEL", "vit_h")
        proposals = ProposalConfig(
            source="sam", sam_model=model, sam_checkpoint=ckpt, sam=SamEverythingParams()
        )
        echo(f"[2/3] precompute: SAM {model} everything mode from {ckpt}")
    else:
        proposals = ProposalConfig(source="slic")
        echo("[2/3] precompute: SLIC proposals (set SAM_CHECKPOINT=/path/sam_vit_h.pth for SAM)")
    figures: dict = {}
    for split in ("train2017", "val2017"):
        cache = out / f"cache_{split}.zarr"
        summary = run_precompute(
            PrecomputeConfig(
                source=str(data),
                out=str(cache),
                split=split,
                shard_size=8,
                proposals=proposals,
                num_workers=num_workers,
            )
        )
        for line in summary.lines():
            echo(f"      {split}: {line}")
        figures[split] = cache_summary(cache)
        f = figures[split]
        echo(
            f"      {split}: {f['images']} images, {f['masks']} masks "
            f"({f['masks_per_image']:.1f}/image), {f['bytes_per_image'] / 1024:.1f} KiB/image"
        )

    echo(
        "[3/3] eval: proposal oracle on val2017 (the ceiling any head can reach with these patches)"
    )
    figures["oracle"] = _oracle(data, out / "cache_val2017.zarr", out / "oracle_val2017", echo)
    echo(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return figures


def cache_summary(cache: Path) -> dict:
    """Images, masks and on-disk bytes of a local cache (a quick look; `samcp inspect` goes further)."""
    from samcp.pipeline.cache import CacheReader

    reader = CacheReader(cache)
    images = len(reader)
    masks = sum(int(reader.root["shards"][s].attrs["num_masks"]) for s in reader.shard_ids)
    size = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())
    return {
        "images": images,
        "masks": masks,
        "masks_per_image": masks / max(images, 1),
        "bytes_per_image": size / max(images, 1),
    }


def _oracle(data: Path, cache: Path, pred_dir: Path, echo) -> dict:
    """Proposal-oracle predictions from the cache, evaluated like any model's."""
    from samcp.pipeline.evaluation import (
        build_oracle_predictions,
        cache_proposals,
        evaluate,
        format_report,
        resolve_ground_truth,
    )

    gt_json, gt_png = resolve_ground_truth(data, "val2017")
    build_oracle_predictions(gt_json, gt_png, cache_proposals(cache), pred_dir, workers=2)
    report = evaluate(gt_json, gt_png, pred_dir, workers=2)
    for line in format_report(report).splitlines():
        echo(f"      {line}")
    return report.to_dict()
