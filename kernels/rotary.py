"""Rotary position embedding (Su et al. 2021, "RoFormer"), rotate-half layout: the pairs are
(x[..., i], x[..., d/2 + i]).

Backends, best first: `csrc` (csrc/layers/rotary_cpu.cpp: one pass forward and backward, float32
math, CPU, float32/bfloat16/float16), `torch` (plain ops in float32, or float64 for float64; and CUDA,
where no kernel of ours is built for it).
"""
from __future__ import annotations

import torch

from longtrain.kernels.extension import csrc_supports
from longtrain.kernels.registry import OpRegistry, always

registry = OpRegistry("rotary")


def reference(x, cos, sin):
    """x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim / 2). Returns x rotated, in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].to(compute), x[..., half:].to(compute)
    cos, sin = cos.to(compute)[None, :, None, :], sin.to(compute)[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class _CsrcRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.ops.longtrain.rotary(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return torch.ops.longtrain.rotary(dy, cos, sin, True), None, None  # the transpose: the opposite angle


def _csrc(x, cos, sin):
    return _CsrcRotary.apply(x, cos, sin)


def _csrc_supports(device, dtype, tables_need_grad=False, **_):
    if device.type != "cpu":
        return f"csrc rotary is built for the CPU only, not {device.type}"
    if tables_need_grad:
        return "csrc rotary passes no gradient to cos and sin"
    return csrc_supports(device, dtype)


registry.register("csrc", _csrc, _csrc_supports)
registry.register("torch", reference, always)


def apply_rotary(x, cos, sin, backend=None):
    """x: (batch, seq, heads, head_dim), head_dim even; cos, sin: (seq, head_dim / 2), or (batch, seq, head_dim / 2)
    for per-row positions (packed documents). backend: None/"auto", or one of `registry.names()`."""
    if cos.dim() == 3 and x.dim() == 4 and cos.shape[0] == x.shape[0] and sin.shape == cos.shape:
        # Per-row tables: the rows laid end to end are one sequence of batch * seq tokens.
        batch, seq = x.shape[:2]
        out = apply_rotary(x.reshape(1, batch * seq, *x.shape[2:]), cos.reshape(batch * seq, -1),
                           sin.reshape(batch * seq, -1), backend)
        return out.reshape(x.shape)
    if x.dim() != 4 or x.shape[-1] % 2 or cos.shape != (x.shape[1], x.shape[-1] // 2) or sin.shape != cos.shape:
        raise ValueError(f"apply_rotary: x must be (batch, seq, heads, even head_dim) and cos, sin (seq, head_dim / 2), "
                         f"got {tuple(x.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    need = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    return registry.select(backend, x.device, x.dtype, tables_need_grad=need).fn(x, cos, sin)
