"""`longtrain data prepare`: shards byte-identical for any worker count, resume after a kill, never a
half-written set read, columnar inputs, one writer per directory, one-line errors."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from conftest import tiny_recipe, write_recipe
from longtrain.launch.cli import main
from longtrain.trainer.config import recipe_from_dict
from longtrain.trainer.data import corpus
from longtrain.trainer.data.corpus import iter_documents, resolve_sources
from longtrain.trainer.data.prepare import exclusive, prepare_data
from longtrain.trainer.data.shards import TokenShards, prepare
from longtrain.trainer.errors import LongtrainError

UNIT = 4_000  # characters per work unit: a small corpus still makes a dozen units


def make_corpus(root: Path) -> Path:
    """~80 kB: text files of stdlib-like code and prose, and a JSONL file."""
    root.mkdir(parents=True, exist_ok=True)
    source = Path(json.__file__).read_text()
    for i in range(8):
        (root / f"part{i}.py").write_text(source[i * 4000:(i + 1) * 4000 + 3000])
    with open(root / "records.jsonl", "w") as f:
        for i in range(150):
            f.write(json.dumps({"text": f"record {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1)}) + "\n")
    return root


def data_config(corpus_dir: Path, **data):
    return recipe_from_dict({"data": {"corpus": [str(corpus_dir)], "seq_len": 16, "max_bytes": 10_000_000,
                                      "tokenizer": {"vocab_size": 512}, **data},
                             "model": {"vocab_size": 512}}).data


def digests(data_dir: Path) -> dict:
    """sha256 of every published file (the lock file is empty when free; staging is gone)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(data_dir).iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(corpus dir, data config, digests of the one-worker shards)."""
    root = tmp_path_factory.mktemp("prep")
    cfg = data_config(make_corpus(root / "corpus"))
    done = prepare_data(cfg, root / "one", workers=1, unit_bytes=UNIT)
    assert done.units >= 10 and done.skipped == 0
    return root / "corpus", cfg, digests(root / "one")


@pytest.mark.parametrize("workers", [2, 3])
def test_shards_are_byte_identical_whatever_the_worker_count(reference, tmp_path, workers):
    _, cfg, expected = reference
    done = prepare_data(cfg, tmp_path / "data", workers=workers, unit_bytes=UNIT)
    assert digests(tmp_path / "data") == expected
    assert not list((tmp_path / "data").glob(".prepare-*"))  # staging removed after publishing
    shards = TokenShards(tmp_path / "data")
    train, starts = shards.splits["train"], shards.doc_starts["train"]
    assert np.all(train[starts[1:] - 1] == shards.tokenizer.eos_id)
    assert shards.meta["documents"] == len(list(iter_documents(resolve_sources(cfg.corpus))))
    assert done.units == shards.meta["units"] and done.skipped == 0


class Killed(Exception):
    pass


def stop_after(count: int, seen: list):
    def on_unit(index):
        seen.append(index)
        if len(seen) >= count:
            raise Killed
    return on_unit


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_after_a_kill_skips_finished_units_and_gives_the_same_shards(reference, tmp_path, workers):
    _, cfg, expected = reference
    seen = []
    with pytest.raises(Killed):
        prepare_data(cfg, tmp_path / "data", workers=workers, unit_bytes=UNIT, on_unit=stop_after(4, seen))
    assert not (tmp_path / "data" / "meta.json").exists()
    with pytest.raises(LongtrainError, match=r"meta.json is damaged .*: delete .* to prepare the data again"):
        TokenShards(tmp_path / "data")  # a half-finished set is never read as shards
    again = prepare_data(cfg, tmp_path / "data", workers=workers, unit_bytes=UNIT)
    assert again.skipped >= 4 and again.skipped < again.units
    assert digests(tmp_path / "data") == expected


def test_train_prepares_again_after_a_killed_prepare(reference, tmp_path):
    """train's implicit prepare (shards.prepare, unit size from the recipe defaults) over a killed run's leftovers."""
    _, cfg, _ = reference
    with pytest.raises(Killed):
        prepare_data(cfg, tmp_path / "data", unit_bytes=UNIT, on_unit=stop_after(2, []))
    clean = prepare(cfg, tmp_path / "clean")
    shards = prepare(cfg, tmp_path / "data")
    assert digests(tmp_path / "data") == digests(tmp_path / "clean")
    assert np.array_equal(shards.splits["eval"], clean.splits["eval"])


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from longtrain.trainer.config import recipe_from_dict
    from longtrain.trainer.data.prepare import prepare_data
    cfg = recipe_from_dict({"data": {"corpus": [sys.argv[1]], "seq_len": 16, "max_bytes": 10_000_000,
                                     "tokenizer": {"vocab_size": 512}}, "model": {"vocab_size": 512}}).data
    prepare_data(cfg, sys.argv[2], workers=2, unit_bytes=int(sys.argv[3]), on_unit=lambda i: time.sleep(0.3))
""")


def test_sigkilled_prepare_resumes_to_the_same_shards(reference, tmp_path):
    corpus_dir, cfg, expected = reference
    data_dir = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(corpus_dir), str(data_dir), str(UNIT)],
                            start_new_session=True)
    deadline = time.time() + 120
    while len(list(data_dir.glob(".prepare-*/parts/*.lens.npy"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers, mid-run
    proc.wait()
    assert not (data_dir / "meta.json").exists()
    again = prepare_data(cfg, data_dir, workers=2, unit_bytes=UNIT)
    assert again.skipped >= 3
    assert digests(data_dir) == expected


def test_a_second_writer_is_refused_naming_the_holder(reference, tmp_path):
    _, cfg, _ = reference
    with exclusive(tmp_path / "data"):
        with pytest.raises(LongtrainError, match=rf"is being prepared by another process \(pid {os.getpid()}, lock"):
            prepare_data(cfg, tmp_path / "data", unit_bytes=UNIT)
    prepare_data(cfg, tmp_path / "data", unit_bytes=UNIT)  # free again once released


def test_training_ranks_never_tokenize(reference, tmp_path, monkeypatch):
    _, cfg, _ = reference
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(LongtrainError, match=r"holds no prepared data .* \(rank 1\): put run.dir on storage"):
        prepare(cfg, tmp_path / "data")
    assert not (tmp_path / "data").exists()


# ---- inputs ----

ROWS = ["first row", "", "second row\nwith two lines", "third ✓ row"]


def test_parquet_arrow_stream_and_jsonl_inputs(tmp_path):
    table = pa.table({"text": ROWS, "id": list(range(len(ROWS)))})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=2)
    saved = tmp_path / "saved"  # the layout of datasets.Dataset.save_to_disk: IPC streams and their state.json
    saved.mkdir()
    for i, part in enumerate([table.slice(0, 2), table.slice(2)]):
        with ipc.new_stream(str(saved / f"data-{i:05d}-of-00002.arrow"), table.schema) as writer:
            writer.write_table(part, max_chunksize=1)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00001-of-00002.arrow"},
                                                                 {"filename": "data-00000-of-00002.arrow"}]}))
    (saved / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    with ipc.new_file(str(tmp_path / "file.arrow"), table.schema) as writer:  # the IPC file format too
        writer.write_table(table)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in ROWS))
    expected = [r for r in ROWS if r]
    for entry in ["rows.parquet", "saved", "file.arrow", "rows.jsonl"]:
        files = resolve_sources([str(tmp_path / entry)])
        corpus.check_sources(files)
        docs = list(iter_documents(files))
        assert docs == (expected[1:] + expected[:1] if entry == "saved" else expected), entry  # state.json order


def test_a_dataset_dict_directory_reads_its_splits_not_its_metadata(tmp_path):
    table = pa.table({"text": ["a b c", "d e f"]})
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        with ipc.new_stream(str(tmp_path / split / "data-00000-of-00001.arrow"), table.schema) as writer:
            writer.write_table(table)
        (tmp_path / split / "state.json").write_text("{}")
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert [f.parent.name for f in resolve_sources([str(tmp_path)])] == ["test", "train"]


def test_columnar_file_without_the_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "rows.parquet")
    with pytest.raises(LongtrainError, match=r"rows.parquet has no column 'text' \(columns: body\): set data.text_field"):
        corpus.check_sources(resolve_sources([str(tmp_path / "rows.parquet")]))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(LongtrainError, match=r"column 'text' of .*ints.parquet holds int64, not text"):
        corpus.check_sources([tmp_path / "ints.parquet"])
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(LongtrainError, match=r"fake.parquet is not a parquet file"):
        corpus.check_sources([tmp_path / "fake.parquet"])


def test_columnar_max_bytes_stops_before_the_row_that_crosses_it(tmp_path):
    pq.write_table(pa.table({"text": ["aaaa", "bbbb", "cccc"]}), tmp_path / "rows.parquet")
    assert list(iter_documents([tmp_path / "rows.parquet"], max_bytes=9)) == ["aaaa", "bbbb"]


def test_a_long_text_file_streams_in_pieces_cut_at_line_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "PIECE_BYTES", 1000)
    text = "".join(f"line {i} ✓ {'x' * (i % 50)}\n" for i in range(400))
    (tmp_path / "long.txt").write_text(text)
    pieces = list(iter_documents([tmp_path / "long.txt"]))
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(p.endswith("\n") for p in pieces)


# ---- the command ----

def refused(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longtrain: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def small_recipe(tmp_path, run_dir, corpus_entries):
    raw = tiny_recipe(run_dir, data={"corpus": [str(c) for c in corpus_entries], "max_bytes": 300_000, "seq_len": 16,
                                     "tokenizer": {"vocab_size": 512}})
    return write_recipe(tmp_path / f"{Path(run_dir).name}.yaml", raw)


def test_cli_one_line_errors(tmp_path, capsys, reference):
    corpus_dir = reference[0]
    good = small_recipe(tmp_path, tmp_path / "run", [corpus_dir])
    assert "--workers 0: give 1 or more" in refused(capsys, "data", "prepare", good, "--workers", "0")
    assert "--workers -2" in refused(capsys, "data", "prepare", good, "--workers", "-2")
    missing = small_recipe(tmp_path, tmp_path / "run", [tmp_path / "nope"])
    err = refused(capsys, "data", "prepare", missing)
    assert "data.corpus: path" in err and "nope' does not exist" in err
    shutil.copy("/bin/ls", tmp_path / "ls.txt")
    binary = small_recipe(tmp_path, tmp_path / "run", [corpus_dir, tmp_path / "ls.txt"])
    assert "ls.txt is not text (NUL bytes" in refused(capsys, "data", "prepare", binary)
    unreadable = tmp_path / "secret.txt"
    unreadable.write_text("x")
    unreadable.chmod(0)
    if not os.access(unreadable, os.R_OK):  # root reads anything
        assert "secret.txt cannot be read" in refused(capsys, "data", "prepare",
                                                      small_recipe(tmp_path, tmp_path / "run", [unreadable]))
    assert not (tmp_path / "run" / "data").exists()  # every refusal came before any work


def test_cli_lock_refusal_names_the_holder(tmp_path, capsys, reference):
    recipe = small_recipe(tmp_path, tmp_path / "run", [reference[0]])
    with exclusive(tmp_path / "run" / "data"):
        assert f"(pid {os.getpid()}, lock" in refused(capsys, "data", "prepare", recipe)


def test_two_node_local_directories_get_identical_shards_and_train_reuses_them(tmp_path, capsys, reference):
    """Each node prepares into its own storage: same files and recipe, byte-identical shards."""
    for node, workers in (("node0", "1"), ("node1", "2")):
        recipe = small_recipe(tmp_path, tmp_path / node, [reference[0]])
        assert main(["data", "prepare", str(recipe), "--workers", workers]) == 0
        assert "documents" in capsys.readouterr().out
    assert digests(tmp_path / "node0" / "data") == digests(tmp_path / "node1" / "data")
    mtime = (tmp_path / "node0" / "data" / "train.bin").stat().st_mtime_ns
    cfg = recipe_from_dict(tiny_recipe(tmp_path / "node0", data={"corpus": [str(reference[0])], "max_bytes": 300_000,
                                                                 "seq_len": 16, "tokenizer": {"vocab_size": 512}})).data
    prepare(cfg, tmp_path / "node0" / "data")  # what train calls: reused, not rebuilt
    assert (tmp_path / "node0" / "data" / "train.bin").stat().st_mtime_ns == mtime
    assert main(["data", "prepare", str(tmp_path / "node0.yaml")]) == 0
    assert "already prepared" in capsys.readouterr().out
