"""Documents from columnar datasets: parquet files and Arrow IPC files, read a batch at a time with pyarrow.

`datasets.Dataset.save_to_disk(DIR)` writes DIR/data-*.arrow as Arrow IPC *streams* with state.json
(the file order) and dataset_info.json beside them; `to_parquet` writes one parquet file. Only the
text column is read, in record batches, so memory stays bounded whatever the file size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from longtrain.trainer.errors import LongtrainError

COLUMNAR_SUFFIXES = {".parquet", ".arrow"}
BATCH_ROWS = 256  # parquet read granularity; Arrow streams keep the batches they were written with


def saved_dataset_files(directory: Path) -> list[Path]:
    """The data-*.arrow files of a `save_to_disk` directory, in the order its state.json lists them."""
    try:
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):  # an older or hand-made layout: name order
        return sorted(directory.glob("*.arrow"))
    return [directory / name for name in names]


def _open_arrow(path: Path):
    """A record-batch reader over an .arrow file: an IPC stream (save_to_disk) or an IPC file."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    source = pa.OSFile(str(path))  # not a memory map: pages read stay out of this process's resident set
    try:
        return ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        file_reader = ipc.open_file(source)
        return file_reader.to_reader() if hasattr(file_reader, "to_reader") else _file_batches(file_reader)


class _file_batches:
    """Record-batch iteration over an IPC file reader (pyarrow without RecordBatchFileReader.to_reader)."""

    def __init__(self, reader):
        self.reader, self.schema = reader, reader.schema

    def __iter__(self):
        return (self.reader.get_batch(i) for i in range(self.reader.num_record_batches))


def _schema(path: Path):
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return pq.ParquetFile(str(path)).schema_arrow
    return _open_arrow(path).schema


def check_columnar(path: Path, text_field: str) -> None:
    """Open the file's schema and check it has a text column named text_field; LongtrainError otherwise."""
    import pyarrow as pa

    kind = "parquet" if path.suffix == ".parquet" else "Arrow IPC"
    try:
        schema = _schema(path)
    except OSError as e:
        raise LongtrainError(f"data.corpus: {path} cannot be read ({e.strerror or e})") from None
    except (pa.ArrowException, ValueError) as e:
        reason = " ".join(str(e).split())[:160]
        raise LongtrainError(f"data.corpus: {path} is not a {kind} file ({reason}): remove it from data.corpus") from None
    if text_field not in schema.names:
        raise LongtrainError(f"data.corpus: {path} has no column {text_field!r} (columns: "
                             f"{', '.join(schema.names[:12])}): set data.text_field")
    field_type = schema.field(text_field).type
    if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        raise LongtrainError(f"data.corpus: column {text_field!r} of {path} holds {field_type}, not text: "
                             "set data.text_field to a string column")


def _batches(path: Path, text_field: str) -> Iterator:
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        yield from pq.ParquetFile(str(path)).iter_batches(batch_size=BATCH_ROWS, columns=[text_field])
    else:
        for batch in _open_arrow(path):
            yield batch.select([text_field])


def columnar_documents(path: Path, text_field: str, budget: float, first: bool) -> Iterator[tuple[str, int]]:
    """(text, UTF-8 bytes) per row of the text column, up to `budget` bytes: stops before the row that would
    cross it (as a JSONL file does). first: nothing was read before this file, so a first row longer than the
    budget is an error, not an empty corpus. Null rows are empty documents."""
    import pyarrow.compute as pc

    check_columnar(path, text_field)
    number = 0
    for batch in _batches(path, text_field):
        column = batch.column(0)
        sizes = pc.binary_length(column).to_pylist()
        for text, size in zip(column.to_pylist(), sizes):
            number += 1
            size = size or 0
            if size > budget:
                if first and number == 1:
                    raise LongtrainError(f"{path}: row 1 is longer than data.max_bytes={int(budget)}; "
                                         "raise data.max_bytes")
                yield "", size
                return
            budget -= size
            yield text or "", size
