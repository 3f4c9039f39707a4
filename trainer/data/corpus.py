"""Where the text comes from: Python's own standard library sources, text files, directories, JSONL,
parquet files and Arrow datasets (`datasets.save_to_disk` directories; trainer/data/columnar.py).

Documents are read in a fixed order (sorted paths; a saved dataset's files in its state.json order), so
the same corpus gives the same token stream on every machine with the same files. Everything is read
as a stream: a text file longer than PIECE_BYTES is yielded as several documents cut at line ends, so
no document, and no read, holds a whole large file.
"""
from __future__ import annotations

import codecs
import json
import sysconfig
from pathlib import Path
from typing import Iterator

from longtrain.trainer.data.columnar import COLUMNAR_SUFFIXES, check_columnar, columnar_documents, saved_dataset_files
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
            found = _directory_files(path)
            if not found:
                raise LongtrainError(f"data.corpus: directory {entry!r} holds no text files "
                                     f"({', '.join(sorted(TEXT_SUFFIXES | COLUMNAR_SUFFIXES))}, .jsonl)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise LongtrainError(f"data.corpus: path {entry!r} does not exist")
    if not files:
        raise LongtrainError("data.corpus is empty: name 'stdlib', files, directories or .jsonl files")
    return files


def _directory_files(root: Path) -> list[Path]:
    """Text, JSONL, parquet and Arrow files under root in path order; a `save_to_disk` directory inside it
    (state.json beside .arrow files) gives its data files only, in its own order, not its JSON metadata."""
    saved = sorted(p.parent for p in root.rglob("state.json") if any(p.parent.glob("*.arrow")))
    readable = TEXT_SUFFIXES | COLUMNAR_SUFFIXES | {".jsonl"}
    groups = [(str(d), saved_dataset_files(d)) for d in saved]
    for p in root.rglob("*"):
        if (p.is_file() and p.suffix in readable and p.parent not in saved
                and p.name != "dataset_dict.json"):  # a DatasetDict's index of its split directories
            groups.append((str(p), [p]))
    return [f for _, group in sorted(groups) for f in group]


def check_sources(files: list[Path], text_field: str = "text") -> None:
    """Before any work: every file can be opened, text files and JSONL are text, parquet and Arrow files
    have a string column text_field. Reads at most SNIFF_BYTES of each text file."""
    for path in files:
        if path.suffix in COLUMNAR_SUFFIXES:
            check_columnar(path, text_field)
            continue
        try:
            with path.open("rb") as f:
                head = f.read(SNIFF_BYTES)
        except OSError as e:
            raise LongtrainError(f"data.corpus: {path} cannot be read ({e.strerror or e})") from None
        _check_text(path, head)


def iter_documents(files: list[Path], text_field: str = "text", max_bytes: int | None = None) -> Iterator[str]:
    """Yield documents: one per text file (several, cut at line ends, when it is longer than PIECE_BYTES),
    one per JSONL line or parquet / Arrow row (its `text_field`). Reads at most max_bytes of the files in
    all: a text file is cut at the budget, a JSONL or columnar file stops before the record that would
    cross it. A file that is not text (NUL bytes, or mostly invalid UTF-8) is a LongtrainError naming it."""
    remaining = max_bytes if max_bytes is not None else float("inf")
    for path in files:
        if remaining <= 0:
            return
        first = remaining == (max_bytes if max_bytes is not None else float("inf"))
        if path.suffix == ".jsonl":
            docs = _jsonl_documents(path, text_field, remaining, first=first)
        elif path.suffix in COLUMNAR_SUFFIXES:
            docs = columnar_documents(path, text_field, remaining, first=first)
        else:
            docs = _text_documents(path, remaining)
        for doc, size in docs:
            remaining -= size
            if doc.strip():
                yield doc


SNIFF_BYTES = 1 << 16
MAX_INVALID_FRACTION = 0.1  # Latin-1 prose has a few percent of bytes that are not UTF-8; binaries far more


PIECE_BYTES = 4 << 20  # a text file longer than this becomes several documents, cut at line ends


def _check_text(path: Path, head: bytes) -> None:
    invalid = head.decode("utf-8", errors="replace").count("\ufffd")
    if b"\0" in head or invalid > MAX_INVALID_FRACTION * len(head):
        why = "NUL bytes" if b"\0" in head else f"{invalid} of {len(head)} bytes are not UTF-8"
        raise LongtrainError(f"data.corpus: {path} is not text ({why} in its first {len(head):,} bytes): remove it "
                             "from data.corpus, or list the text files to read")


def _text_documents(path: Path, budget: float) -> Iterator[tuple[str, int]]:
    """(text, bytes read) per piece of at most ~PIECE_BYTES of the first `budget` bytes of a text file.
    Pieces end at a line end (the tokenizer splits there anyway), so cutting changes no token but the EOS
    between pieces; a file without line ends is cut at PIECE_BYTES."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise LongtrainError(f"data.corpus: {path} cannot be read ({e.strerror or e})") from None
    # A cut at the budget can split a character: the incremental decoder drops that partial tail.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with f:
        pending, first = b"", True
        while True:
            size = min(PIECE_BYTES, budget)
            try:
                chunk = f.read(int(size))
            except OSError as e:
                raise LongtrainError(f"data.corpus: {path} cannot be read ({e.strerror or e})") from None
            if first:
                _check_text(path, chunk[:SNIFF_BYTES])
                first = False
            budget -= len(chunk)
            data = pending + chunk
            if len(chunk) < size or budget <= 0:  # end of file, or of the budget
                yield decoder.decode(data, final=len(chunk) < size), len(chunk)
                return
            cut = data.rfind(b"\n") + 1 or len(data)
            pending = data[cut:]
            yield decoder.decode(data[:cut]), len(chunk)


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
