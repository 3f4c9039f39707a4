"""Mamba block (Gu & Dao 2023): input projection, causal depthwise conv, selective SSM, gated output.

The inner channels are split over tp shards: in/out projections, the conv and the scan all act
on this rank's channels only. `scan` is `longtrain.kernels.scan.selective_scan`, swappable by
context parallelism (state passing from rank to rank).

Packed sequences: with `positions` (batch, seq), the in-document position of every token (0 where
a document starts, Hugging Face's `position_ids` convention for packing), no token sees another
document: the scan resets its state where positions == 0, and conv tap j (j steps back) reaches
token t only when j <= positions[t].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longtrain.kernels.scan import selective_scan


class Mamba(nn.Module):
    def __init__(self, cfg, linears, backend: str = "auto"):
        super().__init__()
        d_inner = cfg.d_inner
        self.local_inner = linears.local(d_inner, "model.d_inner")
        self.d_state = cfg.d_state
        self.dt_rank = math.ceil(cfg.d_model / 16)
        self.backend = backend
        self.in_x = linears.column(cfg.d_model, d_inner)
        self.in_z = linears.column(cfg.d_model, d_inner)
        bound = 1 / math.sqrt(cfg.d_conv)  # torch's default for a conv of d_conv taps per channel
        self.conv_weight = linears.channels(d_inner, cfg.d_conv, rule=("uniform", -bound, bound))
        self.conv_bias = linears.channels(d_inner, rule=("const", 0.0))
        self.x_proj = linears.row(d_inner, self.dt_rank + 2 * cfg.d_state)
        self.dt_proj = linears.column(self.dt_rank, d_inner)
        # delta = softplus(dt_proj(x) + dt_bias) starts in [1e-3, 1e-1], log-uniform (Mamba's init).
        self.dt_bias = linears.channels(d_inner, rule=("dt_bias", 1e-3, 1e-1))
        self.A_log = linears.channels(d_inner, cfg.d_state, rule=("a_log",))
        self.D = linears.channels(d_inner, rule=("const", 1.0))
        self.out = linears.row(d_inner, cfg.d_model)
        self.shared_input = linears.shared_input
        self.scan = self._local_scan

    def _local_scan(self, u, delta, A, B, C, D, z, delta_bias, initial_state=None, return_last_state=False,
                    reset=None):
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True,
                              initial_state=initial_state, return_last_state=return_last_state, backend=self.backend,
                              reset=reset)

    def conv(self, x, conv_state=None, positions=None):
        """Causal depthwise conv over seq. x: (batch, channels, seq); conv_state: (batch, channels, d_conv-1),
        the inputs before x; positions: (batch, seq) in-document positions, tap j (j steps back) counts
        at token t only when j <= positions[t]. Returns y like x and the new conv_state."""
        width = self.conv_weight.shape[1]
        pad = conv_state if conv_state is not None else x.new_zeros(x.shape[0], x.shape[1], width - 1)
        padded = torch.cat([pad, x], dim=-1)
        if positions is None:
            y = F.conv1d(padded, self.conv_weight.unsqueeze(1), self.conv_bias, groups=x.shape[1])
        else:
            seq = x.shape[-1]
            y = self.conv_bias[:, None].expand_as(x)
            for back in range(width):  # the tap `back` steps before each token, masked at document starts
                start = width - 1 - back
                seen = (positions >= back).to(x.dtype)[:, None, :]
                y = y + self.conv_weight[:, start, None] * padded[..., start:start + seq] * seen
        return y, padded[..., -(width - 1):]

    def project(self, x):
        """x: (batch, seq, d_model) -> u, z: (batch, local_inner, seq) before the conv."""
        return self.in_x(x).transpose(1, 2), self.in_z(x).transpose(1, 2)

    def ssm_inputs(self, u):
        """u: (batch, local_inner, seq) after conv+silu -> delta (batch, inner, seq), B, C (batch, state, seq)."""
        x_dbl = self.x_proj(u.transpose(1, 2))  # (batch, seq, dt_rank + 2 * state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj(dt).transpose(1, 2)
        B, C = self.shared_input(B), self.shared_input(C)  # full width, consumed by this shard's channels only
        return delta, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()

    def forward(self, x, state=None, positions=None):
        """x: (batch, seq, d_model) -> (batch, seq, d_model). With `state` (a dict holding 'conv' and
        'ssm', or empty), continues from it and updates it in place (recurrent generation).
        positions: (batch, seq) integer in-document positions of packed documents (0 at each start)."""
        if positions is not None and positions.shape != x.shape[:2]:
            raise ValueError(f"Mamba: positions must have shape (batch, seq) = {tuple(x.shape[:2])}, "
                             f"got {tuple(positions.shape)}")
        u, z = self.project(x)
        u, conv_state = self.conv(u, None if state is None else state.get("conv"), positions=positions)
        u = F.silu(u)
        delta, B, C = self.ssm_inputs(u)
        A = -torch.exp(self.A_log.float())
        y = self.scan(u, delta, A, B, C, self.D.float(), z, self.dt_bias.float(),
                      initial_state=None if state is None else state.get("ssm"), return_last_state=state is not None,
                      reset=None if positions is None else positions == 0)
        if state is not None:
            y, state["ssm"] = y
            state["conv"] = conv_state
        return self.out(y.transpose(1, 2))
