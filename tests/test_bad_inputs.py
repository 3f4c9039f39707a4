"""Hostile and mistaken inputs (issue 17, groups 3 and 4): each is a one-line LongtrainError naming the field,
file or option and the fix, raised before expensive work; never a traceback, never a silent default.

Everything runs in process: `main([...])` returns 2 and prints `longtrain: error: ...` on stderr.
"""
import json
import pathlib
import shutil
import time

import numpy as np
import pytest
import yaml

from longtrain.launch.cli import main
from longtrain.trainer.config import load_recipe, recipe_from_dict
from longtrain.trainer.data.corpus import iter_documents
from longtrain.trainer.data.shards import prepare
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.parallel.plan import build_plan, partition
from tests.conftest import tiny_recipe, write_recipe

UNWRITABLE = "/sys/longtrain-test"  # sysfs refuses mkdir even to root (chmod does not bind root)


def refused(capsys, *argv) -> str:
    """Run the CLI; assert exit status 2 and a one-line error; return that line."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longtrain: error: ") and "\n" not in err and "Traceback" not in err, err
    assert len(err) < 700, err
    return err


@pytest.fixture
def recipe(tmp_path):
    """write(**sections) -> path of a tiny recipe under tmp_path, with the sections' keys replaced."""
    def write(name="tiny.yaml", **sections):
        return write_recipe(tmp_path / name, tiny_recipe(tmp_path / "run", **sections))
    return write


def passkey(tmp_path, **data):
    raw = tiny_recipe(tmp_path / "run", model={"pattern": "AF", "vocab_size": 32},
                      data={"task": "passkey", "passkey": {"digits": 3}, **data})
    del raw["data"]["corpus"], raw["data"]["max_bytes"], raw["data"]["tokenizer"]
    return write_recipe(tmp_path / "passkey.yaml", raw)


def text_corpus(path: pathlib.Path, size: int = 60_000) -> pathlib.Path:
    """A small text file of Python-like lines: enough to train a few-hundred-piece tokenizer in a second."""
    lines, i, total = [], 0, 0
    while total < size:
        lines.append(f"def function_{i % 97}(value, other={i}):\n    return value * {i % 13} + other  # note {i}\n")
        total += len(lines[-1])
        i += 1
    path.write_text("".join(lines))
    return path


def data_config(tmp_path, corpus, vocab=300, **data):
    return recipe_from_dict({"data": {"corpus": [str(c) for c in corpus], "seq_len": 16,
                                      "tokenizer": {"vocab_size": vocab}, **data},
                             "model": {"vocab_size": max(vocab, 512)}}).data


# ---- sizes that cannot fit: refused by the memory estimate before anything is allocated ----

def test_sequence_length_beyond_memory_is_refused_with_the_estimate(tmp_path, capsys):
    start = time.perf_counter()
    err = refused(capsys, "train", passkey(tmp_path), "data.seq_len=1000000000000")
    assert "estimated memory" in err and "exceeds this" in err and "data.seq_len=1000000000000" in err
    assert "PiB" in err or "EiB" in err
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("d_model", ["1000000000", "100000000"])
def test_model_width_beyond_memory_is_refused(tmp_path, capsys, d_model):
    err = refused(capsys, "train", passkey(tmp_path), f"model.d_model={d_model}", "model.n_heads=4",
                  "model.n_kv_heads=4")
    assert f"model.d_model={d_model}" in err
    assert "GiB" in err  # the machine's memory, against the estimate


def test_estimate_is_quick_for_a_long_pattern():
    start = time.perf_counter()
    assert partition([1.0] * 20_000, 4) == [0, 5000, 10000, 15000, 20000]
    recipe = recipe_from_dict({"model": {"pattern": "AF" * 5000}})
    assert build_plan(recipe, 1).max_memory_bytes > 0
    assert time.perf_counter() - start < 30


# ---- recipe files and directories ----

def test_binary_recipe_file(tmp_path, capsys):
    path = tmp_path / "ls.yaml"
    shutil.copy("/bin/ls", path)
    err = refused(capsys, "train", path)
    assert "ls.yaml is not a text file" in err


def test_run_dir_that_is_a_file(tmp_path, capsys, recipe):
    (tmp_path / "run").write_text("not a directory")
    err = refused(capsys, "train", recipe())
    assert "run.dir=" in err and "is a file" in err


@pytest.mark.parametrize("where", ["file-as-parent", "read-only"])
def test_run_dir_that_cannot_be_written(tmp_path, capsys, recipe, where):
    (tmp_path / "file").write_text("x")
    run_dir = tmp_path / "file" / "run" if where == "file-as-parent" else f"{UNWRITABLE}/run"
    err = refused(capsys, "train", recipe(), f"run.dir={run_dir}")
    assert f"run.dir='{run_dir}'" in err
    assert ("has a file among its parents" if where == "file-as-parent" else "cannot be written") in err
    assert not pathlib.Path(UNWRITABLE).exists()


def test_corrupted_tokenizer_in_the_run_dir(tmp_path):
    cfg = data_config(tmp_path, [text_corpus(tmp_path / "a.txt")])
    prepare(cfg, tmp_path / "data")
    (tmp_path / "data" / "tokenizer.model").write_bytes(b"\x08\x01garbage" * 50)
    with pytest.raises(LongtrainError, match=r"tokenizer.model is not a SentencePiece model .*: delete .*data to "
                                             r"prepare the data again"):
        prepare(cfg, tmp_path / "data")


@pytest.mark.parametrize("vocab", [300, 8000])
def test_binary_corpus_is_not_text(tmp_path, vocab):
    shutil.copy("/bin/ls", tmp_path / "ls.txt")
    cfg = data_config(tmp_path, [text_corpus(tmp_path / "a.txt"), tmp_path / "ls.txt"], vocab=vocab)
    with pytest.raises(LongtrainError, match=r"data.corpus: .*ls.txt is not text \(NUL bytes"):
        prepare(cfg, tmp_path / "data")


# ---- backends, YAML, types, widths ----

def test_unknown_kernel_backend_lists_the_choices(capsys, recipe):
    err = refused(capsys, "plan", recipe(), "kernels.attention=bogus", "--world-size", "1")
    assert "kernels.attention='bogus' is not a backend" in err and "auto, " in err and "reference" in err
    err = refused(capsys, "plan", recipe(), "kernels.scan=flash_attn", "--world-size", "1")
    assert "kernels.scan='flash_attn'" in err
    assert load_recipe(recipe(), ["kernels.attention=reference", "kernels.scan=reference"]).kernels.scan == "reference"


def test_yaml_alias_expansion_is_bounded(tmp_path, capsys):
    levels = [f"a: &a [{', '.join(['x'] * 9)}]"]
    for i in range(1, 9):
        levels.append(f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 9)}]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(levels) + "\ndata: {corpus: *i}\n")
    assert path.stat().st_size < 500
    start = time.perf_counter()
    err = refused(capsys, "plan", path, "--world-size", "1")
    assert "aliases" in err and time.perf_counter() - start < 10
    # a value that is merely long is shown shortened
    long = tmp_path / "long.yaml"
    long.write_text(yaml.safe_dump({"train": {"steps": ["x" * 50] * 5000}}))
    err = refused(capsys, "plan", long, "--world-size", "1")
    assert "train.steps" in err


def test_duplicate_keys_are_refused(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("name: dup\ntrain:\n  steps: 4\n  steps: 3\n")
    err = refused(capsys, "plan", path, "--world-size", "1")
    assert "line 4" in err and "'steps' is set twice" in err and "line 3" in err


def test_deep_nesting_is_one_line(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("name: deep\ndata: {corpus: " + "[" * 20_000 + "]" * 20_000 + "}\n")
    err = refused(capsys, "plan", path, "--world-size", "1")
    assert "nested" in err


@pytest.mark.parametrize("override, field", [("train.steps=true", "train.steps"), ("train.lr=true", "train.lr"),
                                             ("train.steps=2.5", "train.steps"), ("model.d_model='64'", "model.d_model"),
                                             ("train.lr=.inf", "train.lr"), ("train.warmup_steps=-1", "train.warmup_steps"),
                                             ("model.d_model=100000000000000000000000", "model.d_model")])
def test_types_are_strict(capsys, recipe, override, field):
    err = refused(capsys, "plan", recipe(), override, "--world-size", "1")
    assert f"{field}: Input should be" in err


def test_numbers_still_load(tmp_path, recipe):
    path = tmp_path / "numbers.yaml"
    path.write_text("train: {lr: 3e-3, grad_clip: 1, weight_decay: 1.0e-2, steps: 4}\nmodel: {rope_theta: 5E+5}\n")
    r = load_recipe(path, ["train.min_lr_ratio=1e-1"])
    assert (r.train.lr, r.train.grad_clip, r.train.weight_decay, r.train.steps) == (3e-3, 1.0, 1e-2, 4)
    assert r.model.rope_theta == 5e5 and r.train.min_lr_ratio == 0.1
    assert isinstance(r.train.grad_clip, float)


@pytest.mark.parametrize("ratio", ["0.001", "0.2", "1000"])
def test_mlp_ratio_is_bounded(capsys, recipe, ratio):
    err = refused(capsys, "plan", recipe(), f"model.mlp_ratio={ratio}", "--world-size", "1")
    assert f"model.mlp_ratio={float(ratio):g}" in err and "0.25 <= mlp_ratio <= 64" in err


def test_empty_recipe_is_refused_but_braces_mean_defaults(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    err = refused(capsys, "plan", empty, "--world-size", "1")
    assert "empty.yaml is empty" in err and "{}" in err
    braces = tmp_path / "defaults.yaml"
    braces.write_text("{}\n")
    assert load_recipe(braces).train.steps == 300


# ---- data ----

def test_non_utf8_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(LongtrainError, match=r"docs.jsonl:2: not UTF-8 text"):
        list(iter_documents([path]))


def test_tokenizer_path_that_is_not_sentencepiece(tmp_path, capsys, recipe):
    fake = tmp_path / "fake.model"
    fake.write_text("this is not a model\n")
    err = refused(capsys, "train", recipe(), f"data.tokenizer.path={fake}")
    assert "fake.model is not a SentencePiece model" in err and "data.tokenizer.path" in err
    assert not (tmp_path / "run" / "data").exists()  # refused in the preflight, before the corpus is read


def test_hostile_object_array_in_a_shard(tmp_path):
    cfg = data_config(tmp_path, [text_corpus(tmp_path / "a.txt")])
    prepare(cfg, tmp_path / "data")
    np.save(tmp_path / "data" / "train.docs.npy", np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(LongtrainError, match=r"train.docs.npy is damaged \(Object arrays cannot be loaded.*\): delete"):
        prepare(cfg, tmp_path / "data")


def test_max_bytes_bounds_reading(tmp_path, monkeypatch):
    text = text_corpus(tmp_path / "big.txt", size=2_000_000)
    records = tmp_path / "big.jsonl"
    records.write_text(json.dumps({"text": "small"}) + "\n" + json.dumps({"text": "y" * 2_000_000}) + "\n")
    read = [0]
    real_open = pathlib.Path.open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, *args):
            data = self.f.read(*args)
            read[0] += len(data)
            return data

        def readline(self, *args):
            return self.read_line(self.f.readline(*args))

        def read_line(self, line):
            read[0] += len(line)
            return line

        def __iter__(self):
            return (self.read_line(line) for line in self.f)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(pathlib.Path, "open", lambda self, *a, **k: Counting(real_open(self, *a, **k)))
    docs = list(iter_documents([text], max_bytes=50_000))  # a text file: cut at the budget
    assert read[0] <= 50_000 and 49_000 < sum(map(len, docs)) <= 50_000
    read[0] = 0
    docs = list(iter_documents([records, text], max_bytes=50_000))  # JSONL: stops inside the record that crosses it
    assert read[0] <= 50_000 and docs == ["small"]


# ---- eval, generate, report options ----

@pytest.mark.parametrize("args, named", [
    (["generate", "--temperature", "nan"], "--temperature nan"),
    (["generate", "--temperature", "-1"], "--temperature -1"),
    (["generate", "--temperature", "1e-9"], "--temperature 1e-09"),
    (["generate", "--temperature", "inf"], "--temperature inf"),
    (["generate", "--temperature", "0.8", "--top-p", "0"], "--top-p 0"),
    (["generate", "--temperature", "0.8", "--top-p", "-1"], "--top-p -1"),
    (["generate", "--top-p", "1.5"], "--top-p 1.5"),
    (["generate", "--prompt", ""], "--prompt ''"),
    (["generate", "--max-new-tokens", "-5"], "--max-new-tokens -5"),
    (["generate", "--threads", "-1"], "--threads -1"),
    (["eval", "--lengths", "0"], "--lengths '0'"),
    (["eval", "--lengths", "1x,0k"], "--lengths '0k'"),
    (["eval", "--batch-size", "-1"], "--batch-size -1"),
    (["eval", "--threads", "-1"], "--threads -1"),
    (["eval", "--samples", "-1"], "--samples -1"),
    (["eval", "--out", f"{UNWRITABLE}/eval"], f"--out '{UNWRITABLE}/eval' cannot be written"),
])
def test_eval_and_generate_options(tmp_path, capsys, args, named):
    command, *options = args
    err = refused(capsys, command, tmp_path / "no-run-needed", *options)  # refused before the checkpoint is read
    assert named in err


def metrics_run(tmp_path, lines) -> pathlib.Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


def test_report_out_unwritable(tmp_path, capsys):
    run = metrics_run(tmp_path, [json.dumps({"step": 1, "loss": 2.0, "tokens_per_s": 10.0})])
    err = refused(capsys, "report", run, "--out", f"{UNWRITABLE}/report.png")
    assert f"'{UNWRITABLE}' cannot be written" in err


def test_report_draws_what_it_can(tmp_path, capsys):
    run = metrics_run(tmp_path, [json.dumps({"step": 0, "eval_loss": 3.0}), json.dumps({"step": 1, "loss": 2.5}),
                                 "5", '["a list"]', json.dumps({"step": 2, "loss": 2.0, "lr": "high"}),
                                 '{"step": 3, "loss": 1.9'])
    assert main(["report", str(run)]) == 0
    captured = capsys.readouterr()
    assert "skipped line(s) 3, 4, 6: not a JSON object" in captured.err and "Traceback" not in captured.err
    assert (run / "plots" / "report.png").stat().st_size > 0
