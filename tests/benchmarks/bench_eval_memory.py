"""Eval memory does not grow with the number of images: peak RSS of `samcp eval --dataset` on a
semantic benchmark (Pascal Context 459: 16-bit TIFF labels, 459 classes) and of a COCO panoptic
evaluation (PQ + mIoU), at two set sizes, side by side.

Each evaluation runs in a fresh process (peak RSS is per process), with one worker so the number is
the whole computation's. Label maps are random blocks over a few hundred classes; panoptic sets
come from ``samcp synth``'s generator. Prints one line per (kind, images) and the growth factor.

Usage:
    python tests/benchmarks/bench_eval_memory.py [--sizes 100,2000] [--height 120] [--width 160]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys
from pathlib import Path
from samcp.pipeline.benchmarks import open_benchmark
from samcp.pipeline.evaluation import evaluate, evaluate_benchmark, resolve_ground_truth
kind, root, pred = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if kind == "semantic":
    report = evaluate_benchmark(open_benchmark("pascal_context_459", root, "val"), pred, workers=1)
else:
    gj, gp = resolve_ground_truth(root, "val2017")
    report = evaluate(gj, gp, pred, workers=1)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
print(json.dumps({"images": report.num_images, "miou": report.semantic.miou, "peak_mib": peak}))
"""


def _semantic_set(root: Path, n: int, h: int, w: int, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    img = root / "pascal_ctx_d2" / "images" / "validation"
    lab = root / "pascal_ctx_d2" / "annotations_ctx459" / "validation"
    pred = root / "pred" / "semantic"
    for d in (img, lab, pred):
        d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    blank = Image.fromarray(np.zeros((h, w, 3), np.uint8))
    for i in range(n):
        stem = f"2008_{i:06d}"
        blocks = rng.integers(0, 459, size=(h // 8 + 1, w // 8 + 1)).astype(np.uint16)
        gt = np.kron(blocks, np.ones((8, 8), np.uint16))[:h, :w]
        gt[rng.random((h, w)) < 0.05] = 65535
        p = gt.copy()
        noise = rng.random((h, w)) < 0.2
        p[noise] = rng.integers(0, 459, size=int(noise.sum()))
        blank.save(img / f"{stem}.jpg")
        Image.fromarray(gt).save(lab / f"{stem}.tif")
        Image.fromarray(p).save(pred / f"{stem}.png")
    return root / "pred"


def _panoptic_set(root: Path, n: int, h: int, w: int, seed: int) -> Path:
    from samcp.pipeline.evaluation import resolve_ground_truth
    from samcp.pipeline.evaluation.perturb import write_perturbed_predictions
    from samcp.pipeline.synth import make_synthetic_dataset

    ds = make_synthetic_dataset(root / "ds", seed=seed, num_train=0, num_val=n, height=h, width=w)
    gj, gp = resolve_ground_truth(ds, "val2017")
    pred = write_perturbed_predictions(gj, gp, root / "pred", seed=1, p_drop=0.1, p_relabel=0.1,
                                       p_shift=0.3)
    # PQ + mIoU only: AP keeps COCOeval's per-image matches by design
    (pred / "instances.json").unlink(missing_ok=True)
    return pred


def main() -> None:
    """Run the benchmark and print one line per setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,2000")
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--kinds", default="semantic,panoptic")
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    for kind in args.kinds.split(","):
        peaks = []
        for n in sizes:
            with tempfile.TemporaryDirectory(prefix="samcp-bench-evalmem-") as tmp:
                root = Path(tmp)
                make = _semantic_set if kind == "semantic" else _panoptic_set
                pred = make(root, n, args.height, args.width, seed=0)
                gt_root = root if kind == "semantic" else root / "ds"
                out = subprocess.run(
                    [sys.executable, "-c", _CHILD, kind, str(gt_root), str(pred)],
                    check=True, capture_output=True, text=True,
                )
                res = json.loads(out.stdout.strip().splitlines()[-1])
                peaks.append(res["peak_mib"])
                print(
                    f"{kind:9s} {n:6d} images  peak RSS {res['peak_mib']:8.1f} MiB  "
                    f"mIoU {res['miou']:.2f}",
                    flush=True,
                )
        print(f"{kind:9s} growth {sizes[0]} -> {sizes[-1]} images: x{peaks[-1] / peaks[0]:.2f}")


if __name__ == "__main__":
    main()
