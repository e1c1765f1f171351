"""`samcp synth`: a deterministic synthetic dataset in the COCO panoptic 2017 layout."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same bytes.")
@click.option("--num-train", default=40, show_default=True, type=click.IntRange(min=0))
@click.option("--num-val", default=20, show_default=True, type=click.IntRange(min=0))
@click.option("--height", default=240, show_default=True, type=click.IntRange(min=32))
@click.option("--width", default=320, show_default=True, type=click.IntRange(min=32))
@click.option("--min-instances", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--max-instances", default=8, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--overwrite", is_flag=True, help="Replace a synthetic dataset samcp wrote earlier at OUT."
)
def command(out, seed, num_train, num_val, height, width, min_instances, max_instances, overwrite):
    """Write a synthetic COCO-panoptic dataset (images, panoptic PNG+JSON, semantic PNGs,
    classes.txt) to OUT."""
    from samcp.pipeline.synth import make_synthetic_dataset

    make_synthetic_dataset(
        out,
        seed=seed,
        num_train=num_train,
        num_val=num_val,
        height=height,
        width=width,
        min_instances=min_instances,
        max_instances=max_instances,
        overwrite=overwrite,
    )
    click.echo(f"wrote {num_train} train + {num_val} val images to {out}")
