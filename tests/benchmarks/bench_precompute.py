"""Precompute throughput and memory vs segment_anything's SamAutomaticMaskGenerator, side by side.

Same model (a real-size vit_b, random weights scaled as in samcp.pipeline.foundation), same images,
same parameters (16 points per side, thresholds at 0, box NMS 0.7, no crops). Each side runs in its
own child process so that each peak RSS is its own; the two alternate ``--repeats`` times and the
best time of each is compared. Then: cache bytes per image and per mask, and reader throughput, on a
SAM cache written by `samcp precompute` for the same images.

Usage:
    python tests/benchmarks/bench_precompute.py [--images 2] [--height 480] [--width 640]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _images(n: int, h: int, w: int):
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = (rng.random((h, w, 3)) * 80 + 60).astype(np.uint8)
        img[h // 6 : h // 2, w // 5 : w // 2] = [200, 40 + 20 * i, 40]
        out.append(img)
    return out


def child(which: str, ckpt: str, n: int, h: int, w: int, pps: int) -> None:
    """Runs one side in this process and prints a JSON line with its timings and memory."""
    import torch

    from samcp.pipeline.foundation import load_sam

    torch.set_grad_enabled(False)
    model = load_sam("vit_b", ckpt)
    images = _images(n, h, w)
    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.7)
    if which == "samcp":
        from samcp.pipeline.proposals.sam import SamEverythingGenerator, SamEverythingParams

        gen = SamEverythingGenerator(model, SamEverythingParams(points_per_side=pps, **kw))
        run = gen.generate
    else:
        from segment_anything import SamAutomaticMaskGenerator

        gen = SamAutomaticMaskGenerator(
            model, points_per_side=pps, crop_n_layers=0, min_mask_region_area=0, **kw
        )
        run = gen.generate
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    masks = sum(len(run(img)) for img in images)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "which": which,
                "seconds": dt,
                "images": n,
                "masks": masks,
                "peak_rss_mib": peak / 1024,
                "extra_rss_mib": (peak - base) / 1024,
            }
        )
    )


def _run_child(which, ckpt, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--ckpt",
        ckpt,
        "--images",
        str(args.images),
        "--height",
        str(args.height),
        "--width",
        str(args.width),
        "--points-per-side",
        str(args.points_per_side),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cache_figures(ckpt: str, tmp: Path, args) -> dict:
    """Writes a SAM cache of the bench images with samcp precompute, then reads it back."""
    from PIL import Image

    from samcp.pipeline.cache import CacheReader
    from samcp.pipeline.datasets import ImageRecord, write_manifest
    from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
    from samcp.pipeline.proposals import ProposalConfig
    from samcp.pipeline.proposals.sam import SamEverythingParams

    recs = []
    for i, img in enumerate(_images(args.images, args.height, args.width)):
        p = tmp / f"img{i}.png"
        Image.fromarray(img).save(p)
        recs.append(ImageRecord(str(i), str(p), args.height, args.width))
    write_manifest(recs, tmp / "m.jsonl")
    props = ProposalConfig(
        source="sam",
        sam_model="vit_b",
        sam_checkpoint=ckpt,
        sam=SamEverythingParams(
            points_per_side=args.points_per_side,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
            box_nms_thresh=1.0,
        ),
    )
    cache = tmp / "cache.zarr"
    t0 = time.perf_counter()
    s = run_precompute(
        PrecomputeConfig(
            source=str(tmp / "m.jsonl"),
            out=str(cache),
            shard_size=1,
            proposals=props,
            num_workers=0,
            progress=False,
        )
    )
    precompute_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        n = sum(1 for _ in CacheReader(cache).iter_images())
    read_s = (time.perf_counter() - t0) / reps
    return {
        "precompute_images_per_s": s.num_images / precompute_s,
        "masks": s.num_masks,
        "bytes_per_image": size / s.num_images,
        "bytes_per_mask": size / max(s.num_masks, 1),
        "reader_images_per_s": n / read_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--child", choices=["samcp", "reference"])
    ap.add_argument("--ckpt")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.ckpt, args.images, args.height, args.width, args.points_per_side)
        return

    from samcp.pipeline.foundation import make_random_sam_checkpoint

    with tempfile.TemporaryDirectory(prefix="samcp-bench-pre-") as tmp:
        ckpt = str(make_random_sam_checkpoint(Path(tmp) / "sam_vit_b.pth", "vit_b"))
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for which in ("reference", "samcp"):
                r = _run_child(which, ckpt, args)
                if which not in best or r["seconds"] < best[which]["seconds"]:
                    best[which] = r
        ref, ours = best["reference"], best["samcp"]
        print(
            f"precompute vs SamAutomaticMaskGenerator: vit_b (random weights), "
            f"{args.images} images {args.width}x{args.height}, {args.points_per_side}^2 points, "
            "thresholds 0, NMS 0.7"
        )
        for name, r in (("SamAutomaticMaskGenerator", ref), ("samcp", ours)):
            print(
                f"  {name:<26} {r['seconds'] / r['images']:7.2f} s/image  "
                f"{r['images'] / r['seconds']:6.3f} images/s  peak RSS {r['peak_rss_mib']:7.0f} MiB "
                f"(+{r['extra_rss_mib']:.0f} MiB over the loaded model)  masks {r['masks']}"
            )
        print(f"  speed-up: {ref['seconds'] / ours['seconds']:.2f}x")
        c = cache_figures(ckpt, Path(tmp), args)
        print(
            f"cache (no NMS, {c['masks']} masks): {c['bytes_per_image'] / 1024:.1f} KiB/image, "
            f"{c['bytes_per_mask']:.0f} B/mask; precompute incl. writing "
            f"{c['precompute_images_per_s']:.3f} images/s; reader {c['reader_images_per_s']:.1f} images/s"
        )


if __name__ == "__main__":
    main()
