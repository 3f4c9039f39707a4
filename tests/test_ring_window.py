"""Sliding-window attention (window, sinks, documents) under context parallelism on gloo, against the unsplit
attention op in one process: out and the gradients of q, k, v in float64 to 1e-10 (the reference kernel), and
in float32 on the csrc kernel by the kernel tests' rule, max|fast - gold| <= 2 max|base - gold| + atol. Also:
the K/V bytes each rank sends, counted by `attention_traffic`, equal the fetch rule's count and stay below the
full ring's; and a windowed decoder at cp=2 equals itself in one process, logits and parameter gradients."""
import copy

import pytest
import torch
import torch.distributed as dist

from longtrain.kernels.attention import attention
from longtrain.trainer.parallel.context import (attention_traffic, ring_attention,
                                                zigzag_split)

from parallel_harness import run_ranks, split_decoder_pairs

TOL = 1e-10
SEQ = 32
HEAD_DIM = 8


def document_starts(lengths_per_row) -> torch.Tensor:
    """(rows, SEQ) int32: the start of each token's document, from the documents' lengths in each row."""
    rows = []
    for lengths in lengths_per_row:
        assert sum(lengths) == SEQ
        rows.append([start for start, n in zip([sum(lengths[:i]) for i in range(len(lengths))], lengths)
                     for _ in range(n)])
    return torch.tensor(rows, dtype=torch.int32)


# Documents crossing chunk borders at cp=2 and cp=4, one shorter than the sinks (2 < 3), and in row 1 a document
# whose sinks lie on another rank than some of its queries.
DOCS = [[5, 8, 2, 14, 3], [20, 12]]


def cases(chunk: int) -> dict:
    """name -> (window, sinks, documents, kv_heads), windows relative to the zigzag chunk."""
    return {
        "window < chunk": (chunk // 2, 0, False, 2),
        "window - 1 = chunk": (chunk + 1, 0, False, 2),
        "window > chunk": (2 * chunk + 3, 0, False, 2),
        "window 1 + sinks": (1, 2, False, 2),
        "window + sinks": (chunk // 2, 2, False, 2),
        "sinks > chunk": (3, chunk + 2, False, 2),
        "window > chunk + sinks": (chunk + 3, 2, False, 2),
        "window + sinks + documents": (chunk // 2, 3, True, 2),
        "window > chunk + sinks + documents": (chunk + 3, 3, True, 2),
        "window + documents": (chunk // 2 + 1, 0, True, 2),
        "multi-head": (chunk // 2, 2, True, 4),
    }


def _inputs(kv_heads, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, SEQ, 4, HEAD_DIM, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, SEQ, kv_heads, HEAD_DIM, generator=generator, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(2, SEQ, 4, HEAD_DIM, generator=generator, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, grad)]


def _full(q, k, v, grad, backend, window, sinks, doc):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    documents = dict(doc_q=doc, doc_k=doc) if doc is not None else {}
    out = attention(*leaves, causal=True, backend=backend, window=(window - 1, 0), sinks=sinks, **documents)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def _split(rank, world, q, k, v, grad, backend, window, sinks, doc):
    leaves = [zigzag_split(t, world, rank).requires_grad_() for t in (q, k, v)]
    local_doc = zigzag_split(doc, world, rank) if doc is not None else None
    out = ring_attention(*leaves, group=dist.group.WORLD, backend=backend, doc=local_doc, window=(window - 1, 0),
                         sinks=sinks)
    out.backward(zigzag_split(grad, world, rank))
    return [out.detach()] + [t.grad for t in leaves]


def _check_cases(rank, world):
    chunk = SEQ // (2 * world)
    doc = document_starts(DOCS)
    results = {}
    for seed, (name, (window, sinks, documents, kv_heads)) in enumerate(cases(chunk).items()):
        masks = (window, sinks, doc if documents else None)
        q, k, v, grad = _inputs(kv_heads, torch.float64, seed)
        gold = [zigzag_split(t, world, rank) for t in _full(q, k, v, grad, "reference", *masks)]
        split = _split(rank, world, q, k, v, grad, "reference", *masks)
        errors = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(split, gold)]
        # float32 on the csrc kernel, the flash-attention rule against the float64 gold
        q32, k32, v32, grad32 = (t.float() for t in (q, k, v, grad))
        base = [zigzag_split(t, world, rank) for t in _full(q32, k32, v32, grad32, "reference", *masks)]
        fast = _split(rank, world, q32, k32, v32, grad32, "csrc", *masks)
        rule = [((f.double() - g).abs().max().item(), (b.double() - g).abs().max().item(), g.abs().max().item())
                for f, b, g in zip(fast, base, gold)]
        results[name] = errors, rule
    return results


@pytest.mark.parametrize("cp", [2, pytest.param(4, marks=pytest.mark.slow)])  # cp=4: 16-22 s on 2 busy cores
def test_windowed_context_parallel_attention_equals_one_process(cp):
    for results in run_ranks(_check_cases, cp):
        assert len(results) == len(cases(SEQ // (2 * cp)))
        for name, (errors, rule) in results.items():
            for tensor, error in zip(("out", "dq", "dk", "dv"), errors):
                assert error < TOL, (name, tensor, error)
            for tensor, (fast, base, scale) in zip(("out", "dq", "dk", "dv"), rule):
                assert fast <= 2 * base + 1e-5 * scale, (name, tensor, fast, base)


# ---- the K/V bytes sent ----

def _traffic(rank, world, window, sinks, doc):
    q, k, v, grad = _inputs(2, torch.float64, 0)
    counts = {}
    for name, masks in (("window", dict(window=window, sinks=sinks, doc=doc)),
                        ("ring", dict(window=SEQ + 1, sinks=0, doc=doc))):  # a window of the whole sequence: the ring
        attention_traffic.reset()
        _split(rank, world, q, k, v, grad, "reference", **masks)
        counts[name] = (attention_traffic.forward_kv, attention_traffic.backward_kv)
    # As a NCCL run places them: every tensor the window path sends is on the inputs' device (documents and
    # sinks across ranks included), none made on the host.
    from longtrain.trainer.parallel import collectives

    with collectives.HostTensorCheck():
        collectives.init_control_group()
        placed = [t.to(torch.device("cpu")) for t in (q, k, v, grad, document_starts(DOCS))]
        _split(rank, world, *placed[:4], "reference", window=3, sinks=3, doc=placed[4])
    return counts


def test_window_sends_the_tails_and_sinks_only():
    """cp=2, chunk 8, window 4 (left 3), 2 sinks, no documents. Rank 0 (chunks 0, 3) sends chunk 0's last 3
    tokens to chunk 1 and chunk 0's first 2 (the sinks) to chunk 2 (chunk 1's reach is 8 - 3 = 5 > 2: also to
    chunk 1); rank 1 (chunks 1, 2) sends chunk 2's last 3 to chunk 3. The backward sends the gradients of what
    a rank received back to its holder, so each rank's backward sends what the other rank's forward sent. The
    ring sends both chunks once in the forward, and in the backward again, with their dK, dV on two hops."""
    world, window, sinks, chunk = 2, 4, 2, SEQ // 4
    token = 2 * 2 * HEAD_DIM * 8  # K and V of one token of one row: 2 kv heads, float64
    results = run_ranks(_traffic, world, args=(window, sinks, None))
    sent = {0: (3 + 2 + 2) * 2 * token, 1: 3 * 2 * token}  # two rows
    ring_forward = 2 * chunk * 2 * token  # (cp - 1) hops of both chunks
    for rank, counts in enumerate(results):
        assert counts["window"] == (sent[rank], sent[1 - rank]), (rank, counts)
        assert counts["ring"] == (ring_forward, ring_forward + 2 * ring_forward), (rank, counts)
        assert sum(counts["window"]) < sum(counts["ring"]) / 4


# ---- a windowed decoder ----

def _decoder(rank, world, window, sinks):
    from longtrain.trainer.config import ModelConfig
    from longtrain.trainer.model.decoder import Decoder

    torch.manual_seed(0)
    model = Decoder(ModelConfig(pattern="AFAF", d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64,
                                attention_window=window, attention_sinks=sinks)).double()
    tokens, logits, pairs = split_decoder_pairs(model, world, rank, dist.group.WORLD, SEQ)
    errors = {}
    for name, split, unsplit in pairs:
        if name == "logits":
            errors[name] = ((split - unsplit).abs().max() / unsplit.abs().max()).item()
        else:
            errors[name] = ((split - unsplit).norm() / unsplit.norm()).item()
    # without the window the same model differs: the test sees the window
    unwindowed = copy.deepcopy(model)
    for module in unwindowed.modules():
        if hasattr(module, "masks"):
            module.masks = {}
    errors["differs without window"] = ((unwindowed(tokens) - logits).abs().max() / logits.abs().max()).item()
    return errors


def _decoders(rank, world, settings):
    return [_decoder(rank, world, window, sinks) for window, sinks in settings]


def test_windowed_decoder_at_cp2_equals_one_process():
    """Window 5 with 2 sinks (chunk 8: fetched tails) and window 13 with 1 sink (the ring with skipped blocks)."""
    from longtrain.trainer.config import recipe_from_dict

    recipe = recipe_from_dict({"model": {"pattern": "AF", "d_model": 32, "n_heads": 4, "n_kv_heads": 2,
                                         "vocab_size": 64, "attention_window": 5, "attention_sinks": 2},
                               "data": {"task": "passkey", "seq_len": 64}, "parallel": {"cp": 2}})
    assert recipe.parallel.cp == 2 and recipe.model.attention_window == 5  # a window under cp is a valid recipe
    for results in run_ranks(_decoders, 2, args=([(5, 2), (13, 1)],)):
        for errors in results:
            assert errors.pop("differs without window") > 1e-3
            for name, error in errors.items():
                # RMSNorm weights take float32 sums over tokens (see test_parallel_context.py)
                assert error < (1e-6 if "norm" in name else TOL), (name, error)


# ---- the training loop ----

def _loop_train(rank, world, run_dir, parallel):
    from longtrain.trainer.config import recipe_from_dict
    from longtrain.trainer.loop import train

    train(recipe_from_dict({
        "name": "ring-window", "run": {"dir": str(run_dir), "seed": 0},
        "model": {"pattern": "AF", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64,
                  "attention_window": 5, "attention_sinks": 2},
        "data": {"task": "passkey", "seq_len": 32},
        "train": {"steps": 3, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_interval": 3,
                  "eval_batches": 1, "log_interval": 1, "sample_tokens": 0},
        "checkpoint": {"interval": 100, "keep_last": 1},
        "parallel": parallel}))


@pytest.mark.slow
def test_loop_with_a_window_under_cp_equals_one_process(tmp_path):
    """`train` with model.attention_window=5 and 2 sinks (chunk 8 at cp=2: the fetched tails): the cp=2 run
    logs the one-process run's losses."""
    import json

    def losses(run_dir):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r] + [r["eval_loss"] for r in records if "eval_loss" in r]

    run_ranks(_loop_train, 1, args=(tmp_path / "one", {}), deepspeed=True)
    run_ranks(_loop_train, 2, args=(tmp_path / "cp", {"cp": 2}), deepspeed=True)
    want, got = losses(tmp_path / "one"), losses(tmp_path / "cp")
    assert len(want) == 5 and len(got) == 5  # 3 steps, eval before the first and after the last
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-5 * abs(w), (got, want)


@pytest.mark.parametrize("masks, words", [
    ({"window": (3, 2)}, ["window must be (left, 0)", "(3, 2)"]),
    ({"window": (3, 0), "sinks": -1}, ["sinks must be an int >= 0", "-1"]),
    ({"window": (3, 0), "shift": 2}, ["takes the masks window and sinks", "shift"]),
])
def test_bad_masks_are_one_line_errors_before_any_exchange(masks, words):
    from longtrain.trainer.errors import LongtrainError

    q = torch.zeros(1, 8, 2, HEAD_DIM)
    with pytest.raises(LongtrainError) as error:
        ring_attention(q, q, q, group=None, **masks)  # no group: raised before any collective
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.slow  # 14-24 s: a subprocess that spawns two more
def test_bench_prints_the_bytes_table():
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "ring_window.py"
    proc = subprocess.run([sys.executable, str(bench), "--seq", "64", "--windows", "8,24", "--sinks", "2", "--heads",
                           "2", "--kv-heads", "1", "--head-dim", "8", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    # chunk 16: window 8 fetches 7 + 2 tokens where the ring sends every block; window 24 is the ring itself
    assert [(r[0], r[1], r[2]) for r in rows] == [("8", "16", "fetch"), ("24", "16", "ring")]
    assert float(rows[0][5]) < 0.5 and float(rows[1][5]) == 1.0
