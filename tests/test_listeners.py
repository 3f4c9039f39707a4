"""What a run listens on. A run whose ranks are all on this machine listens on loopback only: one process
(`longtrain train`), the ranks started by hand with a loopback MASTER_ADDR, and the workers of a local
Ray instance, all but the one socket torch's store opens for Ray Train's group. torchrun's agent is
the exception the README states: its store listens on every interface whatever the flags.

Sockets are read from /proc: the listening entries of /proc/net/tcp and tcp6 whose inode is an open
file of a process in the run's process tree (README.md, "Network listeners").
"""
from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import TORCHRUN_VARIABLES, tiny_recipe, write_recipe

LISTEN = "0A"  # the TCP state column of /proc/net/tcp
LONG_RUN = ["train.steps=100000", "train.log_interval=1", "train.eval_interval=100000", "checkpoint.interval=100000"]


@dataclass(frozen=True)
class Listener:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    pid: int
    name: str

    @property
    def loopback(self) -> bool:
        address = getattr(self.address, "ipv4_mapped", None) or self.address  # ::ffff:127.0.0.1 is loopback
        return address.is_loopback


def process_tree(root: int) -> list[int]:
    """root and every process descended from it, from the parent pids in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    except OSError:
        pass
    return inodes


def _address(hex_address: str, ipv6: bool):
    """/proc/net/tcp's 'ADDRESS:PORT' in hex: the address in host byte order by 32-bit word."""
    address, port = hex_address.split(":")
    raw = bytes.fromhex(address)
    words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]
    return ipaddress.ip_address(b"".join(words) if ipv6 else words[0]), int(port, 16)


def listeners(root: int) -> list[Listener]:
    """The listening TCP sockets held open by root's process tree."""
    owner = {inode: pid for pid in process_tree(root) for inode in socket_inodes(pid)}
    found = []
    for table, ipv6 in (("tcp", False), ("tcp6", True)):
        path = Path(f"/proc/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in owner:
                address, port = _address(fields[1], ipv6)
                pid = owner[fields[9]]
                try:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    name = "?"
                found.append(Listener(address, port, pid, name))
    return found


def test_proc_addresses_decode():
    assert _address("0100007F:0050", False) == (ipaddress.ip_address("127.0.0.1"), 80)
    mapped, _ = _address("0000000000000000FFFF00000100007F:1F90", True)
    assert Listener(mapped, 8080, 0, "x").loopback and str(mapped) == "::ffff:7f00:1"
    assert not Listener(ipaddress.ip_address("::"), 1, 0, "x").loopback


def fresh_env() -> dict:
    """This environment without torchrun's variables (a fresh run), unbuffered, one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def start(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, text=True,
                            start_new_session=True)


def listeners_once_training(processes: list[subprocess.Popen], log: Path, timeout: float = 300) -> list[Listener]:
    """The listeners of every process tree once the log shows a training step (every group exists)."""
    deadline = time.time() + timeout
    while not re.search(r"\bstep +\d+/\d+ \|", log.read_text()):
        if time.time() > deadline or any(p.poll() is not None for p in processes):
            raise AssertionError("no training step in the log:\n" + log.read_text()[-4000:])
        time.sleep(1)
    return [listener for p in processes for listener in listeners(p.pid)]


def stop(processes: list[subprocess.Popen], stragglers: list[int] = ()) -> None:
    """SIGKILL each process group we started, and processes of their trees that left it (Ray's workers)."""
    for p in processes:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    for pid in stragglers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def describe(found: list[Listener]) -> str:
    return "\n".join(f"{x.address}:{x.port} pid {x.pid} ({x.name})" for x in found)


def test_one_process_train_listens_on_loopback_only(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "run"))
    log = tmp_path / "train.log"
    proc = start([sys.executable, "-m", "longtrain.launch.cli", "train", str(recipe), *LONG_RUN], log, fresh_env())
    try:
        found = listeners_once_training([proc], log)
    finally:
        stop([proc])
    assert all(x.loopback for x in found), describe(found)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_started_by_hand_listen_on_loopback_only(tmp_path):
    """README's single-machine command without torchrun: RANK ... MASTER_ADDR=127.0.0.1 longtrain train, twice."""
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "run", train={"micro_batch_size": 2}))
    port, ranks = free_port(), []
    try:
        for rank in range(2):
            env = {**fresh_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            ranks.append(start([sys.executable, "-m", "longtrain.launch.cli", "train", str(recipe), *LONG_RUN],
                               tmp_path / f"rank{rank}.log", env))
        found = listeners_once_training(ranks, tmp_path / "rank0.log")
    finally:
        stop(ranks)
    assert found and all(x.loopback for x in found), describe(found)
    assert any(x.port == port for x in found), describe(found)  # rank 0's store, on 127.0.0.1


@pytest.mark.slow
def test_torchrun_workers_listen_on_loopback_its_agent_on_all_interfaces(tmp_path):
    """torchrun --master_addr 127.0.0.1: the workers' sockets are on loopback; the agent's store (the
    torchrun process itself) is on every interface, as the README says."""
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "run", train={"micro_batch_size": 2}))
    port, log = free_port(), tmp_path / "torchrun.log"
    proc = start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                  "--master_port", str(port), "-m", "longtrain.launch.torchrun", str(recipe), *LONG_RUN], log,
                 fresh_env())
    try:
        found = listeners_once_training([proc], log)
    finally:
        stop([proc])
    workers = [x for x in found if x.pid != proc.pid]
    assert workers and all(x.loopback for x in workers), describe(found)
    assert [(x.port, x.loopback) for x in found if x.pid == proc.pid] == [(port, False)], describe(found)


@pytest.mark.slow
def test_local_ray_listens_on_loopback_but_for_train_store(tmp_path):
    """`longtrain launch ray` on one machine: Ray's GCS, raylet, agents, dashboard, workers and the driver
    listen on loopback. The one exception: the store torch makes for Ray Train's process group, in the
    rank 0 worker, on every interface (torch's TCPStore server ignores the host it is given)."""
    from test_ray import ray_env

    recipe = write_recipe(tmp_path / "ray.yaml", tiny_recipe(tmp_path / "run", train={"micro_batch_size": 2}))
    log = tmp_path / "ray.log"
    with ray_env() as env:
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # longtrain sets it for its local instance
        proc = start([sys.executable, "-m", "longtrain.launch.cli", "launch", "ray", str(recipe), *LONG_RUN,
                      "--num-workers", "2"], log, env)
        try:
            found = listeners_once_training([proc], log, timeout=400)
        finally:
            stop([proc], stragglers=process_tree(proc.pid))
    names = {x.name for x in found}
    assert {"gcs_server", "raylet", "ray::RayTrainWo"} <= names, describe(found)
    exposed = [x for x in found if not x.loopback]
    assert len(exposed) == 1 and exposed[0].name.startswith("ray::RayTrainWo"), describe(found)
