"""O block numerics on one process: convergence order of the fixed-step solvers, adjoint vs direct
gradients, step / evaluation counts, the step cap and its warning.

Float64 states and weights. RMSNorm inside f computes in float32 (trainer/model/layers.py), which puts a
floor of about 3e-8 under the errors here (dopri5 at 1e-10 vs rk4 at 400 steps), so the problems are
sized to keep the errors measured above 2e-7.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from longtrain.trainer.config import ModelConfig
from longtrain.trainer.model.decoder import Decoder
from longtrain.trainer.model.layers import Linears
from longtrain.trainer.model.ode import ORDER, ODEBlock, OdeStepLimitError, ode_stats, rms_norm_over


def make_block(init_std=0.25, sublayer="mlp", **ode) -> ODEBlock:
    cfg = ModelConfig(d_model=8, n_heads=2, n_kv_heads=1, mlp_ratio=2, ode=dict(sublayer=sublayer, **ode))
    torch.manual_seed(0)
    block = ODEBlock(cfg, Linears(init_std)).double()
    with torch.no_grad():
        block.f.time.normal_(std=0.5)  # make f depend on t
    return block


def inputs(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture(scope="module")
def gold():
    """x and h(1) from dopri5 at rtol = atol = 1e-10 (its own error is far below the errors measured)."""
    x = inputs(2, 4, 8)
    with torch.no_grad():
        return x, make_block(init_std=0.3, solver="dopri5", rtol=1e-10, atol=1e-10, max_steps=5000)(x)


@pytest.mark.parametrize("solver, steps", [("euler", [8, 16, 32, 64]), ("midpoint", [4, 8, 16, 32]),
                                           ("rk4", [2, 4, 8, 16])])
def test_convergence_order(gold, solver, steps):
    x, reference = gold
    with torch.no_grad():
        errors = [(make_block(init_std=0.3, solver=solver, steps=n)(x) - reference).abs().max().item() for n in steps]
    assert min(errors) > 2e-7, f"errors {errors} reach the float32 floor; the fit would be meaningless"
    slope = np.polyfit(np.log([1.0 / n for n in steps]), np.log(errors), 1)[0]
    assert abs(slope - ORDER[solver]) < 0.25, f"{solver}: error ~ h^{slope:.2f}, expected h^{ORDER[solver]} ({errors})"


def test_dopri5_meets_its_tolerance(gold):
    x, reference = gold
    with torch.no_grad():
        errors = [(make_block(init_std=0.3, solver="dopri5", rtol=tol, atol=tol)(x) - reference).abs().max().item()
                  for tol in (1e-3, 1e-5)]
    assert errors[1] < errors[0] / 10, errors  # 100x tighter tolerances: much closer to gold


def gradients(block, x, weight):
    x = x.clone().requires_grad_(True)
    (block(x) * weight).sum().backward()
    return [x.grad] + [p.grad for p in block.parameters()], block.stats()


@pytest.mark.parametrize("sublayer, ode, tolerance", [
    ("mlp", dict(solver="rk4", steps=32), 1e-6),
    ("mlp", dict(solver="dopri5", rtol=1e-8, atol=1e-8), 1e-5),
    ("attention_mlp", dict(solver="dopri5", rtol=1e-7, atol=1e-7), 1e-5),
])
def test_adjoint_matches_direct_backprop(sublayer, ode, tolerance):
    """Both gradients approximate the exact one; they differ by solver error (rk4: O(h^4)), not more."""
    x, weight = inputs(2, 5, 8), inputs(2, 5, 8).flip(0)
    direct, _ = gradients(make_block(sublayer=sublayer, adjoint=False, **ode), x, weight)
    adjoint, stats = gradients(make_block(sublayer=sublayer, adjoint=True, **ode), x, weight)
    assert stats["nfe_backward"] > 0  # the backward pass really solved the adjoint ODE
    for d, a in zip(direct, adjoint):
        assert (a - d).abs().max() <= tolerance * d.abs().max(), (a - d).abs().max() / d.abs().max()


@pytest.mark.parametrize("solver, nfe_per_step", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_counts(solver, nfe_per_step):
    for steps in (1, 3, 7, 10):  # 1/3, 1/7, 1/10 are not exact in binary: still exactly `steps` steps
        block = make_block(solver=solver, steps=steps).float()
        block(inputs(1, 3, 8).float())
        assert block.stats() == {"nfe": nfe_per_step * steps, "steps": steps}


def test_adaptive_counts_forward_and_adjoint():
    block = make_block(solver="dopri5", rtol=1e-6, atol=1e-6, adjoint=True)
    gradients(block, inputs(2, 3, 8), inputs(2, 3, 8))
    s = block.stats()
    # dopri5: f(t0) and one probe to pick the first step, then 6 evaluations per attempted step (FSAL)
    assert s["nfe"] == 2 + 6 * (s["steps"] + s["rejected"])
    assert s["nfe_backward"] == 2 + 6 * (s["steps_backward"] + s["rejected_backward"])
    assert s["steps"] >= 2 and s["steps_backward"] >= 2


def test_step_cap_is_a_one_line_error_in_either_pass():
    x = inputs(2, 3, 8)
    with pytest.raises(OdeStepLimitError) as err:
        make_block(solver="dopri5", rtol=1e-9, atol=1e-9, max_steps=3)(x)
    message = str(err.value)
    assert "\n" not in message and "model.ode.max_steps=3" in message and "forward" in message
    # a cap the forward solve fits in but the adjoint solve does not
    probe = make_block(solver="dopri5", rtol=1e-7, atol=1e-7, adjoint=True)
    gradients(probe, x, x)
    forward = probe.stats()["steps"] + probe.stats()["rejected"]
    backward = probe.stats()["steps_backward"] + probe.stats()["rejected_backward"]
    assert backward > forward
    with pytest.raises(OdeStepLimitError, match="in the backward pass"):
        gradients(make_block(solver="dopri5", rtol=1e-7, atol=1e-7, adjoint=True, max_steps=forward), x, x)


def test_warns_once_past_half_the_cap(caplog):
    block = make_block(solver="dopri5", rtol=1e-7, atol=1e-7)
    block(inputs(2, 3, 8))
    attempts = block.stats()["steps"] + block.stats()["rejected"]
    block = make_block(solver="dopri5", rtol=1e-7, atol=1e-7, max_steps=2 * attempts - 1)
    with caplog.at_level(logging.WARNING, logger="longtrain.trainer.model.ode"):
        block(inputs(2, 3, 8))
        block(inputs(2, 3, 8))
    warnings = [r for r in caplog.records if "max_steps" in r.getMessage()]
    assert len(warnings) == 1 and f"passed half of model.ode.max_steps={2 * attempts - 1}" in warnings[0].getMessage()


def rms_norm_moments(t):
    return torch.tensor([[t.pow(2).sum().item(), float(t.numel())]], dtype=torch.float64)


def test_lockstep_norm_is_the_rms_and_ignores_replicas():
    a, b = inputs(3, 5), inputs(4, 2) * 3
    local = rms_norm_over(None)
    assert torch.allclose(local(a), a.pow(2).mean().sqrt())
    assert torch.allclose(local(a, b), torch.max(a.pow(2).mean().sqrt(), b.pow(2).mean().sqrt()))
    # a state split in two parts, summed over "ranks", gives the RMS of the whole
    halves = a.chunk(2, dim=1)
    split = [rms_norm_over(lambda m, part=part: m + rms_norm_moments(other))(part)
             for part, other in zip(halves, halves[::-1])]
    assert torch.allclose(split[0], local(a)) and torch.equal(split[0], split[1])
    # two identical replicas (tensor parallel) leave it unchanged, bitwise
    assert torch.equal(rms_norm_over(lambda m: m + m)(a), local(a))


def test_ode_stats_names_blocks_by_layer():
    cfg = ModelConfig(pattern="OFO", d_model=16, n_heads=2, n_kv_heads=1, vocab_size=32,
                      ode=dict(solver="dopri5", rtol=1e-3, atol=1e-3))
    model = Decoder(cfg)
    model(torch.randint(0, 32, (1, 6)))
    stats = ode_stats(model)
    assert set(stats) == {f"ode/{i}/{k}" for i in (0, 2) for k in ("nfe", "steps", "rejected")}
    assert all(isinstance(v, int) and v >= 0 for v in stats.values())
