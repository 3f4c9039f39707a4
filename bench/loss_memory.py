"""Memory of the tensor-parallel training loss: our chunked vocab-parallel loss against the logits path.

    python bench/loss_memory.py [--vocab 32000] [--seq-len 4096] [--d-model 256] [--tp 2] [--json OUT]

Each of `--tp` processes (gloo) holds the hidden states (1, seq, d_model) and its vocab shard of the head,
then runs the loss forward and backward: `parallel_linear_loss` (trainer/parallel/tensor.py), and the
path it replaced, the shard's full logits then megatron-core's vocab_parallel_cross_entropy. The extra
memory is the rise of the process's peak resident set over what it held before the loss (the peak is
reset first through /proc/self/clear_refs), against the size of the full float32 logits of one sequence
(seq x vocab x 4 bytes), the figure a loss that materialises them pays on one rank.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MIB = 2**20


def _resident_peak() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _resident_now() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _extra_peak(step) -> tuple[int, float]:
    """(bytes the peak resident set rose above the current one while step() ran, seconds)."""
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from what is resident now
    before = _resident_now()
    start = time.perf_counter()
    step()
    return _resident_peak() - before, time.perf_counter() - start


def _logits_path(hidden, weight, targets, mesh):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from longtrain.trainer.parallel.tensor import copy_to_tensor_parallel
    logits = torch.nn.functional.linear(copy_to_tensor_parallel(hidden, mesh.tp_group), weight).float()
    return vocab_parallel_cross_entropy(logits, targets).mean()


def measure(rank: int, vocab: int, seq_len: int, d_model: int, tp: int) -> dict:
    """Run on every rank of a tp group already joined: {path: (extra bytes, seconds)} for this rank."""
    from longtrain.trainer.parallel.mesh import build_mesh
    from longtrain.trainer.parallel.tensor import parallel_linear_loss

    torch.set_num_threads(1)
    mesh = build_mesh(tp=tp)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, seq_len, d_model, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, d_model, generator=generator) * 0.02)[rank * vocab // tp:(rank + 1) * vocab // tp]
    weight = weight.clone().requires_grad_()
    targets = torch.randint(0, vocab, (1, seq_len), generator=generator)
    paths = {"ours (chunked, vocab-parallel)": lambda: parallel_linear_loss(hidden, weight, targets, mesh).backward(),
             "logits + megatron vocab_parallel_cross_entropy": lambda: _logits_path(hidden, weight, targets, mesh).backward()}
    out = {}
    for name, step in paths.items():
        hidden.grad = weight.grad = None
        step()  # warm-up: the allocator's first growth and the group's buffers are not the loss's memory
        hidden.grad = weight.grad = None
        dist.barrier()
        out[name] = _extra_peak(step)
    mesh.destroy()
    return out


def _worker(rank, tp, port, out_dir, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp))
    dist.init_process_group("gloo", rank=rank, world_size=tp, timeout=datetime.timedelta(seconds=600))
    try:
        torch.save(measure(rank, *args), Path(out_dir) / f"{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(vocab: int, seq_len: int, d_model: int, tp: int) -> list[dict]:
    """measure() on tp fresh processes; one dict per rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(tp, port, out_dir, (vocab, seq_len, d_model, tp)), nprocs=tp,
                           start_method="spawn")
        return [torch.load(Path(out_dir) / f"{rank}.pt") for rank in range(tp)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    ranks = run(args.vocab, args.seq_len, args.d_model, args.tp)
    full_logits = args.seq_len * args.vocab * 4
    print(f"vocab {args.vocab}, seq {args.seq_len}, d_model {args.d_model}, tp={args.tp}: the full float32 logits "
          f"are {full_logits / MIB:.0f} MiB")
    print(f"{'loss':<50} {'extra MiB (worst rank)':>22} {'/ full logits':>14} {'seconds':>8}")
    rows = {}
    for name in ranks[0]:
        extra = max(r[name][0] for r in ranks)
        seconds = max(r[name][1] for r in ranks)
        rows[name] = {"extra_bytes": extra, "seconds": seconds, "fraction_of_full_logits": extra / full_logits}
        print(f"{name:<50} {extra / MIB:>22.1f} {extra / full_logits:>14.3f} {seconds:>8.2f}")
    ours, theirs = (rows[name]["extra_bytes"] for name in ranks[0])
    print(f"ours / logits path: {ours / theirs:.3f}x the memory")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "full_logits_bytes": full_logits, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
