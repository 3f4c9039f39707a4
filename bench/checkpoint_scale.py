"""Checkpoints at scale: save and resume at 1 and 8 ranks, and what each rank hashes and reads.

    python bench/checkpoint_scale.py                 # 1 and 8 ranks, d_model 256, 4 layers (CPU, gloo)
    python bench/checkpoint_scale.py --d-model 512 --ranks 1 4 8

Each rank holds a tensor-parallel slice (tp = ranks) of a small decoder-shaped model (column- and row-parallel
linears, replicated norms, a vocab-parallel embedding) with fp32 weights and two Adam moments, and calls
trainer/checkpoint.py's save() as the training loop does (its barrier is the gloo group's). Columns:
  save s         slowest rank's save() (write, hash own files, barrier, rank 0 seals and renames)
  resume s       slowest rank's pick of the checkpoint (latest: manifest and sizes) + read of its own rank file
  hashed/rank    bytes a rank hashes on save, and on resume; the design before hashed the whole checkpoint
                 on rank 0 at save and on every rank at resume (the `whole` column)
  reshard        a load at tp = ranks / 2 (tp = 2 for one rank): bytes of universal files a rank reads against
                 its share (the slices it needs), the worst rank's ratio, and its time
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from parallel_harness import run_ranks  # noqa: E402

from longtrain.trainer import checkpoint as ckpt  # noqa: E402
from longtrain.trainer import reshard  # noqa: E402


def dense_model(d_model: int, layers: int, vocab: int) -> dict:
    """Dense name -> (shape, tp split dim); None: replicated."""
    shapes = {"embed.weight": ((vocab, d_model), 0)}
    for i in range(layers):
        shapes.update({f"blocks.{i}.norm.weight": ((d_model,), None), f"blocks.{i}.qkv.weight": ((3 * d_model, d_model), 0),
                       f"blocks.{i}.out.weight": ((d_model, d_model), 1), f"blocks.{i}.up.weight": ((8 * d_model, d_model), 0),
                       f"blocks.{i}.down.weight": ((d_model, 4 * d_model), 1)})
    return shapes


def local_shape(shape, dim, tp):
    return tuple(s // tp if d == dim else s for d, s in enumerate(shape))


def section(model: dict, tp: int, tp_rank: int) -> dict:
    generator = torch.Generator().manual_seed(tp_rank)
    out = {}
    for name, (shape, dim) in model.items():
        split = dim if tp > 1 else None
        out[name] = {"dim": split, "index": tp_rank if split is not None else 0, "parts": tp if split is not None else 1,
                     "step": 10, **{k: torch.randn(local_shape(shape, split, tp), generator=generator)
                                    for k in reshard.KEYS}}
    return out


def measure(rank, world, root, model):
    universal = section(model, world, rank)
    state = {"step": 10, "model": {n: e["param"].clone() for n, e in universal.items()},
             "optimizer": {n: {k: e[k].clone() for k in reshard.MOMENTS} for n, e in universal.items()},
             "universal": universal}
    barrier = dist.barrier if world > 1 else (lambda: None)
    barrier()
    start = time.perf_counter()
    path = ckpt.save(root, 10, state, {"world_size": world, "layout": {"tp": world}}, "name: bench\n", rank=rank,
                     barrier=barrier)
    save_s = time.perf_counter() - start
    manifest = ckpt.read_manifest(path)
    own = [f"rank{rank:05d}.pt", reshard.universal_file(rank)] + (["common.pt", "recipe.yaml"] if rank == 0 else [])
    hashed_save = sum(manifest["files"][n]["bytes"] for n in own if n in manifest["files"])
    barrier()
    start = time.perf_counter()
    found = ckpt.latest(root)
    ckpt.verify_file(found, "recipe.yaml", manifest)
    ckpt.load_rank_state(found, rank)
    resume_s = time.perf_counter() - start
    hashed_resume = manifest["files"][f"rank{rank:05d}.pt"]["bytes"] + manifest["files"]["recipe.yaml"]["bytes"]
    new_tp = max(world // 2, 2) if world > 1 else 2
    barrier()
    reshard.READ.update(bytes=0, share=0)
    start = time.perf_counter()
    reshard.read_slices(found, manifest, {n: (local_shape(s, d, new_tp), new_tp, rank % new_tp)
                                          for n, (s, d) in model.items()})
    reshard_s = time.perf_counter() - start
    barrier()
    whole = sum(f["bytes"] for f in manifest["files"].values())
    return {"save_s": save_s, "resume_s": resume_s, "hashed_save": hashed_save, "hashed_resume": hashed_resume,
            "whole": whole, "read": reshard.READ["bytes"], "share": reshard.READ["share"], "reshard_s": reshard_s,
            "new_tp": new_tp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    model = dense_model(args.d_model, args.layers, args.vocab)
    params = sum(torch.Size(s).numel() for s, _ in model.values())
    print(f"model: {params / 1e6:.2f}M parameters (fp32 + 2 Adam moments), {os.cpu_count()} CPU cores, gloo")
    print(f"{'ranks':>5} {'save s':>7} {'resume s':>8} {'hashed/rank save':>16} {'resume':>9} {'whole':>9} "
          f"{'reshard to':>10} {'read/rank':>10} {'share':>9} {'worst read/share':>16} {'reshard s':>9}")
    mb = 1 << 20
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            results = run_ranks(measure, world, args=(Path(tmp) / "checkpoints", model), timeout_s=600)
        worst = max(results, key=lambda r: r["read"] / r["share"])
        print(f"{world:>5} {max(r['save_s'] for r in results):>7.2f} {max(r['resume_s'] for r in results):>8.2f} "
              f"{max(r['hashed_save'] for r in results) / mb:>13.1f} MB {max(r['hashed_resume'] for r in results) / mb:>6.1f} MB "
              f"{results[0]['whole'] / mb:>6.1f} MB {'tp=' + str(results[0]['new_tp']):>10} "
              f"{max(r['read'] for r in results) / mb:>7.1f} MB {max(r['share'] for r in results) / mb:>6.1f} MB "
              f"{worst['read'] / worst['share']:>16.2f} {max(r['reshard_s'] for r in results):>9.2f}")


if __name__ == "__main__":
    main()
