"""Sliding-window attention under context parallelism: the fetched tails and sinks against the ring.

Two gloo processes on the CPU (cp=2, one thread each) run attention forward + backward over a zigzag-split
sequence on the csrc kernel, float32. For each window W (flash-attn's window_size = (W - 1, 0), with
`--sinks` attention sinks) three ways are timed after one warm-up call each, taking turns in each round
(best of `--repeats`):
- `ring_attention` with the window: for W - 1 <= chunk it fetches each chunk's last W - 1 keys and its sinks
  (`_WindowAttention`), beyond that it runs the ring and skips the blocks outside the window;
- the ring with the same window (every K/V block travels; blocks outside the window skipped);
- the ring without a window (full causal attention), for scale.
The K/V bytes are those each rank sends per step, forward + backward (`attention_traffic`), the larger rank's.

    python bench/ring_window.py                          # seq 8192, windows 256, 1024, 2048, 4096
    python bench/ring_window.py --seq 2048 --windows 128 --repeats 1
"""
import argparse
import datetime
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CP = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(q, k, v, grad, **masks) -> tuple[float, int]:
    """(seconds, K/V bytes sent) of one forward + backward."""
    from longtrain.trainer.parallel.ring import attention_traffic

    for x in (q, k, v):
        x.grad = None
    attention_traffic.reset()
    dist.barrier()
    start = time.perf_counter()
    out = masks.pop("call")(q, k, v, **masks)
    out.backward(grad)
    seconds = time.perf_counter() - start
    return seconds, attention_traffic.forward_kv + attention_traffic.backward_kv


def _measure(rank, args) -> list[dict]:
    from longtrain.trainer.parallel.ring import _RingAttention, ring_attention
    from longtrain.trainer.parallel.zigzag import zigzag_split

    group = dist.group.WORLD
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.seq, args.heads, args.head_dim, generator=generator)
    k, v = (torch.randn(1, args.seq, args.kv_heads, args.head_dim, generator=generator) for _ in range(2))
    grad = torch.randn(1, args.seq, args.heads, args.head_dim, generator=generator)
    q, k, v = (zigzag_split(x, CP, rank).requires_grad_() for x in (q, k, v))
    grad = zigzag_split(grad, CP, rank)
    rows = []
    for window in args.windows:
        ways = {
            "windowed": dict(call=ring_attention, group=group, backend="csrc", window=(window - 1, 0),
                             sinks=args.sinks),
            "ring": dict(call=lambda q, k, v: _RingAttention.apply(q, k, v, group, "csrc", None, None, window - 1,
                                                                    args.sinks)),
            "ring full": dict(call=ring_attention, group=group, backend="csrc"),
        }
        best = {name: (float("inf"), 0) for name in ways}
        for masks in ways.values():  # warm-up: first calls allocate and spin up the kernel's threads
            _step(q, k, v, grad, **dict(masks))
        for _ in range(args.repeats):
            for name, masks in ways.items():
                seconds, sent = _step(q, k, v, grad, **dict(masks))
                best[name] = (min(best[name][0], seconds), sent)
        rows.append({"window": window, **best})
    return rows


def _worker(rank, port, out_dir, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=CP, timeout=datetime.timedelta(seconds=900))
    try:
        torch.save(_measure(rank, args), Path(out_dir) / f"{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--windows", type=lambda s: [int(w) for w in s.split(",")], default=[256, 1024, 2048, 4096])
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(_free_port(), out_dir, args), nprocs=CP, join=True, start_method="spawn")
        ranks = [torch.load(Path(out_dir) / f"{rank}.pt") for rank in range(CP)]
    chunk = args.seq // (2 * CP)
    print(f"cp={CP} (gloo, CPU, 1 thread per rank), seq {args.seq}, {args.heads} heads on {args.kv_heads} kv heads of "
          f"{args.head_dim}, float32 csrc, {args.sinks} sinks; K/V MiB sent per rank per step (fwd+bwd, larger rank)")
    print(f"{'window':>7} {'chunk':>6} {'path':>7} {'MiB win':>9} {'MiB ring':>9} {'ratio':>7} "
          f"{'ms win':>8} {'ms ring':>8} {'ms full':>8}")
    for rows in zip(*ranks):
        window = rows[0]["window"]
        sent = {name: max(r[name][1] for r in rows) / 2**20 for name in ("windowed", "ring")}
        ms = {name: max(r[name][0] for r in rows) * 1e3 for name in ("windowed", "ring", "ring full")}
        path = "fetch" if window - 1 <= chunk else "ring"
        print(f"{window:>7} {chunk:>6} {path:>7} {sent['windowed']:>9.3f} {sent['ring']:>9.3f} "
              f"{sent['windowed'] / sent['ring']:>7.3f} {ms['windowed']:>8.1f} {ms['ring']:>8.1f} "
              f"{ms['ring full']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
