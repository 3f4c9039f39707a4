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


def _scan_results(inputs, backend, device, dtype, cotangents, reset=None):
    leaves = {name: None if x is None else x.to(device, torch.float32 if name == "A" else dtype).detach().requires_grad_()
              for name, x in inputs.items()}
    out, last = scan_module.selective_scan(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
        delta_bias=leaves["delta_bias"], delta_softplus=True, return_last_state=True,
        initial_state=leaves["initial_state"], backend=backend, reset=None if reset is None else reset.to(device))
    torch.autograd.backward([out, last], [cotangents[0].to(out), cotangents[1].to(last)])
    results = {"out": out, "last_state": last, **{f"d{name}": x.grad for name, x in leaves.items() if x is not None}}
    return {name: x.double() for name, x in results.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, dim, state, seq", [(2, 16, 8, 100), (1, 64, 16, 1000), (1, 8, 32, 257)])
@pytest.mark.parametrize("with_resets", [False, True])
def test_cuda_scan_matches_float64_reference(batch, dim, state, seq, dtype, with_resets):
    generator = torch.Generator().manual_seed(batch + dim + state + seq)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    inputs = {"u": randn(batch, dim, seq), "delta": randn(batch, dim, seq, scale=0.5),
              "A": -torch.rand(dim, state, generator=generator).mul(2).add(0.1),
              "B": randn(batch, state, seq), "C": randn(batch, state, seq), "D": randn(dim),
              "z": randn(batch, dim, seq), "delta_bias": randn(dim, scale=0.3), "initial_state": randn(batch, dim, state)}
    cotangents = (randn(batch, dim, seq), randn(batch, dim, state))
    reset = None
    if with_resets:  # document starts at t = 0, on both sides of a 32-step chunk boundary, mid-chunk, last step
        reset = torch.zeros(batch, seq, dtype=torch.bool)
        reset[0, [0, 31, 32, 50, seq - 1]] = True
        reset[-1, [5, 64]] = True
    cuda = torch.device("cuda")
    gold = _scan_results(inputs, "reference", torch.device("cpu"), torch.float64, cotangents, reset)
    base = _scan_results(inputs, "reference", cuda, dtype, cotangents, reset)
    fast = _scan_results(inputs, "csrc", cuda, dtype, cotangents, reset)
    _assert_rule(gold, base, fast)


def _flash_results(q, k, v, causal, device, dtype, d_out, backend):
    """out, lse and the gradients of <out, d_out> (flash_attn passes no gradient through its lse)."""
    leaves = [x.to(device, dtype).detach().requires_grad_() for x in (q, k, v)]
    if backend == "flash_attn":
        out, lse = attention_module.attention(*leaves, causal=causal, return_lse=True, backend="flash_attn")
    else:  # the reference with 16-bit products, as flash-attn's own tests measure against (upcast=False)
        out, lse = attention_module.reference(*leaves, causal=causal, upcast=backend != "low")
    out.backward(d_out.to(device, out.dtype))
    results = {"out": out, "lse": lse, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    return {name: x.double() for name, x in results.items()}


def _flash_inputs(shape, seed):
    batch, seq_q, seq_k, heads, kv_heads, dim = shape
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, dim, generator=generator)
    k, v = (torch.randn(batch, seq_k, kv_heads, dim, generator=generator) for _ in range(2))
    return q, k, v, torch.randn(batch, seq_q, heads, dim, generator=generator, dtype=torch.float64)


def _skip_without_flash_attn(dtype):
    reason = attention_module._flash_attn_supports(device=torch.device("cuda"), dtype=dtype, head_dim=64)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_lse_matches_float64_reference(causal, dtype):
    """The flash_attn backend (flash-attn's _flash_attn_forward / _flash_attn_backward): out, lse, gradients."""
    _skip_without_flash_attn(dtype)
    q, k, v, d_out = _flash_inputs((2, 300, 333, 8, 2, 64), seed=int(causal))
    cuda = torch.device("cuda")
    gold = _flash_results(q, k, v, causal, torch.device("cpu"), torch.float64, d_out, "reference")
    base = _flash_results(q, k, v, causal, cuda, dtype, d_out, "low")
    fast = _flash_results(q, k, v, causal, cuda, dtype, d_out, "flash_attn")
    _assert_rule(gold, base, fast)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attn_blocks_merged_by_lse(dtype):
    """Ring attention's use of flash-attn on one GPU: two key blocks (the earlier one whole, the diagonal one
    causal) run forward separately, merged by their lse; each block's backward is handed the merged out and
    lse (trainer/parallel/ring.py). The result equals one causal attention over all keys."""
    from longtrain.kernels.attention import flash_attn_backward, flash_attn_forward

    _skip_without_flash_attn(dtype)
    cuda = torch.device("cuda")
    q, k, v, d_out = _flash_inputs((1, 256, 512, 8, 2, 64), seed=7)
    gold = _flash_results(q, k, v, True, torch.device("cpu"), torch.float64, d_out, "reference")
    base = _flash_results(q, k, v, True, cuda, dtype, d_out, "low")
    qd, kd, vd = (x.to(cuda, dtype) for x in (q, k, v))
    blocks = [(kd[:, :256], vd[:, :256], False), (kd[:, 256:], vd[:, 256:], True)]
    parts = [flash_attn_forward(qd, kb, vb, causal, None) for kb, vb, causal in blocks]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    out = sum(o.float() * torch.exp(l - lse).transpose(1, 2).unsqueeze(-1) for o, l in parts)
    grads = [flash_attn_backward(d_out.to(cuda, dtype), qd, kb, vb, out.to(dtype), lse, causal, None)
             for kb, vb, causal in blocks]
    fast = {"out": out.double(), "lse": lse.double(), "dq": sum(g[0].double() for g in grads),
            "dk": torch.cat([g[1] for g in grads], dim=1).double(), "dv": torch.cat([g[2] for g in grads], dim=1).double()}
    _assert_rule(gold, base, fast)
