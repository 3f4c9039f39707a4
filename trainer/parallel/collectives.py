"""Every collective longtrain issues, each on the device its group expects.

Two kinds of values cross ranks:
- tensors of the training path (losses, gradients, activations, token counts, gradient norms) stay on
  the compute device and go over the group the work belongs to: `all_reduce`, `all_gather`,
  `ring_exchange`, `exchange`, `gather_object`;
- control values (a stop flag, a resume path decision) are Python numbers: `agree_any` / `agree_all`
  send them as CPU tensors over the control group, a gloo group beside NCCL on GPU runs (the default
  group itself on CPU runs, which is gloo already).

NCCL refuses CPU tensors, and a gloo run cannot see that: every tensor is on the CPU there.
`HostTensorCheck` (a test hook) runs a CPU job as a NCCL run would place its tensors: a tensor made on
the host (by a factory given no `device=`, or computed from such tensors alone) that reaches any
torch.distributed collective on a group other than the control group raises, naming the op and the
caller, whoever issued it (our code, DeepSpeed's, megatron-core's). Tensors placed explicitly
(`.to(device)`, `device=`) and everything derived from model parameters count as on the device.

The control group is made once per process, by `init_control_group` right after the default group,
as the default group itself is torch's one per process (every rank must create a group together).
"""
from __future__ import annotations

import functools
import inspect
import sys
import weakref

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_control_group = None  # see the module docstring: made together by every rank, once
_made_for = None  # the default group it was made beside


def init_control_group() -> None:
    """Make the control group (collective: every rank calls it, after the default group exists; again
    for the same default group, it keeps the one it made). On a gloo default group it is that group,
    except under HostTensorCheck, which needs the control traffic apart as on a NCCL run."""
    global _control_group, _made_for
    world = dist.group.WORLD
    apart = _check is not None or dist.get_backend() != "gloo"
    if _made_for is world and (_control_group is not world or not apart):
        return
    _control_group, _made_for = (dist.new_group(backend="gloo") if apart else world), world


def _control():
    if _control_group is None:
        raise RuntimeError("longtrain's control group is made by trainer.engine.init_distributed; call it first")
    return _control_group


def agree_any(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (a stop signal received by one rank)."""
    return _agree(flag, dist.ReduceOp.MAX)


def agree_all(flag: bool) -> bool:
    """True on every rank when `flag` is True on every rank (every rank can take the same path)."""
    return _agree(flag, dist.ReduceOp.MIN)


def gather_values(value: float) -> list[float]:
    """Every rank's `value`, in rank order, on every rank (a control value: the peak memory of each rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    parts = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, torch.tensor([float(value)], dtype=torch.float64), group=_control())
    return [part.item() for part in parts]


def _agree(flag: bool, op) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0])  # the control group's device: the host
    dist.all_reduce(value, op=op, group=_control())
    return bool(value.item())


# ---- the training path: tensors on the compute device ----

def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> None:
    dist.all_reduce(tensor, op=op, group=group)


def all_gather(parts: list[torch.Tensor], tensor: torch.Tensor, group=None) -> None:
    dist.all_gather(parts, tensor, group=group)


def ring_exchange(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Send each tensor to the next rank of the group's ring and receive the previous rank's; returns those."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    send_to = dist.get_global_rank(group, (rank + 1) % size)
    recv_from = dist.get_global_rank(group, (rank - 1) % size)
    received = [torch.empty_like(t) for t in tensors]
    ops = []
    for t, r in zip(tensors, received):
        ops.append(dist.P2POp(dist.isend, t.contiguous(), send_to, group))
        ops.append(dist.P2POp(dist.irecv, r, recv_from, group))
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


def exchange(sends: list[tuple[torch.Tensor, int]], receives: list[tuple[torch.Tensor, int]], group) -> None:
    """Point-to-point, all at once: send each (tensor, group rank) and fill each (buffer, group rank) from that
    rank. Between two ranks, the sender lists its tensors in the order the receiver lists its buffers."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, r), group) for t, r in sends]
    ops += [dist.P2POp(dist.irecv, b, dist.get_global_rank(group, r), group) for b, r in receives]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def gather_object(obj, destination: int = 0) -> list | None:
    """Every rank's `obj` on rank `destination` (a list in rank order), None elsewhere. Over the default
    group: NCCL moves the pickled bytes through the current CUDA device (trainer.engine sets it)."""
    pieces = [None] * dist.get_world_size() if dist.get_rank() == destination else None
    dist.gather_object(obj, pieces, dst=destination)
    return pieces


def barrier() -> None:
    """Every rank waits for the others (the default group; NCCL's runs on the bound device)."""
    dist.barrier()


# ---- the test hook: run a CPU job as a NCCL run places its tensors ----

class HostTensorCheck(TorchFunctionMode):
    """Within `with HostTensorCheck():`, a tensor the program made on the host (a factory call without
    `device=`, or an op all of whose tensor inputs are such) raises PlacementError when it reaches a
    collective of the training path. Where a NCCL run would have put each tensor is decided the way
    the run would: explicit placement (`.to(device)`, `device=`) moves it to the device, and mixing a
    host tensor with device tensors gives a device tensor (a CUDA op accepts host scalars)."""

    def __init__(self):
        super().__init__()
        self._host: dict[int, weakref.ref] = {}  # by id: a tensor's == is elementwise, so no WeakSet

    def is_host(self, tensor: torch.Tensor) -> bool:
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor

    def _mark(self, tensor: torch.Tensor, host: bool) -> None:
        key = id(tensor)
        if host:
            self._host[key] = weakref.ref(tensor, lambda _, key=key: self._host.pop(key, None))
        else:
            self._host.pop(key, None)

    def __enter__(self):
        global _check
        self._outer, _check = _check, self
        for name in CHECKED:  # once per process; outside a check they only pass the call on
            if hasattr(dist, name) and not hasattr(getattr(dist, name), "unchecked"):
                setattr(dist, name, _checking(name, getattr(dist, name)))
        return super().__enter__()

    def __exit__(self, *exc):
        global _check
        _check = self._outer
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if _placed_explicitly(func, args, kwargs):
            host = False
        else:
            inputs = _tensors(args) + _tensors(list(kwargs.values()))
            host = all(self.is_host(t) for t in inputs) if inputs else func in _FACTORIES and kwargs.get("device") is None
        for out in _tensors(result if isinstance(result, (list, tuple)) else [result]):
            # An in-place op keeps its tensor where it is: a host tensor updated from device tensors is
            # still on the host (a CUDA run raises right there, or at the collective that sends it).
            self._mark(out, host or self.is_host(out) and not _placed_explicitly(func, args, kwargs))
        return result


class PlacementError(RuntimeError):
    """A collective got a tensor that a NCCL run would hold on the host."""


_check: HostTensorCheck | None = None
# What is checked: the collectives and point-to-point ops whose tensors NCCL must find on the device.
# The *_object ones pickle through a device buffer torch makes itself, and barriers carry no tensor.
CHECKED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
           "all_to_all", "all_to_all_single", "broadcast", "reduce", "gather", "scatter", "send", "recv",
           "batch_isend_irecv", "_all_gather_base", "_reduce_scatter_base")


def _checking(name: str, function):
    signature = inspect.signature(function)

    @functools.wraps(function)
    def checked(*args, **kwargs):
        if _check is not None:
            arguments = signature.bind(*args, **kwargs).arguments
            if arguments.get("group") is not _control_group or _control_group is None:
                for tensor in _tensors(list(arguments.values())):
                    if _check.is_host(tensor):
                        raise PlacementError(f"{name} from {_caller()} got a tensor made on the host: NCCL refuses "
                                             "it; make it on the compute device, or send a control value with "
                                             "collectives.agree_any / agree_all")
        return function(*args, **kwargs)
    checked.unchecked = function
    return checked


def _caller() -> str:
    """file:line (function) of the innermost frame outside torch.distributed and this module."""
    frame = sys._getframe(2)
    while frame is not None and ("torch/distributed" in frame.f_code.co_filename
                                 or frame.f_code.co_filename in (__file__, _FAULTS)):
        frame = frame.f_back
    code = frame.f_code if frame is not None else None
    return f"{code.co_filename}:{frame.f_lineno} ({code.co_name})" if code else "?"


_FAULTS = __file__.replace("parallel/collectives.py", "faults.py")


_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.randn, torch.rand, torch.randint, torch.from_numpy, torch.scalar_tensor, torch.linspace}


def _placed_explicitly(func, args, kwargs) -> bool:
    if func in (torch.Tensor.to, torch.Tensor.cuda):
        return func is torch.Tensor.cuda or "device" in kwargs or any(
            isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])
    return func in _FACTORIES and kwargs.get("device") is not None


def _tensors(values) -> list[torch.Tensor]:
    """The tensors among values, and inside lists and tuples among them (torch.stack's, all_gather's
    output list, batch_isend_irecv's P2POps)."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_tensors(v))
        elif isinstance(v, dist.P2POp):
            out.append(v.tensor)
    return out
