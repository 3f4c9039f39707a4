"""Collective failures named in one line: which rank, which op over which ranks, in which phase of the loop.

    watch = watch_collectives(timeout_s=600.0)    # once per process, before any process group or engine
    watch.phase = "train step 3"                  # the loop says where it is
    with named_failures(watch):                   # around the loop: converts what an async op's wait() raises
        ...

A collective whose peer never arrives fails after the group's timeout; gloo (torch 2.13) raises a
RuntimeError from deep inside DeepSpeed such as "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed
out waiting 10000ms for recv operation to complete", and "... pair.cc:537] Read error [127.0.0.1]:45995:
Connection reset by peer ..." when the peer died. Neither says which op or which ranks. Here such a
failure becomes a CollectiveError (a LongtrainError, printed by the CLI as one line):

    rank 0: all_reduce over ranks [0, 1] timed out after 10 s during train step 3 — a peer rank is hung or dead

`watch_collectives` replaces torch.distributed's collective and point-to-point functions by wrappers
that record the op and its arguments and convert a failure raised inside a blocking call. DeepSpeed's
comm layer and megatron-core call them through the torch.distributed module, but some keep a reference
taken once (DeepSpeed's TorchBackend its all_gather_into_tensor / reduce_scatter_tensor when the comm
backend starts, megatron-core's tensor_parallel module aliases at import), hence "before any engine".
An async op (async_op=True, batch_isend_irecv) raises later from its Work.wait(), outside any
wrapper: `named_failures` converts that with the last op this process issued. isend and irecv are
left as they are (torch's P2POp accepts only those very functions), so they are not recorded.

`new_group` is wrapped too: a group made without a timeout gets `watch.timeout_s` instead of torch's
default of 30 minutes (DeepSpeed's copy of the world group, its pipeline groups). Groups whose maker
names a timeout keep it (megatron-core's: trainer/parallel/mesh.py passes the recipe's), as does a
default group a launcher made before us (Ray Train's).

Tested with gloo. With NCCL, torch's watchdog thread usually ends the process on a timeout itself,
logging the op and its sequence number, before anything reaches Python.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import os
import re

import torch
import torch.distributed as dist

from longtrain.trainer.errors import LongtrainError

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "all_to_all", "all_to_all_single", "broadcast", "reduce", "gather", "scatter", "barrier",
               "monitored_barrier", "all_reduce_coalesced", "all_gather_object", "gather_object",
               "broadcast_object_list", "scatter_object_list", "_all_gather_base", "_reduce_scatter_base")
# Not isend / irecv: torch's P2POp accepts only those very functions (by identity) for batch_isend_irecv,
# which is wrapped instead. DeepSpeed's pipeline sends with send / recv / broadcast.
POINT_TO_POINT = ("send", "recv", "batch_isend_irecv")

FROM_BACKEND = re.compile(r"gloo|nccl|c10d", re.IGNORECASE)
TIMED_OUT = re.compile(r"timed out|timeout|timing out", re.IGNORECASE)
LOST_PEER = re.compile(r"connection (?:reset|closed) by peer|broken pipe", re.IGNORECASE)
WAITED_MS = re.compile(r"waiting (\d+)\s*ms")


class CollectiveError(LongtrainError):
    """A collective timed out or lost its peer; the message names the rank, the op and the loop's phase."""


class CollectiveWatch:
    """The last collective this process issued and the phase the loop is in, for naming a failure."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.phase = "start-up"
        self.last: tuple | None = None  # (op name, function, args, kwargs) of the last call

    def error(self, failure: BaseException, op: tuple | None = None) -> CollectiveError | None:
        """The one-line error for `failure`, or None when it is neither a timeout nor a lost peer.
        op: the call that raised it (a blocking call); None: an async op's wait(), named by the last call."""
        text = str(failure)
        if op is None and not (isinstance(failure, dist.DistError) or FROM_BACKEND.search(text)):
            return None  # raised outside any collective and not by the communication backend
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
        if TIMED_OUT.search(text):
            waited = WAITED_MS.search(text)
            seconds = int(waited.group(1)) / 1000 if waited else self.timeout_s
            what, why = f"timed out after {seconds:g} s", "a peer rank is hung or dead"
        elif LOST_PEER.search(text):
            what, why = "lost its peer", "a peer rank died or left"
        else:
            return None
        if op is not None:
            return CollectiveError(f"rank {rank}: {describe(op)} {what} during {self.phase} — {why}")
        last = f" (the last one this rank issued: {describe(self.last)})" if self.last else ""
        return CollectiveError(f"rank {rank}: a collective {what} during {self.phase}{last} — {why}")


def describe(op: tuple) -> str:
    """'all_reduce over ranks [0, 1]', 'recv from rank 1', ... for a recorded call."""
    name, function, args, kwargs = op
    try:
        arguments = inspect.signature(function).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        arguments = {}
    if name == "send":
        return f"send to rank {arguments.get('dst', '?')}"
    if name == "recv":
        return f"recv from rank {arguments.get('src', 'any')}"
    if name == "batch_isend_irecv":
        peers = sorted({p2p.peer for p2p in arguments.get("p2p_op_list", [])})
        return f"{name} with ranks {peers}"
    try:
        group = arguments.get("group")
        ranks = dist.get_process_group_ranks(dist.group.WORLD if group is None else group)
    except (RuntimeError, ValueError, AttributeError):
        return f"{name} over a process group"
    shown = str(ranks) if len(ranks) <= 8 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)} ranks)"
    return f"{name} over ranks {shown}"


_watch: CollectiveWatch | None = None  # one per process, as the wrappers it installs are


def watch_collectives(timeout_s: float) -> CollectiveWatch:
    """Install the wrappers (once per process; later calls only set the timeout) and return the watch."""
    global _watch
    if _watch is not None:
        _watch.timeout_s = timeout_s
        return _watch
    _watch = CollectiveWatch(timeout_s)
    for name in COLLECTIVES + POINT_TO_POINT:
        if hasattr(dist, name):
            setattr(dist, name, _recorded(_watch, name, getattr(dist, name)))
    dist.new_group = _with_timeout(_watch, dist.new_group)
    return _watch


def _recorded(watch: CollectiveWatch, name: str, function):
    @functools.wraps(function)
    def recorded(*args, **kwargs):
        op = (name, function, args, kwargs)
        watch.last = op
        try:
            return function(*args, **kwargs)
        except RuntimeError as failure:  # gloo raises RuntimeError; DistBackendError is one too
            error = watch.error(failure, op)
            if error is None:
                raise
            raise error from failure
    return recorded


def _with_timeout(watch: CollectiveWatch, new_group):
    signature = inspect.signature(new_group)

    @functools.wraps(new_group)
    def new_group_with_timeout(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if bound.arguments.get("timeout") is None:
            bound.arguments["timeout"] = datetime.timedelta(seconds=watch.timeout_s)
        return new_group(*bound.args, **bound.kwargs)
    return new_group_with_timeout


@contextlib.contextmanager
def named_failures(watch: CollectiveWatch):
    """Re-raise a timeout or lost peer that escaped the wrappers (an async op's wait()) as a CollectiveError."""
    try:
        yield
    except RuntimeError as failure:
        error = watch.error(failure)
        if error is None:
            raise
        raise error from failure


def nonfinite_loss_poisons_gradients(loss: torch.Tensor) -> torch.Tensor:
    """The training loss, scaled by NaN when it is NaN or Inf. An infinite loss can have finite gradients
    (cross-entropy of a target whose logit is -inf: the softmax gradient stays finite), which would
    update the model; scaled by NaN every gradient is NaN, so the non-finite-gradient skip (ZeRO 0:
    trainer/engine.py, ZeRO 1-3: DeepSpeed) drops the step on every rank. No host sync."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)
