"""The `longtrain` command.

    longtrain train [RECIPE] [--resume auto|PATH | --overwrite] [section.key=value ...]
    longtrain plan RECIPE [--world-size N] [section.key=value ...]
    longtrain data prepare RECIPE [--workers N] [section.key=value ...]
    longtrain eval CKPT [--task perplexity|passkey|mqar] [--lengths 1x,2x,4x]
    longtrain generate CKPT [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-p P]
    longtrain report RUN_DIR
    longtrain launch ray [RECIPE] [--address ADDR] [--num-workers N] [--gpus-per-worker G] [section.key=value ...]
With no RECIPE, trains the quickstart recipe shipped with the package. Overrides may come before,
between or after the options. Errors in user input are printed as one line (no traceback) and exit
with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from longtrain.launch.ckpt import add_parser as add_ckpt_parser
from longtrain.launch.data import add_parser as add_data_parser
from longtrain.launch.evaluate import add_parsers as add_evaluate_parsers
from longtrain.launch.plan import add_parser as add_plan_parser
from longtrain.launch.ray_launch import add_parser as add_launch_parser
from longtrain.launch.report import add_parser as add_report_parser
from longtrain.trainer.errors import LongtrainError


class IntermixedParser(argparse.ArgumentParser):
    """A parser whose subcommands take positionals anywhere among the options.

    Plain argparse fills `recipe` and `overrides` from the first run of positionals only, so in
    `longtrain plan R --world-size 4 parallel.tp=2` the override after the option is "unrecognized".
    `parse_known_intermixed_args` parses the options first and the positionals from what is left,
    so an option's value (`--prompt "a=b"`, `--address ray://host:10001`) stays the option's. It
    refuses parsers that hold subcommands, so those (the top level, `launch`, `ckpt`) parse as usual
    and hand their tail to a subcommand's parser, which is of this class too (add_subparsers uses
    the parent's class).
    """

    _inside = False  # parse_known_intermixed_args calls parse_known_args itself (Python <= 3.12)

    def parse_known_args(self, args=None, namespace=None):
        if self._inside or not self._intermixable():
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False

    def _intermixable(self) -> bool:
        """What parse_known_intermixed_args accepts: no subcommands or REMAINDER positionals, and no
        positional inside a mutually exclusive group."""
        positionals = self._get_positional_actions()
        grouped = {action for group in self._mutually_exclusive_groups for action in group._group_actions}
        return not any(a.nargs in (argparse.PARSER, argparse.REMAINDER) or a in grouped for a in positionals)


def _split_recipe(args_recipe, overrides):
    """`longtrain train train.steps=5` has no recipe path: the first positional is an override."""
    if args_recipe is not None and "=" in args_recipe and not os.path.exists(args_recipe):
        return None, [args_recipe, *overrides]
    return args_recipe, list(overrides)


def cmd_train(args) -> int:
    from longtrain.trainer.config import load_recipe
    from longtrain.trainer.loop import train

    recipe_path, overrides = _split_recipe(args.recipe, args.overrides)
    recipe = load_recipe(recipe_path, overrides)
    train(recipe, resume=args.resume, overwrite=args.overwrite)
    return 0


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a recipe (default: the quickstart recipe)")
    p.add_argument("recipe", nargs="?", help="YAML recipe (default: the packaged quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in the run dir) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run dir that holds an earlier run's checkpoints or metrics (they are removed)")
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = IntermixedParser(prog="longtrain", description="Train long-context hybrid language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_plan_parser(sub)
    add_ckpt_parser(sub)
    add_data_parser(sub)
    add_evaluate_parsers(sub)
    add_report_parser(sub)
    add_launch_parser(sub)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LongtrainError as e:
        print(f"longtrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
