"""Training throughput of every registered head from the same cache, side by side.

One cache (synthetic images, SLIC proposals, SAM embeddings of a random SAM, a random CLIP) feeds
`samcp train` for each head at its default (paper-size) config, plus PosSAM's decoder path. The
contenders run in alternating rounds, each in its own child process (its own peak RSS); the best
round counts. Samples are memoised (the shipped default), so the figure is the head's own
forward/backward cost, the quantity that decides how cheap decoupled training is.

Usage:
    python tests/benchmarks/bench_heads.py [--images 4] [--steps 3] [--repeats 2]
        [--clip-model samcp-synth-convnext] [--clip-size 512] [--sam-model vit_tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

CONTENDERS = {
    "affinity": ("affinity", {}),
    # The head before issue 11's changes (single res5 level, no query attention mask, no denoising
    # queries, no BG self-affinity, no crop augmentation): what those changes cost per step.
    "affinity (before issue 11)": (
        "affinity",
        {
            "multi_level": False,
            "query_attn_mask": False,
            "num_denoising_queries": 0,
            "bg_self_affinity": False,
            "scale_crop_aug": False,
        },
    ),
    "possam (proposals)": ("possam", {}),
    "possam (decoder, 250 queries)": ("possam", {"mask_source": "decoder"}),
}


def child(name: str, tmp: Path, args) -> None:
    import torch

    from samcp.pipeline.train import TrainConfig, run_training

    head, overrides = CONTENDERS[name]
    torch.manual_seed(0)
    cfg = TrainConfig(
        cache=str(tmp / "cache"),
        dataset=str(tmp / "syn"),
        out=str(tmp / f"run_{head}_{os.getpid()}"),
        head=head,
        head_overrides=overrides,
        clip_checkpoint=str(tmp / "clip.pt"),
        steps=args.steps,
        batch_size=2,
        log_every=1,
        ckpt_every=10**6,
        progress=False,
        device="cpu",
    )
    warm = max(1, args.images // 2)  # steps of the first epoch build (and memoise) the samples
    cfg = replace(cfg, steps=warm + args.steps)
    t0 = time.perf_counter()
    run_training(cfg)
    total = time.perf_counter() - t0
    # metrics.jsonl has the cumulative images/s at every step: time the steps after the warm-up.
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    seconds = {r["step"]: r["step"] * 2 / r["images_per_s"] for r in rows}
    rate = args.steps * 2 / (seconds[warm + args.steps] - seconds[warm])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "images_per_s": rate,
                "wall_s": total,
                "peak_rss_mib": peak,
                "params_m": _params(Path(cfg.out) / "model") / 1e6,
            }
        )
    )


def _params(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(v.numel() for v in load_file(str(model_dir / "model.safetensors")).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds; best of N")
    ap.add_argument("--clip-model", default="samcp-synth-convnext")
    ap.add_argument("--clip-size", type=int, default=512)
    ap.add_argument("--sam-model", default="vit_tiny")
    ap.add_argument("--only", default=None, help="comma-separated contender names to run")
    ap.add_argument("--child")
    ap.add_argument("--tmp")
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.tmp), args)
        return

    from samcp.pipeline.clip import ClipConfig, make_random_clip_checkpoint
    from samcp.pipeline.foundation import write_random_sam_checkpoint
    from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
    from samcp.pipeline.proposals import ProposalConfig
    from samcp.pipeline.synth import make_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="samcp-bench-heads-") as t:
        tmp = Path(t)
        make_synthetic_dataset(tmp / "syn", seed=0, num_train=args.images, num_val=0)
        make_random_clip_checkpoint(tmp / "clip.pt", args.clip_model, seed=0)
        sam = write_random_sam_checkpoint(
            tmp / "sam.pth", seed=0, tiny=args.sam_model == "vit_tiny"
        )
        run_precompute(
            PrecomputeConfig(
                source=str(tmp / "syn"),
                out=str(tmp / "cache"),
                split="train2017",
                shard_size=4,
                proposals=ProposalConfig(
                    source="slic", sam_model=args.sam_model, sam_checkpoint=str(sam)
                ),
                store_sam_embeddings=True,
                num_workers=0,
                progress=False,
                clip=ClipConfig(
                    model=args.clip_model,
                    checkpoint=str(tmp / "clip.pt"),
                    input_size=args.clip_size,
                    levels=("res3", "res4", "res5"),  # SAM-CP's default multi-level pooling
                ),
            )
        )
        best: dict[str, dict] = {}
        names = [n.strip() for n in args.only.split(",")] if args.only else list(CONTENDERS)
        for _ in range(args.repeats):
            for name in names:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        name,
                        "--tmp",
                        str(tmp),
                        "--steps",
                        str(args.steps),
                        "--images",
                        str(args.images),
                    ],
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    sys.exit(out.stderr[-3000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if name not in best or r["images_per_s"] > best[name]["images_per_s"]:
                    best[name] = r
        print(
            f"training throughput from one cache, default (paper-size) head configs, batch 2, "
            f"{args.steps} timed steps after one epoch, {args.images} synthetic images, {args.clip_model} at "
            f"{args.clip_size}, sam_embed 256x64x64, CPU ({os.cpu_count()} cores), best of "
            f"{args.repeats} alternating rounds"
        )
        ref = best["affinity"]["images_per_s"]
        for name, r in best.items():
            print(
                f"  {name:<32} {r['images_per_s']:7.2f} images/s  ({r['images_per_s'] / ref:4.2f}x "
                f"affinity)  {r['params_m']:5.1f}M params  peak RSS {r['peak_rss_mib']:6.0f} MiB"
            )


if __name__ == "__main__":
    main()
