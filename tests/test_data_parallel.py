"""Data parallelism through torchrun: two ranks on gloo train exactly what one process trains on
the same global batch (same samples, losses averaged over all tokens)."""
import os
import socket
import subprocess
import sys

from conftest import read_metrics, run_cli, tiny_recipe, write_recipe


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dp2_under_torchrun_matches_one_process(tmp_path):
    steps = ["train.steps=6", "train.log_interval=1", "train.sample_tokens=0"]
    single = write_recipe(tmp_path / "one.yaml", tiny_recipe(tmp_path / "one", train={"micro_batch_size": 4}))
    run_cli("train", single, *steps, check=True)
    double = write_recipe(tmp_path / "two.yaml", tiny_recipe(tmp_path / "two", train={"micro_batch_size": 2}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                           "-m", "longtrain.launch.torchrun", str(double), *steps],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    two = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)
