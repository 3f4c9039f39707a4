"""Attention over a zigzag-split sequence (trainer/parallel/zigzag.py), for context parallelism.

Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers"). K/V
blocks travel around the cp ring by point-to-point sends; each rank attends its query chunks to
every block that precedes them and merges the partial results by their log-sum-exp. The backward
pass runs the ring again and the dK/dV accumulators travel with the blocks until they are home. On
flash-attn each block's backward takes the merged out and lse (as zhuzilin/ring-flash-attention
does); on the other kernels each block is recomputed through the kernel's autograd, lse included.
Under cp no kernel falls back silently to the O(seq^2) reference (`check_context_parallel_kernels` in
trainer/parallel/context.py).
Packed documents: each token's document start travels with its K/V block, and every block pair is
computed with the kernel's document mask at the chunks' absolute positions (q_start, k_start), so no
query sees another document on any rank; a block pair whose keys all precede every query's document
start is skipped, forward and backward.
Sliding window and sinks (a layer's `masks`, read at each call): with a window of W <= chunk + 1 keys
there is no ring; each query chunk fetches only the last W - 1 keys before it and the sinks of its first
token's document, point to point from the ranks that hold them (`_WindowAttention`; the rule is stated
above it). A longer window runs the ring with the window's masks and skips every block that lies wholly
outside the window and holds no sink its queries see. `attention_traffic` counts the K/V bytes sent.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from longtrain.kernels import attention as attention_kernels
from longtrain.kernels.attention import attention, flash_attn_backward
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.parallel import collectives
from longtrain.trainer.parallel.zigzag import chunk_owner, zigzag_chunks


# ---- ring attention ----

@dataclasses.dataclass
class AttentionTraffic:
    """Bytes this process has sent for context-parallel attention since `reset()`: forward_kv the keys and
    values (ring blocks, or fetched tails and sinks), backward_kv the keys, values and their gradients sent by
    the backward, other everything else (document starts). Point-to-point sends count their tensors' bytes;
    the all-gather of document starts counts its part once per peer."""
    forward_kv: int = 0
    backward_kv: int = 0
    other: int = 0

    def reset(self) -> None:
        self.forward_kv = self.backward_kv = self.other = 0


attention_traffic = AttentionTraffic()  # read by tests and bench/ring_window.py


def _pairs(cp: int, me: int, source: int):
    """(local query slot, source key slot, causal) for every query chunk of mine that sees a key chunk of source."""
    for qi, qc in enumerate(zigzag_chunks(cp, me)):
        for ki, kc in enumerate(zigzag_chunks(cp, source)):
            if kc <= qc:
                yield qi, ki, kc == qc


def _block_masks(cp: int, me: int, source: int, qi: int, ki: int, chunk: int, doc_q, doc_k, left: int = -1,
                 sinks: int = 0) -> dict | None:
    """The kernel's mask keywords for query slot qi of mine against key slot ki of `source`: {} for plain causal
    attention; the window and sinks, the chunks' document starts, and the chunks' absolute starts when asked
    for; None when the pair has nothing to attend and is skipped: every key precedes the document start of
    every query, or every key is older than every query's window (left >= 0) and none is a sink its queries see."""
    q_start, k_start = zigzag_chunks(cp, me)[qi] * chunk, zigzag_chunks(cp, source)[ki] * chunk
    if doc_q is not None and int(doc_q[qi].min()) >= k_start + chunk:
        return None
    outside = left >= 0 and k_start + chunk - 1 < q_start - left
    if outside and not _holds_sinks(k_start, chunk, sinks, doc_q, doc_k, qi, ki):
        return None
    masks = {}
    if doc_q is not None:
        masks.update(doc_q=doc_q[qi], doc_k=doc_k[ki])
    if left >= 0:
        masks.update(window=(left, 0), sinks=sinks)
    if masks:
        masks.update(q_start=q_start, k_start=k_start)
    return masks


def _holds_sinks(k_start: int, chunk: int, sinks: int, doc_q, doc_k, qi: int, ki: int) -> bool:
    """Whether a key chunk before the query chunk holds a sink one of its queries sees. Documents are
    contiguous, so a key before the query chunk can share its document only with the queries of the chunk's
    first token's document: the sinks that count are those of that document."""
    if sinks == 0:
        return False
    if doc_q is None:
        return k_start < sinks
    positions = k_start + torch.arange(chunk, device=doc_k[ki].device)
    first = doc_q[qi][:, :1]
    return bool(((positions - doc_k[ki] < sinks) & (doc_k[ki] == first)).any())


def _merge(out, lse, o, l):
    """Two partial attentions over disjoint keys -> their union, by log-sum-exp. Rows that have seen no key in
    either (lse -inf) stay out 0, lse -inf."""
    if out is None:
        return o, l
    merged = torch.logaddexp(lse, l)
    finite = torch.where(torch.isinf(merged), torch.zeros_like(merged), merged)
    out = (out * torch.exp(lse - finite).transpose(1, 2).unsqueeze(-1)
           + o * torch.exp(l - finite).transpose(1, 2).unsqueeze(-1))
    return out, merged


def _select_backend(asked, q, documents: bool, window: bool) -> str:
    """One kernel for every block, forward and backward (the backward depends on which kernel ran)."""
    masked = documents or window
    backend = attention_kernels.registry.select(asked, q.device, q.dtype, head_dim=q.shape[-1], need_lse=True,
                                                masked=masked).name
    if masked and asked in (None, "auto") and backend == "reference" and q.dtype != torch.float64:
        where = f"{q.device.type}/{str(q.dtype).removeprefix('torch.')}"
        fields = [f for f, on in (("data.packing=documents", documents), ("model.attention_window", window)) if on]
        fixes = [f for f, on in (("data.packing=concat", documents), ("unset model.attention_window", window)) if on]
        raise LongtrainError(f"{' with '.join(fields)} under context parallelism on {where}: no attention kernel here "
                             f"takes these masks with its lse but the O(seq^2) reference; {' and '.join(fixes)}, or "
                             "set kernels.attention=reference to accept it")
    return backend


def _count(tensors, kv: str, other=()) -> None:
    """Adds the bytes of K/V tensors (kv: 'forward' or 'backward') and of other tensors to `attention_traffic`."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    if kv == "forward":
        attention_traffic.forward_kv += nbytes
    else:
        attention_traffic.backward_kv += nbytes
    attention_traffic.other += sum(t.numel() * t.element_size() for t in other)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, backend, scale, doc, left, sinks):
        cp, me = dist.get_world_size(group), dist.get_rank(group)
        backend = _select_backend(backend, q, doc is not None, left >= 0)
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        q_chunks = q.chunk(2, dim=1)
        chunk = q_chunks[0].shape[1]
        doc_q = doc.chunk(2, dim=1) if doc is not None else None
        out = [None, None]
        lse = [None, None]
        kv = (k, v) if doc is None else (k, v, doc)  # document starts travel with their keys
        for step in range(cp):
            source = (me - step) % cp
            k_chunks, v_chunks = kv[0].chunk(2, dim=1), kv[1].chunk(2, dim=1)
            doc_k = kv[2].chunk(2, dim=1) if doc is not None else None
            for qi, ki, causal in _pairs(cp, me, source):
                masks = _block_masks(cp, me, source, qi, ki, chunk, doc_q, doc_k, left, sinks)
                if masks is None:
                    continue
                # A row that sees no key of this block (lse -inf, out 0) merges as weight 0.
                o, l = attention(q_chunks[qi], k_chunks[ki], v_chunks[ki], causal=causal, softmax_scale=scale,
                                 return_lse=True, backend=backend, **masks)
                out[qi], lse[qi] = _merge(out[qi], lse[qi], o.to(compute), l.to(compute))
            if step < cp - 1:
                _count(kv[:2], "forward", kv[2:])
                kv = collectives.ring_exchange(list(kv), group)
        out_full = torch.cat(out, dim=1)
        lse_full = torch.cat(lse, dim=2)
        ctx.save_for_backward(q, k, v, out_full, lse_full, doc)
        ctx.group, ctx.backend, ctx.scale, ctx.left, ctx.sinks = group, backend, scale, left, sinks
        return out_full.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, doc = ctx.saved_tensors
        group, cp, me = ctx.group, dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        compute = out.dtype
        block_grads = (_flash_block_grads if ctx.backend == "flash_attn" else _recomputed_block_grads)(
            q, dout, out, lse, ctx.backend, ctx.scale)
        dq = [torch.zeros_like(c, dtype=compute) for c in q.chunk(2, dim=1)]
        chunk = dq[0].shape[1]
        doc_q = doc.chunk(2, dim=1) if doc is not None else None
        kv = (k, v) if doc is None else (k, v, doc)
        dkv = (torch.zeros_like(k, dtype=compute), torch.zeros_like(v, dtype=compute))
        for step in range(cp):
            source = (me - step) % cp
            k_chunks, v_chunks = kv[0].chunk(2, dim=1), kv[1].chunk(2, dim=1)
            doc_k = kv[2].chunk(2, dim=1) if doc is not None else None
            dk_chunks, dv_chunks = dkv[0].chunk(2, dim=1), dkv[1].chunk(2, dim=1)
            for qi, ki, causal in _pairs(cp, me, source):
                masks = _block_masks(cp, me, source, qi, ki, chunk, doc_q, doc_k, ctx.left, ctx.sinks)
                if masks is None:
                    continue
                dq_b, dk_b, dv_b = block_grads(qi, k_chunks[ki], v_chunks[ki], causal, **masks)
                dq[qi] += dq_b
                dk_chunks[ki].add_(dk_b)
                dv_chunks[ki].add_(dv_b)
            # The accumulators travel with their block; after cp hops both are home.
            if step < cp - 1:
                _count(kv[:2], "backward", kv[2:])
                kv = collectives.ring_exchange(list(kv), group)
            _count(dkv, "backward")
            dkv = tuple(collectives.ring_exchange(list(dkv), group))
        return (torch.cat(dq, dim=1).to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)) + (None,) * 6


def _recomputed_block_grads(q, dout, out, lse, backend, scale):
    """(query slot, k block, v block, causal) -> (dq, dk, dv) of one block in `out`'s dtype: the block is
    recomputed through the kernel's autograd and differentiated through its out and its lse."""
    compute = out.dtype
    dout = dout.to(compute)
    # d lse_i = w_i (<dO, o_i> - <dO, O>) with w_i = exp(lse_i - lse): the softmax merge's derivative.
    row_dot = (dout * out).sum(-1).transpose(1, 2)  # (batch, heads, seq)
    q_chunks, douts, lses, row_dots = q.chunk(2, dim=1), dout.chunk(2, dim=1), lse.chunk(2, dim=2), row_dot.chunk(2, dim=2)

    def grads(qi, k_block, v_block, causal, **masks):
        qb, kb, vb = (t.detach().requires_grad_() for t in (q_chunks[qi], k_block, v_block))
        with torch.enable_grad():
            o, l = attention(qb, kb, vb, causal=causal, softmax_scale=scale, return_lse=True, backend=backend, **masks)
            weight = torch.exp(l.to(compute) - lses[qi])  # (batch, heads, seq_chunk)
            d_o = douts[qi] * weight.transpose(1, 2).unsqueeze(-1)
            d_l = weight * ((douts[qi] * o.to(compute)).sum(-1).transpose(1, 2) - row_dots[qi])
            return torch.autograd.grad((o, l), (qb, kb, vb), (d_o.to(o.dtype), d_l.to(l.dtype)))
    return grads


def _flash_block_grads(q, dout, out, lse, backend, scale):
    """As _recomputed_block_grads, without recomputing the forward and without a gradient through any lse.

    Row i's probabilities over block b, as a part of the softmax over all keys, are P_b = exp(S_b - lse) with
    the merged lse, and O = sum_b P_b V_b. So dV_b = P_b^T dO and dS_b = P_b * (dO V_b^T - rowsum(dO * O)):
    exactly what flash-attn's backward computes for block b when handed the merged O and lse (it rebuilds P
    from the lse it is given and its row term from the O it is given). The sum over blocks is then the exact
    gradient, with no derivative of each block's own lse needed."""
    q_chunks = q.chunk(2, dim=1)
    outs = out.to(q.dtype).chunk(2, dim=1)
    douts = dout.to(q.dtype).chunk(2, dim=1)
    lses = [part.float().contiguous() for part in lse.chunk(2, dim=2)]  # flash-attn reads it as contiguous float32

    def grads(qi, k_block, v_block, causal, **masks):
        assert not masks, "flash_attn is passed over for masked attention"
        dq, dk, dv = flash_attn_backward(douts[qi], q_chunks[qi], k_block, v_block, outs[qi], lses[qi], causal, scale)
        return dq.to(out.dtype), dk.to(out.dtype), dv.to(out.dtype)
    return grads


def ring_attention(q, k, v, group, backend: str | None = "auto", softmax_scale: float | None = None, doc=None,
                   **masks):
    """Causal attention over a zigzag-split sequence. q: (batch, 2*chunk, heads, head_dim) and
    k, v: (batch, 2*chunk, kv_heads, head_dim) hold this rank's two chunks; returns out like q.
    doc: None, or (batch, 2*chunk) int32, the absolute position at which each of this rank's tokens'
    document starts (packed documents: a query sees keys of its own document only).
    masks: a layer's mask keywords, window=(left, 0) (flash-attn's window_size; left = W - 1 for a window of
    W keys) and sinks=k, on absolute positions, as `attention` takes them. A window with left <= chunk runs
    `_WindowAttention` (no ring: each chunk fetches the keys its window and sinks need); a longer one runs the
    ring with every block outside the window and without a visible sink skipped."""
    if q.shape[1] % 2:
        raise LongtrainError(f"ring attention needs two equal zigzag chunks per rank, got local length {q.shape[1]}")
    if doc is not None and (doc.dtype != torch.int32 or tuple(doc.shape) != tuple(q.shape[:2])):
        raise LongtrainError(f"ring attention: doc must be int32 of shape (batch, local seq) = {tuple(q.shape[:2])}, "
                             f"got {doc.dtype} {tuple(doc.shape)}")
    left, sinks = _window_arguments(masks)
    if 0 <= left <= q.shape[1] // 2:
        return _WindowAttention.apply(q, k, v, group, backend, softmax_scale, doc, left, sinks)
    return _RingAttention.apply(q, k, v, group, backend, softmax_scale, doc, left, sinks)


def _window_arguments(masks: dict) -> tuple[int, int]:
    """(left, sinks) from a layer's mask keywords; left -1 for no window (sinks then change nothing)."""
    unknown = sorted(set(masks) - {"window", "sinks"})
    if unknown:
        raise LongtrainError(f"context-parallel attention takes the masks window and sinks, got {', '.join(unknown)}")
    window, sinks = masks.get("window"), masks.get("sinks", 0)
    if window is None or tuple(window) == (-1, -1):
        return -1, 0
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and int(window[0]) >= -1 and int(window[1]) == 0):
        raise LongtrainError(f"context-parallel attention: window must be (left, 0) with left >= -1 (causal), "
                             f"got {window!r}")
    if not isinstance(sinks, int) or sinks < 0:
        raise LongtrainError(f"context-parallel attention: sinks must be an int >= 0, got {sinks!r}")
    return int(window[0]), sinks


# ---- sliding-window attention without the ring ----
#
# The rule. With a window of left + 1 keys, left <= chunk, query chunk c (positions [c*C, c*C + C)) sees keys in
# three places only:
# - its own chunk (causal, window, sinks and documents masked by the kernel);
# - the tail [T, c*C) of the keys before it, T = max(c*C - left, min over rows of d_c), where d_c is the document
#   start of the chunk's first token (no document: 0): the window reaches back at most `left`, and keys before
#   every row's d_c belong to other documents;
# - the sinks of d_c: positions d_c + j, j < sinks, that lie before R = max(c*C - left, 0). Only the document of
#   the chunk's first token can have started before the chunk (documents are contiguous), so these are the only
#   sinks outside the chunk and the tail that any of its queries sees; each lies outside every query's window,
#   so every query of document d_c sees all of them and no other query sees any.
# Every rank knows d_c of every chunk after one all-gather of (2, batch) ints; so every rank computes the same
# plan of which positions each chunk fetches from which rank, and sends exactly those (zero-filled in rows and
# places it does not hold). The backward sends the gradients of the fetched keys and values back the same way.
# Nothing else crosses ranks: with left + sinks << chunk the traffic is (left + sinks) tokens per chunk instead of
# the ring's whole sequence.

class _Span:
    """Keys fetched for query chunk `chunk`: row b holds absolute positions start[b] + j for j < count[b]."""

    def __init__(self, chunk: int, kind: str, start: list[int], count: list[int]):
        self.chunk, self.kind, self.start, self.count = chunk, kind, start, count
        self.width = max(count)

    def owners(self, cp: int, chunk: int) -> list[int]:
        """The cp ranks holding any of the span's positions, ascending."""
        chunks = set()
        for s, n in zip(self.start, self.count):
            chunks.update(range(s // chunk, (s + n - 1) // chunk + 1) if n else ())
        return sorted({chunk_owner(cp, c)[0] for c in chunks})

    def where(self, cp: int, chunk: int, rank: int, device):
        """(local index, held) of each (row, j): the index in `rank`'s (batch, 2*chunk) tokens, and whether
        `rank` holds that position (False past count). Both (batch, width)."""
        start = torch.tensor(self.start, device=device)[:, None]
        count = torch.tensor(self.count, device=device)[:, None]
        j = torch.arange(self.width, device=device)[None]
        position = start + j
        index = position // chunk
        owner = torch.where(index < cp, index, 2 * cp - 1 - index)
        held = (j < count) & (owner == rank)
        local = torch.where(held, (index >= cp).long() * chunk + position % chunk, torch.zeros_like(position))
        return local, held


def _window_plan(cp: int, chunk: int, batch: int, left: int, sinks: int, starts: list[list[int]] | None) -> list[_Span]:
    """Every chunk's tail and sink spans (the rule above), in chunk order; empty spans left out.
    starts: None, or for each of the 2*cp chunks the document start of its first token in every row."""
    plan = []
    for c in range(2 * cp):
        reach = max(c * chunk - left, 0)
        tail = max(reach, min(starts[c])) if starts is not None else reach
        if tail < c * chunk:
            plan.append(_Span(c, "tail", [tail] * batch, [c * chunk - tail] * batch))
        first = starts[c] if starts is not None else [0] * batch
        count = [max(min(sinks, reach - d), 0) for d in first]
        if max(count) > 0:
            plan.append(_Span(c, "sinks", first, count))
    return plan


def _chunk_starts(doc, group) -> list[list[int]] | None:
    """For every chunk of the sequence, in order, the document start of its first token in every row."""
    if doc is None:
        return None
    cp, chunk = dist.get_world_size(group), doc.shape[1] // 2
    mine = torch.stack([doc[:, 0], doc[:, chunk]]).contiguous()  # (2, batch)
    parts = [torch.empty_like(mine) for _ in range(cp)]
    _count((), "forward", [mine] * (cp - 1))
    collectives.all_gather(parts, mine, group=group)
    gathered = torch.stack(parts).tolist()  # (cp, slot, batch)
    return [gathered[owner][slot] for owner, slot in (chunk_owner(cp, c) for c in range(2 * cp))]


def _fetch(plan, tensors, group, chunk: int) -> dict:
    """For each span of a chunk of mine: its (k, v) of (batch, width, kv_heads, head_dim), summed over the ranks
    that hold its positions (each position has one holder; the others send zeros there)."""
    cp, me = dist.get_world_size(group), dist.get_rank(group)
    sends, receives, parts = [], [], {}
    for number, span in enumerate(plan):
        home = chunk_owner(cp, span.chunk)[0]
        for owner in span.owners(cp, chunk):
            if owner != me and home != me:
                continue
            if owner == me:
                local, held = span.where(cp, chunk, me, tensors[0].device)
                mine = [_gather(t, local, held) for t in tensors]
                if home == me:
                    parts.setdefault(number, []).append(mine)
                else:
                    sends += [(t, home) for t in mine]
            else:
                buffers = [t.new_empty((t.shape[0], span.width) + t.shape[2:]) for t in tensors]
                receives += [(b, owner) for b in buffers]
                parts.setdefault(number, []).append(buffers)
    _count([t for t, _ in sends], "forward")
    collectives.exchange(sends, receives, group)
    fetched = {}
    for number, pieces in parts.items():  # summed in the order of the owners: a fixed order
        fetched[number] = list(pieces[0])
        for piece in pieces[1:]:
            fetched[number] = [a + b for a, b in zip(fetched[number], piece)]
    return fetched


def _return(plan, grads: dict, like, group, chunk: int) -> list[torch.Tensor]:
    """The backward of `_fetch`: the gradients of my chunks' fetched keys (grads: span number -> [dk, dv]) go
    to the ranks that hold them; returns my (dk, dv) of the fetched keys, (batch, 2*chunk, ...) like `like`."""
    cp, me = dist.get_world_size(group), dist.get_rank(group)
    sends, receives, adds = [], [], []
    for number, span in enumerate(plan):
        home = chunk_owner(cp, span.chunk)[0]
        for owner in span.owners(cp, chunk):
            if owner != me and home != me:
                continue
            if home == me and owner != me:
                sends += [(g, owner) for g in grads[number]]
            elif owner == me:
                if home == me:
                    received = grads[number]
                else:
                    received = [torch.empty((t.shape[0], span.width) + t.shape[2:], dtype=t.dtype, device=t.device)
                                for t in like]
                    receives += [(b, home) for b in received]
                adds.append((span, received))
    _count([g for g, _ in sends], "backward")
    collectives.exchange(sends, receives, group)
    total = [torch.zeros_like(t) for t in like]
    for span, received in adds:  # in plan order: a fixed order of the sums
        local, held = span.where(cp, chunk, me, like[0].device)
        index = local[..., None, None].expand(-1, -1, *like[0].shape[2:])
        for t, g in zip(total, received):
            t.scatter_add_(1, index, torch.where(held[..., None, None], g, torch.zeros_like(g)))
    return total


def _gather(x, local, held):
    """x: (batch, 2*chunk, heads, dim); local, held: (batch, width) -> (batch, width, heads, dim), 0 where not held."""
    index = local[..., None, None].expand(-1, -1, *x.shape[2:])
    picked = torch.gather(x, 1, index)
    return torch.where(held[..., None, None], picked, torch.zeros_like(picked))


def _window_blocks(plan, fetched, me_chunks, k, v, doc, left: int, sinks: int, chunk: int):
    """(slot, name, k block, v block, causal, masks) of every block my query chunks attend to, own chunk first
    (every row sees at least itself there, so the merged lse is finite from the start). name: None for the own
    chunk, else the span's number in the plan."""
    k_chunks, v_chunks = k.chunk(2, dim=1), v.chunk(2, dim=1)
    doc_chunks = doc.chunk(2, dim=1) if doc is not None else (None, None)
    for slot, c in enumerate(me_chunks):
        d = doc_chunks[slot]
        documents = dict(doc_q=d, doc_k=d) if d is not None else {}
        yield slot, None, k_chunks[slot], v_chunks[slot], True, dict(
            window=(left, 0), sinks=sinks, q_start=c * chunk, k_start=c * chunk, **documents)
        for number, span in enumerate(plan):
            if span.chunk != c:
                continue
            kb, vb = fetched[number]
            first = d[:, :1] if d is not None else None
            j = torch.arange(span.width, device=k.device)[None]
            if span.kind == "tail":
                masks = dict(window=(left, 0), sinks=sinks, q_start=c * chunk, k_start=span.start[0])
                if d is not None:  # keys before the row's d_c are of other documents: -1 matches no query
                    position = span.start[0] + j
                    masks.update(doc_q=d, doc_k=torch.where(position >= first, first, -1).to(torch.int32))
                yield slot, number, kb, vb, True, masks
            else:  # sinks: all before every query's window, seen by the queries of d_c
                masks = {}
                if d is not None:
                    count = torch.tensor(span.count, device=k.device)[:, None]
                    masks = dict(doc_q=d, doc_k=torch.where(j < count, first, -1).to(torch.int32))
                yield slot, number, kb, vb, False, masks


class _WindowAttention(torch.autograd.Function):
    """Sliding-window attention with sinks and documents over the zigzag layout, by the rule above."""

    @staticmethod
    def forward(ctx, q, k, v, group, backend, scale, doc, left, sinks):
        cp, me = dist.get_world_size(group), dist.get_rank(group)
        backend = _select_backend(backend, q, doc is not None, True)
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        chunk = q.shape[1] // 2
        plan = _window_plan(cp, chunk, q.shape[0], left, sinks, _chunk_starts(doc, group))
        fetched = _fetch(plan, (k, v), group, chunk)
        q_chunks = q.chunk(2, dim=1)
        out, lse = [None, None], [None, None]
        for slot, _, kb, vb, causal, masks in _window_blocks(plan, fetched, zigzag_chunks(cp, me), k, v, doc, left,
                                                             sinks, chunk):
            o, l = attention(q_chunks[slot], kb, vb, causal=causal, softmax_scale=scale, return_lse=True,
                             backend=backend, **masks)
            out[slot], lse[slot] = _merge(out[slot], lse[slot], o.to(compute), l.to(compute))
        out_full, lse_full = torch.cat(out, dim=1), torch.cat(lse, dim=2)
        numbers = sorted(fetched)
        ctx.save_for_backward(q, k, v, out_full, lse_full, doc, *(t for n in numbers for t in fetched[n]))
        ctx.group, ctx.backend, ctx.scale, ctx.left, ctx.sinks = group, backend, scale, left, sinks
        ctx.plan, ctx.numbers = plan, numbers
        return out_full.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, doc, *buffers = ctx.saved_tensors
        cp, me = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        chunk = q.shape[1] // 2
        fetched = {n: buffers[2 * i:2 * i + 2] for i, n in enumerate(ctx.numbers)}
        block_grads = _recomputed_block_grads(q, dout, out, lse, ctx.backend, ctx.scale)
        compute = out.dtype
        dq = [torch.zeros_like(c, dtype=compute) for c in q.chunk(2, dim=1)]
        dk, dv = torch.zeros_like(k, dtype=compute), torch.zeros_like(v, dtype=compute)
        dk_chunks, dv_chunks = dk.chunk(2, dim=1), dv.chunk(2, dim=1)
        span_grads = {}
        for slot, number, kb, vb, causal, masks in _window_blocks(ctx.plan, fetched, zigzag_chunks(cp, me), k, v, doc,
                                                                  ctx.left, ctx.sinks, chunk):
            dq_b, dk_b, dv_b = block_grads(slot, kb, vb, causal, **masks)
            dq[slot] += dq_b
            if number is None:
                dk_chunks[slot].add_(dk_b)
                dv_chunks[slot].add_(dv_b)
            else:
                span_grads[number] = [dk_b, dv_b]
        returned = _return(ctx.plan, span_grads, (dk, dv), ctx.group, chunk)
        dk, dv = dk + returned[0], dv + returned[1]
        return (torch.cat(dq, dim=1).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)) + (None,) * 6
