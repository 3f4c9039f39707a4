"""`longtrain eval` and `longtrain generate`: use a trained checkpoint.

    longtrain eval CKPT [--task perplexity|passkey|mqar|streaming] [--lengths 1x,2x,4x | 256,512,1024] [--samples N]
                        [--window N --sinks K  (streaming's cache: the first K tokens and the last N)]
    longtrain generate CKPT [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]
CKPT is a checkpoint directory, a run's checkpoints/ directory or the run directory (newest complete
checkpoint). Eval writes <run>/eval/<task>.json and <task>.png (or under --out). For a model trained on a synthetic
task, a prompt is that task's symbols separated by spaces (default: the first held-out question).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from longtrain.trainer.run_dir import check_writable_dir
from longtrain.trainer.errors import LongtrainError

MIN_TEMPERATURE = 1e-3  # below it sampling is greedy but for rounding, and logits / T can overflow float32


def _positive(args, *names) -> None:
    """Each named option, when given, is an int > 0; else a LongtrainError naming it."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise LongtrainError(f"--{name.replace('_', '-')} {value}: must be a positive integer")


def _check_lengths(text: str | None, train_length: int, fix: str) -> list[int]:
    """--lengths parsed at `train_length` (trainer/eval.py), each item a positive number of tokens."""
    from longtrain.trainer.eval import parse_lengths

    lengths = parse_lengths(text, train_length)
    for item, length in zip((text or "").split(","), lengths if text else []):
        if length <= 0:
            raise LongtrainError(f"--lengths {item.strip()!r} is {length} tokens: {fix}")
    return lengths


def check_eval_args(args) -> None:
    """Refuse bad `longtrain eval` options before the checkpoint is loaded."""
    from longtrain.trainer.eval import check_cache_args

    _positive(args, "samples", "batch_size", "threads")
    check_cache_args(args.sinks, args.window)
    if (args.window is not None or args.sinks is not None) and args.task != "streaming":
        raise LongtrainError("--window / --sinks set the cache of --task streaming; this is --task "
                             f"{args.task or 'default'}")
    _check_lengths(args.lengths, 1 << 30, "a length must be a positive number of tokens")  # "0", "0k", "0x"
    if args.out:
        check_writable_dir(Path(args.out), f"--out {args.out!r}")


def check_generate_args(args) -> None:
    """Refuse bad `longtrain generate` options before the checkpoint is loaded."""
    _positive(args, "max_new_tokens", "threads")
    t = args.temperature
    if not math.isfinite(t) or t < 0 or 0 < t < MIN_TEMPERATURE:
        raise LongtrainError(f"--temperature {t}: use 0 for greedy decoding, or a finite temperature >= "
                             f"{MIN_TEMPERATURE:g} to sample")
    if not 0 < args.top_p <= 1:  # NaN fails too
        raise LongtrainError(f"--top-p {args.top_p}: the nucleus mass must be in (0, 1] (1 keeps every token)")
    if args.prompt == "":
        raise LongtrainError("--prompt '' is empty: give at least one token of text, or leave --prompt out for the "
                             "default prompt")


def cmd_eval(args) -> int:
    import torch

    from longtrain.trainer.eval import evaluate, load_checkpoint, write_results

    check_eval_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, recipe, run_dir, found = load_checkpoint(args.checkpoint)
    task = args.task or ("perplexity" if recipe.data.task == "text" else recipe.data.task)
    lengths = _check_lengths(args.lengths, recipe.data.seq_len,
                             f"at the training length {recipe.data.seq_len}, use a larger multiple")
    out_dir = Path(args.out) if args.out else run_dir / "eval"
    if not args.out:
        check_writable_dir(out_dir, f"the results directory {str(out_dir)!r} (pass --out to choose another)")
    start = time.perf_counter()
    results = evaluate(model, recipe, run_dir, task, lengths, samples=args.samples, batch_size=args.batch_size,
                       sinks=args.sinks, window=args.window)
    results["checkpoint"] = str(found)
    try:
        json_path, png_path = write_results(results, out_dir)
    except OSError as e:
        raise LongtrainError(f"--out {str(out_dir)!r}: cannot write the results ({e.strerror or e})") from None
    print(f"eval {task} | {found} | training length {recipe.data.seq_len} | {time.perf_counter() - start:.1f} s")
    if task == "streaming":
        full = results["full_attention"]
        print(f"  cache {results['sinks']} sinks + window {results['window']} = {results['cache_tokens']} tokens "
              f"per attention block | full attention at {full['length']} tokens: perplexity {full['perplexity']:.2f}")
    for length, entry in results["lengths"].items():
        ratio = f"{length / recipe.data.seq_len:g}x"
        if task == "streaming":
            sinks, window = entry["with_sinks"], entry["window_only"]
            print(f"  {length:>7} tokens ({ratio:>5}) | with sinks: perplexity {sinks['perplexity']:.2f} "
                  f"({sinks['perplexity'] / full['perplexity']:.3f} x full 1x), last {recipe.data.seq_len} tokens "
                  f"{sinks['tail_perplexity']:.2f} | window only: perplexity {window['perplexity']:.2f} "
                  f"({window['perplexity'] / full['perplexity']:.3f}), last {window['tail_perplexity']:.2f} | "
                  f"full attention: {entry['full_attention']['perplexity']:.2f}")
        elif task == "perplexity":
            print(f"  {length:>7} tokens ({ratio:>5}) | loss {entry['loss']:.4f} | perplexity {entry['perplexity']:.2f}")
        else:
            depths = " ".join(f"{float(d):.2f}:{100 * a:.0f}%" for d, a in entry.get("by_depth", {}).items())
            print(f"  {length:>7} tokens ({ratio:>5}) | accuracy {100 * entry['sample_accuracy']:.1f}% of samples, "
                  f"{100 * entry['token_accuracy']:.1f}% of answer tokens"
                  + (f" | by depth {depths}" if depths else ""))
    if task == "streaming":
        print("  streamed " + ", ".join(f"{name.replace('_', ' ')} {speed:.0f} tokens/s"
                                         for name, speed in results["streamed_tokens_per_s"].items()))
    print(f"  -> {json_path}, {png_path}")
    return 0


def _codec(recipe, run_dir):
    """(encode, decode, default prompt) for the checkpoint's data: its tokenizer, or its task's symbols."""
    if recipe.data.task == "text":
        from longtrain.trainer.data.tokenizer import Tokenizer
        tokenizer = Tokenizer(run_dir / "data" / "tokenizer.model")
        return tokenizer.encode, tokenizer.decode, "def "
    from longtrain.trainer.data.tasks import TaskDataset, first_question, make_task
    task = make_task(recipe.data)
    prompt, _ = first_question(TaskDataset(task, recipe.data.seq_len, "eval", recipe.run.seed), 0)
    return task.vocab.encode, task.vocab.decode, task.vocab.decode(prompt)


def cmd_generate(args) -> int:
    import torch

    from longtrain.trainer.eval import load_checkpoint
    from longtrain.trainer.generate import generate

    check_generate_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, recipe, run_dir, found = load_checkpoint(args.checkpoint)
    encode, decode, default_prompt = _codec(recipe, run_dir)
    prompt = encode(args.prompt if args.prompt is not None else default_prompt)
    if not prompt:
        raise LongtrainError(f"--prompt {args.prompt!r} encodes to no tokens: give some text")
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    new = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   generator=generator)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({"prompt_ids": prompt, "new_ids": new, "text": decode(new), "seconds": elapsed}))
    else:
        print(decode(prompt) + " \u2192 " + decode(new) if recipe.data.task != "text" else decode(prompt + new))
        print(f"[{len(new)} tokens in {elapsed:.2f} s, {len(new) / max(elapsed, 1e-9):.1f} tokens/s, "
              f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}, top-p {args.top_p}'}]")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: perplexity by position, passkey or MQAR accuracy by "
                       "length, streaming perplexity by length")
    p.add_argument("checkpoint", help="checkpoint directory, or a run / checkpoints directory (newest checkpoint)")
    p.add_argument("--task", choices=["perplexity", "passkey", "mqar", "streaming"], default=None,
                   help="default: perplexity for text models, else the task the model was trained on; streaming: "
                        "perplexity of text streamed through a constant-memory cache (StreamingLLM), with sinks "
                        "and window only")
    p.add_argument("--lengths", default=None, help="1x,2x,4x (multiples of the training length) or 256,512 or 4k,16k")
    p.add_argument("--samples", type=int, default=64, help="held-out samples per length")
    p.add_argument("--batch-size", type=int, default=None, help="default: train.micro_batch_size")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="directory for <task>.json and <task>.png (default: <run>/eval)")
    p.add_argument("--window", type=int, default=None,
                   help="streaming: the last N tokens kept per attention block, the current one among them "
                        "(default: model.attention_window, else the training length minus the sinks)")
    p.add_argument("--sinks", type=int, default=None,
                   help="streaming: the first K tokens kept (default: model.attention_sinks when the model has a "
                        "window and sinks, else 4)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample from a checkpoint (KV cache and recurrent state)")
    p.add_argument("checkpoint", help="checkpoint directory, or a run / checkpoints directory (newest checkpoint)")
    p.add_argument("--prompt", default=None, help="prompt text (default: 'def ', or a held-out task question)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0,
                   help=f"0 is greedy; sampling takes a finite temperature >= {MIN_TEMPERATURE:g}")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (with temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)
