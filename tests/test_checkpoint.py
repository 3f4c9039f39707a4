"""Checkpoint integrity: `longtrain ckpt verify` catches a flipped byte, kill -9 during a write never
leaves a loadable half checkpoint, and conversion to safetensors gives the trained weights."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli, tiny_recipe, write_recipe
from longtrain.trainer import checkpoint as ckpt
from longtrain.trainer.errors import LongtrainError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    path = write_recipe(root / "tiny.yaml", tiny_recipe(root / "run"))
    run_cli("train", path, "train.steps=8", check=True)
    return root / "run" / "checkpoints"


def test_verify_and_inspect(trained):
    proc = run_cli("ckpt", "verify", trained / "step_00000008", check=True)
    assert proc.stdout.startswith("ok:")
    proc = run_cli("ckpt", "inspect", trained.parent, check=True)  # a run dir resolves to its newest checkpoint
    assert '"step": 8' in proc.stdout and '"consumed_samples": 32' in proc.stdout


def test_flipped_byte_is_detected_by_verify_and_on_load(trained, tmp_path):
    import shutil
    copy = tmp_path / "step_00000008"
    shutil.copytree(trained / "step_00000008", copy)
    shard = copy / "rank00000.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    proc = run_cli("ckpt", "verify", copy)
    assert proc.returncode == 2
    assert "rank00000.pt fails its sha256 check" in proc.stderr and "Traceback" not in proc.stderr
    # picking the checkpoint reads no weights (sizes only); the rank that reads the file checks its sha256
    assert ckpt.resolve(str(copy), tmp_path) == copy
    with pytest.raises(LongtrainError, match="rank00000.pt fails its sha256 check"):
        ckpt.load_rank_state(copy, 0)


def test_convert_to_safetensors(trained, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "model.safetensors"
    run_cli("ckpt", "convert", trained / "step_00000008", out, check=True)
    weights = load_file(str(out))
    state = torch.load(trained / "step_00000008" / "rank00000.pt", weights_only=True)["model"]
    assert weights.keys() == state.keys() and all(torch.equal(weights[k], state[k]) for k in state)


def test_kill_during_checkpoint_write_resumes_from_previous_complete(tmp_path):
    """SIGKILL while the .tmp directory of a checkpoint exists: the next run ignores it and resumes
    from the previous complete checkpoint; the half-written one is never loaded."""
    run_dir = tmp_path / "run"
    path = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(run_dir))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "longtrain.launch.cli", "train", str(path), "train.steps=400",
                             "checkpoint.interval=1", "checkpoint.keep_last=400"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    root = run_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if root.is_dir() and any(p.name.startswith(".tmp_step_") for p in root.iterdir()) and \
                len([p for p in root.iterdir() if p.name.startswith("step_")]) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    complete = ckpt.latest(root)
    assert complete is not None
    leftovers = [p for p in root.iterdir() if not ckpt.STEP_DIR.match(p.name)]
    step = int(complete.name.split("_")[1])
    out = run_cli("train", path, f"train.steps={step + 2}", "checkpoint.interval=1", "--resume", "auto", check=True)
    assert f"(step {step})" in out.stdout
    # a step directory without manifest (a crash between rename and manifest cannot happen, but a user
    # copy can) is skipped as incomplete
    fake = root / "step_99999999"
    fake.mkdir()
    assert ckpt.latest(root) != fake
    assert leftovers == [] or all(p.name.startswith(".tmp_step_") for p in leftovers)
