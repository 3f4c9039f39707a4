"""The decoder: token embedding, a stack of pre-norm residual blocks from a pattern string, final norm, LM head.

Pattern letters: A attention, M Mamba, O Neural-ODE, F SwiGLU MLP; e.g. "AMOF" or "MMAMMF".
Layers are kept as a flat list (embedding, blocks, head) so pipeline parallelism can cut it into stages.

Packed documents: `positions` (batch, seq), the in-document position of every token (0 at each document
start), goes to every sequence-mixing block (A, M, and O whose vector field attends), which then keep each
document to itself; token-wise blocks (F, O with the MLP sublayer) need nothing. Without it, nothing changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longtrain.kernels.cross_entropy import cross_entropy_grad_
from longtrain.trainer.model.attention import Attention
from longtrain.trainer.model.layers import Linears, RMSNorm
from longtrain.trainer.model.mamba import Mamba
from longtrain.trainer.model.mlp import SwiGLU
from longtrain.trainer.model.ode import ODEBlock


MIXES_TOKENS = "AMO"  # the letters of blocks that take `positions` (an O block passes it on when f attends)


class Residual(nn.Module):
    """x + mixer(norm(x)); the O block integrates its own residual, so it is used bare."""

    def __init__(self, letter: str, mixer: nn.Module, dim: int, eps: float):
        super().__init__()
        self.letter = letter
        self.norm = RMSNorm(dim, eps) if letter != "O" else None
        self.mixer = mixer

    def forward(self, x, **kwargs):
        if self.norm is None:
            return self.mixer(x, **kwargs)
        return x + self.mixer(self.norm(x), **kwargs)


def make_block(letter: str, cfg, linears, attention_backend="auto", scan_backend="auto",
               index: int | None = None) -> Residual:
    """index: the block's place in cfg.pattern; attention layers read their window from it
    (model.attention_global_every). None: every attention layer takes model.attention_window."""
    if letter == "A":
        mixer = Attention(cfg, linears, attention_backend, index)
    elif letter == "M":
        mixer = Mamba(cfg, linears, scan_backend)
    elif letter == "O":
        mixer = ODEBlock(cfg, linears, attention_backend, index)
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
        self.blocks = nn.ModuleList(make_block(c, cfg, linears, attention_backend, scan_backend, index)
                                    for index, c in enumerate(cfg.pattern))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else linears.column(cfg.d_model, cfg.vocab_size)
        self.activation_checkpointing = activation_checkpointing

    def hidden(self, tokens, positions=None):
        """positions: optional (batch, seq) in-document positions of packed documents."""
        return self.norm(self.run_blocks(self.embed(tokens), positions))

    def run_blocks(self, x, positions=None):
        for block in self.blocks:
            kwargs = {"positions": positions} if positions is not None and block.letter in MIXES_TOKENS else {}
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False, **kwargs)
            else:
                x = block(x, **kwargs)
        return x

    def logits(self, x):
        if self.head is None:
            return F.linear(x, self.embed.weight).float()
        return self.head(x).float()

    def forward(self, tokens, targets=None, positions=None):
        """Logits; with targets (batch, seq), the mean next-token loss instead: lm_loss of the logits,
        computed chunk by chunk of tokens so that the (tokens, vocab) logits never exist at once.
        positions: optional (batch, seq) in-document positions of packed documents."""
        hidden = self.hidden(tokens, positions)
        if targets is None:
            return self.logits(hidden)
        if not isinstance(self.embed, nn.Embedding) or not isinstance(self.head, (nn.Linear, type(None))):
            return lm_loss(self.logits(hidden), targets)  # sharded layers: their own loss path
        weight = self.embed.weight if self.head is None else self.head.weight
        return linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten())


def lm_loss(logits, targets):
    """Mean next-token cross-entropy. logits: (batch, seq, vocab); targets: (batch, seq), -100 ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight^T against targets (-100 ignored), with both input
    gradients computed in the forward, one chunk of tokens at a time (the fused linear cross-entropy
    of Liger-Kernel, Hsu et al. 2024): the full logits and their gradient are never stored, and
    each chunk's softmax is taken in one sweep per row (longtrain.kernels.cross_entropy). Products in
    hidden's dtype, as F.linear under autocast; softmax, loss and the weight gradient's sum in float32
    (float64 for float64)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        ctx.weight_dtype = weight.dtype
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = h @ w.t()
            total += cross_entropy_grad_(logits, t).sum(dtype=acc)  # logits now hold d loss / d logits
            grad_hidden[start:start + chunk] = logits @ w
            grad_weight += (logits.t() @ h).to(acc)
        scale = 1.0 / (targets != -100).sum().to(acc)  # inf when every target is ignored: NaN, as F.cross_entropy
        ctx.save_for_backward(grad_hidden, grad_weight, scale)
        return total * scale

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = grad * scale
        return grad_hidden * factor.to(grad_hidden.dtype), (grad_weight * factor).to(ctx.weight_dtype), None, None


def linear_cross_entropy(hidden, weight, targets, chunk=None):
    """lm_loss(F.linear(hidden, weight), targets) for hidden (tokens, d), weight (vocab, d), targets (tokens,),
    without the (tokens, vocab) logits. Under autocast the products run in its dtype, as F.linear's would.
    chunk: tokens per piece (default: about 4 Mi logits)."""
    device = hidden.device.type
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        return lm_loss(F.linear(hidden, weight).float(), targets)  # no gradients to compute alongside
    if torch.is_autocast_enabled(device):
        hidden = hidden.to(torch.get_autocast_dtype(device))
    chunk = chunk or max(128, (4 << 20) // weight.shape[0])
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings and hasattr(model, "embed"):
        n -= model.embed.weight.numel()
    return n
