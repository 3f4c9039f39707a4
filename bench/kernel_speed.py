"""Kernel benchmark: our csrc scan and attention side by side with what a CPU user has today.

    python bench/kernel_speed.py [--mamba-src DIR] [--threads N] [--quick]

Prints one table per op: forward + backward time and peak extra memory of ours and of each peer,
the ratio peer / ours, and ours against the machine's measured limits (memory bandwidth for the
scan, float32 matmul FLOP/s for attention). Each sequence length runs in a fresh subprocess in
which the implementations take turns, round by round, so a busy machine slows them alike; peak
memory is each one's own high-water mark (glibc is told to return large blocks to the OS).

Scan peers: mamba-ssm's `selective_scan_ref` (loaded from an installed mamba_ssm, or from its
source tree via --mamba-src, with its CUDA module and triton import stubbed; its backward grows
with the square of the sequence, so it runs at L <= 512 only) and the step-by-step PyTorch loop
of transformers' Mamba slow path (the same algorithm as kernels/scan.py's `reference`).
Attention peers: torch SDPA (flash-style CPU kernel) and naive attention (`reference`), in float32;
then ours against SDPA in bfloat16, against the measured bfloat16 matmul rate. Last, the fused CPU
kernels of the layers (RMSNorm, SwiGLU, rotary, cross-entropy) against the torch ops they replace.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types

import torch

SCAN_SHAPE = dict(batch=2, dim=256, state=16)
ATTENTION_SHAPE = dict(batch=1, heads=8, head_dim=64)


# ----------------------------------------------------------------------------- peers
def load_mamba_ref(mamba_src: str | None):
    """mamba-ssm's selective_scan_ref, importing only what it needs; None when unavailable."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    layer_norm = types.ModuleType("mamba_ssm.ops.triton.layer_norm")
    layer_norm._layer_norm_fwd = None  # imported by the module, unused by selective_scan_ref
    sys.modules.setdefault("mamba_ssm.ops.triton.layer_norm", layer_norm)
    root = mamba_src
    if root is None:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = os.path.dirname(list(spec.submodule_search_locations)[0])
    package = types.ModuleType("mamba_ssm")  # a bare package: mamba_ssm/__init__.py needs triton and CUDA
    package.__path__ = [os.path.join(root, "mamba_ssm")]
    sys.modules["mamba_ssm"] = package
    path = os.path.join(root, "mamba_ssm", "ops", "selective_scan_interface.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("mamba_ssm.ops.selective_scan_interface", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.selective_scan_ref


# ----------------------------------------------------------------------------- one point
def peak_rss_reset() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return read_status("VmRSS")


def read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def scan_point(impl: str, seq: int, mamba_src: str | None):
    from longtrain.kernels.scan import reference, selective_scan

    b, d, n = SCAN_SHAPE["batch"], SCAN_SHAPE["dim"], SCAN_SHAPE["state"]
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(b, d, seq, generator=g), torch.randn(b, d, seq, generator=g) * 0.5 - 1,
              -torch.rand(d, n, generator=g) - 0.1, torch.randn(b, n, seq, generator=g),
              torch.randn(b, n, seq, generator=g), torch.randn(d, generator=g),
              torch.randn(b, d, seq, generator=g), torch.randn(d, generator=g) * 0.1]
    leaves = [x.requires_grad_() for x in leaves]
    u, delta, A, B, C, D, z, bias = leaves
    if impl == "ours":
        run = lambda: selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, backend="csrc")
    elif impl == "loop":
        run = lambda: reference(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)[0]
    else:
        ref = load_mamba_ref(mamba_src)
        run = lambda: ref(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    return run, leaves


def attention_point(impl: str, seq: int):
    import torch.nn.functional as F

    from longtrain.kernels.attention import attention, reference

    b, h, hd = ATTENTION_SHAPE["batch"], ATTENTION_SHAPE["heads"], ATTENTION_SHAPE["head_dim"]
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if impl.endswith("-bf16") else torch.float32
    impl = impl.removesuffix("-bf16")
    leaves = [torch.randn(b, seq, h, hd, generator=g).to(dtype).requires_grad_() for _ in range(3)]
    q, k, v = leaves
    if impl == "ours":
        run = lambda: attention(q, k, v, causal=True, backend="csrc")
    elif impl == "sdpa":
        run = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True).transpose(1, 2)
    else:
        run = lambda: reference(q, k, v, causal=True)[0]
    return run, leaves


def time_once(run, leaves) -> tuple[float, float, int]:
    """Forward and backward seconds of one call, and its peak extra resident memory in bytes."""
    for x in leaves:
        x.grad = None
    base = peak_rss_reset()
    start = time.perf_counter()
    out = run()
    middle = time.perf_counter()
    out.backward(torch.ones_like(out))
    end = time.perf_counter()
    return middle - start, end - middle, read_status("VmHWM") - base


def measure(spec: dict) -> dict:
    """All implementations of one (op, seq), in rounds: each round runs every implementation once
    (those with fewer repeats drop out), so that the machine's load falls on all of them alike.
    Best forward and backward times; peak extra memory of each implementation's first call."""
    torch.set_num_threads(spec["threads"])

    def point(impl, seq):
        return scan_point(impl, seq, spec.get("mamba_src")) if spec["op"] == "scan" else attention_point(impl, seq)

    points, results = {}, {}
    for impl, _ in spec["impls"]:
        try:
            time_once(*point(impl, 64))  # one-time costs (library loading, thread pools) fall outside the timings
            points[impl] = point(impl, spec["seq"])
        except Exception as error:  # a peer that cannot load here is reported, not fatal
            results[impl] = {"error": f"{type(error).__name__}: {error}"}
    for round_index in range(max(repeats for _, repeats in spec["impls"])):
        for impl, repeats in spec["impls"]:
            if impl not in points or round_index >= repeats:
                continue
            fwd, bwd, peak = time_once(*points[impl])
            best = results.setdefault(impl, {"fwd": math.inf, "bwd": math.inf, "peak_mb": peak / 2**20})
            best["fwd"], best["bwd"] = min(best["fwd"], fwd), min(best["bwd"], bwd)
    for result in results.values():
        if "fwd" in result:
            result["total"] = result["fwd"] + result["bwd"]
    return results


def run_point(spec: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    result = subprocess.run([sys.executable, __file__, "--point", json.dumps(spec)], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        error = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        return {impl: {"error": error} for impl, _ in spec["impls"]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- machine limits
def memory_bandwidth() -> float:
    """Bytes per second of a large copy (read + write), best of 10."""
    src = torch.ones(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def matmul_flops(dtype=torch.float32) -> float:
    """FLOP/s of a 2048^3 matrix product in `dtype`, best of 10."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    best = math.inf
    for _ in range(10):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def scan_bytes(seq: int) -> int:
    """Bytes our scan must move at least, fwd + bwd: every (batch, dim, seq) float32 array read or
    written once (fwd: u, delta, z in, out; bwd: u, delta, z, dout in, du, ddelta, dz out)."""
    b, d, n = SCAN_SHAPE["batch"], SCAN_SHAPE["dim"], SCAN_SHAPE["state"]
    return 4 * (11 * b * d * seq + 6 * b * n * seq)


def attention_flops(seq: int) -> float:
    """Matmul FLOPs of causal attention, fwd (QK^T, PV) + bwd (QK^T again, dV, dP, dQ, dK)."""
    b, h, hd = ATTENTION_SHAPE["batch"], ATTENTION_SHAPE["heads"], ATTENTION_SHAPE["head_dim"]
    pairs = seq * (seq + 1) / 2
    return 7 * 2 * b * h * hd * pairs


# ----------------------------------------------------------------------------- tables
def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f} ms" if seconds < 10 else f"{seconds:9.2f} s "


def print_table(title: str, rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def bench_op(op: str, plan: dict[int, list[tuple[str, int]]], mamba_src: str | None, threads: int) -> dict:
    """plan: seq -> [(implementation, repeats)]. Returns {(implementation, seq): result}."""
    results = {}
    for seq, impls in plan.items():
        spec = {"op": op, "seq": seq, "impls": impls, "mamba_src": mamba_src, "threads": threads}
        for impl, result in run_point(spec).items():
            results[(impl, seq)] = result
            print(f"  {op} {impl:>5} L={seq:<6} {result}", file=sys.stderr, flush=True)
    return results


def report(op: str, results: dict, names: dict, limit_name: str, limit_time, base: str = "ours") -> None:
    rows = []
    for seq in sorted({s for _, s in results}):
        ours = results.get((base, seq), {})
        for impl, label in names.items():
            r = results.get((impl, seq))
            if r is None:
                continue
            if "error" in r:
                rows.append([seq, label, "-", "-", "-", "-", r["error"][:60]])
                continue
            ratio = f"{r['total'] / ours['total']:.1f}x" if impl != base and "total" in ours else ""
            limit = f"{limit_time(seq) / r['total']:.1%} of {limit_name}" if impl == base else ""
            rows.append([seq, label, fmt_time(r["fwd"]), fmt_time(r["bwd"]), fmt_time(r["total"]),
                         f"{r['peak_mb']:8.0f} MB", ratio or limit])
    print_table(f"{op}", rows, ["seq", "implementation", "forward", "backward", "fwd+bwd", "peak extra",
                                "peer / ours  (or ours vs machine limit)"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mamba-src", help="source tree of mamba-ssm (holding mamba_ssm/) when it is not installed")
    parser.add_argument("--quick", action="store_true", help="short sequences only (a smoke run)")
    parser.add_argument("--threads", type=int, help="torch threads for every point (default: torch's default)")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.point:
        print(json.dumps(measure(json.loads(args.point))))
        return

    bandwidth, flops, flops_bf16 = memory_bandwidth(), matmul_flops(), matmul_flops(torch.bfloat16)
    mamba_available = load_mamba_ref(args.mamba_src) is not None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; measured copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s, matmul float32 {flops / 1e9:.0f} GFLOP/s, bfloat16 {flops_bf16 / 1e9:.0f} GFLOP/s")
    quick = args.quick
    # seq -> [(implementation, repeats)]; mamba's reference backward is quadratic in the sequence.
    scan_plan = {256: [("ours", 3), ("loop", 2), ("mamba", 1)], 1024: [("ours", 3), ("loop", 2)]} if quick else {
        256: [("ours", 3), ("loop", 2), ("mamba", 1)], 512: [("ours", 3), ("loop", 2), ("mamba", 1)],
        1024: [("ours", 3), ("loop", 2)], 4096: [("ours", 3), ("loop", 1)], 16384: [("ours", 2)]}
    if not mamba_available:
        scan_plan = {seq: [p for p in impls if p[0] != "mamba"] for seq, impls in scan_plan.items()}
    attention_plan = {512: [("ours", 3), ("sdpa", 3), ("naive", 1)], 1024: [("ours", 3), ("sdpa", 3), ("naive", 1)]} \
        if quick else {1024: [("ours", 3), ("sdpa", 3), ("naive", 1)], 4096: [("ours", 3), ("sdpa", 3), ("naive", 1)],
                       16384: [("ours", 2), ("sdpa", 2)]}

    scan_names = {"ours": "ours (csrc)", "loop": "PyTorch step loop (transformers slow path)"}
    if mamba_available:
        scan_names["mamba"] = "mamba-ssm selective_scan_ref"
    report(f"selective scan fwd+bwd, float32, batch {SCAN_SHAPE['batch']}, dim {SCAN_SHAPE['dim']}, "
           f"state {SCAN_SHAPE['state']}, with D, z, delta_bias, softplus"
           + ("" if mamba_available else "  [mamba-ssm not found: step loop only]"),
           bench_op("scan", scan_plan, args.mamba_src, torch.get_num_threads()), scan_names, "copy bandwidth",
           lambda seq: scan_bytes(seq) / bandwidth)
    report(f"attention fwd+bwd, causal, float32, batch {ATTENTION_SHAPE['batch']}, heads {ATTENTION_SHAPE['heads']}, "
           f"head_dim {ATTENTION_SHAPE['head_dim']}",
           bench_op("attention", attention_plan, None, torch.get_num_threads()),
           {"ours": "ours (csrc)", "sdpa": "torch SDPA (flash CPU kernel)", "naive": "naive (materialised scores)"},
           "matmul FLOP/s", lambda seq: attention_flops(seq) / flops)
    # bfloat16: ours multiplies bfloat16 with float32 accumulation where the CPU has AVX512-BF16.
    bf16_plan = {seq: [(impl + "-bf16", repeats) for impl, repeats in impls if impl != "naive"]
                 for seq, impls in attention_plan.items()}
    report(f"attention fwd+bwd, causal, bfloat16, batch {ATTENTION_SHAPE['batch']}, heads {ATTENTION_SHAPE['heads']}, "
           f"head_dim {ATTENTION_SHAPE['head_dim']}",
           bench_op("attention", bf16_plan, None, torch.get_num_threads()),
           {"ours-bf16": "ours (csrc)", "sdpa-bf16": "torch SDPA (flash CPU kernel)"},
           "bfloat16 matmul FLOP/s", lambda seq: attention_flops(seq) / flops_bf16, base="ours-bf16")
    layer_kernels(bandwidth, repeats=3 if quick else 7)


# ----------------------------------------------------------------------------- memory-bound layer kernels
def layer_kernels(bandwidth: float, repeats: int, tokens: int = 4096, d_model: int = 256, hidden: int = 688,
                  heads: int = 4, vocab_chunk: tuple[int, int] = (1048, 4000)) -> None:
    """Our fused CPU kernels (csrc backend) against the torch ops they replace (torch backend), at the
    shapes of bench/train_throughput.py's model at 4k tokens, forward + backward, in one process,
    taking turns. The limit is the bytes each op must move at least (inputs read once, outputs written
    once) over the measured copy bandwidth."""
    from longtrain.kernels import cross_entropy, rms_norm, rotary, swiglu
    from longtrain.kernels.extension import extension
    from longtrain.trainer.model.layers import rotary_tables
    if extension() is None:
        print("\nlayer kernels: extension not built, skipped")
        return
    g = torch.Generator().manual_seed(0)
    cos, sin = rotary_tables(tokens, d_model // heads, 10000.0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        size = torch.finfo(dtype).bits // 8
        x = torch.randn(1, tokens, d_model, generator=g).requires_grad_()
        w = torch.ones(d_model, requires_grad=True)
        gate, up = (torch.randn(1, tokens, hidden, generator=g).to(dtype).requires_grad_() for _ in range(2))
        q = torch.randn(1, tokens, heads, d_model // heads, generator=g).to(dtype).requires_grad_()
        logits = torch.randn(*vocab_chunk, generator=g).to(dtype)
        targets = torch.randint(0, vocab_chunk[1], vocab_chunk[:1], generator=g)

        def norm(backend):
            rms_norm.rms_norm(x, w, 1e-5, out_dtype=dtype, backend=backend).backward(torch.ones(x.shape, dtype=dtype))

        def glu(backend):
            swiglu.swiglu(gate, up, backend=backend).backward(torch.ones_like(gate))

        def rope(backend):
            rotary.apply_rotary(q, cos, sin, backend=backend).backward(torch.ones_like(q))

        def loss(backend):
            cross_entropy.cross_entropy_grad_(logits.clone(), targets, backend=backend)

        n_x, n_h, n_q, n_l = x.numel(), gate.numel(), q.numel(), logits.numel()
        cases = [  # (name, run, least bytes: forward + backward)
            ("RMSNorm (tokens x d_model), out in the run dtype", norm, n_x * (4 + size) + n_x * (size + 4 + 4)),
            ("SwiGLU silu(gate) * up (tokens x hidden)", glu, n_h * 3 * size + n_h * 5 * size),
            ("rotary on q (tokens x heads x head_dim)", rope, n_q * 2 * size * 2),
            ("cross-entropy + gradient, one loss chunk (tokens x vocab)", loss, n_l * 2 * size),
        ]
        for name, run, least in cases:
            best = {"csrc": math.inf, "torch": math.inf}
            for backend in best:  # warm-up: first-call dispatch and allocations
                run(backend)
            for _ in range(repeats):
                for backend in best:
                    for leaf in (x, w, gate, up, q):
                        leaf.grad = None
                    start = time.perf_counter()
                    run(backend)
                    best[backend] = min(best[backend], time.perf_counter() - start)
            rows.append([str(dtype).replace("torch.", ""), name, fmt_time(best["csrc"]), fmt_time(best["torch"]),
                         f"{best['torch'] / best['csrc']:.1f}x", f"{least / bandwidth / best['csrc']:.0%}"])
    print_table(f"memory-bound layer kernels, fwd+bwd, {tokens} tokens, d_model {d_model}, hidden {hidden}, "
                f"{heads} heads (the train_throughput model)", rows,
                ["dtype", "op", "ours (csrc)", "torch ops", "torch / ours", "ours vs copy bandwidth"])


if __name__ == "__main__":
    main()
