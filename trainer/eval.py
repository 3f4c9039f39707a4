"""Evaluation of a checkpoint: held-out perplexity and loss by token position, passkey retrieval
accuracy by length and depth, MQAR recall accuracy by length, streaming perplexity by length.

Lengths are absolute token counts or multiples of the training length ("1x,2x,4x"), so length
generalization is measured on the same held-out draws the training length sees. Results go to
<run>/eval/<task>.json, with a plot beside them (<task>.png).

Streaming (StreamingLLM, Xiao et al. 2023): held-out text of each length is fed through the model with
a constant-memory cache per attention block (trainer/generate.py, `stream_losses`), twice: the first
`sinks` tokens plus the last `window` ones, and the last sinks + window ones alone (window only, the
same cache budget, as the paper compares), beside full attention over the whole text (no eviction, the
paper's dense baseline). The cache defaults to the model's attention_window and
attention_sinks when it has a window (sinks 4 when it has none), else sinks 4 and window = the training
length - 4, so that cache positions never pass the training length. The model's normal forward at the
training length (no eviction) is the reference. Streams are contiguous held-out text, documents run
into each other (as the paper streams concatenated books), whatever the run's packing.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longtrain.trainer import checkpoint as ckpt
from longtrain.trainer.config import Recipe, load_recipe, packing
from longtrain.trainer.data.loader import PackedDataset, eval_batches
from longtrain.trainer.data.tasks import IGNORE, TaskDataset, answer_accuracy, make_task, task_eval_batches
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.generate import new_state, stream_losses
from longtrain.trainer.model.decoder import Decoder
from longtrain.trainer.reshard import consolidated_weights

TASKS = ("perplexity", "passkey", "mqar", "streaming")
DEFAULT_SINKS = 4  # StreamingLLM's choice: four initial tokens restore most of the perplexity
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


def check_cache_args(sinks: int | None, window: int | None) -> None:
    """Refuse a streaming cache given with negative sinks or an empty window (None: the default)."""
    if sinks is not None and sinks < 0:
        raise LongtrainError(f"--sinks {sinks}: must be >= 0 (the first tokens kept in the cache; 0 for none)")
    if window is not None and window < 1:
        raise LongtrainError(f"--window {window}: must be >= 1 (the last tokens kept, the current one among them)")


def streaming_cache(recipe: Recipe, sinks: int | None = None, window: int | None = None) -> tuple[int, int]:
    """(sinks, window) of the streaming cache: the given values, else the defaults of the module docstring."""
    check_cache_args(sinks, window)
    model, train_length = recipe.model, recipe.data.seq_len
    if sinks is None:
        sinks = model.attention_sinks if model.attention_window is not None and model.attention_sinks else DEFAULT_SINKS
    if window is None:
        window = model.attention_window if model.attention_window is not None else train_length - sinks
        if window < 1:
            raise LongtrainError(f"--sinks {sinks} leaves no window in the training length {train_length}: "
                                 "pass --window N (N >= 1) or fewer sinks")
    return sinks, window


def _stream_dataset(recipe: Recipe, run_dir: Path, length: int) -> PackedDataset:
    dataset = _held_out(recipe, run_dir, length, "perplexity")
    return dataset if dataset.doc_starts is None else PackedDataset(dataset.tokens, length)


def _stream_entry(losses: torch.Tensor, train_length: int) -> dict:
    """Summary of per-token losses (samples, length) float64: over the whole stream, and over its last
    training length of tokens (tail_*), where eviction has been at work longest."""
    mean, tail = float(losses.mean()), float(losses[:, -train_length:].mean())
    count = torch.full((losses.shape[1],), float(losses.shape[0]), dtype=torch.float64)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": losses.numel(),
            "tail_loss": tail, "tail_perplexity": math.exp(min(tail, 50.0)),
            "loss_by_position": _bucketed(losses.mean(0), count)}


def evaluate_streaming(model, recipe: Recipe, run_dir: Path, lengths: list[int], samples: int, batch_size: int,
                       sinks: int | None = None, window: int | None = None) -> dict:
    """Streaming perplexity at each length, with sinks and window only, and the full-attention reference."""
    if recipe.data.task != "text":
        raise LongtrainError(f"--task streaming needs a text run (it streams the run's held-out tokens); this run "
                             f"has data.task={recipe.data.task}")
    sinks, window = streaming_cache(recipe, sinks, window)
    try:
        new_state(model, sinks, window)  # refuses blocks without a constant-memory state, before any work
    except ValueError as e:
        raise LongtrainError(f"--task streaming: {e}") from None
    caches = {"with_sinks": (sinks, window), "window_only": (0, sinks + window)}
    train_length = recipe.data.seq_len
    # Every length scores the same streams: the held-out draws at the longest length, cut. A stream is
    # causal, so the losses of its first L tokens are those of a stream of length L: one pass serves all.
    batches = list(_batches(_stream_dataset(recipe, run_dir, max(lengths)), batch_size, samples))
    reference = loss_by_position(model, [(inputs[:, :train_length], targets[:, :train_length])
                                         for inputs, targets in batches])
    reference.pop("loss_by_position")
    losses, seconds = {}, {}
    for name, (cache_sinks, cache_window) in caches.items():
        start = time.perf_counter()
        losses[name] = torch.cat([stream_losses(model, inputs, targets, cache_sinks, cache_window)
                                  for inputs, targets in batches])
        seconds[name] = time.perf_counter() - start
    # Full attention over the whole text (no eviction) at every length: past the training length, RoPE
    # positions the model never saw; the paper's dense baseline. One row at a time bounds the logits.
    with torch.no_grad():
        dense = torch.cat([F.cross_entropy(model(inputs[row:row + 1]).transpose(1, 2), targets[row:row + 1],
                                           reduction="none").double()
                           for inputs, targets in batches for row in range(inputs.shape[0])])
    losses["full_attention"] = dense
    results = {length: {name: _stream_entry(losses[name][:, :length], train_length) for name in losses}
               for length in lengths}
    return {"task": "streaming", "train_length": train_length, "pattern": recipe.model.pattern,
            "samples_per_length": losses["with_sinks"].shape[0], "sinks": sinks, "window": window,
            "cache_tokens": sinks + window, "streamed_tokens_per_s": {
                name: losses[name].numel() / max(seconds[name], 1e-9) for name in caches},
            "full_attention": {"length": train_length, **reference}, "lengths": results}


def evaluate(model, recipe: Recipe, run_dir: Path, task_name: str, lengths: list[int], samples: int = 64,
             batch_size: int | None = None, sinks: int | None = None, window: int | None = None) -> dict:
    """Results of one task at each length: {'task', 'train_length', 'lengths': {length: {...}}}.
    sinks, window: the streaming task's cache (`streaming_cache`)."""
    if task_name not in TASKS:
        raise LongtrainError(f"--task {task_name!r} is unknown; valid: {', '.join(TASKS)}")
    batch_size = batch_size or recipe.train.micro_batch_size
    if task_name == "streaming":
        return evaluate_streaming(model, recipe, run_dir, lengths, samples, batch_size, sinks, window)
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
    if task == "streaming":
        fig, ax = plt.subplots(figsize=(7, 4.5))
        x = [int(n) for n in lengths]
        sinks, window = results["sinks"], results["window"]
        for name, label in (("with_sinks", f"{sinks} sinks + window {window}"),
                            ("window_only", f"window {sinks + window}, no sinks"),
                            ("full_attention", "full attention, no eviction")):
            ax.plot(x, [results["lengths"][n][name]["perplexity"] for n in lengths], marker="o", label=label)
        ax.axhline(results["full_attention"]["perplexity"], color="black", linestyle=":",
                   label=f"full attention at {train_length} tokens (reference)")
        ax.axvline(train_length, color="gray", linestyle="--", label=f"training length {train_length}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(x, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("stream length (tokens, log scale)")
        ax.set_ylabel("held-out perplexity (log scale)")
        ax.set_title(f"Streaming perplexity, cache of {sinks + window} tokens ({results['pattern']})")
    elif task == "perplexity":
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
