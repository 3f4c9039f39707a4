"""Synthetic long-context tasks as training and evaluation data, on small vocabularies of their own.

passkey  Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"): a fixed filler sentence
         repeated, a number hidden at a random depth, and at the end a question whose answer is the
         number. Loss on the answer digits only (`data.passkey.loss: answer`) or on every token.
mqar     Multi-query associative recall (Arora et al. 2023, "Zoology"): key-value pairs, then the keys
         asked again later in the sequence; the target after each queried key is its value. Loss on
         those values only. Query slots are drawn uniformly over the rest of the sequence (Zoology
         biases the gaps with a power law).

Sample i of a split is a pure function of (seed, split, i, length), so the loader's seeded global
order and consumed-samples state work unchanged, any sample is reproducible alone, and the held-out
split never repeats a training sample's random draws. Targets the loss ignores are -100
(cross-entropy's ignore_index).
"""
from __future__ import annotations

import numpy as np
import torch

from longtrain.trainer.data.loader import DataLoader
from longtrain.trainer.errors import LongtrainError

IGNORE = -100
SPLITS = {"train": 0, "eval": 1}
SAMPLES_PER_SPLIT = 1 << 18  # an epoch of fresh draws; sample i of epoch e is the same draw i


class Vocabulary:
    """Symbols <-> ids; text is symbols separated by spaces."""

    def __init__(self, symbols: list[str]):
        self.symbols = symbols
        self.ids = {s: i for i, s in enumerate(symbols)}

    @property
    def size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        unknown = [s for s in text.split() if s not in self.ids]
        if unknown:
            raise LongtrainError(f"symbols {unknown[:5]} are not in this task's vocabulary "
                                 f"({' '.join(self.symbols[:24])} ...)")
        return [self.ids[s] for s in text.split()]

    def decode(self, ids) -> str:
        return " ".join(self.symbols[int(i)] for i in ids)


class Passkey:
    """<bos> filler.. <key> d1..dk </key> filler.. <query> d1..dk, the depth of <key> uniform in the filler."""

    FILLER = "the grass is green . the sky is blue . the sun is yellow . here we go . there and back again .".split()

    def __init__(self, cfg):
        self.digits = cfg.digits
        self.full_loss = cfg.loss == "full"
        words = sorted(set(self.FILLER))
        self.vocab = Vocabulary(["<pad>", "<bos>", "<key>", "</key>", "<query>", *map(str, range(10)), *words])
        self.filler = np.array([self.vocab.ids[w] for w in self.FILLER], dtype=np.int64)
        self.digit0 = self.vocab.ids["0"]

    def min_length(self) -> int:
        return 2 * self.digits + 5

    def make(self, rng: np.random.Generator, length: int, depth: float | None = None):
        """tokens (length + 1,) int64 and answer_mask (length,) bool over the targets tokens[1:].
        `depth` in [0, 1] places the key (None: uniform)."""
        key = rng.integers(0, 10, self.digits) + self.digit0
        ids = self.vocab.ids
        n_filler = length + 1 - (2 * self.digits + 4)  # all but <bos> <key> </key> <query> and the digits
        filler = np.tile(self.filler, -(-n_filler // len(self.filler)))[:n_filler]
        cut = int(round((rng.random() if depth is None else depth) * len(filler)))
        tokens = np.concatenate([[ids["<bos>"]], filler[:cut], [ids["<key>"]], key, [ids["</key>"]], filler[cut:],
                                 [ids["<query>"]], key])
        answer = np.zeros(length, dtype=bool)
        answer[-self.digits:] = True
        return tokens.astype(np.int64), answer

    def loss_mask(self, answer_mask: np.ndarray) -> np.ndarray:
        return np.ones_like(answer_mask) if self.full_loss else answer_mask


class MQAR:
    """k1 v1 k2 v2 .. kN vN, then <pad> filler with each key queried once: .. k_i v_i .. (targets: the values).

    As in Zoology's generator, the model's input holds <pad> where a queried value stands: answers are
    targets only, so a model cannot name a query's value by elimination among the values already
    answered, and has to recall it from the pairs.
    """

    def __init__(self, cfg):
        self.pairs, self.keys, self.values = cfg.pairs, cfg.keys, cfg.values
        if self.pairs > self.keys:
            raise LongtrainError(f"data.mqar.pairs={self.pairs} exceeds data.mqar.keys={self.keys}: keys must be distinct")
        self.vocab = Vocabulary(["<pad>", *(f"k{i}" for i in range(self.keys)), *(f"v{i}" for i in range(self.values))])

    def min_length(self) -> int:
        return 4 * self.pairs

    def make(self, rng: np.random.Generator, length: int, depth: float | None = None):
        keys = rng.choice(self.keys, self.pairs, replace=False) + 1
        values = rng.integers(0, self.values, self.pairs) + 1 + self.keys
        tokens = np.zeros(length + 1, dtype=np.int64)
        tokens[0:2 * self.pairs:2], tokens[1:2 * self.pairs:2] = keys, values
        slots = (length + 1 - 2 * self.pairs) // 2  # two-token query slots after the pairs
        chosen = 2 * self.pairs + 2 * np.sort(rng.choice(slots, self.pairs, replace=False))
        order = rng.permutation(self.pairs)
        tokens[chosen], tokens[chosen + 1] = keys[order], values[order]
        answer = np.zeros(length, dtype=bool)
        answer[chosen] = True  # the target at a queried key's position is the next token, its value
        return tokens, answer

    def loss_mask(self, answer_mask: np.ndarray) -> np.ndarray:
        return answer_mask

    def hide_answers(self, inputs: np.ndarray, answer_mask: np.ndarray) -> None:
        """<pad> over the values in the inputs (batch, seq); their targets stay."""
        inputs[:, 1:][answer_mask[:, :-1]] = 0


def make_task(data_cfg):
    """The task object of a DataConfig whose `task` is passkey or mqar."""
    if data_cfg.task == "passkey":
        return Passkey(data_cfg.passkey)
    if data_cfg.task == "mqar":
        return MQAR(data_cfg.mqar)
    raise LongtrainError(f"data.task={data_cfg.task!r} is not a synthetic task (valid: passkey, mqar)")


class TaskDataset:
    """Samples of one split at one length; `get` has the PackedDataset interface, `collate` adds the mask.

    lengths (data.task_lengths): sequence i holds samples of lengths[i % len(lengths)] tokens, seq_len / length
    of them packed one after another as documents; `collate` then also returns each token's in-document
    position, so no sample sees another and rotary positions restart (as text under documents packing)."""

    def __init__(self, task, seq_len: int, split: str, seed: int, num_samples: int = SAMPLES_PER_SPLIT,
                 depth: float | None = None, lengths: list[int] | None = None):
        for length in lengths or [seq_len]:
            if length < task.min_length():
                field = "data.task_lengths" if lengths else "data.seq_len"
                raise LongtrainError(f"{field} length {length} is too short for data.task: it needs at least "
                                     f"{task.min_length()} tokens")
            if seq_len % length:
                raise LongtrainError(f"data.task_lengths length {length} does not divide data.seq_len={seq_len}")
        self.task, self.seq_len, self.split, self.seed = task, seq_len, split, seed
        self.num_samples, self.depth, self.lengths = num_samples, depth, lengths

    def __len__(self):
        return self.num_samples

    def sample(self, index: int):
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index, self.seq_len])
        return self.task.make(rng, self.seq_len, self.depth)

    def _pieces(self, index: int) -> list:
        """[(tokens (length + 1,), answer mask (length,))] of the samples making up sequence `index`."""
        length = self.lengths[index % len(self.lengths)] if self.lengths else self.seq_len
        if length == self.seq_len:
            return [self.sample(index)]
        return [self.task.make(np.random.default_rng([self.seed, SPLITS[self.split], index, length, part]), length,
                               self.depth) for part in range(self.seq_len // length)]

    def get(self, index: int) -> np.ndarray:
        return self.sample(index)[0]

    def collate(self, indices, answer_only: bool = False):
        """inputs, targets (batch, seq) int64; targets outside the loss (or the answer) are -100. With
        lengths: also the in-document positions (batch, seq)."""
        rows = [[self._row(tokens, answer, answer_only) for tokens, answer in self._pieces(i)] for i in indices]
        inputs, targets = (torch.from_numpy(np.stack([np.concatenate([p[k] for p in row]) for row in rows]))
                           for k in (0, 1))
        if not self.lengths:
            return inputs, targets
        positions = np.stack([np.concatenate([np.arange(len(p[0])) for p in row]) for row in rows])
        return inputs, targets, torch.from_numpy(positions)

    def _row(self, tokens: np.ndarray, answer: np.ndarray, answer_only: bool) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of one sample, its answers hidden in the inputs where the task does that."""
        mask = answer if answer_only else self.task.loss_mask(answer)
        targets = np.where(mask, tokens[1:], IGNORE)
        inputs = tokens[None, :-1].copy()
        if hasattr(self.task, "hide_answers"):
            self.task.hide_answers(inputs, answer[None])
        return inputs[0], targets


class TaskLoader(DataLoader):
    """The seeded, resumable DataLoader over a TaskDataset, keeping the loss mask in the targets."""

    def collate(self, indices):
        return self.dataset.collate(indices)


def task_eval_batches(dataset: TaskDataset, micro_batch_size: int, num_batches: int, answer_only: bool = False):
    """The first num_batches micro-batches of the held-out split (the same every eval)."""
    for b in range(num_batches):
        yield dataset.collate(range(b * micro_batch_size, (b + 1) * micro_batch_size), answer_only)


@torch.no_grad()
def answer_accuracy(model, batches) -> dict:
    """Greedy accuracy on the answer targets of (inputs, targets) batches (targets -100 elsewhere).

    Teacher-forced argmax on every answer token equals greedy generation of the whole answer, so one
    forward pass per batch scores it. Returns per-answer-token accuracy and exact-match per sample.
    """
    correct_tokens = total_tokens = correct_samples = total_samples = 0
    for inputs, targets in batches:
        predictions = model(inputs).argmax(-1)
        scored = targets != IGNORE
        hits = (predictions == targets) & scored
        correct_tokens += int(hits.sum())
        total_tokens += int(scored.sum())
        correct_samples += int((hits.sum(1) == scored.sum(1)).sum())
        total_samples += inputs.shape[0]
    return {"token_accuracy": correct_tokens / max(total_tokens, 1),
            "sample_accuracy": correct_samples / max(total_samples, 1), "samples": total_samples}


def first_question(dataset: TaskDataset, index: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of sample `index`: the tokens before its first answer, and that answer
    (the passkey's digits; for MQAR the first queried value)."""
    tokens, answer = dataset.sample(index)
    start = int(answer.nonzero()[0][0])
    end = start
    while end < len(answer) and answer[end]:
        end += 1
    return tokens[:start + 1].tolist(), tokens[start + 1:end + 1].tolist()
