"""The csrc selective scan against the reference evaluated in float64 (flash-attn's test rule).

gold = reference in float64, base = reference in the test dtype, fast = csrc in the test dtype;
for the output, the final state and every input gradient: max|fast - gold| <= 2 max|base - gold| + atol,
with atol = 1e-5 * max|gold| (room for float32 rounding where base happens to be exact).
Document resets (reset: (batch, seq) bool) go through the same comparison, placed where the CPU
kernel's checkpointing could get them wrong: at t = 0 (over an initial state), inside a chunk, on
the first and last step of a chunk (CHECKPOINT_CHUNK["cpu"] = 128 steps), several per row.
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


def run(inputs, cast, backend, softplus, cotangents, reset=None):
    leaves = {k: (cast(v).detach().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    out, last = scan.selective_scan(*(leaves[k] for k in NAMES[:5]), D=leaves["D"], z=leaves["z"],
                                    delta_bias=leaves["delta_bias"], delta_softplus=softplus, return_last_state=True,
                                    initial_state=leaves["initial_state"], backend=backend, reset=reset)
    torch.autograd.backward([out, last], [cotangents[0].to(out.dtype), cotangents[1].to(last.dtype)])
    results = {"out": out, "last_state": last}
    results.update({f"d{k}": v.grad for k, v in leaves.items() if v is not None})
    return {k: v.double() for k, v in results.items()}


def check_against_gold(inputs, dtype, softplus, seed, reset=None):
    generator = torch.Generator().manual_seed(seed + 1)
    batch, dim, seq = inputs["u"].shape
    cotangents = (torch.randn(batch, dim, seq, generator=generator),
                  torch.randn(batch, dim, inputs["A"].shape[1], generator=generator))
    gold = run(inputs, lambda x: x.double(), "reference", softplus, cotangents, reset)
    base = run(inputs, lambda x: x, "reference", softplus, cotangents, reset)
    fast = run(inputs, lambda x: x, "csrc", softplus, cotangents, reset)
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


def piecewise_grads(inputs, cotangent, pieces, reset=None):
    """The csrc scan run over consecutive pieces of the sequence, each from the previous piece's final state:
    [output] + the gradients of NAMES for the loss <out, cotangent> + sum(final state)."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    state, outs, start = leaves["initial_state"], [], 0
    for length in pieces:
        part = slice(start, start + length)
        out, state = scan.selective_scan(
            leaves["u"][..., part], leaves["delta"][..., part], leaves["A"], leaves["B"][..., part],
            leaves["C"][..., part], D=leaves["D"], z=leaves["z"][..., part], delta_bias=leaves["delta_bias"],
            delta_softplus=True, return_last_state=True, initial_state=state, backend="csrc",
            reset=None if reset is None else reset[:, part])
        outs.append(out)
        start += length
    out = torch.cat(outs, dim=-1)
    (out * cotangent).sum().add_(state.sum()).backward()
    return [out] + [leaves[k].grad for k in NAMES]


def test_chunked_scan_equals_full_scan():
    """Scanning in pieces, each starting from the previous piece's final state, is the full scan."""
    inputs = make_inputs(2, 6, 16, 301, torch.float32, with_state=True, with_extras=True, seed=5)
    cotangent = torch.randn(2, 6, 301, generator=torch.Generator().manual_seed(6))


    full, chunked = (piecewise_grads(inputs, cotangent, pieces) for pieces in ([301], [100, 1, 128, 72]))
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


# ---- document resets ----

def resets(batch, seq, starts):
    """(batch, seq) bool with True at the given steps of each row (row b gets starts[b % len(starts)])."""
    reset = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        reset[b, [t for t in starts[b % len(starts)] if t < seq]] = True
    return reset


RESET_CASES = {  # name -> (seq, starts per row); chunks of 128 steps on CPU
    "t0": (200, [[0], [0, 150]]),
    "mid_chunk": (301, [[57], [3, 200, 299]]),
    "chunk_boundaries": (300, [[127, 128, 256], [128, 255]]),
    "several_per_row": (261, [[0, 1, 2, 60, 61, 129, 260], [5, 10, 15, 20, 130, 131]]),
    "odd_short": (7, [[3], [0, 6]]),
    "none_in_one_row": (150, [[], [1, 149]]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(RESET_CASES))
@pytest.mark.parametrize("with_state", [False, True])
def test_scan_with_resets_matches_float64_reference(dtype, case, with_state):
    seq, starts = RESET_CASES[case]
    seed = seq * 3 + with_state
    inputs = make_inputs(2, 5, 16, seq, dtype, with_state, with_extras=True, seed=seed)
    check_against_gold(inputs, dtype, softplus=True, seed=seed, reset=resets(2, seq, starts))


def test_scan_with_resets_over_blocks_and_segments_without_extras():
    """70 channels and 1300 steps (three blocks of channels, two segments), no D, z or delta_bias."""
    reset = resets(2, 1300, [[0, 127, 500, 1023, 1024, 1299], [640]])
    inputs = make_inputs(2, 70, 5, 1300, torch.float32, with_state=True, with_extras=False, seed=19)
    check_against_gold(inputs, torch.float32, softplus=True, seed=19, reset=reset)


def test_resets_cut_every_path_between_documents():
    """Exact zeros, not small numbers: the initial state has no gradient once every row resets, no
    output after a reset depends on an input before it, and the last state is the one of the last document."""
    inputs = make_inputs(2, 4, 16, 260, torch.float32, with_state=True, with_extras=True, seed=23)
    reset = resets(2, 260, [[0, 130], [0, 129]])
    for backend in ("csrc", "reference"):
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        out, last = scan.selective_scan(*(leaves[k] for k in NAMES[:5]), D=leaves["D"], z=leaves["z"],
                                        delta_bias=leaves["delta_bias"], delta_softplus=True, return_last_state=True,
                                        initial_state=leaves["initial_state"], backend=backend, reset=reset)
        (out[0, :, 130:].sum() + out[1, :, 129:].sum() + last.sum()).backward()
        assert not leaves["initial_state"].grad.any(), backend
        for name in ("u", "delta", "z"):
            grad = leaves[name].grad
            assert not grad[0, :, :130].any() and not grad[1, :, :129].any(), (backend, name)
            assert grad[0, :, 130:].abs().min() > 0, (backend, name)
        for name in ("B", "C"):
            assert not leaves[name].grad[0, :, :130].any() and not leaves[name].grad[1, :, :129].any(), (backend, name)


def test_all_false_reset_is_bitwise_no_reset():
    inputs = make_inputs(2, 5, 16, 300, torch.float32, with_state=True, with_extras=True, seed=29)
    cotangents = (torch.randn(2, 5, 300), torch.randn(2, 5, 16))
    plain = run(inputs, lambda x: x, "csrc", True, cotangents)
    masked = run(inputs, lambda x: x, "csrc", True, cotangents, reset=torch.zeros(2, 300, dtype=torch.bool))
    for name in plain:
        assert torch.equal(plain[name], masked[name]), name


def test_pieces_with_state_passing_equal_one_scan_with_resets():
    """A packed row scanned in pieces that do not line up with its documents (state passed from piece
    to piece, each piece with its slice of reset) is the one scan; and each document alone, from a
    zero state, gives the packed scan's outputs."""
    seq, starts = 301, [[0, 90, 128, 200], [0, 1, 129, 300]]
    reset = resets(2, seq, starts)
    inputs = make_inputs(2, 6, 16, seq, torch.float32, with_state=True, with_extras=True, seed=31)
    cotangent = torch.randn(2, 6, seq, generator=torch.Generator().manual_seed(32))


    full, pieces = (piecewise_grads(inputs, cotangent, p, reset) for p in ([seq], [100, 1, 128, 72]))
    for name, a, b in zip(["out"] + NAMES, full, pieces):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for b, row in enumerate(starts):
        for first, end in zip(row, row[1:] + [seq]):
            doc = {k: v[b:b + 1, ..., first:end] if k in ("u", "delta", "B", "C", "z") else v
                   for k, v in inputs.items() if k != "initial_state"}
            alone = scan.selective_scan(*(doc[k] for k in NAMES[:5]), D=doc["D"], z=doc["z"],
                                        delta_bias=doc["delta_bias"], delta_softplus=True, backend="csrc")
            torch.testing.assert_close(full[0][b:b + 1, :, first:end], alone, rtol=1e-5, atol=1e-5)


def test_bad_reset_is_rejected():
    u = torch.randn(2, 3, 8)
    A, B = -torch.rand(3, 4), torch.randn(2, 4, 8)
    for bad in (torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, 7, dtype=torch.bool)):
        with pytest.raises(ValueError, match="reset must be a bool tensor of shape \\(batch, seq\\) = \\(2, 8\\)"):
            scan.selective_scan(u, u, A, B, B, reset=bad)
    with pytest.raises(RuntimeError, match="selective_scan_fwd: reset must have shape"):
        torch.ops.longtrain.selective_scan_fwd(u, u, A, B, B, None, None, None, True, None, 4,
                                               torch.zeros(2, 9, dtype=torch.bool))


def test_mamba_ssm_is_passed_over_for_resets():
    """mamba_ssm's selective_scan_fn has no reset input: the registry says so rather than dropping it."""
    reason = scan._mamba_ssm_supports(torch.device("cuda"), torch.float32, reset=True)
    assert reason == "mamba_ssm's selective_scan_fn has no document reset"
    u = torch.randn(1, 2, 8)
    with pytest.raises(BackendError, match="valid choices here: auto, csrc, reference"):
        scan.selective_scan(u, u, -torch.rand(2, 4), torch.randn(1, 4, 8), torch.randn(1, 4, 8), backend="mamba_ssm",
                            reset=torch.zeros(1, 8, dtype=torch.bool))
