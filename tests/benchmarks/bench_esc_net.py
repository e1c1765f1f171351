"""Predict memory and time per image of ESC-Net against the cost-aggregation head, by vocabulary
size (11, 150, 847 class names), and ESC-Net's class chunking at the largest vocabulary.

Each (head, K) runs in its own child process: the head is built at the synthetic set's geometry
(the ``tiny`` backbone with decoder guidance, a 512-pixel CLIP frame: a 16 x 16 correlation grid,
ESC-Net with SAM's real 256-wide decoder blocks, vit_tiny), K random unit text embeddings stand
for K synthetic class names (only K matters for time and memory), and one image goes through
``module(**batch)`` and ``head.infer`` (the semantic map). Peak memory is the child's peak RSS
during prediction minus its RSS before; time is the best of ``--repeats`` after a warm-up. The
printed ratios are ESC-Net over costagg.

Usage:
    OMP_NUM_THREADS=1 python tests/benchmarks/bench_esc_net.py [--classes 11,150,847]
        [--repeats 2] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

CONTENDERS = {
    "costagg": ("costagg", {"num_layers": 2}),
    "esc_net": ("esc_net", {}),
    "esc_net (class_chunk 0)": ("esc_net", {"class_chunk": 0}),
}
#: the synthetic CLIP's levels (samcp-synth-convnext): channels and strides
LEVELS = {"clip_res5": (64, 32), "clip_res4": (48, 16), "clip_res3": (32, 8)}
TEXT_DIM = 64


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(name: str, k: int, args) -> dict:
    import torch

    from samcp.models.heads import CompositionParams, ImageInputs, InferContext
    from samcp.models.registry import build_head, get_head

    head_name, overrides = CONTENDERS[name]
    head = get_head(head_name)
    size = args.size
    cfg = dict(
        clip_channels=LEVELS["clip_res5"][0],
        clip_input_size=size,
        text_dim=TEXT_DIM,
        guidance_levels=["clip_res4", "clip_res3"],
        guidance_channels=[LEVELS["clip_res4"][0], LEVELS["clip_res3"][0]],
        clip_head_source="learned",
    )
    if head_name == "esc_net":
        cfg.update(
            sam_arch="vit_tiny",
            sam_blocks="random",
            sam_dim=256,
            sam_mlp_dim=2048,
            sam_heads=8,
            sam_image_size=1024,
            num_prompts=5,
            kmeans_iters=10,
            class_chunk=64,
        )
    cfg.update(overrides)
    config = head.config_cls.tiny(**cfg)
    torch.manual_seed(0)
    model = build_head(head_name, config).eval()
    rng = np.random.default_rng(0)
    arrays = {
        n: rng.standard_normal((c, size // s, size // s)).astype(np.float16)
        for n, (c, s) in LEVELS.items()
    }
    inputs = ImageInputs("0", 120, 160, arrays, [], np.zeros((0, 4), np.float32), [])
    text = torch.nn.functional.normalize(torch.randn(k, TEXT_DIM), dim=-1)
    sample = head.sample(inputs, config, 0)
    ctx = InferContext(
        text, np.ones(k, bool), np.ones(k, bool), CompositionParams(), torch.device("cpu")
    )

    def predict():
        with torch.no_grad():
            batch = head.collate([sample], text, config, "cpu")
            return head.infer(model(**batch), [sample], config, ctx)

    before = _rss_mib()
    predict()  # warm-up; also the peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        predict()
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "peak_mib": peak - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", default="11,150,847")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", type=int, default=512, help="CLIP frame (512: a 16 x 16 grid)")
    ap.add_argument("--child", nargs=2, metavar=("NAME", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args)))
        return
    ks = [int(k) for k in args.classes.split(",")]
    rows = {}
    for k in ks:
        for name in CONTENDERS:
            if name.endswith("(class_chunk 0)") and k != max(ks):
                continue
            cmd = [sys.executable, __file__, "--child", name, str(k), "--repeats",
                   str(args.repeats), "--size", str(args.size)]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[(name, k)] = json.loads(out.strip().splitlines()[-1])
            r = rows[(name, k)]
            print(
                f"  {name:24s} K={k:4d}: {r['seconds']:.3f} s, {r['peak_mib']:.0f} MiB", flush=True
            )
    print()
    print("| classes | costagg s/img | esc_net s/img | time ratio | costagg peak MiB | "
          "esc_net peak MiB | memory ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for k in ks:
        a, b = rows[("costagg", k)], rows[("esc_net", k)]
        print(
            f"| {k} | {a['seconds']:.3f} | {b['seconds']:.3f} | {b['seconds'] / a['seconds']:.1f} "
            f"| {a['peak_mib']:.0f} | {b['peak_mib']:.0f} | "
            f"{b['peak_mib'] / max(a['peak_mib'], 1):.1f} |"
        )
    if len(ks) >= 2:
        lo, hi = ks[-2], ks[-1]
        for name in ("costagg", "esc_net"):
            slope = (rows[(name, hi)]["peak_mib"] - rows[(name, lo)]["peak_mib"]) / (hi - lo)
            print(f"{name}: peak memory per class ({lo} -> {hi} classes): {slope * 1024:.0f} KiB")
    unchunked = rows.get(("esc_net (class_chunk 0)", max(ks)))
    if unchunked:
        chunked = rows[("esc_net", max(ks))]
        print(
            f"esc_net at {max(ks)} classes: class_chunk 0 {unchunked['peak_mib']:.0f} MiB, "
            f"{unchunked['seconds']:.3f} s; class_chunk 64 {chunked['peak_mib']:.0f} MiB, "
            f"{chunked['seconds']:.3f} s (memory ratio "
            f"{unchunked['peak_mib'] / max(chunked['peak_mib'], 1):.1f})"
        )


if __name__ == "__main__":
    main()
