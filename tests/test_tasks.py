"""Synthetic tasks: samples are pure functions of (seed, split, index), masks cover the answers only,
and the seeded loader resumes over them exactly."""
import numpy as np
import pytest
import torch

from longtrain.trainer.config import DataConfig, load_recipe, recipe_from_dict
from longtrain.trainer.data.tasks import IGNORE, MQAR, TaskDataset, TaskLoader, first_question, make_task
from longtrain.trainer.errors import LongtrainError
from tests.conftest import REPO, assert_recipe_refused


def passkey_set(seq_len=64, split="train", **passkey):
    return TaskDataset(make_task(DataConfig(task="passkey", seq_len=seq_len, passkey=passkey)), seq_len, split, seed=3)


@pytest.mark.parametrize("seq_len", [20, 64, 257])
def test_passkey_layout(seq_len):
    data = passkey_set(seq_len)
    vocab = data.task.vocab
    for index in range(20):
        tokens, answer = data.sample(index)
        assert tokens.shape == (seq_len + 1,) and answer.shape == (seq_len,)
        text = vocab.decode(tokens).split()
        key = text[text.index("<key>") + 1:text.index("</key>")]
        assert text[0] == "<bos>" and text[-6] == "<query>" and text[-5:] == key and len(key) == 5
        assert np.array_equal(answer.nonzero()[0], np.arange(seq_len - 5, seq_len))


def test_samples_are_deterministic_and_splits_differ():
    train, held_out = passkey_set(), passkey_set(split="eval")
    assert np.array_equal(train.get(7), passkey_set().get(7))
    assert not np.array_equal(train.get(7), train.get(8))
    assert not np.array_equal(train.get(7), held_out.get(7))


def test_depth_places_the_key():
    task = make_task(DataConfig(task="passkey", seq_len=100))
    first = TaskDataset(task, 100, "eval", 0, depth=0.0).sample(0)[0]
    last = TaskDataset(task, 100, "eval", 0, depth=1.0).sample(0)[0]
    key_id = task.vocab.ids["<key>"]
    assert list(first).index(key_id) == 1 and list(last).index(key_id) > 85


def test_loss_mask_answer_or_full():
    inputs, targets = passkey_set(loss="answer").collate([0, 1])
    assert inputs.shape == targets.shape == (2, 64)
    assert ((targets != IGNORE).sum(1) == 5).all()
    _, full = passkey_set(loss="full").collate([0, 1])
    assert (full != IGNORE).all()
    _, answer_only = passkey_set(loss="full").collate([0, 1], answer_only=True)
    assert torch.equal(answer_only, targets)


def test_mqar_targets_are_the_values_of_queried_keys():
    cfg = DataConfig(task="mqar", seq_len=128, mqar={"pairs": 6, "keys": 20, "values": 20})
    data = TaskDataset(make_task(cfg), 128, "train", 0)
    for index in range(10):
        tokens, answer = data.sample(index)
        pairs = dict(zip(tokens[0:12:2].tolist(), tokens[1:12:2].tolist()))
        assert len(pairs) == 6
        queries = answer.nonzero()[0]
        assert len(queries) == 6 and (queries >= 12).all()
        assert sorted(tokens[queries].tolist()) == sorted(pairs)
        for q in queries:
            assert tokens[q + 1] == pairs[tokens[q]]
    # Batches carry the values as targets only: the input holds <pad> there.
    inputs, targets = data.collate(range(4))
    for row in range(4):
        tokens, answer = data.sample(row)
        queries = answer.nonzero()[0]
        assert (targets[row][queries] == torch.from_numpy(tokens[queries + 1])).all()
        assert (targets[row][~torch.from_numpy(answer)] == IGNORE).all()
        assert (inputs[row][queries + 1] == 0).all() and (inputs[row][queries] == torch.from_numpy(tokens[queries])).all()
        others = np.setdiff1d(np.arange(128), queries + 1)
        assert (inputs[row][others] == torch.from_numpy(tokens[others])).all()
    with pytest.raises(LongtrainError, match="data.mqar.pairs"):
        MQAR(cfg.mqar.model_copy(update={"pairs": 30}))


def test_first_question():
    data = passkey_set(48)
    prompt, answer = first_question(data, 2)
    tokens, _ = data.sample(2)
    assert prompt + answer == tokens.tolist() and len(answer) == 5


def test_loader_resumes_exactly():
    data = passkey_set(32)
    loader = TaskLoader(data, micro_batch_size=4, grad_accum=2, seed=1)
    steps = [loader.next_step() for _ in range(3)]
    resumed = TaskLoader(data, micro_batch_size=4, grad_accum=2, seed=1)
    resumed.load_state_dict({"consumed_samples": 8})
    for (x, y), (rx, ry) in zip(steps[1], resumed.next_step()):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_recipe_validation():
    recipe = load_recipe(REPO / "recipes" / "passkey.yaml")
    assert recipe.data.task == "passkey" and make_task(recipe.data).vocab.size <= recipe.model.vocab_size
    with pytest.raises(LongtrainError, match="data.passkey.loss"):
        recipe_from_dict({"data": {"task": "passkey", "passkey": {"loss": "all"}}, "model": {"vocab_size": 32}})
    with pytest.raises(LongtrainError, match="too short"):
        TaskDataset(make_task(DataConfig(task="passkey")), 10, "train", 0)


def test_task_lengths_pack_independent_samples_as_documents():
    """data.task_lengths: sequence i takes lengths[i % 2]; a short length packs seq_len / length samples, each
    equal to the sample drawn alone, with targets that never cross into the next sample and positions that
    restart at 0 in each."""
    task = make_task(DataConfig(task="passkey", seq_len=64))
    data = TaskDataset(task, 64, "train", seed=3, lengths=[16, 64])
    inputs, targets, positions = data.collate([0, 1])
    assert inputs.shape == targets.shape == positions.shape == (2, 64)
    assert torch.equal(positions[0], torch.arange(16).repeat(4)) and torch.equal(positions[1], torch.arange(64))
    for part in range(4):  # row 0: four samples of 16, each drawn by its own seed
        tokens, answer = task.make(np.random.default_rng([3, 0, 0, 16, part]), 16)
        window = slice(16 * part, 16 * part + 16)
        assert torch.equal(inputs[0, window], torch.from_numpy(tokens[:-1]))
        want = torch.full((16,), IGNORE, dtype=torch.int64)
        want[torch.from_numpy(answer)] = torch.from_numpy(tokens[1:])[torch.from_numpy(answer)]
        assert torch.equal(targets[0, window], want)
    # row 1 is sample 1 at full length, as without task_lengths
    plain_inputs, plain_targets = passkey_set(64).collate([1])
    assert torch.equal(inputs[1], plain_inputs[0]) and torch.equal(targets[1], plain_targets[0])


@pytest.mark.parametrize("data, parallel, words", [
    ({"task": "passkey", "seq_len": 64, "task_lengths": [24, 64]}, {}, ["data.task_lengths=[24, 64]", "divide"]),
    ({"task": "text", "seq_len": 64, "task_lengths": [32]}, {}, ["data.task_lengths=[32]", "synthetic"]),
    ({"task": "passkey", "seq_len": 64, "task_lengths": [32, 64]}, {"pp": 2}, ["data.task_lengths", "parallel.pp"]),
])
def test_bad_task_lengths_are_one_line_errors(data, parallel, words):
    raw = {"model": {"pattern": "AFAF", "vocab_size": 4096, "d_model": 32, "n_heads": 2}, "data": data,
           "parallel": parallel, "train": {"micro_batch_size": 2}}
    assert_recipe_refused(raw, words)


def test_a_length_below_the_task_minimum_is_refused():
    task = make_task(DataConfig(task="passkey", seq_len=64))
    with pytest.raises(LongtrainError, match="data.task_lengths length 8"):
        TaskDataset(task, 64, "train", seed=0, lengths=[8, 64])
