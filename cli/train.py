"""`samcp train`: train a head on a proposal cache."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import click

from samcp.pipeline.errors import SamcpError


def _load_yaml(text: str, where: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())[:160]
        raise SamcpError(f"{where} is not valid YAML ({first}); fix its syntax") from None


def parse_sets(sets: tuple[str, ...]) -> dict:
    """``--set KEY=VALUE`` options as a mapping (values parsed as YAML: 3, 0.5, true, [1, 2])."""
    out = {}
    for item in sets:
        if "=" not in item:
            raise SamcpError(f"--set {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = _load_yaml(v, f"--set {item!r}")
    return out


@click.command("train")
@click.option("--cache", required=True, help="Proposal cache of the training images (with CLIP).")
@click.option(
    "--dataset",
    required=True,
    help="Root with the training annotations: a COCO panoptic root, or for a cache made with "
    "`precompute --dataset NAME` that benchmark's root (read with its reader).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder.")
@click.option(
    "--split",
    default=None,
    help="Annotation split of the cached images [the split a benchmark cache records, else "
    "train2017].",
)
@click.option(
    "--dataset-name",
    "dataset_name",
    default=None,
    metavar="NAME",
    help="Benchmark whose ground truth --dataset holds (coco_stuff_171, ade20k_150, ...) [the one "
    "the cache records: precompute --dataset NAME; else the COCO panoptic layout].",
)
@click.option("--head", default=None, help="Head to train [affinity].")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, path_type=Path),
    help="YAML run config: TrainConfig fields, and a `head_config:` mapping of head config fields.",
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
    "--classes",
    "class_file",
    default=None,
    metavar="FILE",
    help="Class file (id:name,synonym,...) of the training classes, e.g. the synthetic set's "
    "classes_seen.txt; the dataset's other categories become void [all dataset categories].",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Optimisation steps [2000, or from --epochs].",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Passes over the cache instead of --steps (steps = ceil(epochs x images / global "
    "batch)); the learning rate drops x0.1 after 8/12 and 11/12 of the run unless lr_drop is set.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per step [4].")
@click.option(
    "--lr", type=float, default=None, help="AdamW learning rate [the head's; affinity: 2e-4]."
)
@click.option(
    "--weight-decay",
    type=float,
    default=None,
    help="AdamW weight decay [the head's: affinity 1e-4, possam 0.05].",
)
@click.option("--seed", type=int, default=None, help="Seed of data order, flips and init [0].")
@click.option("--device", default=None, help="auto, cpu or cuda [auto].")
@click.option(
    "--ckpt-every", type=click.IntRange(min=1), default=None, help="Steps per checkpoint."
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option(
    "--allow-incomplete",
    is_flag=True,
    help="Train on an unfinished cache (precompute interrupted); the missing images are reported.",
)
@click.option(
    "--allow-other-dataset",
    is_flag=True,
    help="Accept a cache recorded as made from another dataset (the same images moved); image "
    "sizes are still checked.",
)
@click.option("--no-progress", is_flag=True)
def command(
    cache,
    dataset,
    out,
    split,
    dataset_name,
    head,
    config_file,
    preset,
    sets,
    clip_checkpoint,
    class_file,
    steps,
    epochs,
    batch_size,
    lr,
    weight_decay,
    seed,
    device,
    ckpt_every,
    resume,
    allow_incomplete,
    allow_other_dataset,
    no_progress,
):
    """Train a head on cached SAM patches and CLIP features (decoupled from the foundation models)."""
    from samcp.pipeline.train import TrainConfig, run_training

    values: dict = {}
    head_overrides: dict = {}
    if config_file is not None:
        doc = _load_yaml(config_file.read_text(), f"--config {config_file}") or {}
        if not isinstance(doc, dict):
            raise SamcpError(f"{config_file} must be a YAML mapping of TrainConfig fields")
        head_doc = doc.pop("head_config", None) or {}
        if not isinstance(head_doc, dict):
            raise SamcpError(f"{config_file}: head_config must be a mapping of head config fields")
        head_overrides.update(head_doc)
        # What the command line names (the data, the run folder) is not a run setting.
        cli_only = sorted(set(doc) & {"cache", "dataset", "out", "progress"})
        if cli_only:
            raise SamcpError(
                f"{config_file}: {', '.join(cli_only)} belong(s) on the command line "
                "(--cache, --dataset, --out, --no-progress), not in the run config"
            )
        unknown = sorted(set(doc) - {f.name for f in fields(TrainConfig)})
        if unknown:
            raise SamcpError(f"{config_file}: unknown keys {', '.join(unknown)}; see docs/train.md")
        values.update(doc)
    head_overrides.update(parse_sets(sets))
    cli_values = dict(
        split=split,
        dataset_name=dataset_name,
        head=head,
        preset=preset,
        clip_checkpoint=clip_checkpoint,
        classes=class_file,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        device=device,
        ckpt_every=ckpt_every,
    )
    if steps is not None or epochs is not None:  # the command line's length replaces the file's
        values.pop("steps", None)
        values.pop("epochs", None)
    values.update({k: v for k, v in cli_values.items() if v is not None})
    if values.get("lr_drop") is not None:
        drop = values["lr_drop"]
        values["lr_drop"] = tuple(drop) if isinstance(drop, (list, tuple)) else (drop,)
    yaml_overrides = values.get("head_overrides", {})
    if not isinstance(yaml_overrides, dict):
        raise SamcpError(f"{config_file}: head_overrides must be a mapping of head config fields")
    values["head_overrides"] = {**yaml_overrides, **head_overrides}
    if allow_incomplete:
        values["allow_incomplete"] = True
    if allow_other_dataset:
        values["allow_other_dataset"] = True
    try:
        cfg = TrainConfig(
            cache=cache, dataset=dataset, out=str(out), progress=not no_progress, **values
        )
    except TypeError as exc:  # a YAML value of the wrong shape (e.g. lr_drop: 0.8)
        raise SamcpError(f"bad run config: {exc}") from None
    summary = run_training(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    click.echo(f"run: {summary['run']}")
    click.echo(f"steps: {summary['steps_done']} ({summary['images_per_s']:.1f} images/s)")
    if summary["last"]:
        click.echo(f"last loss: {summary['last'].get('loss', float('nan')):.4f}")
