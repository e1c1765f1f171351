"""`samcp synth-clip`: train samcp's small CLIP of the synthetic world (see samcp.pipeline.synthclip)."""

from __future__ import annotations

from pathlib import Path

import click

# samcp.pipeline.synthclip's defaults, spelled out so that `samcp --help` does not import torch
# (tests/test_synth_clip.py checks that they agree).
SYNTH_CLIP_MODEL = "samcp-synth-convnext"
DEFAULT_STEPS = 160
DEFAULT_BATCH_SIZE = 2
DEFAULT_INPUT_SIZE = 1024


@click.command("synth-clip")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Checkpoint file to write (a plain open_clip state dict); an existing file is refused "
    "unless --overwrite.",
)
@click.option("--split", default="train2017", show_default=True, help="Split folder to train on.")
@click.option(
    "--steps", default=DEFAULT_STEPS, show_default=True, type=int, help="Optimiser steps."
)
@click.option(
    "--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True, type=int, help="Images per step."
)
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same weights.")
@click.option(
    "--input-size",
    default=DEFAULT_INPUT_SIZE,
    show_default=True,
    type=int,
    help="Cache geometry to train at: the --clip-input-size precompute will use.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing file at --out.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def command(
    dataset: Path,
    out: Path,
    split: str,
    steps: int,
    batch_size: int,
    seed: int,
    input_size: int,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """Train a small open_clip model that knows the synthetic world of DATASET (a `samcp synth`
    dataset): mask-pooled features of its segments and superpixels land near the text of their
    class, any synonym and prompt template. Use it with `samcp precompute --clip-model
    samcp-synth-convnext --clip-checkpoint OUT`."""
    from samcp.pipeline.synthclip import train_synth_clip

    s = train_synth_clip(
        dataset,
        out,
        split=split,
        steps=steps,
        seed=seed,
        input_size=input_size,
        batch_size=batch_size,
        progress=not no_progress,
        overwrite=overwrite,
    )
    click.echo(
        f"wrote {s.out} ({s.model}, {s.steps} steps at {s.input_size} px on {s.images} images: "
        f"{s.gt_regions} segments + {s.superpixel_regions} superpixels, {s.classes} classes, "
        f"{s.names} names) in {s.prepare_s + s.train_s:.0f} s; last loss {s.final_loss:.3f}, "
        f"region accuracy {s.final_region_accuracy:.2f}"
    )
    click.echo(
        f"use it: samcp precompute ... --clip-model {SYNTH_CLIP_MODEL} --clip-checkpoint {s.out} "
        f"--clip-input-size {s.input_size}"
    )
