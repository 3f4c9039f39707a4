"""The flash_attn backend and ring attention on it, on CPU, through a stand-in flash_attn module.

The stand-in has flash-attn's lse-returning functions `flash_attn.flash_attn_interface._flash_attn_forward`
and `_flash_attn_backward` with the signatures and return values of 2.6.x (window_size as a pair; 8 values
out of the forward, (dq, dk, dv, softmax_d) out of the backward) or of 2.7.x / 2.8.x (window_size_left and
window_size_right; (out, softmax_lse, S_dmask, rng_state) and softmax_d), read from flash-attn's
flash_attn_interface.py at those tags. It checks each argument as flash-attn's csrc/flash_attn/flash_api.cpp
does (dtypes, devices, shapes, last-dimension strides, the preallocated dq / dk / dv, a contiguous float32
lse) and computes in float64: the forward from the reference, the backward from the `out` and `lse` it is
handed (as the kernel does), so ring attention's use of the merged out and lse is what the tests check.
The backend accepts CPU and float64 only through attention.FLASH_ATTN_DEVICES / FLASH_ATTN_DTYPES.
Also: context parallelism refuses to start on reference kernels it was not asked for.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.distributed as dist

from longtrain.kernels import attention as attention_module
from longtrain.kernels import extension
from longtrain.kernels.registry import BackendError
from longtrain.trainer.config import ModelConfig
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.parallel.context import check_context_parallel_kernels

from parallel_harness import run_ranks

TOL = 1e-6  # float64 throughout, but flash-attn hands the lse over in float32
VERSIONS = ["2.6.3", "2.8.3"]


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"stand-in flash_attn: {message}")


def _check_common(q, k, v):
    _expect(q.dim() == k.dim() == v.dim() == 4, "q, k, v must be 4-d")
    _expect(k.dtype == q.dtype and v.dtype == q.dtype, "query, key and value must have the same dtype")
    _expect(q.dtype in (torch.float16, torch.bfloat16, torch.float64), f"dtype {q.dtype}")
    _expect(k.device == q.device and v.device == q.device, "all tensors on one device")
    _expect(all(t.stride(-1) == 1 for t in (q, k, v)), "Input tensor must have contiguous last dimension")
    batch, seq_q, heads, head_dim = q.shape
    _expect(k.shape[0] == batch and k.shape == v.shape and k.shape[3] == head_dim, "k, v shapes")
    _expect(heads % k.shape[2] == 0, "Number of heads in key/value must divide number of heads in query")
    _expect(head_dim % 8 == 0 and head_dim <= 256, "head_size should be a multiple of 8, at most 256")


def _check_scalars(dropout_p, softmax_scale, causal, window, softcap, alibi_slopes):
    _expect(dropout_p == 0.0 and isinstance(dropout_p, float), f"dropout_p={dropout_p!r}")
    _expect(isinstance(softmax_scale, float), f"softmax_scale must be a float, got {softmax_scale!r}")
    _expect(isinstance(causal, bool), f"causal must be a bool, got {causal!r}")
    _expect(tuple(window) == (-1, -1) and all(type(w) is int for w in window), f"window {window!r}")
    _expect(softcap == 0.0 and isinstance(softcap, float), f"softcap={softcap!r}")
    _expect(alibi_slopes is None, "alibi_slopes")


def _forward(q, k, v, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes, return_softmax):
    _check_common(q, k, v)
    _check_scalars(dropout_p, softmax_scale, causal, window, softcap, alibi_slopes)
    _expect(return_softmax is False, "return_softmax")
    out, lse = attention_module.reference(q.double(), k.double(), v.double(), causal=causal, softmax_scale=softmax_scale)
    return out.to(q.dtype), lse.float().contiguous()


def _backward(dout, q, k, v, out, lse, dq, dk, dv, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes,
              deterministic, rng_state):
    _check_common(q, k, v)
    _check_scalars(dropout_p, softmax_scale, causal, window, softcap, alibi_slopes)
    _expect(isinstance(deterministic, bool), "deterministic must be a bool")
    _expect(rng_state is None or isinstance(rng_state, torch.Tensor), "rng_state")
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    for name, t in (("out", out), ("dout", dout)):
        _expect(t.dtype == q.dtype, f"query and {name} must have the same dtype")
        _expect(t.shape == q.shape and t.stride(-1) == 1 and t.device == q.device, f"{name} shape / layout")
    # flash_api.cpp reads softmax_lse through its data pointer: (batch, heads, seq_q), float32, contiguous
    _expect(lse.dtype == torch.float32 and lse.shape == (batch, heads, seq_q) and lse.is_contiguous(),
            f"softmax_lse must be contiguous float32 {(batch, heads, seq_q)}, got {lse.dtype} {tuple(lse.shape)}")
    for name, grad, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _expect(grad is not None, f"{name} is preallocated by the caller")
        _expect(grad.dtype == q.dtype, f"{name} must have the same dtype as q")
        _expect(grad.shape == like.shape and grad.stride(-1) == 1 and grad.device == q.device, f"{name} shape / layout")
    group = heads // kv_heads
    q64, dout64, out64 = q.double(), dout.double(), out.double()
    k64, v64 = (t.double().repeat_interleave(group, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * softmax_scale
    if causal:
        keep = torch.ones(seq_q, seq_k, dtype=torch.bool).tril(seq_k - seq_q)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.exp(scores - lse.double().unsqueeze(-1))  # from the lse it is handed, as the kernel does
    row = (dout64 * out64).sum(-1).transpose(1, 2)  # D = rowsum(dO * O), from the out it is handed
    d_scores = probs * (torch.einsum("bqhd,bkhd->bhqk", dout64, v64) - row.unsqueeze(-1))
    dq.copy_(torch.einsum("bhqk,bkhd->bqhd", d_scores, k64) * softmax_scale)
    dk.copy_((torch.einsum("bhqk,bqhd->bkhd", d_scores, q64) * softmax_scale)
             .view(batch, seq_k, kv_heads, group, head_dim).sum(3))
    dv.copy_(torch.einsum("bhqk,bqhd->bkhd", probs, dout64).view(batch, seq_k, kv_heads, group, head_dim).sum(3))
    return torch.zeros(batch, heads, (seq_q + 127) // 128 * 128)  # softmax_d, rounded up as flash-attn does


def fake_flash_attn(version: str) -> dict:
    """sys.modules entries of a stand-in flash_attn `version`; its `calls` counts forward and backward calls."""
    calls = {"forward": 0, "backward": 0}
    if version.startswith("2.6"):
        def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                return_softmax):
            calls["forward"] += 1
            out, lse = _forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                return_softmax)
            return out, q, k, v, out, lse, torch.empty(0), torch.zeros(2, dtype=torch.int64)

        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size, softcap, alibi_slopes, deterministic, rng_state=None):
            calls["backward"] += 1
            softmax_d = _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                  window_size, softcap, alibi_slopes, deterministic, rng_state)
            return dq, dk, dv, softmax_d
    else:
        def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                                softcap, alibi_slopes, return_softmax):
            calls["forward"] += 1
            out, lse = _forward(q, k, v, dropout_p, softmax_scale, causal, (window_size_left, window_size_right),
                                softcap, alibi_slopes, return_softmax)
            return out, lse, torch.empty(0), torch.zeros(2, dtype=torch.int64)

        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                                 rng_state=None):
            calls["backward"] += 1
            return _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             (window_size_left, window_size_right), softcap, alibi_slopes, deterministic, rng_state)

    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_forward, interface._flash_attn_backward = _flash_attn_forward, _flash_attn_backward
    package = types.ModuleType("flash_attn")
    package.__version__, package.__path__, package.flash_attn_interface = version, [], interface
    package.calls = calls
    return {"flash_attn": package, "flash_attn.flash_attn_interface": interface}


def _open_to_cpu(setattr_) -> None:
    setattr_(attention_module, "FLASH_ATTN_DEVICES", ("cuda", "cpu"))
    setattr_(attention_module, "FLASH_ATTN_DTYPES", (torch.float16, torch.bfloat16, torch.float64))


@pytest.fixture(params=VERSIONS)
def flash(request, monkeypatch):
    modules = fake_flash_attn(request.param)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    _open_to_cpu(monkeypatch.setattr)
    return modules["flash_attn"]


def _max_err(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


@pytest.mark.parametrize("causal, seq_q, seq_k", [(False, 12, 20), (True, 16, 16), (True, 8, 24)])
def test_flash_path_equals_reference(flash, causal, seq_q, seq_k):
    torch.manual_seed(0)
    q = torch.randn(2, seq_q, 4, 16, dtype=torch.float64)
    k, v = (torch.randn(2, seq_k, 2, 16, dtype=torch.float64) for _ in range(2))
    grad_out = torch.randn_like(q)
    chosen = attention_module.registry.select(None, q.device, q.dtype, head_dim=16, need_lse=True)
    assert chosen.name == "flash_attn"
    results = {}
    for backend in ("flash_attn", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = attention_module.attention(*leaves, causal=causal, softmax_scale=0.3, return_lse=True,
                                              backend=backend)
        out.backward(grad_out)
        results[backend] = (out, lse, *(t.grad for t in leaves))
    assert flash.calls == {"forward": 1, "backward": 1}
    assert results["flash_attn"][1].dtype == torch.float32
    for name, fast, gold in zip(["out", "lse", "dq", "dk", "dv"], results["flash_attn"], results["reference"]):
        assert _max_err(fast.double(), gold) < TOL, name


def test_flash_lse_gradient_is_refused(flash):
    q, k, v = (torch.randn(1, 8, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = attention_module.attention(q, k, v, return_lse=True, backend="flash_attn")
    out.sum().backward(retain_graph=True)  # the lse unused; d out is an expanded tensor (stride 0)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    attention_module.reference(*leaves)[0].sum().backward()
    assert flash.calls["backward"] == 1
    assert all(_max_err(t.grad, gold.grad) < TOL for t, gold in zip((q, k, v), leaves))
    with pytest.raises(RuntimeError, match="'flash_attn' passes no gradient through the log-sum-exp"):
        (out.sum() + lse.sum()).backward()


def test_unsupported_flash_attn_version_is_named(monkeypatch):
    for name, module in fake_flash_attn("2.5.9.post1").items():
        monkeypatch.setitem(sys.modules, name, module)
    _open_to_cpu(monkeypatch.setattr)
    q = torch.randn(1, 8, 2, 8, dtype=torch.float64)
    with pytest.raises(BackendError, match=r"flash_attn 2\.5\.9\.post1 is installed; .* 2\.6, 2\.7, 2\.8"):
        attention_module.attention(q, q, q, return_lse=True, backend="flash_attn")
    assert attention_module.registry.select(None, q.device, q.dtype, head_dim=8, need_lse=True).name == "reference"


def _ring_on_flash(rank, world):
    """Child process: ring attention through the stand-in flash_attn of each version vs one-process reference
    attention; then apply_context_parallel refusing a model whose kernels would be the references."""
    from longtrain.trainer.model.decoder import Decoder
    from longtrain.trainer.parallel.context import apply_context_parallel, ring_attention, zigzag_split

    _open_to_cpu(setattr)
    torch.manual_seed(0)
    seq = 32
    q, k, v = (torch.randn(2, seq, h, 8, dtype=torch.float64) for h in (4, 2, 2))
    grad_out = torch.randn(2, seq, 4, 8, dtype=torch.float64)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention_module.attention(*full, causal=True, backend="reference")
    out.backward(grad_out)
    results = {}
    for version in VERSIONS:
        sys.modules.update(fake_flash_attn(version))
        local = [zigzag_split(t, world, rank).requires_grad_() for t in (q, k, v)]
        local_out = ring_attention(*local, group=dist.group.WORLD, backend="auto")
        local_out.backward(zigzag_split(grad_out, world, rank))
        errors = {"out": _max_err(local_out, zigzag_split(out, world, rank))}
        for name, a, b in zip("qkv", local, full):
            errors[f"d{name}"] = _max_err(a.grad, zigzag_split(b.grad, world, rank))
        results[version] = errors, dict(sys.modules["flash_attn"].calls)
    # The start-time refusal, through the real cp group: no flash (float32), no csrc.
    extension._state.update(module=None, error="ImportError: blocked by the test")
    model = Decoder(ModelConfig(pattern="AM", d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64, d_state=4))
    try:
        apply_context_parallel(model, dist.group.WORLD)
        refusal = None
    except LongtrainError as error:
        refusal = str(error)
    return results, refusal


def test_ring_attention_on_flash_equals_one_process():
    for results, refusal in run_ranks(_ring_on_flash, 2):
        assert set(results) == set(VERSIONS)
        for version, (errors, calls) in results.items():
            for name, error in errors.items():
                assert error < TOL, (version, name, error)
            # At cp=2 each rank's two query chunks see 5 key chunks in all (3 of its own, 2 of the other
            # rank's): each block runs flash-attn's forward once and its backward once (no recomputed forward).
            assert calls == {"forward": 5, "backward": 5}, version
        assert refusal is not None and refusal.startswith("kernels.attention=auto would run ring attention")
        assert "cpu/float32" in refusal


def _model(attention="auto", scan="auto", **fields):
    from longtrain.trainer.model.decoder import Decoder
    config = ModelConfig(pattern="AM", d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64, d_state=4, **fields)
    return Decoder(config, attention_backend=attention, scan_backend=scan)


def test_start_check_without_capable_kernels(monkeypatch):
    cpu = torch.device("cpu")
    if extension.csrc_supports(cpu, torch.float32) is None:  # the built extension serves both ops here
        check_context_parallel_kernels(_model(), cpu, torch.float32)
    monkeypatch.setattr(extension, "_state", {"module": None, "error": "ImportError: blocked by the test"})
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        with pytest.raises(LongtrainError) as caught:
            check_context_parallel_kernels(_model(), cpu, dtype)
        message = str(caught.value)
        assert message.startswith(f"kernels.attention=auto would run ring attention (attention with its lse) on the "
                                  f"reference kernel under context parallelism on cpu/{name}")
        assert "install flash-attn" in message and "set kernels.attention=reference" in message
        assert "csrc: extension longtrain.kernels._C not loaded" in message and "\n" not in message
    with pytest.raises(LongtrainError, match=r"^kernels\.scan=auto would run the Mamba scan with initial and final "
                                             r"state on the reference kernel .* on cpu/float32 .*kernels\.scan=reference"):
        check_context_parallel_kernels(_model(attention="reference"), cpu, torch.float32)
    with pytest.raises(LongtrainError, match=r"^kernels\.attention=csrc under context parallelism: attention backend "
                                             r"'csrc' cannot run here"):
        check_context_parallel_kernels(_model(attention="csrc"), cpu, torch.float32)
    # Forced by name: not silent, so allowed. float64 (only the reference computes in it): allowed.
    check_context_parallel_kernels(_model(attention="reference", scan="reference"), cpu, torch.float32)
    check_context_parallel_kernels(_model(), cpu, torch.float64)


def test_start_check_accepts_flash(flash, monkeypatch):
    """Ring attention on flash_attn with csrc missing: attention passes; the scan still needs csrc."""
    monkeypatch.setattr(extension, "_state", {"module": None, "error": "ImportError: blocked by the test"})
    cpu = torch.device("cpu")
    check_context_parallel_kernels(_model(scan="reference"), cpu, torch.bfloat16)
    with pytest.raises(LongtrainError, match=r"^kernels\.scan=auto"):
        check_context_parallel_kernels(_model(), cpu, torch.bfloat16)
    # masked layers (a window, S²-Attn's groups) are refused at start: flash_attn takes no masks here
    for fields in ({"attention_window": 4}, {"s2_attn": {"group": 4}}):
        with pytest.raises(LongtrainError, match=r"^kernels\.attention=auto would run ring attention"):
            check_context_parallel_kernels(_model(scan="reference", **fields), cpu, torch.bfloat16)
