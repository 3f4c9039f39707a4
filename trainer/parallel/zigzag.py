"""The zigzag layout of context parallelism (the load-balanced layout of Brandon et al. 2023, "Striped
Attention", and Megatron's context parallelism): the sequence is cut into 2*cp equal chunks and rank r
holds chunks r and 2cp-1-r, so each rank does the same share of causal attention work."""
from __future__ import annotations

import torch

from longtrain.trainer.errors import LongtrainError


def zigzag_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two chunk indices (of 2*cp) held by cp rank `rank`."""
    return rank, 2 * cp - 1 - rank


def check_zigzag(seq_len: int, cp: int) -> int:
    """Chunk length; raises when seq_len cannot be split into 2*cp equal chunks."""
    if seq_len % (2 * cp):
        raise LongtrainError(f"sequence length {seq_len} is not divisible by 2*parallel.cp={2 * cp} "
                             "(data.seq_len must split into 2*cp equal zigzag chunks)")
    return seq_len // (2 * cp)


def zigzag_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """(seq_len / cp,) absolute positions of this rank's tokens, in local order."""
    chunk = check_zigzag(seq_len, cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in zigzag_chunks(cp, rank)])


def zigzag_split(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's slice of the full-sequence tensor x along `dim` (its two chunks, concatenated)."""
    chunk = check_zigzag(x.shape[dim], cp)
    a, b = zigzag_chunks(cp, rank)
    return torch.cat([x.narrow(dim, a * chunk, chunk), x.narrow(dim, b * chunk, chunk)], dim=dim)


def zigzag_merge(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of zigzag_split: the local slices of all cp ranks, in rank order -> the full sequence."""
    cp = len(parts)
    chunks = [None] * (2 * cp)
    for rank, part in enumerate(parts):
        first, second = part.chunk(2, dim=dim)
        a, b = zigzag_chunks(cp, rank)
        chunks[a], chunks[b] = first, second
    return torch.cat(chunks, dim=dim)


def chunk_owner(cp: int, chunk: int) -> tuple[int, int]:
    """(cp rank, local slot) holding chunk index `chunk`."""
    return (chunk, 0) if chunk < cp else (2 * cp - 1 - chunk, 1)
