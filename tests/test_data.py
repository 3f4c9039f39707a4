"""Tokenizer round trip, shard preparation, and the loader's determinism and resume."""
import numpy as np
import pytest
import torch

from longtrain.trainer.config import recipe_from_dict
from longtrain.trainer.data.corpus import iter_documents, resolve_sources
from longtrain.trainer.data.loader import DataLoader, PackedDataset, eval_batches
from longtrain.trainer.data.shards import prepare
from longtrain.trainer.errors import LongtrainError

CODE = 'def f(x):\n    """Doc."""\n\treturn {"a": x}  # trailing  spaces   \n\n\nclass A:\n    pass\n'


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    cfg = recipe_from_dict({"data": {"max_bytes": 300_000, "seq_len": 16, "tokenizer": {"vocab_size": 512}},
                            "model": {"vocab_size": 512}}).data
    return prepare(cfg, tmp_path_factory.mktemp("data"), seed=0)


def test_tokenizer_round_trip_keeps_code_exact(shards):
    tok = shards.tokenizer
    for text in [CODE, "héllo wörld ✓ 你好", "  leading and trailing  ", "x\r\ny"]:
        assert tok.decode(tok.encode(text)) == text


def test_shards_hold_documents_with_eos_boundaries(shards):
    train = shards.splits["train"]
    starts = shards.doc_starts["train"]
    assert starts[0] == 0 and np.all(np.diff(starts) > 0)
    # every document ends with EOS right before the next one starts
    assert np.all(train[starts[1:] - 1] == shards.tokenizer.eos_id)
    assert shards.meta["tokens"]["train"] == len(train) and len(shards.splits["eval"]) > 16


def test_prepare_is_deterministic_and_cached(shards, tmp_path):
    cfg = recipe_from_dict({"data": {"max_bytes": 300_000, "seq_len": 16, "tokenizer": {"vocab_size": 512}},
                            "model": {"vocab_size": 512}}).data
    again = prepare(cfg, tmp_path, seed=0)
    assert np.array_equal(np.asarray(again.splits["train"]), np.asarray(shards.splits["train"]))
    assert again.tokenizer.path.read_bytes() == shards.tokenizer.path.read_bytes()
    mtime = (tmp_path / "train.bin").stat().st_mtime_ns
    prepare(cfg, tmp_path, seed=0)
    assert (tmp_path / "train.bin").stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_samples_are_shifted_targets(shards):
    ds = PackedDataset(shards.splits["train"], 16)
    loader = DataLoader(ds, micro_batch_size=3, seed=1)
    (inputs, targets), = loader.next_step()
    assert inputs.shape == targets.shape == (3, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_loader_order_is_fixed_by_seed_and_resumes_anywhere(shards):
    ds = PackedDataset(shards.splits["train"], 16)
    full = DataLoader(ds, micro_batch_size=2, grad_accum=2, seed=5)
    steps = [full.next_step() for _ in range(6)]
    other_seed = DataLoader(ds, micro_batch_size=2, grad_accum=2, seed=6).next_step()
    assert not torch.equal(steps[0][0][0], other_seed[0][0])
    resumed = DataLoader(ds, micro_batch_size=2, grad_accum=2, seed=5)
    resumed.load_state_dict({"consumed_samples": 4 * 3})
    for expected in steps[3:]:
        for (a, b), (c, d) in zip(expected, resumed.next_step()):
            assert torch.equal(a, c) and torch.equal(b, d)


def test_data_parallel_ranks_split_the_same_global_batch(shards):
    ds = PackedDataset(shards.splits["train"], 16)
    single = DataLoader(ds, micro_batch_size=4, grad_accum=1, seed=2)
    ranks = [DataLoader(ds, micro_batch_size=2, grad_accum=1, dp_rank=r, dp_size=2, seed=2) for r in range(2)]
    for _ in range(3):
        whole = single.next_step()[0][0]
        parts = torch.cat([loader.next_step()[0][0] for loader in ranks])
        assert torch.equal(whole, parts)


def test_resume_under_another_dp_continues_at_the_same_global_sample(shards):
    """Saved at dp=2 (micro-batch 2, accumulation 2), resumed at dp=1 (accumulation 4): the next steps
    cover exactly the sequences the dp=2 run would have taken, none repeated or skipped."""
    ds = PackedDataset(shards.splits["train"], 16)
    ranks = [DataLoader(ds, micro_batch_size=2, grad_accum=2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for _ in range(3):
        for loader in ranks:
            loader.next_step()
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict() == {"consumed_samples": 3 * 8}
    resumed = DataLoader(ds, micro_batch_size=2, grad_accum=4, dp_rank=0, dp_size=1, seed=3)
    resumed.load_state_dict(state)
    for _ in range(2):
        want = sorted(tuple(row.tolist()) for loader in ranks for x, _ in loader.next_step() for row in x)
        got = sorted(tuple(row.tolist()) for x, _ in resumed.next_step() for row in x)
        assert got == want and len(got) == 8
    assert resumed.consumed_samples == ranks[0].consumed_samples == 5 * 8


def test_order_crosses_epochs(shards):
    ds = PackedDataset(shards.splits["train"], 16)
    loader = DataLoader(ds, micro_batch_size=1, seed=0)
    n = len(ds)
    first_epoch = sorted(loader.order[p] for p in range(n))
    second_epoch = [loader.order[p] for p in range(n, 2 * n)]
    assert first_epoch == list(range(n)) and sorted(second_epoch) == list(range(n))
    assert second_epoch != [loader.order[p] for p in range(n)]


def test_eval_batches_are_fixed_and_spread(shards):
    ds = PackedDataset(shards.splits["eval"], 16)
    a = [x for x, _ in eval_batches(ds, 2, 3)]
    b = [x for x, _ in eval_batches(ds, 2, 3)]
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_corpus_inputs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha")
    (tmp_path / "b.jsonl").write_text('{"text": "beta"}\n\n{"text": "gamma"}\n')
    files = resolve_sources([str(tmp_path / "docs"), str(tmp_path / "b.jsonl")])
    assert list(iter_documents(files)) == ["alpha", "beta", "gamma"]
    with pytest.raises(LongtrainError, match="does not exist"):
        resolve_sources([str(tmp_path / "nope")])
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(LongtrainError, match="bad.jsonl:1: no field 'text'"):
        list(iter_documents(resolve_sources([str(tmp_path / "bad.jsonl")])))
    assert len(resolve_sources(["stdlib"])) > 100
