"""`model.init_from`: start a run from another run's trained weights (context extension, fine-tuning).

The new run takes only the weights of the source checkpoint: its optimizer, learning-rate schedule, step
counter and data position start fresh. What may differ from the source recipe is what leaves every
parameter's shape and meaning unchanged: data.seq_len, model.rope_scaling and model.rope_theta (RoPE length
extension: position interpolation, NTK, YaRN; trainer/model/rope.py), the training, checkpoint and parallel
settings. The architecture fields of trainer/run_dir.py (pattern, widths, heads, vocabulary, task) must
match; a text run must use the source's tokenizer (its sha256 in the source manifest).

Each rank reads only its slices of the dense weights from the source's layout-free section
(trainer/reshard.py), so the source and the new run may have any tp / pp / cp / dp / ZeRO layouts. A
source saved with checkpoint.reshardable=false has no such section: it loads only under its own layout.
The source run is read, never written. Once the new run has checkpoints of its own, `--resume auto`
continues those and init_from is not read again.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from longtrain.trainer import checkpoint as ckpt
from longtrain.trainer import reshard
from longtrain.trainer.config import Recipe
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.run_dir import ARCHITECTURE, TOKENS, _MISSING, _field


def _where(recipe: Recipe) -> str:
    return f"model.init_from={recipe.model.init_from!r}"


def source_checkpoint(recipe: Recipe) -> Path | None:
    """The checkpoint model.init_from names (a run directory: its newest complete checkpoint; or a step
    directory), or None without one. LongtrainError in one line for a missing path, no complete checkpoint,
    or this run's own run directory. Reads manifests only."""
    if recipe.model.init_from is None:
        return None
    where, named = _where(recipe), Path(recipe.model.init_from)
    own = recipe.run_dir.resolve()
    if named.resolve() == own or own in named.resolve().parents:
        raise LongtrainError(f"{where} is inside this run's own run.dir={str(recipe.run_dir)!r}: init_from starts "
                             "from another run; to continue this one use --resume auto")
    try:
        checkpoint = ckpt.locate(named)
    except LongtrainError as e:
        raise LongtrainError(f"{where}: {e}") from None
    source_run = checkpoint.parent.parent.resolve()
    if checkpoint.parent.name == "checkpoints" and (source_run == own or source_run in own.parents):
        raise LongtrainError(f"{where}: this run's run.dir={str(recipe.run_dir)!r} lies inside the source run "
                             f"{source_run}, which init_from only reads: choose a run.dir outside it")
    return checkpoint


def source_recipe(checkpoint: Path, where: str) -> dict:
    """The recipe saved in the checkpoint (its sha256 checked against the manifest)."""
    ckpt.verify_file(checkpoint, "recipe.yaml")
    try:
        saved = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LongtrainError(f"{where}: {checkpoint / 'recipe.yaml'} cannot be read ({str(e).splitlines()[0]})") from None
    if not isinstance(saved, dict):
        raise LongtrainError(f"{where}: {checkpoint / 'recipe.yaml'} is not a recipe (a mapping of sections)")
    return saved


def has_layout_free_section(checkpoint: Path, manifest: dict, saved: dict) -> bool:
    """Whether the checkpoint holds the layout-free section: universal files indexed by the manifest, or
    (checkpoints written before those files) a recipe with checkpoint.reshardable true."""
    if any("tensors" in entry for entry in manifest["files"].values()):
        return True
    return _field(saved, "checkpoint.reshardable") is not False  # older: the section inside the rank files


def check_source(recipe: Recipe, world: int) -> Path | None:
    """Every check of model.init_from that reads no weights, before any process group or model exists:
    the path, the architecture fields against the source recipe (naming the field and both values), the
    layout when the source has no layout-free section, and a given data.tokenizer.path's hash. Returns the
    source checkpoint (None without init_from)."""
    checkpoint = source_checkpoint(recipe)
    if checkpoint is None:
        return None
    where = _where(recipe)
    saved, current = source_recipe(checkpoint, where), recipe.model_dump(mode="json")
    task = _field(saved, "data.task")
    # A text run's token ids are decided by its tokenizer file, compared by hash below and after data preparation.
    for name in (*ARCHITECTURE, *(TOKENS.get(task, ()) if task != "text" else ())):
        old, new = _field(saved, name), _field(current, name)
        if old is not _MISSING and old != new:
            raise LongtrainError(f"{name}={new!r} differs from {name}={old!r} of {where} ({checkpoint}): init_from "
                                 f"may change data.seq_len, model.rope_scaling and training settings; set {name}={old!r}")
    manifest = ckpt.read_manifest(checkpoint)
    saved_layout = reshard.layout_key(manifest["layout"], manifest["world_size"])
    layout = reshard.layout_key(recipe.parallel.model_dump(), world)
    if not has_layout_free_section(checkpoint, manifest, saved):
        if saved_layout != layout:
            names = ("tp", "pp", "cp", "dp", "zero_stage")
            raise LongtrainError(f"{where}: {checkpoint} was saved with checkpoint.reshardable=false at "
                                 + " ".join(f"{k}={v}" for k, v in zip(names, saved_layout)) + ", so it loads only "
                                 "under that layout (this run: " + " ".join(f"{k}={v}" for k, v in zip(names, layout))
                                 + "): use the source's layout")
        if saved_layout[-1] == 3:
            raise LongtrainError(f"{where}: {checkpoint} was saved with checkpoint.reshardable=false under "
                                 "parallel.zero_stage=3, whose rank files hold no whole weights: save the source "
                                 "with checkpoint.reshardable=true")
    if recipe.data.task == "text" and recipe.data.tokenizer.path:
        check_tokenizer(recipe, checkpoint, Path(recipe.data.tokenizer.path))
    return checkpoint


def check_tokenizer(recipe: Recipe, checkpoint: Path, tokenizer: Path) -> None:
    """Refuse a tokenizer file other than the one the source checkpoint was trained with."""
    source_tokenizer = checkpoint.parent.parent / "data" / "tokenizer.model"
    ckpt.check_tokenizer(ckpt.read_manifest(checkpoint), tokenizer, checkpoint,
                         fix=f"{_where(recipe)} continues the source's token ids: set data.tokenizer.path="
                             f"{str(source_tokenizer)!r}")


@torch.no_grad()
def load_weights(run, checkpoint: Path) -> None:
    """Give this rank's parameters (run.named_parameters(): dense name, this rank's tensor) their slices of
    the source checkpoint's dense weights, reading only those. The optimizer is left as built: no Adam
    state, step 0 (its first step makes zero moments), whatever the source's state was."""
    manifest = ckpt.read_manifest(checkpoint)
    named = list(run.named_parameters())
    zero_stage = run.recipe.parallel.zero_stage
    if has_layout_free_section(checkpoint, manifest, source_recipe(checkpoint, _where(run.recipe))):
        tp, tp_rank = run.tp
        wanted = {name: (reshard._dense_shape(param), tp, tp_rank) for name, param in named}
        values = {name: entry["param"] for name, entry in
                  reshard.read_slices(checkpoint, manifest, wanted, keys=("param",)).items()}
    else:  # the same layout (check_source): this rank's own model state, keyed by its module's names
        state = ckpt.load_rank_state(checkpoint, run.rank, mmap=True)["model"]
        local = {id(param): name for name, param in run.module.named_parameters()}
        missing = [name for name, param in named if local.get(id(param)) not in state]
        if missing:
            raise LongtrainError(f"{_where(run.recipe)}: rank {run.rank}'s file of {checkpoint} holds no {missing[0]}"
                                 " (its pipeline stages were cut elsewhere, by data.seq_len): use the source's "
                                 "data.seq_len, or save the source with checkpoint.reshardable=true")
        values = {name: state[local[id(param)]] for name, param in named}
    set_weights(named, values, run.optimizer, zero_stage)


def set_weights(named, values: dict, optimizer, zero_stage: int) -> None:
    """Write `values` (dense name -> this rank's slice) into the parameters and, under ZeRO, the fp32 master
    copies the optimizer steps on, with the setters trainer/reshard.py's load_universal uses."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in named:
        value = values[name]
        if zero_stage:
            safe_set_full_fp32_param(param, value.to(torch.float32))
            if zero_stage < 3:
                param.data.copy_(value)
        else:
            param.data.copy_(value)
    if zero_stage == 3:  # the model's own partitions follow the fp32 master partitions
        for low, high in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
            low.data.copy_(high.data)


def same_source_on_every_rank(checkpoint: Path) -> None:
    """Refuse a start where ranks picked different checkpoints of a source run that was still writing them."""
    from longtrain.trainer.parallel import collectives

    steps = collectives.gather_values(ckpt.step_of(checkpoint) if ckpt.STEP_DIR.match(checkpoint.name) else -1)
    if len(set(steps)) > 1:
        raise LongtrainError(f"model.init_from: the ranks found different newest checkpoints of {checkpoint.parent} "
                             f"(steps {sorted(set(int(s) for s in steps))}); the source run is still writing: name "
                             "one step directory")

