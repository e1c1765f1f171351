"""`samcp demo`: the embedded end-to-end run behind `make demo`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option(
    "--out",
    default="demo_out",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where the demo writes its dataset, caches and results (re-runs resume).",
)
@click.option(
    "--num-workers",
    default=2,
    show_default=True,
    type=click.IntRange(min=0),
    help="Ray CPU workers for precompute (0: in-process).",
)
def command(out: Path, num_workers: int) -> None:
    """Synthetic data -> precompute on local Ray -> cache summary -> proposal-oracle metrics."""
    from samcp.pipeline.demo import run_demo

    run_demo(out, echo=click.echo, num_workers=num_workers)
