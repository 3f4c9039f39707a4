"""Sliding-window attention: our csrc kernel with a window, sinks or documents against full causal attention.

A window of W keys (flash-attn's window_size = (W - 1, 0) with causal) costs seq * W instead of seq^2 / 2, since
the kernel never computes a tile that no query of its tile sees; the ratio to full causal approaches
seq / (2 W) (8 at seq 16k, W 1k). Rows: full causal, the window, the window with 4 attention sinks
(StreamingLLM), and causal documents of W tokens each (packed sequences; each query tile meets its own
document's tiles only). Forward + backward, best of `--repeats` rounds, the implementations taking turns in
each round so that the machine's load falls on all of them alike.

    python bench/attention_window.py                       # 8k and 16k, window 1k, float32 and bfloat16
    python bench/attention_window.py --seqs 4096 --repeats 1
"""
import argparse
import math
import time

import torch

from longtrain.kernels.attention import attention


def document_starts(seq: int, length: int) -> torch.Tensor:
    positions = torch.arange(seq, dtype=torch.int32)
    return (positions - positions % length).unsqueeze(0)


def cases(seq: int, window: int) -> dict:
    docs = document_starts(seq, window)
    return {
        "full causal": dict(causal=True),
        f"window {window}": dict(causal=True, window=(window - 1, 0)),
        f"window {window} + 4 sinks": dict(causal=True, window=(window - 1, 0), sinks=4),
        f"documents of {window}": dict(causal=True, doc_q=docs, doc_k=docs),
    }


def time_once(leaves, masks) -> tuple[float, float]:
    for x in leaves:
        x.grad = None
    start = time.perf_counter()
    out = attention(*leaves, backend="csrc", **masks)
    middle = time.perf_counter()
    out.backward(torch.ones_like(out))
    return middle - start, time.perf_counter() - middle


def measure(seq: int, window: int, dtype: torch.dtype, heads: int, head_dim: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(1, seq, heads, head_dim, generator=g).to(dtype).requires_grad_() for _ in range(3)]
    small = [x.detach()[:, :256].clone().requires_grad_() for x in leaves]
    for masks in cases(256, 64).values():  # thread pool and first-call costs fall outside the timings
        time_once(small, masks)
    best = {name: [math.inf, math.inf] for name in cases(seq, window)}
    for _ in range(repeats):
        for name, masks in cases(seq, window).items():
            fwd, bwd = time_once(leaves, masks)
            best[name] = [min(best[name][0], fwd), min(best[name][1], bwd)]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", default="8192,16384", help="sequence lengths, comma-separated")
    parser.add_argument("--window", type=int, default=1024, help="keys each query sees (window + itself)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1, heads {args.heads}, "
          f"head_dim {args.head_dim}; csrc fwd+bwd, best of {args.repeats}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for seq in (int(s) for s in args.seqs.split(",")):
            best = measure(seq, args.window, dtype, args.heads, args.head_dim, args.repeats)
            full = sum(best["full causal"])
            print(f"\n{dtype_name}, seq {seq}")
            print(f"{'':<26}{'fwd s':>9}{'bwd s':>9}{'total s':>9}{'vs full causal':>16}")
            for name, (fwd, bwd) in best.items():
                print(f"{name:<26}{fwd:>9.3f}{bwd:>9.3f}{fwd + bwd:>9.3f}{full / (fwd + bwd):>15.2f}x")


if __name__ == "__main__":
    main()
