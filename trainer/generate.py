"""Text generation from a trained decoder: greedy or top-p sampling by recomputing the prefix."""
from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, max_context: int | None = None) -> list[int]:
    """Continue prompt_ids by max_new_tokens tokens. temperature 0 is greedy. Returns only the new ids."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new = []
    for _ in range(max_new_tokens):
        context = ids if max_context is None else ids[:, -max_context:]
        logits = model(context)[0, -1].float()
        next_id = sample(logits, temperature, top_p, generator)
        new.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
    return new


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    """One token id from logits (vocab,): argmax when temperature is 0, else nucleus sampling (Holtzman et al. 2020)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])
