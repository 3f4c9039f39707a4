"""`longtrain report RUN_DIR`: plot a run's metrics.jsonl to <run>/plots/report.png.

Panels: training and held-out loss, throughput (tokens/s) with MFU, peak memory, and held-out task
accuracy when the run trained on a synthetic task. Drawn with matplotlib's Agg backend (no display).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from longtrain.trainer.run_dir import check_writable_dir
from longtrain.trainer.errors import LongtrainError


def read_records(run_dir: Path) -> list[dict]:
    """The JSON objects of <run>/metrics.jsonl. Lines that are not one (a killed run's half-written last line,
    an edit) are skipped with one warning on stderr: the report draws what it can."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LongtrainError(f"{path} not found: is {run_dir} a run directory?")
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as e:
        raise LongtrainError(f"{path} cannot be read ({e.strerror or e})") from None
    records, skipped = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped.append(number)
    if skipped:
        lines_text = ", ".join(map(str, skipped[:5])) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"longtrain: warning: {path}: skipped line(s) {lines_text}: not a JSON object", file=sys.stderr)
    return records


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record that holds a finite number under `key` and a numeric step."""
    pairs = [(r["step"], r[key]) for r in records if _number(r.get(key)) and _number(r.get("step"))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in metrics.jsonl", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_report(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_records(run_dir)
    if not series(records, "loss")[0]:
        raise LongtrainError(f"{run_dir / 'metrics.jsonl'} holds no training records yet")
    out = out or run_dir / "plots" / "report.png"
    if out.suffix.lower() != ".png":
        out = out.with_name(out.name + ".png")  # savefig would add it anyway; report the real path
    if out.is_dir():
        raise LongtrainError(f"--out {str(out)!r} is a directory: give a file name ending in .png")
    check_writable_dir(out.parent, f"the report's directory {str(out.parent)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    has_accuracy = any("eval_accuracy" in r for r in records)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    (loss_ax, extra_ax), (speed_ax, memory_ax) = axes

    loss_ax.plot(*series(records, "loss"), label="training loss")
    loss_ax.plot(*series(records, "eval_loss"), marker="o", label="held-out loss")
    loss_ax.set(xlabel="optimizer step", ylabel="loss (nats / token)", title="Loss")
    loss_ax.legend()

    if has_accuracy:
        steps, accuracy = series(records, "eval_accuracy")
        extra_ax.plot(steps, [100 * a for a in accuracy], marker="o", color="tab:green")
        extra_ax.set(xlabel="optimizer step", ylabel="held-out accuracy (%)", ylim=(-2, 102),
                     title="Task accuracy, greedy (passkey: whole keys, MQAR: values)")
    else:
        steps, lr = series(records, "lr")
        extra_ax.plot(steps, lr, color="tab:purple")
        extra_ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate")

    steps, speed = series(records, "tokens_per_s")
    speed_ax.plot(steps, speed, color="tab:blue", marker=".")
    speed_ax.set(xlabel="optimizer step", ylabel="throughput (tokens / s)", title="Throughput and MFU")
    if speed and max(speed) > 0:
        speed_ax.set_ylim(0, 1.1 * max(speed))
    else:
        _no_data(speed_ax, "tokens_per_s records")
    # MFU is tokens/s times a constant (model FLOPs per token / measured peak): a second scale, not a second curve.
    ratios = [r["mfu"] / r["tokens_per_s"] for r in records
              if _number(r.get("tokens_per_s")) and r["tokens_per_s"] > 0 and _number(r.get("mfu"))]
    if ratios:
        per_token = sum(ratios) / len(ratios)
        mfu_axis = speed_ax.secondary_yaxis("right", functions=(lambda t: 100 * t * per_token,
                                                                 lambda m: m / (100 * per_token)))
        mfu_axis.set_ylabel("MFU (% of measured matmul peak)")

    steps, memory = series(records, "peak_memory_bytes")
    memory_ax.plot(steps, [m / 2 ** 20 for m in memory], color="tab:red", marker=".")
    memory_ax.set(xlabel="optimizer step", ylabel="peak memory (MiB)",
                  title="Peak memory (GPU allocated, or CPU resident set)")
    if memory and max(memory) > 0:
        memory_ax.set_ylim(0, 1.1 * max(memory) / 2 ** 20)
    else:
        _no_data(memory_ax, "peak_memory_bytes records")

    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.xaxis.set_tick_params(labelbottom=True)
    final = next((r for r in reversed(records) if _number(r.get("final_loss"))), None)
    title = f"{run_dir.name}" + (f" | final loss {final['final_loss']:.4f}" if final else " | in progress")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise LongtrainError(f"--out {str(out)!r} cannot be written ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return out


def cmd_report(args) -> int:
    out = plot_report(Path(args.run_dir), Path(args.out) if args.out else None)
    print(out)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="plot a run's loss, throughput and memory curves to PNG")
    p.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: <run>/plots/report.png)")
    p.set_defaults(func=cmd_report)
