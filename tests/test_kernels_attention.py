"""The csrc attention against the reference evaluated in float64 (flash-attn's test rule).

gold = reference in float64, base = reference in the test dtype, fast = csrc in the test dtype;
for out, lse and every input gradient (with cotangents on both out and lse):
max|fast - gold| <= 2 max|base - gold| + atol, atol = 1e-5 * max|gold|.
The reference computes bfloat16 inputs in float32, so a bfloat16 csrc run must match a float32
computation of its inputs to within twice the error of rounding the results to bfloat16.
bfloat16 runs both CPU paths. With products in float32 every result meets that rule. With bfloat16
products and float32 accumulation (LONGTRAIN_CPU_BF16_GEMM=1: AVX512-BF16 where the CPU has it,
portable loops otherwise; "portable": those loops everywhere) out and lse meet it too; the input gradients, for which P and dS are rounded
to bfloat16 before their products as in flash-attn, meet flash-attn's own rule: base is then the
reference with bfloat16 products (a plain PyTorch attention in bfloat16).
"""
import functools
import math
import os
import subprocess
import sys

import pytest
import torch

from longtrain.kernels import attention as attention_module
from longtrain.kernels.attention import attention
from longtrain.kernels.registry import BackendError

pytestmark = pytest.mark.skipif(
    attention_module.registry.select(None, torch.device("cpu"), torch.float32, need_lse=True).name != "csrc",
    reason="extension longtrain.kernels._C not built")


def run(q, k, v, cast, backend, causal, cotangents, **masks):
    """out, lse and the q/k/v gradients (float64) of one backend for the given cotangents; masks: window,
    sinks, doc_q/doc_k, q_start/k_start (tests/test_attention_masks.py)."""
    leaves = [cast(x).detach().requires_grad_() for x in (q, k, v)]
    if callable(backend):
        out, lse = backend(*leaves, causal=causal, **masks)
    else:
        out, lse = attention(*leaves, causal=causal, return_lse=True, backend=backend, **masks)
    finite = torch.isfinite(lse)
    # Rows that see no key have lse = -inf; they carry no lse gradient.
    loss = (out.double() * cotangents[0]).sum() + (lse.double().where(finite, 0) * cotangents[1]).sum()
    loss.backward()
    results = {"out": out, "lse": lse.where(finite, 0), "dq": leaves[0].grad, "dk": leaves[1].grad,
               "dv": leaves[2].grad}
    return {name: x.double() for name, x in results.items()}, finite


def check_against_gold(batch, seq_q, seq_k, heads, kv_heads, dim, causal, dtype, seed, bf16_products=False):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, dim, generator=generator).to(dtype)
    k = torch.randn(batch, seq_k, kv_heads, dim, generator=generator).to(dtype)
    v = torch.randn(batch, seq_k, kv_heads, dim, generator=generator).to(dtype)
    cotangents = (torch.randn(batch, seq_q, heads, dim, generator=generator, dtype=torch.float64),
                  torch.randn(batch, heads, seq_q, generator=generator, dtype=torch.float64))
    gold, gold_finite = run(q, k, v, lambda x: x.double(), "reference", causal, cotangents)
    base, _ = run(q, k, v, lambda x: x, "reference", causal, cotangents)
    if bf16_products:
        low = functools.partial(attention_module.reference, upcast=False)
        base_low, _ = run(q, k, v, lambda x: x, low, causal, cotangents)
        base = {name: base[name] if name in ("out", "lse") else base_low[name] for name in base}
    fast, fast_finite = run(q, k, v, lambda x: x, "csrc", causal, cotangents)
    assert torch.equal(fast_finite, gold_finite), "rows with no visible key must have lse = -inf"
    for name in gold:
        atol = 1e-5 * gold[name].abs().max().item()
        fast_err = (fast[name] - gold[name]).abs().max().item()
        base_err = (base[name] - gold[name]).abs().max().item()
        assert fast_err <= 2 * base_err + atol, f"{name}: csrc error {fast_err:.3g} vs reference {base_err:.3g}"


SHAPES = [  # batch, seq_q, seq_k, heads, kv_heads, dim
    (1, 1, 1, 2, 2, 16),
    (2, 77, 77, 4, 2, 32),       # seq not a multiple of any tile
    (1, 129, 300, 4, 1, 64),     # seq_q < seq_k, GQA ratio 4
    (1, 300, 129, 2, 2, 64),     # seq_q > seq_k: causal rows that see no key
    (1, 200, 200, 8, 4, 40),     # GQA ratio 2, odd head dim
    (1, 800, 1000, 2, 1, 32),    # long enough for the 256-row query tiles
]


PATHS = [  # dtype, LONGTRAIN_CPU_BF16_GEMM
    pytest.param(torch.float32, None, id="float32"),
    pytest.param(torch.bfloat16, "0", id="bfloat16-f32-products"),
    pytest.param(torch.bfloat16, "1", id="bfloat16-bf16-products"),
    pytest.param(torch.bfloat16, "portable", id="bfloat16-bf16-products-portable"),
]


@pytest.mark.parametrize("dtype, bf16_gemm", PATHS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_attention_matches_float64_reference(shape, causal, dtype, bf16_gemm, monkeypatch):
    if bf16_gemm is not None:
        monkeypatch.setenv("LONGTRAIN_CPU_BF16_GEMM", bf16_gemm)
    check_against_gold(*shape, causal=causal, dtype=dtype, seed=sum(shape) + causal,
                       bf16_products=bf16_gemm in ("1", "portable"))


@pytest.mark.parametrize("mode", ["1", "portable"])
def test_bf16_products_odd_lengths_and_tiles(mode, monkeypatch):
    """Odd query and key counts (zero-padded k-pairs), tiles of 256 rows and a partial 512-key tile."""
    monkeypatch.setenv("LONGTRAIN_CPU_BF16_GEMM", mode)
    check_against_gold(2, 777, 1031, 4, 2, 64, causal=True, dtype=torch.bfloat16, seed=5, bf16_products=True)
    check_against_gold(1, 33, 17, 2, 1, 16, causal=False, dtype=torch.bfloat16, seed=6, bf16_products=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, bf16_gemm", PATHS)
def test_attention_long_sequence(dtype, bf16_gemm, monkeypatch):
    if bf16_gemm is not None:
        monkeypatch.setenv("LONGTRAIN_CPU_BF16_GEMM", bf16_gemm)
    check_against_gold(1, 1500, 1700, 4, 2, 64, causal=True, dtype=dtype, seed=1,
                       bf16_products=bf16_gemm in ("1", "portable"))


def test_default_scale_and_output_only():
    q, k, v = (torch.randn(1, 50, 2, 16) for _ in range(3))
    out = attention(q, k, v, causal=True, backend="csrc")
    expected, _ = attention_module.reference(q, k, v, causal=True, softmax_scale=1 / math.sqrt(16))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_named_backends():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(BackendError, match="valid choices: auto, flash_attn, csrc, torch, reference"):
        attention(q, q, q, backend="no_such_backend")
    with pytest.raises(BackendError, match="valid choices here: auto, csrc, reference"):
        attention(q, q, q, return_lse=True, backend="torch")
    with pytest.raises(BackendError, match="CUDA only"):
        attention(q, q, q, backend="flash_attn")


@pytest.mark.slow
def test_peak_memory_grows_linearly():
    """Forward and backward at 4x the sequence length use about 4x the extra memory, not 16x."""
    script = """
import sys, torch
from longtrain.kernels.attention import attention
def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
seq = int(sys.argv[1])
q, k, v = (torch.randn(1, seq, 8, 64, requires_grad=True) for _ in range(3))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident size
before = status("VmRSS")
attention(q, k, v, causal=True, backend="csrc").sum().backward()
print(status("VmHWM") - before)
"""
    # Large blocks go straight back to the OS, so the peak is this call's own.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    growth = [int(subprocess.run([sys.executable, "-c", script, str(seq)], capture_output=True, text=True, env=env,
                                 check=True).stdout) for seq in (2048, 8192)]
    assert 0 < growth[1] < 8 * growth[0], f"peak memory growth {growth} KiB is not linear in the sequence length"
