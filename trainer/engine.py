"""The DeepSpeed engine for every run, world size 1 included, configured from the typed recipe.

Users never write DeepSpeed keys: `deepspeed_config` generates them (DeepSpeed ignores misspelled
keys silently). The optimizer is torch's AdamW and the schedule linear warmup + cosine decay,
both handed to the engine, which owns gradient accumulation, clipping and ZeRO partitioning.
A step whose gradients hold a NaN or Inf on any rank is skipped: parameters, moments and the
schedule stay where they were, and `engine.was_step_applied()` is False on every rank.
"""
from __future__ import annotations

import ipaddress
import math
import os
import socket

import torch
import torch.distributed as dist

from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.memory import return_freed_memory
from longtrain.trainer.parallel import collectives


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_interface() -> str | None:
    """The loopback network interface's name ('lo' on Linux, 'lo0' on macOS), or None when neither exists."""
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def loopback_socket_env() -> dict[str, str]:
    """GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME naming the loopback interface, for a group whose ranks all
    run on this machine; a value the user set is kept. Without them gloo listens for its peers on the
    address the host name resolves to, often the external one, and NCCL's bootstrap on the first
    interface that is not loopback."""
    interface = loopback_interface()
    if interface is None:
        return {}
    return {name: os.environ.get(name, interface) for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}


def _is_loopback(host: str) -> bool:
    try:
        addresses = {info[4][0].split("%")[0] for info in socket.getaddrinfo(host, None)}
        return all(ipaddress.ip_address(address).is_loopback for address in addresses)
    except (OSError, ValueError):
        return False


def _on_loopback(world: int) -> bool:
    """Whether every rank is on this machine and meets at a loopback MASTER_ADDR. Both are asked: on the
    master node of a multi-node run MASTER_ADDR (its host name) can resolve to 127.0.1.1 (/etc/hosts on
    Debian), and binding there would shut the other nodes out."""
    return world == int(os.environ.get("LOCAL_WORLD_SIZE", "0")) and _is_loopback(os.environ["MASTER_ADDR"])


def _local_store(rank: int, world: int, timeout) -> dist.Store | None:
    """The rendezvous store of a group made here, listening on loopback only, or None to let torch's env://
    make it (under torchrun, whose agent hosts it, or when some rank is on another machine).

    torch's TCPStore server listens on every interface whatever host it is given (`*:MASTER_PORT`,
    torch 2.13), so for a loopback MASTER_ADDR rank 0 binds the socket itself and hands it over
    (master_listen_fd). One process needs no rendezvous at all: an in-memory store, no socket."""
    if world == 1:
        return dist.HashStore()
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or not _on_loopback(world):
        return None
    if rank != 0:
        return dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    try:
        listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise LongtrainError(f"MASTER_ADDR={host} MASTER_PORT={port}: cannot listen there ({e.strerror or e}): "
                             "choose a free MASTER_PORT") from None
    return dist.TCPStore(host, port, world, is_master=True, timeout=timeout, master_listen_fd=listener.detach())


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Join (or create, for a single process) the default process group. Returns rank, world, local rank.

    A group that already exists (Ray Train makes one before our code runs) is used as it is. Otherwise
    reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them a
    one-process group is made. gloo on CPU, nccl on GPU. A group whose ranks are all on this machine
    (one process, or WORLD_SIZE = LOCAL_WORLD_SIZE with a loopback MASTER_ADDR) listens on loopback only:
    its store (`_local_store`) and gloo's / NCCL's sockets (`loopback_socket_env`). DeepSpeed's comm
    backend starts on it.
    """
    return_freed_memory()  # before the model exists (trainer/memory.py)
    if dist.is_initialized():
        # The launcher's group is the truth for rank and world, whatever the environment says.
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed's engine asserts it is set
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        else:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        collectives.init_control_group()
        return dist.get_rank(), dist.get_world_size(), local_rank
    if "RANK" not in os.environ:
        # No port is listened on; DeepSpeed's CPU shared-memory op names its segment after MASTER_ADDR:PORT.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        # DeepSpeed picks its accelerator when first imported and warns when it falls back to the CPU;
        # DS_ACCELERATOR is its documented way to name the CPU one outright.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import datetime

    import deepspeed

    backend, timeout = "nccl" if use_cuda else "gloo", datetime.timedelta(seconds=timeout_s)
    if world == 1 or _on_loopback(world):
        os.environ.update(loopback_socket_env())  # read by gloo / NCCL when each group is made
    store = _local_store(rank, world, timeout)
    if store is not None:
        # As DeepSpeed's own init (comm/torch.py) does: a bound device lets new_group split the NCCL
        # communicator; it skips one process, which has no peer.
        bound = {"device_id": torch.device("cuda", torch.cuda.current_device())} if use_cuda and world > 1 else {}
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **bound)
    # On a group that exists DeepSpeed only starts its comm backend (TorchBackend), as after its own init.
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    collectives.init_control_group()
    return rank, world, local_rank


def device_for(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")


# Bounds on what DeepSpeed gathers or flattens at once, in elements (its defaults, 5e8 and 1e9, are 2-4 GB of
# float32 per rank whatever the model: one flat copy of every gradient of a 0.4B model, or all of ZeRO-3's
# parameters gathered and kept). 1e7 elements (40 MB in float32) per bucket; ZeRO-3 keeps at most 1e7
# gathered parameters beyond the layer it runs and releases a parameter not used again within 1e7 (a
# 0.4B model at dp=2: 0.56 GiB less per rank than with 5e7).
BUCKET_ELEMENTS = 10_000_000
ZERO_BUCKETS = {"reduce_bucket_size": BUCKET_ELEMENTS, "allgather_bucket_size": BUCKET_ELEMENTS,
                "stage3_prefetch_bucket_size": BUCKET_ELEMENTS, "stage3_max_live_parameters": BUCKET_ELEMENTS,
                "stage3_max_reuse_distance": BUCKET_ELEMENTS}


def limit_engine_memory(engine, data_parallel_size: int) -> None:
    """What DeepSpeed's engine holds beyond the model state: bounded gradient reduction, and under ZeRO-3 no
    second float32 copy of a partition that is float32 already."""
    bound_gradient_reduction(engine, data_parallel_size)
    share_float32_master(engine.optimizer)


def share_float32_master(optimizer) -> None:
    """ZeRO-3 keeps each float32 partition once, as the optimizer's master weights too.

    DeepSpeed 0.19.8's stage 3 means to skip the master copy when the partition is float32 on the optimizer's
    device already (runtime/zero/stage3.py, `_create_fp32_partitions`), but compares `tensor.device` with
    the accelerator's device *name*, a string, which never equals a torch.device: every rank then holds a
    clone, 4 more bytes per parameter of its partition. The master becomes the partition itself, as that
    branch intends: the optimizer updates the partition in place and the copy back is a copy onto itself."""
    low = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    master = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if not low or not master or getattr(optimizer, "offload_optimizer", False):
        return
    for partition, copy in zip(low, master):
        if (partition is not None and copy is not partition and copy.dtype == partition.dtype
                and copy.device == partition.device and copy.shape == partition.shape):
            copy.data = partition.data  # same tensor object: the optimizer's param groups and state keys hold


def bound_gradient_reduction(engine, data_parallel_size: int) -> None:
    """The ZeRO-0 gradient all-reduce: none with one data-parallel rank (DeepSpeed still flattens every
    gradient into one buffer and all-reduces it over a group of one), buckets of BUCKET_ELEMENTS otherwise
    (DeepSpeed fixes them at 5e8 elements, MEMORY_OPT_ALLREDUCE_SIZE, with no setting). ZeRO 1-3 reduce
    through their own optimizer, bucketed by ZERO_BUCKETS: left alone."""
    if engine.zero_optimization_stage() > 0:
        return
    if data_parallel_size == 1:
        engine.enable_backward_allreduce = False
        engine.pipeline_enable_backward_allreduce = False  # the pipeline engine's own switch
        return
    fallback = engine.buffered_allreduce_fallback

    def bounded(grads=None, elements_per_buffer=BUCKET_ELEMENTS):
        return fallback(grads=grads, elements_per_buffer=min(elements_per_buffer, BUCKET_ELEMENTS))
    engine.buffered_allreduce_fallback = bounded


def deepspeed_config(train, parallel, dp_size: int) -> dict:
    """DeepSpeed JSON from the recipe's train and parallel sections."""
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * dp_size,
        "gradient_clipping": train.grad_clip,  # DeepSpeed's own default is 1.0: always set it
        "zero_optimization": {"stage": parallel.zero_stage, **ZERO_BUCKETS},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def lr_lambda(train):
    """Linear warmup to train.lr, then cosine decay to train.lr * train.min_lr_ratio at train.steps."""
    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = min(1.0, (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that leaves parameters and moments untouched (no update, no step count) when the
    gradients of any rank hold a NaN or Inf. For ZeRO stage 0, where DeepSpeed steps this optimizer itself.

    It sets `overflow`, which DeepSpeed's engine reads after each optimizer step (runtime/engine.py,
    `_take_model_step`): True skips the LR scheduler step and makes `engine.was_step_applied()` False.
    The flag is the minimum over every rank, so pipeline stages and tp shards whose own gradients were
    finite skip with the rank whose were not; the engine calls step() once per optimizer step on every
    rank, so the all-reduce is matched.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        finite = (torch.stack([g.isfinite().all() for g in grads]).all().float() if grads
                  else torch.ones((), device=params[0].device))
        if dist.is_initialized() and dist.get_world_size() > 1:
            collectives.all_reduce(finite, op=dist.ReduceOp.MIN)
        self.overflow = not bool(finite)
        return None if self.overflow else super().step(closure)


def build_optimizer(module: torch.nn.Module, train, zero_stage: int):
    """(optimizer, scheduler) for DeepSpeed: AdamW with weight decay on matrices other than the
    embedding, and the warmup + cosine schedule of `lr_lambda`.

    ZeRO 0 gets SkippingAdamW. ZeRO 1-3 get torch's AdamW: DeepSpeed's ZeRO optimizers already skip a
    step whose global gradient norm is NaN or Inf, without calling this optimizer (fp32 included:
    zero/stage_1_and_2.py and zero/stage3.py, `is_invalid_grad_norm`), and set the same `overflow`
    flag; they also refuse an optimizer class outside their list of tested ones."""
    def decays(name, p):  # a partitioned ZeRO-3 parameter keeps its shape in ds_shape
        return len(getattr(p, "ds_shape", p.shape)) >= 2 and "embed" not in name
    decay = [p for n, p in module.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in module.named_parameters() if not decays(n, p)]
    adamw = SkippingAdamW if zero_stage == 0 else torch.optim.AdamW
    # torch's fused AdamW: one kernel over all tensors, the same update (about 4x faster than the
    # per-op loop on CPU for our small models); its devices are CPU, CUDA and a few others.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in module.parameters()) or None
    optimizer = adamw([{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                      lr=train.lr, betas=(train.beta1, train.beta2), eps=1e-8, fused=fused)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))


def build_engine(model: torch.nn.Module, train, parallel, dp_size: int):
    """Wrap the model in a DeepSpeed engine with AdamW and the warmup + cosine schedule."""
    import deepspeed

    optimizer, scheduler = build_optimizer(model, train, parallel.zero_stage)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(train, parallel, dp_size))
    limit_engine_memory(engine, dp_size)
    return engine, optimizer, scheduler
