"""`longtrain data prepare RECIPE [section.key=value ...] [--workers N]`: tokenize a recipe's corpus into the
shards its runs read (RUN_DIR/data), before training and apart from it (trainer/data/prepare.py).

`train` runs the same step with one worker when the shards are missing; running it first lets the
tokenization use N processes, resume after a kill, and finish before any GPU is held.
"""
from __future__ import annotations

from longtrain.trainer.errors import LongtrainError


def cmd_prepare(args) -> int:
    from longtrain.launch.cli import _split_recipe
    from longtrain.trainer.config import load_recipe
    from longtrain.trainer.data.prepare import prepare_data

    if args.workers < 1:  # before the recipe is read: nothing starts with a bad count
        raise LongtrainError(f"--workers {args.workers}: give 1 or more worker processes")
    recipe_path, overrides = _split_recipe(args.recipe, args.overrides)
    recipe = load_recipe(recipe_path, overrides)
    if recipe.data.task != "text":
        raise LongtrainError(f"data.task={recipe.data.task!r} is generated while training: there is nothing to "
                             "prepare (data prepare serves data.task=text)")
    data_dir = recipe.run_dir / "data"
    done = prepare_data(recipe.data, data_dir, seed=recipe.run.seed, workers=args.workers)
    meta = done.shards.meta
    tokens = meta["tokens"]["train"] + meta["tokens"]["eval"]
    if done.reused:
        print(f"{data_dir}: already prepared for these data settings ({tokens:,} tokens)")
        return 0
    rate = done.characters / max(done.seconds, 1e-9) / 1e6
    print(f"{data_dir}: {meta['documents']:,} documents, {tokens:,} tokens ({meta['tokens']['eval']:,} held out) "
          f"in {done.units} work units ({done.skipped} kept from an earlier run), {done.seconds:.1f} s, "
          f"{rate:.1f} M characters/s with {args.workers} worker{'s' if args.workers > 1 else ''}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare a recipe's token shards")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("prepare", help="tokenize data.corpus into RUN_DIR/data (streaming, parallel, resumable)")
    a.add_argument("recipe", nargs="?", help="YAML recipe (default: the packaged quickstart.yaml)")
    a.add_argument("overrides", nargs="*", help="section.key=value overrides")
    a.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1); the shards are "
                   "byte-identical whatever the number")
    a.set_defaults(func=cmd_prepare)
