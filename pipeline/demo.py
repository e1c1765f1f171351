"""`make demo`: the whole mission end to end on embedded defaults, as an open-vocabulary benchmark.

synth -> a CLIP that knows the synthetic world (samcp's own, trained once on the synthetic train
split and reused from the samcp cache folder; or a real one with CLIP_CHECKPOINT) -> precompute
(local Ray; SLIC proposals + SAM embeddings from a tiny random SAM, or SAM proposals and embeddings
when SAM_CHECKPOINT is set; CLIP features) -> train every head on the *seen* classes only
(classes_seen.txt: the synthetic analogue of COCO): SAM-CP's affinity head, PosSAM, and the semantic
heads CAT-Seg (costagg), SAM-MI (two stages) and ESC-Net at small presets -> predict all 11 classes
(classes.txt: the analogue of ADE20K), with and without CLIP -> PQ/SQ/RQ, mIoU and AP for all, seen
and unseen classes of each head untrained and trained (semantic heads: mIoU), and of the proposal
oracle -> a few pictures of the predictions. Steps are sized to keep the whole run near 7 minutes
on two CPU cores, plus 2 the first time for the CLIP (docs/benchmarks.md).

Re-running resumes: the dataset, the CLIP, caches and finished runs are reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from samcp.pipeline.outputs import prepare_output_dir, write_marker
from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
from samcp.pipeline.proposals import ProposalConfig
from samcp.pipeline.proposals.sam_params import SamEverythingParams
from samcp.pipeline.vocab import read_vocabulary

# A head between the test-size preset and the paper's size: trains in minutes on two CPU cores.
DEMO_HEAD = {
    "embed_dim": 128,
    "roi_size": 7,
    "roi_mlp_hidden": 256,
    "num_encoder_layers": 2,
    "num_heads": 4,
    "ffn_dim": 256,
    "num_decoder_layers": 3,
    # DINO-style denoising queries (300 by default) cost ~2.4x per step on a CPU; the demo keeps
    # its 10-minute budget without them (their effect: docs/heads/affinity.md).
    "num_denoising_queries": 0,
}
DEMO_STEPS = 250
KAPPA = 0.4  # SAM-CP's CLIP weight at inference (paper, sec. 3.3)
CLIP_LEVELS = ("res3", "res4", "res5")  # SAM-CP pools each patch from the level its size selects
# PosSAM's head at the paper's widths (LDP 256, one attention layer): 150 steps and dropout 0.3
# (40 training images overfit quickly; picked among 150/250/400 steps x dropout 0/0.3 on this val
# set, so the demo's PosSAM rows are a demonstration, not a held-out benchmark).
POSSAM_STEPS = 150
POSSAM_HEAD = {"dropout": 0.3}
# CAT-Seg's cost aggregation (the base of SAM-MI and ESC-Net) at its tiny preset with one
# upsampling stage guided by res4 (logits at stride 16 of the 1024 frame): the paper-size head runs
# at ~0.04 images/s on a CPU, the tiny one with a second stage at 128 x 128 ~6x slower than this.
COSTAGG_STEPS = 100
COSTAGG_HEAD = {
    "guidance_levels": ["clip_res4"],
    "decoder_dims": [16],
    "decoder_guidance_proj_dims": [4],
}

# SAM-MI on the same costagg: stage 1 trains TSPP alone, stage 2 the whole head from it with the
# frozen SAM decoder online on the cached sam_embed (8 sparse points per image bound the CPU cost).
SAM_MI_STAGE1_STEPS = 40
SAM_MI_STEPS = 30
SAM_MI_HEAD = {**COSTAGG_HEAD, "grid_size": 32, "max_points": 8}
# ESC-Net on the same costagg, its tiny preset (2 ESC blocks) with the blocks of the demo's SAM.
ESC_NET_STEPS = 20
ESC_NET_HEAD = {**COSTAGG_HEAD, "sam_blocks": "pretrained"}

# Per head: (preset, head overrides, TrainConfig settings) of its demo run.
TRAIN_SETTINGS: dict[str, tuple[str, dict, dict]] = {
    "affinity": ("default", DEMO_HEAD, {"lr": 3e-4, "lr_drop": (0.85,)}),
    "possam": ("default", POSSAM_HEAD, {"lr": 1e-3, "lr_drop": (0.8,), "weight_decay": 0.05}),
    "costagg": ("tiny", COSTAGG_HEAD, {"lr": 1e-3, "lr_drop": (0.8,)}),
    "sam_mi": ("tiny", SAM_MI_HEAD, {"lr": 1e-3, "lr_drop": (0.8,)}),
    "esc_net": ("tiny", ESC_NET_HEAD, {"lr": 1e-3, "lr_drop": (0.8,)}),
}


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
        echo(f"[1/6] synth: writing a synthetic COCO-panoptic dataset to {data}")
        make_synthetic_dataset(data, seed=0)
    else:
        echo(f"[1/6] synth: reusing {data}")

    clip_cfg = _clip(data, out, echo)
    proposals = _proposals(out, echo)
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
                store_sam_embeddings=True,
            )
        )
        f = cache_summary(cache)
        figures[f"cache_{split}"] = f
        echo(
            f"      {split}: {f['images']} images, {f['masks']} masks "
            f"({f['masks_per_image']:.1f}/image), {f['bytes_per_image'] / 1024:.0f} KiB/image "
            f"on disk ({summary.num_images} computed now)"
        )

    seen_file = data / "classes_seen.txt"
    sam = {"sam_arch": proposals.sam_model, "sam_checkpoint": str(proposals.sam_checkpoint)}
    runs = {}
    for head, name, steps, extra in (
        ("affinity", "untrained", 0, {}),
        ("affinity", "trained", DEMO_STEPS, {}),
        ("possam", "untrained", 0, {}),
        ("possam", "trained", POSSAM_STEPS, {}),
        ("costagg", "untrained", 0, {}),
        ("costagg", "trained", COSTAGG_STEPS, {}),
        ("sam_mi", "stage1", SAM_MI_STAGE1_STEPS, {"stage": 1}),
        ("sam_mi", "trained", SAM_MI_STEPS, {**sam, "init_from": str(out / "run_sam_mi_stage1")}),
        ("esc_net", "trained", ESC_NET_STEPS, sam),
    ):
        runs[head, name] = _train(out, data, head, name, steps, clip_cfg.checkpoint, echo, extra)

    n_all = len(read_vocabulary(data / "classes.txt").ids)
    echo(f"[5/6] predict all {n_all} classes on val2017 + eval (CLIP off, and CLIP fused)")
    val_cache = out / "cache_val2017.zarr"
    rows = (
        # (label, head, run, alpha, beta, inference overrides)
        ("SAM-CP untrained", "affinity", "untrained", KAPPA, KAPPA, {}),
        ("SAM-CP, kappa 0", "affinity", "trained", 0.0, 0.0, {}),
        (f"SAM-CP, kappa {KAPPA}", "affinity", "trained", KAPPA, KAPPA, {}),
        ("SAM-CP, a.4 b.8", "affinity", "trained", 0.4, 0.8, {}),
        ("PosSAM untrained", "possam", "untrained", None, None, {}),
        ("PosSAM, LDP only", "possam", "trained", None, None, {"classifier": "ldp"}),
        ("PosSAM, CLIP only", "possam", "trained", None, None, {"classifier": "clip"}),
        ("PosSAM, geometric", "possam", "trained", None, None, {"classifier": "geometric"}),
        ("PosSAM, MASE", "possam", "trained", None, None, {}),
        ("CAT-Seg untrained", "costagg", "untrained", None, None, {}),
        ("CAT-Seg (costagg)", "costagg", "trained", None, None, {}),
        ("SAM-MI", "sam_mi", "trained", None, None, {}),
        ("ESC-Net", "esc_net", "trained", None, None, {}),
    )
    for label, head, name, alpha, beta, sets in rows:
        slug = label.lower().replace(" ", "_").replace(",", "").replace(".", "")
        figures[label] = _predict_and_eval(
            runs[head, name],
            val_cache,
            data,
            out / f"pred_{slug}",
            alpha=alpha,
            beta=beta,
            overrides=sets,
            vocabulary=data / "classes.txt",
            clip_checkpoint=clip_cfg.checkpoint,
        )
    figures["oracle"] = _oracle(data, val_cache, out / "pred_oracle")
    figures["total_s"] = time.perf_counter() - t0
    _print_table(
        figures,
        [label for label, *_ in rows] + ["oracle"],
        n_all,
        len(read_vocabulary(seen_file).ids),
        echo,
    )

    echo("[6/6] viz: pictures of the trained PosSAM head's predictions (MASE)")
    for path in _viz(out / "pred_possam_mase", data, out / "viz", n=4):
        echo(f"      {path}")
    (out / "figures.json").write_text(json.dumps(figures, indent=1, default=float))
    echo(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return figures


def _proposals(out: Path, echo) -> ProposalConfig:
    """SAM proposals and embeddings from SAM_CHECKPOINT, else SLIC proposals with the embeddings
    of a tiny random SAM (PosSAM pools sam_embed; random weights make that stream carry little)."""
    ckpt = os.environ.get("SAM_CHECKPOINT")
    if ckpt:
        model = os.environ.get("SAM_MODEL", "vit_h")
        echo(f"[3/6] precompute: SAM {model} everything mode + embeddings from {ckpt}")
        return ProposalConfig(
            source="sam", sam_model=model, sam_checkpoint=ckpt, sam=SamEverythingParams()
        )
    from samcp.pipeline.foundation import write_random_sam_checkpoint

    path = out / "sam_vit_tiny_random.pth"
    if not path.is_file():
        write_random_sam_checkpoint(path, seed=0, tiny=True)
    echo(
        "[3/6] precompute: SLIC proposals + sam_embed of a tiny random SAM "
        "(SAM_CHECKPOINT=/path/sam_vit_h.pth for SAM)"
    )
    return ProposalConfig(source="slic", sam_model="vit_tiny", sam_checkpoint=str(path))


def _train(
    out: Path, data: Path, head: str, name: str, steps: int, clip_ckpt, echo, extra: dict
) -> Path:
    """One demo run (reused when finished): ``head`` on the seen classes of the train cache, with
    the head's demo settings and the run's own ``extra`` head overrides."""
    from samcp.pipeline.train import TrainConfig, run_training

    run = out / f"run_{head}_{name}"
    if (run / "model" / "model.safetensors").exists():
        echo(f"[4/6] train: reusing {run}")
        return run
    seen_file = data / "classes_seen.txt"
    echo(
        f"[4/6] train: {name} {head} head, {steps} steps on the train cache, seen classes only "
        f"({seen_file.name}) -> {run}"
    )
    preset, overrides, settings = TRAIN_SETTINGS[head]
    cfg = TrainConfig(
        cache=str(out / "cache_train2017.zarr"),
        dataset=str(data),
        out=str(run),
        head=head,
        preset=preset,
        head_overrides={**overrides, **extra},
        classes=str(seen_file),
        clip_checkpoint=str(clip_ckpt),
        steps=steps,
        batch_size=4,
        log_every=20,
        ckpt_every=200,
        **settings,
    )
    s = run_training(cfg, resume=(run / "train_config.json").exists())
    if steps:
        echo(f"      {s['images_per_s']:.1f} images/s, last loss {s['last'].get('loss', 0):.3f}")
    return run


def _clip(data: Path, out: Path, echo):
    """The demo's CLIP: CLIP_CHECKPOINT, else samcp's synthetic-world CLIP, trained once on the
    synthetic train split and kept in the samcp cache folder under a key of everything that
    decides its weights (the training annotations, the recipe's code, the settings)."""
    from samcp.pipeline.clip import ClipConfig
    from samcp.pipeline.files import file_sha256
    from samcp.pipeline.synthclip import SYNTH_CLIP_MODEL, train_synth_clip
    from samcp.pipeline.vocab import samcp_cache_dir

    clip_ckpt = os.environ.get("CLIP_CHECKPOINT")
    if clip_ckpt:
        cfg = ClipConfig(
            model=os.environ.get("CLIP_MODEL", "convnext_large_d_320"),
            checkpoint=clip_ckpt,
            levels=CLIP_LEVELS,
        )
        echo(f"[2/6] CLIP: {cfg.model} from {clip_ckpt}")
        return cfg
    import samcp.pipeline.clip as clip_module
    import samcp.pipeline.synthclip as recipe

    key = hashlib.sha256(
        json.dumps(
            {
                "annotations": file_sha256(data / "annotations" / "panoptic_train2017.json"),
                "recipe": file_sha256(recipe.__file__),
                "config_and_pooling": file_sha256(clip_module.__file__),
                "model": SYNTH_CLIP_MODEL,
                "seed": 0,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    folder = samcp_cache_dir() / "synth-clip"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # an unwritable cache folder: keep the CLIP with the demo's outputs
        echo(f"      cannot use {folder} ({exc.strerror}); keeping the CLIP in {out}")
        folder = out / "synth-clip"
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{SYNTH_CLIP_MODEL}-{key}.pt"
    if path.is_file():
        echo(f"[2/6] CLIP: reusing samcp's synthetic-world CLIP {path}")
    else:
        echo(f"[2/6] CLIP: training samcp's synthetic-world CLIP on {data}/train2017 -> {path}")
        summary = train_synth_clip(data, path, seed=0)
        echo(
            f"      {summary.prepare_s + summary.train_s:.0f} s, region accuracy "
            f"{100 * summary.final_region_accuracy:.0f}% (CLIP_CHECKPOINT=... for a real CLIP)"
        )
    return ClipConfig(model=SYNTH_CLIP_MODEL, checkpoint=str(path), levels=CLIP_LEVELS)


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


def _predict_and_eval(
    run: Path,
    cache: Path,
    data: Path,
    pred: Path,
    *,
    alpha,
    beta,
    overrides: dict,
    vocabulary: Path,
    clip_checkpoint,
) -> dict:
    from samcp.pipeline.evaluation import evaluate, resolve_ground_truth
    from samcp.pipeline.evaluation.groups import read_seen_classes
    from samcp.pipeline.predict import predict_run

    # Each head's own composition thresholds (docs/predict.md), as `samcp predict` uses them.
    predict_run(
        run,
        cache,
        pred,
        vocabulary=str(vocabulary),
        clip_checkpoint=str(clip_checkpoint),
        alpha=alpha,
        beta=beta,
        overrides=overrides,
        progress=False,
    )
    gt_json, gt_png = resolve_ground_truth(data, "val2017")
    seen = read_seen_classes(data / "classes_seen.txt")
    return evaluate(gt_json, gt_png, pred, workers=2, seen=seen).to_dict()


def _oracle(data: Path, cache: Path, pred_dir: Path) -> dict:
    """Proposal-oracle predictions from the cache, evaluated like any model's."""
    from samcp.pipeline.evaluation import (
        build_oracle_predictions,
        cache_proposals,
        evaluate,
        resolve_ground_truth,
    )
    from samcp.pipeline.evaluation.groups import read_seen_classes

    gt_json, gt_png = resolve_ground_truth(data, "val2017")
    build_oracle_predictions(gt_json, gt_png, cache_proposals(cache), pred_dir, workers=2)
    seen = read_seen_classes(data / "classes_seen.txt")
    return evaluate(gt_json, gt_png, pred_dir, workers=2, seen=seen).to_dict()


def _print_table(figures: dict, rows: list[str], n_all: int, n_seen: int, echo) -> None:
    def get(d, *path):
        for p in path:
            d = (d or {}).get(p)
        return float("nan") if d is None else float(d)

    def group(f, name, *path):
        return get(f, *path) if name == "all" else get(f, "groups", name, *path)

    echo("")
    echo(
        f"      {f'val2017, {n_all} classes':<20} |         PQ        |  SQ    RQ  "
        "|       mIoU        |  AP"
    )
    echo(
        f"      {f'(trained on {n_seen} seen)':<20} |  all  seen unseen |  all   all "
        "|  all  seen unseen | all"
    )
    echo("      " + "-" * 20 + "-+-------------------+------------+-------------------+-----")
    for name in rows:
        f = figures[name]
        pq = " ".join(_num(group(f, g, "panoptic", "all", "pq")) for g in _GROUPS)
        sqrq = " ".join(_num(get(f, "panoptic", "all", k)) for k in ("sq", "rq"))
        miou = " ".join(_num(group(f, g, "semantic", "miou")) for g in _GROUPS)
        echo(f"      {name:<20} | {pq} | {sqrq} | {miou} | {_num(get(f, 'instance', 'ap'), 4)}")
    echo("")


_GROUPS = ("all", "seen", "unseen")


def _num(v: float, width: int = 5) -> str:
    """A table cell: the number, or n/a (a semantic head has no PQ or AP)."""
    return f"{'n/a':>{width}}" if v != v else f"{v:{width}.1f}"


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
