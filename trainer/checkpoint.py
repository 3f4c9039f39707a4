"""Checkpoints: atomic, verified, resumable at any step.

    <run>/checkpoints/step_00000100/
        rank00000.pt     this rank's model, optimizer, scheduler, engine counters and RNG states, and its
                         layout-free `universal` section (trainer/reshard.py)
        recipe.yaml      the resolved recipe
        manifest.json    written last: step, consumed samples, layout, recipe and tokenizer hashes,
                         size and sha256 of every file

Every rank writes into a temporary directory; after a barrier rank 0 checksums the files, writes
the manifest, and renames the directory into place. A checkpoint is complete only when its
manifest exists and every file matches it. Files load with torch.load(weights_only=True), so a
file that would run code when unpickled is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from longtrain.trainer.errors import LongtrainError

STEP_DIR = re.compile(r"^step_(\d{8})$")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


LIVE = "<taken from the live optimizer on load>"


def _plain(value) -> bool:
    if value is None or type(value) in (bool, int, float, str, torch.Size) or isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return False


def plain_optimizer_state(state: dict) -> dict:
    """An optimizer state dict with nothing a weights_only load refuses. DeepSpeed's ZeRO optimizers put
    objects in theirs (its loss scaler, a ZeRO-stage enum, fragment addresses); those depend only on the
    configuration, which a same-layout resume shares, so they are replaced by a marker and taken from the
    live optimizer on load (`restore_optimizer_state`)."""
    return {k: v if _plain(v) else LIVE for k, v in state.items()}


def restore_optimizer_state(saved: dict, optimizer) -> dict:
    live = None
    out = dict(saved)
    for key, value in saved.items():
        if isinstance(value, str) and value == LIVE:
            live = optimizer.state_dict() if live is None else live
            out[key] = live[key]
    return out


def load_optimizer_state(optimizer, saved: dict) -> None:
    """Load this rank's saved optimizer state into the live optimizer (same layout). DeepSpeed's ZeRO
    optimizers take a list of every data-parallel rank's state and read their own rank's entry; with the
    layout unchanged that entry is all they use, so this rank's dict is handed at its own index."""
    saved = restore_optimizer_state(saved, optimizer)
    group = getattr(optimizer, "dp_process_group", None)
    if group is None:
        optimizer.load_state_dict(saved)
        return
    import torch.distributed as dist
    optimizer.load_state_dict({dist.get_rank(group=group): saved}, load_from_fp32_weights=True)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def save(root: Path, step: int, rank_state: dict, manifest: dict, recipe_text: str, *, rank: int = 0,
         barrier=lambda: None, keep_last: int = 2) -> Path:
    """Write this rank's state; rank 0 seals the checkpoint. Collective: every rank calls it."""
    root = Path(root)
    tmp = root / f".tmp_step_{step:08d}"
    final = step_dir(root, step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    _save(rank_state, tmp / f"rank{rank:05d}.pt")
    barrier()
    if rank == 0:
        (tmp / "recipe.yaml").write_text(recipe_text)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {**manifest, "step": step, "files": files}
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # an earlier run reached this step too; replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(root, keep_last)
    barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in Path(root).iterdir() if STEP_DIR.match(p.name))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in Path(root).glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def verify(path: Path) -> dict:
    """Check a checkpoint directory against its manifest; returns the manifest or raises LongtrainError."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise LongtrainError(f"checkpoint {path} is incomplete: no manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise LongtrainError(f"checkpoint {path}: manifest.json is corrupt") from None
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise LongtrainError(f"checkpoint file {file} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise LongtrainError(f"checkpoint file {file} is truncated or altered: "
                                 f"{file.stat().st_size} bytes, manifest says {expected['bytes']}")
        if sha256(file) != expected["sha256"]:
            raise LongtrainError(f"checkpoint file {file} fails its sha256 check")
    return manifest


def read_manifest(path: Path) -> dict:
    """The manifest of a checkpoint already verified (resolve / verify)."""
    return json.loads((Path(path) / "manifest.json").read_text())


def latest(root: Path) -> Path | None:
    """Newest complete, verified checkpoint under root; incomplete or damaged ones are skipped with a warning."""
    root = Path(root)
    if not root.is_dir():
        return None
    for candidate in sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), reverse=True):
        try:
            verify(candidate)
            return candidate
        except LongtrainError as e:
            warnings.warn(f"skipping checkpoint: {e}", RuntimeWarning, stacklevel=2)
    return None


def resolve(resume: str | None, root: Path) -> Path | None:
    """`--resume` value -> checkpoint directory. 'auto': newest complete one, or None to start fresh."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return latest(root)
    path = Path(resume)
    if path.is_dir() and not (path / "manifest.json").exists():
        found = latest(path)  # a checkpoints/ root was given
        if found is None:
            raise LongtrainError(f"--resume {resume}: no complete checkpoint there")
        return found
    verify(path)
    return path


def load_rank_state(path: Path, rank: int = 0, mmap: bool = False) -> dict:
    """Rank `rank`'s file (weights_only). mmap: tensors stay on disk until read (loading another layout
    reads every rank's file but only the slices this rank needs)."""
    file = Path(path) / f"rank{rank:05d}.pt"
    if not file.is_file():
        raise LongtrainError(f"checkpoint {path} holds no state for rank {rank} ({file.name} missing); "
                             "was it saved with another layout?")
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise LongtrainError(f"refusing to load {file}: it holds objects other than tensors and plain data "
                             f"({str(e).splitlines()[0][:120]})") from None
