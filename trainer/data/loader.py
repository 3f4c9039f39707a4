"""Fixed-length samples from token shards, in a global order fixed by the seed.

Sample i of a split is tokens[i*L : i*L + L + 1] (inputs and next-token targets). The global order
is a seeded permutation per epoch; position g of the stream is sample perm_{g // n}[g % n]. The
loader's whole state is the number of consumed samples, so it resumes anywhere, under any
data-parallel layout: global batch b covers stream positions [b*G, (b+1)*G), and rank r of dp takes
its micro-batch slices of that range.

Document-aware packing (`data.packing: documents`): the dataset also knows each document's start offset
(the shards' *.docs.npy) and every batch carries a third tensor, the in-document position of each input
token (0 where a document starts; Hugging Face's `position_ids` convention for packed sequences). A
sequence that starts inside a document restarts its positions at 0 there (as Hugging Face's and
torchtitan's packing do): the model sees the document's remainder as a document of its own.
"""
from __future__ import annotations

import numpy as np
import torch


class PackedDataset:
    """doc_starts: None (concat packing: batches are (inputs, targets)), or the int offsets of every document
    in `tokens`, ascending (documents packing: batches are (inputs, targets, positions))."""

    def __init__(self, tokens: np.ndarray, seq_len: int, doc_starts: np.ndarray | None = None):
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_samples = (len(tokens) - 1) // seq_len
        self.doc_starts = None
        if doc_starts is not None:
            starts = np.asarray(doc_starts, dtype=np.int64)
            # A split that opens inside a document (the held-out tail of the stream) opens with that document's tail.
            self.doc_starts = starts if len(starts) and starts[0] == 0 else np.concatenate([[0], starts])

    def positions(self, index: int) -> np.ndarray:
        """(seq_len,) int64 in-document positions of sample `index`'s inputs, restarting at 0 at every
        document start and at the sequence's first token."""
        start = index * self.seq_len
        offsets = np.arange(start, start + self.seq_len, dtype=np.int64)
        owner = np.searchsorted(self.doc_starts, offsets, side="right") - 1  # >= 0: doc_starts[0] == 0
        return offsets - np.maximum(self.doc_starts[owner], start)

    def __len__(self):
        return self.num_samples

    def get(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)


class GlobalOrder:
    """Seeded permutation of sample indices, epoch after epoch."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self._cache: dict[int, torch.Tensor] = {}

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if epoch not in self._cache:
            self._cache = {epoch: torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._cache[epoch][offset])


class DataLoader:
    """Micro-batches for one data-parallel rank. State: `consumed_samples` (global, over all ranks)."""

    def __init__(self, dataset: PackedDataset, micro_batch_size: int, grad_accum: int = 1,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, consumed_samples: int = 0):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.order = GlobalOrder(len(dataset), seed)
        self.consumed_samples = consumed_samples

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size

    def micro_batch_indices(self, step_start: int, micro_step: int) -> list[int]:
        """Global sample indices of this rank's micro-batch `micro_step` of the step starting at `step_start`."""
        first = step_start + micro_step * self.micro_batch_size * self.dp_size + self.dp_rank * self.micro_batch_size
        return [self.order[p] for p in range(first, first + self.micro_batch_size)]

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The grad_accum micro-batches of the next optimizer step: [(inputs, targets)], each (mb, seq), or
        [(inputs, targets, positions)] for documents packing (positions: in-document, int64)."""
        start = self.consumed_samples
        batches = [self.collate(self.micro_batch_indices(start, j)) for j in range(self.grad_accum)]
        self.consumed_samples += self.global_batch_size
        return batches

    def collate(self, indices):
        return collate(self.dataset, indices)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def eval_batches(dataset: PackedDataset, micro_batch_size: int, num_batches: int):
    """num_batches micro-batches of held-out samples spread evenly over the split (the same every eval,
    and representative of all held-out documents, not only the first few)."""
    size = min(micro_batch_size, len(dataset))
    count = min(num_batches * size, len(dataset) // size * size)
    stride = len(dataset) / count
    indices = [int(i * stride) for i in range(count)]
    for start in range(0, count, size):
        yield collate(dataset, indices[start:start + size])


def collate(dataset: PackedDataset, indices) -> tuple:
    """(inputs, targets) of the samples `indices`, plus their in-document positions when the dataset knows
    its documents."""
    rows = torch.from_numpy(np.stack([dataset.get(i) for i in indices]))
    batch = (rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
    if dataset.doc_starts is None:
        return batch
    return (*batch, torch.from_numpy(np.stack([dataset.positions(i) for i in indices])))
