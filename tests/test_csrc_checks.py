"""Every csrc op checks every tensor argument before reading it (issue 17, group 2: a D one entry
short made the CPU scan read past its end).

For each op of csrc/ops.cpp and each tensor argument, optional ones included, the raw custom op
(`torch.ops.longtrain.*`) gets that argument wrong and must raise a RuntimeError naming the op and
the argument: one dimension too many ("rank"), the last dimension one short ("short", which is what
read past the end), int32 and float64 ("int32", "float64"), and a tensor on the meta device
("device"; the CPU kernel is reached through the dispatcher's redispatch, since a plain call with a
meta tensor would go to the Meta kernel, which does not exist). Arguments that set the shapes of
the others (u, q, x, ...) get no "short" case: the others are then the ones that do not match.
"layout": an argument with other strides must raise where the kernel assumes a layout (RMSNorm's x,
cross-entropy's logits), and otherwise give bitwise the result of the contiguous argument.
"""
import re

import pytest
import torch

from longtrain.kernels.extension import extension

pytestmark = pytest.mark.skipif(extension() is None, reason="extension longtrain.kernels._C not built")


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=_GENERATOR).to(dtype)


_GENERATOR = torch.Generator().manual_seed(0)
BATCH, DIM, SEQ, STATE, CHUNK = 2, 3, 5, 4, 2


def _scan_fwd():
    return dict(u=_randn(BATCH, DIM, SEQ), delta=_randn(BATCH, DIM, SEQ), A=-torch.rand(DIM, STATE),
                B=_randn(BATCH, STATE, SEQ), C=_randn(BATCH, STATE, SEQ), D=_randn(DIM), z=_randn(BATCH, DIM, SEQ),
                delta_bias=_randn(DIM), delta_softplus=True, initial_state=_randn(BATCH, DIM, STATE), chunk=CHUNK,
                reset=torch.tensor([[False, False, True, False, True], [True, False, False, False, False]]))


def _scan_bwd():
    f = _scan_fwd()
    _, _, checkpoints = torch.ops.longtrain.selective_scan_fwd(*f.values())
    return dict(dout=_randn(BATCH, DIM, SEQ), dlast_state=_randn(BATCH, DIM, STATE), u=f["u"], delta=f["delta"],
                A=f["A"], B=f["B"], C=f["C"], D=f["D"], z=f["z"], delta_bias=f["delta_bias"], delta_softplus=True,
                checkpoints=checkpoints, chunk=CHUNK, reset=f["reset"])


def _attention_fwd():
    return dict(q=_randn(1, 4, 2, 8), k=_randn(1, 6, 1, 8), v=_randn(1, 6, 1, 8), causal=True, scale=0.3)


def _attention_bwd():
    f = _attention_fwd()
    out, lse = torch.ops.longtrain.attention_fwd(*f.values())
    return dict(dout=_randn(1, 4, 2, 8), q=f["q"], k=f["k"], v=f["v"], out=out, lse=lse, dlse=_randn(1, 2, 4),
                causal=True, scale=0.3)


def _rms_norm_fwd():
    return dict(x=_randn(3, 8), weight=_randn(8), eps=1e-5, out_dtype=torch.float32)


def _rms_norm_bwd():
    f = _rms_norm_fwd()
    _, rstd = torch.ops.longtrain.rms_norm_fwd(*f.values())
    return dict(dy=_randn(3, 8), x=f["x"], weight=f["weight"], rstd=rstd)


# op -> (valid arguments in schema order, arguments that set the others' shapes)
OPS = {
    "selective_scan_fwd": (_scan_fwd, {"u", "A"}),
    "selective_scan_bwd": (_scan_bwd, {"u", "A"}),
    "attention_fwd": (_attention_fwd, {"q", "k"}),
    "attention_bwd": (_attention_bwd, {"q", "k"}),
    "cross_entropy_grad_": (lambda: dict(logits=_randn(6, 10), targets=torch.randint(0, 10, (6,)), ignore_index=-100),
                            {"logits"}),
    "rms_norm_fwd": (_rms_norm_fwd, {"x"}),
    "rms_norm_bwd": (_rms_norm_bwd, {"x"}),
    "swiglu_fwd": (lambda: dict(g=_randn(3, 8), u=_randn(3, 8)), {"g"}),
    "swiglu_bwd": (lambda: dict(dh=_randn(3, 8), g=_randn(3, 8), u=_randn(3, 8)), {"g"}),
    "rotary": (lambda: dict(x=_randn(1, 4, 2, 8), cos=_randn(4, 4), sin=_randn(4, 4), inverse=False), {"x"}),
}
# Arguments whose layout the kernel assumes (it writes or reads them in place).
STRICT_LAYOUT = {("rms_norm_fwd", "x"), ("rms_norm_bwd", "x"), ("cross_entropy_grad_", "logits")}
TENSOR_ARGS = [(op, name) for op, (make, _) in OPS.items() for name, value in make().items()
               if isinstance(value, torch.Tensor)]


def _call(op, args, redispatch_to_cpu=False):
    fn = getattr(torch.ops.longtrain, op).default
    if redispatch_to_cpu:
        return fn.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args.values())
    return fn(*args.values())


def _wrong(value, case):
    if case == "rank":
        return value.unsqueeze(-1)
    if case == "short":
        return value.narrow(-1, 0, value.shape[-1] - 1)
    if case in ("int32", "float64"):
        return value.to(getattr(torch, case))
    return value.to("meta")


def _assert_names(error, op, name):
    message = str(error.value)
    assert op in message, message
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message), f"{name!r} not named in: {message}"


WRONG = [(op, name, case) for op, name in TENSOR_ARGS for case in ("rank", "short", "int32", "float64", "device")
         if not (case == "short" and name in OPS[op][1])]


@pytest.mark.parametrize("op,name,case", WRONG, ids=["-".join(w) for w in WRONG])
def test_wrong_argument_is_rejected(op, name, case):
    make, _ = OPS[op]
    if case == "int32" and name == "targets":
        case = "float64"  # int32 targets are wrong too, but take the same path as float64
    args = make()
    args[name] = _wrong(args[name], case)
    with pytest.raises(RuntimeError) as error:
        _call(op, args, redispatch_to_cpu=case == "device")
    _assert_names(error, op, name)


def _strided(value):
    """The same values with every other element of the last dim skipped in memory."""
    return torch.empty(*value.shape[:-1], 2 * value.shape[-1], dtype=value.dtype)[..., ::2].copy_(value)


@pytest.mark.parametrize("op,name", TENSOR_ARGS, ids=[f"{op}-{name}" for op, name in TENSOR_ARGS])
def test_argument_layout(op, name):
    args = OPS[op][0]()
    strided = dict(args, **{name: _strided(args[name])})
    assert not strided[name].is_contiguous()
    if (op, name) in STRICT_LAYOUT:
        with pytest.raises(RuntimeError) as error:
            _call(op, strided)
        _assert_names(error, op, name)
        return
    if op == "cross_entropy_grad_":  # in place: compare what it wrote too
        args["logits"], strided["logits"] = args["logits"].clone(), strided["logits"].clone()
    want, got = _call(op, args), _call(op, strided)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def test_overlapping_logit_rows_are_rejected():
    logits = torch.randn(1, 10).expand(6, 10)  # every row the same memory: workers would race on it
    with pytest.raises(RuntimeError, match="cross_entropy_grad_: logits must have contiguous rows"):
        torch.ops.longtrain.cross_entropy_grad_(logits, torch.zeros(6, dtype=torch.long), -100)


@pytest.mark.parametrize("op,change,match", [
    ("selective_scan_fwd", dict(chunk=0), "chunk must be positive"),
    ("selective_scan_bwd", dict(chunk=3), "checkpoints must have shape"),  # checkpoints of another chunk
    ("attention_fwd", dict(k=torch.randn(1, 6, 0, 8), v=torch.randn(1, 6, 0, 8)), "kv_heads"),
    ("attention_fwd", dict(k=torch.randn(1, 6, 3, 8), v=torch.randn(1, 6, 3, 8)), "kv_heads"),
    ("rms_norm_fwd", dict(x=torch.randn(3, 0), weight=torch.randn(0)), "d_model > 0"),
    ("rms_norm_fwd", dict(out_dtype=torch.int32), "out_dtype"),
    ("rotary", dict(x=torch.randn(1, 4, 2, 7)), "head_dim must be even"),
    ("cross_entropy_grad_", dict(targets=torch.full((6,), 10)), "outside the vocabulary"),
    ("swiglu_fwd", dict(u=torch.randn(3, 8, dtype=torch.bfloat16)), "u must have g's dtype"),
])
def test_inconsistent_arguments_are_rejected(op, change, match):
    args = dict(OPS[op][0](), **change)
    with pytest.raises(RuntimeError, match=match):
        _call(op, args)
