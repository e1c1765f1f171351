"""Issue 11's SAM-CP ablation on the demo's caches: one change at a time on top of the head before
the issue ("before"), and each inference-only change on top of the trained "after" head.

Not part of `make bench` (it trains eight heads: about an hour on 2 CPU cores). Run `make demo` first
(it writes the caches and the synthetic CLIP), then::

    .venv/bin/python tests/benchmarks/ablate_affinity.py --demo-out demo_out --out ablation_out

It prints one JSON line per row: PQ all / seen / unseen and mIoU all / seen / unseen of open-vocabulary
prediction (all 11 classes, kappa 0.4) on the demo's val split, training on the seen classes only, and
the training images/s. Finished rows are reused when re-run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

# The demo's affinity head (every row below sets num_denoising_queries itself).
from samcp.pipeline.demo import DEMO_HEAD

BEFORE_HEAD = {
    "multi_level": False,
    "query_attn_mask": False,
    "num_denoising_queries": 0,
    "bg_self_affinity": False,
    "scale_crop_aug": False,
}
AFTER_HEAD = {
    "multi_level": True,
    "query_attn_mask": True,
    "num_denoising_queries": 300,
    "bg_self_affinity": True,
    "scale_crop_aug": True,
}
BEFORE_INFER = {"composition": "regions", "merged_clip": "patch_mean"}
AFTER_INFER = {"composition": "joint", "merged_clip": "dense"}


def rows() -> dict[str, dict]:
    """name -> {"head": overrides, "train": TrainConfig fields, "predict": {suffix: --set}}."""
    out = {
        "before": {
            "head": BEFORE_HEAD,
            "train": {"weight_decay": 0.05},
            "predict": {
                "": BEFORE_INFER,
                "+joint_composition": {**BEFORE_INFER, "composition": "joint"},
                "+dense_clip": {**BEFORE_INFER, "merged_clip": "dense"},
            },
        }
    }
    for key in ("multi_level", "query_attn_mask"):
        out[f"before+{key}"] = {
            "head": {**BEFORE_HEAD, key: AFTER_HEAD[key]},
            "train": {"weight_decay": 0.05},
            "predict": {"": BEFORE_INFER},
        }
    out["after"] = {
        "head": AFTER_HEAD,
        "train": {"weight_decay": 1e-4},
        "predict": {
            "": AFTER_INFER,
            "-joint_composition": {**AFTER_INFER, "composition": "regions"},
            "-dense_clip": {**AFTER_INFER, "merged_clip": "patch_mean"},
        },
    }
    # The rest one at a time (the 300 denoising queries, the most expensive, last).
    for key in ("bg_self_affinity", "scale_crop_aug"):
        out[f"before+{key}"] = {
            "head": {**BEFORE_HEAD, key: AFTER_HEAD[key]},
            "train": {"weight_decay": 0.05},
            "predict": {"": BEFORE_INFER},
        }
    out["before+wd1e-4"] = {
        "head": BEFORE_HEAD,
        "train": {"weight_decay": 1e-4},
        "predict": {"": BEFORE_INFER},
    }
    out["before+num_denoising_queries"] = {
        "head": {**BEFORE_HEAD, "num_denoising_queries": AFTER_HEAD["num_denoising_queries"]},
        "train": {"weight_decay": 0.05},
        "predict": {"": BEFORE_INFER},
    }
    return out


def main() -> None:
    from samcp.pipeline.evaluation import evaluate, resolve_ground_truth
    from samcp.pipeline.evaluation.groups import read_seen_classes
    from samcp.pipeline.predict import predict_run
    from samcp.pipeline.train import TrainConfig, run_training

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-out", type=Path, default=Path("demo_out"))
    ap.add_argument("--out", type=Path, default=Path("ablation_out"))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--only", default=None, help="comma-separated row names")
    args = ap.parse_args()
    demo, data = args.demo_out, args.demo_out / "synth"
    clip = json.loads((demo / "cache_val2017.zarr" / "zarr.json").read_text())
    ckpts = sorted(Path.home().glob(".cache/samcp/synth-clip/*.pt")) + sorted(
        demo.glob("synth-clip/*.pt")
    )
    from samcp.pipeline.files import file_sha256

    sha = clip["attributes"]["clip"]["checkpoint_sha256"]
    ckpt = next((p for p in ckpts if file_sha256(p) == sha), None)
    if ckpt is None:
        raise SystemExit(f"the demo's CLIP checkpoint (sha256 {sha[:12]}) not found; run make demo")
    gt_json, gt_png = resolve_ground_truth(data, "val2017")
    seen = read_seen_classes(data / "classes_seen.txt")
    only = set(args.only.split(",")) if args.only else None
    for name, spec in rows().items():
        if only and name not in only:
            continue
        run = args.out / name
        rate = None
        if not (run / "model" / "model.safetensors").exists():
            if run.exists() and not (run / "train_config.json").is_file():
                raise SystemExit(f"{run} exists and is not a samcp run; choose another --out")
            shutil.rmtree(run, ignore_errors=True)  # an unfinished run of this script
            t = time.time()
            s = run_training(
                TrainConfig(
                    cache=str(demo / "cache_train2017.zarr"),
                    dataset=str(data),
                    out=str(run),
                    head="affinity",
                    classes=str(data / "classes_seen.txt"),
                    clip_checkpoint=str(ckpt),
                    steps=args.steps,
                    batch_size=4,
                    lr=3e-4,
                    lr_drop=(0.85,),
                    log_every=50,
                    ckpt_every=100000,
                    progress=False,
                    head_overrides={**DEMO_HEAD, **spec["head"]},
                    **spec["train"],
                )
            )
            rate = round(s["images_per_s"], 2)
            print(f"# {name}: trained in {time.time() - t:.0f} s", flush=True)
        for suffix, sets in spec["predict"].items():
            pred = run / f"pred{suffix or '_default'}"
            predict_run(
                run,
                demo / "cache_val2017.zarr",
                pred,
                vocabulary=str(data / "classes.txt"),
                clip_checkpoint=str(ckpt),
                kappa=0.4,
                overrides=sets,
                progress=False,
            )
            r = evaluate(gt_json, gt_png, pred, workers=2, seen=seen).to_dict()
            g = r["groups"]
            row = {
                "row": name + suffix,
                "pq": [
                    round(x["panoptic"]["all"]["pq"], 1)
                    for x in (r, g["seen"], g["unseen"])
                ],
                "miou": [round(x["semantic"]["miou"], 1) for x in (r, g["seen"], g["unseen"])],
                "train_img_per_s": rate,
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
