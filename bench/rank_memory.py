"""Peak host memory per rank under each layout, beside `longtrain plan`'s estimate.

    python bench/rank_memory.py                               # recipes/scale-300m.yaml, 4 layouts, 3 steps
    python bench/rank_memory.py --layouts 1 tp2 --steps 2     # a subset

Each layout trains the recipe for --steps steps in a fresh run dir (one process with `longtrain train`,
several with torchrun on gloo). The figures are read back from the run's metrics.jsonl, which records each
rank's peak resident memory (ru_maxrss) at every logged step, so they cover everything from the start of
the process through the last step: imports, data, model construction, the engine, every step. Columns:
  plan GiB      the largest per-rank estimate of `longtrain plan` for that layout
  peak GiB      each rank's measured peak
  x baseline    the worst rank against the one-process run
  plan error    (plan - worst measured) / worst measured
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
LAYOUTS = {  # name -> (processes, recipe overrides)
    "1": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.micro_batches=2"]),
    "dp4-zero3": (4, ["parallel.zero_stage=3"]),
}
LIMITS = {"tp2": 0.6, "tp2pp2": 0.35, "dp4-zero3": 0.4}  # the most each rank may hold, against one process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(recipe: Path, name: str, steps: int, workdir: Path, threads: int) -> tuple[list[int], float]:
    processes, overrides = LAYOUTS[name]
    run_dir = workdir / name
    args = [str(recipe), f"run.dir={run_dir}", f"train.steps={steps}", f"train.threads={threads}", *overrides]
    if processes == 1:
        cmd = [sys.executable, "-m", "longtrain.launch.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "longtrain.launch.torchrun", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode:
        sys.exit(f"layout {name} failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    peaks = [r["peak_memory_bytes_per_rank"] for r in records if "peak_memory_bytes_per_rank" in r]
    return [max(column) for column in zip(*peaks)], time.perf_counter() - start


def planned(recipe: Path, name: str) -> float:
    from longtrain.trainer.config import load_recipe
    from longtrain.trainer.parallel.plan import build_plan

    processes, overrides = LAYOUTS[name]
    return build_plan(load_recipe(recipe, overrides), processes).max_memory_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "scale-300m.yaml")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"recipe {args.recipe.name} | {args.steps} steps | {os.cpu_count()} CPUs: {cpu}")
    rows, baseline = [], None
    with tempfile.TemporaryDirectory(prefix="rank-memory-") as tmp:
        for name in args.layouts:
            peaks, seconds = run_layout(args.recipe, name, args.steps, Path(tmp), args.threads)
            plan = planned(args.recipe, name)
            baseline = max(peaks) if name == "1" else baseline
            rows.append({"layout": name, "ranks": len(peaks), "plan_bytes": plan, "peak_bytes_per_rank": peaks,
                         "seconds": seconds, "x_baseline": max(peaks) / baseline if baseline else None,
                         "plan_error": (plan - max(peaks)) / max(peaks)})
    print(f"{'layout':<10} {'ranks':>5} {'plan GiB':>9} {'peak GiB per rank':<28} {'x baseline':>10} {'limit':>6} "
          f"{'plan error':>10} {'s':>6}")
    for r in rows:
        ratio = f"{r['x_baseline']:.2f}" if r["x_baseline"] is not None else "-"
        limit = f"{LIMITS[r['layout']]:.2f}" if r["layout"] in LIMITS else "-"
        peaks = " ".join(f"{p / GIB:.2f}" for p in r["peak_bytes_per_rank"])
        print(f"{r['layout']:<10} {r['ranks']:>5} {r['plan_bytes'] / GIB:>9.2f} {peaks:<28} {ratio:>10} {limit:>6} "
              f"{100 * r['plan_error']:>9.0f}% {r['seconds']:>6.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
