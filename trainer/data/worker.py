"""Tokenize work units into part files, in this process or in worker processes fed over pipes.

A work unit is a run of consecutive documents (by document index); its tokens go to parts/NNNNNN.bin
(documents in order, each followed by EOS) and their lengths to parts/NNNNNN.lens.npy, written last:
a unit is done exactly when its .lens.npy exists, so a killed run keeps every finished unit.

Workers are plain `python -m longtrain.trainer.data.worker` processes, not multiprocessing's: a spawned
multiprocessing child re-imports the launching script (the `longtrain` command, which imports torch),
costing each worker hundreds of MB; these import numpy and sentencepiece only.
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from longtrain.trainer.data.tokenizer import Tokenizer
from longtrain.trainer.errors import LongtrainError

HEADER = struct.Struct("<Q")  # the length of each pickled frame on a pipe


def part_paths(parts_dir: Path, index: int) -> tuple[Path, Path]:
    """(tokens .bin, lengths .lens.npy) of work unit `index`."""
    return parts_dir / f"{index:06d}.bin", parts_dir / f"{index:06d}.lens.npy"


def unit_done(parts_dir: Path, index: int) -> bool:
    return part_paths(parts_dir, index)[1].is_file()


def encode_unit(tokenizer: Tokenizer, dtype: np.dtype, parts_dir: Path, index: int, documents: list[str]) -> int:
    """Tokenize one unit and write its part files (each by rename, the lengths last). Returns its token count."""
    encoded = tokenizer.sp.encode(documents, num_threads=1)  # one thread: --workers alone sets the parallelism
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.fromiter((t for ids in encoded for t in (*ids, tokenizer.eos_id)), dtype=dtype,
                         count=int(lengths.sum()))
    bin_path, lens_path = part_paths(parts_dir, index)
    _write_by_rename(bin_path, tokens.tofile)
    _write_by_rename(lens_path, lambda f: np.save(f, lengths, allow_pickle=False))
    return len(tokens)


def _write_by_rename(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _send(stream, value) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream):
    """The next frame, or None at end of stream."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    return pickle.loads(stream.read(HEADER.unpack(head)[0]))


class WorkerPool:
    """n worker processes, each tokenizing one unit at a time. submit() blocks while all are busy and returns
    the units finished meanwhile; drain() waits for the rest. Results: (index, tokens)."""

    def __init__(self, n: int, tokenizer_path: Path, dtype: np.dtype, parts_dir: Path):
        command = [sys.executable, "-m", "longtrain.trainer.data.worker", str(tokenizer_path), np.dtype(dtype).name,
                   str(parts_dir)]
        self.processes = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(n)]
        self.idle = list(self.processes)
        self.busy: dict[int, subprocess.Popen] = {}  # stdout fd -> process

    def submit(self, index: int, documents: list[str]) -> list[tuple[int, int]]:
        finished = [] if self.idle else self._collect()
        process = self.idle.pop()
        _send(process.stdin, (index, documents))
        self.busy[process.stdout.fileno()] = process
        return finished

    def drain(self) -> list[tuple[int, int]]:
        finished = []
        while self.busy:
            finished += self._collect()
        return finished

    def _collect(self) -> list[tuple[int, int]]:
        results = []
        for stdout in wait([p.stdout for p in self.busy.values()]):
            process = self.busy.pop(stdout.fileno())
            reply = _receive(stdout)
            if reply is None:
                raise LongtrainError(f"a data worker (pid {process.pid}) exited with status {process.wait()}: "
                                     "rerun `longtrain data prepare` to continue where it stopped")
            if reply[0] == "error":
                raise LongtrainError(reply[1])
            results.append(reply)
            self.idle.append(process)
        return results

    def close(self) -> None:
        """End every worker: closing its input ends its loop; one still running after 10 s is killed."""
        for process in self.processes:
            try:
                process.stdin.close()
            except OSError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()


def main(argv: list[str]) -> int:
    """Worker loop: read (index, documents) frames, answer (index, tokens) or ("error", message)."""
    tokenizer_path, dtype, parts_dir = Path(argv[0]), np.dtype(argv[1]), Path(argv[2])
    tokenizer = Tokenizer(tokenizer_path)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while (task := _receive(source)) is not None:
        index, documents = task
        try:
            _send(sink, (index, encode_unit(tokenizer, dtype, parts_dir, index, documents)))
        except (OSError, LongtrainError) as e:
            _send(sink, ("error", f"work unit {index}: {e}"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
