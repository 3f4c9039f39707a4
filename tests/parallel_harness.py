"""Run a function on N real processes joined in a gloo group, and collect what each rank returns.

    results = run_ranks(fn, world=4, args=(...))   # fn(rank, world, *args) -> picklable (torch.save) value
fn must live at module level of an importable module (spawned children import it). Each process
uses one thread; a hung collective fails after `timeout_s` instead of blocking the suite.
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, world, port, out_dir, args, timeout_s, deepspeed):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if deepspeed:  # the training loop's own initialisation (DeepSpeed's comm over gloo)
        from longtrain.trainer.engine import init_distributed
        init_distributed(timeout_s=timeout_s)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"{rank}.pt")
        dist.barrier()  # leave together: a rank tearing gloo down under a peer's pending op aborts the peer
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, args: tuple = (), timeout_s: float = 240.0, deepspeed: bool = False) -> list:
    """fn(rank, world, *args) on `world` spawned gloo processes; returns the per-rank results in rank order.
    With deepspeed=True the group is made by the training loop's init_distributed (DeepSpeed comm)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(fn, world, _free_port(), out_dir, args, timeout_s, deepspeed), nprocs=world,
                           join=True, start_method="spawn")
        return [torch.load(Path(out_dir) / f"{rank}.pt", weights_only=False) for rank in range(world)]


def split_decoder_pairs(model, world: int, rank: int, group, seq: int, vocab: int = 64):
    """A float64 Decoder against its context-parallel copy on this rank's zigzag slice: the same tokens and
    output weights on every rank (seeded by the caller). Returns (tokens, full logits, [(what, split value,
    unsplit value)]): the rank's logits, then every parameter's gradient summed over the ranks."""
    import copy

    from longtrain.trainer.parallel.context import apply_context_parallel, zigzag_split

    split_model = apply_context_parallel(copy.deepcopy(model), group)
    tokens = torch.randint(0, vocab, (2, seq))
    weights = torch.randn(2, seq, vocab, dtype=torch.float64)
    logits = model(tokens)
    (logits * weights).sum().backward()
    local_logits = split_model(zigzag_split(tokens, world, rank))
    (local_logits * zigzag_split(weights, world, rank)).sum().backward()
    pairs = [("logits", local_logits, zigzag_split(logits, world, rank))]
    for (name, p), p_split in zip(model.named_parameters(), split_model.parameters()):
        grad = p_split.grad.clone()
        dist.all_reduce(grad)  # each rank holds the gradient of its own tokens' share of the loss
        pairs.append((name, grad, p.grad))
    return tokens, logits, pairs
