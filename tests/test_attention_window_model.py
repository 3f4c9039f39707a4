"""model.attention_window and model.attention_sinks: what each query of the model can see.

The oracle is dependence itself: the output at position t must not move with the input at any position
the window hides (t - s >= window, s >= sinks), and must move with every position it shows; a window as
long as the sequence is full causal attention; cached decoding equals the whole forward.
"""
import pytest
import torch

from conftest import assert_recipe_refused
from longtrain.kernels.attention import visibility
from longtrain.trainer.config import ModelConfig
from longtrain.trainer.metrics import flops_per_token
from longtrain.trainer.model.attention import Attention
from longtrain.trainer.model.decoder import Decoder
from longtrain.trainer.model.layers import Linears
from longtrain.trainer.parallel.plan import attention_span

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
    ({"attention_global_every": 2}, {}, ["model.attention_global_every=2", "model.attention_window"]),
    ({"attention_window": 8, "attention_global_every": 0}, {}, ["attention_global_every"]),
])
def test_bad_windows_are_one_line_errors(model, parallel, words):
    raw = _recipe(**model)
    raw["parallel"] = parallel
    assert_recipe_refused(raw, words)


def test_every_nth_attention_layer_is_full_causal():
    """model.attention_global_every=N: attention layer n (A blocks and attending O blocks, counted from 1) is
    global when n % N == 0, as Megatron-Core's window_attn_skip_freq (`layer_number % freq != 0` is a window
    layer) and transformers' Gemma sliding_window_pattern. Each layer computes what a full-causal or a
    windowed layer with its weights computes."""
    cfg = ModelConfig(pattern="AAFAOA", d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64, attention_window=4,
                      attention_sinks=1, attention_global_every=2, ode={"sublayer": "attention_mlp", "steps": 1})
    model = Decoder(cfg)
    layers = {i: (b.mixer.f.attn if b.letter == "O" else b.mixer) for i, b in enumerate(model.blocks) if b.letter in "AO"}
    local, full = {"window": (3, 0), "sinks": 1}, {}
    assert {i: layer.masks for i, layer in layers.items()} == {0: local, 1: full, 3: local, 4: full, 5: local}
    x = torch.randn(2, SEQ, 32)
    for i, layer in layers.items():
        twin = _attention(window=None if i in (1, 4) else 4, sinks=0 if i in (1, 4) else 1, backend="auto")
        twin.load_state_dict(layer.state_dict())
        other = _attention(window=4 if i in (1, 4) else None, sinks=1 if i in (1, 4) else 0, backend="auto")
        other.load_state_dict(layer.state_dict())
        assert torch.equal(layer(x), twin(x))
        assert (layer(x) - other(x)).abs().max() > 1e-4  # the two kinds differ here: the check above can fail


def test_attention_span_counts_the_pairs_a_window_computes():
    seq = SEQ
    cfg = ModelConfig(pattern="AA", d_model=32, n_heads=4, n_kv_heads=2, attention_window=8, attention_sinks=3,
                      attention_global_every=2)
    pairs = visibility(seq, seq, causal=True, window=(7, 0), sinks=3, doc_k=torch.zeros(1, seq, dtype=torch.int32))
    assert attention_span(cfg, seq, 0) == pytest.approx(seq * pairs.sum().item() / (seq * (seq + 1) / 2))
    assert attention_span(cfg, seq, 1) == seq  # the global layer
    full = cfg.model_copy(update={"attention_window": None, "attention_sinks": 0, "attention_global_every": None})
    assert flops_per_token(full, seq) - flops_per_token(cfg, seq) == pytest.approx(
        6 * (seq - attention_span(cfg, seq, 0)) * 32)


def test_pipeline_stages_build_each_layer_with_its_window():
    from longtrain.trainer.parallel.pipeline import layer_specs

    cfg = ModelConfig(pattern="AFA", d_model=32, n_heads=4, n_kv_heads=2, attention_window=4, attention_global_every=2)
    blocks = [spec.build().block for spec in layer_specs(cfg, Linears(cfg.init_std))[1:-2]]
    assert [b.mixer.masks if b.letter == "A" else None for b in blocks] == [{"window": (3, 0), "sinks": 0}, None, {}]
