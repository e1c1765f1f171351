"""`make demo`: the whole mission end to end on embedded defaults.

synth -> precompute (local Ray; SLIC proposals, or SAM when SAM_CHECKPOINT is set; CLIP features from a
tiny random open_clip ConvNeXt, or the real one when CLIP_CHECKPOINT is set) -> train the SAM-CP
affinity head on the cache -> predict -> PQ/SQ/RQ, mIoU and AP of the untrained head, the trained head
and the proposal oracle -> a few pictures of the predictions.

Re-running resumes: the dataset, caches and a finished run are reused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from samcp.pipeline.outputs import prepare_output_dir, write_marker
from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
from samcp.pipeline.proposals import ProposalConfig
from samcp.pipeline.proposals.sam_params import SamEverythingParams

# A head between the test-size preset and the paper's size: trains in minutes on two CPU cores.
DEMO_HEAD = {
    "embed_dim": 128,
    "roi_size": 7,
    "roi_mlp_hidden": 256,
    "num_encoder_layers": 2,
    "num_heads": 4,
    "ffn_dim": 256,
    "num_decoder_layers": 3,
}
DEMO_STEPS = 600


def run_demo(out: Path, echo: Callable[[str], None] = print, num_workers: int = 2) -> dict:
    """Runs the demo into ``out`` and returns its figures (also written to out/figures.json)."""
    from samcp.pipeline.synth import make_synthetic_dataset

    out = Path(out)
    prepare_output_dir(out, "demo", reuse=True)  # reruns continue; nothing else is written into
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "demo")
    t0 = time.perf_counter()
    data = out / "synth"
    if not (data / "annotations").exists():
        echo(f"[1/5] synth: writing a synthetic COCO-panoptic dataset to {data}")
        make_synthetic_dataset(data, seed=0)
    else:
        echo(f"[1/5] synth: reusing {data}")

    proposals, clip_cfg, random_clip = _models(out, echo)
    figures: dict = {}
    for split in ("train2017", "val2017"):
        cache = out / f"cache_{split}.zarr"
        summary = run_precompute(
            PrecomputeConfig(
                source=str(data),
                out=str(cache),
                split=split,
                shard_size=8,
                proposals=proposals,
                num_workers=num_workers,
                clip=clip_cfg,
            )
        )
        f = cache_summary(cache)
        figures[f"cache_{split}"] = f
        echo(
            f"      {split}: {f['images']} images, {f['masks']} masks "
            f"({f['masks_per_image']:.1f}/image), {f['bytes_per_image'] / 1024:.0f} KiB/image "
            f"on disk ({summary.num_images} computed now)"
        )

    from samcp.pipeline.train import TrainConfig, run_training

    runs = {}
    for name, steps in (("untrained", 0), ("trained", DEMO_STEPS)):
        run = out / f"run_{name}"
        runs[name] = run
        if (run / "model" / "model.safetensors").exists():
            echo(f"[3/5] train: reusing {run}")
            continue
        echo(f"[3/5] train: {name} affinity head, {steps} steps on the train cache -> {run}")
        cfg = TrainConfig(
            cache=str(out / "cache_train2017.zarr"),
            dataset=str(data),
            out=str(run),
            head_overrides=DEMO_HEAD,
            clip_checkpoint=str(clip_cfg.checkpoint),
            steps=steps,
            batch_size=4,
            lr=3e-4,
            lr_drop=(0.85,),
            log_every=20,
            ckpt_every=200,
        )
        s = run_training(cfg, resume=(run / "train_config.json").exists())
        if steps:
            echo(
                f"      {s['images_per_s']:.1f} images/s, last loss {s['last'].get('loss', 0):.3f}"
            )

    echo(
        "[4/5] predict + eval on val2017"
        + (
            " (kappa=0: the demo's CLIP is random, so only the trained classifier labels patches)"
            if random_clip
            else ""
        )
    )
    val_cache = out / "cache_val2017.zarr"
    for name, run in runs.items():
        figures[name] = _predict_and_eval(
            run, val_cache, data, out / f"pred_{name}", kappa=0.0 if random_clip else None
        )
    figures["oracle"] = _oracle(data, val_cache, out / "pred_oracle")
    _print_table(figures, echo)

    echo("[5/5] viz: pictures of trained predictions")
    for path in _viz(out / "pred_trained", data, out / "viz", n=4):
        echo(f"      {path}")
    (out / "figures.json").write_text(json.dumps(figures, indent=1, default=float))
    echo(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return figures


def _models(out: Path, echo) -> tuple[ProposalConfig, object, bool]:
    from samcp.pipeline.clip import ClipConfig, make_random_clip_checkpoint

    ckpt = os.environ.get("SAM_CHECKPOINT")
    if ckpt:
        model = os.environ.get("SAM_MODEL", "vit_h")
        proposals = ProposalConfig(
            source="sam", sam_model=model, sam_checkpoint=ckpt, sam=SamEverythingParams()
        )
        echo(f"[2/5] precompute: SAM {model} everything mode from {ckpt}")
    else:
        proposals = ProposalConfig(source="slic")
        echo("[2/5] precompute: SLIC proposals (SAM_CHECKPOINT=/path/sam_vit_h.pth for SAM)")
    clip_ckpt = os.environ.get("CLIP_CHECKPOINT")
    if clip_ckpt:
        clip_cfg = ClipConfig(
            model=os.environ.get("CLIP_MODEL", "convnext_large_d_320"), checkpoint=clip_ckpt
        )
        echo(f"      CLIP {clip_cfg.model} from {clip_ckpt}")
        return proposals, clip_cfg, False
    path = out / "clip_samcp-test-convnext_random.pt"
    if not path.exists():
        make_random_clip_checkpoint(path)
    echo("      CLIP: a tiny random open_clip ConvNeXt (CLIP_CHECKPOINT=... for a real one)")
    return proposals, ClipConfig(model="samcp-test-convnext", checkpoint=str(path)), True


def cache_summary(cache: Path) -> dict:
    """Images, masks and on-disk bytes of a local cache (a quick look; `samcp inspect` goes further)."""
    from samcp.pipeline.cache import CacheReader

    reader = CacheReader(cache)
    images = len(reader)
    masks = sum(int(reader.root["shards"][s].attrs["num_masks"]) for s in reader.shard_ids)
    size = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())
    return {
        "images": images,
        "masks": masks,
        "masks_per_image": masks / max(images, 1),
        "bytes_per_image": size / max(images, 1),
    }


def _predict_and_eval(run: Path, cache: Path, data: Path, pred: Path, kappa) -> dict:
    from samcp.pipeline.evaluation import evaluate, resolve_ground_truth
    from samcp.pipeline.predict import predict_run

    # Stuff regions below ~1% of these 320x240 images are dropped (detectron2's 4096 px is for COCO).
    predict_run(run, cache, pred, kappa=kappa, stuff_area_min=800, progress=False)
    gt_json, gt_png = resolve_ground_truth(data, "val2017")
    return evaluate(gt_json, gt_png, pred, workers=2).to_dict()


def _oracle(data: Path, cache: Path, pred_dir: Path) -> dict:
    """Proposal-oracle predictions from the cache, evaluated like any model's."""
    from samcp.pipeline.evaluation import (
        build_oracle_predictions,
        cache_proposals,
        evaluate,
        resolve_ground_truth,
    )

    gt_json, gt_png = resolve_ground_truth(data, "val2017")
    build_oracle_predictions(gt_json, gt_png, cache_proposals(cache), pred_dir, workers=2)
    return evaluate(gt_json, gt_png, pred_dir, workers=2).to_dict()


def _print_table(figures: dict, echo) -> None:
    def get(d, *path):
        for p in path:
            d = (d or {}).get(p)
        return float("nan") if d is None else float(d)

    echo("")
    echo("      val2017          |    PQ     SQ     RQ   PQth   PQst |  mIoU |    AP")
    echo("      -----------------+-----------------------------------+-------+------")
    for name in ("untrained", "trained", "oracle"):
        f = figures[name]
        echo(
            f"      {name:<16} | {get(f, 'panoptic', 'all', 'pq'):5.1f}  "
            f"{get(f, 'panoptic', 'all', 'sq'):5.1f}  {get(f, 'panoptic', 'all', 'rq'):5.1f}  "
            f"{get(f, 'panoptic', 'things', 'pq'):5.1f}  {get(f, 'panoptic', 'stuff', 'pq'):5.1f} |"
            f" {get(f, 'semantic', 'miou'):5.1f} | {get(f, 'instance', 'ap'):5.1f}"
        )
    echo("")


def _viz(pred: Path, data: Path, out: Path, n: int) -> list[Path]:
    from PIL import Image

    from samcp.pipeline.datasets import CocoPanopticDataset, load_image_rgb
    from samcp.pipeline.viz import prediction_segments, render_segments

    out.mkdir(parents=True, exist_ok=True)
    ds = CocoPanopticDataset(data, "val2017")
    paths = []
    for rec in ds.records[:n]:
        pic = render_segments(
            load_image_rgb(rec.file_name), prediction_segments(pred, rec.image_id)
        )
        path = out / f"pred_{rec.image_id}.png"
        Image.fromarray(pic).save(path)
        paths.append(path)
    return paths
