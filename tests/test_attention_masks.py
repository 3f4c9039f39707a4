"""Sliding windows, attention sinks, documents and absolute positions: the csrc kernel against the float64 reference.

The mask is the reference's boolean `visibility` (obviously right); the kernel skips the tiles it hides. Same
rule as tests/test_kernels_attention.py (flash-attn's): gold = reference in float64, base = reference in the test
dtype (with bfloat16 products for the bfloat16-product path's gradients), fast = csrc; for out, lse, dq, dk, dv
with cotangents on out and lse: max|fast - gold| <= 2 max|base - gold| + 1e-5 max|gold|, and the rows that see no
key (lse -inf) are the same. Tiles of the kernel: 64 query rows under a window (64 or 256 otherwise), 512 keys
starting where a query tile's window starts, document bounds per 16 keys.
"""
import functools

import pytest
import torch

from longtrain.kernels import attention as attention_module
from longtrain.kernels.attention import attention, visibility
from longtrain.kernels.extension import extension
from test_kernels_attention import run as run_backend

pytestmark = pytest.mark.skipif(extension() is None, reason="extension longtrain.kernels._C not built")

PATHS = [  # dtype, LONGTRAIN_CPU_BF16_GEMM
    pytest.param(torch.float32, None, id="float32"),
    pytest.param(torch.bfloat16, "0", id="bfloat16-f32-products"),
    pytest.param(torch.bfloat16, "1", id="bfloat16-bf16-products"),
    pytest.param(torch.bfloat16, "portable", id="bfloat16-portable"),
]


def document_starts(batch_lengths):
    """(batch, seq) int32 document starts from each row's document lengths."""
    rows = []
    for lengths in batch_lengths:
        starts, position = [], 0
        for n in lengths:
            starts += [position] * n
            position += n
        rows.append(starts)
    return torch.tensor(rows, dtype=torch.int32)


def run(leaves, backend, cotangents, masks):
    masks = dict(masks)
    return run_backend(*leaves, lambda x: x, backend, masks.pop("causal", False), cotangents, **masks)


def check(batch, seq_q, seq_k, heads, kv_heads, dim, dtype, seed, bf16_products=False, **masks):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, dim, generator=generator).to(dtype)
    k = torch.randn(batch, seq_k, kv_heads, dim, generator=generator).to(dtype)
    v = torch.randn(batch, seq_k, kv_heads, dim, generator=generator).to(dtype)
    cotangents = (torch.randn(batch, seq_q, heads, dim, generator=generator, dtype=torch.float64),
                  torch.randn(batch, heads, seq_q, generator=generator, dtype=torch.float64))
    gold, gold_finite = run([x.double() for x in (q, k, v)], "reference", cotangents, masks)
    base, _ = run([q, k, v], "reference", cotangents, masks)
    if bf16_products:
        low = functools.partial(attention_module.reference, upcast=False)
        base_low, _ = run([q, k, v], low, cotangents, masks)
        base = {name: base[name] if name in ("out", "lse") else base_low[name] for name in base}
    fast, fast_finite = run([q, k, v], "csrc", cotangents, masks)
    assert torch.equal(fast_finite, gold_finite), "rows with no visible key must have lse = -inf"
    for name in gold:
        atol = 1e-5 * gold[name].abs().max().item()
        fast_err = (fast[name] - gold[name]).abs().max().item()
        base_err = (base[name] - gold[name]).abs().max().item()
        assert fast_err <= 2 * base_err + atol, f"{name}: csrc error {fast_err:.3g} vs reference {base_err:.3g}"
    return gold_finite


# Documents: row 0 has boundaries inside query and key tiles (at 37, 301) and on tile edges (64: a query tile,
# 512: a key tile; 16: a document-bound block); row 1 is one document, then many short ones.
DOCS_600 = document_starts([[37, 27, 237, 211, 88], [400] + [20] * 10])

CASES = {  # name -> (batch, seq_q, seq_k, heads, kv_heads, dim, masks)
    "window": (2, 200, 200, 2, 2, 32, dict(window=(17, 9))),
    "window-left-only": (1, 150, 150, 2, 1, 32, dict(window=(40, -1))),
    "window-sinks-causal": (1, 700, 700, 4, 2, 32, dict(causal=True, window=(100, 0), sinks=4)),
    "window-gqa": (1, 160, 160, 8, 2, 64, dict(causal=True, window=(31, -1))),
    "documents": (2, 600, 600, 2, 1, 32, dict(doc_q=DOCS_600, doc_k=DOCS_600)),
    "documents-causal": (2, 600, 600, 2, 1, 32, dict(causal=True, doc_q=DOCS_600, doc_k=DOCS_600)),
    "documents-window-sinks": (2, 600, 600, 4, 2, 32, dict(causal=True, window=(50, 0), sinks=3, doc_q=DOCS_600,
                                                            doc_k=DOCS_600)),
    # A ring-attention chunk pair: queries at [260, 337), keys at [120, 251), odd lengths.
    "positions": (1, 77, 131, 2, 1, 32, dict(causal=True, q_start=260, k_start=120, window=(160, 0), sinks=2)),
    # Keys from position 20 on: the first 20 query rows see no key.
    "positions-ahead": (1, 60, 50, 2, 2, 16, dict(causal=True, q_start=0, k_start=20)),
}


@pytest.mark.parametrize("dtype, bf16_gemm", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_masks_match_float64_reference(case, dtype, bf16_gemm, monkeypatch):
    if bf16_gemm is not None:
        monkeypatch.setenv("LONGTRAIN_CPU_BF16_GEMM", bf16_gemm)
    *shape, masks = CASES[case]
    check(*shape, dtype=dtype, seed=sum(shape), bf16_products=bf16_gemm in ("1", "portable"), **masks)


def test_documents_with_positions_and_odd_lengths():
    """A chunk of a packed row: queries [100, 233) and keys [64, 303) of documents starting at 0, 90, 150, 301."""
    starts = document_starts([[90, 60, 151, 20]])[:, :321]
    doc_q, doc_k = starts[:, 100:233].contiguous(), starts[:, 64:303].contiguous()
    check(1, 133, 239, 2, 1, 24, torch.float32, seed=3, causal=True, window=(45, 0), sinks=5, doc_q=doc_q,
          doc_k=doc_k, q_start=100, k_start=64)


def test_rows_that_see_nothing():
    # Non-causal window whose right edge ends before the first key: the first rows see nothing.
    finite = check(1, 30, 30, 1, 1, 16, torch.float32, seed=4, window=(0, 3), q_start=0, k_start=10)
    assert not finite[0, 0, :7].any() and finite[0, 0, 7:].all()


def test_the_mask_rules():
    """The reference's mask itself, on a case small enough to write out."""
    doc = document_starts([[3, 5]])
    keep = visibility(8, 8, causal=True, window=(1, 0), sinks=1, doc_q=doc, doc_k=doc)[0].int()
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0, 0, 0],
                             [0, 0, 0, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 1, 1, 0, 0],   # the sink (3) and the window (4, 5)
                             [0, 0, 0, 1, 0, 1, 1, 0],
                             [0, 0, 0, 1, 0, 0, 1, 1]], dtype=torch.int32)
    assert torch.equal(keep, expected)


@pytest.mark.parametrize("dtype, bf16_gemm", PATHS[:3])
def test_no_mask_arguments_keep_the_plain_kernel(dtype, bf16_gemm, monkeypatch):
    """window=(-1, -1), sinks=0 and the default positions are today's causal call, bitwise; a window wider
    than the sequence matches it within the test rule (other tiles, so other rounding)."""
    if bf16_gemm is not None:
        monkeypatch.setenv("LONGTRAIN_CPU_BF16_GEMM", bf16_gemm)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 90, 2, 32, generator=g).to(dtype) for _ in range(3))
    plain = attention(q, k, v, causal=True, return_lse=True, backend="csrc")
    same = attention(q, k, v, causal=True, return_lse=True, backend="csrc", window=(-1, -1), sinks=0, q_start=0,
                     k_start=0)
    assert all(torch.equal(a, b) for a, b in zip(plain, same))
    check(1, 90, 90, 2, 2, 32, dtype, seed=9, bf16_products=bf16_gemm == "1", causal=True, window=(500, 0))


def test_torch_backend_takes_the_mask():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 600, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    masks = dict(causal=True, window=(50, 0), sinks=2, doc_q=DOCS_600, doc_k=DOCS_600, q_start=1, k_start=0)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = attention(*leaves, backend="reference", **masks)
    want.sum().backward()
    grads = [x.grad for x in leaves]
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = attention(*leaves, backend="torch", **masks)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for a, b in zip(leaves, grads):
        torch.testing.assert_close(a.grad, b, rtol=1e-9, atol=1e-9)


def test_masked_kernel_is_bitwise_deterministic():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 600, 4, 32, generator=g) for _ in range(3))
    dout = torch.randn(2, 600, 4, 32, generator=g)
    masks = dict(causal=True, window=(70, 0), sinks=2, doc_q=DOCS_600, doc_k=DOCS_600)

    def once():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = attention(*leaves, return_lse=True, backend="csrc", **masks)
        torch.autograd.backward([out, lse], [dout, lse.isfinite().float()])
        return [out, lse, *(x.grad for x in leaves)]

    threads = torch.get_num_threads()
    try:
        want = once()
        for threads_now, order in ((1, (1, 0)), (2, (2, 1)), (3, (3, 0))):
            torch.set_num_threads(threads_now)
            torch.ops.longtrain._set_task_order(*order)
            assert all(torch.equal(a, b) for a, b in zip(want, once()))
    finally:
        torch.ops.longtrain._set_task_order(0, 0)
        torch.set_num_threads(threads)


BAD = [
    (dict(window=(-2, 0)), "window"),
    (dict(window=(3,)), "window"),
    (dict(window=(1.5, 0)), "window"),
    (dict(sinks=-1), "sinks"),
    (dict(doc_q=torch.zeros(1, 8, dtype=torch.int32)), "doc_q and doc_k"),
    (dict(doc_q=torch.zeros(1, 8, dtype=torch.int64), doc_k=torch.zeros(1, 8, dtype=torch.int32)), "doc_q"),
    (dict(doc_q=torch.zeros(1, 8, dtype=torch.int32), doc_k=torch.zeros(1, 7, dtype=torch.int32)), "doc_k"),
    (dict(q_start=1.0), "q_start"),
]


@pytest.mark.parametrize("masks, name", BAD, ids=[name for _, name in BAD])
@pytest.mark.parametrize("backend", ["csrc", "reference"])
def test_bad_mask_arguments(masks, name, backend):
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=f"attention: {name}"):
        attention(q, q, q, backend=backend, **masks)


def _raw_args():
    q = torch.randn(1, 8, 2, 16)
    doc = torch.zeros(1, 8, dtype=torch.int32)
    return dict(q=q, k=q, v=q, causal=True, scale=0.25, window_left=3, window_right=-1, sinks=1, doc_q=doc,
                doc_k=doc.clone())


@pytest.mark.parametrize("name", ["doc_q", "doc_k"])
@pytest.mark.parametrize("case", ["rank", "short", "int64", "float32", "device", "strided"])
def test_raw_op_checks_document_starts(name, case):
    """The op itself rejects a wrong doc_q / doc_k (shape, dtype, device, contiguity) before reading it."""
    args = _raw_args()
    doc = args[name]
    args[name] = {"rank": doc.unsqueeze(-1), "short": doc[:, :-1], "int64": doc.long(), "float32": doc.float(),
                  "device": doc.to("meta"),
                  "strided": torch.zeros(1, 16, dtype=torch.int32)[:, ::2]}[case]
    op = torch.ops.longtrain.attention_fwd.default
    with pytest.raises(RuntimeError, match=f"attention_fwd: {name}"):
        if case == "device":
            op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args.values())
        else:
            op(*args.values())


@pytest.mark.parametrize("change, match", [(dict(window_left=-2), "window_left"),
                                           (dict(window_right=-5), "window_right"), (dict(sinks=-1), "sinks"),
                                           (dict(doc_k=None), "doc_q and doc_k")])
def test_raw_op_checks_mask_ints(change, match):
    args = dict(_raw_args(), **change)
    with pytest.raises(RuntimeError, match=f"attention_fwd: {match}"):
        torch.ops.longtrain.attention_fwd(*args.values())
    fwd = _raw_args()
    out, lse = torch.ops.longtrain.attention_fwd(*fwd.values())
    bwd = dict(dout=out, q=fwd["q"], k=fwd["k"], v=fwd["v"], out=out, lse=lse, dlse=None,
               **{key: value for key, value in fwd.items() if key not in ("q", "k", "v")})
    bwd.update(change)
    with pytest.raises(RuntimeError, match=f"attention_bwd: {match}"):
        torch.ops.longtrain.attention_bwd(*bwd.values())
