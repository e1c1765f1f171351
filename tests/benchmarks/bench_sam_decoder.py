"""SAM mask-decoder throughput (ms per prompt): segment_anything's decoder vs samcp's fast path.

Builds a randomly initialised SAM whose prompt encoder and mask decoder have vit_b/l/h's real sizes
(256-dim tokens, 8 heads, MLP 2048, 64x64 image embedding, 1024-pixel input; the image encoder is a tiny
stand-in, it is not run) and decodes a grid of single-point prompts on random features, in batches, with
``decode_points_reference`` and ``decode_points``. The two are timed alternately batch by batch in one
process, so machine noise hits both alike. Also prints the largest differences between their outputs.

Usage:
    python tests/benchmarks/bench_sam_decoder.py [--prompts 256] [--batch 64] [--repeats 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial

import torch


def build_decoder_sam(
    image_size: int = 1024,
    prompt_embed_dim: int = 256,
    num_heads: int = 8,
    mlp_dim: int = 2048,
    depth: int = 2,
) -> torch.nn.Module:
    """A random SAM with the given decoder sizes and a tiny (unused) image encoder."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    emb = image_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=1,
            embed_dim=32,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=[0],
            window_size=14,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(emb, emb),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=depth,
                embedding_dim=prompt_embed_dim,
                mlp_dim=mlp_dim,
                num_heads=num_heads,
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    with torch.no_grad():  # spread the logits like make_random_sam_checkpoint does
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30.0)
    return sam.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    """Run the benchmark and print one line per implementation plus the speed-up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="passes over all prompts (summed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch default)"
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from samcp.models.sam_decoder import (
        _fast_supported,
        decode_points,
        decode_points_reference,
    )

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_decoder_sam().to(device)
    assert _fast_supported(model)
    features = torch.randn(1, 256, 64, 64, device=device)
    side = max(1, math.ceil(args.prompts**0.5))
    g = (torch.arange(side, dtype=torch.float64) + 0.5) / side * 1024
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), dim=-1).reshape(-1, 2)
    coords = grid[: args.prompts].to(device)
    impls = {"reference": decode_points_reference, "fast": decode_points}
    totals = dict.fromkeys(impls, 0.0)
    max_logit = max_iou = scale = 0.0
    with torch.inference_mode():
        for fn in impls.values():  # warm-up (allocator, kernels)
            fn(model, features, coords[: min(args.batch, 8)])
        _sync(device)
        for _ in range(args.repeats):
            for s in range(0, len(coords), args.batch):
                c = coords[s : s + args.batch]
                outs = {}
                for name, fn in impls.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    outs[name] = fn(model, features, c)
                    _sync(device)
                    totals[name] += time.perf_counter() - t0
                (rl, ri), (fl, fi) = outs["reference"], outs["fast"]
                max_logit = max(max_logit, (rl - fl).abs().max().item())
                max_iou = max(max_iou, (ri - fi).abs().max().item())
                scale = max(scale, rl.abs().max().item())
                del outs, rl, ri, fl, fi

    n = len(coords) * args.repeats
    print(
        f"SAM decoder, vit_b/l/h decoder sizes, 64x64 embedding, {len(coords)} prompts, batch "
        f"{args.batch}, device {device}, threads {torch.get_num_threads()}"
    )
    for name, t in totals.items():
        print(f"  {name:<9} {1000 * t / n:9.2f} ms/prompt  ({t:.2f} s total)")
    print(f"  speed-up  {totals['reference'] / totals['fast']:9.2f}x")
    print(
        f"  max |logit diff| {max_logit:.3g} (max |logit| {scale:.3g}), max |iou diff| {max_iou:.3g}"
    )


if __name__ == "__main__":
    main()
