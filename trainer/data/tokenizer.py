"""SentencePiece tokenizer (Kudo & Richardson 2018), trained on the corpus when none is given.

Identity normalisation and no whitespace folding: the default normalisation loses indentation,
which breaks a code corpus (round trip must be exact).
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from longtrain.trainer.errors import LongtrainError


class Tokenizer:
    def __init__(self, model_path: str | Path, fix: str = "give a .model file written by SentencePiece"):
        """Load a SentencePiece model; a missing or unreadable file is a LongtrainError ending with `fix`."""
        self.path = Path(model_path)
        if not self.path.is_file():
            raise LongtrainError(f"tokenizer model {str(self.path)!r} not found: {fix}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:  # sentencepiece: "INTERNAL: could not parse ModelProto from ..."
            reason = " ".join(str(e).split()).removeprefix("INTERNAL: ").replace(f" from {self.path}", "")[:160]
            raise LongtrainError(f"{self.path} is not a SentencePiece model ({reason}): {fix}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def train_tokenizer(documents: Iterable[str], out_path: Path, vocab_size: int, model_type: str = "bpe",
                    seed: int = 0) -> Tokenizer:
    """Train on the documents and write `out_path` (a .model file). Deterministic for the same input."""
    model = io.BytesIO()
    sentences = (line for doc in documents for line in doc.splitlines(keepends=False) if line.strip())
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size, model_type=model_type,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_by_whitespace=True,
            allow_whitespace_only_pieces=True, byte_fallback=True, character_coverage=0.9995,
            user_defined_symbols=["\n", "\t"], max_sentence_length=1 << 16, num_threads=1, hard_vocab_limit=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    except RuntimeError as e:
        reason = (str(e).strip().splitlines() or ["no reason given"])[-1]
        # "INTERNAL: src/trainer_interface.cc(638) [(static_cast<int>(...)) <= (...)] Vocabulary size is ...":
        # the source line and the failed C++ condition say nothing to a user; the sentence after them does.
        reason = re.sub(r"^(?:[A-Z_]+: )?\S+\.cc\(\d+\) \[.*\] ", "", reason)[:240]
        chars = re.search(r"smaller than required_chars\. \d+ vs (\d+)", reason)
        if chars:
            reason = f"the corpus holds {chars.group(1)} distinct characters, each needs a piece: raise it"
        raise LongtrainError(f"tokenizer training failed (data.tokenizer.vocab_size={vocab_size}): {reason}") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_path)
    return Tokenizer(out_path)
