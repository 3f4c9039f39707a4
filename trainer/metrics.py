"""Throughput, model FLOPs utilisation, memory, and the three outputs of a run: progress lines,
metrics.jsonl (one JSON object per record) and TensorBoard events.

MFU follows the PaLM appendix (Chowdhery et al. 2022): model FLOPs per token (6 x parameters for
forward+backward, plus the attention score term) times tokens/s over the machine's peak, here the
matmul rate measured on this device at start-up rather than a datasheet number.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch


def measured_matmul_flops(device: torch.device, dtype=torch.float32, size: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul on this device: the peak that MFU is measured against."""
    generator = torch.Generator().manual_seed(0)  # its own: the run's RNG stream stays untouched
    a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    a[:64] @ b  # warm-up at a sixteenth of the work: an emulated dtype (bfloat16 on most CPUs) takes seconds a product
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 1:
        a @ b
        count += 1
    _sync(device)
    return 2 * size ** 3 * count / (time.perf_counter() - start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(cfg, seq_len: int, evaluations: dict[int, int] | None = None) -> float:
    """Training FLOPs per token from the model configuration (no weights needed, whatever the layout):
    6 x (dense parameters used per token, an O block's counted once per function evaluation) + attention
    scores (6 * seq * d per attention layer for causal fwd+bwd, seq its `attention_span`: less for windowed
    layers and S²-Attn groups) + the LM head.

    evaluations: {block index: function evaluations of its last solve} for O blocks (`ode_stats` keys
    'ode/<index>/nfe', gathered from every stage); an O block missing from it counts the plan's guess."""
    from longtrain.trainer.parallel.plan import attention_span, block_parameters, function_evaluations

    params = block_parameters(cfg, 1)
    total = 0.0
    for index, letter in enumerate(cfg.pattern):
        block = 6.0 * params[letter]
        span = attention_span(cfg, seq_len, index) if letter in "AO" else seq_len
        if letter == "A":
            block += 6 * span * cfg.d_model
        if letter == "O":
            nfe = max((evaluations or {}).get(index) or function_evaluations(cfg.ode), 1)
            block = nfe * (block + (6 * span * cfg.d_model if cfg.ode.sublayer == "attention_mlp" else 0))
        total += block
    return total + 6 * cfg.d_model * cfg.vocab_size  # LM head


def evaluations(ode_stats: dict) -> dict[int, int]:
    """{block index: nfe} from `ode_stats` records ('ode/<index>/nfe')."""
    return {int(key.split("/")[1]): value for key, value in ode_stats.items()
            if key.endswith("/nfe") and key.split("/")[1].isdigit()}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def machine_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what in words) a process on `device` can hold at most: the GPU's memory, or the machine's RAM
    (the container's memory limit when it is lower). Totals, not what is free now: the preflight refuses
    what can never fit, not what might not fit today."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"the memory of GPU {device}"
    try:
        import psutil
        total = psutil.virtual_memory().total
    except ImportError:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_memory_limit()
    if limit is not None and limit < total:
        return limit, "this container's memory limit"
    return total, "this machine's RAM"


def _cgroup_memory_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


class MetricsLog:
    """Writes records to metrics.jsonl and TensorBoard (rank 0 only), and prints progress lines."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Records past the checkpoint came from the interrupted run; the resumed run writes them again.
            kept = [line for line in self.path.read_text().splitlines() if _record_before(line, resume_step)]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _record_before(line: str, step: int) -> bool:
    """A complete, non-final record at or before `step` (a killed run can leave a half-written last line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and record.get("step", 0) <= step and "final_loss" not in record


def progress_line(step: int, total: int, loss: float, lr: float, tokens_per_s: float, mfu: float,
                  memory: int, eta_s: float) -> str:
    return (f"step {step:>6}/{total} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
            f"MFU {100 * mfu:.1f}% | mem {memory / 2**30:.2f} GiB | eta {eta_s / 60:.1f} min")
