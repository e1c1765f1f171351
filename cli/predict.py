"""`samcp predict`: a trained run's panoptic, semantic and instance predictions on a cache."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("predict")
@click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Run folder written by samcp train (model/ or its latest checkpoint).",
)
@click.option(
    "--cache",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Proposal cache of the images to predict (made with the run's CLIP).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Prediction folder to write (an earlier samcp prediction folder there is replaced; "
    "any other non-empty folder is refused).",
)
@click.option(
    "--dataset",
    default=None,
    metavar="NAME",
    help="Write in this benchmark's label space (ade20k_150, ade20k_847, pascal_context_59, "
    "pascal_context_459, pascal_voc_20, cityscapes, coco_stuff_171, coco_panoptic): its classes "
    "and ids, semantic PNGs of class ids (16-bit beyond 255 classes); --vocabulary defaults to "
    "its builtin vocabulary.",
)
@click.option(
    "--vocabulary",
    default=None,
    help="Open-vocabulary prediction: an FC-CLIP class file (id:name,synonym,...) or a builtin "
    "name (coco_panoptic, ade20k_150, cityscapes, ...). Default: the training classes, or the "
    "--dataset's vocabulary.",
)
@click.option(
    "--clip-checkpoint",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The cache's CLIP weights, to embed a --vocabulary not in the text-embedding cache yet.",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="CLIP's weight in the geometric ensemble p_head^(1-a) * p_clip^a for classes the head "
    "was trained on (seen) [default: the head config's; FC-CLIP/PosSAM 0.4].",
)
@click.option(
    "--beta",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="The same weight for classes the head never saw (unseen) [default: the head config's; "
    "FC-CLIP/PosSAM 0.8].",
)
@click.option(
    "--kappa",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="One CLIP weight for every class (SAM-CP's kappa: --alpha = --beta = kappa); 0 = the head "
    "alone.",
)
@click.option(
    "--score-thresh",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Segments scoring below this are left out of the panoptic output [default: the head's; "
    "docs/heads].",
)
@click.option(
    "--overlap-thresh",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="A segment is kept only if this fraction of it stays visible [default: the head's, 0.8].",
)
@click.option(
    "--stuff-area-min",
    type=click.IntRange(min=0),
    default=None,
    help="Stuff regions smaller than this many pixels become void [default: the head's].",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change an inference setting of the trained head, e.g. --set classifier=clip for "
    "PosSAM (repeatable; docs/heads lists each head's).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Images per forward pass (faster on a GPU, more memory).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu or cuda[:N].",
)
@click.option(
    "--allow-incomplete",
    is_flag=True,
    help="Predict an unfinished cache (precompute interrupted); the missing images are noted.",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def command(
    run_dir: Path,
    cache: Path,
    out_dir: Path,
    dataset: str | None,
    vocabulary: str | None,
    clip_checkpoint: str | None,
    alpha: float | None,
    beta: float | None,
    kappa: float | None,
    score_thresh: float | None,
    overlap_thresh: float | None,
    stuff_area_min: int | None,
    sets: tuple[str, ...],
    batch_size: int,
    device: str,
    allow_incomplete: bool,
    no_progress: bool,
) -> None:
    """Predict every image of CACHE with the head of RUN and write COCO panoptic PNG+JSON,
    semantic PNGs and instance results (RLE) to --out."""
    from samcp.cli.train import parse_sets
    from samcp.pipeline.predict import predict_run, prediction_notes

    out = predict_run(
        run_dir,
        cache,
        out_dir,
        vocabulary=vocabulary,
        clip_checkpoint=clip_checkpoint,
        kappa=kappa,
        alpha=alpha,
        beta=beta,
        device=device,
        score_thresh=score_thresh,
        overlap_thresh=overlap_thresh,
        stuff_area_min=stuff_area_min,
        overrides=parse_sets(sets),
        batch_size=batch_size,
        progress=not no_progress,
        allow_incomplete=allow_incomplete,
        dataset=dataset,
    )
    for note in prediction_notes(out):
        click.echo(f"note: {note}", err=True)
    click.echo(f"predictions: {out}")
