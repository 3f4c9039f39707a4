"""Command lines parse as documented: `section.key=value` overrides anywhere among the options, option
values that hold '=' stay option values, and every `longtrain ...` line in README.md parses.

Everything here calls the parser in-process (launch/cli.py build_parser); nothing trains. The one
command that runs is `longtrain plan`, which needs no devices.
"""
import re
import runpy
import shlex
import sys

import pytest

from conftest import REPO
from longtrain.launch import cli
from longtrain.launch.cli import build_parser

RECIPE = "recipes/quickstart.yaml"


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv", [
    ["train", RECIPE, "train.steps=5", "--resume", "auto"],
    ["train", RECIPE, "--resume", "auto", "train.steps=5"],
    ["train", "--resume", "auto", RECIPE, "train.steps=5"],
])
def test_train_overrides_before_or_after_resume(argv):
    args = parse(*argv)
    assert (args.recipe, args.overrides, args.resume, args.overwrite) == (RECIPE, ["train.steps=5"], "auto", False)


@pytest.mark.parametrize("argv", [
    ["train", "train.steps=5", "--resume", "auto"],
    ["train", "--resume", "auto", "train.steps=5"],
    ["train", "train.steps=5", "--resume", "auto", "model.pattern=MMAF"],
])
def test_train_without_recipe_takes_the_first_override(argv):
    """No recipe path: the first positional is an override (`_split_recipe`), wherever the options are."""
    args = parse(*argv)
    recipe, overrides = cli._split_recipe(args.recipe, args.overrides)
    assert recipe is None and overrides[0] == "train.steps=5" and args.resume == "auto"
    assert overrides == [arg for arg in argv if "=" in arg]


def test_train_overwrite_flag():
    args = parse("train", RECIPE, "--overwrite", "train.steps=5")
    assert args.overwrite and args.resume is None and args.overrides == ["train.steps=5"]


def test_plan_overrides_after_options():
    args = parse("plan", RECIPE, "--world-size", "4", "parallel.tp=2", "--rank-lines", "8", "parallel.cp=2")
    assert (args.recipe, args.world_size, args.rank_lines) == (RECIPE, 4, 8)
    assert args.overrides == ["parallel.tp=2", "parallel.cp=2"]


def test_plan_runs_with_overrides_after_options(capsys):
    """The documented form end to end: the overrides after --world-size reach the layout."""
    assert cli.main(["plan", str(REPO / RECIPE), "--world-size", "4", "parallel.tp=2", "parallel.dp=2"]) == 0
    assert "world 4 = tp 2 x cp 1 x dp 2 x pp 1" in capsys.readouterr().out
    assert cli.main(["plan", str(REPO / RECIPE), "--world-size", "2", "parallel.dp=3"]) == 2
    assert "parallel.dp=3" in capsys.readouterr().err


@pytest.mark.parametrize("argv, recipe, overrides", [
    (["R.yaml", "--num-workers", "2", "train.steps=5"], "R.yaml", ["train.steps=5"]),
    (["R.yaml", "train.steps=5", "--num-workers", "2", "--resume", "auto", "train.lr=1e-3"], "R.yaml",
     ["train.steps=5", "train.lr=1e-3"]),
    (["--num-workers", "2", "train.steps=5"], "train.steps=5", []),
])
def test_launch_ray_overrides_anywhere(argv, recipe, overrides):
    args = parse("launch", "ray", *argv)
    assert (args.recipe, args.overrides, args.num_workers) == (recipe, overrides, 2)


def test_launch_ray_overwrite_and_address_with_colons():
    args = parse("launch", "ray", "R.yaml", "--address", "ray://host:10001", "train.steps=5", "--overwrite")
    assert args.address == "ray://host:10001" and args.overrides == ["train.steps=5"] and args.overwrite
    args = parse("launch", "ray", "--status", "raysubmit_X", "--address", "http://HEAD:8265")
    assert (args.recipe, args.status, args.address) == (None, "raysubmit_X", "http://HEAD:8265")


@pytest.mark.parametrize("prompt", ["a=b", "x.y=1", "def f(a=1):"])
def test_option_values_with_equals_stay_option_values(prompt):
    args = parse("generate", "runs/x", "--prompt", prompt, "--max-new-tokens", "4")
    assert args.prompt == prompt and args.checkpoint == "runs/x"
    args = parse("generate", "runs/x", f"--prompt={prompt}")
    assert args.prompt == prompt
    args = parse("train", RECIPE, "--resume", "runs/a=b/checkpoints/step_00000004", "train.steps=5")
    assert args.resume == "runs/a=b/checkpoints/step_00000004" and args.overrides == ["train.steps=5"]


def test_unknown_option_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("plan", RECIPE, "--world-sise", "4", "parallel.tp=2")
    assert exit_info.value.code == 2 and "--world-sise" in capsys.readouterr().err


@pytest.mark.parametrize("argv, resume, overwrite", [
    (["R.yaml", "--resume", "auto", "train.steps=5"], "auto", False),
    (["R.yaml", "train.steps=5", "--resume", "auto"], "auto", False),
    (["R.yaml", "--overwrite", "train.steps=5"], None, True),
])
def test_torchrun_entry_parses_like_train(monkeypatch, argv, resume, overwrite):
    """`torchrun ... -m longtrain.launch.torchrun R --resume auto train.steps=5`: the module, run as torchrun
    runs it, hands its argv to `longtrain train` (training itself is replaced by a recorder)."""
    seen = {}
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.update(vars(args)) or 0)
    monkeypatch.setattr(sys, "argv", ["torchrun.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("longtrain.launch.torchrun", run_name="__main__")
    assert exit_info.value.code == 0
    assert (seen["recipe"], seen["overrides"], seen["resume"], seen["overwrite"]) == \
        ("R.yaml", ["train.steps=5"], resume, overwrite)


def readme_commands() -> list[str]:
    """Every `longtrain ...` command line in README.md's code blocks, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("longtrain "):
                commands.append(line)
    return commands


def test_readme_documents_commands():
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("line", readme_commands(), ids=lambda line: shlex.join(shlex.split(line, comments=True)))
def test_readme_command_parses(line):
    argv = shlex.split(line, comments=True)
    assert argv[0] == "longtrain"
    args = build_parser().parse_args(argv[1:])
    assert callable(args.func)
    assert all("=" in override for override in getattr(args, "overrides", []))
