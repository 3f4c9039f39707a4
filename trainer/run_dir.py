"""Whether a run may start in a run directory, or resume from a checkpoint; `--overwrite` clears it.

A run directory holds one run. Starting over an earlier run's outputs would mix the two (metrics.jsonl
appended to, its step directories replaced, keep_last deleting the newer run's checkpoints), so it is
refused unless the user asks to continue (`--resume`) or to start over (`--overwrite`). A resume is
refused when the checkpoint's model or tokenizer is not the recipe's: its weights would load into
another architecture (silently, when only the pattern's tail changed), or its token ids would mean
other pieces. Everything here reads manifests and recipes only: it runs before any model, tokenizer
or process group exists.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from longtrain.trainer import checkpoint as ckpt
from longtrain.trainer.config import Recipe
from longtrain.trainer.errors import LongtrainError

# Fields whose change makes a checkpoint another model: parameter shapes or their meaning.
# rope_theta / rope_scaling (length extension), init_std, norm_eps and the ODE solver settings may change.
ARCHITECTURE = ("model.pattern", "model.d_model", "model.n_heads", "model.n_kv_heads", "model.mlp_ratio",
                "model.vocab_size", "model.d_state", "model.d_conv", "model.expand", "model.tie_embeddings",
                "model.ode.sublayer", "data.task")
TOKENS = {"text": ("data.tokenizer.vocab_size", "data.tokenizer.model_type", "data.tokenizer.path"),
          "mqar": ("data.mqar.keys", "data.mqar.values")}  # what decides the token ids of each data.task
# An earlier run's outputs, in the order --overwrite removes them: checkpoints first, so an interrupted
# clear leaves metrics without checkpoints, which is still refused without --overwrite. data/ stays: it
# is a cache keyed by its settings (trainer/data/shards.py), prepared again when they differ.
OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "eval", "sample.txt")
TRASH = ".overwritten-"


def claim(recipe: Recipe, resume: str | None, resume_from: Path | None, overwrite: bool = False,
          rank: int = 0) -> None:
    """Refuse a run that would mix with an earlier run's outputs or resume another model; with overwrite,
    rank 0 clears the earlier run first. resume_from: what ckpt.resolve made of `resume`. Every rank may
    call it: it reads only what an earlier run left (rank 0 writes nothing before the process group exists
    but recipe.yaml and data/, which it ignores)."""
    run_dir = recipe.run_dir
    asked_resume = resume not in (None, "", "none")
    if overwrite and asked_resume:
        raise LongtrainError(f"--overwrite starts {run_dir} over and --resume {resume} continues it: pass one of them")
    if overwrite and rank != 0:
        return  # rank 0 decides and clears; reading while it renames could see half
    if resume_from is not None:
        check_same_model(recipe, resume_from)
        _check_own_checkpoint(run_dir, resume, resume_from)
        return
    if asked_resume:
        return  # --resume auto found no step directory at all (ckpt.resolve): starting fresh is what was asked
    earlier = earlier_run(run_dir)
    if earlier is None:
        return
    if not overwrite:
        has_checkpoints = bool(ckpt.step_dirs(run_dir / "checkpoints"))
        fix = ("add --resume auto, choose another run.dir, or pass --overwrite" if has_checkpoints
               else "choose another run.dir, or pass --overwrite to start over")
        raise LongtrainError(f"run dir {run_dir} already holds {earlier}: {fix}")
    removed = clear(run_dir)
    print(f"overwrite: removed {earlier} ({', '.join(removed)}) from {run_dir}", flush=True)


def earlier_run(run_dir: Path) -> str | None:
    """What an earlier run left in run_dir, in words, or None when nothing (recipe.yaml and data/ aside)."""
    steps = ckpt.step_dirs(run_dir / "checkpoints")
    if steps:
        return f"checkpoints up to step {ckpt.step_of(steps[-1])}"
    logs = [name for name in ("metrics.jsonl", "tensorboard")
            if (run_dir / name).is_file() and (run_dir / name).stat().st_size
            or (run_dir / name).is_dir() and any((run_dir / name).iterdir())]
    if logs:
        return f"the {' and '.join(logs)} of an earlier run that stopped before its first checkpoint"
    return None


def clear(run_dir: Path) -> list[str]:
    """Remove an earlier run's outputs. Each is renamed into one hidden directory first (a rename is atomic),
    then that directory is deleted: a crash midway leaves no half-deleted checkpoint where a reader looks,
    only the hidden directory, which the next --overwrite deletes."""
    for stale in run_dir.glob(TRASH + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    trash = run_dir / f"{TRASH}{os.getpid()}-{time.time_ns()}"
    trash.mkdir()
    moved = []
    for name in OUTPUTS:
        if (run_dir / name).exists():
            os.replace(run_dir / name, trash / name)
            moved.append(name)
    shutil.rmtree(trash)
    return moved


def _field(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


_MISSING = object()


def check_same_model(recipe: Recipe, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint whose model or tokenizer settings differ from the recipe's, naming the
    first such field and both values. Compares with the recipe saved in the checkpoint (verified by its
    manifest); fields it does not record are not compared."""
    try:
        saved = yaml.safe_load((Path(checkpoint) / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0]
        raise LongtrainError(f"checkpoint {checkpoint}: recipe.yaml cannot be read ({reason})") from None
    if not isinstance(saved, dict):
        raise LongtrainError(f"checkpoint {checkpoint}: recipe.yaml is not a recipe (a mapping of sections)")
    current = recipe.model_dump(mode="json")
    task = _field(saved, "data.task")
    for field in (*ARCHITECTURE, *TOKENS.get(task, ())):
        old, new = _field(saved, field), _field(current, field)
        if old is not _MISSING and old != new:
            raise LongtrainError(f"{field}={new!r} differs from the checkpoint's {field}={old!r} ({checkpoint}): a "
                                 f"resume continues the same model and tokens; set {field}={old!r}, or train the "
                                 "new settings in another run.dir")


def _check_own_checkpoint(run_dir: Path, resume: str, resume_from: Path) -> None:
    """An explicit --resume PATH must not make this run replace checkpoints it did not write: complete ones
    newer than PATH in the run dir (another continuation), or any in a run dir PATH is not from."""
    root = run_dir / "checkpoints"
    if resume == "auto":
        return  # the newest complete one: newer step directories are damaged; save() sets them aside
    if Path(resume_from).resolve().parent != root.resolve():
        earlier = earlier_run(run_dir)
        if earlier is not None:
            raise LongtrainError(f"--resume {resume}: run dir {run_dir} already holds {earlier} of another run, "
                                 "which continuing here would mix with this one: choose another run.dir")
        return
    step = ckpt.read_manifest(resume_from)["step"]
    newer = [p.name for p in ckpt.step_dirs(root) if ckpt.step_of(p) > step and _complete(p)]
    if newer:
        raise LongtrainError(f"--resume {resume}: {root} holds newer complete checkpoints ({', '.join(newer)}) that "
                             "this run would replace: resume the newest with --resume auto, or copy "
                             f"{Path(resume_from).name} into another run.dir's checkpoints/ and resume there")


def _complete(path: Path) -> bool:
    try:
        ckpt.verify(path)
        return True
    except LongtrainError:
        return False


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse, in one line starting with `what` (e.g. "run.dir='runs/x'"), a directory that cannot be created or
    written: an existing file, a file among its parents, or no write permission (tried, not asked: os.access
    says yes to root on a read-only mount). Creates nothing: it probes the nearest existing directory with a
    temporary file, removed at once."""
    path = Path(path)
    existing = path
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        is_dir = existing.is_dir()
    except OSError as e:
        raise LongtrainError(f"{what} cannot be reached ({e.strerror or e}): choose another path") from None
    if not is_dir:
        problem = "is a file" if existing == path else f"has a file among its parents ({existing})"
        raise LongtrainError(f"{what} {problem}, not a directory: choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".longtrain-probe-"):
            pass
    except OSError as e:
        raise LongtrainError(f"{what} cannot be written ({existing}: {e.strerror or e}): choose a writable "
                             "path") from None
