"""Scaled dot-product attention returning the log-sum-exp, in flash-attn's layout.

Backends, best first: `flash_attn` (GPU, when installed), `csrc` (our flash-style kernel in
csrc/attention/, CPU and CUDA, when built; returns the log-sum-exp and takes its gradient),
`torch` (PyTorch SDPA; no log-sum-exp), `reference`.
The log-sum-exp lets partial results over disjoint K/V blocks be merged exactly
(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"), which ring
attention for context parallelism relies on.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longtrain.kernels.extension import csrc_supports
from longtrain.kernels.registry import OpRegistry, always

registry = OpRegistry("attention")


def reference(q, k, v, causal=False, softmax_scale=None, upcast=True):
    """Plain attention, materialising the (seq_q, seq_k) score matrix.

    q: (batch, seq_q, heads, head_dim); k, v: (batch, seq_k, kv_heads, head_dim), heads % kv_heads == 0.
    Returns out: (batch, seq_q, heads, head_dim) in q's dtype, lse: (batch, heads, seq_q) float32.
    With causal=True query i attends to keys j <= i + seq_k - seq_q (bottom-right aligned, as flash-attn).
    upcast=False keeps both products in a 16-bit input dtype (scores and probabilities rounded to it), as
    a plain PyTorch attention in that dtype does; flash-attn's tests measure their kernels against that.
    """
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    low = not upcast and q.dtype in (torch.bfloat16, torch.float16)
    if low:
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k).to(compute) * scale
    else:
        scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), k.to(compute)) * scale
    if causal:
        keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(seq_k - seq_q)
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # fully masked rows give 0, lse -inf
    if low:
        out = torch.einsum("bhqk,bkhd->bqhd", probs.to(q.dtype), v)
    else:
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(compute))
    return out.to(q.dtype), lse.float() if compute != torch.float64 else lse


def _sdpa(q, k, v, causal=False, softmax_scale=None):
    """PyTorch SDPA (flash-style on CPU and GPU) for the output; the lse from one extra pass of q.k."""
    heads, kv_heads = q.shape[2], k.shape[2]
    seq_q, seq_k = q.shape[1], k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if causal and seq_q != seq_k:
        # SDPA's is_causal is top-left aligned; flash-attn's convention is bottom-right.
        keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(seq_k - seq_q)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep, scale=scale, enable_gqa=heads != kv_heads)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=heads != kv_heads)
    return out.transpose(1, 2), None


class _CsrcAttention(torch.autograd.Function):
    """Our compiled attention; out and lse are both differentiable (ring attention merges by lse)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse = torch.ops.longtrain.attention_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.longtrain.attention_bwd(dout.contiguous(), q, k, v, out, lse, dlse, ctx.causal,
                                                       ctx.scale)
        return dq, dk, dv, None, None


def _csrc(q, k, v, causal=False, softmax_scale=None):
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _CsrcAttention.apply(q, k, v, causal, scale)


def _csrc_supports(device, dtype, head_dim=None, **facts):
    reason = csrc_supports(device, dtype)
    if reason is None and device.type == "cuda" and head_dim not in (32, 64, 128):
        reason = f"the CUDA kernel is built for head_dim 32, 64, 128, got {head_dim}"
    return reason


def _flash_attn(q, k, v, causal=False, softmax_scale=None):
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal, return_attn_probs=True)
    return out, lse


def _flash_attn_supports(device, dtype, head_dim=None, need_lse=False, **_):
    if device.type != "cuda":
        return "flash_attn runs on CUDA only"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn needs float16 or bfloat16, got {dtype}"
    if head_dim is not None and head_dim > 256:
        return f"flash_attn supports head_dim <= 256, got {head_dim}"
    if need_lse:
        return "flash_attn passes no gradient through the log-sum-exp"
    try:
        import flash_attn  # noqa: F401
    except ImportError as error:
        return f"flash_attn not installed ({error})"
    return None


def _sdpa_supports(need_lse=False, **_):
    return "torch SDPA does not return the log-sum-exp" if need_lse else None


registry.register("flash_attn", _flash_attn, _flash_attn_supports)
registry.register("csrc", _csrc, _csrc_supports)
registry.register("torch", _sdpa, _sdpa_supports)
registry.register("reference", reference, always)


def attention(q, k, v, causal=False, softmax_scale=None, return_lse=False, backend=None):
    """Attention in flash-attn's layout.

    q: (batch, seq_q, heads, head_dim); k, v: (batch, seq_k, kv_heads, head_dim) with heads % kv_heads == 0
    (grouped-query attention). float32, bfloat16 or float64. Returns out (batch, seq_q, heads, head_dim),
    and with return_lse=True also lse (batch, heads, seq_q) float32, the natural log of each row's
    softmax normaliser (already including softmax_scale); -inf for a causal row that sees no key.
    With return_lse=True the `torch` backend is passed over (SDPA does not return the lse).
    backend: None or "auto" for the best available, or one of `registry.names()` to force it.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-d (batch, seq, heads, head_dim) tensors, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"attention: heads={q.shape[2]} is not a multiple of kv_heads={k.shape[2]}")
    chosen = registry.select(backend, q.device, q.dtype, head_dim=q.shape[-1], need_lse=return_lse)
    out, lse = chosen.fn(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return (out, lse) if return_lse else out
