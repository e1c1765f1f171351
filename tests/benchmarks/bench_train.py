"""Training throughput on the cache vs the same loop recomputing CLIP features every step.

Both loops are `samcp train` (`run_training`) on the same synthetic images, proposals, head and
steps; the second one's sampler ignores the cached CLIP arrays and runs the frozen CLIP on the image
for every sample, which is what training without the cache costs. Sample memoisation is off in both,
so both also rebuild targets every step; a third line shows the shipped default (memo on). Each runs
in its own child process (peak RSS is its own). The CLIP is a real-size ConvNeXt-L architecture with
random weights (``--clip-model``), at the default 1024 input.

Usage:
    python tests/benchmarks/bench_train.py [--images 4] [--steps 4] [--repeats 2] [--clip-model convnext_large_d_320]
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
from pathlib import Path


def _recompute_sampler():
    from samcp.pipeline.datasets import load_image_rgb
    from samcp.pipeline.train import CacheSampler

    class RecomputeClipSampler(CacheSampler):
        """Samples whose CLIP maps and mask embeddings are computed from the image, not read."""

        extractor = None

        def sample(self, key):
            sid, i = key
            if self._shard_rows is None or self._shard_rows[0] != sid:
                self._shard_rows = (sid, self.reader.read_shard(sid))
            row = self._shard_rows[1][i]
            image = load_image_rgb(self.dataset.image_path(row.image_id))
            dense, per_mask = self.extractor.extract(image, row.proposals)
            row.image_arrays, row.mask_arrays = dense, per_mask
            return super().sample(key)

    return RecomputeClipSampler


def child(mode: str, tmp: Path, args) -> None:
    import torch

    from samcp.pipeline.clip import ClipConfig, ClipFeatureExtractor
    from samcp.pipeline.train import TrainConfig, run_training

    torch.manual_seed(0)
    sampler_cls = None
    memo = 5000 if mode == "cache+memo" else 0
    if mode == "recompute":
        sampler_cls = _recompute_sampler()
        ccfg = ClipConfig(model=args.clip_model, checkpoint=str(tmp / "clip.pt"))
        sampler_cls.extractor = ClipFeatureExtractor(ccfg, "cpu")
    cfg = TrainConfig(
        cache=str(tmp / "cache"),
        dataset=str(tmp / "syn"),
        out=str(tmp / f"run_{mode}_{os.getpid()}"),
        clip_checkpoint=str(tmp / "clip.pt"),
        steps=args.steps,
        batch_size=2,
        log_every=1,
        ckpt_every=10**6,
        memo_images=memo,
        progress=False,
        # One CLIP level (the cache is res5 only) and no denoising queries: this measures what the
        # cache saves, not the head's options (bench_heads.py measures those).
        head_overrides={
            "num_encoder_layers": 2,
            "num_decoder_layers": 3,
            "multi_level": False,
            "num_denoising_queries": 0,
        },
    )
    t0 = time.perf_counter()
    run_training(cfg, sampler_cls=sampler_cls)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "images_per_s": args.steps * 2 / dt, "peak_rss_mib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--clip-model", default="convnext_large_d_320")
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds; best of N")
    ap.add_argument("--child")
    ap.add_argument("--tmp")
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.tmp), args)
        return
    import open_clip
    import torch

    from samcp.pipeline.clip import ClipConfig, register_test_models
    from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
    from samcp.pipeline.proposals import ProposalConfig
    from samcp.pipeline.synth import make_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="samcp-bench-train-") as t:
        tmp = Path(t)
        make_synthetic_dataset(tmp / "syn", seed=0, num_train=args.images, num_val=0)
        register_test_models()
        torch.manual_seed(0)
        model = open_clip.create_model(args.clip_model)  # random weights, nothing downloaded
        torch.save(model.state_dict(), tmp / "clip.pt")
        del model
        t0 = time.perf_counter()
        run_precompute(
            PrecomputeConfig(
                source=str(tmp / "syn"),
                out=str(tmp / "cache"),
                split="train2017",
                shard_size=4,
                proposals=ProposalConfig(source="slic"),
                num_workers=0,
                progress=False,
                clip=ClipConfig(model=args.clip_model, checkpoint=str(tmp / "clip.pt")),
            )
        )
        pre_s = time.perf_counter() - t0
        res = {}
        for mode in ("cache", "recompute", "cache+memo"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--tmp",
                    str(tmp),
                    "--steps",
                    str(args.steps),
                    "--clip-model",
                    args.clip_model,
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"training throughput, affinity head, {args.clip_model} (random weights) at 1024, "
            f"{args.images} synthetic images 320x240, batch 2, {args.steps} steps, CPU"
        )
        print(f"  precompute (SLIC + CLIP, once): {args.images / pre_s:.2f} images/s")
        for mode, label in (
            ("recompute", "recompute CLIP every step"),
            ("cache", "from the cache"),
            ("cache+memo", "from the cache, samples memoised (default)"),
        ):
            r = res[mode]
            print(
                f"  {label:<44} {r['images_per_s']:7.2f} images/s  peak RSS {r['peak_rss_mib']:6.0f} MiB"
            )
        print(
            f"  speed-up of the cache: {res['cache']['images_per_s'] / res['recompute']['images_per_s']:.1f}x"
            f" (memoised: {res['cache+memo']['images_per_s'] / res['recompute']['images_per_s']:.1f}x)"
        )


if __name__ == "__main__":
    main()
