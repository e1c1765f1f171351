"""`samcp precompute`: proposals (+ features) for a dataset, written to a Zarr cache."""

from __future__ import annotations

import click
from click.core import ParameterSource

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.proposals import ProposalConfig
from samcp.pipeline.proposals.sam_params import SamEverythingParams
from samcp.pipeline.proposals.slic import SlicParams

_D = SamEverythingParams()


def _int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("give comma-separated integers, e.g. 30,100") from None
    if not out or min(out) < 1:
        raise click.BadParameter("give at least one positive integer, e.g. 30,100")
    return out


def _clip_config(checkpoint, model, levels, input_size, no_dense):
    if checkpoint is None:
        return None
    from samcp.pipeline.clip import ClipConfig

    return ClipConfig(
        model=model,
        checkpoint=checkpoint,
        input_size=input_size,
        levels=tuple(v.strip() for v in levels.split(",") if v.strip()),
        store_dense=not no_dense,
    )


# Options read by one proposal source only; naming them for another source does nothing (except
# --sam-model, which also names the SAM of --store-sam-embeddings for any source).
_SAM_TUNING = (
    "sam_model",
    "points_per_side",
    "points_per_batch",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
)
_SLIC_TUNING = ("slic_segments", "slic_compactness")
# Options that shape CLIP features, which only --clip-checkpoint turns on.
_CLIP_OPTIONS = ("clip_model", "clip_levels", "clip_input_size", "no_clip_dense")


def _given(ctx: click.Context, name: str) -> bool:
    """True if the user set the option (command line or environment), not its default."""
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


def _flags(ctx: click.Context, names: list[str]) -> str:
    by_name = {p.name: p.opts[0] for p in ctx.command.params}
    return ", ".join(by_name[n] for n in names)


def _check_options(
    ctx: click.Context, source_kind: str, num_workers: int, store_sam_embeddings: bool = False
) -> None:
    """Refuses options that contradict the run and warns about tuning that it will ignore.

    Paths given to something that never reads them (a SAM checkpoint for SLIC proposals without
    --store-sam-embeddings) and CLIP settings without CLIP are refused: the user expects an effect
    that would silently not happen. Tuning values for another proposal source only get a warning on
    stderr.

    Raises:
        SamcpError: a contradiction, naming the option and the fix.
    """
    sam_embed_only = source_kind != "sam" and store_sam_embeddings
    if source_kind != "sam" and not sam_embed_only and _given(ctx, "sam_checkpoint"):
        raise SamcpError(
            f"--sam-checkpoint is read only by --proposals sam and --store-sam-embeddings, not "
            f"--proposals {source_kind} alone; drop it, pass --proposals sam to make SAM "
            "proposals, or add --store-sam-embeddings to store SAM's image embedding"
        )
    if source_kind != "external" and _given(ctx, "external_path"):
        raise SamcpError(
            f"--external is read only by --proposals external, not --proposals {source_kind}; "
            "drop it, or pass --proposals external to import those proposals"
        )
    clip = [n for n in _CLIP_OPTIONS if _given(ctx, n)]
    if clip and not _given(ctx, "clip_checkpoint"):
        raise SamcpError(
            f"{_flags(ctx, clip)} {'shapes' if len(clip) == 1 else 'shape'} CLIP features, which "
            "are stored only with --clip-checkpoint; add --clip-checkpoint PATH, or drop "
            f"{'it' if len(clip) == 1 else 'them'}"
        )
    if num_workers == 0 and _given(ctx, "ray_address"):
        raise SamcpError(
            "--ray-address joins a Ray cluster but --num-workers 0 runs in this process "
            "without Ray; drop one of them"
        )
    ignored = []
    if source_kind != "sam":
        ignored += [
            n for n in _SAM_TUNING if _given(ctx, n) and not (sam_embed_only and n == "sam_model")
        ]
    if source_kind != "slic":
        ignored += [n for n in _SLIC_TUNING if _given(ctx, n)]
    if ignored:
        click.echo(
            f"warning: {_flags(ctx, ignored)} {'does' if len(ignored) == 1 else 'do'} nothing "
            f"with --proposals {source_kind} (ignored)",
            err=True,
        )
    if num_workers == 0 and _given(ctx, "gpus_per_worker"):
        click.echo(
            "warning: --gpus-per-worker does nothing with --num-workers 0 (no Ray workers; "
            "ignored)",
            err=True,
        )


@click.command("precompute")
@click.argument("source", type=click.Path(path_type=str))
@click.option("--out", "-o", required=True, help="Cache location (a folder, created if missing).")
@click.option(
    "--dataset",
    default=None,
    metavar="NAME",
    help="Read SOURCE as this benchmark's root in its prepared layout: ade20k_150, ade20k_847, "
    "pascal_context_59, pascal_context_459, pascal_voc_20, cityscapes, coco_stuff_171, "
    "coco_panoptic (docs/datasets.md) [default: SOURCE is a COCO panoptic folder or a .jsonl "
    "manifest].",
)
@click.option(
    "--split",
    default=None,
    help="COCO split folder name, or with --dataset val or train [default: val2017; val with "
    "--dataset].",
)
@click.option(
    "--shard-size",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per shard: the unit of work, writing and resume.",
)
@click.option(
    "--proposals",
    "source_kind",
    type=click.Choice(["sam", "slic", "external"]),
    default="sam",
    show_default=True,
    help="Proposal generator.",
)
@click.option(
    "--sam-model",
    type=click.Choice(["vit_h", "vit_l", "vit_b", "vit_tiny", "vit_test"]),
    default="vit_h",
    show_default=True,
    help="SAM architecture of the checkpoint (vit_tiny, vit_test: samcp's random test models).",
)
@click.option(
    "--sam-checkpoint",
    type=click.Path(path_type=str),
    default=None,
    help="segment_anything checkpoint (.pth), e.g. sam_vit_h_4b8939.pth: the SAM of --proposals "
    "sam, or of --store-sam-embeddings with other proposals.",
)
@click.option(
    "--sam-features",
    type=click.Choice(["sam", "sam2clip"]),
    default="sam",
    show_default=True,
    help="SAM's image embedding: from SAM's image encoder, or (sam2clip) from the CLIP pass "
    "through the neck of --sam2clip-run, skipping SAM's encoder; SAM's prompt encoder and mask "
    "decoder still come from --sam-checkpoint.",
)
@click.option(
    "--sam2clip-run",
    type=click.Path(path_type=str),
    default=None,
    metavar="RUN",
    help="Run folder of samcp train --head sam2clip (for --sam-features sam2clip); needs "
    "--clip-checkpoint with the CLIP and --clip-levels the run was trained on.",
)
@click.option(
    "--points-per-side",
    default=_D.points_per_side,
    show_default=True,
    type=click.IntRange(min=1),
    help="Prompt grid is N x N points.",
)
@click.option(
    "--points-per-batch",
    default=_D.points_per_batch,
    show_default=True,
    type=click.IntRange(min=1),
    help="Prompts decoded together (memory vs speed).",
)
@click.option(
    "--pred-iou-thresh",
    default=_D.pred_iou_thresh,
    show_default=True,
    type=float,
    help="Keep masks with predicted IoU above this (0 disables).",
)
@click.option(
    "--stability-score-thresh",
    default=_D.stability_score_thresh,
    show_default=True,
    type=float,
    help="Keep masks with stability score at least this (0 disables).",
)
@click.option(
    "--stability-score-offset",
    default=_D.stability_score_offset,
    show_default=True,
    type=float,
    help="Logit offset for the stability score.",
)
@click.option(
    "--box-nms-thresh",
    default=_D.box_nms_thresh,
    show_default=True,
    type=float,
    help="Box NMS IoU threshold (1.0 keeps everything).",
)
@click.option(
    "--slic-segments",
    default="30,100",
    show_default=True,
    callback=_int_list,
    help="SLIC superpixel counts, one run each (slic proposals).",
)
@click.option("--slic-compactness", default=10.0, show_default=True, type=float)
@click.option(
    "--external",
    "external_path",
    type=click.Path(path_type=str),
    default=None,
    help="Folder of per-image SA-1B/amg JSON, or a COCO results JSON (external).",
)
@click.option(
    "--num-workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=0),
    help="CPU workers when there is no GPU; 0 runs in this process without Ray.",
)
@click.option(
    "--gpus-per-worker",
    default=1.0,
    show_default=True,
    type=float,
    help="GPUs per worker when the Ray cluster has GPUs.",
)
@click.option("--ray-address", default=None, help="Join this Ray cluster (default: local Ray).")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing samcp cache at --out (never any other folder).",
)
@click.option(
    "--redo-failed", is_flag=True, help="Also redo complete shards that hold failed rows."
)
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Only the first N images.")
@click.option(
    "--clip-checkpoint",
    type=click.Path(path_type=str),
    default=None,
    help="open_clip weights file; stores dense CLIP maps and mask-pooled CLIP embeddings.",
)
@click.option(
    "--clip-model",
    default="convnext_large_d_320",
    show_default=True,
    help="open_clip model name of --clip-checkpoint.",
)
@click.option(
    "--clip-levels",
    default="res5",
    show_default=True,
    help="ConvNeXt stages stored as dense maps (comma-separated res2..res5).",
)
@click.option(
    "--clip-input-size",
    default=1024,
    show_default=True,
    type=int,
    help="CLIP input geometry: longer side resized to this, padded square.",
)
@click.option(
    "--no-clip-dense", is_flag=True, help="Store only per-mask CLIP embeddings, no dense maps."
)
@click.option(
    "--store-sam-embeddings",
    is_flag=True,
    help="Also store SAM's image embedding (sam_embed): from the same encoder pass as SAM "
    "proposals, or with slic/external proposals from a SAM pass that only computes the embedding "
    "(needs --sam-checkpoint).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
def command(
    ctx: click.Context,
    source,
    out,
    dataset,
    split,
    shard_size,
    source_kind,
    sam_model,
    sam_checkpoint,
    sam_features,
    sam2clip_run,
    points_per_side,
    points_per_batch,
    pred_iou_thresh,
    stability_score_thresh,
    stability_score_offset,
    box_nms_thresh,
    slic_segments,
    slic_compactness,
    external_path,
    num_workers,
    gpus_per_worker,
    ray_address,
    overwrite,
    redo_failed,
    limit,
    clip_checkpoint,
    clip_model,
    clip_levels,
    clip_input_size,
    no_clip_dense,
    store_sam_embeddings,
    no_progress,
):
    """Run a proposal generator over SOURCE (COCO panoptic folder, .jsonl manifest, or with
    --dataset a benchmark root).

    Re-running the same command resumes: complete shards are skipped, incomplete ones redone.
    """
    from samcp.pipeline.precompute import AllImagesFailed, PrecomputeConfig, run_precompute

    _check_options(ctx, source_kind, num_workers, store_sam_embeddings)

    proposals = ProposalConfig(
        source=source_kind,
        sam_model=sam_model,
        sam_checkpoint=sam_checkpoint,
        sam_features=sam_features,
        sam2clip_run=sam2clip_run,
        sam=SamEverythingParams(
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
        ),
        slic=SlicParams(n_segments=slic_segments, compactness=slic_compactness),
        external_path=external_path,
    )
    if dataset is not None and str(source).endswith(".jsonl"):
        raise SamcpError(
            f"--dataset {dataset} reads a benchmark root, not a manifest; drop --dataset or pass "
            "the datasets root"
        )
    cfg = PrecomputeConfig(
        source=source,
        out=out,
        split=split or ("val" if dataset is not None else "val2017"),
        dataset=dataset,
        shard_size=shard_size,
        proposals=proposals,
        num_workers=num_workers,
        gpus_per_worker=gpus_per_worker,
        ray_address=ray_address,
        overwrite=overwrite,
        limit=limit,
        progress=not no_progress,
        store_sam_embeddings=store_sam_embeddings,
        redo_failed=redo_failed,
        clip=_clip_config(clip_checkpoint, clip_model, clip_levels, clip_input_size, no_clip_dense),
    )
    try:
        summary = run_precompute(cfg)
    except AllImagesFailed as exc:
        for line in exc.summary.lines():
            click.echo(line)
        raise
    for line in summary.lines():
        click.echo(line)
    if summary.shards_failed:
        raise click.ClickException(
            f"{len(summary.shards_failed)} shard(s) failed: {', '.join(summary.shards_failed)}; "
            "re-run the same command to redo them"
        )
