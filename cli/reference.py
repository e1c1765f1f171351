"""The command-line reference, docs/cli.md, rendered from the click commands themselves.

Regenerate it after changing any command or option::

    .venv/bin/python -m samcp.cli.reference > docs/cli.md

The page is a hand-written introduction (:data:`INTRO`), then one section per command: a
hand-written note with examples (:data:`NOTES`, optional), the command's own help text, its usage
line and a table of its arguments and options (names, type or choices, default, help) read from
the click objects. Nothing depends on the terminal, the environment or the machine, so the same
code always renders the same page; tests/test_cli_reference.py compares it with docs/cli.md.
"""

from __future__ import annotations

import enum
import inspect
import re
import sys
from collections.abc import Sequence

import click

REGENERATE = ".venv/bin/python -m samcp.cli.reference > docs/cli.md"

# Commands in the order a reader meets them (the data flow); others follow alphabetically.
ORDER = ("synth", "synth-clip", "precompute", "inspect", "viz", "train", "predict", "eval", "demo")

INTRO = f"""\
<!-- Generated from the click commands by `{REGENERATE}`.
     Edit cli/reference.py (the prose) or the commands (everything else), not this file. -->

# Command-line reference

Every samcp stage is a sub-command of `samcp`; `samcp COMMAND --help` (or `-h`) prints the same
help as the tables below, which are generated from the commands themselves.

## Exit status and errors

| status | when |
|---|---|
| 0 | the command finished |
| 2 | a user error: a missing or malformed file, a bad manifest, a mismatched checkpoint, an unknown image id, an output path that is a file or a folder samcp did not make; or a command line click rejects (unknown option, bad value) |
| 130 | interrupted (Ctrl-C) |

User errors are printed as one line starting with `error:`, without a traceback, and leave no
partial output behind. samcp writes, replaces or deletes only output folders it made itself (they
carry a `.samcp-output` marker; a proposal cache is recognised by its Zarr attributes): any other
non-empty folder is refused, with or without `--overwrite`.
"""

# Hand-written notes and examples per command, printed above the generated part.
NOTES = {
    "synth": """\
Writes a deterministic synthetic dataset in the exact COCO panoptic 2017 layout (images, panoptic
PNG + JSON, semantic PNGs, `classes.txt`), so every stage runs end to end without downloading COCO;
the same seed gives byte-identical files.

```bash
samcp synth data/synth --num-train 40 --num-val 20
```
""",
    "precompute": """\
Runs a proposal generator (SAM everything mode, SLIC superpixels, or imported SA-1B/COCO-RLE JSON)
over a COCO-layout dataset or a JSONL manifest, optionally with frozen CLIP features and SAM
embeddings, and writes the proposal cache ([cache-format.md](cache-format.md)). It runs on a local
Ray instance by default, joins a cluster with `--ray-address` ([cluster.md](cluster.md)), and
resumes when re-run with the same arguments.

```bash
samcp precompute /data/coco --split val2017 --out cache/coco_val2017.zarr \\
    --sam-model vit_h --sam-checkpoint checkpoints/sam_vit_h_4b8939.pth
```
""",
    "inspect": """\
Summarises a cache with Dask over its shards: images and failed rows (with reasons), masks per
image (min/median/max and a histogram), mask areas as a fraction of the image (percentiles and a
histogram), on-disk bytes per array, the models and parameters recorded in the root attributes,
and incomplete or never-started shards. `--json` prints the same content as JSON.

```bash
samcp inspect cache/coco_val2017.zarr
samcp inspect cache/coco_val2017.zarr --json | jq .masks.per_image
```
""",
    "viz": """\
Proposal colours are fixed per mask index; segment colours (`--pred`, `--gt`) are chosen per
segment to stand out from the image under it, so a prediction stays visible even on a dataset
painted in its class colours. The image is found through the dataset recorded in the cache
(`dataset_source`); `--image-root` points elsewhere, and when no file is found the masks are drawn
on a grey canvas with a warning.

```bash
samcp viz cache/coco_val2017.zarr 139 --out 139.png
samcp viz cache/coco_val2017.zarr --grid --num 16 --out grid.png
samcp viz cache/coco_val2017.zarr 139 --pred preds/ --out 139_pred.png
samcp viz cache/coco_val2017.zarr 139 --gt /data/coco --pred preds/ --out 139_gt_pred.png
```
""",
    "train": """\
Trains a head (SAM-CP affinity decoder, ...) on the cached proposals and CLIP features, without
running SAM or CLIP again; `--resume` continues a run from its last checkpoint. See
[train.md](train.md).
""",
    "predict": """\
Runs a trained head over a cache and writes COCO panoptic PNG + JSON, semantic label PNGs and COCO
instance results, optionally with an open vocabulary. See [predict.md](predict.md).
""",
    "eval": """\
Computes PQ/SQ/RQ (panopticapi's rules), mIoU and mask AP for a prediction folder, for a trained
run on a cache, or, with `--oracle`, the ceiling the cached proposals allow. See
[eval.md](eval.md).
""",
    "demo": """\
The embedded end-to-end run behind `make demo`; it needs no downloads and runs on a CPU.

```bash
samcp demo --out demo_out
```
""",
}


def render_reference(group: click.Group | None = None) -> str:
    """The whole reference page (Markdown) for ``group``, by default the ``samcp`` command.

    Args:
        group: the click group to document.

    Returns:
        The page, ending with a newline.
    """
    if group is None:
        from samcp.cli.main import cli as group
    root = _context(group, "samcp")
    parts = [INTRO, _render_group(group, root)]
    for name in ordered_commands(group):
        parts.append(render_command(group.commands[name], name, root))
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def ordered_commands(group: click.Group) -> list[str]:
    """The group's visible command names: those of :data:`ORDER` first, then the rest by name."""
    names = [n for n, c in group.commands.items() if not c.hidden]
    known = [n for n in ORDER if n in names]
    return known + sorted(n for n in names if n not in ORDER)


def render_command(command: click.Command, name: str, parent: click.Context | None = None) -> str:
    """One command's section: note, help text, usage, arguments and options.

    Args:
        command: the click command.
        name: its name under ``samcp``.
        parent: the group's context (for the usage line and inherited settings).
    """
    ctx = _context(command, name, parent)
    lines = [f"## samcp {name}", ""]
    if name in NOTES:
        lines += [NOTES[name].rstrip("\n"), ""]
    text = help_text(command)
    if text:
        lines += [text, ""]
    usage = " ".join(["samcp", name, *command.collect_usage_pieces(ctx)])
    lines += ["```text", f"Usage: {usage}", "```", ""]
    params = [p for p in command.get_params(ctx) if not _is_help(p, command, ctx)]
    arguments = [p for p in params if isinstance(p, click.Argument)]
    options = [p for p in params if isinstance(p, click.Option) and not p.hidden]
    if arguments:
        lines += ["| argument | type | required |", "|---|---|---|"]
        for p in arguments:
            metavar = (p.metavar or (p.name or "").upper()) + ("..." if p.nargs == -1 else "")
            lines.append(
                f"| `{metavar}` | {_cell(describe_type(p))} | {'yes' if p.required else 'no'} |"
            )
        lines.append("")
    if options:
        lines += ["| option | type | default | description |", "|---|---|---|---|"]
        for p in options:
            names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
            lines.append(
                f"| {names} | {_cell(describe_type(p))} | {_cell(describe_default(p, ctx))} | "
                f"{_cell(p.help or '')} |"
            )
        lines.append("")
    return "\n".join(lines)


def help_text(command: click.Command) -> str:
    """A command's help as Markdown paragraphs (click's ``\\f`` cut and ``\\b`` blocks honoured)."""
    raw = inspect.cleandoc(command.help or "").partition("\f")[0]
    out = []
    for para in re.split(r"\n\s*\n", raw.strip()):
        if not para:
            continue
        if para.startswith("\b\n"):  # click keeps such a paragraph's line breaks
            out.append("```text\n" + para[2:] + "\n```")
        else:
            out.append(_escape(" ".join(line.strip() for line in para.splitlines())))
    return "\n\n".join(out)


def describe_type(param: click.Parameter) -> str:
    """The value a parameter takes, in words: ``flag``, choices, ``integer >= 0``, ``path``..."""
    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    t = param.type
    if isinstance(t, click.Choice):
        text = " | ".join(f"`{c.name if isinstance(c, enum.Enum) else c}`" for c in t.choices)
    elif isinstance(t, (click.IntRange, click.FloatRange)):
        text = ("integer" if isinstance(t, click.IntRange) else "float") + _range(t)
    elif isinstance(t, click.Path):
        text = "file" if not t.dir_okay else "folder" if not t.file_okay else "path"
    elif isinstance(t, click.Tuple):
        text = " ".join(x.name for x in t.types)
    elif param.metavar:
        text = f"`{param.metavar}`"
    else:
        text = t.name
    if param.multiple:
        text += ", repeatable"
    return text


def describe_default(param: click.Option, ctx: click.Context) -> str:
    """The option's default as the parser would use it; ``required`` or empty when there is none.

    The value comes from the option's definition only (never from the environment), and a
    callable default is shown as ``(dynamic)`` instead of being called.
    """
    if param.required:
        return "required"
    value = param.get_default(ctx, call=False)
    if callable(value):
        return "(dynamic)"
    if param.is_flag and param.is_bool_flag:
        if not param.secondary_opts:
            return ""
        return f"`{(param.opts if value else param.secondary_opts)[0]}`"
    if isinstance(value, enum.Enum) and type(value).__module__.startswith("click"):
        return ""  # click's own "no default" sentinel (click >= 8.3)
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return ""
    if isinstance(value, enum.Enum):
        value = value.name
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    text = str(value)
    return f"`{text}`" if text else '`""`'


def _context(
    command: click.Command, name: str, parent: click.Context | None = None
) -> click.Context:
    # Fixed widths so nothing click derives from the terminal could enter the page.
    settings = {
        **command.context_settings,
        "terminal_width": 100,
        "max_content_width": 100,
        "resilient_parsing": True,
    }
    return click.Context(command, info_name=name, parent=parent, **settings)


def _render_group(group: click.Group, ctx: click.Context) -> str:
    lines = ["## samcp", ""]
    text = help_text(group)
    if text:
        lines += [text, ""]
    usage = " ".join(["samcp", *group.collect_usage_pieces(ctx)])
    lines += ["```text", f"Usage: {usage}", "```", ""]
    options = [p for p in group.get_params(ctx) if isinstance(p, click.Option) and not p.hidden]
    if options:
        lines += ["| option | description |", "|---|---|"]
        for p in options:
            names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
            lines.append(f"| {names} | {_cell(p.help or '')} |")
        lines.append("")
    lines += ["| command | summary |", "|---|---|"]
    for name in ordered_commands(group):
        summary = group.commands[name].get_short_help_str(limit=1000)
        lines.append(f"| [`{name}`](#samcp-{name}) | {_cell(summary)} |")
    return "\n".join(lines)


def _is_help(param: click.Parameter, command: click.Command, ctx: click.Context) -> bool:
    helper = command.get_help_option(ctx)
    return helper is not None and param is helper


def _range(t: click.IntRange | click.FloatRange) -> str:
    """`` >= 0``, `` < 1.0``, `` in [0.0, 1.0]``, or nothing for an unbounded range."""
    if t.min is not None and t.max is not None:
        return f" in {'(' if t.min_open else '['}{t.min}, {t.max}{')' if t.max_open else ']'}"
    if t.min is not None:
        return f" {'>' if t.min_open else '>='} {t.min}"
    if t.max is not None:
        return f" {'<' if t.max_open else '<='} {t.max}"
    return ""


def _escape(text: str, table: bool = False) -> str:
    """Escapes what Markdown would eat (``<tag>``, ``*``, ``|``) outside code spans; in a table
    cell, a ``|`` inside a code span too (GitHub's tables split on it otherwise)."""
    parts = text.split("`")
    for i, part in enumerate(parts):
        if i % 2 == 0:
            parts[i] = re.sub(r"([\\<*|])", r"\\\1", part)
        elif table:
            parts[i] = part.replace("|", "\\|")
    return "`".join(parts)


def _cell(text: str) -> str:
    """Text for one Markdown table cell: one line, escaped."""
    return _escape(" ".join(text.split()), table=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the reference (UTF-8) to stdout: ``python -m samcp.cli.reference > docs/cli.md``."""
    if argv is None:
        argv = sys.argv[1:]
    if argv:
        sys.stderr.write(f"usage: {REGENERATE}\n")
        sys.exit(2)
    sys.stdout.buffer.write(render_reference().encode("utf-8"))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
