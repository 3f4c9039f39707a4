"""Activation memory of one O block vs its number of steps: adjoint backprop (flat) vs direct (linear).

    python bench/ode.py                                   # rk4 at 2..32 steps, ~1 min on 2 cores
    python bench/ode.py --steps 4,16,64 --batch 4 --seq 512 --d-model 256

Every (steps, mode) runs in a fresh subprocess, so its peak resident memory (ru_maxrss) is its own.
`act MiB` is that peak minus the resident memory just before the measured forward + backward (block,
input and one tiny warm-up pass already there), i.e. what the integration adds. Direct backprop keeps
every stage's activations for autograd; odeint_adjoint keeps only h(1) and re-solves backwards.
Times are one forward + backward, after the warm-up, on one thread.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> dict:
    import torch

    from longtrain.trainer.config import ModelConfig
    from longtrain.trainer.model.layers import Linears
    from longtrain.trainer.model.ode import ODEBlock

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=args.d_model, n_heads=4, n_kv_heads=4,
                      ode=dict(solver=args.solver, steps=args.run_steps, adjoint=args.adjoint, sublayer=args.sublayer))
    block = ODEBlock(cfg, Linears(0.02))
    small = torch.randn(1, 8, args.d_model, requires_grad=True)
    block(small).sum().backward()  # warm-up: allocator, kernels, autograd machinery
    block.zero_grad(set_to_none=False)
    x = torch.randn(args.batch, args.seq, args.d_model, requires_grad=True)
    before = rss_bytes()
    start = time.perf_counter()
    block(x).square().mean().backward()
    seconds = time.perf_counter() - start
    return {"act_bytes": rss_bytes() - before, "seconds": seconds, **block.stats()}


def run_child(args, steps: int, adjoint: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--run-steps", str(steps), "--batch", str(args.batch),
           "--seq", str(args.seq), "--d-model", str(args.d_model), "--solver", args.solver,
           "--sublayer", args.sublayer] + (["--adjoint"] if adjoint else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="2,4,8,16,32", help="comma-separated numbers of fixed steps")
    parser.add_argument("--solver", default="rk4", choices=["euler", "midpoint", "rk4"])
    parser.add_argument("--sublayer", default="mlp", choices=["mlp", "attention_mlp"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--adjoint", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    mib = 2 ** 20
    state = args.batch * args.seq * args.d_model * 4
    print(f"O block, {args.solver}, sublayer {args.sublayer}, x: ({args.batch}, {args.seq}, {args.d_model}) float32 "
          f"({state / mib:.1f} MiB), one forward + backward per fresh process")
    print(f"{'steps':>5} {'nfe':>5} | {'direct act MiB':>14} {'s':>6} | {'adjoint act MiB':>15} {'s':>6} "
          f"{'bwd nfe':>7} | {'direct / adjoint':>16}")
    for steps in [int(s) for s in args.steps.split(",")]:
        direct, adjoint = run_child(args, steps, False), run_child(args, steps, True)
        print(f"{steps:>5} {direct['nfe']:>5} | {direct['act_bytes'] / mib:>14.1f} {direct['seconds']:>6.2f} | "
              f"{adjoint['act_bytes'] / mib:>15.1f} {adjoint['seconds']:>6.2f} {adjoint['nfe_backward']:>7} | "
              f"{direct['act_bytes'] / max(adjoint['act_bytes'], 1):>15.1f}x")


if __name__ == "__main__":
    main()
