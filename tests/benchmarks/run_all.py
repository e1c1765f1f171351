"""`make bench`: every benchmark, one after another; each prints its own side-by-side ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHES = [
    "bench_sam_decoder.py",
    "bench_sam_encoder.py",
    "bench_precompute.py",
    "bench_clip.py",
    "bench_eval.py",
    "bench_train.py",
    "bench_heads.py",
    "bench_zero_shot.py",
]

if __name__ == "__main__":
    failed = []
    for name in BENCHES:
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)]).returncode != 0:
            failed.append(name)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")
