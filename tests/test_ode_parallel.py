"""O block split over 2 gloo processes equals the one-process block: tensor parallel (megatron-core
column/row layers inside f, trainer/parallel/tensor.py; state replicated) and context parallel (state
split along the sequence; the attention sublayer through trainer/parallel/ring.py's ring attention).

Adaptive dopri5 is included: with `lockstep_sum` set, every rank accepts and rejects the same steps,
as many as one process. Both layouts run in one pair of processes (megatron-core imported once); each
rank also computes the one-process reference with the dense block.

Float64 inputs and weights, but RMSNorm computes in float32 (trainer/model/layers.py), so split sums
(cp: per-rank partial sums of parameter gradients; tp: row-parallel partial products) round differently
from one process's at about 1e-7. Fixed-step solves match to 1e-6 relative. Adaptive ones match to 10 x the
solver tolerance: dopri5's step-size controller amplifies rounding in its error estimate, so the ranks
take the same steps as each other (bitwise the same state under tp) and as many as one process, at
sizes that may differ from one process's in late digits.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from longtrain.trainer.config import ModelConfig
from longtrain.trainer.model.layers import Linears
from longtrain.trainer.model.ode import ODEBlock

from parallel_harness import run_ranks

pytestmark = pytest.mark.distributed

WORLD = 2
RTOL = 1e-5
TOLERANCE = {"fixed": 1e-6, "adaptive": 10 * RTOL}  # max |split - one process| / max |one process|
CASES = {  # name: (sublayer, solver, adjoint)
    "rk4": ("mlp", "rk4", False),
    "dopri5": ("mlp", "dopri5", False),
    "dopri5-adjoint": ("mlp", "dopri5", True),
    "attention-dopri5": ("attention_mlp", "dopri5", False),
    "attention-dopri5-adjoint": ("attention_mlp", "dopri5", True),
}
LAYOUTS = {"tp": ["rk4", "dopri5", "dopri5-adjoint", "attention-dopri5"],
           "cp": ["rk4", "dopri5", "dopri5-adjoint", "attention-dopri5-adjoint"]}


def model_config(sublayer, solver, adjoint) -> ModelConfig:
    return ModelConfig(d_model=16, n_heads=2, n_kv_heads=2, mlp_ratio=2, vocab_size=16,
                       ode=dict(solver=solver, steps=3, rtol=RTOL, atol=RTOL, adjoint=adjoint, sublayer=sublayer))


def dense_block(cfg) -> ODEBlock:
    torch.manual_seed(0)
    block = ODEBlock(cfg, Linears(0.3)).double()
    with torch.no_grad():
        block.f.time.normal_(std=0.5)
    return block


def sum_over(group):
    """Sum of a small tensor over `group`, bitwise equal on every rank: all-gather, then add in rank order."""
    def local_sum(tensor):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts).sum(0)
    return local_sum


def relative_error(value, reference) -> float:
    return ((value - reference).abs().max() / reference.abs().max()).item()


def run_one(block, x, weight, lockstep_sum=None):
    """Forward, loss sum(out * weight), backward. Returns output, input grad, {param: grad}, step counts."""
    block.lockstep_sum = lockstep_sum
    x = x.clone().requires_grad_(True)
    out = block(x)
    (out * weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}, block.stats()


def check_tp(rank, mesh, case):
    from longtrain.trainer.parallel.tensor import TensorParallelLinears, load_dense_shards, shard_dim
    cfg = model_config(*CASES[case])
    dense = dense_block(cfg)
    split = ODEBlock(cfg, TensorParallelLinears(mesh, torch.float64)).double()
    load_dense_shards(split, dense.state_dict(), rank, WORLD)
    torch.manual_seed(1)
    x, weight = torch.randn(2, 6, 16, dtype=torch.float64), torch.randn(2, 6, 16, dtype=torch.float64)
    out0, dx0, grads0, stats0 = run_one(dense, x, weight)
    out, dx, grads, stats = run_one(split, x, weight, sum_over(mesh.tp_group))
    errors = {"out": relative_error(out, out0), "dx": relative_error(dx, dx0)}
    for name, grad in grads.items():
        dim = shard_dim(grad.shape, grads0[name].shape, WORLD)
        expected = grads0[name] if dim is None else grads0[name].chunk(WORLD, dim=dim)[rank]
        errors[name] = relative_error(grad, expected)
    return errors, stats0, stats, out


def check_cp(rank, mesh, case):
    from longtrain.trainer.parallel.context import apply_context_parallel, zigzag_split
    cfg = model_config(*CASES[case])
    dense = dense_block(cfg)
    split = copy.deepcopy(dense)
    apply_context_parallel(split.f, mesh.cp_group)  # ring attention inside f; the MLP is token-wise
    torch.manual_seed(1)
    x, weight = torch.randn(2, 8, 16, dtype=torch.float64), torch.randn(2, 8, 16, dtype=torch.float64)
    out0, dx0, grads0, stats0 = run_one(dense, x, weight)
    mine = lambda t: zigzag_split(t, WORLD, rank)  # this rank's chunks of the sequence
    out, dx, grads, stats = run_one(split, mine(x), mine(weight), sum_over(mesh.cp_group))
    errors = {"out": relative_error(out, mine(out0)), "dx": relative_error(dx, mine(dx0))}
    for name, grad in grads.items():
        dist.all_reduce(grad, group=mesh.cp_group)  # parameter gradients are summed over cp, as dp x cp does
        errors[name] = relative_error(grad, grads0[name])
    return errors, stats0, stats, None


def check_all(rank, world):
    from longtrain.trainer.parallel.mesh import build_mesh
    results = {}
    for layout, cases in LAYOUTS.items():
        mesh = build_mesh(**{layout: world})
        for case in cases:
            results[layout, case] = (check_tp if layout == "tp" else check_cp)(rank, mesh, case)
        mesh.destroy()
    return results


@pytest.fixture(scope="module")
def results():
    return run_ranks(check_all, WORLD)


@pytest.mark.parametrize("layout, case", [(layout, case) for layout, cases in LAYOUTS.items() for case in cases])
def test_ode_block_split_equals_one_process(results, layout, case):
    adaptive = CASES[case][1] == "dopri5"
    tolerance = TOLERANCE["adaptive" if adaptive else "fixed"]
    for rank, per_rank in enumerate(results):
        errors, stats_one_process, stats, _ = per_rank[layout, case]
        worst = max(errors, key=errors.get)
        assert errors[worst] <= tolerance, f"rank {rank}: {worst} differs by {errors[worst]:.2e}"
        # the same accepted / rejected steps and evaluations as one process, so on every rank
        assert stats == stats_one_process, f"rank {rank}: {stats} vs one process {stats_one_process}"
    if layout == "tp":  # the replicated state is bitwise the same on every rank
        assert torch.equal(results[0][layout, case][3], results[1][layout, case][3])
    if adaptive:
        assert results[0][layout, case][2]["steps"] >= 2  # really adaptive, not a single step
