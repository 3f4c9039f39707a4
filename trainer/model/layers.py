"""Building pieces shared by the blocks: linear-layer factories, RMSNorm, rotary tables.

Blocks never construct `nn.Linear` themselves: they receive a `Linears` factory. The dense one
lives here; tensor-parallel factories (trainer/parallel/) hand out sharded layers with the same
call signature, so the model code knows nothing of parallelism.
"""
from __future__ import annotations

import torch
from torch import nn

from longtrain.kernels.rms_norm import rms_norm
from longtrain.trainer.model import rope
from longtrain.trainer.model.init import apply_rule_eagerly, mark_shard, set_rule


class Linears:
    """Dense layer factory. `tp` is the number of shards a column/row layer is split into.

    column(in, out): maps (..., in) -> (..., out / tp), this rank's slice of the outputs.
    row(in, out):    maps (..., in / tp) -> (..., out), summing the partial products over shards.
    embedding(vocab, dim): maps token ids (...) -> (..., dim).
    local(n):        this rank's share of n channels (heads, inner width); the model's only source of it.
    channels(*shape, rule): a parameter of this rank's channels (dim 0 split over the shards).
    Every parameter carries its init rule (trainer/model/init.py), so a shard or a pipeline stage
    can be drawn alone and still equal its slice of the one-process model.
    """

    tp = 1

    def __init__(self, init_std: float = 0.02):
        self.init_std = init_std

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return self._linear(in_features, out_features, bias)

    def row(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return self._linear(in_features, out_features, bias)

    def local(self, n: int, what: str = "channels") -> int:
        if n % self.tp:
            raise ValueError(f"{what}={n} is not divisible by tensor parallel size {self.tp}")
        return n // self.tp

    def channels(self, *dense_shape: int, rule: tuple) -> nn.Parameter:
        """A parameter holding this rank's rows of a dense (channels, ...) tensor, initialised by `rule`."""
        param = nn.Parameter(torch.empty(self.local(dense_shape[0]), *dense_shape[1:]))
        apply_rule_eagerly(set_rule(param, *rule))
        return mark_shard(param, 0) if self.tp > 1 else param

    def shared_input(self, x: torch.Tensor) -> torch.Tensor:
        """x, the same on every shard, about to feed sharded work that is not a column layer (Mamba's B
        and C feed the channel-split scan). Identity; tensor-parallel factories sum its gradient over shards."""
        return x

    def embedding(self, vocab: int, dim: int) -> nn.Module:
        emb = nn.Embedding(vocab, dim)
        nn.init.normal_(emb.weight, std=self.init_std)
        set_rule(emb.weight, "normal", self.init_std)
        return emb

    def _linear(self, in_features, out_features, bias):
        layer = nn.Linear(in_features, out_features, bias=bias)
        nn.init.normal_(layer.weight, std=self.init_std)
        set_rule(layer.weight, "normal", self.init_std)
        if bias:
            nn.init.zeros_(layer.bias)
            set_rule(layer.bias, "const", 0.0)
        return layer


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32 (float64 for float64 inputs)
    by longtrain.kernels.rms_norm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = set_rule(nn.Parameter(torch.ones(dim)), "const", 1.0)

    def forward(self, x):
        # Under autocast the output is already in its dtype: the linear layer reading it would cast it.
        device = x.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) and x.is_floating_point() else None
        return rms_norm(x, self.weight, self.eps, out_dtype=low if low and x.dtype != torch.float64 else x.dtype)


def rotary_tables(seq_len: int, head_dim: int, theta: float, scaling=1.0, offset: int = 0,
                  device=None, positions: torch.Tensor | None = None, context_len: int | None = None):
    """cos, sin float32 of shape (seq, head_dim / 2) for RoPE (Su et al. 2021, "RoFormer").

    `scaling`: length extension (trainer/model/rope.py): a bare number is linear position interpolation
    (Chen et al. 2023) by that factor, or the recipe's `model.rope_scaling` (linear, ntk, dynamic, yarn,
    llama3). YaRN's attention factor multiplies cos and sin, as in transformers.
    `positions` (seq,) overrides the contiguous range offset..offset+seq (context parallelism); (batch, seq)
    gives each row its own positions (packed documents) and tables of shape (batch, seq, head_dim / 2).
    `context_len`: the length of the whole sequence these positions belong to, which dynamic scaling
    reads; default offset + seq_len, or max(positions) + 1 when `positions` is given.
    """
    if context_len is None and rope.is_dynamic(scaling):
        context_len = offset + seq_len if positions is None else int(positions.max()) + 1
    if positions is None:
        positions = torch.arange(offset, offset + seq_len, device=device)
    inv_freq, attention_factor = rope.rope_frequencies(head_dim, theta, scaling, context_len, device=device)
    if positions.dim() == 1:
        angles = torch.outer(positions.float(), inv_freq)
    else:
        angles = positions.float().unsqueeze(-1) * inv_freq  # the same product per element as torch.outer
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin
