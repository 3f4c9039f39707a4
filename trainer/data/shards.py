"""Tokenize a corpus once into memory-mapped token shards with document boundaries.

Layout of a data directory:
    tokenizer.model          the sentencepiece model
    train.bin, eval.bin      token ids (uint16 when the vocabulary fits, else uint32), documents
                             joined with EOS
    train.docs.npy, ...      int64 start offset of every document in the .bin
    meta.json                written last: dtype, token counts, and the fingerprint of the inputs
The held-out split is the tail of the token stream after a seeded shuffle of documents, so a corpus
of one large file splits too.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np

from longtrain.trainer.data.corpus import iter_documents, resolve_sources
from longtrain.trainer.data.tokenizer import Tokenizer, train_tokenizer
from longtrain.trainer.errors import LongtrainError


def fingerprint(cfg, files) -> str:
    """Hash of what decides the token stream: file names, sizes and mtimes, and the data settings."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    h.update(json.dumps(cfg.model_dump(mode="json", exclude={"seq_len"}), sort_keys=True).encode())
    return h.hexdigest()[:16]


class TokenShards:
    """Read-only view of a prepared data directory."""

    def __init__(self, data_dir: Path):
        self.dir = Path(data_dir)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.tokenizer = Tokenizer(self.dir / "tokenizer.model")
        dtype = np.dtype(self.meta["dtype"])
        self.splits = {name: np.memmap(self.dir / f"{name}.bin", dtype=dtype, mode="r") for name in ("train", "eval")}
        self.doc_starts = {name: np.load(self.dir / f"{name}.docs.npy") for name in ("train", "eval")}


def prepare(cfg, data_dir: Path, seed: int = 0) -> TokenShards:
    """Build (or reuse, when the fingerprint matches) the shards for a DataConfig. Returns the view."""
    data_dir = Path(data_dir)
    files = resolve_sources(cfg.corpus)
    key = fingerprint(cfg, files)
    meta_path = data_dir / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("fingerprint") == key:
        return TokenShards(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    documents = list(iter_documents(files, cfg.text_field, cfg.max_bytes))
    if not documents:
        raise LongtrainError(f"data.corpus {cfg.corpus} holds no text (every document is empty)")
    if cfg.tokenizer.path:
        tokenizer = Tokenizer(cfg.tokenizer.path)
        (data_dir / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())
        tokenizer = Tokenizer(data_dir / "tokenizer.model")
    else:
        tokenizer = train_tokenizer(documents, data_dir / "tokenizer.model", cfg.tokenizer.vocab_size,
                                    cfg.tokenizer.model_type)
    random.Random(seed).shuffle(documents)
    encoded = tokenizer.encode_batch(documents)
    starts = np.cumsum([0] + [len(ids) + 1 for ids in encoded])[:-1]
    stream = np.fromiter((t for ids in encoded for t in (*ids, tokenizer.eos_id)), dtype=np.int64, count=int(starts[-1] + len(encoded[-1]) + 1))
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    n_eval = max(int(len(stream) * cfg.eval_fraction), cfg.seq_len + 1)
    if len(stream) - n_eval < cfg.seq_len + 1:
        raise LongtrainError(f"data.corpus {cfg.corpus} is too small: {len(stream)} tokens cannot fill one training "
                             f"and one eval sequence of data.seq_len={cfg.seq_len}")
    cut = len(stream) - n_eval
    for name, part, offsets in (("train", stream[:cut], starts[starts < cut]),
                                ("eval", stream[cut:], starts[starts >= cut] - cut)):
        out = np.memmap(data_dir / f"{name}.bin", dtype=dtype, mode="w+", shape=(len(part),))
        out[:] = part
        out.flush()
        del out
        np.save(data_dir / f"{name}.docs.npy", offsets.astype(np.int64))
    meta = {"fingerprint": key, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
            "tokens": {"train": int(cut), "eval": int(n_eval)}, "documents": len(documents),
            "files": len(files)}
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(meta_path)
    return TokenShards(data_dir)
