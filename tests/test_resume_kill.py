"""Bitwise-exact resume at a fixed layout after a SIGKILL of one rank (issue: checkpoints, must-show 2).

For each layout of the parallelism list, `longtrain train` runs as separate processes with torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...): once straight through, and once killed — SIGKILL to the
last rank after a checkpoint exists, the other ranks torn down as torchrun does when a worker dies —
then resumed with `--resume auto`. Every logged loss and eval loss, and every rank's saved model and
optimizer tensors at the last step, must equal the straight run's bit for bit.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import read_metrics

STEPS = 6


def _recipe(run_dir, tp, pp, cp, zero):
    return {
        "name": "kill", "run": {"dir": str(run_dir), "seed": 0},
        "model": {"pattern": "AMOF", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 32, "d_state": 4,
                  "ode": {"solver": "rk4", "steps": 1}},
        "data": {"task": "passkey", "seq_len": 32, "passkey": {"digits": 3, "loss": "full"}},
        "train": {"steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                  "eval_interval": 3, "eval_batches": 1, "log_interval": 1, "sample_tokens": 0, "threads": 1},
        "checkpoint": {"interval": 2, "keep_last": 10},
        "parallel": {"tp": tp, "pp": pp, "cp": cp, "zero_stage": zero, "micro_batches": 2 if pp > 1 else 1},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(recipe_path, world, *extra):
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "longtrain.launch.cli", "train", str(recipe_path), *extra],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _finish(procs, timeout=600):
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{out[-3000:]}"
    return outputs


def _final_state(run_dir, world):
    final = Path(run_dir) / "checkpoints" / f"step_{STEPS:08d}"
    return [torch.load(final / f"rank{r:05d}.pt", weights_only=True) for r in range(world)]


def _tensors(tree, prefix=""):
    """(path, tensor) for every tensor in a nested state."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}[{i}]")


def _kill_and_resume(tmp_path, layout):
    tp, pp, cp, dp, zero = layout
    world = tp * pp * cp * dp
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for run_dir in (straight, killed):
        (tmp_path / f"{run_dir.name}.yaml").write_text(yaml.safe_dump(_recipe(run_dir, tp, pp, cp, zero)))
    _finish(_start(tmp_path / "straight.yaml", world))

    procs = _start(tmp_path / "killed.yaml", world)
    first = killed / "checkpoints" / f"step_{2:08d}" / "manifest.json"
    deadline = time.time() + 600
    while not first.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    assert first.exists(), "no checkpoint before the kill"
    procs[-1].send_signal(signal.SIGKILL)  # one rank dies ...
    procs[-1].wait()
    time.sleep(0.5)
    for p in procs[:-1]:  # ... and the launcher tears the others down
        p.kill()
    for p in procs:
        p.communicate()
    assert procs[-1].returncode == -signal.SIGKILL
    outputs = _finish(_start(tmp_path / "killed.yaml", world, "--resume", "auto"))
    assert "resumed from" in outputs[0]
    return read_metrics(straight), read_metrics(killed), _final_state(straight, world), _final_state(killed, world)


def _assert_bitwise(straight, killed, straight_state, killed_state):
    def by_step(records, key):
        return {r["step"]: r[key] for r in records if key in r}

    for key in ("loss", "eval_loss", "consumed_samples"):
        assert by_step(killed, key) == by_step(straight, key), key
    assert len(by_step(killed, "loss")) == STEPS
    for rank, (a, b) in enumerate(zip(straight_state, killed_state)):
        pairs = list(zip(_tensors({k: a[k] for k in ("model", "optimizer", "universal") if k in a}),
                         _tensors({k: b[k] for k in ("model", "optimizer", "universal") if k in b})))
        assert pairs
        for (name, x), (name_b, y) in pairs:
            assert name == name_b and torch.equal(x, y), (rank, name)


# (tp, pp, cp, dp, zero_stage): the parallelism list of tests/test_parallel_equivalence.py
DEFAULT = [(2, 1, 1, 1, 0)]
SLOW = [(1, 1, 1, 2, 1), (1, 2, 1, 1, 0), (1, 1, 2, 1, 0), (1, 1, 1, 2, 2), (1, 1, 1, 2, 3), (2, 2, 1, 1, 1),
        (1, 2, 2, 1, 1), (2, 1, 2, 1, 1), (2, 1, 1, 2, 3), (2, 2, 1, 1, 0), (2, 2, 2, 1, 1), (2, 2, 2, 2, 1)]
ids = "tp{}-pp{}-cp{}-dp{}-zero{}".format


@pytest.mark.distributed
@pytest.mark.parametrize("layout", DEFAULT, ids=lambda l: ids(*l))
def test_resume_after_sigkill_of_one_rank_is_bitwise(layout, tmp_path):
    _assert_bitwise(*_kill_and_resume(tmp_path, layout))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", SLOW, ids=lambda l: ids(*l))
def test_resume_after_sigkill_of_one_rank_is_bitwise_slow(layout, tmp_path):
    _assert_bitwise(*_kill_and_resume(tmp_path, layout))
