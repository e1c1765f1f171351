"""`samcp inspect`: what is in a proposal cache (images, failures, masks, areas, bytes, models)."""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("cache", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of text.")
@click.option(
    "--max-failures",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    help="List at most this many failed images with their reasons (all are counted).",
)
@click.option(
    "--scheduler",
    type=click.Choice(["threads", "synchronous"]),
    default="threads",
    show_default=True,
    help="Dask scheduler for the per-shard statistics.",
)
def command(cache: str, as_json: bool, max_failures: int, scheduler: str) -> None:
    """Summarise the proposal cache CACHE: images, failed rows, masks per image, mask areas,
    on-disk bytes per array, models and parameters, and incomplete shards."""
    from samcp.pipeline.inspect import summarize_cache

    summary = summarize_cache(cache, max_failures=max_failures, scheduler=scheduler)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    for line in summary.lines():
        click.echo(line)
