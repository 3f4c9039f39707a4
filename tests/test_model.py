"""The decoder: causality of every block type, activation checkpointing, recurrent Mamba state, bf16 autocast."""
import pytest
import torch

from longtrain.trainer.config import recipe_from_dict
from longtrain.trainer.model.decoder import Decoder, count_parameters, lm_loss


def tiny_model(pattern, **model):
    cfg = recipe_from_dict({"model": {"pattern": pattern, "d_model": 32, "n_heads": 4, "n_kv_heads": 2,
                                      "vocab_size": 64, "d_state": 4, "ode": {"steps": 2}, **model},
                           "data": {"tokenizer": {"vocab_size": 64}}}).model
    torch.manual_seed(0)
    return Decoder(cfg, attention_backend="reference", scan_backend="reference").double()


@pytest.mark.parametrize("pattern", ["A", "M", "O", "F", "AMOF"])
def test_blocks_are_causal(pattern):
    model = tiny_model(pattern)
    tokens = torch.randint(0, 64, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 64
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny_model("AMOF")
    tokens = torch.randint(0, 64, (2, 10))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        lm_loss(model(tokens), tokens).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mamba_state_continues_the_sequence():
    model = tiny_model("M")
    mamba = model.blocks[0].mixer
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        whole = mamba(x)
        state = {}
        pieces = [mamba(x[:, :4], state=state), mamba(x[:, 4:5], state=state), mamba(x[:, 5:], state=state)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-10, atol=1e-12)


def test_tied_and_untied_embeddings():
    tied, untied = tiny_model("F"), tiny_model("F", tie_embeddings=False)
    assert count_parameters(untied) - count_parameters(tied) == 64 * 32
    assert untied(torch.randint(0, 64, (1, 5))).shape == (1, 5, 64)


def test_bf16_autocast_runs_and_stays_close():
    model = tiny_model("AMOF").float()
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        full = model(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(tokens)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - full).abs().max() < 0.1 * full.abs().max()
