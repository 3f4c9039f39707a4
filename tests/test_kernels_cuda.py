"""The CUDA kernels against the reference evaluated in float64, on a GPU (flash-attn's test rule).

gold = reference in float64 (on the CPU), base = reference in the test dtype on the GPU, fast = our
csrc CUDA kernel in the test dtype; for every output and input gradient:
max|fast - gold| <= 2 max|base - gold| + atol, atol = 1e-5 * max|gold|.
These need a GPU and the CUDA build of the extension: bench/gpu_smoke.sh runs them there. On a machine
without CUDA they are reported as skipped; tests/test_kernels_nvcc.py still compiles the sources.
"""
import pytest
import torch

from longtrain.kernels import attention as attention_module
from longtrain.kernels import scan as scan_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _assert_rule(gold: dict, base: dict, fast: dict) -> None:
    for name in gold:
        atol = 1e-5 * gold[name].abs().max().item()
        fast_err = (fast[name].cpu() - gold[name]).abs().max().item()
        base_err = (base[name].cpu() - gold[name]).abs().max().item()
        assert fast_err <= 2 * base_err + atol, f"{name}: csrc error {fast_err:.3g} vs reference {base_err:.3g}"


def _attention_results(q, k, v, causal, backend, device, dtype, cotangents):
    leaves = [x.to(device, dtype).detach().requires_grad_() for x in (q, k, v)]
    out, lse = attention_module.attention(*leaves, causal=causal, return_lse=True, backend=backend)
    finite = torch.isfinite(lse)
    d_out, d_lse = (c.to(device) for c in cotangents)
    loss = (out.double() * d_out).sum() + (lse.double().where(finite, 0) * d_lse).sum()
    loss.backward()
    results = {"out": out, "lse": lse.where(finite, 0), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    return {name: x.double() for name, x in results.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 77, 77, 4, 2, 32), (1, 129, 300, 4, 1, 64), (1, 1000, 1000, 8, 4, 128)])
def test_cuda_attention_matches_float64_reference(shape, causal, dtype):
    batch, seq_q, seq_k, heads, kv_heads, dim = shape
    generator = torch.Generator().manual_seed(sum(shape) + causal)
    q = torch.randn(batch, seq_q, heads, dim, generator=generator)
    k, v = (torch.randn(batch, seq_k, kv_heads, dim, generator=generator) for _ in range(2))
    cotangents = (torch.randn(batch, seq_q, heads, dim, generator=generator, dtype=torch.float64),
                  torch.randn(batch, heads, seq_q, generator=generator, dtype=torch.float64))
    cuda = torch.device("cuda")
    gold = _attention_results(q, k, v, causal, "reference", torch.device("cpu"), torch.float64, cotangents)
    base = _attention_results(q, k, v, causal, "reference", cuda, dtype, cotangents)
    fast = _attention_results(q, k, v, causal, "csrc", cuda, dtype, cotangents)
    _assert_rule(gold, base, fast)


def _scan_results(inputs, backend, device, dtype, cotangents):
    leaves = {name: None if x is None else x.to(device, torch.float32 if name == "A" else dtype).detach().requires_grad_()
              for name, x in inputs.items()}
    out, last = scan_module.selective_scan(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
        delta_bias=leaves["delta_bias"], delta_softplus=True, return_last_state=True,
        initial_state=leaves["initial_state"], backend=backend)
    torch.autograd.backward([out, last], [cotangents[0].to(out), cotangents[1].to(last)])
    results = {"out": out, "last_state": last, **{f"d{name}": x.grad for name, x in leaves.items() if x is not None}}
    return {name: x.double() for name, x in results.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, dim, state, seq", [(2, 16, 8, 100), (1, 64, 16, 1000), (1, 8, 32, 257)])
def test_cuda_scan_matches_float64_reference(batch, dim, state, seq, dtype):
    generator = torch.Generator().manual_seed(batch + dim + state + seq)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    inputs = {"u": randn(batch, dim, seq), "delta": randn(batch, dim, seq, scale=0.5),
              "A": -torch.rand(dim, state, generator=generator).mul(2).add(0.1),
              "B": randn(batch, state, seq), "C": randn(batch, state, seq), "D": randn(dim),
              "z": randn(batch, dim, seq), "delta_bias": randn(dim, scale=0.3), "initial_state": randn(batch, dim, state)}
    cotangents = (randn(batch, dim, seq), randn(batch, dim, state))
    cuda = torch.device("cuda")
    gold = _scan_results(inputs, "reference", torch.device("cpu"), torch.float64, cotangents)
    base = _scan_results(inputs, "reference", cuda, dtype, cotangents)
    fast = _scan_results(inputs, "csrc", cuda, dtype, cotangents)
    _assert_rule(gold, base, fast)
