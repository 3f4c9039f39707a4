"""The per-row softmax cross-entropy + gradient kernel against the float64 oracle, every backend."""
import pytest
import torch

from longtrain.kernels import cross_entropy as ce
from longtrain.kernels.extension import extension
from longtrain.kernels.registry import BackendError

BACKENDS = ["csrc", "torch"] if extension() is not None else ["torch"]
# Relative rounding of the stored gradient: half an ulp of the dtype (computed in float32 first).
ROUND = {torch.float32: 2 ** -24, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float64: 2 ** -53}


def make(rows, vocab, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[1::5] = -100
    return logits, targets


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [(b, d) for b in BACKENDS for d in DTYPES] + [("torch", torch.float64)]  # csrc refuses float64


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("rows,vocab,scale", [(37, 1001, 3.0), (8, 4000, 30.0), (3, 17, 1.0)])
def test_matches_float64_oracle(backend, dtype, rows, vocab, scale):
    logits, targets = make(rows, vocab, dtype, scale)
    want_loss, want_grad = ce.reference(logits, targets)  # float64 of the same (rounded) inputs
    work = logits.clone()
    loss = ce.cross_entropy_grad_(work, targets, backend=backend)
    assert work.dtype == dtype and loss.shape == (rows,)
    # float32 math: the loss to a few float32 ulps of its lse, the gradient to its storage rounding.
    lse = torch.logsumexp(logits.double(), -1)
    assert torch.all((loss.double() - want_loss).abs() <= 1e-6 * (1 + lse.abs())), (loss, want_loss)
    err = (work.double() - want_grad).abs()
    assert torch.all(err <= ROUND[dtype] * want_grad.abs() + 1e-6), err.max()
    ignored = targets == -100
    assert torch.all(loss[ignored] == 0) and torch.all(work[ignored] == 0)
    # each valid row's gradient sums to zero (softmax sums to one)
    assert work[~ignored].double().sum(-1).abs().max() < 1e-5 + ROUND[dtype] * 2


def test_auto_dispatch_and_agreement():
    logits, targets = make(64, 500, torch.bfloat16)
    cpu = torch.device("cpu")
    want = "csrc" if extension() is not None else "torch"
    assert ce.registry.select(None, cpu, torch.bfloat16).name == want
    assert ce.registry.select(None, cpu, torch.float64).name == "torch"
    with pytest.raises(BackendError, match="csrc"):
        ce.cross_entropy_grad_(logits.double(), targets, backend="csrc")
    assert ce.registry.select(None, cpu, torch.float32, rows_contiguous=False).name == "torch"
    a, b = logits.clone(), logits.clone()
    la, lb = ce.cross_entropy_grad_(a, targets), ce.cross_entropy_grad_(b, targets, backend="torch")
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.float(), b.float(), atol=2 ** -8, rtol=2 ** -7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_target_raises_before_writing(backend):
    logits, targets = make(6, 50, torch.float32)
    targets[4] = 50
    work = logits.clone()
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 50\)"):
        ce.cross_entropy_grad_(work, targets, backend=backend)
    assert torch.equal(work, logits)


@pytest.mark.skipif(extension() is None, reason="needs the compiled extension")
def test_compiled_op_checks_its_own_inputs():
    logits, targets = make(6, 50, torch.bfloat16)
    targets[5] = -3
    work = logits.clone()
    with pytest.raises(RuntimeError, match="target -3 of row 5 is outside the vocabulary"):
        torch.ops.longtrain.cross_entropy_grad_(work, targets, -100)
    assert torch.equal(work, logits)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        torch.ops.longtrain.cross_entropy_grad_(logits.t().contiguous().t(), targets, -100)
