"""The `samcp` command. Each sub-command lives in its own module under samcp.cli."""

from __future__ import annotations

import importlib
import sys

import click

from samcp.pipeline.errors import expected_error_message

# Sub-command modules; each defines a click command called `command`.
_COMMAND_MODULES = [
    "synth",
    "synth_clip",
    "eval",
    "precompute",
    "demo",
    "train",
    "predict",
    "inspect",
    "viz",
    "segment",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="samcp")
def cli() -> None:
    """samcp: SAM proposals, cached CLIP features and lightweight open-vocabulary heads."""


for _name in _COMMAND_MODULES:
    cli.add_command(importlib.import_module(f"samcp.cli.{_name}").command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI; expected errors (samcp's own, the user's files and paths) become
    one line on stderr and exit code 2, a bug keeps its traceback."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        message = expected_error_message(exc)
        if message is None:
            raise
        click.echo(f"error: {message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
