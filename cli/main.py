"""The `samcp` command. Each sub-command lives in its own module under samcp.cli."""

from __future__ import annotations

import importlib
import sys

import click

from samcp.pipeline.errors import SamcpError

# Sub-command modules; each defines a click command called `command`.
_COMMAND_MODULES = [
    "synth",
    "eval",
    "precompute",
    "demo",
    "train",
    "predict",
    "inspect",
    "viz",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="samcp")
def cli() -> None:
    """samcp: SAM proposals, cached CLIP features and lightweight open-vocabulary heads."""


for _name in _COMMAND_MODULES:
    cli.add_command(importlib.import_module(f"samcp.cli.{_name}").command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning SamcpError into a one-line message and exit code 2."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except SamcpError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
