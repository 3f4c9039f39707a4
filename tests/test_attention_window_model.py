"""model.attention_window and model.attention_sinks: what each query of the model can see.

The oracle is dependence itself: the output at position t must not move with the input at any position
the window hides (t - s >= window, s >= sinks), and must move with every position it shows; a window as
long as the sequence is full causal attention; cached decoding equals the whole forward.
"""
import pytest
import torch

from longtrain.trainer.config import ModelConfig, recipe_from_dict
from longtrain.trainer.model.attention import Attention
from longtrain.trainer.model.layers import Linears

SEQ = 40


def _attention(window=None, sinks=0, backend="csrc", seed=0):
    cfg = ModelConfig(pattern="A", d_model=32, n_heads=4, n_kv_heads=2, attention_window=window, attention_sinks=sinks)
    torch.manual_seed(seed)
    return Attention(cfg, Linears(cfg.init_std), backend)


@pytest.mark.parametrize("backend", ["csrc", "reference", "torch"])
@pytest.mark.parametrize("window, sinks", [(8, 0), (8, 3), (1, 2)])
def test_a_query_depends_on_its_window_and_sinks_only(backend, window, sinks):
    module = _attention(window, sinks, backend).double() if backend == "reference" else _attention(window, sinks, backend)
    dtype = torch.float64 if backend == "reference" else torch.float32
    x = torch.randn(1, SEQ, 32, dtype=dtype, requires_grad=True)
    for t in (0, 5, window + sinks + 4, SEQ - 1):
        (grad,) = torch.autograd.grad(module(x)[0, t].sum(), x)
        moved = grad[0].abs().sum(-1) > 0
        for s in range(SEQ):
            visible = s <= t and (t - s < window or s < sinks)
            assert bool(moved[s]) == visible, (backend, window, sinks, t, s)


def test_a_window_as_long_as_the_sequence_is_full_causal_attention():
    x = torch.randn(2, SEQ, 32)
    full, windowed = _attention(None), _attention(SEQ)
    assert torch.allclose(full(x), windowed(x), rtol=1e-6, atol=1e-6)


def test_cached_decoding_equals_the_whole_forward():
    module = _attention(6, 2, "reference").double()
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    whole = module(x)
    state, pieces = {}, []
    for t in range(20):
        pieces.append(module(x[:, t:t + 1], state=state))
    assert torch.allclose(torch.cat(pieces, dim=1), whole, rtol=1e-10, atol=1e-12)


def _recipe(**model):
    return {"model": {"pattern": "AF", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64, **model},
            "data": {"task": "passkey", "seq_len": 64}}


@pytest.mark.parametrize("model, parallel, words", [
    ({"attention_window": 65}, {}, ["model.attention_window=65", "data.seq_len=64"]),
    ({"attention_sinks": 2}, {}, ["model.attention_sinks=2", "model.attention_window"]),
    ({"attention_window": 8, "attention_sinks": -1}, {}, ["attention_sinks"]),
    ({"attention_window": 0}, {}, ["attention_window"]),
    ({"attention_window": 8}, {"cp": 2}, ["model.attention_window=8", "parallel.cp=2"]),
])
def test_bad_windows_are_one_line_errors(model, parallel, words):
    raw = _recipe(**model)
    raw["parallel"] = parallel
    with pytest.raises(Exception) as error:
        recipe_from_dict(raw)
    message = str(error.value)
    assert "\n" not in message.strip() and all(w in message for w in words), message
