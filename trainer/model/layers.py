"""Building pieces shared by the blocks: linear-layer factories, RMSNorm, rotary tables.

Blocks never construct `nn.Linear` themselves: they receive a `Linears` factory. The dense one
lives here; tensor-parallel factories (trainer/parallel/) hand out sharded layers with the same
call signature, so the model code knows nothing of parallelism.
"""
from __future__ import annotations

import torch
from torch import nn

from longtrain.kernels.rms_norm import rms_norm


class Linears:
    """Dense layer factory. `tp` is the number of shards a column/row layer is split into.

    column(in, out): maps (..., in) -> (..., out / tp), this rank's slice of the outputs.
    row(in, out):    maps (..., in / tp) -> (..., out), summing the partial products over shards.
    embedding(vocab, dim): maps token ids (...) -> (..., dim).
    """

    tp = 1

    def __init__(self, init_std: float = 0.02):
        self.init_std = init_std

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return self._linear(in_features, out_features, bias)

    def row(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return self._linear(in_features, out_features, bias)

    def shared_input(self, x: torch.Tensor) -> torch.Tensor:
        """x, the same on every shard, about to feed sharded work that is not a column layer (Mamba's B
        and C feed the channel-split scan). Identity; tensor-parallel factories sum its gradient over shards."""
        return x

    def embedding(self, vocab: int, dim: int) -> nn.Module:
        emb = nn.Embedding(vocab, dim)
        nn.init.normal_(emb.weight, std=self.init_std)
        return emb

    def _linear(self, in_features, out_features, bias):
        layer = nn.Linear(in_features, out_features, bias=bias)
        nn.init.normal_(layer.weight, std=self.init_std)
        if bias:
            nn.init.zeros_(layer.bias)
        return layer


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32 (float64 for float64 inputs)
    by longtrain.kernels.rms_norm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Under autocast the output is already in its dtype: the linear layer reading it would cast it.
        device = x.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) and x.is_floating_point() else None
        return rms_norm(x, self.weight, self.eps, out_dtype=low if low and x.dtype != torch.float64 else x.dtype)


def rotary_tables(seq_len: int, head_dim: int, theta: float, scaling: float = 1.0, offset: int = 0,
                  device=None, positions: torch.Tensor | None = None):
    """cos, sin of shape (seq, head_dim / 2) for RoPE (Su et al. 2021, "RoFormer").

    `scaling` > 1 is linear position interpolation (Chen et al. 2023) for length extension.
    `positions` (seq,) overrides the contiguous range offset..offset+seq (context parallelism).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if positions is None:
        positions = torch.arange(offset, offset + seq_len, device=device)
    angles = torch.outer(positions.float() / scaling, inv_freq)
    return angles.cos(), angles.sin()
