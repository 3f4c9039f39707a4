"""Checkpoints: atomic, verified, resumable at any step.

    <run>/checkpoints/step_00000100/
        rank00000.pt                this rank's model, optimizer, scheduler, engine counters and RNG states
        universal00000.safetensors  its layout-free section (trainer/reshard.py), when checkpoint.reshardable
        common.pt                   rank 0's step, scheduler, loader, engine counters and RNG states alone:
                                    what a resume at another layout takes from the old run besides weights
        recipe.yaml                 the resolved recipe
        manifest.json               written last: step, consumed samples, layout, recipe and tokenizer
                                    hashes, size and sha256 of every file

Every rank writes its files into a temporary directory and hashes them itself, before the barrier
(in parallel: no rank hashes another's bytes), leaving the hashes in a small rankNNNNN.json; after
the barrier rank 0 merges those into the manifest, writes it, and renames the directory into place.
A checkpoint is complete only when its manifest exists, is the object described above, lists every
file present, and every file has its listed size: that is all `latest()` and `resolve()` check, so
picking a checkpoint reads no weights. A file's sha256 is checked by the rank that reads it, when it
reads it (universal files per block of rows, trainer/reshard.py); `longtrain ckpt verify` checks every
file in full. Files load with torch.load(weights_only=True), so a file that would run code when
unpickled is refused. A run only ever deletes its own checkpoints: keep_last prunes at or before the step just
written, and a step directory the run did not write is set aside (step_N.replaced), never deleted.
"""
from __future__ import annotations

import errno
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

STEP_DIR = re.compile(r"^step_(\d{8,})$")  # 8 digits, more past step 99,999,999
SIDECAR = re.compile(r"^rank\d{5,}\.json$")  # a rank's hashes of its own files, merged into the manifest
COMMON = "common.pt"
SHA256 = re.compile(r"^[0-9a-f]{64}$")


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


def _entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _save(obj, path: Path) -> None:
    """A rank's own state file (one call per rank per checkpoint)."""
    _torch_save(obj, path)


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


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(Path(path).name).group(1))


def step_dirs(root: Path) -> list[Path]:
    """Every step_* directory under root, complete or not, oldest first by step number."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), key=step_of)


def save(root: Path, step: int, rank_state: dict, manifest: dict, recipe_text: str, *, rank: int = 0,
         barrier=lambda: None, keep_last: int = 2) -> Path:
    """Write this rank's state; rank 0 seals the checkpoint. Collective: every rank calls it.

    A write that fails (disk full) raises LongtrainError in one line; the temporary directory is removed
    and every earlier checkpoint stays as it was."""
    root = Path(root)
    tmp = root / f".tmp_step_{step:08d}"
    final = step_dir(root, step)
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        _write_rank_files(tmp, rank, rank_state)
        barrier()
        if rank == 0:
            _seal(tmp, step, manifest, recipe_text)
            if final.exists():  # not this run's: a resume skipped it as incomplete or damaged
                _set_aside(final)
            os.replace(tmp, final)
            _fsync_dir(root)
    except OSError as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            for name in _rank_file_names(rank):
                (tmp / name).unlink(missing_ok=True)
        raise _write_error(root, step, e) from None
    if rank == 0:
        prune(root, keep_last, newest=step)
    barrier()
    return final


def _rank_file_names(rank: int) -> tuple[str, ...]:
    from longtrain.trainer.reshard import universal_file

    return f"rank{rank:05d}.pt", universal_file(rank), f"rank{rank:05d}.json"


def _write_rank_files(tmp: Path, rank: int, rank_state: dict) -> None:
    """This rank's files, each hashed by this rank right after it is written (from the page cache, in parallel
    with the other ranks), and a sidecar rankNNNNN.json with their sizes and hashes for rank 0 to merge."""
    from longtrain.trainer.reshard import write_universal

    universal = rank_state.get("universal")
    own = {k: v for k, v in rank_state.items() if k != "universal"}
    state_file, universal_name, sidecar = _rank_file_names(rank)
    _save(own, tmp / state_file)
    files = {state_file: _entry(tmp / state_file)}
    if universal:
        index = write_universal(universal, tmp / universal_name)
        files[universal_name] = {**_entry(tmp / universal_name), "tensors": index}
    if rank == 0:  # a resume at another layout reads this instead of rank 0's whole engine state
        _torch_save({k: v for k, v in own.items() if k not in ("model", "optimizer")}, tmp / COMMON)
        files[COMMON] = _entry(tmp / COMMON)
    with open(tmp / sidecar, "w") as f:
        json.dump(files, f)
        f.flush()
        os.fsync(f.fileno())


def _merged_sidecars(tmp: Path) -> dict:
    files = {}
    for sidecar in sorted(p for p in tmp.iterdir() if SIDECAR.match(p.name)):
        files.update(json.loads(sidecar.read_text()))
        sidecar.unlink()  # not part of the checkpoint: verify() refuses files the manifest does not list
    return files


def _seal(tmp: Path, step: int, manifest: dict, recipe_text: str) -> None:
    (tmp / "recipe.yaml").write_text(recipe_text)
    files = _merged_sidecars(tmp)
    for p in tmp.iterdir():  # recipe.yaml, and anything written without a sidecar
        if p.name not in files:
            files[p.name] = _entry(p)
    files = dict(sorted(files.items()))
    manifest = {**manifest, "step": step, "files": files}
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _set_aside(path: Path) -> Path:
    """Rename a step directory this run did not write out of the way (kept: it may hold weights someone
    wants back), so the run's own checkpoint of that step takes its name."""
    target = path.with_name(path.name + ".replaced")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.replaced{n}")
    os.replace(path, target)
    warnings.warn(f"{path} was not written by this run (incomplete or damaged, skipped on resume); it is kept "
                  f"as {target.name} and this run's step {step_of(path)} takes its place", RuntimeWarning, stacklevel=3)
    return target


def _write_error(root: Path, step: int, error: OSError) -> LongtrainError:
    previous = [p for p in step_dirs(root) if (p / "manifest.json").is_file()]
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason, fix = "no space left on device", f"free space under {root}"
    else:
        reason, fix = error.strerror or str(error), f"make {root} writable"
    return LongtrainError(f"checkpoint of step {step} could not be written to {root}: {reason}; {kept}: {fix} "
                          "and continue with --resume auto")


def prune(root: Path, keep_last: int, newest: int | None = None) -> None:
    """Keep the keep_last newest step directories at or before `newest` (the step just written); delete the
    older ones and stale temporary directories. Step directories past `newest` are not this run's (a resume
    skipped them as damaged): counting them would delete the run's own newest checkpoints, so they stay."""
    root = Path(root)
    owned = [p for p in step_dirs(root) if newest is None or step_of(p) <= newest]
    for old in owned[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def check_manifest(manifest, path: Path) -> dict:
    """The manifest if it is the object save() writes (step, world_size, layout, files of name -> {bytes,
    sha256} listing recipe.yaml and every rank's file), else LongtrainError naming what is wrong."""
    where = f"checkpoint {path}: manifest.json"
    if not isinstance(manifest, dict):
        raise LongtrainError(f"{where} holds a JSON {type(manifest).__name__}, not a checkpoint manifest "
                             "(an object with step and files)")
    step, world, files = manifest.get("step"), manifest.get("world_size"), manifest.get("files")
    if not _is_count(step):
        raise LongtrainError(f"{where}: 'step' is {step!r}, not a step number")
    if STEP_DIR.match(Path(path).name) and step_of(path) != step:
        raise LongtrainError(f"{where} says step {step}, its directory name step {step_of(path)}")
    if not _is_count(world) or world < 1:
        raise LongtrainError(f"{where}: 'world_size' is {world!r}, not a process count")
    if not isinstance(files, dict):
        raise LongtrainError(f"{where}: 'files' is {str(files)[:60]!r}, not an object of file name -> "
                             "{bytes, sha256}")
    for name, entry in files.items():
        if Path(name).name != name or name in ("", ".", "..", "manifest.json"):
            raise LongtrainError(f"{where}: file name {name!r} is not a file of the checkpoint directory")
        if not (isinstance(entry, dict) and _is_count(entry.get("bytes")) and isinstance(entry.get("sha256"), str)
                and SHA256.match(entry["sha256"]) and isinstance(entry.get("tensors", {}), dict)):
            raise LongtrainError(f"{where}: files[{name!r}] is {str(entry)[:60]!r}, not {{bytes: int, sha256: hex}}")
    missing = [n for n in ("recipe.yaml", *(f"rank{r:05d}.pt" for r in range(world))) if n not in files]
    if missing:
        raise LongtrainError(f"{where} does not list {missing[0]} (world_size={world})")
    if not isinstance(manifest.get("layout"), dict):
        raise LongtrainError(f"{where}: 'layout' is {str(manifest.get('layout'))[:60]!r}, not the parallel settings")
    for key, kind in (("consumed_samples", int), ("tokenizer_sha256", (str, type(None)))):
        if key in manifest and not isinstance(manifest[key], kind):
            raise LongtrainError(f"{where}: '{key}' is {str(manifest[key])[:60]!r}")
    return manifest


def _load_manifest(path: Path) -> dict:
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise LongtrainError(f"checkpoint {path} is incomplete: no manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LongtrainError(f"checkpoint {path}: manifest.json is corrupt") from None
    return check_manifest(manifest, path)


def verify(path: Path, full: bool = True) -> dict:
    """Check a checkpoint directory against its manifest; returns the manifest or raises LongtrainError.
    Every file present must be listed (a file whose entry was removed would otherwise go unchecked) with its
    size. full=False stops there (no weights read: how latest() and locate() pick a checkpoint); readers then
    check the sha256 of what they read (verify_file, reshard.read_slices)."""
    path = Path(path)
    if not path.is_dir():
        raise LongtrainError(f"checkpoint {path} does not exist" if not path.exists()
                             else f"checkpoint {path} is a file; a checkpoint is a step_* directory")
    manifest = _load_manifest(path)
    unlisted = sorted(p.name for p in path.iterdir() if p.name != "manifest.json" and p.name not in manifest["files"])
    if unlisted:
        raise LongtrainError(f"checkpoint file {path / unlisted[0]} is not listed in manifest.json, so it cannot "
                             "be checked: remove it, or restore the manifest that lists it")
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise LongtrainError(f"checkpoint file {file} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise LongtrainError(f"checkpoint file {file} is truncated or altered: "
                                 f"{file.stat().st_size} bytes, manifest says {expected['bytes']}")
        if full and sha256(file) != expected["sha256"]:
            raise LongtrainError(f"checkpoint file {file} fails its sha256 check")
    return manifest


def verify_file(path: Path, name: str, manifest: dict | None = None) -> Path:
    """Check one file of a checkpoint against the manifest, in full; for the reader of that whole file."""
    manifest = _load_manifest(path) if manifest is None else manifest
    file = Path(path) / name
    expected = manifest["files"].get(name)
    if expected is None:
        raise LongtrainError(f"checkpoint file {file} is not listed in manifest.json, so it cannot be checked: "
                             "remove it, or restore the manifest that lists it")
    if not file.is_file():
        raise LongtrainError(f"checkpoint file {file} is missing")
    if file.stat().st_size != expected["bytes"] or sha256(file) != expected["sha256"]:
        raise LongtrainError(f"checkpoint file {file} fails its sha256 check: run `longtrain ckpt verify "
                             f"{path}`, and resume from an earlier checkpoint (--resume <its step_* directory>)")
    return file


def read_manifest(path: Path) -> dict:
    """The manifest of a checkpoint already verified (resolve / verify), schema-checked again (cheap)."""
    return _load_manifest(path)


def latest(root: Path) -> Path | None:
    """Newest complete checkpoint under root (manifest valid, every file listed with its size; contents are
    checked by their readers); incomplete or damaged ones are skipped with a warning."""
    for candidate in reversed(step_dirs(root)):
        try:
            verify(candidate, full=False)
            return candidate
        except LongtrainError as e:
            warnings.warn(f"skipping checkpoint: {e}", RuntimeWarning, stacklevel=2)
    return None


def _none_complete(root: Path, found: list[Path]) -> str:
    names = ", ".join(p.name for p in found[-3:]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return f"{root} holds {names} but no complete checkpoint (the warnings above say why)"


def locate(path: str | Path) -> Path:
    """The checkpoint a user names: a checkpoint directory (complete: verify(full=False)), or the newest complete checkpoint of a
    checkpoints/ directory, a run directory or <run>/checkpoints/latest. LongtrainError in one line otherwise."""
    path = Path(path)
    if path.name == "latest" and not path.exists() and path.parent.is_dir():
        path = path.parent
    if not path.exists():
        raise LongtrainError(f"{path} does not exist: give a run directory, its checkpoints/ directory or a "
                             "checkpoint (step_*) directory")
    if not path.is_dir():
        raise LongtrainError(f"{path} is a file, not a run or checkpoint directory")
    if (path / "manifest.json").exists() or STEP_DIR.match(path.name):
        verify(path, full=False)
        return path
    for root in (path, path / "checkpoints"):
        found = step_dirs(root)
        if found:
            complete = latest(root)
            if complete is None:
                raise LongtrainError(_none_complete(root, found))
            return complete
    if (path / "checkpoints").is_dir():
        raise LongtrainError(f"run directory {path} holds no checkpoint yet ({path / 'checkpoints'} is empty)")
    raise LongtrainError(f"{path} is not a run or checkpoint directory (no manifest.json, checkpoints/ or step_* "
                         "directories in it)")


def resolve(resume: str | None, root: Path) -> Path | None:
    """`--resume` value -> checkpoint directory. 'auto': newest complete one, or None to start fresh when root
    holds no step directory at all. Step directories none of which is complete are refused, not started over:
    the run would delete them (weights intact, perhaps) when it reaches their steps."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        found = latest(root)
        if found is None and step_dirs(root):
            raise LongtrainError(f"--resume auto: {_none_complete(root, step_dirs(root))}: restore their "
                                 f"manifest.json, move them out of {root}, or start over with --overwrite "
                                 "instead of --resume (deletes them)")
        return found
    if not Path(resume).exists():
        raise LongtrainError(f"--resume {resume}: no such checkpoint or run directory")
    return locate(resume)


def check_tokenizer(manifest: dict, tokenizer: Path, checkpoint: Path, fix: str) -> None:
    """Refuse a tokenizer other than the one the checkpoint was trained with (manifest's tokenizer_sha256):
    its ids would decode to other pieces, or be out of range."""
    expected = manifest.get("tokenizer_sha256")
    if expected is None:
        return
    if not Path(tokenizer).is_file():
        raise LongtrainError(f"checkpoint {checkpoint} was trained with a tokenizer (sha256 {expected[:12]}) and "
                             f"{tokenizer} does not exist: {fix}")
    actual = sha256(Path(tokenizer))
    if actual != expected:
        raise LongtrainError(f"{tokenizer} (sha256 {actual[:12]}) is not the tokenizer checkpoint {checkpoint} "
                             f"was trained with (sha256 {expected[:12]}): {fix}")


def load_rank_state(path: Path, rank: int = 0, mmap: bool = False) -> dict:
    """Rank `rank`'s file (weights_only), its sha256 checked first. mmap: tensors stay on disk until read."""
    file = Path(path) / f"rank{rank:05d}.pt"
    if not file.is_file():
        raise LongtrainError(f"checkpoint {path} holds no state for rank {rank} ({file.name} missing); "
                             "was it saved with another layout?")
    verify_file(path, file.name)
    return _load_torch_file(file, mmap)


def load_common(path: Path) -> dict:
    """Rank 0's step, scheduler, loader, engine counters and RNG states, without its weights (common.pt; rank 0's
    whole file for checkpoints written before common.pt existed)."""
    manifest = _load_manifest(path)
    if COMMON not in manifest["files"]:
        return load_rank_state(path, 0, mmap=True)
    return _load_torch_file(verify_file(path, COMMON, manifest), mmap=False)


def _load_torch_file(file: Path, mmap: bool) -> dict:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise LongtrainError(f"refusing to load {file}: it holds objects other than tensors and plain data "
                             f"({str(e).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, ValueError) as e:  # mmap of a raw pickle, a torn zip archive
        raise LongtrainError(f"refusing to load {file}: it is not a torch.save archive "
                             f"({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict):
        raise LongtrainError(f"refusing to load {file}: it holds a {type(state).__name__}, not a rank's state")
    return state
