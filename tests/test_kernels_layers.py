"""Fused RMSNorm and SwiGLU kernels: values and gradients against float64 autograd of the plain ops."""
import pytest
import torch

from longtrain.kernels import rms_norm as rn, swiglu as sg
from longtrain.kernels.extension import extension
from longtrain.kernels.registry import BackendError

BACKENDS = ["csrc", "torch"] if extension() is not None else ["torch"]
EPS = {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}  # relative, output rounding included


def close(got, want, dtype, scale):
    err = (got.double() - want).abs()
    assert torch.all(err <= EPS[dtype] * (want.abs() + scale)), f"max error {err.max().item():.3g}"


def grads64(fn, inputs, out_grad):
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(out_grad.double())
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("shape", [(3, 5, 37), (130, 256)])
def test_rms_norm_matches_float64(backend, dtype, out_dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype).requires_grad_()
    w = (torch.rand(shape[-1], generator=g) + 0.5).requires_grad_()
    dy = torch.randn(shape, generator=g).to(out_dtype)
    y = rn.rms_norm(x, w, 1e-5, out_dtype=out_dtype, backend=backend)
    assert y.dtype == out_dtype and y.shape == x.shape
    y.backward(dy)
    want, (dx, dw) = grads64(lambda a, b: rn.reference(a, b, 1e-5), (x, w), dy)
    close(y, want, out_dtype, 0.0)
    assert x.grad.dtype == dtype and w.grad.dtype == w.dtype
    close(x.grad, dx, dtype, dx.abs().mean().item())
    close(w.grad, dw, torch.float32, dw.abs().mean().item())


def test_rms_norm_dispatch():
    cpu = torch.device("cpu")
    want = "csrc" if extension() is not None else "torch"
    assert rn.registry.select(None, cpu, torch.bfloat16, out_dtype=torch.bfloat16).name == want
    assert rn.registry.select(None, cpu, torch.float64, out_dtype=torch.float64).name == "torch"
    with pytest.raises(ValueError, match="weight"):
        rn.rms_norm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(BackendError):
        rn.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8), backend="csrc")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 33), (2, 300, 100)])
def test_swiglu_matches_float64(backend, dtype, shape):
    g0 = torch.Generator().manual_seed(1)
    gate = (torch.randn(shape, generator=g0) * 4).to(dtype).requires_grad_()
    up = torch.randn(shape, generator=g0).to(dtype).requires_grad_()
    dh = torch.randn(shape, generator=g0).to(dtype)
    h = sg.swiglu(gate, up, backend=backend)
    assert h.dtype == dtype
    h.backward(dh)
    want, (dg, du) = grads64(sg.reference, (gate, up), dh)
    close(h, want, dtype, want.abs().mean().item())
    close(gate.grad, dg, dtype, dg.abs().mean().item())
    close(up.grad, du, dtype, du.abs().mean().item())


def test_swiglu_large_gate_values_stay_finite():
    gate = torch.tensor([[-200.0, -88.0, -20.0, 0.0, 20.0, 88.0, 200.0]], requires_grad=True)
    up = torch.ones_like(gate, requires_grad=True)
    h = sg.swiglu(gate, up)
    h.sum().backward()
    want, (dg, _) = grads64(sg.reference, (gate, up), torch.ones_like(gate))
    assert torch.isfinite(h).all() and torch.isfinite(gate.grad).all()
    torch.testing.assert_close(h.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gate.grad.double(), dg, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["csrc", "torch"] if extension() is not None else ["torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_float64(backend, dtype):
    from longtrain.kernels import rotary as ro
    from longtrain.trainer.model.layers import rotary_tables
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 37, 3, 16, generator=g).to(dtype).requires_grad_()
    cos, sin = rotary_tables(37, 16, 10000.0, offset=5)
    dy = torch.randn(2, 37, 3, 16, generator=g).to(dtype)
    y = ro.apply_rotary(x, cos, sin, backend=backend)
    assert y.dtype == dtype
    y.backward(dy)
    want, (dx,) = grads64(lambda a: ro.reference(a, cos.double(), sin.double()), (x,), dy)
    close(y, want, dtype, want.abs().mean().item())
    close(x.grad, dx, dtype, dx.abs().mean().item())
    # a rotation: norms of each pair are kept
    pairs = lambda t: t.double()[..., :8] ** 2 + t.double()[..., 8:] ** 2
    torch.testing.assert_close(pairs(y), pairs(x.detach()), rtol=4 * EPS[dtype], atol=1e-6)
