"""SAM-MI's prompting cost: SAM decoding for sparse points vs the full point grid, side by side.

The paper (SAM-MI, sec. 4.4) prompts SAM with the points its TSPP draws (41 on average on ADE-150)
instead of a dense grid and reports 950 ms vs 5458 ms per image (about 5.7x) end to end. Here the
image encoder's output is cached, so what remains is the prompt encoder + mask decoder: this times
samcp's frozen SAM decoder (models/sam_mi/sam.py, the real decoder size of vit_h/l/b) on one cached
``sam_embed`` for the sparse counts and for the 32 x 32 grid SAM-MI's TSPP draws from, best of
``--repeats`` alternating rounds, and prints ms per image and the ratio.

Usage:
    python tests/benchmarks/bench_sam_mi_latency.py [--sparse 8,41] [--grid 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch

    from samcp.models.sam_mi.config import SamMiConfig
    from samcp.models.sam_mi.sam import build_sam
    from samcp.pipeline.foundation import load_sam, write_random_sam_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparse", default="8,41", help="sparse point counts (comma-separated)")
    ap.add_argument("--grid", type=int, default=32, help="the dense grid is grid x grid points")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="samcp-bench-smi-") as t:
        ckpt = write_random_sam_checkpoint(Path(t) / "sam.pth", seed=0, tiny=True)
        cfg = SamMiConfig(sam_arch="vit_tiny", sam_checkpoint=str(ckpt))
        sam = build_sam(cfg, load=True)
        # One image's embedding from the same SAM's encoder, as precompute caches it.
        model = load_sam("vit_tiny", str(ckpt), "cpu")
        image = torch.rand(1, 3, 1024, 1024) * 255
        with torch.no_grad():
            embed = model.image_encoder(model.preprocess(image))
    g = args.grid
    centres = (torch.arange(g, dtype=torch.float32) + 0.5) * (1024 / g)
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    grid = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    counts = [int(x) for x in args.sparse.split(",")] + [g * g]
    pick = torch.randperm(g * g)
    best = {n: float("inf") for n in counts}
    content = (4.0 * 64, 4.0 * 64)
    for _ in range(args.repeats):
        for n in counts:
            coords = grid[pick[:n]] if n < g * g else grid
            t0 = time.perf_counter()
            sam.masks(embed, coords, content, 0.0)
            best[n] = min(best[n], time.perf_counter() - t0)
    print(
        f"SAM prompt encoder + mask decoder (real decoder size) on one cached 256x64x64 embedding, "
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), best of "
        f"{args.repeats} alternating rounds"
    )
    dense = best[g * g]
    for n in counts:
        print(
            f"  {n:5d} points  {1000 * best[n]:8.1f} ms/image  {1000 * best[n] / n:6.2f} ms/point"
            f"  dense/this {dense / best[n]:6.1f}x"
        )


if __name__ == "__main__":
    main()
