"""Where the text comes from: Python's own standard library sources, text files, directories, JSONL.

Documents are read in a fixed order (sorted paths), so the same corpus gives the same token stream
on every machine with the same files.
"""
from __future__ import annotations

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
    """Yield documents: one per text file, one per JSONL line (its `text_field`). Stops after max_bytes."""
    total = 0
    for path in files:
        if path.suffix == ".jsonl":
            docs = _jsonl_documents(path, text_field)
        else:
            docs = [path.read_text(encoding="utf-8", errors="replace")]
        for doc in docs:
            if not doc.strip():
                continue
            yield doc
            total += len(doc.encode("utf-8", errors="replace"))
            if max_bytes is not None and total >= max_bytes:
                return


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LongtrainError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise LongtrainError(f"{path}:{number}: no field {text_field!r} (set data.text_field)")
            yield str(record[text_field])
