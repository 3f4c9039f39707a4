"""SentencePiece tokenizer (Kudo & Richardson 2018), trained on the corpus when none is given.

Identity normalisation and no whitespace folding: the default normalisation loses indentation,
which breaks a code corpus (round trip must be exact).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from longtrain.trainer.errors import LongtrainError


class Tokenizer:
    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise LongtrainError(f"tokenizer model {str(self.path)!r} not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
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
        raise LongtrainError(f"tokenizer training failed (data.tokenizer.vocab_size={vocab_size}): {str(e).splitlines()[-1]}") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_path)
    return Tokenizer(out_path)
