"""CLIP feature extraction vs SAM proposal generation, seconds per image, side by side; cache bytes.

Both models are real-size and randomly initialised (no weights are downloaded): open_clip's
``convnext_large_d_320`` (the ConvNeXt-L CLIP of FC-CLIP / SAM-CP / PosSAM) built with
``open_clip.create_model`` and no ``pretrained``, and a vit_b SAM from
``samcp.pipeline.foundation.make_random_sam_checkpoint``. On one synthetic 640x480 image:

* SAM: ``SamEverythingGenerator`` with ``SamEverythingParams(points_per_side=16)``, twice: with the
  default filters (a random SAM's scores pass none, so nothing is upsampled: a lower bound) and with
  the predicted-IoU and stability filters off (every mask is upsampled and scored: an upper bound; a
  real SAM sits in between);
* CLIP: ``ClipFeatureExtractor.extract`` at the default geometry (1024 input, ``res5`` stored) with
  ``--proposals`` masks (SAM's own, topped up with the image's ground-truth segments and random
  boxes). The trunk pass (``dense_features``) and the pooling (``mask_embeddings``) are also timed
  on their own.

All of them alternate ``--repeats`` times and the best of each is reported, as wall seconds and as
process CPU seconds (all threads; steadier than wall time on a shared machine). Then the cache's storage per
image at default settings, computed from array shapes (uncompressed; zstd shrinks float16 features
little).

Usage:
    python tests/benchmarks/bench_clip.py [--proposals 100] [--repeats 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

# Belt and braces: nothing here may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONVNEXT_L = {"res2": 192, "res3": 384, "res4": 768, "res5": 1536}  # convnext_large stage channels
CONVNEXT_L_EMBED = 768


def _proposals(image_gt, sam_props, n: int, seed: int = 0):
    """Exactly n proposals: SAM's first, then ground-truth segments, then random boxes."""
    from samcp.pipeline.proposals.base import Proposals, encode_masks

    h, w = image_gt.segment_index.shape
    rles = list(sam_props.rles[:n])
    segs = [image_gt.segment_index == i + 1 for i in range(len(image_gt.categories))]
    rng = np.random.default_rng(seed)
    while len(rles) + len(segs) < n:
        m = np.zeros((h, w), bool)
        bh, bw = int(rng.integers(8, h // 2)), int(rng.integers(8, w // 2))
        y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        m[y : y + bh, x : x + bw] = True
        segs.append(m)
    need = n - len(rles)
    if need > 0:
        rles += encode_masks(np.stack(segs[:need]))
    return Proposals.from_rles(h, w, rles)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:8.3f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proposals", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--input-size", type=int, default=1024)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import open_clip
    import torch

    from samcp.pipeline.clip import ClipConfig, ClipFeatureExtractor
    from samcp.pipeline.foundation import load_sam, make_random_sam_checkpoint
    from samcp.pipeline.proposals.sam import SamEverythingGenerator, SamEverythingParams
    from samcp.pipeline.synth import generate_image

    sample = generate_image(np.random.default_rng(0), args.height, args.width)
    image = sample.image
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, image {args.width}x{args.height}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_random_sam_checkpoint(Path(tmp) / "sam_vit_b.pth", "vit_b")
        sam = load_sam("vit_b", ckpt, args.device)
    gen = SamEverythingGenerator(sam, SamEverythingParams(points_per_side=16))
    unfiltered = SamEverythingParams(
        points_per_side=16, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    gen_all = SamEverythingGenerator(sam, unfiltered)

    clip_model = open_clip.create_model("convnext_large_d_320")  # random init: no pretrained tag
    cfg = ClipConfig(input_size=args.input_size)  # defaults: convnext_large_d_320, res5, dense on
    clip = ClipFeatureExtractor(cfg, args.device, model=clip_model)

    props = gen_all.generate(image)
    clip_props = _proposals(sample, props, args.proposals)
    dense_map, _ = clip.dense_features(image)

    runs = {
        "SAM proposals, default filters": lambda: gen.generate(image),
        "SAM proposals, filters off": lambda: gen_all.generate(image),
        "CLIP extract (trunk + pooling)": lambda: clip.extract(image, clip_props),
        "  trunk pass alone": lambda: clip.dense_features(image),
        "  mask pooling + head alone": lambda: clip.mask_embeddings(dense_map, clip_props),
    }
    best = {name: (float("inf"), float("inf")) for name in runs}
    for _ in range(args.repeats):  # alternate, so machine noise hits all alike
        for name, fn in runs.items():
            wall, cpu = _timed(fn)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    dense, per_mask = clip.extract(image, clip_props)

    print(f"\nSAM vit_b everything mode (16x16 points): {len(props)} masks kept with filters off")
    print(
        f"CLIP {cfg.model} at {cfg.input_size}x{cfg.input_size}: {len(clip_props)} masks "
        f"({min(len(props), args.proposals)} from SAM)"
    )
    print(f"  {'stage':34s} {'wall s':>8s} {'cpu s':>8s}")
    for name, (wall, cpu) in best.items():
        print(f"  {name:34s} {wall:8.3f} {cpu:8.3f}")
    clip_w, clip_c = best["CLIP extract (trunk + pooling)"]
    for name in ("SAM proposals, default filters", "SAM proposals, filters off"):
        w, c = best[name]
        print(f"  CLIP / ({name}): wall {clip_w / w:.2f}, cpu {clip_c / c:.2f}")
    shapes = {k: v.shape for k, v in {**dense, **per_mask}.items()}
    print(f"  arrays returned: {shapes}")

    # Storage per image at default settings, ConvNeXt-L geometry, from shapes (uncompressed).
    s = args.input_size
    m = args.proposals
    rle_bytes = float(np.mean([len(r) for r in clip_props.rles])) if len(clip_props) else 0.0
    rows = [
        (
            f"clip_res5 (1536x{s // 32}x{s // 32} f16)  [default]",
            CONVNEXT_L["res5"] * (s // 32) ** 2 * 2,
        ),
        (
            f"clip_res4 (768x{s // 16}x{s // 16} f16)  [opt-in]",
            CONVNEXT_L["res4"] * (s // 16) ** 2 * 2,
        ),
        (
            f"clip_res3 (384x{s // 8}x{s // 8} f16)  [opt-in]",
            CONVNEXT_L["res3"] * (s // 8) ** 2 * 2,
        ),
        (
            f"clip_res2 (192x{s // 4}x{s // 4} f16)  [opt-in]",
            CONVNEXT_L["res2"] * (s // 4) ** 2 * 2,
        ),
        ("sam_embed (256x64x64 f16)  [opt-in]", 256 * 64 * 64 * 2),
        (f"clip_mask_embed ({m}x{CONVNEXT_L_EMBED} f16)", m * CONVNEXT_L_EMBED * 2),
        (f"rle ({m} masks x {rle_bytes:.0f} B mean here)", m * rle_bytes),
        (f"bbox/area/iou/stability/point ({m} x 40 B)", m * (16 + 8 + 4 + 4 + 8)),
        ("image_id/height/width/status/offset", 8 + 4 + 4 + 1 + 8 + 16),
    ]
    print(f"\nStorage per image, {m} masks, {s}-pixel CLIP input (uncompressed):")
    for name, nbytes in rows:
        print(f"  {name:48s} {_mib(nbytes)}")
    default = sum(b for name, b in rows if "[opt-in]" not in name)
    print(f"  {'total at defaults (res5 + per-mask arrays)':48s} {_mib(default)}")
    print(
        f"  per mask: clip_mask_embed {CONVNEXT_L_EMBED * 2} B, rle ~{rle_bytes:.0f} B, other 40 B"
    )


if __name__ == "__main__":
    main()
