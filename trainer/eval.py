"""Evaluation of a checkpoint: held-out perplexity and loss by token position, passkey retrieval
accuracy by length and depth, MQAR recall accuracy by length.

Lengths are absolute token counts or multiples of the training length ("1x,2x,4x"), so length
generalization is measured on the same held-out draws the training length sees. Results go to
<run>/eval/<task>.json, with a plot beside them (<task>.png).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from longtrain.trainer import checkpoint as ckpt
from longtrain.trainer.config import Recipe, load_recipe, packing
from longtrain.trainer.data.loader import PackedDataset, eval_batches
from longtrain.trainer.data.tasks import IGNORE, TaskDataset, answer_accuracy, make_task, task_eval_batches
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.model.decoder import Decoder
from longtrain.trainer.reshard import consolidated_weights

TASKS = ("perplexity", "passkey", "mqar")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
POSITION_BUCKETS = 64


def load_checkpoint(path: str | Path) -> tuple[Decoder, Recipe, Path, Path]:
    """(model in eval mode, recipe, run dir, checkpoint dir) from a checkpoint directory, or the newest
    complete checkpoint of a run directory, its checkpoints/ directory or <run>/checkpoints/latest."""
    found = ckpt.locate(path)  # verified against its manifest
    manifest = ckpt.read_manifest(found)
    recipe = load_recipe(found / "recipe.yaml")
    run_dir = found.parent.parent
    tokenizer = run_dir / "data" / "tokenizer.model"
    if recipe.data.task == "text" and tokenizer.is_file():  # eval and generate read the run's tokenizer and tokens
        ckpt.check_tokenizer(manifest, tokenizer, found, fix=f"{run_dir / 'data'} was prepared again since; "
                             "restore the data/ this checkpoint was trained on")
    model = Decoder(recipe.model, attention_backend=recipe.kernels.attention, scan_backend=recipe.kernels.scan)
    model.load_state_dict(consolidated_weights(found, manifest))  # any tp / pp layout
    return model.eval(), recipe, run_dir, found


def parse_lengths(text: str | None, train_length: int) -> list[int]:
    """'1x,2x,4x' (multiples of the training length), '256,512' or '4k,16k' -> token counts."""
    if not text:
        return [train_length]
    lengths = []
    for item in text.split(","):
        item = item.strip().lower()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)(x|k)?", item)
        if not match:
            raise LongtrainError(f"--lengths item {item!r} is not a length: use 1x,2x,4x (multiples of the training "
                                 "length) or 256,512 or 4k,16k")
        value, unit = float(match.group(1)), match.group(2)
        lengths.append(int(value * train_length) if unit == "x" else int(value * 1024) if unit == "k" else int(value))
    return lengths


def _held_out(recipe: Recipe, run_dir: Path, length: int, task_name: str):
    """The held-out split at `length` tokens: a TaskDataset, or a PackedDataset of the run's eval tokens."""
    if task_name != "perplexity" or recipe.data.task != "text":
        data = recipe.data if task_name == "perplexity" else recipe.data.model_copy(update={"task": task_name})
        task = make_task(data)
        if task.vocab.size > recipe.model.vocab_size:
            raise LongtrainError(f"--task {task_name} needs {task.vocab.size} token ids; this model (data.task="
                                 f"{recipe.data.task}) has model.vocab_size={recipe.model.vocab_size}")
        return TaskDataset(task, length, "eval", recipe.run.seed)
    from longtrain.trainer.data.shards import TokenShards
    if not (run_dir / "data" / "meta.json").is_file():
        raise LongtrainError(f"no prepared data at {run_dir / 'data'}: perplexity needs the run's held-out tokens")
    shards = TokenShards(run_dir / "data")
    # Documents packing (the run's data.packing): each document is scored on its own context, as trained.
    dataset = PackedDataset(shards.splits["eval"], length,
                            shards.doc_starts["eval"] if packing(recipe) == "documents" else None)
    if len(dataset) == 0:
        raise LongtrainError(f"the held-out split is shorter than --lengths {length} tokens")
    return dataset


def _batches(dataset, batch_size: int, samples: int, answer_only: bool = False):
    if isinstance(dataset, TaskDataset):
        return task_eval_batches(dataset, batch_size, max(1, samples // batch_size), answer_only)
    return eval_batches(dataset, batch_size, max(1, samples // batch_size))


@torch.no_grad()
def loss_by_position(model, batches) -> dict:
    """Mean loss, perplexity and the mean loss at every position (nats) over scored targets."""
    total = count = None
    for inputs, targets, *positions in batches:  # positions: in-document, under documents packing
        logits = model(inputs, positions=positions[0]) if positions else model(inputs)
        losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
        scored = (targets != IGNORE).double()
        total = losses.double().sum(0) if total is None else total + losses.double().sum(0)
        count = scored.sum(0) if count is None else count + scored.sum(0)
    mean = float(total.sum() / count.sum())
    per_position = torch.where(count > 0, total / count.clamp(min=1), torch.nan)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": int(count.sum()),
            "loss_by_position": _bucketed(per_position, count)}


def _bucketed(per_position: torch.Tensor, count: torch.Tensor) -> dict:
    """Average the per-position curve over up to POSITION_BUCKETS equal buckets of positions."""
    length = per_position.shape[0]
    edges = torch.linspace(0, length, min(POSITION_BUCKETS, length) + 1).long().tolist()
    centers, values = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        weight = count[lo:hi]
        if weight.sum() > 0:
            centers.append((lo + hi - 1) / 2)
            values.append(float((per_position[lo:hi].nan_to_num(0) * weight).sum() / weight.sum()))
    return {"position": centers, "loss": values}


def evaluate(model, recipe: Recipe, run_dir: Path, task_name: str, lengths: list[int], samples: int = 64,
             batch_size: int | None = None) -> dict:
    """Results of one task at each length: {'task', 'train_length', 'lengths': {length: {...}}}."""
    if task_name not in TASKS:
        raise LongtrainError(f"--task {task_name!r} is unknown; valid: {', '.join(TASKS)}")
    batch_size = batch_size or recipe.train.micro_batch_size
    results = {}
    for length in lengths:
        if task_name == "perplexity":
            results[length] = loss_by_position(model, _batches(_held_out(recipe, run_dir, length, task_name),
                                                               batch_size, samples))
            continue
        dataset = _held_out(recipe, run_dir, length, task_name)
        entry = answer_accuracy(model, _batches(dataset, batch_size, samples, answer_only=True))
        if task_name == "passkey":
            entry["by_depth"] = {}
            for depth in DEPTHS:
                at_depth = TaskDataset(dataset.task, length, "eval", recipe.run.seed, depth=depth)
                entry["by_depth"][depth] = answer_accuracy(
                    model, _batches(at_depth, batch_size, max(batch_size, samples // 4), answer_only=True))["sample_accuracy"]
        results[length] = entry
    return {"task": task_name, "train_length": recipe.data.seq_len, "pattern": recipe.model.pattern,
            "samples_per_length": samples, "lengths": results}


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    """<out_dir>/<task>.json and <task>.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{results['task']}.json"
    json_path.write_text(json.dumps(results, indent=1))
    png_path = out_dir / f"{results['task']}.png"
    plot_results(results, png_path)
    return json_path, png_path


def plot_results(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, train_length = results["task"], results["train_length"]
    lengths = sorted(results["lengths"], key=int)
    if task == "perplexity":
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for length in lengths:
            curve = results["lengths"][length]["loss_by_position"]
            ax.plot(curve["position"], curve["loss"], marker=".", label=f"{length} tokens")
        ax.axvline(train_length, color="gray", linestyle="--", label=f"training length {train_length}")
        ax.set_xlabel("token position in the sequence")
        ax.set_ylabel("held-out loss (nats / token)")
        ax.set_title(f"Loss by position ({results['pattern']})")
    else:
        fig, axes = plt.subplots(1, 2 if task == "passkey" else 1, figsize=(11 if task == "passkey" else 6, 4.5),
                                 squeeze=False)
        ax = axes[0][0]
        key = "sample_accuracy" if task == "passkey" else "token_accuracy"
        ax.plot([int(n) for n in lengths], [100 * results["lengths"][n][key] for n in lengths], marker="o")
        ax.axvline(train_length, color="gray", linestyle="--", label=f"training length {train_length}")
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(n) for n in lengths], [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (tokens, log scale)")
        ax.set_ylabel("accuracy (%)" + (" of whole passkeys" if task == "passkey" else " of recalled values"))
        ax.set_ylim(-2, 102)
        ax.set_title(f"{task} accuracy by length ({results['pattern']})")
        if task == "passkey":
            heat = axes[0][1]
            depths = list(results["lengths"][lengths[0]]["by_depth"])
            grid = [[100 * results["lengths"][n]["by_depth"][d] for n in lengths] for d in depths]
            image = heat.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="lower")
            heat.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            heat.set_yticks(range(len(depths)), [f"{100 * float(d):.0f}%" for d in depths])
            heat.set_xlabel("sequence length (tokens)")
            heat.set_ylabel("depth of the passkey in the filler")
            heat.set_title("accuracy (%) by length and depth")
            fig.colorbar(image, ax=heat, label="accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
