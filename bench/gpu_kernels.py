"""Our attention and scan kernels on one device, side by side with the peers installed there.

    python bench/gpu_kernels.py                     # CUDA: csrc vs torch SDPA (and flash-attn, mamba-ssm)
    python bench/gpu_kernels.py --device cpu --quick    # the plumbing, tiny sizes (bench/gpu_smoke.sh --dry-run)

Attention: causal, batch 1, 16 heads of 128, bfloat16 (float32 on CPU), forward + backward. Scan: batch 1,
d_inner 2048, state 16, forward + backward. Each figure is the fastest of --repeats timed runs after a
warm-up; the last column is the kernel's rate against the device's measured bfloat16 matmul rate.
"""
from __future__ import annotations

import argparse
import time

import torch


def timed(fn, device: torch.device, repeats: int) -> float:
    """Fastest wall time of fn() in seconds, after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / timed(lambda: a @ b, device, repeats)


def attention_rows(device, dtype, seq_lens, repeats):
    from longtrain.kernels import attention as attention_module

    heads, dim = 16, 128
    # flash_attn: its lse-returning _flash_attn_forward / _flash_attn_backward, as ring attention runs them
    usable = attention_module._flash_attn_supports(device=device, dtype=dtype, head_dim=dim) is None
    backends = ["csrc", "torch"] + (["flash_attn"] if usable else [])
    for seq in seq_lens:
        q, k, v = (torch.randn(1, seq, heads, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        flops = 4 * seq * seq * heads * dim / 2 * 3.5  # causal: half the scores; fwd + bwd = 3.5x the forward
        for backend in backends:
            def step():
                out = attention_module.attention(q, k, v, causal=True, backend=backend)
                out.backward(torch.ones_like(out))
            yield f"attention {seq}", backend, timed(step, device, repeats), flops


def scan_rows(device, dtype, seq_lens, repeats):
    from longtrain.kernels import scan as scan_module

    dim, state = 2048, 16
    backends = ["csrc"] + (["mamba_ssm"] if _importable("mamba_ssm") and device.type == "cuda" else [])
    for seq in seq_lens:
        def leaf(*shape):
            return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
        u, delta, B, C = leaf(1, dim, seq), leaf(1, dim, seq), leaf(1, state, seq), leaf(1, state, seq)
        A = (-torch.rand(dim, state, device=device)).requires_grad_()
        flops = 9 * dim * state * seq * 3  # the recurrence's multiply-adds, fwd + bwd
        for backend in backends:
            def step():
                out = scan_module.selective_scan(u, delta, A, B, C, delta_softplus=True, backend=backend)
                out.backward(torch.ones_like(out))
            yield f"scan {seq}", backend, timed(step, device, repeats), flops


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing, measures nothing")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attention_lens, scan_lens = ([64], [64]) if args.quick else ([4096, 16384], [4096, 16384])
    peak = matmul_rate(device, dtype, 256 if args.quick else 8192, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}: measured {str(dtype).removeprefix('torch.')} matmul rate {peak / 1e12:.1f} TFLOP/s")
    print(f"{'kernel':<16} {'backend':<12} {'ms':>9} {'csrc speed-up':>14} {'of matmul rate':>15}")
    rows = list(attention_rows(device, dtype, attention_lens, args.repeats)) + list(
        scan_rows(device, dtype, scan_lens, args.repeats))
    ours = {kernel: seconds for kernel, backend, seconds, _ in rows if backend == "csrc"}
    for kernel, backend, seconds, flops in rows:
        print(f"{kernel:<16} {backend:<12} {seconds * 1e3:>9.2f} {seconds / ours[kernel]:>13.2f}x "
              f"{flops / seconds / peak:>14.1%}")


if __name__ == "__main__":
    main()
