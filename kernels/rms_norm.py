"""RMSNorm over the last dim (Zhang & Sennrich 2019), computed in float32 (float64 for float64).

`rms_norm(x, weight, eps, out_dtype)` returns x / rms(x) * weight in `out_dtype` (default x's dtype);
the model's RMSNorm passes the autocast dtype under autocast, which is what the linear layer after it
would cast to anyway.

Backends, best first: `csrc` (csrc/layers/rms_norm_cpu.cpp: one pass per row forward and backward,
CPU, float32/bfloat16/float16), `torch` (F.rms_norm in float32; float64, and CUDA, where no kernel of
ours is built for it), `reference` (plain ops, float64-checked in tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from longtrain.kernels.extension import csrc_supports
from longtrain.kernels.registry import OpRegistry, always

registry = OpRegistry("rms_norm")


def reference(x, weight, eps=1e-5, out_dtype=None):
    compute = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(compute)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.to(compute)
    return y.to(out_dtype or x.dtype)


def _torch(x, weight, eps=1e-5, out_dtype=None):
    compute = torch.promote_types(x.dtype, torch.float32)
    return F.rms_norm(x.to(compute), (x.shape[-1],), weight.to(compute), eps).to(out_dtype or x.dtype)


class _CsrcRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        x = x.contiguous()
        y, rstd = torch.ops.longtrain.rms_norm_fwd(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = torch.ops.longtrain.rms_norm_bwd(dy.contiguous(), x, weight, rstd)
        return dx, dweight.to(weight.dtype), None, None


def _csrc(x, weight, eps=1e-5, out_dtype=None):
    return _CsrcRMSNorm.apply(x, weight, eps, out_dtype or x.dtype)


def _csrc_supports(device, dtype, out_dtype=None, **_):
    if device.type != "cpu":
        return f"csrc RMSNorm is built for the CPU only, not {device.type}"
    return csrc_supports(device, dtype) or (csrc_supports(device, out_dtype) if out_dtype is not None else None)


registry.register("csrc", _csrc, _csrc_supports)
registry.register("torch", _torch, always)
registry.register("reference", reference, always)


def rms_norm(x, weight, eps=1e-5, out_dtype=None, backend=None):
    """x / sqrt(mean(x^2, -1) + eps) * weight, math in float32 (float64 for float64 x), returned in
    out_dtype (default x.dtype). backend: None/"auto", or one of `registry.names()`."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    out_dtype = out_dtype or x.dtype
    chosen = registry.select(backend, x.device, x.dtype, out_dtype=out_dtype)
    return chosen.fn(x, weight, eps, out_dtype)
