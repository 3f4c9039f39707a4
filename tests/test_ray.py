"""`longtrain launch ray`: Ray Train workers train what torchrun trains; a killed worker costs a restart,
not a result; bad input fails in one line within a minute.

The slow tests start real Ray instances (each with its own RAY_TMPDIR, stopped by process group at
the end) and need about 2 GB and two CPUs; run them with `pytest -m slow tests/test_ray.py`.
"""
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import read_metrics, run_cli, tiny_recipe, write_recipe

STEPS = ["train.steps=6", "train.log_interval=1", "train.sample_tokens=0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_env():
    """The environment for one Ray instance: its own short RAY_TMPDIR (Ray's socket paths must fit in 107
    bytes, so not under pytest's tmp_path), auth stated on both sides, no log deduplication."""
    tmp = tempfile.mkdtemp(prefix="lt-ray-", dir="/tmp")
    try:
        yield {**os.environ, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def launch(*args, env, timeout=600) -> subprocess.CompletedProcess:
    """`longtrain launch ray ...` in its own process group, killed whole if it outlives the timeout."""
    proc = subprocess.Popen([sys.executable, "-m", "longtrain.launch.cli", "launch", "ray", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def assert_close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) and a, (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("longtrain: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, \
        proc.stdout[-2000:] + proc.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_killed_worker_restarts_group_from_checkpoint(tmp_path):
    """SIGKILL rank 1 right after the step-4 checkpoint of a local Ray run; the run ends with the losses
    of an uninterrupted one (one process, the same global batch)."""
    with ray_env() as env:
        _killed_worker_run(tmp_path, env)


def _killed_worker_run(tmp_path: Path, env: dict) -> None:
    steps = ["train.steps=10", "train.log_interval=1", "train.sample_tokens=0", "checkpoint.interval=4"]
    recipe = write_recipe(tmp_path / "ray.yaml", tiny_recipe(tmp_path / "ray", train={"micro_batch_size": 2}))
    proc = subprocess.Popen([sys.executable, "-m", "longtrain.launch.cli", "launch", "ray", str(recipe), *steps,
                             "--num-workers", "2", "--max-failures", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(600, stop_group, [proc])
    watchdog.start()
    lines, pids, killed = [], {}, None
    try:
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"longtrain: ray worker rank (\d+)/2 pid (\d+)", line):
                pids[int(m.group(1))] = int(m.group(2))
            if killed is None and "checkpoints/step_00000004" in line and "checkpoint:" in line:
                killed = pids[1]
                os.kill(killed, signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
        stop_group(proc)
    log = "".join(lines)
    assert proc.returncode == 0 and killed is not None, log[-5000:]
    assert re.search(rf"ray worker rank 1 died \(pid {killed}\b", log), log[-5000:]
    resumed = re.search(r"resumed from \S+step_(\d+) \(step (\d+)\)", log)
    assert resumed and int(resumed.group(2)) >= 4, log[-5000:]
    single = write_recipe(tmp_path / "one.yaml", tiny_recipe(tmp_path / "one", train={"micro_batch_size": 4}))
    run_cli("train", single, *steps, check=True, timeout=600)
    assert len(losses(tmp_path / "ray")) == 10
    assert_close(losses(tmp_path / "one"), losses(tmp_path / "ray"))


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head node on 127.0.0.1 with 2 CPUs: (dashboard address, environment). Stopped with its process group."""
    tmp = tmp_path_factory.mktemp("cluster")
    with ray_env() as env:
        yield from _head_node(tmp, env)


def _head_node(tmp: Path, env: dict):
    dashboard = free_port()
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2",
                             "--num-gpus", "0", "--port", str(free_port()), "--node-ip-address", "127.0.0.1",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard)],
                            env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 240
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=5).read()
            break
        except Exception:
            if time.time() > deadline or head.poll() is not None:
                stop_group(head)
                pytest.fail("the Ray head did not come up:\n" + (tmp / "head.log").read_text()[-3000:])
            time.sleep(2)
    yield address, env
    head.send_signal(signal.SIGTERM)  # `ray start --block` stops the node's processes on SIGTERM
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    stop_group(head)


def torchrun_dp2(recipe: Path, env: dict) -> None:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "longtrain.launch.torchrun", str(recipe), *STEPS],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_ray_job_matches_torchrun(ray_cluster, tmp_path):
    address, env = ray_cluster
    ray_recipe = write_recipe(tmp_path / "ray.yaml", tiny_recipe(tmp_path / "ray", train={"micro_batch_size": 2}))
    proc = launch(ray_recipe, *STEPS, "--address", address, "--num-workers", 2, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout and "submitted Ray job" in proc.stdout
    # Ray got the metrics and a pointer to our last checkpoint
    assert re.search(r"Ray's last report: step 6, loss \d", proc.stdout), proc.stdout[-3000:]
    pointer = list((tmp_path / "ray" / "ray").glob("*/step_00000006/longtrain_checkpoint.txt"))
    assert pointer and pointer[0].read_text().strip() == str(tmp_path / "ray" / "checkpoints" / "step_00000006")
    job = re.search(r"submitted Ray job (\S+)", proc.stdout).group(1)
    status = launch("--status", job, "--address", "auto", env=env, timeout=120)
    assert status.returncode == 0 and f"{job}: SUCCEEDED" in status.stdout, status.stdout + status.stderr[-2000:]
    stop = launch("--stop", job, "--address", address, env=env, timeout=120)
    assert stop.returncode == 0 and "already finished" in stop.stdout, stop.stdout + stop.stderr[-2000:]
    torch_recipe = write_recipe(tmp_path / "torchrun.yaml",
                                tiny_recipe(tmp_path / "torchrun", train={"micro_batch_size": 2}))
    torchrun_dp2(torch_recipe, env)
    assert len(losses(tmp_path / "ray")) == 6
    assert_close(losses(tmp_path / "torchrun"), losses(tmp_path / "ray"))


@pytest.mark.slow
def test_ray_job_without_enough_cpus_fails_in_one_line(ray_cluster, tmp_path):
    address, env = ray_cluster
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    start = time.time()
    proc = launch(recipe, "--address", address, "--num-workers", 3, env=env, timeout=120)
    assert time.time() - start < 60
    assert "has 2 CPU in all" in one_error_line(proc)


def test_bad_address_fails_in_one_line(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    start = time.time()
    with ray_env() as env:
        proc = launch(recipe, "--address", f"http://127.0.0.1:{free_port()}", env=env, timeout=120)
    assert time.time() - start < 60
    assert "cannot reach a Ray cluster" in one_error_line(proc)


def test_recipe_error_fails_before_ray_starts(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    start = time.time()
    with ray_env() as env:
        proc = launch(recipe, "model.n_heads=3", "--num-workers", 2, env=env, timeout=120)
        assert time.time() - start < 60
        assert "model.n_heads=3" in one_error_line(proc)
        proc = launch(recipe, "parallel.dp=4", "--num-workers", 2, "--address", "http://127.0.0.1:1", env=env)
        assert "parallel.dp=4" in one_error_line(proc)
        assert not os.listdir(env["RAY_TMPDIR"])  # no Ray instance was started
