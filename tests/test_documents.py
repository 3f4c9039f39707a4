"""Document-aware packing: no token of a packed sequence sees another document, through any block,
in one process and under context parallelism; each document computes what it computes alone; concat
packing is the token stream as before."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longtrain.trainer.config import ModelConfig, load_recipe, packing, recipe_from_dict
from longtrain.trainer.data.loader import DataLoader, PackedDataset, eval_batches
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.model.decoder import Decoder
from longtrain.trainer.model.layers import Linears, rotary_tables
from longtrain.trainer.parallel.context import apply_context_parallel, zigzag_split

from parallel_harness import run_ranks

SEQ = 16
# Document starts per row. At cp=2 the zigzag chunks are [0, 4), [4, 8), [8, 12), [12, 16): rank 0 holds
# chunks 0 and 3, rank 1 chunks 1 and 2. Row 0: a document across two chunks (5..8), one starting inside a
# chunk (9), one on a chunk's first token (12). Row 1: documents starting on a chunk's last token (3, 7)
# and one (7..13) that runs from rank 1 into rank 0. Chunk 3's queries all start after chunk 0 in both
# rows: ring attention skips that block pair.
STARTS = [[0, 5, 9, 12], [0, 3, 7, 14]]
PATTERNS = ["A", "M", "O", "F", "AMOF"]


def positions_of(starts, seq=SEQ):
    """(batch, seq) int64 in-document positions (Hugging Face's position_ids convention for packing)."""
    rows = []
    for row in starts:
        bounds = row + [seq]
        rows.append(torch.cat([torch.arange(end - first) for first, end in zip(bounds, bounds[1:])]))
    return torch.stack(rows)


def documents(starts=STARTS, seq=SEQ):
    """(row, first, end) of every document."""
    return [(b, first, end) for b, row in enumerate(starts) for first, end in zip(row, row[1:] + [seq])]


def make_decoder(pattern, dtype=torch.float32, backend="auto", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(pattern=pattern, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64, d_state=8,
                      ode={"solver": "rk4", "steps": 2, "sublayer": "attention_mlp"})
    return Decoder(cfg, Linears(init_std=0.2), attention_backend=backend, scan_backend=backend).to(dtype)


def hidden_of_embeddings(model, x, positions):
    """The decoder's final hidden states from input embeddings x (batch, seq, d_model)."""
    return model.norm(model.run_blocks(x, positions))


# ---- one process ----

@pytest.mark.parametrize("pattern", PATTERNS)
def test_one_documents_loss_has_exactly_zero_gradient_to_other_documents(pattern):
    model = make_decoder(pattern)
    tokens = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(2))
    positions = positions_of(STARTS)
    for b, first, end in documents():
        x = model.embed(tokens).detach().requires_grad_()
        logits = model.logits(hidden_of_embeddings(model, x, positions))
        F.cross_entropy(logits[b, first:end], targets[b, first:end]).backward()
        mine = torch.zeros(2, SEQ, dtype=torch.bool)
        mine[b, first:end] = True
        assert not x.grad[~mine].any(), (pattern, b, first)  # exactly zero, every other document and row
        assert (x.grad[b, end - 1].abs().sum() > 0)  # the oracle can fail: the document's own tokens count
        if pattern != "F" and end - first > 1:
            assert x.grad[b, first].abs().sum() > 0  # its first token reaches its later ones


@pytest.mark.parametrize("dtype,backend,rtol", [(torch.float64, "reference", 1e-12), (torch.float32, "csrc", 1e-6)])
def test_per_document_losses_equal_each_document_alone(dtype, backend, rtol):
    model = make_decoder("AMOF", dtype, backend)
    tokens = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(4))
    positions = positions_of(STARTS)
    with torch.no_grad():
        packed = model(tokens, positions=positions)
        concat = model(tokens)
        for b, first, end in documents():
            alone = model(tokens[b:b + 1, first:end])[0]
            want = F.cross_entropy(alone, targets[b, first:end])
            got = F.cross_entropy(packed[b, first:end], targets[b, first:end])
            assert abs(got.item() - want.item()) <= rtol * abs(want.item()), (b, first, got.item(), want.item())
            if first > 0:  # without positions the document sees its predecessors: the check can tell
                assert (concat[b, first:end] - alone).abs().max() > 1e-4
        # the packed mean loss, through the decoder's fused loss path, is the token-weighted mean of the documents'
        fused = model(tokens, targets, positions)
        torch.testing.assert_close(fused, F.cross_entropy(packed.flatten(0, 1), targets.flatten()),
                                   rtol=rtol, atol=0)


def test_one_document_per_row_attention_matches_no_positions():
    """Positions 0..seq-1 (one document per row) give the unmasked model's outputs."""
    model = make_decoder("AMOF", torch.float64, "reference")
    tokens = torch.randint(0, 64, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, positions=torch.arange(SEQ).expand(2, SEQ)), model(tokens),
                                   rtol=1e-12, atol=1e-12)


def test_rotary_tables_per_row_positions_equal_each_row():
    positions = positions_of(STARTS)
    cos, sin = rotary_tables(SEQ, 8, 10000.0, positions=positions)
    assert cos.shape == (2, SEQ, 4)
    for b in range(2):
        want_cos, want_sin = rotary_tables(SEQ, 8, 10000.0, positions=positions[b])
        assert torch.equal(cos[b], want_cos) and torch.equal(sin[b], want_sin)


def test_without_positions_the_decoder_calls_its_blocks_as_before():
    """The concat path (no positions) is the plain chain of block(x) calls, bitwise."""
    model = make_decoder("AMOF")
    tokens = torch.randint(0, 64, (2, SEQ))
    x = model.embed(tokens)
    for block in model.blocks:
        x = block(x)
    assert torch.equal(model(tokens), model.logits(model.norm(x)))


# ---- the loader ----

def _stream(lengths, seed=0):
    tokens = np.random.default_rng(seed).integers(1, 1000, sum(lengths)).astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return tokens, starts


def test_loader_positions_follow_the_shards_document_starts():
    lengths = [5, 1, 9, 3, 20, 2, 7, 30]
    tokens, starts = _stream(lengths)
    seq = 8
    dataset = PackedDataset(tokens, seq, starts)
    for index in range(len(dataset)):
        want = []
        for offset in range(index * seq, index * seq + seq):
            start = max([s for s in starts if s <= offset] + [index * seq])  # restarts at the sequence start too
            want.append(offset - start)
        assert dataset.positions(index).tolist() == want
    loader = DataLoader(dataset, micro_batch_size=2, grad_accum=2, seed=1)
    for inputs, targets, positions in loader.next_step():
        assert positions.shape == inputs.shape and positions.dtype == torch.int64
        assert (positions[:, 0] == 0).all()
    for batch in eval_batches(dataset, 2, 2):
        assert len(batch) == 3
    # a split that opens inside a document (the held-out tail), even with no document start at all
    tail = PackedDataset(tokens[3:19], seq, starts[(starts >= 3) & (starts < 19)] - 3)
    # starts 5, 6, 15, 18 of the stream are 2, 3, 12, 15 of the tail
    assert tail.positions(0).tolist() == [0, 1, 0, 0, 1, 2, 3, 4] and tail.positions(1).tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert PackedDataset(tokens[:17], seq, np.zeros(0, dtype=np.int64)).positions(1).tolist() == list(range(8))


def test_concat_packing_yields_the_raw_token_stream():
    tokens, starts = _stream([11, 40, 17, 50])
    dataset = PackedDataset(tokens, 8)  # concat: no document starts
    loader = DataLoader(dataset, micro_batch_size=2, grad_accum=2, seed=5)
    order = loader.order
    for j, batch in enumerate(loader.next_step()):
        assert len(batch) == 2
        inputs, targets = batch
        for row, index in enumerate(order[p] for p in range(2 * j, 2 * j + 2)):
            raw = torch.from_numpy(tokens[index * 8:index * 8 + 9].astype(np.int64))
            assert torch.equal(inputs[row], raw[:-1]) and torch.equal(targets[row], raw[1:])


# ---- the recipe ----

def test_packing_defaults_and_bad_values(tmp_path):
    base = {"model": {"pattern": "AMOF"}}
    assert packing(recipe_from_dict(base)) == "documents"
    assert packing(recipe_from_dict({**base, "data": {"packing": "concat"}})) == "concat"
    assert packing(recipe_from_dict({**base, "data": {"task": "passkey"}})) == "task"
    assert packing(recipe_from_dict({**base, "parallel": {"pp": 2}})) == "concat"
    with pytest.raises(LongtrainError) as error:
        load_recipe(None, ["data.packing=bogus"])
    assert "data.packing" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(LongtrainError) as error:
        load_recipe(None, ["data.packing=documents", "parallel.pp=2"])
    assert "data.packing" in str(error.value) and "\n" not in str(error.value)


# ---- context parallelism ----

def _context_parallel(rank, world):
    group = dist.group.WORLD
    model = make_decoder("AMOF")
    split_model = apply_context_parallel(copy.deepcopy(model), group)
    tokens = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(6))
    weights = torch.randn(2, SEQ, 32, generator=torch.Generator().manual_seed(7))
    positions = positions_of(STARTS)
    local_positions = zigzag_split(positions, world, rank)
    errors = {}
    # 1. outputs and input gradients against the one-process packed model
    full_x = model.embed(tokens).detach().requires_grad_()
    out = hidden_of_embeddings(model, full_x, positions)
    (out * weights).sum().backward()
    local_x = zigzag_split(full_x.detach(), world, rank).requires_grad_()
    local_out = hidden_of_embeddings(split_model, local_x, local_positions)
    (local_out * zigzag_split(weights, world, rank)).sum().backward()
    # relative to the largest entry (the outputs are RMS-normed, the gradients pass eight sublayers)
    want_out, want_dx = zigzag_split(out, world, rank), zigzag_split(full_x.grad, world, rank)
    errors["out"] = ((local_out - want_out).abs().max() / want_out.abs().max()).item()
    errors["dx"] = ((local_x.grad - want_dx).abs().max() / want_dx.abs().max()).item()
    # 2. each document's output against every input embedding, on both ranks
    isolation = []
    for b, first, end in documents():
        mine = torch.zeros(2, SEQ, dtype=torch.bool)
        mine[b, first:end] = True
        local_mine = zigzag_split(mine, world, rank)
        local_x = zigzag_split(full_x.detach(), world, rank).requires_grad_()
        local_out = hidden_of_embeddings(split_model, local_x, local_positions)
        (local_out * local_mine[..., None]).square().sum().backward()
        isolation.append((local_x.grad[~local_mine], local_x.grad[local_mine]))
    return errors, isolation


def test_context_parallel_documents_are_isolated_and_equal_one_process():
    results = run_ranks(_context_parallel, 2)
    for errors, _ in results:
        for name, error in errors.items():
            assert error < 1e-5, (name, error)
    for d, (b, first, end) in enumerate(documents()):
        others = torch.cat([r[1][d][0] for r in results])
        own = torch.cat([r[1][d][1] for r in results])
        assert others.shape[0] == 2 * SEQ - (end - first) and own.shape[0] == end - first
        assert not others.any(), (b, first)  # exactly zero, across ranks too
        assert own.abs().sum() > 0


def test_bench_prints_the_ratio_table(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_documents", Path(__file__).parents[1] / "bench" / "documents.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--patterns", "AF,M", "--seq-len", "64", "--doc-len", "16", "--d-model", "32", "--vocab", "64",
                       "--repeats", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["AF", "M"]
    assert all(float(row.split()[-1]) > 0 for row in rows)


# ---- the training loop ----

def _loop_recipe(run_dir, corpus, **parallel):
    return recipe_from_dict({
        "name": "documents", "run": {"dir": str(run_dir), "seed": 0},
        "model": {"pattern": "AMOF", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "d_state": 4,
                  "ode": {"solver": "rk4", "steps": 1, "sublayer": "attention_mlp"}},
        "data": {"corpus": [str(corpus)], "seq_len": 32, "tokenizer": {"vocab_size": 512}},
        "train": {"steps": 3, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_interval": 3,
                  "eval_batches": 1, "log_interval": 1, "sample_tokens": 0},
        "checkpoint": {"interval": 100, "keep_last": 1},
        "parallel": parallel})


def _loop_train(rank, world, run_dir, corpus, parallel):
    from longtrain.trainer.loop import train

    train(_loop_recipe(run_dir, corpus, **parallel))


def _loop_losses(run_dir):
    import json
    from pathlib import Path

    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r] + [r["eval_loss"] for r in records if "eval_loss" in r]


@pytest.mark.slow
def test_loop_with_documents_under_cp_equals_one_process(tmp_path):
    """`train` on short documents (several per sequence): the cp=2 run logs the one-process run's losses."""
    import json

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "kappa", "theta", "lambda", "zeta"]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 12)))}) + "\n"
                              for _ in range(3000)))
    run_ranks(_loop_train, 1, args=(tmp_path / "one", corpus, {}), deepspeed=True)
    run_ranks(_loop_train, 2, args=(tmp_path / "cp", corpus, {"cp": 2}), deepspeed=True)
    want, got = _loop_losses(tmp_path / "one"), _loop_losses(tmp_path / "cp")
    assert len(want) == 5 and len(got) == 5  # 3 steps, eval before the first and after the last
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-5 * abs(w), (got, want)
