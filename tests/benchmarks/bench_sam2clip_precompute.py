"""Precompute with SAM2CLIP embeddings vs SAM's image encoder: throughput side by side, and how far
the proposals agree.

Two contenders run what a precompute worker runs per image (samcp.pipeline.precompute's
ImageProcessor: read the image, proposals, the CLIP pass with its dense levels and mask-pooled
embeddings; only the cache write is left out), on the same images with the same SAM prompt encoder
and mask decoder and the same everything-mode parameters:

    sam       SAM image encoder -> mask decoder                 (--sam-features sam)
    sam2clip  CLIP levels -> the sam2clip run's neck -> decoder  (--sam-features sam2clip)

The CLIP pass is counted for both. They alternate ``--repeats`` times (the order flips each time);
the best time of each is kept. The embedding stages alone (SAM's encoder vs the neck on the CLIP
levels, without the CLIP pass) are timed the same way. Agreement: the mean, over every SAM2CLIP
proposal, of its best IoU with a SAM proposal of the same image (and the reverse), next to the
same figure for an untrained neck of the same shape (what chance agreement looks like here).

Setup, built here: synthetic images (samcp synth), samcp's vit_tiny random SAM
(write_random_sam_checkpoint: hypernetwork x30, DESIGN.md), a random test-size CLIP
(samcp-test-convnext at the 1024 frame, levels res4 + res5), and a sam2clip run trained briefly with
`samcp train --head sam2clip` on a cache of the train images (SLIC proposals, SAM embeddings, CLIP
levels). ``--sam2clip-run`` reuses a run instead (with ``--workdir`` holding its checkpoints).

Usage (one thread per process on a shared CPU: two threads wait on each other when other work
holds the cores):
    OMP_NUM_THREADS=1 python tests/benchmarks/bench_sam2clip_precompute.py [--images 2] \
        [--train-images 8] [--steps 100] [--repeats 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

CLIP_MODEL = "samcp-test-convnext"
LEVELS = ("res4", "res5")
# A small neck (the paper's is 1280 wide, 5 blocks, the last global): windowed blocks only, as a
# global block over SAM's 64 x 64 grid costs seconds per step on a CPU.
NECK = {
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 4,
    "window_size": 8,
    "global_attn_indexes": [],
}


def build_world(work: Path, args) -> dict:
    """Dataset, checkpoints, the training cache and the trained sam2clip run (reused if there)."""
    from samcp.pipeline.clip import ClipConfig, make_random_clip_checkpoint
    from samcp.pipeline.foundation import write_random_sam_checkpoint
    from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
    from samcp.pipeline.proposals import ProposalConfig
    from samcp.pipeline.synth import make_synthetic_dataset

    data = work / "synth"
    if not (data / "val2017").is_dir():
        make_synthetic_dataset(
            data,
            seed=11,
            num_train=args.train_images,
            num_val=args.images,
            height=args.height,
            width=args.width,
        )
    sam = work / "sam_vit_tiny.pth"
    if not sam.is_file():
        write_random_sam_checkpoint(sam, seed=0, model="vit_b", tiny=True)  # vit_tiny, x30
    clip = work / "clip.pt"
    if not clip.is_file():
        make_random_clip_checkpoint(clip, CLIP_MODEL)
    clip_cfg = ClipConfig(CLIP_MODEL, str(clip), 1024, LEVELS)
    run = Path(args.sam2clip_run) if args.sam2clip_run else work / "run_sam2clip"
    if not (run / "model" / "model.safetensors").is_file():
        cache = work / "cache_train.zarr"
        t0 = time.perf_counter()
        run_precompute(
            PrecomputeConfig(
                source=str(data),
                out=str(cache),
                split="train2017",
                shard_size=4,
                proposals=ProposalConfig(
                    source="slic", sam_model="vit_tiny", sam_checkpoint=str(sam)
                ),
                num_workers=0,
                progress=False,
                store_sam_embeddings=True,
                clip=clip_cfg,
            )
        )
        t1 = time.perf_counter()
        from samcp.cli.main import main as samcp_main

        sets = [x for k, v in NECK.items() for x in ("--set", f"{k}={v}")]
        samcp_main(
            [
                "train", "--head", "sam2clip", "--cache", str(cache), "--dataset", str(data),
                "--split", "train2017", "--out", str(run), "--clip-checkpoint", str(clip),
                *sets, "--steps", str(args.steps), "--batch-size", "4", "--lr", "1e-3",
                "--no-progress",
            ]
        )  # fmt: skip
        print(
            f"setup: train cache ({args.train_images} images) {t1 - t0:.0f} s, sam2clip "
            f"training ({args.steps} steps) {time.perf_counter() - t1:.0f} s"
        )
    return {"data": data, "sam": sam, "clip_cfg": clip_cfg, "run": run}


def untrained_copy(run: Path, out: Path) -> Path:
    """A run folder holding a randomly initialised neck of the run's shape."""
    import torch

    from samcp.models.ovsam.sam2clip import Sam2ClipNeck
    from samcp.models.registry import save_head
    from samcp.pipeline.proposals.sam2clip import read_sam2clip_config

    _, cfg = read_sam2clip_config(run)
    torch.manual_seed(0)
    save_head(Sam2ClipNeck(cfg), cfg, out / "model")
    return out


def mean_train_embedding(work: Path):
    """The mean cached SAM embedding of the training images (the trivial predictor), or None when
    the training cache is not in ``work``."""
    import numpy as np

    from samcp.pipeline.cache import CacheReader

    cache = work / "cache_train.zarr"
    if not (cache / "zarr.json").is_file():
        return None
    rows = CacheReader(cache).iter_images()
    return np.mean([r.image_arrays["sam_embed"].astype(np.float32) for r in rows], axis=0)


def processors(world: dict, args, device: str, untrained: Path) -> dict:
    from samcp.pipeline.precompute import ImageProcessor, PrecomputeConfig
    from samcp.pipeline.proposals import ProposalConfig
    from samcp.pipeline.proposals.sam import SamEverythingParams

    props = ProposalConfig(
        source="sam",
        sam_model="vit_tiny",
        sam_checkpoint=str(world["sam"]),
        sam=SamEverythingParams(
            points_per_side=args.points_per_side,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_score_thresh,
            box_nms_thresh=args.box_nms_thresh,
        ),
    )
    base = PrecomputeConfig(
        source=str(world["data"]),
        out="unused",
        proposals=props,
        clip=world["clip_cfg"],
        store_sam_embeddings=True,
        progress=False,
    )
    s2c = replace(props, sam_features="sam2clip", sam2clip_run=str(world["run"]))
    rand = replace(props, sam_features="sam2clip", sam2clip_run=str(untrained))
    return {
        "sam": ImageProcessor(base, device),
        "sam2clip": ImageProcessor(replace(base, proposals=s2c), device),
        "untrained": ImageProcessor(replace(base, proposals=rand), device),
    }


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_alternating(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Best wall time of each callable, alternating them (order flipped every repeat)."""
    best: dict[str, float] = {}
    names = list(fns)
    for name in names:  # warm-up (lazy inits, allocator, caches)
        fns[name]()
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    return best


def agreement(rows_a, rows_b) -> tuple[float, int]:
    """Mean over b's proposals of the best IoU with a's proposals of the same image; count."""
    import numpy as np
    from pycocotools import mask as mask_utils

    best = []
    for a, b in zip(rows_a, rows_b, strict=True):
        pa, pb = a.proposals, b.proposals
        if not len(pb):
            continue
        if not len(pa):
            best.extend([0.0] * len(pb))
            continue
        iou = mask_utils.iou(pb.coco_rles(), pa.coco_rles(), [0] * len(pa))
        best.extend(np.asarray(iou).reshape(len(pb), len(pa)).max(1).tolist())
    return (float(np.mean(best)) if best else float("nan")), len(best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2, help="timed images (val split)")
    ap.add_argument("--train-images", type=int, default=8)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--steps", type=int, default=100, help="sam2clip training steps")
    # A random SAM's predicted IoUs and stability scores are low and its boxes span the image, so
    # the paper's filters (0.8 / 0.9 / NMS 0.7) keep next to nothing: all masks are compared.
    ap.add_argument("--points-per-side", type=int, default=8)
    ap.add_argument("--pred-iou-thresh", type=float, default=0.0)
    ap.add_argument("--stability-score-thresh", type=float, default=0.0)
    ap.add_argument("--box-nms-thresh", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default=None, help="cpu or cuda [cuda when available]")
    ap.add_argument("--workdir", default=None, help="keep the dataset, checkpoints and run here")
    ap.add_argument("--sam2clip-run", default=None, help="reuse this trained sam2clip run")
    ap.add_argument("--setup-only", action="store_true", help="build --workdir, time nothing")
    args = ap.parse_args()

    import numpy as np
    import torch

    from samcp.pipeline.datasets import load_image_rgb, open_image_source
    from samcp.pipeline.proposals.sam_encoder import embed_image

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="samcp-bench-s2c-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        world = build_world(work, args)
        if args.setup_only:
            return
        procs = processors(world, args, device, untrained_copy(world["run"], Path(tmp) / "rand"))
        recs = open_image_source(world["data"], "val2017")[: args.images]
        images = [load_image_rgb(r.file_name) for r in recs]

        out: dict[str, list] = {}

        def whole(name):
            def f():
                out[name] = [procs[name](r) for r in recs]

            return f

        full = time_alternating({k: whole(k) for k in ("sam", "sam2clip")}, args.repeats, device)
        failed = [r.error for rows in out.values() for r in rows if not r.ok]
        if failed:
            raise SystemExit(f"failed rows: {failed[:3]}")

        sam_model = procs["sam"].proposals.sam_model
        clip, neck = procs["sam2clip"].clip, procs["sam2clip"].sam2clip

        def encoder():
            with torch.inference_mode():
                for img in images:
                    embed_image(sam_model, img)

        levels = []  # the neck's inputs, as precompute stores them (float16)
        for img in images:
            _, lv = clip.dense_features(img)
            levels.append({f"clip_{k}": v.cpu().numpy().astype(np.float16) for k, v in lv.items()})

        def neck_only():
            for arrays in levels:
                neck.embed(arrays)

        stage = time_alternating({"encoder": encoder, "neck": neck_only}, args.repeats, device)
        rand_rows = [procs["untrained"](r) for r in recs]
        mean = mean_train_embedding(work)
        mean_rows = None
        if mean is not None:  # SAM's decoder on the mean training embedding, for every image
            feats = torch.from_numpy(mean)[None]
            gen = procs["sam2clip"].proposals
            mean_rows = [
                SimpleNamespace(proposals=gen(img, rec, False, features=feats)[0])
                for img, rec in zip(images, recs, strict=True)
            ]

        n = len(recs)
        sam_rows, s2c_rows = out["sam"], out["sam2clip"]
        a_fwd, n_fwd = agreement(sam_rows, s2c_rows)
        a_rev, n_rev = agreement(s2c_rows, sam_rows)
        r_fwd, n_rand = agreement(sam_rows, rand_rows)
        emb_sam = np.stack([r.image_arrays["sam_embed"] for r in sam_rows]).astype(np.float32)
        emb_s2c = np.stack([r.image_arrays["sam_embed"] for r in s2c_rows]).astype(np.float32)
        emb_rand = np.stack([r.image_arrays["sam_embed"] for r in rand_rows]).astype(np.float32)
        mse = float(((emb_s2c - emb_sam) ** 2).mean())
        mse_rand = float(((emb_rand - emb_sam) ** 2).mean())
        mse_mean = float(((mean[None] - emb_sam) ** 2).mean()) if mean is not None else np.nan
        a_mean = agreement(sam_rows, mean_rows)[0] if mean_rows is not None else np.nan

        print(
            f"SAM2CLIP precompute vs SAM precompute: vit_tiny random SAM (x30), {CLIP_MODEL} "
            f"random CLIP at 1024 ({'+'.join(LEVELS)}), sam2clip run {world['run'].name}; "
            f"{n} images {args.width}x{args.height}, {args.points_per_side}^2 points, "
            f"pred_iou {args.pred_iou_thresh:g}, stability {args.stability_score_thresh:g}, "
            f"NMS {args.box_nms_thresh:g}; {device}, best of {args.repeats} alternating"
        )
        labels = {"sam": "SAM encoder + decoder", "sam2clip": "SAM2CLIP neck + decoder"}
        for name, label in labels.items():
            rows = out[name]
            masks = sum(len(r.proposals) for r in rows)
            print(
                f"  {label:<24} {full[name] / n:7.3f} s/image  {n / full[name]:7.2f} images/s  "
                f"{masks / n:6.1f} proposals/image  (CLIP pass included)"
            )
        print(f"  speed-up (sam time / sam2clip time): {full['sam'] / full['sam2clip']:.2f}x")
        print(
            f"  embedding stage alone: SAM encoder {stage['encoder'] / n * 1e3:.1f} ms/image, "
            f"neck {stage['neck'] / n * 1e3:.1f} ms/image on the CLIP levels "
            f"(ratio {stage['encoder'] / stage['neck']:.2f}x)"
        )
        print(
            f"  agreement: mean best IoU of each SAM2CLIP proposal with the SAM ones {a_fwd:.3f} "
            f"({n_fwd} proposals); of each SAM proposal with the SAM2CLIP ones {a_rev:.3f} "
            f"({n_rev})"
        )
        print(
            f"  baselines, same measure: SAM's decoder on the mean training embedding {a_mean:.3f}; "
            f"on an untrained neck's {r_fwd:.3f} ({n_rand} proposals)"
        )
        print(
            f"  embedding MSE against SAM's on these images: SAM2CLIP {mse:.3f}, mean training "
            f"embedding {mse_mean:.3f}, untrained neck {mse_rand:.3f}"
        )


if __name__ == "__main__":
    main()
