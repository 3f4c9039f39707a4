"""Streaming with attention sinks (StreamingLLM, Xiao et al. 2023): a constant-memory cache of the first
`sinks` and the last `window` tokens per attention block, positions by place in the cache; and
`longtrain eval --task streaming`."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from longtrain.launch.cli import main
from longtrain.trainer.config import ModelConfig, recipe_from_dict
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.eval import evaluate, streaming_cache
from longtrain.trainer.generate import forward_with_state, new_state, stream_losses
from longtrain.trainer.model.decoder import Decoder
from tests.conftest import run_cli, tiny_recipe, write_recipe

VOCAB = 50


def tiny_model(pattern="AMOF", **fields) -> Decoder:
    torch.manual_seed(0)
    fields = {"ode": {"solver": "rk4", "steps": 2}, **fields}
    cfg = ModelConfig(pattern=pattern, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, d_state=4, **fields)
    return Decoder(cfg).eval()


def tokens(batch, seq, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq + 1), generator=generator)


@pytest.mark.parametrize("pattern", ["AMOF", "MAFA"])
def test_no_eviction_equals_the_full_forward(pattern):
    """A cache at least as long as the stream evicts nothing: the model's normal forward, token by token."""
    model = tiny_model(pattern)
    ids = tokens(2, 16)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        expected = F.cross_entropy(model(inputs).transpose(1, 2), targets, reduction="none").double()
    for sinks, window, prefill in [(4, 12, False), (0, 20, False), (2, 14, True)]:
        got = stream_losses(model, inputs, targets, sinks, window, prefill=prefill)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fields,sinks,window", [({}, 3, 5), ({}, 0, 6), ({}, 2, 1),
                                                  ({"attention_window": 5, "attention_sinks": 3}, 3, 5)])
def test_eviction_equals_a_forward_over_the_kept_tokens(fields, sinks, window):
    """One attention block (its keys and values depend on each token alone), so step t of the stream is the
    plain forward over the explicit list [first `sinks` tokens, last `window` tokens up to t] at positions
    0..n-1: the last logits agree."""
    model = tiny_model("AF", **fields)
    ids = tokens(2, 14)[:, :-1]
    states = new_state(model, sinks, window)
    evicted = False
    for t in range(ids.shape[1]):
        streamed = forward_with_state(model, ids[:, t:t + 1], states)[:, -1]
        kept = list(range(sinks)) + list(range(max(sinks, t - window + 1), t + 1)) if t >= sinks + window else \
            list(range(t + 1))
        evicted |= len(kept) < t + 1
        with torch.no_grad():
            expected = model(ids[:, kept])[:, -1]
        torch.testing.assert_close(streamed, expected, rtol=0, atol=1e-5)
    assert evicted


def test_chunked_prefill_equals_token_by_token_and_evicts():
    model = tiny_model("AMOF")
    ids = tokens(2, 20)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    chunked = stream_losses(model, inputs, targets, 2, 10, prefill=True)
    alone = stream_losses(model, inputs, targets, 2, 10, prefill=False)
    torch.testing.assert_close(chunked, alone, rtol=0, atol=1e-6)
    with torch.no_grad():
        full = F.cross_entropy(model(inputs).transpose(1, 2), targets, reduction="none").double()
    assert (chunked[:, 12:] - full[:, 12:]).abs().max() > 1e-3  # past the cache, the stream differs: it evicts
    torch.testing.assert_close(chunked[:, :12], full[:, :12], rtol=0, atol=1e-5)


def test_cache_memory_is_constant():
    sinks, window = 3, 7
    model = tiny_model("AMOF")
    states = new_state(model, sinks, window)
    ids = tokens(2, 16)
    shapes = []
    for t in range(ids.shape[1]):
        forward_with_state(model, ids[:, t:t + 1], states)
        shapes.append([(key, tuple(value.shape)) for state in states for key, value in sorted(state.items())
                       if isinstance(value, torch.Tensor)])
    budget = sinks + window
    assert shapes[budget - 1] == shapes[-1]  # nothing grows after sinks + window tokens
    assert all(shapes[t] == shapes[-1] for t in range(budget - 1, len(shapes)))
    attention = dict(shapes[-1])  # the attention block's cache: sinks + window tokens
    assert attention["k"] == attention["v"] == (2, budget, 2, 8)
    assert shapes[budget - 2] != shapes[-1]  # ...and it did grow until then


def test_streaming_refuses_bad_caches_and_history_blocks():
    model = tiny_model("AF")
    with pytest.raises(ValueError, match="sinks=-1"):
        new_state(model, -1, 4)
    with pytest.raises(ValueError, match="window=0"):
        new_state(model, 2, 0)
    states = new_state(model, 1, 3)
    forward_with_state(model, tokens(1, 3)[:, :3], states)
    with pytest.raises(ValueError, match="one token per call"):
        forward_with_state(model, tokens(1, 2)[:, :2], states)
    with pytest.raises(ValueError, match="O block"):
        new_state(tiny_model("AO", ode={"solver": "rk4", "steps": 2, "sublayer": "attention_mlp"}), 1, 3)


def test_streaming_cache_defaults():
    recipe = recipe_from_dict({"model": {"pattern": "AF", "d_model": 32, "n_heads": 2, "n_kv_heads": 1,
                                         "vocab_size": 64}, "data": {"seq_len": 64, "tokenizer": {"vocab_size": 64}}})
    assert streaming_cache(recipe) == (4, 60)
    assert streaming_cache(recipe, sinks=0) == (0, 64)
    assert streaming_cache(recipe, window=10) == (4, 10)
    windowed = recipe.model_copy(update={"model": recipe.model.model_copy(update={"attention_window": 16,
                                                                                   "attention_sinks": 2})})
    assert streaming_cache(windowed) == (2, 16)
    with pytest.raises(LongtrainError, match="--sinks 64 leaves no window"):
        streaming_cache(recipe, sinks=64)
    with pytest.raises(LongtrainError, match="--window 0"):
        streaming_cache(recipe, window=0)


def test_streaming_needs_a_text_run(tmp_path):
    recipe = recipe_from_dict({"model": {"pattern": "AF", "d_model": 32, "n_heads": 2, "n_kv_heads": 1,
                                         "vocab_size": 21},
                               "data": {"task": "mqar", "seq_len": 32, "mqar": {"pairs": 4, "keys": 10, "values": 10}}})
    with pytest.raises(LongtrainError, match="--task streaming needs a text run.*data.task=mqar"):
        evaluate(Decoder(recipe.model).eval(), recipe, tmp_path, "streaming", [32])


@pytest.mark.parametrize("argv,message", [(["--task", "streaming", "--sinks", "-1"], "--sinks -1: must be >= 0"),
                                          (["--task", "streaming", "--window", "0"], "--window 0: must be >= 1"),
                                          (["--window", "8"], "--window / --sinks set the cache of --task streaming")])
def test_cli_bad_cache_options(tmp_path, capsys, argv, message):
    # Refused before the checkpoint is looked for: the path does not exist.
    assert main(["eval", str(tmp_path / "nowhere"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    recipe = tiny_recipe(root / "run", model={"pattern": "AMF"},
                         train={"steps": 4, "eval_interval": 4, "sample_tokens": 2},
                         checkpoint={"interval": 4, "keep_last": 1})
    run_cli("train", write_recipe(root / "text.yaml", recipe), check=True)
    return root / "run"


def test_cli_streaming_end_to_end(text_run, capsys):
    assert main(["eval", str(text_run), "--task", "streaming", "--lengths", "1x,2x", "--samples", "4",
                 "--batch-size", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "with sinks" in out and "window only" in out and "(   2x)" in out
    results = json.loads((text_run / "eval" / "streaming.json").read_text())
    assert (results["task"], results["sinks"], results["window"], results["cache_tokens"]) == ("streaming", 4, 28, 32)
    assert list(results["lengths"]) == ["32", "64"]
    full = results["full_attention"]
    assert full["length"] == 32 and full["tokens"] == 4 * 32
    # At the training length the cache holds the whole text: both streams are the full forward, same texts.
    for name in ("with_sinks", "window_only", "full_attention"):
        assert math.isclose(results["lengths"]["32"][name]["loss"], full["loss"], rel_tol=0, abs_tol=1e-5)
        entry = results["lengths"]["64"][name]
        assert entry["tokens"] == 4 * 64 and math.isfinite(entry["loss"])
        assert math.isclose(entry["perplexity"], math.exp(entry["loss"]), rel_tol=1e-12)
    long = results["lengths"]["64"]
    assert len({long["with_sinks"]["loss"], long["window_only"]["loss"], long["full_attention"]["loss"]}) == 3
    # The 2x streams begin with the 1x ones (the same held-out draws, cut): their first half is the 1x entry.
    curve = long["with_sinks"]["loss_by_position"]
    assert math.isclose(sum(curve["loss"][:len(curve["loss"]) // 2]) / (len(curve["loss"]) // 2), full["loss"],
                        rel_tol=1e-9)
    assert (text_run / "eval" / "streaming.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", str(text_run), "--task", "streaming", "--lengths", "64", "--samples", "2", "--batch-size", "2",
                 "--sinks", "0", "--window", "8", "--out", str(text_run / "eval-small")]) == 0
    small = json.loads((text_run / "eval-small" / "streaming.json").read_text())
    assert (small["sinks"], small["window"], small["lengths"]["64"]["window_only"]["tokens"]) == (0, 8, 2 * 64)
    # no sinks: both streams keep the last 8 tokens, the same cache
    assert small["lengths"]["64"]["with_sinks"]["loss"] == small["lengths"]["64"]["window_only"]["loss"]
