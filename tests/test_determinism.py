"""Bitwise determinism of the csrc CPU kernels and of training runs (issue 17, group 2).

What longtrain promises (csrc/common/cpu_parallel.h): on one machine, the csrc kernels give bitwise
equal outputs and gradients whichever worker runs which task and whatever the thread count, and a
training run at a fixed thread count gives bitwise equal losses, on an idle or a busy machine, and
when killed and resumed. The kernel tests force other task orders through the test hook
`torch.ops.longtrain._set_task_order` (reversed, shuffled, one slowed worker) at 1 to 3 threads;
the end-to-end tests (slow) run a small recipe, 20 steps at 2 threads with every step's loss logged,
beside processes that keep every core busy.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import TORCHRUN_VARIABLES, read_metrics, run_cli, tiny_recipe, write_recipe
from longtrain.kernels import attention, cross_entropy, rms_norm, rotary, scan, swiglu
from longtrain.kernels.extension import extension

pytestmark = pytest.mark.skipif(extension() is None, reason="extension longtrain.kernels._C not built")

# name -> (mode, seed) of torch.ops.longtrain._set_task_order
ORDERS = {"in order": (0, 0), "reversed": (1, 0), "shuffled": (2, 1), "shuffled again": (2, 2), "slow worker": (3, 0)}
THREADS = (1, 2, 3)


def _randn(generator, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


def _backward(outputs, cotangents, leaves):
    torch.autograd.backward(outputs, cotangents)
    return [*outputs, *(leaf.grad for leaf in leaves)]


def _scan(reset=None):
    # 70 channels: three blocks of the backward (32, 32, 6); 1300 steps: two segments of it.
    g = torch.Generator().manual_seed(0)
    batch, dim, state, seq = 2, 70, 16, 1300
    inputs = [_randn(g, batch, dim, seq), _randn(g, batch, dim, seq, scale=0.5), -torch.rand(dim, state, generator=g),
              _randn(g, batch, state, seq), _randn(g, batch, state, seq), _randn(g, dim), _randn(g, batch, dim, seq),
              _randn(g, dim, scale=0.3), _randn(g, batch, dim, state)]
    cotangents = [_randn(g, batch, dim, seq), _randn(g, batch, dim, state)]

    def run():
        leaves = [x.clone().requires_grad_() for x in inputs]
        u, delta, A, B, C, D, z, delta_bias, initial = leaves
        out = scan.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True,
                                  return_last_state=True, initial_state=initial, backend="csrc", reset=reset)
        return _backward(list(out), cotangents, leaves)
    return run


def _attention(dtype):
    g = torch.Generator().manual_seed(1)
    batch, seq, heads, kv_heads, dim = 2, 300, 4, 2, 32  # five query tiles; two query heads per kv head
    inputs = [_randn(g, batch, seq, heads, dim, dtype=dtype)] + [_randn(g, batch, seq, kv_heads, dim, dtype=dtype)
                                                                  for _ in range(2)]
    cotangents = [_randn(g, batch, seq, heads, dim, dtype=dtype), _randn(g, batch, heads, seq)]

    def run():
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = attention.attention(*leaves, causal=True, return_lse=True, backend="csrc")
        return _backward(list(out), cotangents, leaves)
    return run


def _cross_entropy(dtype):
    g = torch.Generator().manual_seed(2)
    logits = _randn(g, 70, 1000, dtype=dtype, scale=3.0)
    targets = torch.randint(0, 1000, (70,), generator=g)
    targets[::7] = -100

    def run():
        work = logits.clone()
        return [cross_entropy.cross_entropy_grad_(work, targets, backend="csrc"), work]
    return run


def _rms_norm(dtype):
    g = torch.Generator().manual_seed(3)
    x, w, dy = _randn(g, 2, 300, 64, dtype=dtype), _randn(g, 64), _randn(g, 2, 300, 64, dtype=dtype)

    def run():
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        return _backward([rms_norm.rms_norm(*leaves, 1e-5, out_dtype=dtype, backend="csrc")], [dy], leaves)
    return run


def _swiglu(dtype):
    g = torch.Generator().manual_seed(4)
    gate, up, dh = (_randn(g, 600, 96, dtype=dtype) for _ in range(3))

    def run():
        leaves = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
        return _backward([swiglu.swiglu(*leaves, backend="csrc")], [dh], leaves)
    return run


def _rotary(dtype):
    g = torch.Generator().manual_seed(5)
    x, dy = _randn(g, 2, 300, 4, 32, dtype=dtype), _randn(g, 2, 300, 4, 32, dtype=dtype)
    cos, sin = _randn(g, 300, 16), _randn(g, 300, 16)

    def run():
        leaves = [x.clone().requires_grad_()]
        return _backward([rotary.apply_rotary(leaves[0], cos, sin, backend="csrc")], [dy], leaves)
    return run


# name -> (environment, inputs and a run of forward + backward); LONGTRAIN_CPU_BF16_GEMM picks the path
# of bfloat16 attention (unset: bfloat16 products where the CPU has AVX512-BF16, float32 elsewhere).
KERNELS = {
    "scan": ({}, _scan),
    "scan-document-resets": ({}, lambda: _scan(torch.arange(1300).remainder(torch.tensor([[300], [128]])) == 0)),
    "attention-float32": ({}, lambda: _attention(torch.float32)),
    "attention-bfloat16": ({}, lambda: _attention(torch.bfloat16)),
    "attention-bfloat16-float32-products": ({"LONGTRAIN_CPU_BF16_GEMM": "0"}, lambda: _attention(torch.bfloat16)),
    "attention-bfloat16-portable": ({"LONGTRAIN_CPU_BF16_GEMM": "portable"}, lambda: _attention(torch.bfloat16)),
    "cross-entropy-float32": ({}, lambda: _cross_entropy(torch.float32)),
    "cross-entropy-bfloat16": ({}, lambda: _cross_entropy(torch.bfloat16)),
    "rms-norm-float32": ({}, lambda: _rms_norm(torch.float32)),
    "rms-norm-bfloat16": ({}, lambda: _rms_norm(torch.bfloat16)),
    "swiglu-bfloat16": ({}, lambda: _swiglu(torch.bfloat16)),
    "rotary-float32": ({}, lambda: _rotary(torch.float32)),
}


@pytest.fixture
def task_order():
    """Sets the task order; puts back the in-order default and the thread count afterwards."""
    threads = torch.get_num_threads()
    yield lambda name: torch.ops.longtrain._set_task_order(*ORDERS[name])
    torch.ops.longtrain._set_task_order(0, 0)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_is_bitwise_deterministic(kernel, task_order, monkeypatch):
    environment, make = KERNELS[kernel]
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    run = make()
    torch.set_num_threads(1)
    task_order("in order")
    want = run()
    for threads in THREADS:
        torch.set_num_threads(threads)
        for order in ORDERS:
            task_order(order)
            got = run()
            for i, (a, b) in enumerate(zip(want, got)):
                assert torch.equal(a, b), f"{kernel}: result {i} differs at {threads} threads, {order}"


def test_task_order_hook_rejects_unknown_orders(task_order):
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.longtrain._set_task_order(7, 0)


# ----------------------------------------------------------------------------- training runs
STEPS = 20


def _recipe(tmp_path, name):
    recipe = tiny_recipe(tmp_path / name, train={"steps": STEPS, "log_interval": 1, "threads": 2, "eval_interval": 10},
                         checkpoint={"interval": 5, "keep_last": 10})
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


class _BusyCores:
    """Processes that keep `count` cores busy while the block runs."""

    def __init__(self, count=2):
        self.count, self.procs = count, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        return self

    def __exit__(self, *_):
        for proc in self.procs:
            proc.kill()
            proc.wait()


def _losses(run_dir):
    records = read_metrics(run_dir)
    return {key: {r["step"]: r[key] for r in records if key in r} for key in ("loss", "eval_loss")}


# Slow: beside two CPU-burning processes on a shared 2-core machine, each test took 55 to 170 s.
@pytest.mark.slow
def test_training_on_a_busy_machine_is_bitwise_equal(tmp_path):
    run_cli("train", _recipe(tmp_path, "idle"), check=True)
    with _BusyCores():
        run_cli("train", _recipe(tmp_path, "busy"), check=True)
    idle, busy = _losses(tmp_path / "idle"), _losses(tmp_path / "busy")
    assert len(idle["loss"]) == STEPS
    assert busy == idle


@pytest.mark.slow
def test_kill_and_resume_on_a_busy_machine_is_bitwise_equal(tmp_path):
    run_cli("train", _recipe(tmp_path, "straight"), check=True)
    recipe = _recipe(tmp_path, "killed")
    first = tmp_path / "killed" / "checkpoints" / f"step_{5:08d}" / "manifest.json"
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}  # as run_cli starts it
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with _BusyCores():
        proc = subprocess.Popen([sys.executable, "-m", "longtrain.launch.cli", "train", str(recipe)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 300
            while not first.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            assert first.exists(), "no checkpoint at step 5 before the kill"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        resumed = run_cli("train", recipe, "--resume", "auto", check=True)
    assert "resumed from" in resumed.stdout + resumed.stderr
    straight, killed = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert len(straight["loss"]) == STEPS
    assert killed == straight
