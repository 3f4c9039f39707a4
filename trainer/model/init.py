"""Parameter initialisation keyed by the dense parameter name and slice, so any layout reproduces the
one-process values exactly, and construction on the meta device.

Each parameter carries an init rule, set where it is created (the `Linears` factories, RMSNorm, the
blocks): `("normal", std)`, `("uniform", low, high)`, `("const", value)`, `("dt_bias", dt_min, dt_max)`
(Mamba's log-uniform step sizes through an inverse softplus) or `("a_log",)` (log 1..state per row).
A tensor-parallel shard carries `tensor_model_parallel` and `partition_dim`, as megatron-core marks
its own layers, so its dense shape is known without the dense tensor.

Random rules draw the dense tensor as a (rows, row elements) matrix in blocks of rows; block i comes
from its own generator seeded by (run seed, dense name, i). A rank draws only the blocks that hold its
rows (a shard along dim 0), or draws each block in turn and keeps its columns (a shard along a later
dim): its memory is one block beyond its own slice, whatever the model size. The values differ from
`torch.manual_seed(seed)` followed by eager construction (which draws in construction order, so a
pipeline stage or a shard could not draw its part alone); the one-process run uses this scheme too.

`build_decoder` declares the model on the meta device and materialises it on the target device with
these values; trainer/parallel/parallelize.py does the same per rank for its shard, stage and ZeRO-3
partition.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

BLOCK_ELEMENTS = 1 << 20  # elements per drawn block (4 MiB in float32): bounds the memory beyond the slice


def set_rule(param: nn.Parameter, kind: str, *args) -> nn.Parameter:
    param.init_rule = (kind, *args)
    return param


@torch.no_grad()
def apply_rule_eagerly(param: nn.Parameter) -> nn.Parameter:
    """Fill a freshly built (non-meta) parameter from torch's global generator by its rule, as eager
    construction does (`Decoder(cfg)` after `torch.manual_seed`); `initialize` is the layout-free way."""
    if param.device.type == "meta":
        return param
    rule = param.init_rule
    if rule[0] == "normal":
        param.normal_(0.0, rule[1])
    elif rule[0] == "uniform":
        param.uniform_(rule[1], rule[2])
    elif rule[0] == "dt_bias":
        low, high = math.log(rule[1]), math.log(rule[2])
        dt = torch.exp(torch.rand(param.shape) * (high - low) + low)
        param.copy_(dt + torch.log(-torch.expm1(-dt)))
    else:
        param.copy_(_draw(rule, "", 0, 0, tuple(param.shape), 0))
    return param


def mark_shard(param: nn.Parameter, dim: int) -> nn.Parameter:
    """Mark `param` as this rank's contiguous slice of a dense tensor along `dim` (megatron-core's
    attributes: DeepSpeed's gradient norm also counts a parameter on every tp rank only with this mark)."""
    param.tensor_model_parallel, param.partition_dim = True, dim
    return param


def shard_of(param: nn.Parameter) -> int | None:
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def dense_shape(param: nn.Parameter, tp: int) -> tuple[int, ...]:
    shape = list(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape in ds_shape
    dim = shard_of(param)
    if dim is not None:
        shape[dim] *= tp
    return tuple(shape)


def _seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _draw(rule: tuple, name: str, seed: int, block: int, shape: tuple[int, ...], first_row: int) -> torch.Tensor:
    """Block `block` of the dense tensor: rows first_row.. of `shape` (float32 on the CPU: the generator
    and so the values are the same on every device)."""
    kind = rule[0]
    if kind == "const":
        return torch.full(shape, float(rule[1]))
    if kind == "a_log":  # S4D-real initialisation (Gu et al. 2022), as Mamba: A = -(1..state) per channel
        return torch.log(torch.arange(1, shape[-1] + 1, dtype=torch.float32)).expand(shape).clone()
    generator = torch.Generator().manual_seed(_seed(seed, name, block))
    values = torch.empty(shape)
    if kind == "normal":
        return values.normal_(0.0, rule[1], generator=generator)
    if kind == "uniform":
        return values.uniform_(rule[1], rule[2], generator=generator)
    if kind == "dt_bias":  # delta = softplus(bias) log-uniform in [dt_min, dt_max] (Gu & Dao 2023)
        low, high = math.log(rule[1]), math.log(rule[2])
        dt = torch.exp(values.uniform_(0.0, 1.0, generator=generator) * (high - low) + low)
        return dt + torch.log(-torch.expm1(-dt))
    raise ValueError(f"unknown init rule {rule!r} for {name}")


def dense_slice(rule: tuple, name: str, seed: int, shape: tuple[int, ...], dim: int | None = None,
                start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The values [start, stop) along `dim` (the whole tensor when dim is None) of the dense tensor
    `name` of `shape` under `rule`. Equal, slice for slice, to the whole tensor whatever the cut."""
    if len(shape) == 0:
        return _draw(rule, name, seed, 0, (), 0)
    rows = shape[0]
    row_elements = math.prod(shape[1:])
    block_rows = max(1, BLOCK_ELEMENTS // max(row_elements, 1))
    row_start, row_stop = (start, stop if stop is not None else rows) if dim == 0 else (0, rows)
    pieces = []
    for block in range(row_start // block_rows, -(-row_stop // block_rows)):
        first = block * block_rows
        values = _draw(rule, name, seed, block, (min(block_rows, rows - first), *shape[1:]), first)
        values = values[max(row_start - first, 0): row_stop - first]
        if dim not in (None, 0):
            values = values.narrow(dim, start, (stop if stop is not None else shape[dim]) - start)
        pieces.append(values)
    if not pieces:
        out_shape = list(shape)
        out_shape[0] = 0
        return torch.empty(out_shape)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


@torch.no_grad()
def initialize(named_parameters, seed: int, tp_rank: int = 0, tp: int = 1) -> None:
    """Fill each (dense name, parameter) with its slice of the dense tensor its rule defines."""
    for name, param in named_parameters:
        rule = getattr(param, "init_rule", None)
        if rule is None:
            raise ValueError(f"parameter {name} has no init rule (set one with trainer.model.init.set_rule)")
        dim = shard_of(param)
        if dim is None:
            values = dense_slice(rule, name, seed, tuple(param.shape))
        else:
            size = param.shape[dim]
            values = dense_slice(rule, name, seed, dense_shape(param, tp), dim, tp_rank * size, (tp_rank + 1) * size)
        param.copy_(values.to(param.dtype))


def materialize(module: nn.Module, device, seed: int, named_parameters=None, tp_rank: int = 0, tp: int = 1) -> nn.Module:
    """Allocate `module`'s meta tensors on `device` and initialise them (named_parameters: its (dense name,
    parameter) pairs; default its own names)."""
    buffers = [name for name, b in module.named_buffers() if b.device.type == "meta"]
    if buffers:  # their values would be lost: a module computes its constants in forward instead
        raise ValueError(f"{type(module).__name__} has buffers {buffers} that meta construction cannot restore")
    marks = {name: dict(vars(p)) for name, p in module.named_parameters()}  # to_empty makes new Parameters
    module.to_empty(device=device)
    for name, p in module.named_parameters():
        for key, value in marks[name].items():
            setattr(p, key, value)
    initialize(named_parameters if named_parameters is not None else module.named_parameters(), seed, tp_rank, tp)
    return module


def materialize_decoder(decoder: nn.Module, device, seed: int, tp_rank: int = 0, tp: int = 1, partition=None) -> nn.Module:
    """Materialise a Decoder declared on meta one piece at a time (embedding, each block, norm, head).
    partition(piece), when given, takes each piece's parameters as soon as they hold their values (ZeRO-3:
    each rank keeps 1/dp of them), so no rank ever holds more than one piece whole."""
    pieces = [("embed.", decoder.embed), *((f"blocks.{i}.", b) for i, b in enumerate(decoder.blocks)),
              ("norm.", decoder.norm)] + ([("head.", decoder.head)] if decoder.head is not None else [])
    for prefix, piece in pieces:
        materialize(piece, device, seed, ((prefix + n, p) for n, p in piece.named_parameters()), tp_rank, tp)
        if partition is not None:
            partition(piece)
    return decoder


def build_decoder(cfg, device="cpu", seed: int = 0, linears=None, tp_rank: int = 0, partition=None, **kwargs) -> nn.Module:
    """The Decoder on `device`, declared on meta and initialised by name: the one-process model, or with a
    tensor-parallel `linears` this rank's shard of it (see materialize_decoder for `partition`)."""
    from longtrain.trainer.model.decoder import Decoder

    with torch.device("meta"):
        model = Decoder(cfg, linears, **kwargs)
    return materialize_decoder(model, device, seed, tp_rank, getattr(linears, "tp", 1), partition)


def dense_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Dense parameter name -> shape, from the configuration alone (built on the meta device)."""
    from longtrain.trainer.model.decoder import Decoder

    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in Decoder(cfg).named_parameters()}
