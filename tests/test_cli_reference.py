"""docs/cli.md is generated from the click commands: it equals the generator's output, documents
every command and option, and its hand-written prose names only options that exist."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from samcp.cli.main import cli
from samcp.cli.reference import (
    INTRO,
    NOTES,
    REGENERATE,
    main,
    ordered_commands,
    render_command,
    render_reference,
)

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _option_names(command: click.Command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


def _sections(text: str) -> dict[str, str]:
    """``name -> section text`` for every ``## samcp NAME`` heading."""
    parts = re.split(r"^## samcp ?(\S*)\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_docs_cli_md_is_up_to_date():
    want = render_reference()
    have = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert have == want, (
        "docs/cli.md differs from the click commands; regenerate it with\n\n"
        f"    {REGENERATE}\n\n"
        "(edit the prose in cli/reference.py, never docs/cli.md by hand)"
    )


def test_every_command_and_option_is_in_the_reference():
    sections = _sections(render_reference())
    assert list(sections) == ["", *ordered_commands(cli)]
    assert set(ordered_commands(cli)) == {n for n, c in cli.commands.items() if not c.hidden}
    for name in ordered_commands(cli):
        command = cli.commands[name]
        table = sections[name]
        rows = [line for line in table.splitlines() if line.startswith("| `-")]
        documented = {o for row in rows for o in re.findall(r"`(-[^`]+)`", row.split(" | ")[0])}
        assert documented == _option_names(command) - {"-h", "--help"}, name
        assert f"[`{name}`](#samcp-{name})" in sections[""]


def test_hand_written_prose_names_only_real_options_and_pages():
    assert set(NOTES) <= set(cli.commands)
    everywhere = {"--help", "-h", "--version"}
    for name, note in NOTES.items():
        for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", note):
            assert opt in _option_names(cli.commands[name]) | everywhere, (name, opt)
    all_options = set().union(*(_option_names(c) for c in cli.commands.values())) | everywhere
    for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", INTRO):
        assert opt in all_options, opt
    for page in re.findall(r"\]\(([\w.-]+\.md)\)", render_reference()):
        assert (DOCS / page).is_file(), page


def test_output_does_not_depend_on_the_terminal_or_environment(monkeypatch):
    want = render_reference()
    monkeypatch.setenv("COLUMNS", "20")
    monkeypatch.setenv("LINES", "5")
    monkeypatch.setenv("SAMCP_CACHE_DIR", "/elsewhere")
    monkeypatch.setenv("SAM_CHECKPOINT", "/x/sam.pth")
    assert render_reference() == want


def test_module_main_prints_the_reference(capsysbinary):
    main([])
    assert capsysbinary.readouterr().out.decode("utf-8") == render_reference()
    with pytest.raises(SystemExit) as e:
        main(["extra"])
    assert e.value.code == 2


def test_rendering_of_a_known_command():
    @click.command("toy")
    @click.argument("src", type=click.Path(dir_okay=False))
    @click.argument("rest", nargs=-1)
    @click.option("--out", "-o", required=True, help="Where <it> goes.")
    @click.option("--mode", type=click.Choice(["a|b", "c"]), default="c", show_default=True)
    @click.option("--n", type=click.IntRange(min=1), default=3)
    @click.option("--p", type=click.FloatRange(0.0, 1.0, max_open=True))
    @click.option("--dir", type=click.Path(file_okay=False), default=lambda: "cwd")
    @click.option("--tag", multiple=True, metavar="K=V", help="Repeat *me*, `a|b` too.")
    @click.option("--color/--no-color", default=True)
    @click.option("--quiet", is_flag=True, help="Say less.")
    @click.option("--secret", hidden=True)
    def toy(**_):
        """First line of help.

        \b
        keep
          these lines
        \f
        Not for users.
        """

    parent = click.Context(click.Group("samcp"), info_name="samcp")
    assert render_command(toy, "toy", parent) == "\n".join(
        [
            "## samcp toy",
            "",
            "First line of help.",
            "",
            "```text",
            "keep",
            "  these lines",
            "```",
            "",
            "```text",
            "Usage: samcp toy [OPTIONS] SRC [REST]...",
            "```",
            "",
            "| argument | type | required |",
            "|---|---|---|",
            "| `SRC` | file | yes |",
            "| `REST...` | text | no |",
            "",
            "| option | type | default | description |",
            "|---|---|---|---|",
            "| `--out`, `-o` | text | required | Where \\<it> goes. |",
            "| `--mode` | `a\\|b` \\| `c` | `c` |  |",
            "| `--n` | integer >= 1 | `3` |  |",
            "| `--p` | float in [0.0, 1.0) |  |  |",
            "| `--dir` | folder | (dynamic) |  |",
            "| `--tag` | `K=V`, repeatable |  | Repeat \\*me\\*, `a\\|b` too. |",
            "| `--color`, `--no-color` | flag | `--color` |  |",
            "| `--quiet` | flag |  | Say less. |",
            "",
        ]
    )


def test_commands_follow_the_data_flow_then_the_alphabet():
    group = click.Group(
        "g", commands=[click.Command(n) for n in ("zeta", "eval", "alpha", "synth")]
    )
    assert ordered_commands(group) == ["synth", "eval", "alpha", "zeta"]
