"""`longtrain plan RECIPE --world-size N`: validate a layout and estimate memory per rank, without devices.

    longtrain plan recipes/hybrid-1b-128k.yaml --world-size 8 [section.key=value ...]
Prints the rank -> (tp, cp, dp, pp) map, parameters and memory per rank, and the pipeline stage
balance; a bad layout is one line on stderr and exit status 2 (see trainer/parallel/plan.py).
"""
from __future__ import annotations


def cmd_plan(args) -> int:
    from longtrain.trainer.config import load_recipe
    from longtrain.trainer.parallel.plan import build_plan, format_plan

    recipe = load_recipe(args.recipe, args.overrides)
    plan = build_plan(recipe, args.world_size)
    print(format_plan(recipe, plan, max_rank_lines=args.rank_lines))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="check a recipe's parallel layout and estimate memory per rank (no devices)")
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of processes (default: parallel.tp*pp*cp*dp from the recipe)")
    p.add_argument("--rank-lines", type=int, default=64, help="print at most this many ranks of the rank map")
    p.set_defaults(func=cmd_plan)
