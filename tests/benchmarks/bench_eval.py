"""Evaluation throughput (images/s), single process and with all cores, side by side.

Generates a synthetic COCO panoptic set with ``samcp synth``'s generator, writes perturbed
predictions (panoptic PNG+JSON and instances.json), then times the full ``samcp eval`` computation
(PQ, mIoU and AP) with 1 worker and with every core. Results must be identical; the script fails
otherwise.

Usage:
    python tests/benchmarks/bench_eval.py [--num-images 500] [--height 120] [--width 160]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    """Run the benchmark and print one line per setting plus the speed-up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes for the parallel run (default: all cores)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="best of N timings")
    args = parser.parse_args()

    from samcp.pipeline.evaluation import evaluate, resolve_ground_truth
    from samcp.pipeline.evaluation.perturb import write_perturbed_predictions
    from samcp.pipeline.synth import make_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="samcp-bench-eval-") as tmp:
        root = make_synthetic_dataset(
            Path(tmp) / "ds",
            seed=0,
            num_train=0,
            num_val=args.num_images,
            height=args.height,
            width=args.width,
        )
        gt_json, gt_png = resolve_ground_truth(root, "val2017")
        pred = write_perturbed_predictions(
            gt_json, gt_png, Path(tmp) / "pred", seed=1, p_drop=0.1, p_relabel=0.1, p_shift=0.3
        )

        def timed(workers: int) -> tuple[float, dict]:
            best = float("inf")
            result: dict = {}
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                report = evaluate(gt_json, gt_png, pred, workers=workers)
                best = min(best, time.perf_counter() - t0)
                result = report.to_dict(per_class=True)
            return best, result

        t1, r1 = timed(1)
        tn, rn = timed(args.workers)
        if r1 != rn:
            raise SystemExit(f"results differ between 1 and {args.workers} workers")

    n = args.num_images
    print(
        f"bench_eval: {n} synthetic images {args.width}x{args.height}, PQ + mIoU + AP, "
        f"PQ {r1['panoptic']['all']['pq']:.2f}"
    )
    print(f"{'setting':>18s} {'seconds':>8s} {'images/s':>9s}")
    print(f"{'1 process':>18s} {t1:8.2f} {n / t1:9.1f}")
    print(f"{f'{args.workers} processes':>18s} {tn:8.2f} {n / tn:9.1f}")
    print(f"speed-up {t1 / tn:.2f}x with {args.workers} processes (results identical)")


if __name__ == "__main__":
    main()
