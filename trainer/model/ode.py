"""Neural-ODE block (Chen et al. 2018, "Neural Ordinary Differential Equations"): continuous depth.

    h(1) = h(0) + integral_0^1 f(h(t), t) dt

f is a small residual sublayer conditioned on t (an MLP, or attention then MLP) whose weights are
shared across integration steps. Solved with torchdiffeq (fixed-step euler / midpoint / rk4, or
adaptive dopri5); with `adjoint` the backward pass solves the adjoint ODE instead of storing
every step's activations (memory flat in the number of steps).
"""
from __future__ import annotations

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from longtrain.trainer.model.attention import Attention
from longtrain.trainer.model.layers import RMSNorm
from longtrain.trainer.model.mlp import SwiGLU


class VectorField(nn.Module):
    """f(t, h): (batch, seq, d_model) -> same shape. Counts its evaluations in `nfe`."""

    def __init__(self, cfg, linears, kind: str = "mlp", attention_backend: str = "auto"):
        super().__init__()
        self.time = nn.Parameter(torch.zeros(cfg.d_model))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_hidden, linears)
        self.attn = Attention(cfg, linears, attention_backend) if kind == "attention_mlp" else None
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if self.attn is not None else None
        self.nfe = 0

    def forward(self, t, h):
        self.nfe += 1
        h_t = h + t.to(h.dtype) * self.time
        out = 0
        if self.attn is not None:
            out = self.attn(self.attn_norm(h_t))
            h_t = h_t + out
        return out + self.mlp(self.norm(h_t))


class ODEBlock(nn.Module):
    def __init__(self, cfg, linears, attention_backend: str = "auto"):
        super().__init__()
        self.ode = cfg.ode
        self.f = VectorField(cfg, linears, cfg.ode.sublayer, attention_backend)
        self.register_buffer("span", torch.tensor([0.0, 1.0]), persistent=False)
        self.last_nfe = 0

    def solver_options(self) -> dict:
        if self.ode.solver == "dopri5":
            return dict(method="dopri5", rtol=self.ode.rtol, atol=self.ode.atol,
                        options={"max_num_steps": self.ode.max_steps})
        return dict(method=self.ode.solver, options={"step_size": 1.0 / self.ode.steps})

    def forward(self, x):
        """x: (batch, seq, d_model) -> h(1), same shape and dtype."""
        self.f.nfe = 0
        span = self.span.to(x.dtype if x.dtype == torch.float64 else torch.float32)
        solve = odeint_adjoint if self.ode.adjoint and torch.is_grad_enabled() else odeint
        extra = {"adjoint_params": tuple(self.f.parameters())} if solve is odeint_adjoint else {}
        out = solve(self.f, x, span, **self.solver_options(), **extra)[-1]
        self.last_nfe = self.f.nfe
        return out
