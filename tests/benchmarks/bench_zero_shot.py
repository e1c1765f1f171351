"""Zero-shot mask classification from the cache alone: samcp's synthetic CLIP vs a random CLIP.

On the demo's dataset (``make_synthetic_dataset(root, seed=0)``: 40 train, 20 val images of
320 x 240), side by side in one run:

1. train the synthetic CLIP (``train_synth_clip`` at its defaults: ``samcp-synth-convnext``,
   1024-pixel cache geometry) on train2017, timed (wall and process CPU seconds; the machine is
   shared, so CPU seconds are the steadier figure);
2. write a random checkpoint of the same config (``make_random_clip_checkpoint``);
3. precompute val2017 twice with SLIC proposals (``--proposals slic`` defaults), once per CLIP
   (``run_precompute`` in-process, ``num_workers=0``);
4. for every ground-truth segment of val, take the cached ``clip_mask_embed`` of its best-IoU
   proposal (oracle assignment) and classify it against the 11 classes embedded by the same CLIP's
   text tower (ViLD's 14 templates averaged per name; one embedding per class, the normalised
   mean of its names: samcp.models.openvocab's rule, as the heads use it):
   top-1 accuracy with all names, with the first names only and with the synonyms only, and per
   class. Chance is 1/11 = 9%.

Usage:
    python tests/benchmarks/bench_zero_shot.py [--steps N] [--input-size 1024] [--seed 0]
        [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

# Belt and braces: nothing here may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _precompute(data: Path, cache: Path, checkpoint: Path, model: str, input_size: int) -> float:
    from samcp.pipeline.clip import ClipConfig
    from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
    from samcp.pipeline.proposals import ProposalConfig

    t = time.perf_counter()
    run_precompute(
        PrecomputeConfig(
            source=str(data),
            out=str(cache),
            split="val2017",
            shard_size=8,
            proposals=ProposalConfig(source="slic"),
            num_workers=0,
            progress=False,
            clip=ClipConfig(model=model, checkpoint=str(checkpoint), input_size=input_size),
        )
    )
    return time.perf_counter() - t


def run(work: Path, steps: int | None, input_size: int, seed: int) -> None:
    import shutil

    from samcp.pipeline.clip import make_random_clip_checkpoint
    from samcp.pipeline.synth import make_synthetic_dataset
    from samcp.pipeline.synthclip import (
        DEFAULT_BATCH_SIZE,
        DEFAULT_STEPS,
        SYNTH_CLIP_MODEL,
        train_synth_clip,
        zero_shot_mask_accuracy,
    )

    data = work / "synth"
    if not (data / "annotations").exists():
        make_synthetic_dataset(data, seed=0)
    steps = DEFAULT_STEPS if steps is None else steps
    trained = work / "clip_synth.pt"
    wall, cpu = time.perf_counter(), time.process_time()
    summary = train_synth_clip(
        data, trained, steps=steps, seed=seed, input_size=input_size, progress=False
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    random = make_random_clip_checkpoint(work / "clip_random.pt", SYNTH_CLIP_MODEL, seed=seed)

    results, precompute_s = {}, {}
    for name, ckpt in (("synthetic", trained), ("random", random)):
        cache = work / f"cache_val2017_{name}.zarr"
        shutil.rmtree(cache, ignore_errors=True)  # always made with this run's checkpoint
        precompute_s[name] = _precompute(data, cache, ckpt, SYNTH_CLIP_MODEL, input_size)
        results[name] = zero_shot_mask_accuracy(data, cache, ckpt)

    syn, rnd = results["synthetic"], results["random"]
    print(
        f"synthetic CLIP training ({SYNTH_CLIP_MODEL}, {steps} steps x {DEFAULT_BATCH_SIZE} "
        f"images at {input_size} px; {summary.images} images, {summary.gt_regions} segments + "
        f"{summary.superpixel_regions} superpixels): {wall:.1f} s wall, {cpu:.1f} s CPU "
        f"(regions {summary.prepare_s:.1f} s, steps {summary.train_s:.1f} s wall); "
        f"torch threads {_threads()}, load average {os.getloadavg()[0]:.2f} at the end"
    )
    print(
        f"val2017 precompute with SLIC: {precompute_s['synthetic']:.1f} s / "
        f"{precompute_s['random']:.1f} s; {syn.segments} ground-truth segments, best proposal "
        f"mean IoU {syn.mean_best_iou:.3f}; chance 1/11 = 9.1%"
    )
    print("")
    print("| zero-shot top-1 from the cache | synthetic CLIP | random CLIP |")
    print("|---|---|---|")
    for label, key in (
        ("all names (template-averaged, mean of names)", "accuracy"),
        ("first names only", "primary_name_accuracy"),
        ("synonyms only", "synonym_accuracy"),
    ):
        print(f"| {label} | {100 * getattr(syn, key):.1f}% | {100 * getattr(rnd, key):.1f}% |")
    for cls, acc in syn.per_class.items():
        print(f"| {cls} | {100 * acc:.1f}% | {100 * rnd.per_class.get(cls, 0.0):.1f}% |")
    print(f"| training time | {wall:.1f} s wall, {cpu:.1f} s CPU | none |")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="Training steps (default: the library's)."
    )
    parser.add_argument("--input-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="Work folder to keep (reused).")
    args = parser.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        run(args.keep, args.steps, args.input_size, args.seed)
        return
    with tempfile.TemporaryDirectory(prefix="samcp-bench-zero-shot-") as tmp:
        run(Path(tmp), args.steps, args.input_size, args.seed)


if __name__ == "__main__":
    main()
