"""Selective scan of Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per channel d, state n)
    y_t = <C_t, h_t> + D * u_t,   out = y * silu(z)   when z is given

Shapes follow mamba-ssm's `selective_scan_fn`: u, delta: (batch, dim, seq); A: (dim, state);
B, C: (batch, state, seq); D, delta_bias: (dim,); z: (batch, dim, seq); state h: (batch, dim, state).
Backends, best first: `mamba_ssm` (GPU, when installed), `csrc` (our kernel, when built), `reference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from longtrain.kernels.registry import OpRegistry, always

registry = OpRegistry("selective_scan")


def reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
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


registry.register("reference", reference, always)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, backend=None):
    """Mamba's selective scan with optional initial state in and final state out.

    Passing the final state of one piece as the initial state of the next gives the same result
    as scanning the whole sequence (chunked training, generation, context parallelism).
    See the module docstring for shapes. Returns out, or (out, last_state) with return_last_state.
    """
    if u.dim() != 3 or B.dim() != 3 or A.dim() != 2:
        raise ValueError("selective_scan expects u, delta: (batch, dim, seq); A: (dim, state); B, C: (batch, state, seq); "
                         f"got u {tuple(u.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    chosen = registry.select(backend, u.device, u.dtype, state=A.shape[1], initial_state=initial_state is not None)
    out, last = chosen.fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                          delta_softplus=delta_softplus, initial_state=initial_state)
    return (out, last) if return_last_state else out
