"""`longtrain data prepare`: the one writer of token shards. Streaming, parallel, deterministic, resumable.

    corpus files -> documents (a stream) -> work units of ~unit_bytes, numbered by document index
      -> N workers tokenize units into .prepare-<key>/parts/ -> ordered concatenation -> publish

- Memory is bounded: documents are read as a stream, the tokenizer is trained on the first
  SAMPLE_BYTES of them, and only a few units (a few MB each) are in flight at once.
- The shards are byte-identical whatever the number of workers: unit boundaries depend on the
  document stream alone, and the shuffle (unit order, then documents within a unit) and the
  train/eval cut are decided by index and seed at concatenation, never by worker timing.
- A killed run resumes: finished units stay in .prepare-<key>/parts (key: the data fingerprint)
  and a rerun skips them. Nothing half-written is ever read: the shard set is built in the
  staging directory and published by renames, meta.json last; readers need a matching meta.json.
- One writer per directory: an flock on DIR/.lock; a second writer is refused naming the holder.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from longtrain.trainer.data.corpus import check_sources, iter_documents, resolve_sources
from longtrain.trainer.data.shards import (TOKENIZER_PATH_FIX, TokenShards, _has_checkpoints, _keep_for_run,
                                           fingerprint, read_meta, settings)
from longtrain.trainer.data.tokenizer import Tokenizer, train_tokenizer
from longtrain.trainer.data.worker import WorkerPool, encode_unit, part_paths, unit_done
from longtrain.trainer.errors import LongtrainError

UNIT_BYTES = 4 << 20  # text per work unit: small enough to keep a few in flight, large enough to amortize
SAMPLE_BYTES = 32 << 20  # the tokenizer is trained on this much of the stream's start (sentencepiece holds it all)
FORMAT = 1  # of the staging directory and part files; a change here starts staged work afresh
SHARD_FILES = ("tokenizer.model", "train.bin", "eval.bin", "train.docs.npy", "eval.docs.npy")


@dataclass
class Prepared:
    shards: TokenShards
    units: int = 0  # work units in the corpus
    skipped: int = 0  # of them, found done by an earlier (killed) run
    reused: bool = False  # the published shards already matched: nothing was done
    seconds: float = 0.0
    characters: int = 0  # of text tokenized or skipped (the stream after data.max_bytes)


def prepare_data(cfg, data_dir: Path, seed: int = 0, workers: int = 1, unit_bytes: int = UNIT_BYTES,
                 on_unit: Callable[[int], None] | None = None) -> Prepared:
    """Build (or reuse, when meta.json's fingerprint matches) the shards of a DataConfig in data_dir.
    on_unit(index) is called after each unit is tokenized (tests stop a run there)."""
    if workers < 1:
        raise LongtrainError(f"--workers {workers}: give 1 or more worker processes")
    data_dir = Path(data_dir)
    files = resolve_sources(cfg.corpus)
    key = fingerprint(cfg, files)
    ready = _published(cfg, data_dir, key, seed)
    if ready is not None:
        return Prepared(ready, reused=True)
    check_sources(files, cfg.text_field)
    if int(os.environ.get("RANK", "0")) != 0:  # training ranks never tokenize: rank 0 or `data prepare` does
        raise LongtrainError(f"{data_dir} holds no prepared data for data.* on this node (rank "
                             f"{os.environ['RANK']}): put run.dir on storage every node shares, or run `longtrain "
                             "data prepare RECIPE` on every node first")
    with exclusive(data_dir):
        ready = _published(cfg, data_dir, key, seed)  # another writer may have finished while we waited
        if ready is not None:
            return Prepared(ready, reused=True)
        return _build(cfg, data_dir, files, key, seed, workers, unit_bytes, on_unit)


def _published(cfg, data_dir: Path, key: str, seed: int) -> TokenShards | None:
    """The published shards when they are for these settings (or must be kept for a run's checkpoints)."""
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        return None
    meta = read_meta(meta_path)
    if meta.get("fingerprint") == key and meta.get("seed", seed) == seed:
        return TokenShards(data_dir)
    if _has_checkpoints(data_dir.parent):
        return _keep_for_run(meta, cfg, data_dir)
    return None


@contextmanager
def exclusive(data_dir: Path) -> Iterator[None]:
    """Hold DIR/.lock (flock) with this pid in it; a directory another process holds is refused, naming it.
    The kernel drops the lock when its holder dies, so a killed run never leaves the directory locked."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LongtrainError(f"{data_dir} is being prepared by another process (pid {holder}, lock {path}): wait "
                             "for it to finish, or use another run.dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _build(cfg, data_dir: Path, files: list[Path], key: str, seed: int, workers: int, unit_bytes: int,
           on_unit) -> Prepared:
    start = time.perf_counter()
    staging = data_dir / f".prepare-{key}-v{FORMAT}-u{unit_bytes}"
    _remove_other_staging(data_dir, staging)
    parts = staging / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    tokenizer = _staged_tokenizer(cfg, files, staging)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    units, skipped, characters = _tokenize_units(cfg, files, tokenizer, dtype, parts, workers, unit_bytes, on_unit)
    if units == 0:
        raise LongtrainError(f"data.corpus {cfg.corpus} holds no text (every document is empty)")
    counts = _concatenate(cfg, parts, units, dtype, staging, seed)
    meta = {"fingerprint": key, "settings": settings(cfg), "seed": seed, "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size, "tokens": counts["tokens"], "documents": counts["documents"],
            "files": len(files), "units": units, "unit_bytes": unit_bytes, "format": FORMAT}
    _publish(staging, data_dir, meta)
    return Prepared(TokenShards(data_dir), units=units, skipped=skipped, seconds=time.perf_counter() - start,
                    characters=characters)


def _remove_other_staging(data_dir: Path, keep: Path) -> None:
    """Staged work of other settings can never be resumed: its fingerprint is not ours."""
    for old in data_dir.glob(".prepare-*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def _staged_tokenizer(cfg, files: list[Path], staging: Path) -> Tokenizer:
    """The tokenizer of this preparation: kept from a killed run, copied from data.tokenizer.path, or trained
    on the first SAMPLE_BYTES of the corpus (all of it when smaller)."""
    path = staging / "tokenizer.model"
    if path.is_file():
        return Tokenizer(path, fix=f"delete {staging} to prepare the data again")
    if cfg.tokenizer.path:
        given = Tokenizer(cfg.tokenizer.path, fix=TOKENIZER_PATH_FIX)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(given.path.read_bytes())
        tmp.replace(path)
        return Tokenizer(path)
    sample = iter_documents(files, cfg.text_field, min(cfg.max_bytes, SAMPLE_BYTES))
    first = next(sample, None)
    if first is None:
        raise LongtrainError(f"data.corpus {cfg.corpus} holds no text (every document is empty)")
    return train_tokenizer(_chain(first, sample), path, cfg.tokenizer.vocab_size, cfg.tokenizer.model_type)


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def iter_units(documents: Iterator[str], unit_bytes: int) -> Iterator[tuple[int, list[str], int]]:
    """(index, documents, characters) of consecutive runs of documents holding at least unit_bytes characters
    (the last may hold fewer). Boundaries depend on the document stream alone."""
    unit, size, index = [], 0, 0
    for doc in documents:
        unit.append(doc)
        size += len(doc)
        if size >= unit_bytes:
            yield index, unit, size
            unit, size, index = [], 0, index + 1
    if unit:
        yield index, unit, size


def _tokenize_units(cfg, files, tokenizer: Tokenizer, dtype, parts: Path, workers: int, unit_bytes: int,
                    on_unit) -> tuple[int, int, int]:
    """Tokenize every unit not already done. Returns (units, skipped, characters read)."""
    pool = WorkerPool(workers, tokenizer.path, dtype, parts) if workers > 1 else None
    units = skipped = read = 0
    try:
        for index, documents, size in iter_units(iter_documents(files, cfg.text_field, cfg.max_bytes), unit_bytes):
            units, read = index + 1, read + size
            if unit_done(parts, index):
                skipped += 1
                continue
            if pool is None:
                encode_unit(tokenizer, dtype, parts, index, documents)
                finished = [(index, 0)]
            else:
                finished = pool.submit(index, documents)
            for done, _ in finished:
                if on_unit:
                    on_unit(done)
        for done, _ in (pool.drain() if pool else []):
            if on_unit:
                on_unit(done)
    finally:
        if pool:
            pool.close()
    return units, skipped, read


def _unit_order(units: int, seed: int) -> list[int]:
    order = list(range(units))
    random.Random(seed).shuffle(order)
    return order


def _document_order(documents: int, seed: int, unit: int) -> list[int]:
    order = list(range(documents))
    random.Random(f"{seed}:{unit}").shuffle(order)  # str seeds hash with sha512: the same on every machine
    return order


def _concatenate(cfg, parts: Path, units: int, dtype, staging: Path, seed: int) -> dict:
    """Write train.bin / eval.bin and their document starts from the parts, shuffled by seed: unit order,
    then documents within each unit. Eval is the tail of the stream (as before: a one-file corpus splits
    too). One unit is in memory at a time."""
    total = sum(int(np.load(part_paths(parts, i)[1]).sum()) for i in range(units))
    n_eval = max(int(total * cfg.eval_fraction), cfg.seq_len + 1)
    if total - n_eval < cfg.seq_len + 1:
        raise LongtrainError(f"data.corpus {cfg.corpus} is too small: {total} tokens cannot fill one training "
                             f"and one eval sequence of data.seq_len={cfg.seq_len}")
    cut = total - n_eval
    starts, position, documents = [], 0, 0
    with open(staging / "train.bin", "wb") as train, open(staging / "eval.bin", "wb") as held_out:
        for index in _unit_order(units, seed):
            bin_path, lens_path = part_paths(parts, index)
            lengths = np.load(lens_path)
            tokens = np.fromfile(bin_path, dtype=dtype)
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            order = _document_order(len(lengths), seed, index)
            shuffled = np.concatenate([tokens[offsets[d]:offsets[d] + lengths[d]] for d in order])
            starts.append(position + np.concatenate([[0], np.cumsum(lengths[order])[:-1]]))
            into_train = max(0, min(len(shuffled), cut - position))
            shuffled[:into_train].tofile(train)
            shuffled[into_train:].tofile(held_out)
            position += len(shuffled)
            documents += len(lengths)
    starts = np.concatenate(starts).astype(np.int64)
    _save(staging / "train.docs.npy", starts[starts < cut])
    _save(staging / "eval.docs.npy", starts[starts >= cut] - cut)
    return {"tokens": {"train": int(cut), "eval": int(n_eval)}, "documents": documents}


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _publish(staging: Path, data_dir: Path, meta: dict) -> None:
    """Move the shard set into data_dir and write meta.json last, each by an atomic rename: until the new
    meta.json exists no reader takes the directory for prepared, and after it everything it names is there."""
    (data_dir / "meta.json").unlink(missing_ok=True)
    for name in SHARD_FILES:
        os.replace(staging / name, data_dir / name)
    tmp = staging / "meta.json"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, data_dir / "meta.json")
    shutil.rmtree(staging, ignore_errors=True)
