"""Selective scan of Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per channel d, state n)
    y_t = <C_t, h_t> + D * u_t,   out = y * silu(z)   when z is given

Shapes follow mamba-ssm's `selective_scan_fn`: u, delta: (batch, dim, seq); A: (dim, state);
B, C: (batch, state, seq); D, delta_bias: (dim,); z: (batch, dim, seq); state h: (batch, dim, state).

Document resets for packed sequences (like Mamba-2's `seq_idx`): reset (batch, seq) bool, True at t
where a document starts; the state is zeroed before token t is absorbed, so h_t = delta_t * B_t * u_t
there (an initial state is discarded by a reset at t = 0) and no gradient flows across a reset.

Backends, best first: `mamba_ssm` (GPU, when installed; no initial or final state, no reset), `csrc`
(our kernel in csrc/scan/, CPU and CUDA, when built), `reference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from longtrain.kernels.extension import csrc_supports
from longtrain.kernels.registry import OpRegistry, always

registry = OpRegistry("selective_scan")


def reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
              reset=None):
    """Step-by-step scan in float32 (float64 if given float64). Returns (out, last_state).

    out: (batch, dim, seq) in u's dtype; last_state: (batch, dim, state) float32 (or float64).
    """
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    in_dtype = u.dtype
    u, delta, A, B, C = (x.to(compute) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, seq = u.shape
    # Discretisation for all steps at once, sequence-major so each step is one unbind slice
    # (slicing a sequence-minor tensor per step makes autograd write a full-size gradient per step).
    decay = torch.exp(torch.einsum("bdl,dn->lbdn", delta, A))
    if reset is not None:  # a reset step forgets the state before it: its decay is 0
        decay = decay * (~reset).to(compute).transpose(0, 1)[:, :, None, None]
    drive = torch.einsum("bdl,bnl->lbdn", delta * u, B)
    h = (initial_state.to(compute) if initial_state is not None
         else u.new_zeros(batch, dim, A.shape[1]))
    states = []
    for decay_t, drive_t in zip(decay.unbind(0), drive.unbind(0)):
        h = decay_t * h + drive_t
        states.append(h)
    y = (torch.einsum("lbdn,bnl->bdl", torch.stack(states), C) if seq
         else u.new_zeros(batch, dim, 0))
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(in_dtype), h


# Steps per stored state in the csrc forward (the backward recomputes one chunk at a time): on CPU a
# chunk's states and decays fill a fraction of L1; the CUDA kernel stages 32 steps in shared memory.
CHECKPOINT_CHUNK = {"cpu": 128, "cuda": 32}
CUDA_MAX_STATE = 32


class _CsrcScan(torch.autograd.Function):
    """Our compiled scan; gradients flow into every input, the initial state included, and from
    both outputs, so a sequence scanned in pieces trains exactly like the whole sequence."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reset):
        ctx.chunk = CHECKPOINT_CHUNK[u.device.type]
        out, last, checkpoints = torch.ops.longtrain.selective_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, ctx.chunk, reset)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints, reset)
        ctx.delta_softplus = delta_softplus
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints, reset = ctx.saved_tensors
        grads = torch.ops.longtrain.selective_scan_bwd(
            dout.contiguous(), dlast, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, checkpoints, ctx.chunk,
            reset)
        inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        cast = [g.to(x.dtype) if x is not None else None for g, x in zip(grads, inputs)]
        return (*cast, None, None)


def _csrc(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None, reset=None):
    return _CsrcScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reset)


def _csrc_supports(device, dtype, state=None, **facts):
    reason = csrc_supports(device, dtype)
    if reason is None and device.type == "cuda" and state is not None and state > CUDA_MAX_STATE:
        reason = f"the CUDA scan holds one state per lane: state={state} > {CUDA_MAX_STATE}"
    return reason


def _mamba_ssm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
               reset=None):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                             return_last_state=True)


def _mamba_ssm_supports(device, dtype, initial_state=False, return_last_state=False, reset=False, **_):
    if device.type != "cuda":
        return "mamba_ssm runs on CUDA only"
    if reset:
        return "mamba_ssm's selective_scan_fn has no document reset"
    if initial_state or return_last_state:
        # selective_scan_fn takes no initial state and passes no gradient through its final state.
        return "mamba_ssm has no initial state and no gradient through the final state"
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    except ImportError as error:
        return f"mamba_ssm not installed ({error})"
    return None


registry.register("mamba_ssm", _mamba_ssm, _mamba_ssm_supports)
registry.register("csrc", _csrc, _csrc_supports)
registry.register("reference", reference, always)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, backend=None, reset=None):
    """Mamba's selective scan with optional initial state in, final state out and document resets.

    Passing the final state of one piece as the initial state of the next gives the same result
    as scanning the whole sequence (chunked training, generation, context parallelism).
    reset: (batch, seq) bool, True where a document starts (the state is zeroed before that token).
    See the module docstring for shapes. Returns out, or (out, last_state) with return_last_state.
    """
    if u.dim() != 3 or B.dim() != 3 or A.dim() != 2:
        raise ValueError("selective_scan expects u, delta: (batch, dim, seq); A: (dim, state); B, C: (batch, state, seq); "
                         f"got u {tuple(u.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    if reset is not None and (reset.dtype != torch.bool or reset.shape != (u.shape[0], u.shape[2])):
        raise ValueError(f"selective_scan: reset must be a bool tensor of shape (batch, seq) = "
                         f"{(u.shape[0], u.shape[2])}, got {reset.dtype} {tuple(reset.shape)}")
    chosen = registry.select(backend, u.device, u.dtype, state=A.shape[1], initial_state=initial_state is not None,
                             return_last_state=return_last_state, reset=reset is not None)
    out, last = chosen.fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                          delta_softplus=delta_softplus, initial_state=initial_state, reset=reset)
    return (out, last) if return_last_state else out
