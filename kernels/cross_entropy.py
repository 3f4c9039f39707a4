"""Softmax cross-entropy of logit rows together with its gradient, for the chunked training loss.

`cross_entropy_grad_(logits, targets)` returns each row's loss and overwrites `logits` with
d loss_row / d logits = softmax(logits) - one_hot(target); rows whose target is `ignore_index` get
loss 0 and gradient 0. The decoder's fused linear + cross-entropy (trainer/model/decoder.py) calls it
once per chunk of tokens, so that neither the full logits nor their gradient is ever stored.

Backends, best first: `csrc` (csrc/loss/cross_entropy_cpu.cpp: one sweep per row in float32, CPU,
float32/bfloat16/float16), `torch` (the same math as separate torch ops; float64, and CUDA, where no
kernel of ours is built for it), `reference` (float64, out of place, then copied back).
"""
from __future__ import annotations

import torch

from longtrain.kernels.extension import csrc_supports
from longtrain.kernels.registry import OpRegistry, always

registry = OpRegistry("cross_entropy")


def reference(logits, targets, ignore_index=-100):
    """(losses, grad) of softmax cross-entropy per row, computed in float64, inputs untouched.
    losses float64 (rows,), grad float64 (rows, vocab); ignored rows are zero in both."""
    x = logits.double()
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(x, dim=-1)
    losses = (lse - x.gather(1, safe[:, None]).squeeze(1)) * valid
    grad = torch.softmax(x, dim=-1)
    grad[torch.arange(len(targets), device=x.device), safe] -= 1.0
    return losses, grad * valid[:, None]


def _torch(logits, targets, ignore_index=-100):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    shifted = logits.to(acc)
    shifted = shifted - shifted.amax(dim=-1, keepdim=True)  # one exp pass serves the lse and the softmax
    target_logit = shifted.gather(1, safe[:, None]).squeeze(1)
    probs = shifted.exp_()
    sums = probs.sum(dim=-1)
    probs.div_(sums[:, None])
    probs[torch.arange(len(targets), device=logits.device), safe] -= valid.to(acc)
    logits.copy_(probs.mul_(valid[:, None]))
    return (sums.log() - target_logit) * valid


def _reference_inplace(logits, targets, ignore_index=-100):
    losses, grad = reference(logits, targets, ignore_index)
    logits.copy_(grad)
    return losses


def _csrc(logits, targets, ignore_index=-100):
    return torch.ops.longtrain.cross_entropy_grad_(logits, targets, ignore_index)


def _csrc_supports(device, dtype, rows_contiguous=True, **_):
    if device.type != "cpu":
        return f"csrc cross-entropy is built for the CPU only, not {device.type}"
    if not rows_contiguous:
        return "csrc cross-entropy needs rows with unit stride"
    return csrc_supports(device, dtype)


registry.register("csrc", _csrc, _csrc_supports)
registry.register("torch", _torch, always)
registry.register("reference", _reference_inplace, always)


def cross_entropy_grad_(logits, targets, ignore_index=-100, backend=None):
    """Per-row softmax cross-entropy of `logits` (rows, vocab) against int64 `targets` (rows,), in place:
    returns the losses (float32; float64 for float64 logits, or from the reference backend) and leaves
    softmax - one_hot in `logits`, in its dtype. Ignored rows: loss 0, gradient 0. Not differentiable
    itself (it is the gradient). backend: None/"auto", or one of `registry.names()`."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_grad_: logits must be (rows, vocab) and targets (rows,), got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    valid = targets[targets != ignore_index] if targets.device.type == "cpu" else None  # no sync on GPUs
    if valid is not None and valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= logits.shape[1]):
        raise ValueError(f"cross_entropy_grad_: a target is outside the vocabulary [0, {logits.shape[1]})")
    chosen = registry.select(backend, logits.device, logits.dtype, rows_contiguous=logits.stride(-1) == 1)
    return chosen.fn(logits, targets.long(), ignore_index)
