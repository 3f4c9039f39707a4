"""Layout-free checkpoint entries: load a checkpoint saved at one (tp, pp, cp, dp, ZeRO stage) at another.

Besides its own engine state (rankNNNNN.pt, used when the layout is unchanged, for a bitwise resume),
a rank writes a `universal` section, universalNNNNN.safetensors: for every parameter the rank owns,
keyed by its name in the dense Decoder, the fp32 value and both Adam moments of the rank's
tensor-parallel slice, stored with the split dim first (`name:param`, `name:exp_avg`, ...). The
manifest indexes it: the slice's place in the dense tensor (dim, index, parts), Adam's step count, and
a sha256 per block of rows, so a reader at another layout reads only the blocks holding its own
slice and checks each one (whole-file hashes would make it read everything).

    "universal00001.safetensors": {"bytes": ..., "sha256": ..., "tensors": {"blocks.0.attn.q.weight":
        {"dim": 0, "index": 1, "parts": 2, "step": 40, "shape": [16, 32], "block_rows": 1,
         "sha256": {"param": [16 hashes], "exp_avg": [...], "exp_avg_sq": [...]}}, ...}}

The data- and context-parallel replicas of a slice share the writing, parameter by parameter; under
ZeRO the slice is first gathered from the partitions with DeepSpeed's own accessors
(`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`), which are collective over the ZeRO group,
so every rank takes part. Loading at another layout reads, for every new rank, the rows of the saved
slices that make up its own slice, and hands them over through the matching setters. This is what DeepSpeed's
universal checkpoint does as an offline conversion (`ds_to_universal`); here it is written with the
checkpoint, so a run resumes at any layout with no conversion step, ZeRO stage 0 (which DeepSpeed's
universal format does not cover) included.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path

import torch

from longtrain.trainer.errors import LongtrainError

MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS = ("param", *MOMENTS)
INDEX_KEYS = {"dim", "index", "parts", "step", "shape", "dtype", "block_rows", "sha256"}
# Hash blocks: at most BLOCKS per stored tensor and at least MIN_BLOCK_BYTES each. A reader of 1/T of a tensor's
# rows reads at most 2 blocks more than it needs (under 2x its share for T <= BLOCKS / 2 on tensors of
# BLOCKS * MIN_BLOCK_BYTES or more), and the manifest stays about 1/200 of the weights.
BLOCKS = 32
MIN_BLOCK_BYTES = 16 << 10
READ = {"bytes": 0, "share": 0}  # tensor bytes this process read from universal files, and the bytes it needed


def universal_file(rank: int) -> str:
    return f"universal{rank:05d}.safetensors"


def layout_key(parallel: dict, world: int) -> tuple:
    """What a rank's engine state depends on: (tp, pp, cp, dp, zero stage)."""
    tp, pp, cp = parallel.get("tp", 1), parallel.get("pp", 1), parallel.get("cp", 1)
    return tp, pp, cp, world // (tp * pp * cp), parallel.get("zero_stage", 0)


def _base(optimizer):
    """The torch optimizer holding Adam's state: the optimizer itself (ZeRO-0) or the one a ZeRO optimizer wraps."""
    return getattr(optimizer, "optimizer", optimizer)


def _dense_shape(param) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps the real shape beside its empty placeholder


def _flat_groups(optimizer) -> list[torch.Tensor]:
    """ZeRO 1/2/3: the flat fp32 partitions Adam steps on, one per parameter group."""
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        return optimizer.single_partition_of_fp32_groups
    return optimizer.fp32_partitioned_groups_flat


def _relink(optimizer) -> None:
    """ZeRO 1/2: point each parameter's view of Adam's moments at the current state tensors. DeepSpeed links
    them once, lazily, and may do so before the state exists (leaving the views empty)."""
    if hasattr(optimizer, "_hp_optimizer_states_linked") and _base(optimizer).state:
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


@torch.no_grad()
def universal_state(named_params, dense_shapes: dict, optimizer, zero_stage: int, tp: int, tp_rank: int,
                    replica: int = 0, replicas: int = 1) -> dict:
    """This rank's `universal` section. Collective under ZeRO: every rank calls it. The `replicas` data- and
    context-parallel ranks holding the same slices share the writing: this one (`replica`) keeps every
    replicas-th parameter, so no rank holds (or hashes, or writes) more than its share of the model. Without
    ZeRO the entries are the live parameters and moments, not copies: write the section before the next step."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from longtrain.trainer.parallel.tensor import shard_dim

    base = _base(optimizer)
    if zero_stage:
        step = int(next(iter(base.state.values()))["step"]) if base.state else 0
        _relink(optimizer)
    out = {}
    for i, (name, param) in enumerate(named_params):
        if zero_stage:
            value = safe_get_full_fp32_param(param)
            moments = {k: safe_get_full_optimizer_state(param, k) if base.state else torch.zeros_like(value)
                       for k in MOMENTS}
        else:
            state = base.state.get(param, {})
            value = param.detach()
            moments = {k: state[k] if k in state else torch.zeros_like(value) for k in MOMENTS}
            step = int(state["step"]) if "step" in state else 0
        if i % replicas != replica:
            continue
        dim = shard_dim(_dense_shape(param), dense_shapes[name], tp)
        out[name] = {"dim": dim, "index": tp_rank if dim is not None else 0, "parts": tp if dim is not None else 1,
                     "step": step, "param": value.detach(), **{k: v.detach() for k, v in moments.items()}}
    return out


def _stored(tensor: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The tensor as written: its split dim first, so any range of a tp slice is one contiguous byte range."""
    return (tensor.movedim(dim, 0) if dim else tensor).contiguous()


def _digest(rows: torch.Tensor) -> str:
    return hashlib.sha256(rows.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _block_hashes(stored: torch.Tensor, block_rows: int) -> list[str]:
    return [_digest(stored[i:i + block_rows]) for i in range(0, stored.shape[0], block_rows)]


def write_universal(section: dict, file: Path) -> dict:
    """Write this rank's `universal` section as one safetensors file; returns its manifest index: dense name ->
    {dim, index, parts, step, shape, block_rows, sha256: {key: [hash of each block of stored rows]}}. Hashed
    from memory while writing, so no rank reads back more than its own bytes. The file is streamed one
    tensor at a time (`_stream_safetensors`), so writing holds one stored tensor beyond the section."""
    layout, index = {}, {}
    for name, entry in section.items():
        if entry["param"].dim() == 0:
            raise LongtrainError(f"universal checkpoint entry {name} is a 0-d tensor: give it a shape of (1,)")
        shape = list(_stored(torch.empty(entry["param"].shape, device="meta"), entry["dim"]).shape)
        row_bytes = math.prod(shape[1:]) * entry["param"].element_size()
        block_rows = min(shape[0], max(-(-shape[0] // BLOCKS), -(-MIN_BLOCK_BYTES // max(row_bytes, 1))))
        index[name] = {"dim": entry["dim"], "index": entry["index"], "parts": entry["parts"], "step": entry["step"],
                       "shape": list(entry["param"].shape), "dtype": str(entry["param"].dtype), "block_rows": block_rows,
                       "sha256": {}}
        layout.update({(name, k): (entry[k].dtype, shape) for k in KEYS})

    def stored(name, key):  # the stored rows on the host, hashed on the way out
        rows = _stored(section[name][key].detach(), section[name]["dim"]).cpu()
        index[name]["sha256"][key] = _block_hashes(rows, index[name]["block_rows"])
        return rows
    _stream_safetensors(file, {f"{name}:{k}": (dtype, shape, functools.partial(stored, name, k))
                               for (name, k), (dtype, shape) in layout.items()})
    return index


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _stream_safetensors(file: Path, tensors: dict) -> None:
    """Write a safetensors file (an 8-byte little-endian header length, the JSON header, then each tensor's bytes
    in header order) from {key: (dtype, shape, produce)}, calling produce() for one tensor at a time and
    fsyncing at the end. safetensors' own writers take every tensor at once (and copy each to bytes), which
    would hold a rank's whole share of the model twice over while it writes."""
    header, offset = {}, 0
    for key, (dtype, shape, _) in tensors.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors' writer pads it
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key, (dtype, shape, produce) in tensors.items():
            tensor = produce()
            if tensor.dtype != dtype or list(tensor.shape) != list(shape) or tensor.device.type != "cpu":
                raise LongtrainError(f"checkpoint file {file}: {key} changed while it was written "
                                     f"({tensor.dtype} {list(tensor.shape)}, header {dtype} {list(shape)})")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def _pieces(path: Path, manifest: dict) -> dict[str, list[tuple[str, dict]]]:
    """Dense name -> [(file, index entry)], one per saved slice, in slice order. A tied tensor is written by
    both pipeline stages that hold it: the first copy of each slice is the one read."""
    pieces: dict[str, dict] = {}
    for file, info in sorted(manifest["files"].items()):
        for name, entry in info.get("tensors", {}).items():
            if not (isinstance(entry, dict) and INDEX_KEYS <= set(entry)):
                raise LongtrainError(f"checkpoint {path}: manifest.json's index of {file} lists {name} without "
                                     f"{sorted(INDEX_KEYS - set(entry) if isinstance(entry, dict) else INDEX_KEYS)}")
            pieces.setdefault(name, {}).setdefault(entry["index"], (file, entry))
    out = {}
    for name, by_index in pieces.items():
        parts = next(iter(by_index.values()))[1]["parts"]
        if sorted(by_index) != list(range(parts)):
            raise LongtrainError(f"checkpoint {path}: manifest.json lists slices {sorted(by_index)} of {name}, "
                                 f"which has {parts}: restore the manifest or the missing rank's universal file")
        out[name] = [by_index[i] for i in range(parts)]
    return out


class _Reader:
    """Reads row ranges of stored tensors, whole hash blocks at a time, and checks every block it reads."""

    def __init__(self, path: Path):
        self.path, self.handles = Path(path), {}

    def rows(self, file: str, entry: dict, key: str, name: str, start: int, stop: int) -> torch.Tensor:
        from safetensors import safe_open

        where = f"checkpoint file {self.path / file}"
        if file not in self.handles:
            try:
                self.handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as e:  # safetensors' own error type: a torn or replaced file
                raise LongtrainError(f"{where} is not a safetensors file ({str(e)[:80]}): restore it or resume from "
                                     "an earlier checkpoint") from None
        handle, block_rows = self.handles[file], entry["block_rows"]
        expected = list(_stored(torch.empty(entry["shape"], device="meta"), entry["dim"]).shape)
        try:
            view = handle.get_slice(f"{name}:{key}")
        except Exception:  # safetensors raises its own error type for a missing name
            raise LongtrainError(f"{where} holds no {name}:{key}, which manifest.json lists: the file was replaced; "
                                 "restore it or resume from an earlier checkpoint") from None
        if list(view.get_shape()) != expected:
            raise LongtrainError(f"{where}: {name}:{key} is {view.get_shape()}, manifest.json says {expected}")
        first, last = start // block_rows, -(-stop // block_rows)
        low = first * block_rows
        part = view[low:min(last * block_rows, expected[0])]
        if str(part.dtype) != entry["dtype"]:  # same bytes read as another dtype would pass the hashes
            raise LongtrainError(f"{where}: {name}:{key} is {part.dtype}, manifest.json says {entry['dtype']}")
        READ["bytes"] += part.numel() * part.element_size()
        for block, digest in enumerate(entry["sha256"][key][first:last]):
            if _digest(part[block * block_rows:(block + 1) * block_rows]) != digest:
                raise LongtrainError(f"{where} fails its sha256 check ({name}:{key}, rows from "
                                     f"{(first + block) * block_rows}): resume from an earlier checkpoint")
        return part[start - low:stop - low]

    def box(self, pieces: list, key: str, name: str, dim: int | None, start: int | None, stop: int | None):
        """Dense rows [start, stop) along `dim` (None: the whole tensor), from the slices that hold them."""
        file, entry = pieces[0]
        saved = entry["dim"]
        if saved is None:  # replicated: every tp rank wrote the same copy; stored rows are dense dim 0
            if dim == 0:
                return self.rows(file, entry, key, name, start, stop)
            whole = self.rows(file, entry, key, name, 0, entry["shape"][0])
            return whole if dim is None else whole.narrow(dim, start, stop - start)
        size = entry["shape"][saved]
        lo, hi = (start, stop) if dim == saved else (0, size * entry["parts"])
        out = []
        for file, entry in pieces:
            a, b = max(lo, entry["index"] * size), min(hi, (entry["index"] + 1) * size)
            if a < b:
                rows = self.rows(file, entry, key, name, a - entry["index"] * size, b - entry["index"] * size)
                out.append(rows.movedim(0, saved) if saved else rows)
        full = torch.cat(out, dim=saved)
        return full if dim in (None, saved) else full.narrow(dim, start, stop - start)


def _dense_shape_of(pieces: list) -> list[int]:
    entry = pieces[0][1]
    shape = list(entry["shape"])
    if entry["dim"] is not None:
        shape[entry["dim"]] *= entry["parts"]
    return shape


def read_slices(path: Path, manifest: dict, wanted: dict, keys=KEYS) -> dict:
    """Dense name -> {'step': n, key: this rank's slice} for wanted = {dense name: (local shape, tp, tp_rank)}.
    Reads only the hash blocks that hold the rank's slice, and checks each one against the manifest."""
    from longtrain.trainer.parallel.tensor import shard_dim

    path = Path(path)
    pieces = _pieces(path, manifest)
    if not pieces:
        return _slices_from_rank_files(path, manifest, wanted, keys)
    missing = sorted(set(wanted) - set(pieces))
    if missing:
        raise LongtrainError(f"checkpoint {path} holds no {missing[0]} (and {len(missing) - 1} more): another model?")
    reader, out = _Reader(path), {}
    for name, (shape, tp, tp_rank) in wanted.items():
        dense = _dense_shape_of(pieces[name])
        try:
            dim = shard_dim(shape, dense, tp)
        except ValueError:
            raise LongtrainError(f"checkpoint {path}: {name} is {tuple(dense)}, which this rank's {tuple(shape)} at "
                                 f"tp={tp} is not a slice of: another model?") from None
        start, stop = (None, None) if dim is None else (tp_rank * shape[dim], (tp_rank + 1) * shape[dim])
        out[name] = {"step": pieces[name][0][1]["step"],
                     **{k: reader.box(pieces[name], k, name, dim, start, stop).contiguous() for k in keys}}
        READ["share"] += sum(out[name][k].numel() * out[name][k].element_size() for k in keys)
    return out


def _slices_from_rank_files(path: Path, manifest: dict, wanted: dict, keys) -> dict:
    """Checkpoints written before universal files existed kept the section inside each rank file."""
    from longtrain.trainer.parallel.tensor import shard_dim

    full = read_universal(path, manifest["world_size"])
    out = {}
    for name, (shape, tp, tp_rank) in wanted.items():
        if name not in full:
            raise LongtrainError(f"checkpoint {path} holds no {name}: another model?")
        try:
            dim = shard_dim(shape, full[name]["param"].shape, tp)
        except ValueError:
            raise LongtrainError(f"checkpoint {path}: {name} is {tuple(full[name]['param'].shape)}, which this "
                                 f"rank's {tuple(shape)} at tp={tp} is not a slice of: another model?") from None
        out[name] = {"step": full[name]["step"], **{
            k: full[name][k] if dim is None else full[name][k].narrow(dim, tp_rank * shape[dim], shape[dim]).contiguous()
            for k in keys}}
    return out


def read_universal(path: Path, world: int) -> dict:
    """Dense name -> {key: full dense tensor, 'step': n} from the `universal` sections inside every rank file
    (the format before universal files; kept so those checkpoints still load)."""
    from longtrain.trainer.checkpoint import load_rank_state

    pieces: dict[str, list[dict]] = {}
    for rank in range(world):
        section = load_rank_state(path, rank, mmap=True).get("universal")
        if section is None:
            raise LongtrainError(f"checkpoint {path} was saved with checkpoint.reshardable=false: it loads only "
                                 "under the layout that wrote it (rank files hold no layout-free section)")
        for name, entry in section.items():
            pieces.setdefault(name, []).append(entry)
    out = {}
    for name, entries in pieces.items():
        first = entries[0]
        full = {"step": first["step"]}
        for key in ("param", *MOMENTS):
            if first["dim"] is None:
                full[key] = first[key]
                continue
            by_index = {e["index"]: e[key] for e in entries}
            if sorted(by_index) != list(range(first["parts"])):
                raise LongtrainError(f"checkpoint {path}: {name} has slices {sorted(by_index)} of {first['parts']}")
            full[key] = torch.cat([by_index[i] for i in range(first["parts"])], dim=first["dim"])
        out[name] = full
    return out


@torch.no_grad()
def load_universal(path: Path, manifest: dict, named_params, optimizer, zero_stage: int, tp: int, tp_rank: int) -> None:
    """Give this rank's parameters and Adam state their slices of the saved dense tensors, reading only those."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    named_params = list(named_params)
    slices = read_slices(path, manifest, {n: (_dense_shape(p), tp, tp_rank) for n, p in named_params})
    base = _base(optimizer)
    step = max(slices[n]["step"] for n, _ in named_params)
    if zero_stage:  # Adam's state on the flat partitions exists only after a first step: make it, then link it
        for flat in _flat_groups(optimizer):
            base.state[flat] = {"step": torch.tensor(float(step)), **{k: torch.zeros_like(flat) for k in MOMENTS}}
        _relink(optimizer)
    for name, param in named_params:
        mine = slices[name]
        if zero_stage:
            safe_set_full_fp32_param(param, mine["param"])
            for k in MOMENTS:
                safe_set_full_optimizer_state(param, mine[k], k)
            if zero_stage < 3:
                param.data.copy_(mine["param"])
        else:
            param.data.copy_(mine["param"])
            base.state[param] = {"step": torch.tensor(float(mine["step"])), **{k: mine[k].clone() for k in MOMENTS}}
    if zero_stage == 3:  # the model's own partitions follow the fp32 master partitions
        for lp, hp in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
            lp.data.copy_(hp.data)


def consolidated_weights(path: Path, manifest: dict) -> dict:
    """Dense Decoder name -> whole tensor, assembled from every rank's slices (any tp / pp / dp layout)."""
    from longtrain.trainer.checkpoint import load_rank_state

    world = manifest.get("world_size", 1)
    if world == 1 and manifest["layout"].get("zero_stage", 0) < 3:  # one rank's own model state is whole
        state = load_rank_state(path, 0, mmap=True)
        if not isinstance(state.get("model"), dict):
            raise LongtrainError(f"checkpoint {path}: rank00000.pt holds no model state (keys: "
                                 f"{', '.join(map(str, state))[:80]})")
        return state["model"]
    pieces = _pieces(path, manifest)
    if not pieces:  # universal sections inside the rank files (older checkpoints)
        return {name: entry["param"] for name, entry in read_universal(path, world).items()}
    dense = {name: (_dense_shape_of(found), 1, 0) for name, found in pieces.items()}
    return {name: entry["param"] for name, entry in read_slices(path, manifest, dense, keys=("param",)).items()}
