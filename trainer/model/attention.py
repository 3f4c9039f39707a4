"""Causal self-attention with grouped-query heads (Ainslie et al. 2023) and rotary positions.

The kernel is `longtrain.kernels.attention.attention`; `attend` can be swapped by context
parallelism for the ring exchange, which sees the same (batch, seq, heads, head_dim) layout.

Packed documents: with `positions` (batch, seq), each token's in-document position (0 where a document
starts), a query sees keys of its own document only (the kernel's doc_q/doc_k, document start = absolute
position - in-document position) and rotary positions restart at 0 in each document, so a document
computes exactly what it would alone.

Per-layer windows: model.attention_window applies to every attention layer, or, with
model.attention_global_every, to all but every N-th (`ModelConfig.attention_layer_window`). Shifted sparse
attention (model.s2_attn; LongLoRA, Chen et al. 2023) replaces full attention while training only
(`_shifted_sparse_attend`).
"""
from __future__ import annotations

import torch
from torch import nn

from longtrain.kernels.attention import attention
from longtrain.kernels.rotary import apply_rotary
from longtrain.trainer.model.layers import rotary_tables


class Attention(nn.Module):
    def __init__(self, cfg, linears, backend: str = "auto", index: int | None = None):
        """index: this block's place in model.pattern, which decides its window under
        model.attention_global_every (`ModelConfig.attention_layer_window`); None: model.attention_window."""
        super().__init__()
        self.head_dim = cfg.head_dim
        self.heads = linears.local(cfg.n_heads, "model.n_heads")
        self.kv_heads = linears.local(cfg.n_kv_heads, "model.n_kv_heads")
        self.theta, self.scaling = cfg.rope_theta, cfg.rope_scaling
        window = getattr(cfg, "attention_window", None)
        if window is not None and index is not None:
            window = cfg.attention_layer_window(index)
        # flash-attn's window_size: the query itself and window - 1 keys before it; sinks stay visible
        self.masks = {} if window is None else {"window": (window - 1, 0), "sinks": cfg.attention_sinks}
        s2_attn = getattr(cfg, "s2_attn", None)
        self.s2_group = None if s2_attn is None else s2_attn.group  # shifted sparse attention while training
        if self.s2_group is not None and self.kv_heads % 2:
            raise ValueError(f"Attention: model.s2_attn shifts half of the kv heads; this rank has {self.kv_heads}")
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
        if self.s2_group is not None and self.training:
            return self._shifted_sparse_attend(q, k, v, doc)
        if doc is None:
            return attention(q, k, v, causal=True, backend=self.backend, **self.masks)
        return attention(q, k, v, causal=True, backend=self.backend, doc_q=doc, doc_k=doc, **self.masks)

    def _shifted_sparse_attend(self, q, k, v, doc=None, context_parallel: bool = False):
        """Shifted sparse attention (S²-Attn; Chen et al. 2023, "LongLoRA", arXiv 2309.12307, section 3.2): a
        query sees the causal keys of its own group. Groups of the even
        kv heads (and their query heads) start at multiples of G = self.s2_group; those of the odd kv heads
        start at G/2 + m*G, the first being [0, G/2). A token's segment starts at the later of its group's and
        its document's start (doc), so groups also end at document borders. LongLoRA rolls the shifted heads
        by -G/2 and cuts G-token groups, so its last group joins the sequence's last G/2 tokens with its first
        G/2 (the wrap-around); here that group is two groups and no token sees across the sequence's ends.

        Without documents (and G dividing seq) the groups are cut out and attended as a batch of short causal
        sequences, which every backend runs (flash_attn included, which takes no document masks); with
        documents, the group starts go to the op as document starts.

        Under context parallelism (context_parallel: `self.attend` is the ring) each half of the heads goes
        through the ring with its segment starts as document starts, at this rank's absolute positions.

        q: (batch, seq, heads, head_dim); k, v: (batch, seq, kv_heads, head_dim), kv_heads even; positions
        0..seq-1, or this rank's (`self.positions`) under context parallelism. Returns (batch, seq, heads, head_dim)."""
        batch, seq, heads, head_dim = q.shape
        kv_heads, group = k.shape[2], self.s2_group
        half = group // 2
        # [plain, shifted]: the heads of the even, of the odd kv heads, each (batch, seq, heads / 2, head_dim)
        halves = [[x.unflatten(2, (kv_heads // 2, 2, -1))[:, :, :, parity].flatten(2, 3).contiguous()
                   for x in (q, k, v)] for parity in (0, 1)]
        if doc is None and seq % group == 0 and not self.masks and not context_parallel:
            plain = self._attend_groups(*halves[0], group)
            # the shifted groups [0, G/2) and [seq - G/2, seq) side by side, then the G-token ones between them
            ends = self._attend_groups(*(torch.cat([x[:, :half], x[:, seq - half:]], dim=1) for x in halves[1]), half)
            middle = [self._attend_groups(*(x[:, half:seq - half] for x in halves[1]), group)] if seq > group else []
            shifted = torch.cat([ends[:, :half], *middle, ends[:, half:]], dim=1)
        else:
            position = (self.positions(seq, q.device) if context_parallel else torch.arange(seq, device=q.device)).int()
            group_starts = (position - position % group, ((position + half) // group * group - half).clamp_min(0))
            starts = [self._segment_starts(s, doc, batch) for s in group_starts]
            if context_parallel:
                plain, shifted = (self.attend(*part, doc=start) for part, start in zip(halves, starts))
            else:
                plain, shifted = (attention(*part, causal=True, backend=self.backend, doc_q=start, doc_k=start,
                                            **self.masks) for part, start in zip(halves, starts))
        # back to the heads' order: (batch, seq, kv_heads / 2, 2, heads / kv_heads, head_dim)
        return torch.stack([x.unflatten(2, (kv_heads // 2, -1)) for x in (plain, shifted)], dim=3).flatten(2, 4)

    def _attend_groups(self, q, k, v, group):
        """Causal attention within each run of `group` tokens: (batch, seq, h, d) with seq % group == 0."""
        batch, seq = q.shape[:2]
        grouped = (x.reshape(batch * (seq // group), group, *x.shape[2:]) for x in (q, k, v))
        return attention(*grouped, causal=True, backend=self.backend).reshape(batch, seq, *q.shape[2:])

    @staticmethod
    def _segment_starts(group_start, doc, batch):
        """(batch, seq) int32: the later of each token's group start (seq,) and its document start (doc)."""
        start = group_start.expand(batch, -1) if doc is None else torch.maximum(doc, group_start)
        return start.contiguous()

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
        if state is not None and "window" in state:
            return self._stream(x, state)
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
        if self.s2_group is not None and self.training and self.attend != self._local_attend:
            out = self._shifted_sparse_attend(q, k, v, doc, context_parallel=True)
        else:
            out = self.attend(q, k, v) if doc is None else self.attend(q, k, v, doc=doc)
        return self.out(out.reshape(batch, seq, self.heads * self.head_dim))

    def _stream(self, x, state):
        """Streaming attention (StreamingLLM, Xiao et al. 2023) in constant memory. `state` holds 'sinks'
        and 'window' (ints, set by the caller) and, after the first call, 'k', 'v': (batch, n, kv_heads,
        head_dim) with n <= sinks + window: the keys (not rotated) and values of the first `sinks` tokens
        of the stream and of the last `window` ones, the current token included; the middle is evicted.
        Positions are places in the cache, not in the text: the cached keys are rotated afresh at every
        call to positions 0..n-1 and the new queries take the last ones, so no position exceeds
        sinks + window - 1 however long the stream. Dynamic RoPE scaling reads n.

        A call of seq > 1 tokens must fit without eviction (past + seq <= sinks + window: the prefill);
        past that, one token per call, since each token of a chunk would see its own cache.
        """
        batch, seq, _ = x.shape
        sinks, window = state["sinks"], state["window"]
        budget = sinks + window
        past = state["k"].shape[1] if "k" in state else 0
        if seq > 1 and past + seq > budget:
            raise ValueError(f"Attention: a streaming call of {seq} tokens after {past} cached ones exceeds the "
                             f"cache of sinks + window = {budget}; feed one token per call once the cache is full")
        q = self.q(x).view(batch, seq, self.heads, self.head_dim)
        k = self.k(x).view(batch, seq, self.kv_heads, self.head_dim)
        v = self.v(x).view(batch, seq, self.kv_heads, self.head_dim)
        if past:
            cached_k, cached_v = state["k"], state["v"]
            if past + seq > budget:  # evict the middle: keep the sinks and the last window - seq tokens
                recent = budget - seq - sinks
                cached_k = torch.cat([cached_k[:, :sinks], cached_k[:, past - recent:]], dim=1)
                cached_v = torch.cat([cached_v[:, :sinks], cached_v[:, past - recent:]], dim=1)
            k, v = torch.cat([cached_k, k], dim=1), torch.cat([cached_v, v], dim=1)
        state["k"], state["v"] = k, v
        n = k.shape[1]
        cos, sin = rotary_tables(n, self.head_dim, self.theta, self.scaling, device=x.device, context_len=n)
        q, k = apply_rotary(q, cos[n - seq:], sin[n - seq:]), apply_rotary(k, cos, sin)
        # The cache is the mask: the model's own window and sinks (self.masks) select the same keys when
        # the cache takes the model's attention_window and attention_sinks, and are not applied on top.
        out = attention(q, k, v, causal=True, backend=self.backend)  # bottom-right aligned
        return self.out(out.reshape(batch, seq, self.heads * self.head_dim))
