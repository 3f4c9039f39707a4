"""Causal self-attention with grouped-query heads (Ainslie et al. 2023) and rotary positions.

The kernel is `longtrain.kernels.attention.attention`; `attend` can be swapped by context
parallelism for the ring exchange, which sees the same (batch, seq, heads, head_dim) layout.

Packed documents: with `positions` (batch, seq), each token's in-document position (0 where a document
starts), a query sees keys of its own document only (the kernel's doc_q/doc_k, document start = absolute
position - in-document position) and rotary positions restart at 0 in each document, so a document
computes exactly what it would alone.
"""
from __future__ import annotations

import torch
from torch import nn

from longtrain.kernels.attention import attention
from longtrain.kernels.rotary import apply_rotary
from longtrain.trainer.model.layers import rotary_tables


class Attention(nn.Module):
    def __init__(self, cfg, linears, backend: str = "auto"):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.heads = linears.local(cfg.n_heads, "model.n_heads")
        self.kv_heads = linears.local(cfg.n_kv_heads, "model.n_kv_heads")
        self.theta, self.scaling = cfg.rope_theta, cfg.rope_scaling
        window = getattr(cfg, "attention_window", None)
        # flash-attn's window_size: the query itself and window - 1 keys before it; sinks stay visible
        self.masks = {} if window is None else {"window": (window - 1, 0), "sinks": cfg.attention_sinks}
        self.backend = backend
        self.q = linears.column(cfg.d_model, cfg.n_heads * cfg.head_dim)
        self.k = linears.column(cfg.d_model, cfg.n_kv_heads * cfg.head_dim)
        self.v = linears.column(cfg.d_model, cfg.n_kv_heads * cfg.head_dim)
        self.out = linears.row(cfg.n_heads * cfg.head_dim, cfg.d_model)
        self.attend = self._local_attend
        self.positions = None  # optional (seq, device) -> (seq,) absolute positions; set by context parallelism
        # optional seq -> length of the whole sequence this rank holds `seq` tokens of (dynamic RoPE scaling
        # reads it); set by context parallelism
        self.context_length = None

    def _local_attend(self, q, k, v, doc=None):
        """doc: None, or (batch, seq) int32 document start of every token (queries and keys alike)."""
        if doc is None:
            return attention(q, k, v, causal=True, backend=self.backend, **self.masks)
        return attention(q, k, v, causal=True, backend=self.backend, doc_q=doc, doc_k=doc, **self.masks)

    def forward(self, x, positions=None, state=None):
        """x: (batch, seq, d_model); positions: optional (batch, seq) in-document positions of packed
        documents (integers, 0 at each document start); absolute positions are 0..seq-1, or this rank's
        (`self.positions`) under context parallelism.

        With `state` (a dict, empty on the first call) the rotated keys and values of earlier calls are
        kept in it as 'k', 'v': (batch, past, kv_heads, head_dim) and attended to (KV cache for
        generation); positions then continue from `past`. Dynamic RoPE scaling reads the current length
        past + seq, so cached keys keep the rotation of the length at which they were computed (as in
        transformers' dynamic NTK).
        """
        batch, seq, _ = x.shape
        past = state["k"].shape[1] if state else 0
        doc = None
        if positions is not None:
            if state is not None:
                raise ValueError("Attention: positions (packed documents) do not combine with a decoding state")
            if positions.shape != x.shape[:2]:
                raise ValueError(f"Attention: positions must have shape (batch, seq) = {tuple(x.shape[:2])}, "
                                 f"got {tuple(positions.shape)}")
            absolute = self.positions(seq, x.device) if self.positions is not None else torch.arange(seq, device=x.device)
            doc = (absolute.to(positions.dtype)[None] - positions).to(torch.int32)
        # Dynamic RoPE scaling reads the length of the whole packed sequence, with or without documents.
        context_len = past + seq
        if state is None and self.positions is not None:
            if positions is None:
                positions = self.positions(seq, x.device)
            context_len = self.context_length(seq) if self.context_length is not None else None
        q = self.q(x).view(batch, seq, self.heads, self.head_dim)
        k = self.k(x).view(batch, seq, self.kv_heads, self.head_dim)
        v = self.v(x).view(batch, seq, self.kv_heads, self.head_dim)
        cos, sin = rotary_tables(seq, self.head_dim, self.theta, self.scaling, offset=past, device=x.device,
                                 positions=positions, context_len=context_len)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if state is not None:
            if past:
                k, v = torch.cat([state["k"], k], dim=1), torch.cat([state["v"], v], dim=1)
            state["k"], state["v"] = k, v
            # Bottom-right aligned causal mask: the new queries see every cached key.
            return self.out(attention(q, k, v, causal=True, backend=self.backend, **self.masks).reshape(batch, seq, -1))
        out = self.attend(q, k, v) if doc is None else self.attend(q, k, v, doc=doc)
        return self.out(out.reshape(batch, seq, self.heads * self.head_dim))
