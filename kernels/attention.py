"""Scaled dot-product attention returning the log-sum-exp, in flash-attn's layout.

Backends, best first: `flash_attn` (GPU, when installed), `csrc` (our flash-style kernel in
csrc/attention/, CPU and CUDA, when built; returns the log-sum-exp and takes its gradient),
`torch` (PyTorch SDPA; no log-sum-exp), `reference`.
The log-sum-exp lets partial results over disjoint K/V blocks be merged exactly
(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"), which ring
attention for context parallelism relies on.
Masks beyond causal, all on absolute token positions: flash-attn's sliding window (left, right),
attention sinks (the first tokens of each document stay visible past the window; Xiao et al. 2023,
"Efficient Streaming Language Models with Attention Sinks"), and document masking of packed sequences.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longtrain.kernels.extension import csrc_supports
from longtrain.kernels.registry import OpRegistry, always

registry = OpRegistry("attention")


def visibility(seq_q, seq_k, causal=False, window=None, sinks=0, doc_q=None, doc_k=None, q_start=None, k_start=None,
               device=None):
    """Which keys each query sees: bool (batch or 1, seq_q, seq_k), True where query i may attend to key j.

    Query i sits at absolute position q_start + i, key j at k_start + j (defaults: q_start = seq_k - seq_q,
    k_start = 0, flash-attn's bottom-right alignment). window=(left, right), -1 unbounded: key positions in
    [pos - left, pos + right]; causal sets right to 0. The first `sinks` tokens of each document (key position
    minus its doc_k < sinks) are visible past the window's left edge. doc_q (batch, seq_q), doc_k (batch, seq_k):
    the position at which each token's document starts; a query sees only keys with its own document start.
    """
    q_start = seq_k - seq_q if q_start is None else q_start
    k_start = 0 if k_start is None else k_start
    left, right = window if window is not None else (-1, -1)
    right = 0 if causal else right
    q_pos = (q_start + torch.arange(seq_q, device=device)).view(1, seq_q, 1)
    k_pos = (k_start + torch.arange(seq_k, device=device)).view(1, 1, seq_k)
    keep = torch.ones(1, seq_q, seq_k, dtype=torch.bool, device=device)
    if right >= 0:
        keep = keep & (k_pos <= q_pos + right)
    if left >= 0:
        doc_start = doc_k.long().unsqueeze(1) if doc_k is not None else 0
        keep = keep & ((k_pos >= q_pos - left) | (k_pos - doc_start < sinks))
    if doc_q is not None:
        keep = keep & (doc_q.unsqueeze(2) == doc_k.unsqueeze(1))
    return keep


def reference(q, k, v, causal=False, softmax_scale=None, upcast=True, **masks):
    """Plain attention, materialising the (seq_q, seq_k) score matrix.

    q: (batch, seq_q, heads, head_dim); k, v: (batch, seq_k, kv_heads, head_dim), heads % kv_heads == 0.
    Returns out: (batch, seq_q, heads, head_dim) in q's dtype, lse: (batch, heads, seq_q) float32.
    With causal=True query i attends to keys j <= i + seq_k - seq_q (bottom-right aligned, as flash-attn).
    masks: window, sinks, doc_q, doc_k, q_start, k_start as in `visibility`.
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
    if masks:
        keep = visibility(seq_q, seq_k, causal, device=q.device, **masks).unsqueeze(1)  # (batch or 1, 1, seq_q, seq_k)
        scores = scores.masked_fill(~keep, float("-inf"))
    elif causal:
        keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(seq_k - seq_q)
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # fully masked rows give 0, lse -inf
    if low:
        out = torch.einsum("bhqk,bkhd->bqhd", probs.to(q.dtype), v)
    else:
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(compute))
    return out.to(q.dtype), lse.float() if compute != torch.float64 else lse


def _sdpa(q, k, v, causal=False, softmax_scale=None, **masks):
    """PyTorch SDPA (flash-style on CPU and GPU) for the output; no log-sum-exp.

    masks (window, sinks, documents, positions) become an explicit boolean attn_mask; rows that see no key
    attend to every key inside SDPA (which would give NaN for them) and are set to 0 afterwards.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    seq_q, seq_k = q.shape[1], k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if masks:
        keep = visibility(seq_q, seq_k, causal, device=q.device, **masks).unsqueeze(1)  # (batch or 1, 1, seq_q, seq_k)
        sees = keep.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep | ~sees, scale=scale,
                                             enable_gqa=heads != kv_heads)
        out = out.where(sees, 0)
    elif causal and seq_q != seq_k:
        # SDPA's is_causal is top-left aligned; flash-attn's convention is bottom-right.
        keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(seq_k - seq_q)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep, scale=scale, enable_gqa=heads != kv_heads)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=heads != kv_heads)
    return out.transpose(1, 2), None


class _CsrcAttention(torch.autograd.Function):
    """Our compiled attention; out and lse are both differentiable (ring attention merges by lse)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window, sinks, doc_q, doc_k, q_start, k_start):
        mask = (window[0], window[1], sinks, doc_q, doc_k, q_start, k_start)
        out, lse = torch.ops.longtrain.attention_fwd(q, k, v, causal, scale, *mask)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.mask = causal, scale, mask
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.longtrain.attention_bwd(dout.contiguous(), q, k, v, out, lse, dlse, ctx.causal,
                                                       ctx.scale, *ctx.mask)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _csrc(q, k, v, causal=False, softmax_scale=None, window=None, sinks=0, doc_q=None, doc_k=None, q_start=None,
          k_start=None):
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    window = tuple(window) if window is not None else (-1, -1)
    doc_q, doc_k = (x.contiguous() if x is not None else None for x in (doc_q, doc_k))
    return _CsrcAttention.apply(q, k, v, causal, scale, window, sinks, doc_q, doc_k, q_start, k_start)


def _csrc_supports(device, dtype, head_dim=None, masked=False, **facts):
    reason = csrc_supports(device, dtype)
    if reason is None and device.type == "cuda" and head_dim not in (32, 64, 128):
        reason = f"the CUDA kernel is built for head_dim 32, 64, 128, got {head_dim}"
    if reason is None and device.type == "cuda" and masked:
        reason = "the CUDA kernel has no window, sinks, documents or q_start/k_start yet"
    return reason


# Where the flash_attn backend may run. flash-attn itself needs CUDA and a 16-bit dtype; tests widen these
# (CPU, float64) to run a stand-in flash_attn module built on the reference. Nothing else changes them.
FLASH_ATTN_DEVICES = ("cuda",)
FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)

# flash-attn series whose lse-returning functions flash_attn.flash_attn_interface._flash_attn_forward /
# _flash_attn_backward are called here, read from that file at tags v2.6.0-v2.6.3, v2.7.0-v2.7.4, v2.8.0-v2.8.3.
# 2.6: plain functions taking window_size=(left, right); the forward returns (out, q, k, v, out_padded,
# softmax_lse, S_dmask, rng_state), the backward fills dq, dk, dv and returns (dq, dk, dv, softmax_d).
# 2.7, 2.8: torch.library custom ops taking window_size_left, window_size_right; the forward returns
# (out, softmax_lse, S_dmask, rng_state), the backward fills dq, dk, dv and returns softmax_d.
# Value: True where the window is passed as two ints.
FLASH_ATTN_SPLIT_WINDOW = {"2.6": False, "2.7": True, "2.8": True}


def _flash_attn_api():
    """(flash_attn.flash_attn_interface, window as two ints) for a supported flash-attn; ImportError otherwise."""
    import flash_attn
    from flash_attn import flash_attn_interface

    version = str(getattr(flash_attn, "__version__", "unknown"))
    series = ".".join(version.split(".")[:2])
    if series not in FLASH_ATTN_SPLIT_WINDOW:
        raise ImportError(f"flash_attn {version} is installed; longtrain calls its _flash_attn_forward/_backward as "
                          f"in {', '.join(FLASH_ATTN_SPLIT_WINDOW)} (pip install 'flash-attn>=2.6,<2.9')")
    return flash_attn_interface, FLASH_ATTN_SPLIT_WINDOW[series]


def _last_dim_contiguous(x):
    """flash-attn's kernels need unit stride along head_dim only (a gradient of a sum is an expanded tensor)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def flash_attn_forward(q, k, v, causal: bool, softmax_scale: float | None):
    """flash-attn's forward without autograd: out (batch, seq_q, heads, head_dim) in q's dtype and
    lse (batch, heads, seq_q) float32. Inputs as `attention` (16-bit, on CUDA)."""
    api, split_window = _flash_attn_api()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if split_window:
        out, lse, _, _ = api._flash_attn_forward(q, k, v, 0.0, scale, causal, -1, -1, 0.0, None, False)
    else:
        out, _, _, _, _, lse, _, _ = api._flash_attn_forward(q, k, v, 0.0, scale, causal, (-1, -1), 0.0, None, False)
    return out, lse


def flash_attn_backward(dout, q, k, v, out, lse, causal: bool, softmax_scale: float | None):
    """flash-attn's backward: (dq, dk, dv) shaped and typed like q, k, v, for the attention whose output is
    `out` (q's dtype) with row normalisers `lse` ((batch, heads, seq_q) float32). The kernel rebuilds the
    probabilities as exp(scale * q.k - lse) and the row term as rowsum(dout * out), so `out` and `lse` may be
    those of a softmax over more keys than k holds (ring attention passes the merged ones)."""
    api, split_window = _flash_attn_api()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    deterministic = torch.are_deterministic_algorithms_enabled()  # flash-attn then sums dq without atomics
    window = (-1, -1) if split_window else ((-1, -1),)
    api._flash_attn_backward(dout, q, k, v, out, lse.contiguous(), dq, dk, dv, 0.0, scale, causal, *window, 0.0,
                             None, deterministic, None)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    """flash-attn through its lse-returning functions. The lse carries no gradient: ring attention, its one
    consumer, differentiates each block from the merged out and lse instead (trainer/parallel/ring.py)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        ctx.set_materialize_grads(False)
        out, lse = flash_attn_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dlse is not None:
            raise RuntimeError("attention backend 'flash_attn' passes no gradient through the log-sum-exp; "
                               "use backend='csrc' or 'reference' to differentiate the lse")
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attn_backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def _flash_attn(q, k, v, causal=False, softmax_scale=None):
    return _FlashAttention.apply(q, k, v, causal, softmax_scale)


def _flash_attn_supports(device, dtype, head_dim=None, **_):
    if device.type not in FLASH_ATTN_DEVICES:
        return "flash_attn runs on CUDA only"
    if dtype not in FLASH_ATTN_DTYPES:
        return f"flash_attn needs float16 or bfloat16, got {dtype}"
    if head_dim is not None and (head_dim > 256 or head_dim % 8):
        return f"flash_attn here takes head_dim a multiple of 8 up to 256, got {head_dim}"
    try:
        _flash_attn_api()
    except ImportError as error:
        return f"flash_attn not usable ({error})"
    return None


def _sdpa_supports(need_lse=False, **_):
    return "torch SDPA does not return the log-sum-exp" if need_lse else None


def _without_masks(supports, name):
    """supports() of a backend not yet wired for window, sinks, documents or positions: passes it over then."""
    def check(masked=False, **facts):
        if masked:
            return f"{name} is not wired for window, sinks, documents or q_start/k_start yet"
        return supports(**facts)
    return check


registry.register("flash_attn", _flash_attn, _without_masks(_flash_attn_supports, "flash_attn"))
registry.register("csrc", _csrc, _csrc_supports)
registry.register("torch", _sdpa, _sdpa_supports)
registry.register("reference", reference, always)


def _mask_arguments(q, k, window, sinks, doc_q, doc_k, q_start, k_start):
    """The mask keywords that ask for something, checked; {} for plain (causal) attention."""
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    masks = {}
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(is_int(w) and w >= -1 for w in window)):
            raise ValueError(f"attention: window must be a pair (left, right) of ints >= -1 (-1 = unbounded), "
                             f"got {window!r}")
        if tuple(window) != (-1, -1):
            masks["window"] = tuple(window)
    if not is_int(sinks) or sinks < 0:
        raise ValueError(f"attention: sinks must be an int >= 0, got {sinks!r}")
    if sinks:
        masks["sinks"] = sinks
    if (doc_q is None) != (doc_k is None):
        raise ValueError("attention: doc_q and doc_k go together (document starts of queries and keys), got "
                         f"{'doc_q' if doc_q is not None else 'doc_k'} only")
    for name, doc, x in (("doc_q", doc_q, q), ("doc_k", doc_k, k)):
        if doc is None:
            continue
        expected = (x.shape[0], x.shape[1])
        if not isinstance(doc, torch.Tensor) or doc.dtype != torch.int32 or tuple(doc.shape) != expected:
            got = f"{doc.dtype} {tuple(doc.shape)}" if isinstance(doc, torch.Tensor) else type(doc).__name__
            raise ValueError(f"attention: {name} must be an int32 tensor of shape (batch, seq) = {expected}, got {got}")
        if doc.device != q.device:
            raise ValueError(f"attention: {name} must be on {q.device} like q, got {doc.device}")
        masks[name] = doc
    for name, start in (("q_start", q_start), ("k_start", k_start)):
        if start is not None:
            if not is_int(start):
                raise ValueError(f"attention: {name} must be an int (absolute position), got {start!r}")
            masks[name] = start
    return masks


def attention(q, k, v, causal=False, softmax_scale=None, return_lse=False, backend=None, window=None, sinks=0,
              doc_q=None, doc_k=None, q_start=None, k_start=None):
    """Attention in flash-attn's layout.

    q: (batch, seq_q, heads, head_dim); k, v: (batch, seq_k, kv_heads, head_dim) with heads % kv_heads == 0
    (grouped-query attention). float32, bfloat16 or float64. Returns out (batch, seq_q, heads, head_dim),
    and with return_lse=True also lse (batch, heads, seq_q) float32, the natural log of each row's
    softmax normaliser (already including softmax_scale); -inf for a causal row that sees no key.
    With return_lse=True the `torch` backend is passed over (SDPA does not return the lse).
    backend: None or "auto" for the best available, or one of `registry.names()` to force it.
    Masks, on absolute positions (query i at q_start + i, key j at k_start + j; defaults q_start = seq_k - seq_q,
    k_start = 0, bottom-right aligned as flash-attn; ring attention passes the chunk positions):
    window=(left, right): flash-attn's window_size, -1 unbounded; query at p sees keys in [p - left, p + right]
    (causal: right = 0). sinks: int >= 0, the first `sinks` tokens of each document stay visible to its later
    queries past the window (StreamingLLM). doc_q (batch, seq_q), doc_k (batch, seq_k): int32, the absolute
    position at which each token's document starts; a query sees keys of its own document only. A row that sees
    no key gives out 0 and lse -inf. flash_attn, and csrc on CUDA, are passed over when a mask is given.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-d (batch, seq, heads, head_dim) tensors, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"attention: heads={q.shape[2]} is not a multiple of kv_heads={k.shape[2]}")
    masks = _mask_arguments(q, k, window, sinks, doc_q, doc_k, q_start, k_start)
    chosen = registry.select(backend, q.device, q.dtype, head_dim=q.shape[-1], need_lse=return_lse,
                             masked=bool(masks))
    out, lse = chosen.fn(q, k, v, causal=causal, softmax_scale=softmax_scale, **masks)
    return (out, lse) if return_lse else out
