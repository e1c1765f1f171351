"""`samcp train`: train a head on a proposal cache."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import click

from samcp.pipeline.errors import SamcpError


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


@click.command("train")
@click.option("--cache", required=True, help="Proposal cache of the training images (with CLIP).")
@click.option("--dataset", required=True, help="COCO panoptic root with the training annotations.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder.")
@click.option("--split", default=None, help="Annotation split of the cached images [train2017].")
@click.option("--head", default=None, help="Head to train [affinity].")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, path_type=Path),
    help="YAML run config: TrainConfig fields, and a `head:` mapping of head config fields.",
)
@click.option(
    "--preset",
    type=click.Choice(["default", "tiny"]),
    default=None,
    help="Head size before overrides [default].",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a head config field, e.g. --set num_decoder_layers=3 (repeatable).",
)
@click.option("--clip-checkpoint", default=None, help="CLIP weights for the text embeddings.")
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="Optimisation steps [2000]."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per step [4].")
@click.option("--lr", type=float, default=None, help="AdamW learning rate [2e-4].")
@click.option("--seed", type=int, default=None, help="Seed of data order, flips and init [0].")
@click.option("--device", default=None, help="auto, cpu or cuda [auto].")
@click.option(
    "--ckpt-every", type=click.IntRange(min=1), default=None, help="Steps per checkpoint."
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--no-progress", is_flag=True)
def command(
    cache,
    dataset,
    out,
    split,
    head,
    config_file,
    preset,
    sets,
    clip_checkpoint,
    steps,
    batch_size,
    lr,
    seed,
    device,
    ckpt_every,
    resume,
    no_progress,
):
    """Train a head on cached SAM patches and CLIP features (decoupled from the foundation models)."""
    from samcp.pipeline.train import TrainConfig, run_training

    values: dict = {}
    head_overrides: dict = {}
    if config_file is not None:
        import yaml

        doc = yaml.safe_load(config_file.read_text()) or {}
        if not isinstance(doc, dict):
            raise SamcpError(f"{config_file} must be a YAML mapping of TrainConfig fields")
        head_overrides.update(doc.pop("head_config", None) or {})
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise SamcpError(f"{config_file}: unknown keys {', '.join(unknown)}; see docs/train.md")
        values.update(doc)
    for item in sets:
        if "=" not in item:
            raise SamcpError(f"--set {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        head_overrides[k.strip()] = _parse_value(v)
    cli_values = dict(
        split=split,
        head=head,
        preset=preset,
        clip_checkpoint=clip_checkpoint,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        ckpt_every=ckpt_every,
    )
    values.update({k: v for k, v in cli_values.items() if v is not None})
    if "lr_drop" in values:
        values["lr_drop"] = tuple(values["lr_drop"])
    values["head_overrides"] = {**values.get("head_overrides", {}), **head_overrides}
    cfg = TrainConfig(
        cache=cache, dataset=dataset, out=str(out), progress=not no_progress, **values
    )
    summary = run_training(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    click.echo(f"run: {summary['run']}")
    click.echo(f"steps: {summary['steps_done']} ({summary['images_per_s']:.1f} images/s)")
    if summary["last"]:
        click.echo(f"last loss: {summary['last'].get('loss', float('nan')):.4f}")
