"""`longtrain train` end to end on a tiny recipe: outputs, one-line errors, exact resume, SIGTERM, damaged checkpoints."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import read_metrics, run_cli, tiny_recipe, write_recipe


def test_tiny_run_writes_outputs_and_learns(tiny):
    recipe, path = tiny
    proc = run_cli("train", path, "train.steps=24", check=True)
    run_dir = Path(recipe["run"]["dir"])
    records = read_metrics(run_dir)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    steps = [r for r in records if "loss" in r]
    assert evals[-1] < evals[0] * 0.9, evals
    assert {"step", "loss", "lr", "tokens_per_s", "mfu", "peak_memory_bytes"} <= set(steps[-1])
    assert "final_loss" in records[-1]
    assert (run_dir / "checkpoints" / "step_00000024" / "manifest.json").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "sample.txt").is_file()
    assert "MFU" in proc.stdout and "tok/s" in proc.stdout


def test_bf16_run_learns_and_notes_emulated_bfloat16(tiny):
    recipe, path = tiny
    proc = run_cli("train", path, "train.steps=24", "train.bf16=true", check=True)
    evals = [r["eval_loss"] for r in read_metrics(Path(recipe["run"]["dir"])) if "eval_loss" in r]
    assert evals[-1] < evals[0] * 0.9, evals
    from longtrain.trainer.metrics import measured_matmul_flops
    cpu = torch.device("cpu")
    # Rates differ many times over either way (emulated: ~70x slower; AVX512-BF16: ~2x faster).
    emulated = measured_matmul_flops(cpu, torch.bfloat16) < measured_matmul_flops(cpu)
    assert ("torch emulates them" in proc.stdout) == emulated, proc.stdout


def one_line_error(proc):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("override, expected", [
    ("train.stpes=3", "unknown key 'train.stpes' (did you mean 'steps'?)"),
    ("train.steps=lots", "train.steps: Input should be a valid integer"),
    ("train.micro_batch_size=0", "train.micro_batch_size: Input should be greater than 0"),
    ("model.d_model=-4", "model.d_model: Input should be greater than 0"),
    ("model.pattern=AMQ", "model.pattern='AMQ' has unknown letter(s) Q"),
    ("data.corpus=[/no/such/corpus]", "data.corpus: path '/no/such/corpus' does not exist"),
])
def test_bad_recipe_input_is_one_line_error(tiny, override, expected):
    _, path = tiny
    start = time.perf_counter()
    line = one_line_error(run_cli("train", path, override))
    assert expected in line
    assert time.perf_counter() - start < 30


def test_empty_and_too_small_corpora_are_one_line_errors(tiny, tmp_path):
    _, path = tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    assert "holds no text" in one_line_error(run_cli("train", path, f"data.corpus=[{empty}]"))
    small = tmp_path / "small.txt"
    small.write_text("def f(x):\n    return x\n" * 40)
    line = one_line_error(run_cli("train", path, f"data.corpus=[{small}]", "data.tokenizer.vocab_size=300",
                                  "model.vocab_size=300", "train.micro_batch_size=64"))
    assert "too small" in line or "smaller than one batch" in line


def params(checkpoint_dir):
    return torch.load(Path(checkpoint_dir) / "rank00000.pt", weights_only=True)["model"]


def test_sigkill_then_resume_is_bitwise_exact(tmp_path):
    steps = "train.steps=16"
    whole = write_recipe(tmp_path / "whole.yaml", tiny_recipe(tmp_path / "whole"))
    run_cli("train", whole, steps, check=True)
    killed_dir = tmp_path / "killed"
    killed = write_recipe(tmp_path / "killed.yaml", tiny_recipe(killed_dir))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "longtrain.launch.cli", "train", str(killed), steps],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    first = killed_dir / "checkpoints" / "step_00000004" / "manifest.json"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert "final_loss" not in (killed_dir / "metrics.jsonl").read_text()
    run_cli("train", killed, steps, "--resume", "auto", check=True)
    a, b = read_metrics(tmp_path / "whole"), read_metrics(killed_dir)
    assert a[-1]["final_loss"] == b[-1]["final_loss"]
    assert [r["loss"] for r in a if "loss" in r] == [r["loss"] for r in b if "loss" in r]
    pa, pb = params(tmp_path / "whole/checkpoints/step_00000016"), params(killed_dir / "checkpoints/step_00000016")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_sigterm_checkpoints_current_step(tiny):
    recipe, path = tiny
    run_dir = Path(recipe["run"]["dir"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "longtrain.launch.cli", "train", str(path), "train.steps=400",
                             "checkpoint.interval=1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not any("loss" in r for r in _safe_metrics(run_dir)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "received SIGTERM" in out
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(saved) == 1
    step = int(saved[0].name.split("_")[1])
    assert 2 <= step < 400
    assert torch.load(saved[0] / "rank00000.pt", weights_only=True)["step"] == step


def _safe_metrics(run_dir):
    try:
        return read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return []


def test_truncated_checkpoint_is_skipped_for_previous_complete_one(tiny):
    recipe, path = tiny
    run_dir = Path(recipe["run"]["dir"])
    run_cli("train", path, "train.steps=8", check=True)
    newest = run_dir / "checkpoints" / "step_00000008" / "rank00000.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    proc = run_cli("train", path, "train.steps=10", "--resume", "auto", check=True)
    assert "skipping checkpoint" in proc.stderr and "truncated" in proc.stderr
    assert "resumed from" in proc.stdout and "(step 4)" in proc.stdout


def test_pickled_code_in_checkpoint_is_refused(tiny):
    recipe, path = tiny
    run_dir = Path(recipe["run"]["dir"])
    run_cli("train", path, "train.steps=4", check=True)
    ckpt_dir = run_dir / "checkpoints" / "step_00000004"
    state = torch.load(ckpt_dir / "rank00000.pt", weights_only=True)
    state["payload"] = Exploit()
    torch.save(state, ckpt_dir / "rank00000.pt")
    # make the manifest agree, so only the unpickling guard stands in the way
    import json
    from longtrain.trainer.checkpoint import sha256
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    manifest["files"]["rank00000.pt"] = {"bytes": (ckpt_dir / "rank00000.pt").stat().st_size,
                                         "sha256": sha256(ckpt_dir / "rank00000.pt")}
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(run_cli("train", path, "train.steps=6", "--resume", str(ckpt_dir)))
    assert "refusing to load" in line and "rank00000.pt" in line
    assert not (run_dir / "pwned").exists()


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.getcwd()}/pwned",))
