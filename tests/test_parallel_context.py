"""Context parallelism at cp=2 and cp=4 on gloo: ring attention (GQA), the Mamba scan and conv, and a
whole A/M/O/F decoder over a zigzag-split sequence equal the unsplit computation in one process,
forward and backward, in float64."""

import pytest
import torch
import torch.distributed as dist

from longtrain.trainer.config import ModelConfig
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.parallel.context import (ring_attention, zigzag_merge,
                                                zigzag_positions, zigzag_split)

from parallel_harness import run_ranks, split_decoder_pairs

TOL = 1e-10  # float64: the split computation differs from the unsplit one only by rounding order
# RMSNorm and Mamba's A_log, D, dt_bias cast to float32 inside the model, so those parameter gradients
# are float32 sums over tokens, taken in another order (per rank, then all-reduced).
GRAD_TOL = 1e-6


def test_zigzag_layout_and_rejection():
    x = torch.arange(16).view(1, 16)
    parts = [zigzag_split(x, 4, r) for r in range(4)]
    assert parts[0].tolist() == [[0, 1, 14, 15]] and parts[3].tolist() == [[6, 7, 8, 9]]
    assert torch.equal(zigzag_merge(parts), x)
    assert zigzag_positions(16, 4, 1).tolist() == [2, 3, 12, 13]
    with pytest.raises(LongtrainError, match="sequence length 12 is not divisible by 2\\*parallel.cp=8"):
        zigzag_split(torch.zeros(1, 12), 4, 0)


def _config():
    return ModelConfig(pattern="AMOF", d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64, d_state=4,
                       ode={"solver": "rk4", "steps": 2})


def _max_err(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def _check(rank, world, seq):
    torch.manual_seed(0)
    errors = {}
    group = dist.group.WORLD
    # 1. ring attention alone, GQA (4 query heads on 2 kv heads)
    from longtrain.kernels.attention import attention
    q, k, v = (torch.randn(2, seq, h, 8, dtype=torch.float64) for h in (4, 2, 2))
    grad_out = torch.randn(2, seq, 4, 8, dtype=torch.float64)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*full, causal=True, backend="reference")
    out.backward(grad_out)
    local = [zigzag_split(t, world, rank).requires_grad_() for t in (q, k, v)]
    local_out = ring_attention(*local, group=group, backend="reference")
    local_out.backward(zigzag_split(grad_out, world, rank))
    errors["attention out"] = _max_err(local_out, zigzag_split(out, world, rank))
    for name, a, b in zip("qkv", local, full):
        errors[f"attention d{name}"] = _max_err(a.grad, zigzag_split(b.grad, world, rank))
    # 2. the whole decoder (A, M, O, F): logits and every parameter gradient
    from longtrain.trainer.model.decoder import Decoder
    model = Decoder(_config()).double()
    _, _, pairs = split_decoder_pairs(model, world, rank, group, seq)
    for name, split, unsplit in pairs:
        errors["decoder logits" if name == "logits" else f"grad {name}"] = _max_err(split, unsplit)
    return errors


@pytest.mark.parametrize("cp, seq", [(2, 16), pytest.param(4, 32, marks=pytest.mark.slow)])
def test_context_parallel_equals_unsplit(cp, seq):
    for rank_errors in run_ranks(_check, cp, args=(seq,)):
        for name, error in rank_errors.items():
            assert error < (GRAD_TOL if name.startswith("grad") else TOL), (name, error)


