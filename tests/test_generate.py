"""Generation with decoding state (KV cache, Mamba state) against recomputing the whole prefix."""
import pytest
import torch

from longtrain.trainer.config import ModelConfig, OdeConfig
from longtrain.trainer.generate import (forward_with_state, generate, generate_batch, generate_recompute, new_state,
                                        sample_tokens)
from longtrain.trainer.model.decoder import Decoder

CASES = {
    "attention": dict(pattern="AA"),
    "mamba": dict(pattern="MM"),
    "hybrid": dict(pattern="AMOF"),
    "hybrid_ode_attention": dict(pattern="AMOF", ode=OdeConfig(sublayer="attention_mlp", solver="midpoint", steps=2)),
    "hybrid_ode_dopri5": dict(pattern="MOF", ode=OdeConfig(solver="dopri5", rtol=1e-4, atol=1e-5)),
}


def tiny_model(**overrides):
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, vocab_size=61, d_state=8, init_std=0.3,
                      **{"ode": OdeConfig(solver="rk4", steps=2), **overrides})
    torch.manual_seed(0)
    return Decoder(cfg).double().eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_with_state_equals_recompute(case):
    model = tiny_model(**CASES[case])
    prompt = torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    cached = generate(model, prompt, max_new_tokens=12)
    recomputed = generate_recompute(model, prompt, max_new_tokens=12)
    assert cached == recomputed


@pytest.mark.parametrize("case", ["attention", "mamba", "hybrid"])
def test_stepwise_logits_equal_full_forward(case):
    model = tiny_model(**CASES[case])
    tokens = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    states = new_state(model)
    pieces = [forward_with_state(model, tokens[:, :5], states)]
    pieces += [forward_with_state(model, tokens[:, i:i + 1], states) for i in range(5, 14)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)
    if case == "mamba":  # the recurrent state does not grow with the sequence
        assert states[0]["ssm"].shape == (2, model.cfg.d_inner, model.cfg.d_state)


def test_batch_generation_matches_single():
    model = tiny_model(pattern="AMF")
    prompts = torch.randint(0, 61, (3, 6), generator=torch.Generator().manual_seed(3))
    batch = generate_batch(model, prompts, 5)
    for row, prompt in zip(batch.tolist(), prompts.tolist()):
        assert row == generate_recompute(model, prompt, 5)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_tokens(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}
    assert {int(sample_tokens(logits, 1.0, 0.4, g)) for _ in range(50)} == {0}
    assert int(sample_tokens(logits, 0.0, 0.1)) == 0
