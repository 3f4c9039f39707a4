"""Context parallelism: one sequence split over the cp ranks of a group, every block exact.

Zigzag split (the load-balanced layout of Brandon et al. 2023, "Striped Attention", and Megatron's
context parallelism): the sequence is cut into 2*cp equal chunks and rank r holds chunks r and
2cp-1-r, so each rank does the same share of causal attention work.

- Attention: ring attention, or with a sliding window the fetch of the window's keys only
  (trainer/parallel/ring.py).
- Mamba: the scan is linear in its state, h_out = P h_in + h_out(0) with P = exp(A * sum(delta)).
  Each rank scans its chunks from a zero state, the (h_out(0), P) pairs of all chunks are gathered
  and composed in sequence order to give each chunk its carry-in, and a second scan with zero input
  adds the carry-in's contribution. The causal conv takes the previous chunk's last d_conv-1 inputs.
  Gradients flow through the gather (its backward sums the gradients of all ranks). Packed documents
  (reset where a document starts): a chunk with a reset has P = 0, the second scan's carry-in stops
  at the chunk's first reset (the scan's own reset input), and the conv history is masked by the
  tokens' in-document positions, so nothing crosses a document boundary, values or gradients.
- Token-wise blocks (F, O with the MLP sublayer) need nothing.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longtrain.kernels import attention as attention_kernels
from longtrain.kernels import scan as scan_kernels
from longtrain.kernels.registry import BackendError
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.parallel import collectives
from longtrain.trainer.parallel.ring import attention_traffic, ring_attention  # noqa: F401 (the cp API)
from longtrain.trainer.parallel.zigzag import (check_zigzag, chunk_owner, zigzag_chunks, zigzag_merge,  # noqa: F401
                                               zigzag_positions, zigzag_split)


# ---- collectives with gradients ----

class _AllGather(torch.autograd.Function):
    """x -> (group size, *x.shape), every rank's x. Backward: the gradients of all ranks, summed, for mine."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        collectives.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        collectives.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def all_gather_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    return _AllGather.apply(x, group)


# ---- Mamba: conv history and scan state across ranks ----

def context_parallel_conv(conv, group, x, conv_state=None, positions=None):
    """Mamba's causal conv over this rank's two chunks, each continuing from its predecessor's inputs.
    conv: the block's own conv(x, conv_state, positions); x: (batch, channels, 2*chunk); positions:
    (batch, 2*chunk) in-document positions of this rank's tokens (they mask the predecessor's inputs)."""
    if conv_state is not None:
        raise LongtrainError("decoding with a conv state is not supported under context parallelism")
    cp, me = dist.get_world_size(group), dist.get_rank(group)
    history = conv.__self__.conv_weight.shape[1] - 1
    chunks = x.chunk(2, dim=-1)
    if chunks[0].shape[-1] < history:
        raise LongtrainError(f"zigzag chunk of {chunks[0].shape[-1]} tokens is shorter than the Mamba conv "
                             f"history {history} (model.d_conv - 1); use a longer data.seq_len or a smaller parallel.cp")
    tails = all_gather_with_grad(torch.stack([c[..., c.shape[-1] - history:] for c in chunks]), group)
    slot_positions = positions.chunk(2, dim=-1) if positions is not None else (None, None)
    outputs = []
    for slot, index in enumerate(zigzag_chunks(cp, me)):
        previous = None
        if index > 0 and history > 0:
            owner, owner_slot = chunk_owner(cp, index - 1)
            previous = tails[owner, owner_slot]
        y, _ = conv(chunks[slot], previous, positions=slot_positions[slot])
        outputs.append(y)
    return torch.cat(outputs, dim=-1), x[..., x.shape[-1] - history:]


def context_parallel_scan(scan, group, u, delta, A, B, C, D, z, delta_bias, initial_state=None, return_last_state=False,
                          reset=None):
    """Mamba's scan (delta_softplus=True) over this rank's two chunks, each starting from the state the
    unsplit scan would have there. Same arguments as Mamba.scan; sequence tensors (reset too) hold both chunks."""
    if initial_state is not None or return_last_state:
        raise LongtrainError("decoding with an SSM state is not supported under context parallelism")
    cp, me = dist.get_world_size(group), dist.get_rank(group)
    pieces = [t.chunk(2, dim=-1) if t is not None else (None, None) for t in (u, delta, B, C, z, reset)]
    zero_state_out, summaries = [], []
    for slot in range(2):
        u_s, delta_s, B_s, C_s, z_s, reset_s = (p[slot] for p in pieces)
        y, last = scan(u_s, delta_s, A, B_s, C_s, D, z_s, delta_bias, initial_state=None, return_last_state=True,
                       reset=reset_s)
        compute = torch.float64 if u.dtype == torch.float64 else torch.float32
        step = delta_s.to(compute) + (delta_bias.to(compute)[:, None] if delta_bias is not None else 0)
        decay = torch.exp(A.to(compute)[None] * F.softplus(step).sum(-1)[..., None])  # (batch, dim, state)
        if reset_s is not None:  # a document starting in the chunk forgets the carry-in: P = 0
            decay = decay * (~reset_s.any(-1)).to(compute)[:, None, None]
        zero_state_out.append(y)
        summaries.append(torch.stack([last.to(decay.dtype), decay]))
    gathered = all_gather_with_grad(torch.stack(summaries), group)  # (cp, slot, {last, decay}, batch, dim, state)
    carry = [torch.zeros_like(gathered[0, 0, 0])]
    for index in range(2 * cp - 1):
        owner, slot = chunk_owner(cp, index)
        last, decay = gathered[owner, slot]
        carry.append(decay * carry[-1] + last)
    outputs = []
    for slot, index in enumerate(zigzag_chunks(cp, me)):
        y = zero_state_out[slot]
        if index > 0:
            u_s, delta_s, B_s, C_s, z_s, reset_s = (p[slot] for p in pieces)
            # With zero input the scan only carries the initial state: y_t = <C_t, P_t h_in> * silu(z_t),
            # up to the chunk's first reset, after which it is exactly 0.
            y = y + scan(torch.zeros_like(u_s), delta_s, A, B_s, C_s, None, z_s, delta_bias,
                         initial_state=carry[index], return_last_state=False, reset=reset_s)
        outputs.append(y)
    return torch.cat(outputs, dim=-1)


# ---- applying it to a model ----

def apply_context_parallel(model: torch.nn.Module, group, device: torch.device | None = None,
                           dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Swap the sequence-mixing hooks of every attention and Mamba module in `model` for their
    context-parallel versions over `group` (in place; returns the model). The model then takes this
    rank's zigzag slice of each sequence. A group of size 1 leaves the model untouched.
    device, dtype: where and in which precision the run computes (default: the model's parameters');
    first checked by `check_context_parallel_kernels`."""
    from longtrain.trainer.model.attention import Attention
    from longtrain.trainer.model.mamba import Mamba
    from longtrain.trainer.model.ode import ODEBlock

    cp = dist.get_world_size(group)
    if cp == 1:
        return model
    parameter = next(model.parameters(), None)
    check_context_parallel_kernels(model, device or (parameter.device if parameter is not None else torch.device("cpu")),
                                   dtype or (parameter.dtype if parameter is not None else torch.float32))
    rank = dist.get_rank(group)
    for module in model.modules():
        if isinstance(module, Attention):
            module.attend = functools.partial(_module_attend, module, group)
            module.positions = functools.partial(_local_positions, cp=cp, rank=rank)
            module.context_length = functools.partial(_full_length, cp=cp)
        elif isinstance(module, Mamba):
            module.conv = functools.partial(context_parallel_conv, module.conv, group)
            module.scan = functools.partial(context_parallel_scan, module.scan, group)
        elif isinstance(module, ODEBlock) and module.ode.solver == "dopri5" and module.lockstep_sum is None:
            # Each cp rank would accept its own step sizes and the ring's collectives would desynchronise.
            raise LongtrainError("model.ode.solver=dopri5 under context parallelism needs ODEBlock.lockstep_sum "
                                 "(set by trainer/parallel/parallelize.py) so that cp ranks step in lock-step")
    return model


_FAST_KERNELS = {
    "kernels.attention": "on a GPU install flash-attn 2.6-2.8 (with train.bf16=true), or build longtrain.kernels._C "
                         "(pip install --no-build-isolation -e ., with nvcc for CUDA)",
    "kernels.scan": "build longtrain.kernels._C (pip install --no-build-isolation -e ., with nvcc for CUDA)",
}


def check_context_parallel_kernels(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Raise before any step when cp would run on the reference kernels without having asked for them.

    Ring attention needs attention that returns the log-sum-exp, the Mamba scan needs an initial state
    and its final state. Where `auto` finds no faster kernel doing that on this device and dtype, it
    would take the O(seq^2)-memory reference attention or the step-by-step reference scan: an error
    naming the recipe field and the fix. A backend the recipe names, `reference` included, is taken as
    asked (and must be able to run here). float64, which no recipe trains in and only the reference
    computes, is the precision of checks against the unsplit model, and is let through."""
    from longtrain.trainer.model.attention import Attention
    from longtrain.trainer.model.mamba import Mamba

    for module in model.modules():
        if isinstance(module, Attention):
            field, registry, op = "kernels.attention", attention_kernels.registry, "ring attention (attention with its lse)"
            # a window's or S²-Attn's group masks go to the kernel (flash_attn takes neither)
            facts = dict(head_dim=module.head_dim, need_lse=True, masked=bool(module.masks) or module.s2_group is not None)
        elif isinstance(module, Mamba):
            field, registry, op = "kernels.scan", scan_kernels.registry, "the Mamba scan with initial and final state"
            facts = dict(state=module.d_state, initial_state=True, return_last_state=True)
        else:
            continue
        where = f"{device.type}/{str(dtype).removeprefix('torch.')}"
        try:
            chosen = registry.select(module.backend, device, dtype, **facts)
        except BackendError as error:
            raise LongtrainError(f"{field}={module.backend} under context parallelism: {error}") from None
        if module.backend in (None, "auto") and chosen.name == "reference" and dtype != torch.float64:
            passed_over = "; ".join(f"{b.name}: {reason}" for b in registry.backends if b.name != "reference"
                                    and (reason := b.supports(device=device, dtype=dtype, **facts)))
            raise LongtrainError(f"{field}=auto would run {op} on the reference kernel under context parallelism on "
                                 f"{where} ({passed_over}); {_FAST_KERNELS[field]}, or set {field}=reference to "
                                 "accept it")


def _module_attend(module, group, q, k, v, doc=None):
    """An attention module's attend under cp: its backend and mask keywords (`module.masks`) read at each call."""
    return ring_attention(q, k, v, group=group, backend=module.backend, doc=doc, **module.masks)


def _full_length(seq: int, *, cp: int) -> int:
    return seq * cp


def _local_positions(seq: int, device=None, *, cp: int, rank: int) -> torch.Tensor:
    return zigzag_positions(seq * cp, cp, rank, device=device)
