"""Generation from a trained decoder: greedy or nucleus sampling, with per-block decoding state.

One forward pass over the prompt (prefill) fills a state per block, then each new token costs one
step through the blocks:
    A  attention: KV cache of rotated keys and values, positions continue from the cache length;
    M  Mamba: the conv window and the SSM state, constant memory and time per token (Gu & Dao 2023);
    F  SwiGLU: token-wise, no state;
    O  Neural-ODE: token-wise when f is the MLP sublayer and the solver has a fixed grid. When f holds
       attention (ode.sublayer=attention_mlp) each token's f reads every earlier token at every
       solver stage, and with the adaptive dopri5 solver the step sizes depend on the whole
       sequence's error norm; for those the block keeps its input history and re-solves it for each
       new token (exact, but quadratic in the generated length for that block).
`generate_recompute` recomputes the whole prefix for every token; it is the reference the tests
compare against, and serves a sliding window (`max_context`).

Streaming (StreamingLLM, Xiao et al. 2023): `new_state(model, sinks, window)` gives every attention block
a cache of the first `sinks` and the last `window` tokens, with positions by place in the cache
(trainer/model/attention.py), so a stream of any length runs in constant memory: Mamba's state is
constant already, F and token-wise O blocks keep none. An O block whose f attends (or whose solver is
adaptive) keeps its whole input history and is refused. `stream_losses` scores a text that way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FIXED_GRID_SOLVERS = ("euler", "midpoint", "rk4")


def ode_is_tokenwise(block) -> bool:
    """True when an O block maps each position independently of the others."""
    ode = block.mixer
    return ode.f.attn is None and ode.ode.solver in FIXED_GRID_SOLVERS


def new_state(model, sinks: int | None = None, window: int | None = None) -> list[dict]:
    """One state dict per block of `model` (a Decoder), empty; with `window`, attention blocks stream with a
    constant-memory cache of `sinks` (default 0) + `window` tokens, the current one among the window."""
    states = [{} for _ in model.blocks]
    if window is None:
        if sinks is not None:
            raise ValueError(f"sinks={sinks} needs a window: the cache holds sinks + window tokens")
        return states
    sinks = sinks or 0
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks={sinks!r}: must be an integer >= 0 (the first tokens kept in the cache)")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r}: must be an integer >= 1 (the last tokens kept, the current one "
                         "among them)")
    for block, state in zip(model.blocks, states):
        if block.letter == "A":
            state.update(sinks=sinks, window=window)
        elif block.letter == "O" and not ode_is_tokenwise(block):
            raise ValueError("streaming needs constant-memory blocks: this O block (ode.sublayer=attention_mlp or an "
                             "adaptive solver) re-solves its whole input history for every token")
    return states


@torch.no_grad()
def forward_with_state(model, tokens: torch.Tensor, states: list[dict]) -> torch.Tensor:
    """Logits (batch, seq, vocab) float32 of `tokens` (batch, seq) int64, continuing from `states`
    (from `new_state`, updated in place). The same logits as a forward pass over the whole history."""
    x = model.embed(tokens)
    for block, state in zip(model.blocks, states):
        if block.letter in ("A", "M"):
            x = block(x, state=state)
        elif block.letter == "O" and not ode_is_tokenwise(block):
            history = x if "x" not in state else torch.cat([state["x"], x], dim=1)
            state["x"] = history
            x = block(history)[:, -x.shape[1]:]
        else:
            x = block(x)
    return model.logits(model.norm(x))


@torch.no_grad()
def stream_losses(model, inputs: torch.Tensor, targets: torch.Tensor, sinks: int, window: int,
                  prefill: bool = True) -> torch.Tensor:
    """Next-token losses (batch, seq) float64 (nats) of inputs (batch, seq) int64 against targets, streamed
    through `model` with a cache of `sinks` + `window` tokens per attention block (`new_state`). With
    `prefill` the first sinks + window tokens go in one call (nothing is evicted before then, so it
    equals feeding them one by one), the rest one token per call; without it, every token alone."""
    states = new_state(model, sinks, window)
    first = min(sinks + window, inputs.shape[1]) if prefill else 1
    losses = []
    for start, stop in [(0, first)] + [(t, t + 1) for t in range(first, inputs.shape[1])]:
        logits = forward_with_state(model, inputs[:, start:stop], states)
        losses.append(F.cross_entropy(logits.transpose(1, 2), targets[:, start:stop], reduction="none").double())
    return torch.cat(losses, dim=1)


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """Token ids (batch,) from logits (batch, vocab): argmax when temperature is 0, else nucleus sampling
    (Holtzman et al. 2020): the smallest set of most likely tokens whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the most likely token is always kept
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    """One token id from logits (vocab,)."""
    return int(sample_tokens(logits[None], temperature, top_p, generator)[0])


@torch.no_grad()
def generate_batch(model, prompts: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue prompts (batch, seq) int64 by max_new_tokens tokens each. Returns the new ids (batch, new)."""
    was_training = model.training
    model.eval()
    states = new_state(model)
    logits = forward_with_state(model, prompts, states)[:, -1]
    new = []
    for i in range(max_new_tokens):
        next_ids = sample_tokens(logits, temperature, top_p, generator)
        new.append(next_ids)
        if i + 1 < max_new_tokens:
            logits = forward_with_state(model, next_ids[:, None], states)[:, -1]
    model.train(was_training)
    return torch.stack(new, dim=1) if new else prompts.new_zeros(prompts.shape[0], 0)


@torch.no_grad()
def generate_recompute(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                       generator: torch.Generator | None = None, max_context: int | None = None) -> list[int]:
    """Continue prompt_ids by recomputing the (last max_context tokens of the) prefix for every new token."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new = []
    for _ in range(max_new_tokens):
        context = ids if max_context is None else ids[:, -max_context:]
        next_id = sample(model(context)[0, -1].float(), temperature, top_p, generator)
        new.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
    return new


def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, max_context: int | None = None) -> list[int]:
    """Continue prompt_ids by max_new_tokens tokens. temperature 0 is greedy. Returns only the new ids.

    Uses the decoding state unless the text would outgrow `max_context`, which asks for a sliding
    window over the last max_context tokens (recomputed per token).
    """
    if max_context is not None and len(prompt_ids) + max_new_tokens > max_context:
        return generate_recompute(model, prompt_ids, max_new_tokens, temperature, top_p, generator, max_context)
    device = next(model.parameters()).device
    prompts = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    return generate_batch(model, prompts, max_new_tokens, temperature, top_p, generator)[0].tolist()
