"""SAM image-encoder time (s per image): segment_anything's ImageEncoderViT vs samcp's fast attention.

Builds a randomly initialised real-size SAM (``build_sam_arch``, vit_b by default: 12 blocks, 4 of them
global attention over 64x64 tokens; the zero-initialised position embeddings are randomised so the
relative-position terms matter for the difference check) and encodes a random (1, 3, 1024, 1024) input
with ``encode_image_reference`` and ``encode_image``, alternately, keeping the best of ``--repeats`` runs
of each, so machine noise hits both alike. Prints the ratio and the largest output difference. Peak
memory: each implementation also runs once in a fresh subprocess that reports how much its peak RSS
rises above its RSS before the call (CPU, Linux only; skip with ``--no-rss``).

Usage:
    python tests/benchmarks/bench_sam_encoder.py [--arch vit_b] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

import torch


def build_model(arch: str, device: torch.device) -> torch.nn.Module:
    from samcp.pipeline.foundation import build_sam_arch

    torch.manual_seed(0)
    model = build_sam_arch(arch).eval()
    enc = model.image_encoder
    with torch.no_grad():
        if enc.pos_embed is not None:
            enc.pos_embed.normal_(0.0, 0.02)
        for blk in enc.blocks:
            if blk.attn.use_rel_pos:
                blk.attn.rel_pos_h.normal_(0.0, 0.02)
                blk.attn.rel_pos_w.normal_(0.0, 0.02)
    return model.to(device)


def _input(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    size = model.image_encoder.img_size
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _impls() -> dict:
    from samcp.pipeline.proposals.sam_encoder import encode_image, encode_image_reference

    return {"reference": encode_image_reference, "fast": encode_image}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _peak_rss_child(arch: str, impl: str) -> None:
    """(subprocess) How far the peak RSS rises above the RSS before one encoder call, in MiB, once the
    model and input are built (the peak is reset first through /proc/self/clear_refs, so building the
    model does not count; Linux only)."""
    device = torch.device("cpu")
    model = build_model(arch, device)
    x = _input(model, device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    with torch.inference_mode():
        _impls()[impl](model, x)
    peak = _status_kib("VmHWM")
    print(json.dumps({"grew_mib": (peak - before) / 1024, "peak_mib": peak / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_b")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (best kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        _peak_rss_child(args.arch, args.rss_child)
        return

    from samcp.pipeline.proposals.sam_encoder import _fast_supported

    device = torch.device(args.device)
    model = build_model(args.arch, device)
    assert _fast_supported(model.image_encoder)
    x = _input(model, device)
    impls = _impls()
    best = dict.fromkeys(impls, float("inf"))
    outs = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, fn in impls.items():
                _sync(device)
                t0 = time.perf_counter()
                outs[name] = fn(model, x)
                _sync(device)
                best[name] = min(best[name], time.perf_counter() - t0)
    ref, fast = outs["reference"], outs["fast"]
    diff = (ref - fast).abs().max().item()
    scale = ref.abs().max().item()

    print(
        f"SAM image encoder, {args.arch}, input {tuple(x.shape)}, device {device}, "
        f"threads {torch.get_num_threads()}, best of {args.repeats} (alternating)"
    )
    for name, t in best.items():
        print(f"  {name:<9} {t:8.3f} s/image")
    print(f"  speed-up  {best['reference'] / best['fast']:8.2f}x")
    print(f"  max |diff| {diff:.3g} (max |out| {scale:.3g}, relative {diff / scale:.3g})")

    if device.type == "cpu" and sys.platform == "linux" and not args.no_rss:
        for name in impls:
            cmd = [sys.executable, __file__, "--arch", args.arch, "--rss-child", name]
            if args.threads > 0:
                cmd += ["--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(
                f"  {name:<9} peak RSS +{r['grew_mib']:.0f} MiB during the call "
                f"(process peak {r['peak_mib']:.0f} MiB)"
            )


if __name__ == "__main__":
    main()
