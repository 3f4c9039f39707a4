"""Where the text comes from: Python's own standard library sources, text files, directories, JSONL.

Documents are read in a fixed order (sorted paths), so the same corpus gives the same token stream
on every machine with the same files.
"""
from __future__ import annotations

import codecs
import json
import sysconfig
from pathlib import Path
from typing import Iterator

from longtrain.trainer.errors import LongtrainError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".c", ".h", ".json", ".yaml", ".yml", ".toml", ".cfg", ".html"}


def stdlib_files() -> list[Path]:
    """The .py files of this interpreter's standard library (no site-packages, no tests)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def resolve_sources(corpus: list[str]) -> list[Path]:
    """Expand the recipe's `data.corpus` entries into files, checking each exists. Cheap: no reading."""
    files: list[Path] = []
    for entry in corpus:
        if entry == "stdlib":
            files.extend(stdlib_files())
            continue
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl"))
            if not found:
                raise LongtrainError(f"data.corpus: directory {entry!r} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))}, .jsonl)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise LongtrainError(f"data.corpus: path {entry!r} does not exist")
    if not files:
        raise LongtrainError("data.corpus is empty: name 'stdlib', files, directories or .jsonl files")
    return files


def iter_documents(files: list[Path], text_field: str = "text", max_bytes: int | None = None) -> Iterator[str]:
    """Yield documents: one per text file, one per JSONL line (its `text_field`). Reads at most max_bytes
    of the files in all: a text file is cut at the budget, a JSONL file stops before the record that would
    cross it. A file that is not text (NUL bytes, or mostly invalid UTF-8) is a LongtrainError naming it."""
    remaining = max_bytes if max_bytes is not None else float("inf")
    for path in files:
        if remaining <= 0:
            return
        if path.suffix == ".jsonl":
            docs = _jsonl_documents(path, text_field, remaining, first=remaining == max_bytes)
        else:
            docs = [_text_document(path, remaining)]
        for doc, size in docs:
            remaining -= size
            if doc.strip():
                yield doc


SNIFF_BYTES = 1 << 16
MAX_INVALID_FRACTION = 0.1  # Latin-1 prose has a few percent of bytes that are not UTF-8; binaries far more


def _text_document(path: Path, budget: float) -> tuple[str, int]:
    """(text, bytes read) of the first `budget` bytes of a text file."""
    try:
        with path.open("rb") as f:
            data = f.read() if budget == float("inf") else f.read(int(budget))
    except OSError as e:
        raise LongtrainError(f"data.corpus: {path} cannot be read ({e.strerror or e})") from None
    head = data[:SNIFF_BYTES]
    invalid = head.decode("utf-8", errors="replace").count("\ufffd")
    if b"\0" in head or invalid > MAX_INVALID_FRACTION * len(head):
        why = "NUL bytes" if b"\0" in head else f"{invalid} of {len(head)} bytes are not UTF-8"
        raise LongtrainError(f"data.corpus: {path} is not text ({why} in its first {len(head):,} bytes): remove it "
                             "from data.corpus, or list the text files to read")
    # A cut at the budget can split a character: the incremental decoder drops that partial tail.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return decoder.decode(data, final=len(data) < budget), len(data)


def _jsonl_documents(path: Path, text_field: str, budget: float, first: bool) -> Iterator[tuple[str, int]]:
    """(text, bytes read) per record, line by line, up to `budget` bytes. first: nothing was read before this
    file, so a first record longer than the budget would leave no text at all (an error, not an empty corpus)."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise LongtrainError(f"data.corpus: {path} cannot be read ({e.strerror or e})") from None
    with f:
        number = 0
        while budget > 0:
            line = f.readline() if budget == float("inf") else f.readline(int(budget))
            if not line:
                return
            number += 1
            if len(line) == budget and not line.endswith(b"\n") and f.peek(1):  # the budget ends inside this record
                if first and number == 1:
                    raise LongtrainError(f"{path}:1: the first record is longer than data.max_bytes={int(budget)}; "
                                         "raise data.max_bytes")
                yield "", len(line)  # read, so counted: nothing after it is read
                return
            budget -= len(line)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LongtrainError(f"{path}:{number}: not UTF-8 text (byte {e.start} of the line): a .jsonl "
                                     "corpus is UTF-8 JSON, one object per line") from None
            if not text.strip():
                yield "", len(line)
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise LongtrainError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise LongtrainError(f"{path}:{number}: JSON nested too deeply") from None
            if not isinstance(record, dict) or text_field not in record:
                raise LongtrainError(f"{path}:{number}: no field {text_field!r} (set data.text_field)")
            yield str(record[text_field]), len(line)
