"""A run never loses or corrupts an earlier run's outputs without being asked, and every damaged or mismatched
checkpoint is a one-line refusal (issue 17, hardening: data loss).

One tiny run is trained in-process (text task, checkpoints at steps 2 and 4); each test works on a copy of its
run directory. Refusals come before any model or process group exists, so most tests take well under a second.
"""
import errno
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import read_metrics, tiny_recipe
from longtrain.trainer import checkpoint as ckpt
from longtrain.trainer.errors import LongtrainError

STEPS = 4


pytestmark = pytest.mark.usefixtures("restore_environment")  # conftest.py


def _recipe(run_dir, **sections):
    from longtrain.trainer.config import recipe_from_dict

    recipe = tiny_recipe(run_dir, checkpoint={"interval": 2, "keep_last": 3})
    recipe["train"].update(steps=STEPS, eval_interval=STEPS, sample_tokens=0)
    for dotted, value in sections.items():  # "model__pattern" -> recipe["model"]["pattern"]
        *parents, key = dotted.split("__")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return recipe_from_dict(recipe)


def _train(run_dir, resume=None, overwrite=False, **sections):
    from longtrain.trainer.loop import train

    return train(_recipe(run_dir, **sections), resume=resume, **({"overwrite": True} if overwrite else {}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    _train(run_dir)
    return run_dir


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run directory, free to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in Path(root).glob("step_*") if p.is_dir())


def _snapshot(run_dir: Path) -> dict:
    """Every file of a run dir -> its bytes' sha256: 'untouched' means equal snapshots."""
    return {str(p.relative_to(run_dir)): ckpt.sha256(p) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("longtrain: error:") and "Traceback" not in err, err
    return lines[0]


def _cli(*args) -> int:
    from longtrain.launch.cli import main

    return main([str(a) for a in args])


def _reseal(checkpoint: Path, edit=None) -> None:
    """Rewrite the manifest so its sizes and hashes match the files again (a deliberate forgery)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name in manifest["files"]:
        file = checkpoint / name
        manifest["files"][name] = {"bytes": file.stat().st_size, "sha256": ckpt.sha256(file)}
    if edit is not None:
        edit(manifest)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ---- a new run over an earlier one ----

def test_new_run_over_checkpoints_is_refused_and_overwrite_starts_over(run):
    before = _snapshot(run)
    with pytest.raises(LongtrainError, match=re.escape(f"run dir {run} already holds checkpoints up to step 4: add "
                                                       "--resume auto, choose another run.dir, or pass --overwrite")):
        _train(run, run__seed=1)
    assert _snapshot(run) == before
    with pytest.raises(LongtrainError, match="--overwrite starts .* and --resume auto continues it"):
        _train(run, resume="auto", overwrite=True)
    _train(run, overwrite=True, train__steps=2, run__seed=1)
    assert _steps(run / "checkpoints") == ["step_00000002"]
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == [2] and "final_loss" in records[-1]
    assert not list(run.glob(".overwritten-*")) and (run / "data" / "meta.json").is_file()


def test_run_that_died_before_its_first_checkpoint_is_refused_too(run):
    shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    with pytest.raises(LongtrainError, match="already holds the metrics.jsonl and tensorboard of an earlier run that "
                                             "stopped before its first checkpoint: choose another run.dir, or pass "
                                             "--overwrite"):
        _train(run)
    assert _snapshot(run) == before


# ---- ckpt convert ----

def test_convert_never_writes_into_a_checkpoint(run, tmp_path, capsys):
    step4 = run / "checkpoints" / "step_00000004"
    before = _snapshot(run)
    for out in (step4 / "rank00000.pt", step4 / "model.safetensors", run / "checkpoints" / "model.safetensors", step4):
        assert _cli("ckpt", "convert", step4, out) == 2
        assert ("is the checkpoint it reads" if out == step4 else "is inside checkpoint directory") in _one_line(capsys)
    assert _snapshot(run) == before
    (tmp_path / "a_file").write_text("")
    assert _cli("ckpt", "convert", step4, tmp_path / "a_file" / "model.safetensors") == 2
    assert "cannot write in" in _one_line(capsys)


# ---- resuming another model or tokenizer ----

@pytest.mark.parametrize("field, value, saved", [("model__pattern", "AM", "'AMOF'"), ("model__d_model", 64, "32"),
                                                 ("data__tokenizer__vocab_size", 400, "512"),
                                                 ("model__tie_embeddings", False, "True")])
def test_resume_of_another_architecture_or_tokenizer_is_refused(run, field, value, saved):
    before = _snapshot(run)
    name = field.replace("__", ".")
    with pytest.raises(LongtrainError, match=rf"^{name}={value!r} differs from the checkpoint's {name}={saved} "):
        _train(run, resume="auto", train__steps=6, **{field: value})
    assert _snapshot(run) == before


def test_changed_data_settings_never_rewrite_the_prepared_data(run):
    before = _snapshot(run)
    with pytest.raises(LongtrainError, match=r"data.max_bytes=200000 differs from the data.max_bytes=300000 that "
                                             r"prepared .*: set data.max_bytes=300000 to resume"):
        _train(run, resume="auto", train__steps=6, data__max_bytes=200_000)
    assert _snapshot(run) == before


def test_tokenizer_hash_is_checked_by_resume_eval_and_generate(run, tmp_path):
    """data/tokenizer.model replaced (as re-tokenizing in place did): every reader of step 4 refuses it."""
    from longtrain.trainer.data.shards import prepare
    from longtrain.trainer.eval import load_checkpoint

    other = prepare(_recipe(tmp_path / "other", data__tokenizer__vocab_size=400).data, tmp_path / "other" / "data")
    shutil.copy(other.tokenizer.path, run / "data" / "tokenizer.model")
    with pytest.raises(LongtrainError, match=r"tokenizer.model \(sha256 \w+\) is not the tokenizer checkpoint .*"
                                             r"step_00000004 was trained with"):
        load_checkpoint(run)  # eval and generate
    with pytest.raises(LongtrainError, match=r"is not the tokenizer checkpoint .*step_00000004 was trained with"):
        _train(run, resume="auto", train__steps=6)
    assert not (run / "checkpoints" / "step_00000006").exists()


# ---- lost or damaged manifests ----

def test_resume_auto_with_every_manifest_lost_is_refused(run):
    for step in _steps(run / "checkpoints"):
        (run / "checkpoints" / step / "manifest.json").unlink()
    before = _snapshot(run)
    with pytest.warns(RuntimeWarning, match="no manifest.json"), \
            pytest.raises(LongtrainError, match=r"--resume auto: .* holds step_00000002, step_00000004 but no "
                                                "complete checkpoint"):
        _train(run, resume="auto", train__steps=6)
    assert _snapshot(run) == before


@pytest.mark.parametrize("manifest", ["{}", "[1, 2]", '{"step": 4, "world_size": 1, "layout": {}, "files": []}'])
def test_malformed_manifest_is_skipped_like_a_damaged_checkpoint(run, manifest, capsys):
    from longtrain.trainer.eval import load_checkpoint

    step4 = run / "checkpoints" / "step_00000004"
    (step4 / "manifest.json").write_text(manifest)
    with pytest.warns(RuntimeWarning, match="skipping checkpoint: checkpoint .*step_00000004: manifest.json"):
        assert ckpt.latest(run / "checkpoints").name == "step_00000002"
    assert _cli("ckpt", "verify", step4) == 2
    assert "manifest.json" in _one_line(capsys)
    with pytest.warns(RuntimeWarning):
        assert load_checkpoint(run)[3].name == "step_00000002"


@pytest.mark.parametrize("unlisted", ["rank00000.pt", "recipe.yaml", "extra.bin"])
def test_verify_rejects_a_file_the_manifest_does_not_list(run, unlisted, capsys):
    step4 = run / "checkpoints" / "step_00000004"
    if unlisted == "extra.bin":
        (step4 / unlisted).write_bytes(b"\0" * 16)
    else:
        manifest = json.loads((step4 / "manifest.json").read_text())
        del manifest["files"][unlisted]
        (step4 / "manifest.json").write_text(json.dumps(manifest))
        _flip_byte(step4 / unlisted)
    assert _cli("ckpt", "verify", step4) == 2
    assert unlisted in _one_line(capsys)
    with pytest.warns(RuntimeWarning, match="skipping checkpoint"):
        assert ckpt.latest(run / "checkpoints").name == "step_00000002"  # what resume takes


def test_raw_pickle_in_place_of_a_rank_file_is_refused_by_every_reader(run, tmp_path, capsys):
    from longtrain.trainer.eval import load_checkpoint

    step4 = run / "checkpoints" / "step_00000004"
    state = torch.load(step4 / "rank00000.pt", weights_only=True)
    with open(step4 / "rank00000.pt", "wb") as f:
        pickle.dump(state, f)  # plain pickle, not torch.save's zip archive
    _reseal(step4)
    for command in (("ckpt", "inspect", step4), ("ckpt", "convert", step4, tmp_path / "m.safetensors"),
                    ("generate", step4, "--max-new-tokens", "2"), ("eval", step4, "--samples", "2")):
        assert _cli(*command) == 2, command
        assert "rank00000.pt" in _one_line(capsys)
    with pytest.raises(LongtrainError, match="refusing to load .*rank00000.pt"):
        load_checkpoint(step4)
    with pytest.raises(LongtrainError, match="refusing to load .*rank00000.pt"):
        ckpt.load_rank_state(step4, 0, mmap=True)


# ---- save() and prune() touch only the run's own checkpoints ----

def _fake_save(root, step, keep_last):
    recipe_text = "name: fake\n"
    return ckpt.save(root, step, {"step": step, "w": torch.zeros(2)}, {"world_size": 1, "layout": {}}, recipe_text,
                     keep_last=keep_last)


def test_prune_never_deletes_checkpoints_newer_than_the_runs_own(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_save(root, 8, keep_last=1)  # an earlier run that got further
    _fake_save(root, 4, keep_last=1)  # sorted by name, keep_last=1 kept step 8 and deleted this one
    assert _steps(root) == ["step_00000004", "step_00000008"]


def test_save_sets_aside_a_step_dir_it_did_not_write(tmp_path):
    root = tmp_path / "checkpoints"
    foreign = ckpt.step_dir(root, 4)
    foreign.mkdir(parents=True)
    (foreign / "rank00000.pt").write_bytes(b"weights of a checkpoint whose manifest was lost")
    with pytest.warns(RuntimeWarning, match="not written by this run"):
        _fake_save(root, 4, keep_last=1)
    assert (root / "step_00000004.replaced" / "rank00000.pt").read_bytes().startswith(b"weights")
    assert ckpt.verify(foreign)["step"] == 4


def test_resume_from_an_older_checkpoint_never_replaces_newer_complete_ones(run):
    before = _snapshot(run)
    with pytest.raises(LongtrainError, match=r"holds newer complete checkpoints \(step_00000004\) that this run would "
                                             "replace"):
        _train(run, resume=str(run / "checkpoints" / "step_00000002"), train__steps=6)
    assert _snapshot(run) == before


# ---- a failed checkpoint write ----

def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    from longtrain.trainer import checkpoint

    real, calls = checkpoint._save, []

    def save_until_full(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(obj, path)

    monkeypatch.setattr(checkpoint, "_save", save_until_full)
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    with pytest.raises(LongtrainError) as failed:
        _train(run_dir)
    assert str(failed.value) == (f"checkpoint of step 4 could not be written to {root}: no space left on device; the "
                                 f"previous checkpoint {root / 'step_00000002'} is intact: free space under {root} "
                                 "and continue with --resume auto")
    assert [p.name for p in root.iterdir()] == ["step_00000002"]  # no temporary directory left
    assert ckpt.verify(root / "step_00000002")["step"] == 2


# ---- errors that name the right thing ----

def test_eval_errors_name_what_is_wrong_with_the_path(tmp_path, capsys):
    from longtrain.trainer.eval import load_checkpoint

    with pytest.raises(LongtrainError, match=r"^\S+/missing does not exist: give a run directory"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "notes").mkdir()
    with pytest.raises(LongtrainError, match=r"^\S+/notes is not a run or checkpoint directory"):
        load_checkpoint(tmp_path / "notes")
    assert _cli("eval", tmp_path / "missing") == 2
    assert "does not exist" in _one_line(capsys)
