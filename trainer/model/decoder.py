"""The decoder: token embedding, a stack of pre-norm residual blocks from a pattern string, final norm, LM head.

Pattern letters: A attention, M Mamba, O Neural-ODE, F SwiGLU MLP; e.g. "AMOF" or "MMAMMF".
Layers are kept as a flat list (embedding, blocks, head) so pipeline parallelism can cut it into stages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longtrain.trainer.model.attention import Attention
from longtrain.trainer.model.layers import Linears, RMSNorm
from longtrain.trainer.model.mamba import Mamba
from longtrain.trainer.model.mlp import SwiGLU
from longtrain.trainer.model.ode import ODEBlock


class Residual(nn.Module):
    """x + mixer(norm(x)); the O block integrates its own residual, so it is used bare."""

    def __init__(self, letter: str, mixer: nn.Module, dim: int, eps: float):
        super().__init__()
        self.letter = letter
        self.norm = RMSNorm(dim, eps) if letter != "O" else None
        self.mixer = mixer

    def forward(self, x, **kwargs):
        if self.norm is None:
            return self.mixer(x)
        return x + self.mixer(self.norm(x), **kwargs)


def make_block(letter: str, cfg, linears, attention_backend="auto", scan_backend="auto") -> Residual:
    if letter == "A":
        mixer = Attention(cfg, linears, attention_backend)
    elif letter == "M":
        mixer = Mamba(cfg, linears, scan_backend)
    elif letter == "O":
        mixer = ODEBlock(cfg, linears, attention_backend)
    elif letter == "F":
        mixer = SwiGLU(cfg.d_model, cfg.d_hidden, linears)
    else:
        raise ValueError(f"unknown layer letter {letter!r}")
    return Residual(letter, mixer, cfg.d_model, cfg.norm_eps)


class Decoder(nn.Module):
    """tokens: (batch, seq) int64 -> logits: (batch, seq, vocab) float32."""

    def __init__(self, cfg, linears: Linears | None = None, attention_backend="auto", scan_backend="auto",
                 activation_checkpointing: bool = False):
        super().__init__()
        linears = linears or Linears(cfg.init_std)
        self.cfg = cfg
        self.embed = linears.embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(make_block(c, cfg, linears, attention_backend, scan_backend) for c in cfg.pattern)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else linears.column(cfg.d_model, cfg.vocab_size)
        self.activation_checkpointing = activation_checkpointing

    def hidden(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def logits(self, x):
        if self.head is None:
            return F.linear(x, self.embed.weight).float()
        return self.head(x).float()

    def forward(self, tokens):
        return self.logits(self.hidden(tokens))


def lm_loss(logits, targets):
    """Mean next-token cross-entropy. logits: (batch, seq, vocab); targets: (batch, seq)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings and hasattr(model, "embed"):
        n -= model.embed.weight.numel()
    return n
