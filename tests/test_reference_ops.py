"""The pure-torch references against float64 computations written independently here:
attention vs an explicit per-row softmax, the scan vs a scalar step-by-step loop, the O block vs
a fixed-step integration loop."""
import math

import pytest
import torch

from longtrain.kernels.attention import reference as attention_reference
from longtrain.kernels.scan import reference as scan_reference


def explicit_attention(q, k, v, causal, scale):
    """Row by row: softmax of scaled dot products, float64, GQA by head index arithmetic."""
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    out = torch.zeros(batch, seq_q, heads, dim, dtype=torch.float64)
    lse = torch.zeros(batch, heads, seq_q, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kh = h // (heads // kv_heads)
            for i in range(seq_q):
                last = i + seq_k - seq_q if causal else seq_k - 1
                scores = [scale * float(q[b, i, h] @ k[b, j, kh]) for j in range(last + 1)]
                m = max(scores)
                weights = [math.exp(s - m) for s in scores]
                total = sum(weights)
                lse[b, h, i] = m + math.log(total)
                for j, w in enumerate(weights):
                    out[b, i, h] += (w / total) * v[b, j, kh]
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("seq_q, seq_k", [(5, 5), (3, 7)])
def test_attention_reference_matches_explicit_softmax(causal, heads, kv_heads, seq_q, seq_k):
    torch.manual_seed(seq_q * 10 + heads)
    q = torch.randn(2, seq_q, heads, 8, dtype=torch.float64)
    k = torch.randn(2, seq_k, kv_heads, 8, dtype=torch.float64)
    v = torch.randn(2, seq_k, kv_heads, 8, dtype=torch.float64)
    out, lse = attention_reference(q, k, v, causal=causal, softmax_scale=0.3)
    gold_out, gold_lse = explicit_attention(q, k, v, causal, 0.3)
    torch.testing.assert_close(out, gold_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, gold_lse, rtol=1e-12, atol=1e-12)


def loop_scan(u, delta, A, B, C, D, z, delta_bias, softplus, h0):
    """Scalar recurrence per (batch, channel, state), float64."""
    batch, dim, seq = u.shape
    state = A.shape[1]
    out = torch.zeros(batch, dim, seq, dtype=torch.float64)
    h = h0.clone() if h0 is not None else torch.zeros(batch, dim, state, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            for t in range(seq):
                dt = float(delta[b, d, t]) + (float(delta_bias[d]) if delta_bias is not None else 0.0)
                if softplus:
                    dt = math.log1p(math.exp(dt))
                y = 0.0
                for n in range(state):
                    h[b, d, n] = math.exp(dt * float(A[d, n])) * float(h[b, d, n]) + dt * float(B[b, n, t]) * float(u[b, d, t])
                    y += float(C[b, n, t]) * float(h[b, d, n])
                y += float(D[d]) * float(u[b, d, t]) if D is not None else 0.0
                if z is not None:
                    zz = float(z[b, d, t])
                    y *= zz / (1 + math.exp(-zz))
                out[b, d, t] = y
    return out, h


@pytest.mark.parametrize("with_extras", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_scan_reference_matches_scalar_loop(with_extras, with_state):
    torch.manual_seed(3)
    batch, dim, state, seq = 2, 3, 4, 7
    f64 = dict(dtype=torch.float64)
    u, delta = torch.randn(batch, dim, seq, **f64), torch.rand(batch, dim, seq, **f64)
    A = -torch.rand(dim, state, **f64) * 2
    B, C = torch.randn(batch, state, seq, **f64), torch.randn(batch, state, seq, **f64)
    D = torch.randn(dim, **f64) if with_extras else None
    z = torch.randn(batch, dim, seq, **f64) if with_extras else None
    bias = torch.randn(dim, **f64) if with_extras else None
    h0 = torch.randn(batch, dim, state, **f64) if with_state else None
    out, last = scan_reference(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=with_extras, initial_state=h0)
    gold_out, gold_last = loop_scan(u, delta, A, B, C, D, z, bias, with_extras, h0)
    torch.testing.assert_close(out, gold_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, gold_last, rtol=1e-12, atol=1e-12)


def test_ode_block_matches_fixed_step_loop():
    """The O block equals fixed-step loops written here: Euler, explicit midpoint, and Kutta's 3/8-rule
    RK4 (the variant torchdiffeq's 'rk4' implements)."""
    from longtrain.trainer.config import recipe_from_dict
    from longtrain.trainer.model.ode import ODEBlock
    from longtrain.trainer.model.layers import Linears

    torch.manual_seed(0)
    for solver, steps in [("euler", 5), ("midpoint", 5), ("rk4", 5)]:
        cfg = recipe_from_dict({"model": {"d_model": 16, "n_heads": 2, "n_kv_heads": 1,
                                          "ode": {"solver": solver, "steps": steps}}}).model
        block = ODEBlock(cfg, Linears(0.3)).double()
        with torch.no_grad():
            block.f.time.normal_()
        x = torch.randn(2, 3, 16, dtype=torch.float64)
        with torch.no_grad():
            got = block(x)
            h, dt = x.clone(), 1.0 / steps
            f = lambda t, y: block.f(torch.tensor(t, dtype=torch.float64), y)
            for i in range(steps):
                t = i * dt
                if solver == "euler":
                    h = h + dt * f(t, h)
                elif solver == "midpoint":
                    h = h + dt * f(t + dt / 2, h + dt / 2 * f(t, h))
                else:
                    k1 = f(t, h)
                    k2 = f(t + dt / 3, h + dt * k1 / 3)
                    k3 = f(t + 2 * dt / 3, h + dt * (k2 - k1 / 3))
                    k4 = f(t + dt, h + dt * (k1 - k2 + k3))
                    h = h + dt / 8 * (k1 + 3 * (k2 + k3) + k4)
        torch.testing.assert_close(got, h, rtol=1e-12, atol=1e-12)
