"""Packed documents in the Mamba block: with `positions` (0 at each document start), no token sees
another document, through the causal conv or the scan, in one process and under context parallelism.

Oracles: each document run alone through the same block (outputs to 1e-6), exact zeros for the
gradient of a later document's output with respect to an earlier document's input, and at cp=2 on
gloo the one-process block with the same resets (outputs and gradients to 1e-5).
"""
import copy

import pytest
import torch
import torch.distributed as dist

from longtrain.trainer.config import ModelConfig
from longtrain.trainer.model.layers import Linears
from longtrain.trainer.model.mamba import Mamba
from longtrain.trainer.parallel.context import apply_context_parallel, zigzag_split

from parallel_harness import run_ranks

SEQ = 16
# Document starts per row. At cp=2 the zigzag chunks are [0, 4), [4, 8), [8, 12), [12, 16): rank 0 holds
# chunks 0 and 3, rank 1 chunks 1 and 2. Row 0: a reset on a chunk's first step (12, where the carry-in
# comes from the other rank), one inside a chunk (9), a document across two chunks (5..8). Row 1:
# documents starting on a chunk's last step (3, 7), so the next chunk sees one tap of conv history
# and not the other two, and a document (7..13) that carries its state from rank 1 into rank 0.
STARTS = [[0, 5, 9, 12], [0, 3, 7, 14]]
LAST_DOC = [12, 14]  # start of the last document per row: the isolation checks' "later" document


def positions_of(starts, seq):
    """(batch, seq) int64 in-document positions (Hugging Face's position_ids convention for packing)."""
    rows = []
    for row in starts:
        bounds = row + [seq]
        rows.append(torch.cat([torch.arange(end - first) for first, end in zip(bounds, bounds[1:])]))
    return torch.stack(rows)


def make_block(dtype=torch.float32, backend="auto", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(pattern="M", d_model=32, n_heads=4, vocab_size=64, d_state=8)
    return Mamba(cfg, Linears(init_std=0.2), backend=backend).to(dtype)


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "csrc"), (torch.float64, "reference")])
def test_packed_documents_equal_each_document_alone(dtype, backend):
    block = make_block(dtype, backend)
    x = torch.randn(2, SEQ, 32, dtype=dtype)
    positions = positions_of(STARTS, SEQ)
    packed = block(x, positions=positions)
    for b, row in enumerate(STARTS):
        for first, end in zip(row, row[1:] + [SEQ]):
            alone = block(x[b:b + 1, first:end])
            torch.testing.assert_close(packed[b:b + 1, first:end], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "csrc"), (torch.float64, "reference")])
def test_later_document_has_exactly_zero_gradient_to_earlier_ones(dtype, backend):
    block = make_block(dtype, backend)
    x = torch.randn(2, SEQ, 32, dtype=dtype, requires_grad=True)
    out = block(x, positions=positions_of(STARTS, SEQ))
    later = torch.zeros(2, SEQ, dtype=torch.bool)
    for b, first in enumerate(LAST_DOC):
        later[b, first:] = True
    (out * later[..., None]).square().sum().backward()
    assert not x.grad[~later].any()  # exactly zero, not small
    assert (x.grad[later].abs().sum(-1) > 0).all()  # and every token of the later document counts


def test_one_document_per_row_equals_no_positions():
    """positions 0..seq-1 (one document) take the masked conv path and the scan's reset input; they
    give the block's plain result."""
    block = make_block()
    x = torch.randn(2, SEQ, 32)
    positions = torch.arange(SEQ).expand(2, SEQ)
    torch.testing.assert_close(block(x, positions=positions), block(x), rtol=1e-6, atol=1e-6)


def test_bad_positions_are_rejected():
    block = make_block()
    with pytest.raises(ValueError, match="positions must have shape \\(batch, seq\\) = \\(2, 16\\)"):
        block(torch.randn(2, SEQ, 32), positions=torch.zeros(2, 15, dtype=torch.long))


def _context_parallel(rank, world):
    group = dist.group.WORLD
    block = make_block()
    split_block = apply_context_parallel(copy.deepcopy(block), group)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, SEQ, 32, generator=generator)
    weights = torch.randn(2, SEQ, 32, generator=generator)
    positions = positions_of(STARTS, SEQ)
    later = torch.zeros(2, SEQ, dtype=torch.bool)
    for b, first in enumerate(LAST_DOC):
        later[b, first:] = True
    errors = {}
    # 1. outputs and every gradient against the one-process block with the same resets
    full_x = x.clone().requires_grad_()
    out = block(full_x, positions=positions)
    (out * weights).sum().backward()
    local_x = zigzag_split(x, world, rank).requires_grad_()
    local_out = split_block(local_x, positions=zigzag_split(positions, world, rank))
    (local_out * zigzag_split(weights, world, rank)).sum().backward()
    errors["out"] = (local_out - zigzag_split(out, world, rank)).abs().max().item()
    errors["dx"] = (local_x.grad - zigzag_split(full_x.grad, world, rank)).abs().max().item()
    for (name, p), p_split in zip(block.named_parameters(), split_block.parameters()):
        grad = p_split.grad.clone()
        dist.all_reduce(grad)  # each rank holds the gradient of its own tokens' share of the loss
        errors[f"d{name}"] = (grad - p.grad).abs().max().item() / max(p.grad.abs().max().item(), 1.0)
    # 2. the later documents' outputs (rank 0's second chunk) against every earlier token, on both ranks
    local_x = zigzag_split(x, world, rank).requires_grad_()
    local_out = split_block(local_x, positions=zigzag_split(positions, world, rank))
    (local_out * zigzag_split(later, world, rank)[..., None]).square().sum().backward()
    local_later = zigzag_split(later, world, rank)
    return errors, local_x.grad[~local_later], local_x.grad[local_later]


def test_context_parallel_with_documents_equals_one_process():
    results = run_ranks(_context_parallel, 2)
    for errors, _, _ in results:
        for name, error in errors.items():
            assert error < 1e-5, (name, error)
    earlier = torch.cat([r[1] for r in results])
    later = torch.cat([r[2] for r in results])
    assert earlier.shape[0] == 2 * SEQ - sum(SEQ - first for first in LAST_DOC)
    assert not earlier.any()  # exactly zero across the cp boundary
    assert (later.abs().sum(-1) > 0).all()
