"""The csrc selective scan against the reference evaluated in float64 (flash-attn's test rule).

gold = reference in float64, base = reference in the test dtype, fast = csrc in the test dtype;
for the output, the final state and every input gradient: max|fast - gold| <= 2 max|base - gold| + atol,
with atol = 1e-5 * max|gold| (room for float32 rounding where base happens to be exact).
"""
import pytest
import torch

from longtrain.kernels import scan
from longtrain.kernels.registry import BackendError

pytestmark = pytest.mark.skipif(scan.registry.select(None, torch.device("cpu"), torch.float32).name != "csrc",
                                reason="extension longtrain.kernels._C not built")

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def make_inputs(batch, dim, state, seq, dtype, with_state, with_extras, seed):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    inputs = {
        "u": randn(batch, dim, seq), "delta": randn(batch, dim, seq, scale=0.5),
        "A": -torch.rand(dim, state, generator=generator).mul(2).add(0.1),
        "B": randn(batch, state, seq), "C": randn(batch, state, seq),
        "D": randn(dim) if with_extras else None, "z": randn(batch, dim, seq) if with_extras else None,
        "delta_bias": randn(dim, scale=0.3) if with_extras else None,
        "initial_state": torch.randn(batch, dim, state, generator=generator) if with_state else None,
    }
    return inputs


def run(inputs, cast, backend, softplus, cotangents):
    leaves = {k: (cast(v).detach().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    out, last = scan.selective_scan(*(leaves[k] for k in NAMES[:5]), D=leaves["D"], z=leaves["z"],
                                    delta_bias=leaves["delta_bias"], delta_softplus=softplus, return_last_state=True,
                                    initial_state=leaves["initial_state"], backend=backend)
    torch.autograd.backward([out, last], [cotangents[0].to(out.dtype), cotangents[1].to(last.dtype)])
    results = {"out": out, "last_state": last}
    results.update({f"d{k}": v.grad for k, v in leaves.items() if v is not None})
    return {k: v.double() for k, v in results.items()}


def check_against_gold(inputs, dtype, softplus, seed):
    generator = torch.Generator().manual_seed(seed + 1)
    batch, dim, seq = inputs["u"].shape
    cotangents = (torch.randn(batch, dim, seq, generator=generator),
                  torch.randn(batch, dim, inputs["A"].shape[1], generator=generator))
    gold = run(inputs, lambda x: x.double(), "reference", softplus, cotangents)
    base = run(inputs, lambda x: x, "reference", softplus, cotangents)
    fast = run(inputs, lambda x: x, "csrc", softplus, cotangents)
    for name in gold:
        atol = 1e-5 * gold[name].abs().max().item()
        fast_err = (fast[name] - gold[name]).abs().max().item()
        base_err = (base[name] - gold[name]).abs().max().item()
        assert fast_err <= 2 * base_err + atol, f"{name}: csrc error {fast_err:.3g} vs reference {base_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,dim,state,seq", [(1, 3, 16, 1), (2, 5, 16, 7), (2, 4, 5, 129), (1, 3, 24, 300)])
@pytest.mark.parametrize("with_state", [False, True])
def test_scan_matches_float64_reference(dtype, batch, dim, state, seq, with_state):
    seed = seq * 7 + state + with_state
    inputs = make_inputs(batch, dim, state, seq, dtype, with_state, with_extras=True, seed=seed)
    check_against_gold(inputs, dtype, softplus=True, seed=seed)


def test_scan_over_several_blocks_and_segments():
    """70 channels and 1300 steps: the backward sums dB, dC over three blocks of channels, in two segments."""
    inputs = make_inputs(1, 70, 5, 1300, torch.float32, with_state=True, with_extras=True, seed=13)
    check_against_gold(inputs, torch.float32, softplus=True, seed=13)


@pytest.mark.parametrize("with_extras", [False, True])
def test_scan_of_an_empty_sequence(with_extras):
    """seq 0: out is empty, the last state is the initial state, and every gradient has its input's shape."""
    inputs = make_inputs(2, 3, 4, 0, torch.float32, with_state=True, with_extras=with_extras, seed=17)
    leaves = {k: v.detach().requires_grad_() if v is not None else None for k, v in inputs.items()}
    out, last = scan.selective_scan(*(leaves[k] for k in NAMES[:5]), D=leaves["D"], z=leaves["z"],
                                    delta_bias=leaves["delta_bias"], delta_softplus=True, return_last_state=True,
                                    initial_state=leaves["initial_state"], backend="csrc")
    assert out.shape == (2, 3, 0) and torch.equal(last, inputs["initial_state"])
    dlast = torch.randn(last.shape)
    torch.autograd.backward([out, last], [torch.zeros(out.shape), dlast])
    for name, leaf in leaves.items():
        if leaf is not None:
            assert leaf.grad.shape == leaf.shape, name
    assert torch.equal(leaves["initial_state"].grad, dlast)
    assert not leaves["A"].grad.any() and not leaves["B"].grad.numel()


@pytest.mark.parametrize("softplus", [False, True])
def test_scan_without_optional_inputs(softplus):
    inputs = make_inputs(2, 4, 16, 200, torch.float32, with_state=False, with_extras=False, seed=3)
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()  # a positive step size, as softplus would give
    check_against_gold(inputs, torch.float32, softplus=softplus, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_long_sequence(dtype):
    inputs = make_inputs(2, 16, 16, 2000, dtype, with_state=True, with_extras=True, seed=11)
    check_against_gold(inputs, dtype, softplus=True, seed=11)


def test_chunked_scan_equals_full_scan():
    """Scanning in pieces, each starting from the previous piece's final state, is the full scan."""
    inputs = make_inputs(2, 6, 16, 301, torch.float32, with_state=True, with_extras=True, seed=5)
    cotangent = torch.randn(2, 6, 301, generator=torch.Generator().manual_seed(6))

    def grads(pieces):
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        state, outs, start = leaves["initial_state"], [], 0
        for length in pieces:
            part = slice(start, start + length)
            out, state = scan.selective_scan(
                leaves["u"][..., part], leaves["delta"][..., part], leaves["A"], leaves["B"][..., part],
                leaves["C"][..., part], D=leaves["D"], z=leaves["z"][..., part], delta_bias=leaves["delta_bias"],
                delta_softplus=True, return_last_state=True, initial_state=state, backend="csrc")
            outs.append(out)
            start += length
        out = torch.cat(outs, dim=-1)
        (out * cotangent).sum().add_(state.sum()).backward()
        return [out] + [leaves[k].grad for k in NAMES]

    full, chunked = grads([301]), grads([100, 1, 128, 72])
    for name, a, b in zip(["out"] + NAMES, full, chunked):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_named_backends():
    u = torch.randn(1, 2, 8)
    A, B = -torch.rand(2, 4), torch.randn(1, 4, 8)
    with pytest.raises(BackendError, match="valid choices: auto, mamba_ssm, csrc, reference"):
        scan.selective_scan(u, u, A, B, B, backend="no_such_backend")
    with pytest.raises(BackendError, match="valid choices here: auto, csrc, reference"):
        scan.selective_scan(u, u, A, B, B, backend="mamba_ssm")
    with pytest.raises(BackendError, match="float64"):
        scan.selective_scan(u.double(), u.double(), A.double(), B.double(), B.double(), backend="csrc")
