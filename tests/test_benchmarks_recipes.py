"""manifests/examples/recipe-*.yaml: every command is a samcp command with existing flags, and
every benchmark and head it names is registered."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from samcp.cli.main import cli
from samcp.pipeline.benchmarks import BENCHMARKS

EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples"
RECIPES = sorted(EXAMPLES.glob("recipe-*.yaml"))
_HELP: dict[str, str] = {}


def _help(sub: str) -> str:
    if sub not in _HELP:
        res = CliRunner().invoke(cli, [sub, "--help"], terminal_width=200)
        assert res.exit_code == 0, res.output
        _HELP[sub] = res.output
    return _HELP[sub]


def _has_option(help_text: str, flag: str) -> bool:
    return re.search(rf"(^|[\s,]){re.escape(flag)}(\s|$)", help_text, re.M) is not None


def test_the_four_cross_dataset_recipes_exist():
    names = {yaml.safe_load(p.read_text())["recipe"] for p in RECIPES}
    assert {"coco-to-ade20k-150", "coco-to-semantic", "coco-stuff-to-semantic",
            "coco-to-cityscapes"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_commands_use_existing_flags_benchmarks_and_heads(path):
    from samcp.models.registry import list_heads

    doc = yaml.safe_load(path.read_text())
    assert {"recipe", "task", "train_on", "evaluate_on", "metrics", "steps"} <= set(doc)
    assert doc["task"] in ("panoptic", "semantic")
    for name in [doc["train_on"], *doc["evaluate_on"]]:
        assert name in BENCHMARKS, f"{path.name}: unknown benchmark {name}"
    evaluated = set()
    for step in doc["steps"]:
        argv = shlex.split(step["run"])
        assert argv[0] == "samcp" and argv[1] in ("precompute", "train", "predict", "eval"), argv
        text = _help(argv[1])
        for flag in [a for a in argv if a.startswith("--")]:
            assert _has_option(text, flag), f"{path.name}: {flag} is not a `samcp {argv[1]}` option"
        if "--dataset" in argv and argv[1] != "train":
            value = argv[argv.index("--dataset") + 1]
            assert value in BENCHMARKS, f"{path.name}: --dataset {value}"
            if argv[1] == "eval":
                evaluated.add(value)
        if "--head" in argv:
            assert argv[argv.index("--head") + 1] in list_heads()
        for flag in ("--out", "--gt", "--pred", "--cache", "--run"):
            if flag in argv:
                assert argv[argv.index(flag) + 1].startswith("/data/")
    assert evaluated <= set(doc["evaluate_on"])
    assert evaluated, f"{path.name}: no eval step"
