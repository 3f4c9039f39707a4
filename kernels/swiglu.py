"""SwiGLU's gate, silu(g) * u (Shazeer 2020, "GLU Variants Improve Transformer").

Backends, best first: `csrc` (csrc/layers/swiglu_cpu.cpp: one pass forward and one backward, float32
math, CPU, float32/bfloat16/float16), `torch` (F.silu(g) * u; float64, and CUDA, where no kernel of
ours is built for it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from longtrain.kernels.extension import csrc_supports
from longtrain.kernels.registry import OpRegistry, always

registry = OpRegistry("swiglu")


def reference(g, u):
    return F.silu(g) * u


class _CsrcSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return torch.ops.longtrain.swiglu_fwd(g, u)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        return torch.ops.longtrain.swiglu_bwd(dh, g, u)


def _csrc(g, u):
    return _CsrcSwiGLU.apply(g, u)


def _csrc_supports(device, dtype, same=True, **_):
    if device.type != "cpu":
        return f"csrc SwiGLU is built for the CPU only, not {device.type}"
    if not same:
        return "csrc SwiGLU needs gate and up of one shape and dtype"
    return csrc_supports(device, dtype)


registry.register("csrc", _csrc, _csrc_supports)
registry.register("torch", reference, always)


def swiglu(g, u, backend=None):
    """silu(g) * u, elementwise. backend: None/"auto", or one of `registry.names()`."""
    same = g.shape == u.shape and g.dtype == u.dtype
    return registry.select(backend, g.device, g.dtype, same=same).fn(g, u)
