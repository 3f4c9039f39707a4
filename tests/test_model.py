"""The decoder: causality of every block type, activation checkpointing, recurrent Mamba state, bf16 autocast."""
import pytest
import torch

from longtrain.trainer.config import recipe_from_dict
from longtrain.trainer.model.decoder import Decoder, count_parameters, linear_cross_entropy, lm_loss


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


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_equals_loss_of_the_logits(tie):
    """model(tokens, targets), chunked without the logits, against the cross-entropy of the full float64
    logits: the loss and every parameter gradient, with ignored targets and chunks that do not divide
    the tokens."""
    model = tiny_model("AF", tie_embeddings=tie)
    tokens, targets = torch.randint(0, 64, (2, 17)), torch.randint(0, 64, (2, 17))
    targets[0, :5] = -100
    weight = model.embed.weight if tie else model.head.weight
    expected = lm_loss(torch.nn.functional.linear(model.hidden(tokens), weight), targets)  # float64 logits
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    for loss in (model(tokens, targets),
                 linear_cross_entropy(model.hidden(tokens).flatten(0, 1), weight, targets.flatten(), chunk=5)):
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert abs(loss.item() - expected.item()) < 1e-12
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_fused_loss_under_bf16_autocast_and_all_ignored():
    model = tiny_model("AF").float()
    tokens, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    expected = lm_loss(model(tokens), targets)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) < 2e-2 * expected.item()
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float32 and (got - want).abs().max() <= 0.05 * want.abs().max() + 1e-6
    ignored = torch.full_like(targets, -100)
    assert torch.isnan(model(tokens, ignored)) and torch.isnan(lm_loss(model(tokens), ignored))
