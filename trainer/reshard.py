"""Layout-free checkpoint entries: load a checkpoint saved at one (tp, pp, cp, dp, ZeRO stage) at another.

Each rank file holds, besides the rank's own engine state (used when the layout is unchanged, for a
bitwise resume), a `universal` section: for every parameter the rank owns, keyed by its name in the
dense Decoder, the fp32 value and both Adam moments of the rank's tensor-parallel slice, with the
slice's place in the dense tensor (dim, index, parts) and Adam's step count.

    {"blocks.0.attn.q.weight": {"dim": 0, "index": 1, "parts": 2, "step": 40,
                                "param": ..., "exp_avg": ..., "exp_avg_sq": ...}, ...}

Only the first data- and context-parallel replica of each slice writes it (the others are copies); under
ZeRO the slice is first gathered from the partitions with DeepSpeed's own accessors
(`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`), which are collective over the ZeRO group,
so every rank takes part. Loading at another layout concatenates the saved slices of each dense tensor
and hands every new rank its own slice, through the matching setters. This is what DeepSpeed's
universal checkpoint does as an offline conversion (`ds_to_universal`); here it is written with the
checkpoint, so a run resumes at any layout with no conversion step, ZeRO stage 0 (which DeepSpeed's
universal format does not cover) included.
"""
from __future__ import annotations

from pathlib import Path

import torch

from longtrain.trainer.errors import LongtrainError

MOMENTS = ("exp_avg", "exp_avg_sq")


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
                    keep: bool) -> dict:
    """This rank's `universal` section (empty unless keep). Collective under ZeRO: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from longtrain.trainer.parallel.tensor import shard_dim

    base = _base(optimizer)
    if zero_stage:
        step = int(next(iter(base.state.values()))["step"]) if base.state else 0
        _relink(optimizer)
    out = {}
    for name, param in named_params:
        if zero_stage:
            value = safe_get_full_fp32_param(param)
            moments = {k: safe_get_full_optimizer_state(param, k) if base.state else torch.zeros_like(value)
                       for k in MOMENTS}
        else:
            state = base.state.get(param, {})
            value = param.detach()
            moments = {k: state[k] if k in state else torch.zeros_like(value) for k in MOMENTS}
            step = int(state["step"]) if "step" in state else 0
        if not keep:
            continue
        dim = shard_dim(_dense_shape(param), dense_shapes[name], tp)
        out[name] = {"dim": dim, "index": tp_rank if dim is not None else 0, "parts": tp if dim is not None else 1,
                     "step": step, "param": value.detach().clone().contiguous(),
                     **{k: v.detach().clone().contiguous() for k, v in moments.items()}}
    return out


def read_universal(path: Path, world: int) -> dict:
    """Dense name -> {key: full dense tensor, 'step': n} from every rank file of a checkpoint."""
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
def load_universal(full: dict, named_params, optimizer, zero_stage: int, tp: int, tp_rank: int, path: Path) -> None:
    """Give this rank's parameters and Adam state their slices of the dense tensors in `full`."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from longtrain.trainer.parallel.tensor import shard_dim

    named_params = list(named_params)
    missing = sorted({n for n, _ in named_params} - set(full))
    if missing:
        raise LongtrainError(f"checkpoint {path} holds no {missing[0]} (and {len(missing) - 1} more): another model?")
    base = _base(optimizer)
    step = max(full[n]["step"] for n, _ in named_params)
    if zero_stage:  # Adam's state on the flat partitions exists only after a first step: make it, then link it
        for flat in _flat_groups(optimizer):
            base.state[flat] = {"step": torch.tensor(float(step)), **{k: torch.zeros_like(flat) for k in MOMENTS}}
        _relink(optimizer)
    for name, param in named_params:
        entry = full[name]
        shape = _dense_shape(param)
        try:
            dim = shard_dim(shape, entry["param"].shape, tp)
        except ValueError:
            raise LongtrainError(f"checkpoint {path}: {name} is {tuple(entry['param'].shape)}, which this rank's "
                                 f"{tuple(shape)} at tp={tp} is not a slice of: another model?") from None
        mine = {k: entry[k] if dim is None else entry[k].narrow(dim, tp_rank * shape[dim], shape[dim]).contiguous()
                for k in ("param", *MOMENTS)}
        if zero_stage:
            safe_set_full_fp32_param(param, mine["param"])
            for k in MOMENTS:
                safe_set_full_optimizer_state(param, mine[k], k)
            if zero_stage < 3:
                param.data.copy_(mine["param"])
        else:
            param.data.copy_(mine["param"])
            base.state[param] = {"step": torch.tensor(float(entry["step"])), **{k: mine[k].clone() for k in MOMENTS}}
    if zero_stage == 3:  # the model's own partitions follow the fp32 master partitions
        for lp, hp in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
            lp.data.copy_(hp.data)


def consolidated_weights(path: Path, manifest: dict) -> dict:
    """Dense Decoder name -> whole tensor, assembled from every rank's slices (any tp / pp / dp layout)."""
    from longtrain.trainer.checkpoint import load_rank_state

    world = manifest.get("world_size", 1)
    if world == 1:  # one rank: its own model state is whole when it has no layout-free section
        state = load_rank_state(path, 0, mmap=True)
        if "universal" not in state:
            if not isinstance(state.get("model"), dict):
                raise LongtrainError(f"checkpoint {path}: rank00000.pt holds no model state (keys: "
                                     f"{', '.join(map(str, state))[:80]})")
            return state["model"]
    return {name: entry["param"] for name, entry in read_universal(path, world).items()}
