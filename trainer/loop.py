"""The training loop: recipe -> data -> model -> DeepSpeed engine -> steps, evals, checkpoints, logs.

Every check that can fail on user input runs before the process group, the tokenizer or the model
exist. The loop is resumable at any checkpointed step with results bitwise equal to a run that was
never interrupted (CPU), and SIGTERM / SIGUSR1 checkpoint the current step before exiting.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from longtrain.trainer import checkpoint as ckpt
from longtrain.trainer import init_from
from longtrain.trainer import reshard
from longtrain.trainer import run_dir as run_dirs
from longtrain.trainer.config import Recipe, packing, save_recipe
from longtrain.trainer.data.corpus import resolve_sources
from longtrain.trainer.data.loader import DataLoader, PackedDataset, eval_batches
from longtrain.trainer.data.shards import TOKENIZER_PATH_FIX, prepare
from longtrain.trainer.data.tasks import (TaskDataset, TaskLoader, answer_accuracy, first_question, make_task,
                                        task_eval_batches)
from longtrain.trainer.data.tokenizer import Tokenizer
from longtrain.trainer.engine import build_engine, deepspeed_config, device_for, init_distributed
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.faults import (CollectiveWatch, named_failures, nonfinite_loss_poisons_gradients,
                                     watch_collectives)
from longtrain.trainer.generate import generate
from longtrain.trainer.metrics import (MetricsLog, evaluations, flops_per_token, machine_memory, measured_matmul_flops,
                                       peak_memory_bytes, progress_line)
from longtrain.trainer.model.decoder import lm_loss
from longtrain.trainer.model.init import build_decoder, dense_shapes
from longtrain.trainer.model.ode import ode_stats
from longtrain.trainer.parallel import collectives
from longtrain.trainer.parallel.mesh import build_mesh
from longtrain.trainer.parallel.parallelize import (ParallelRun, ZeroPartition, parallel_engine, parallelize,
                                                   zero_partition)
from longtrain.trainer.parallel.plan import TooLargeToEstimate, build_plan, check_memory, format_bytes
from longtrain.trainer.run_dir import check_writable_dir


class StopSignal:
    """Remembers a SIGTERM / SIGUSR1 (preemption notice) so the loop can checkpoint and exit cleanly."""

    def __init__(self):
        self.received: str | None = None
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; Ray Train runs the loop in a worker thread
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank when any rank received a stop signal."""
        return collectives.agree_any(self.received is not None)


def preflight(recipe: Recipe, resume: str | None, world: int | None = None) -> Path | None:
    """Cheap checks of everything the user handed us; returns the checkpoint to resume from.

    world: the number of processes; default torchrun's WORLD_SIZE (1 without it). Launchers pass it
    to check a layout before any worker exists: their machine may not be the workers', so only a
    training process (world None) also checks that the estimated memory fits its machine."""
    if recipe.data.task == "text":
        resolve_sources(recipe.data.corpus)
        if recipe.data.tokenizer.path:  # a wrong file fails now, not after the corpus is read
            Tokenizer(recipe.data.tokenizer.path, fix=TOKENIZER_PATH_FIX)
    if world is None:
        check_fits_this_machine(recipe, int(os.environ.get("WORLD_SIZE", 1)))
    else:
        build_plan(recipe, world)  # world vs tp*pp*cp*dp, widths vs tp, layers vs pp, seq_len vs cp, batch
    check_writable_dir(recipe.run_dir, f"run.dir={str(recipe.run_dir)!r}")
    resume_from = ckpt.resolve(resume, recipe.run_dir / "checkpoints")
    if resume_from is None:  # a resume continues the run's own checkpoints: model.init_from is not read again
        init_from.check_source(recipe, int(os.environ.get("WORLD_SIZE", 1)) if world is None else world)
    return resume_from


def check_fits_this_machine(recipe: Recipe, world: int) -> None:
    """Check the layout, and refuse a run whose estimated memory per rank (trainer/parallel/plan.py, as
    `longtrain plan` prints it) exceeds this machine's RAM shared by its LOCAL_WORLD_SIZE ranks, or the
    memory of its GPU shared by the ranks placed on it: before anything is allocated."""
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = device_for(local_rank)
    sharing = local_world if device.type == "cpu" else -(-local_world // torch.cuda.device_count())
    capacity, where = machine_memory(device)
    try:
        plan = build_plan(recipe, world)
    except TooLargeToEstimate as e:
        raise LongtrainError(f"{e}; {where} holds {format_bytes(capacity)}") from None
    check_memory(recipe, plan, capacity, where, ranks=sharing)


def evaluate(engine, dataset, train_cfg, device, run=None, dp_rank: int = 0, dp_size: int = 1) -> float:
    """Mean loss over the eval batches (the same at every eval). The data-parallel replicas split them
    (batch i to dp rank i % dp_size), so eval time falls as dp grows; every rank returns the mean."""
    make = task_eval_batches if isinstance(dataset, TaskDataset) else eval_batches
    every = list(make(dataset, train_cfg.micro_batch_size, train_cfg.eval_batches))
    # (inputs, targets, weight, *positions): positions under documents packing
    mine = [(x.to(device), y.to(device), 1.0, *(p.to(device) for p in rest)) for x, y, *rest in every[dp_rank::dp_size]]
    # Every rank runs as many forwards (under ZeRO-3 a forward gathers parameters from every dp rank):
    # a rank with one batch fewer repeats one, counted with weight 0.
    mine += [(every[0][0].to(device), every[0][1].to(device), 0.0, *(p.to(device) for p in every[0][2:]))] * (
        -(-len(every) // dp_size) - len(mine))
    if run is not None:  # tp / pp / cp: every rank of a replica takes its part of the same batches
        return run.evaluate(mine)
    model = engine.module
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (weighted sum of batch losses, batches)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=train_cfg.bf16):
        for inputs, targets, weight, *positions in mine:
            total[0] += weight * lm_loss(model(inputs, positions=positions[0] if positions else None), targets).double()
            total[1] += weight
    model.train()
    if dp_size > 1:
        collectives.all_reduce(total)
    return (total[0] / total[1]).item()


def build_data(recipe: Recipe, rank: int, world: int):
    """(train set, eval set, loader, token shards) for data.task; the shards are None for synthetic tasks."""
    if recipe.data.task != "text":
        task = make_task(recipe.data)
        if task.vocab.size > recipe.model.vocab_size:
            raise LongtrainError(f"model.vocab_size={recipe.model.vocab_size} is smaller than data.task="
                                 f"{recipe.data.task}'s vocabulary of {task.vocab.size} symbols")
        train_set = TaskDataset(task, recipe.data.seq_len, "train", recipe.run.seed, lengths=recipe.data.task_lengths)
        eval_set = TaskDataset(task, recipe.data.seq_len, "eval", recipe.run.seed)
        loader = TaskLoader(train_set, recipe.train.micro_batch_size, recipe.train.grad_accum,
                            dp_rank=rank, dp_size=world, seed=recipe.run.seed)
        return train_set, eval_set, loader, None
    shards = prepare(recipe.data, recipe.run_dir / "data", seed=recipe.run.seed)
    if shards.tokenizer.vocab_size > recipe.model.vocab_size:
        raise LongtrainError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the tokenizer's "
                             f"{shards.tokenizer.vocab_size} pieces")
    documents = packing(recipe) == "documents"  # batches carry in-document positions (trainer/data/loader.py)
    train_set = PackedDataset(shards.splits["train"], recipe.data.seq_len,
                              shards.doc_starts["train"] if documents else None)
    eval_set = PackedDataset(shards.splits["eval"], recipe.data.seq_len, shards.doc_starts["eval"] if documents else None)
    loader = DataLoader(train_set, recipe.train.micro_batch_size, recipe.train.grad_accum,
                        dp_rank=rank, dp_size=world, seed=recipe.run.seed)
    if len(train_set) < loader.global_batch_size:
        raise LongtrainError(f"data.corpus {recipe.data.corpus} is smaller than one batch: {len(train_set)} sequences of "
                             f"data.seq_len={recipe.data.seq_len}, global batch {loader.global_batch_size}")
    return train_set, eval_set, loader, shards


def train_loss(engine, inputs, targets, positions=None):
    """The loss of one training micro-batch: the decoder's lm_loss, computed without the full logits.
    positions: the in-document positions under documents packing."""
    return engine(inputs, targets) if positions is None else engine(inputs, targets, positions)


def train(recipe: Recipe, resume: str | None = None,
          on_step: Callable[[int, dict, Path | None], None] | None = None, overwrite: bool = False) -> dict:
    """Run the recipe to train.steps (or until a stop signal). Returns the final record.

    A run dir that already holds an earlier run's checkpoints or metrics is refused unless resume
    continues it or overwrite (`--overwrite`) clears it first (trainer/run_dir.py); a resume of another
    model or tokenizer is refused.

    on_step(step, metrics, checkpoint), when given, is called on every rank after each step with the
    records logged at that step merged into one dict (empty when nothing was logged) and the
    checkpoint directory written at that step (None when none was); every rank sees the same calls,
    so it may be collective. Launchers use it to forward metrics and checkpoints (Ray Train's report).

    A step whose gradients hold a NaN or Inf on any rank is skipped (trainer/engine.py); after
    train.max_nonfinite_steps in a row the loop checkpoints that step and raises LongtrainError. A
    collective that times out (parallel.collective_timeout_s) or loses its peer raises a one-line
    LongtrainError naming the rank, the op and the loop's phase (trainer/faults.py).

    The stages, in order: claim_run_dir (checks, the run dir, data preparation on rank 0), start_processes
    (process groups, mesh), build_data, build_model (this rank's part only, and its engine), load_init_weights
    (model.init_from), resume,
    run_loop (steps, evals, checkpoints, logs), finish (final eval and sample).
    """
    watch = watch_collectives(recipe.parallel.collective_timeout_s)  # before any group or engine exists
    with named_failures(watch):
        resume_from = claim_run_dir(recipe, resume, overwrite)
        run = start_processes(recipe)
        run.watch = watch
        run.train_set, run.eval_set, run.loader, run.shards = build_data(recipe, run.dp_rank, run.dp_size)
        build_model(run)
        load_init_weights(run, resume_from)
        start_step = resume_checkpoint(run, resume_from)
        announce(run, resume_from, start_step)
        stopped = run_loop(run, start_step, resume_from is not None, on_step)
        return stopped if stopped is not None else finish(run)


@dataclass
class Run:
    """What the stages of one training process share."""
    recipe: Recipe
    rank: int
    world: int
    device: torch.device
    mesh: object | None  # trainer/parallel/mesh.Mesh when tp, pp or cp > 1
    dp_rank: int
    dp_size: int
    watch: CollectiveWatch | None = None
    train_set: object = None
    eval_set: object = None
    loader: object = None
    shards: object = None
    engine: object = None
    optimizer: object = None
    scheduler: object = None
    parallel: ParallelRun | None = None  # the mesh's engine and helpers
    module: torch.nn.Module | None = None  # the trained module (this rank's part)
    shapes: dict = field(default_factory=dict)  # dense parameter name -> shape, from the configuration
    log: MetricsLog | None = None
    resharded: tuple | None = None
    manifest: dict | None = None
    init_source: Path | None = None  # the checkpoint model.init_from gave the weights of
    step: int = 0
    loss: float = float("nan")

    @property
    def tp(self) -> tuple[int, int]:
        return (self.mesh.tp, self.mesh.coordinates["tp"]) if self.mesh else (1, 0)

    @property
    def replica(self) -> tuple[int, int]:
        """(this rank's index among the ranks holding the same slices, their number): dp x cp."""
        if self.mesh is None:
            return self.rank, self.world
        return dist.get_rank(self.mesh.dp_cp_group), self.mesh.dp * self.mesh.cp

    def named_parameters(self):
        """(dense Decoder name, this rank's tensor), for the layout-free checkpoint section."""
        return self.parallel.dense_named_parameters() if self.parallel is not None else self.module.named_parameters()

    def ode_stats(self) -> dict:
        return self.parallel.ode_stats() if self.parallel is not None else ode_stats(self.module)


def claim_run_dir(recipe: Recipe, resume: str | None, overwrite: bool) -> Path | None:
    """Every cheap check, then the run dir: refused or cleared as the user asked, the data prepared and
    the recipe saved by rank 0 (before any process group: a bad corpus fails in seconds). Returns the
    checkpoint to resume from."""
    resume_from = preflight(recipe, resume)
    rank = int(os.environ.get("RANK", 0))
    run_dirs.claim(recipe, resume, resume_from, overwrite, rank=rank)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    if rank == 0:  # other ranks wait at the barrier of start_processes
        run_dir = recipe.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        if recipe.data.task == "text":
            prepared = prepare(recipe.data, run_dir / "data", seed=recipe.run.seed)
            if resume_from is not None:  # its token ids mean this tokenizer's pieces, and no other's
                ckpt.check_tokenizer(ckpt.read_manifest(resume_from), prepared.tokenizer.path, resume_from,
                                     fix="resume with the data/ and data.* settings it was trained on")
            elif recipe.model.init_from is not None:  # the source's token ids: the same tokenizer file
                init_from.check_tokenizer(recipe, init_from.source_checkpoint(recipe), prepared.tokenizer.path)
        save_recipe(recipe, run_dir / "recipe.yaml")  # after the checks: a refused run leaves the run dir as it was
    return resume_from


def start_processes(recipe: Recipe) -> Run:
    """The process groups (and the mesh when tp, pp or cp > 1) of this training process."""
    rank, world, local_rank = init_distributed(timeout_s=recipe.parallel.collective_timeout_s)
    device = device_for(local_rank)
    if world > 1:
        collectives.barrier()
    p = recipe.parallel
    mesh = build_mesh(p.tp, p.pp, p.cp, p.collective_timeout_s) if p.tp * p.pp * p.cp > 1 else None
    dp_rank, dp_size = (mesh.coordinates["dp"], mesh.dp) if mesh else (rank, world)
    return Run(recipe, rank, world, device, mesh, dp_rank, dp_size)


def build_model(run: Run) -> None:
    """This rank's part of the model, declared on the meta device and materialised part by part (tp
    shards, pipeline stage, ZeRO-3 partition; trainer/model/init.py), then the optimizer and the engine.
    No rank ever holds the whole model, and every part equals its slice of the one-process model."""
    recipe, mesh = run.recipe, run.mesh
    torch.manual_seed(recipe.run.seed)
    run.shapes = dense_shapes(recipe.model)
    kernels = dict(attention_backend=recipe.kernels.attention, scan_backend=recipe.kernels.scan,
                   activation_checkpointing=recipe.train.activation_checkpointing)
    if mesh is None:
        zero3 = recipe.parallel.zero_stage == 3 and run.world > 1
        partition = ZeroPartition(None, deepspeed_config(recipe.train, recipe.parallel, run.world)) if zero3 else None
        run.module = build_decoder(recipe.model, run.device, recipe.run.seed, partition=partition, **kernels)
        run.engine, run.optimizer, run.scheduler = build_engine(run.module, recipe.train, recipe.parallel, dp_size=run.world)
        return
    module = parallelize(recipe.model, mesh, recipe.data.seq_len, recipe.run.seed, run.device,
                         partition=zero_partition(recipe.train, recipe.parallel, mesh),
                         compute_dtype=torch.bfloat16 if recipe.train.bf16 else None, **kernels)
    run.parallel = parallel_engine(module, recipe.train, recipe.parallel, mesh)
    run.engine, run.optimizer, run.scheduler = run.parallel.engine, run.parallel.optimizer, run.parallel.scheduler
    run.module = run.parallel.module


def load_init_weights(run: Run, resume_from: Path | None) -> None:
    """model.init_from: this rank's slices of the source run's weights (trainer/init_from.py), into the model
    and optimizer build_model made (fresh: no Adam state, step 0). A resume reads its own checkpoint instead."""
    if resume_from is not None or run.recipe.model.init_from is None:
        return
    source = init_from.source_checkpoint(run.recipe)
    if run.world > 1:
        init_from.same_source_on_every_rank(source)
    init_from.load_weights(run, source)
    run.init_source = source


def resume_checkpoint(run: Run, resume_from: Path | None) -> int:
    """Restore the checkpoint (this rank's own engine state when the layout is the same, else its slices of
    the layout-free section, trainer/reshard.py). Returns the step to start from (0 without one)."""
    if resume_from is None:
        return 0
    recipe, world, rank = run.recipe, run.world, run.rank
    manifest = run.manifest = ckpt.read_manifest(resume_from)
    ckpt.verify_file(resume_from, "recipe.yaml", manifest)  # each rank checks what it reads, and only that
    saved_layout = reshard.layout_key(manifest["layout"], manifest["world_size"])
    layout = reshard.layout_key(recipe.parallel.model_dump(), world)
    state = ckpt.load_rank_state(resume_from, rank) if saved_layout == layout else None
    # the same layout can still cut pipeline stages elsewhere (stage costs depend on data.seq_len)
    same = state is not None and set(state["model"]) == set(run.module.state_dict())
    if saved_layout == layout:
        same = collectives.agree_all(same)  # every rank takes the same path
    if same:  # the rank's own engine state: a bitwise-exact resume
        if recipe.parallel.zero_stage < 3:  # ZeRO-3's optimizer restores the model's partitions from fp32
            run.module.load_state_dict(state["model"])
        ckpt.load_optimizer_state(run.optimizer, state["optimizer"])
    else:  # another layout: every rank reads only its slices of the dense tensors (trainer/reshard.py)
        state = ckpt.load_common(resume_from)  # rank 0's scheduler, loader, counters and RNG, no weights
        tp, tp_rank = run.tp
        reshard.load_universal(resume_from, manifest, run.named_parameters(), run.optimizer,
                               recipe.parallel.zero_stage, tp, tp_rank)
        run.resharded = saved_layout
    run.scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(run.optimizer.param_groups, run.scheduler.get_last_lr()):
        group["lr"] = lr  # a resharded optimizer kept its initial param groups; the schedule's lr is the truth
    engine = run.engine
    engine.global_steps, engine.global_samples = state["engine"]["global_steps"], state["engine"]["global_samples"]
    engine.micro_steps = (state["engine"]["micro_steps"] if run.resharded is None
                          else engine.global_steps * engine.gradient_accumulation_steps())
    run.loader.load_state_dict(state["loader"])
    ckpt.set_rng_state(state["rng"])  # another layout: rank 0's (the model draws no random numbers in training)
    # Torch's RNG after resume must equal the uninterrupted run's, so nothing after this draws from it.
    return state["step"]


def announce(run: Run, resume_from: Path | None, start_step: int) -> None:
    """Open the run's log and say what runs where (and, after a layout change, what changed)."""
    recipe = run.recipe
    run.log = MetricsLog(recipe.run_dir, enabled=run.rank == 0, resume_step=start_step if resume_from else None)
    parameters = sum(math.prod(shape) for shape in run.shapes.values())
    run.log.print(f"longtrain: {recipe.name} | pattern {recipe.model.pattern} | {parameters:,} parameters | "
                  f"world {run.world} | device {run.device.type} | run dir {recipe.run_dir}"
                  + (f" | resumed from {resume_from} (step {start_step})" if resume_from else "")
                  + (f" | weights from {run.init_source} (model.init_from)" if run.init_source else ""))
    if run.resharded is None:
        return
    names = ("tp", "pp", "cp", "dp", "zero_stage")
    layout = reshard.layout_key(recipe.parallel.model_dump(), run.world)
    run.log.print("resharded: checkpoint layout " + " ".join(f"{k}={v}" for k, v in zip(names, run.resharded)) +
                  " -> " + " ".join(f"{k}={v}" for k, v in zip(names, layout)) +
                  f" | next global sample {run.loader.consumed_samples}")
    saved_batch = run.manifest.get("global_batch_size")
    if saved_batch is not None and saved_batch != run.loader.global_batch_size:
        run.log.print(f"note: global batch {saved_batch} -> {run.loader.global_batch_size} sequences per step "
                      "(micro_batch_size * grad_accum * dp); the loss curve will not continue the old run's exactly")


def peak_matmul_flops(run: Run) -> float:
    """MFU is against the matmul rate of the run's precision (bfloat16 under train.bf16), as on GPUs."""
    bf16 = run.recipe.train.bf16
    peak = measured_matmul_flops(run.device, torch.bfloat16 if bf16 else torch.float32)
    if bf16 and run.device.type == "cpu":
        fp32 = measured_matmul_flops(run.device)
        if peak < fp32:
            run.log.print(f"note: train.bf16 on this CPU: bfloat16 matmuls run at {peak / 1e9:.1f} GFLOP/s, float32 at "
                          f"{fp32 / 1e9:.1f} (no AVX512-BF16 or AMX, so torch emulates them); train.bf16=false is faster here")
    return peak


def save_checkpoint(run: Run, step: int) -> Path:
    """Every rank's engine state, the layout-free section and the manifest, written atomically (collective)."""
    recipe, optimizer = run.recipe, run.optimizer
    tp, tp_rank = run.tp
    recipe_text = (recipe.run_dir / "recipe.yaml").read_text() if run.rank == 0 else ""
    # collective under ZeRO (gathers each slice from its partitions): every rank computes it
    replica, replicas = run.replica
    universal = reshard.universal_state(run.named_parameters(), run.shapes, optimizer, recipe.parallel.zero_stage,
                                        tp, tp_rank, replica, replicas) if recipe.checkpoint.reshardable else None
    engine, loader = run.engine, run.loader
    state = {"step": step, "model": run.module.state_dict(), "optimizer": ckpt.plain_optimizer_state(optimizer.state_dict()),
             "scheduler": run.scheduler.state_dict(), "loader": loader.state_dict(), "rng": ckpt.rng_state(),
             "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                        "micro_steps": engine.micro_steps}}
    if universal is not None:
        state["universal"] = universal
    manifest = {"consumed_samples": loader.consumed_samples, "global_batch_size": loader.global_batch_size,
                "world_size": run.world, "layout": recipe.parallel.model_dump(),
                "recipe_sha256": ckpt.hashlib.sha256(recipe_text.encode()).hexdigest(),
                "tokenizer_sha256": ckpt.sha256(run.shards.tokenizer.path) if run.shards else None}
    path = ckpt.save(recipe.run_dir / "checkpoints", step, state, manifest, recipe_text, rank=run.rank,
                     barrier=collectives.barrier if run.world > 1 else (lambda: None), keep_last=recipe.checkpoint.keep_last)
    run.log.print(f"checkpoint: {path}")
    return path


def train_step(run: Run) -> float:
    """One optimizer step over this rank's micro-batches; the mean loss over every rank's tokens."""
    recipe, device, engine = run.recipe, run.device, run.engine
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.train.bf16)
    if run.parallel is not None:  # already the mean over every rank's tokens
        # (inputs, targets), or (inputs, targets, positions) under documents packing
        micro_batches = [tuple(t.to(device) for t in batch) for batch in run.loader.next_step()]
        with autocast:
            return run.parallel.train_step(run.parallel.prepare(micro_batches))
    losses = []
    for inputs, targets, *positions in run.loader.next_step():
        with autocast:
            loss = train_loss(engine, inputs.to(device), targets.to(device), *(p.to(device) for p in positions))
        engine.backward(nonfinite_loss_poisons_gradients(loss))
        engine.step()
        losses.append(loss.detach())
    loss = torch.stack(losses).mean()
    if run.world > 1:
        collectives.all_reduce(loss, op=dist.ReduceOp.AVG)
    return float(loss)


def step_record(run: Run, step: int, loss: float, skipped: bool, skipped_steps: int, window: tuple[float, int],
                peak_flops: float) -> dict:
    """The logged record of a step: loss, lr, tokens/s, MFU, each rank's peak memory, O-block counts (collective)."""
    elapsed, tokens = time.perf_counter() - window[0], window[1]
    tokens_per_s = tokens / elapsed
    stats = run.ode_stats()
    if run.mesh is not None and run.mesh.pp > 1:  # rank 0 also counts the O blocks of the other stages
        for part in collectives.gather_object(stats) or []:
            stats = {**part, **stats}
    mfu = flops_per_token(run.recipe.model, run.recipe.data.seq_len, evaluations(stats)) * tokens_per_s / (peak_flops * run.world)
    every_rank = [int(m) for m in collectives.gather_values(peak_memory_bytes(run.device))]  # the worst one runs out
    return {"step": step, "loss": loss, "lr": run.scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s,
            "mfu": mfu, "peak_memory_bytes": max(every_rank), "peak_memory_bytes_per_rank": every_rank,
            "consumed_samples": run.loader.consumed_samples, "skipped": skipped, "skipped_steps": skipped_steps,
            **stats}


def run_eval(run: Run, step: int) -> dict:
    """Eval loss (and, for synthetic tasks in one piece, the answer accuracy), logged; returns the records."""
    recipe = run.recipe
    eval_loss = evaluate(run.engine, run.eval_set, recipe.train, run.device, run.parallel, run.dp_rank, run.dp_size)
    run.log.write({"step": step, "eval_loss": eval_loss})
    run.log.print(f"step {step:>6}/{recipe.train.steps} | eval loss {eval_loss:.4f}")
    reported = {"eval_loss": eval_loss}
    if run.shards is None and run.parallel is None and step > 0:  # the answer check decodes with the whole model
        with torch.no_grad():
            accuracy = answer_accuracy(run.module, task_eval_batches(run.eval_set, recipe.train.micro_batch_size,
                                                                     recipe.train.eval_batches, answer_only=True))
        # The task's usual measure: whole passkeys; for MQAR, recalled values (Arora et al. 2023).
        headline = accuracy["sample_accuracy" if recipe.data.task == "passkey" else "token_accuracy"]
        run.log.write({"step": step, "eval_accuracy": headline, "eval_token_accuracy": accuracy["token_accuracy"],
                       "eval_sample_accuracy": accuracy["sample_accuracy"]})
        reported["eval_accuracy"] = headline
        run.log.print(f"step {step:>6}/{recipe.train.steps} | eval {recipe.data.task} accuracy {headline:.3f}")
    return reported


def run_loop(run: Run, start_step: int, resumed: bool, on_step) -> dict | None:
    """Steps from start_step to train.steps with logs, evals and checkpoints. Returns the stop record when a
    stop signal ended it early, else None."""
    recipe, log, watch = run.recipe, run.log, run.watch
    train = recipe.train
    peak_flops = peak_matmul_flops(run)
    tokens_per_step = run.loader.global_batch_size * recipe.data.seq_len
    stop = StopSignal()
    watch.phase = f"eval at step {start_step}"
    if start_step == 0:
        run_eval(run, 0)
    window, run_start = [time.perf_counter(), 0], time.perf_counter()
    step, last_saved, nonfinite_in_a_row = start_step, start_step if resumed else None, 0
    run.step = step
    while step < train.steps:
        watch.phase = f"train step {step + 1}"
        run.loss = train_step(run)
        step += 1
        window[1] += tokens_per_step
        # The same on every rank: ZeRO 0 reduces the finite flag over all ranks, ZeRO 1-3 the gradient norm.
        skipped = not run.engine.was_step_applied()
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
        skipped_steps = step - run.scheduler.last_epoch  # the schedule advances on applied steps only
        if skipped:
            log.print(f"step {step:>6}/{train.steps} | NaN or Inf gradients (loss {run.loss:.4g}): update skipped, "
                      f"{nonfinite_in_a_row} in a row (the run stops at train.max_nonfinite_steps="
                      f"{train.max_nonfinite_steps}), {skipped_steps} in all")
        reported, saved = {}, None
        if step % train.log_interval == 0 or step == train.steps or skipped:
            reported = step_record(run, step, run.loss, skipped, skipped_steps, window, peak_flops)
            log.write(reported)
            eta = (time.perf_counter() - run_start) / (step - start_step) * (train.steps - step)
            log.print(progress_line(step, train.steps, run.loss, reported["lr"], reported["tokens_per_s"], reported["mfu"],
                                    reported["peak_memory_bytes"], eta))
            window = [time.perf_counter(), 0]
        if nonfinite_in_a_row == train.max_nonfinite_steps:
            watch.phase = f"checkpoint at step {step}"
            path = save_checkpoint(run, step)  # its loader position is past the bad batches
            log.close()
            raise LongtrainError(f"step {step}: {nonfinite_in_a_row} steps in a row had NaN or Inf gradients "
                                 f"(train.max_nonfinite_steps={train.max_nonfinite_steps}); checkpointed "
                                 f"{path}; --resume auto continues after these batches, or lower train.lr")
        pause = time.perf_counter()  # eval and checkpoint time is left out of the next tokens/s window
        watch.phase = f"eval at step {step}"
        if step % train.eval_interval == 0 or step == train.steps:
            reported.update(run_eval(run, step))
        watch.phase = f"checkpoint at step {step}"
        if step % recipe.checkpoint.interval == 0 or step == train.steps:
            saved, last_saved = save_checkpoint(run, step), step
        window[0] += time.perf_counter() - pause
        watch.phase = f"the end of train step {step}"
        if on_step is not None:
            on_step(step, reported, saved)
        if stop.agreed():
            if last_saved != step:
                save_checkpoint(run, step)
            log.print(f"received {stop.received or 'stop from another rank'}: checkpointed step {step}, exiting")
            log.close()
            return {"step": step, "stopped": True}
        run.step = step
    return None


def dense_model(run: Run) -> torch.nn.Module | None:
    """The whole trained model on rank 0 (None elsewhere), for sampling (collective). Built only here, at
    the end and only when a sample is asked for: the one moment a rank holds every weight."""
    recipe = run.recipe
    if run.parallel is None and not (recipe.parallel.zero_stage == 3 and run.world > 1):
        return run.module
    dense = build_decoder(recipe.model, run.device, recipe.run.seed) if run.rank == 0 else None
    if run.parallel is not None:
        run.parallel.load_into_dense(dense, run.shapes)
        return dense
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(run.module.parameters())):
        if dense is not None:
            dense.load_state_dict(run.module.state_dict())
    return dense


def finish(run: Run) -> dict:
    """Final eval, a sample on rank 0 (train.sample_tokens), the final record."""
    recipe, log, rank = run.recipe, run.log, run.rank
    run.watch.phase = "final eval"
    model = dense_model(run) if recipe.train.sample_tokens else None
    step, loss = run.step, run.loss
    final = {"step": step, "final_loss": loss, "final_eval_loss": evaluate(
        run.engine, run.eval_set, recipe.train, run.device, run.parallel, run.dp_rank, run.dp_size)}
    if rank == 0 and model is not None and run.shards is None:
        prompt, answer = first_question(run.eval_set, 0)
        new = generate(model, prompt, len(answer))
        vocab = run.eval_set.task.vocab
        text = f"... {vocab.decode(prompt[-12:])} -> {vocab.decode(new)} (answer {vocab.decode(answer)})"
        (recipe.run_dir / "sample.txt").write_text(text + "\n")
        log.print("sample (greedy): " + text)
    elif rank == 0 and model is not None:
        # Prompt: the start of a held-out sequence; nucleus sampling with its own seeded generator, so the
        # sample is reproducible and the global RNG (part of the checkpointed state) is untouched.
        prompt = [int(t) for t in run.eval_set.get(0)[: min(32, recipe.data.seq_len // 2)]]
        new = generate(model, prompt, recipe.train.sample_tokens, temperature=0.8, top_p=0.9,
                       generator=torch.Generator().manual_seed(recipe.run.seed), max_context=recipe.data.seq_len)
        prompt_text, text = run.shards.tokenizer.decode(prompt), run.shards.tokenizer.decode(new)
        (recipe.run_dir / "sample.txt").write_text(prompt_text + text)
        log.print(f"sample (top-p 0.9, prompt from the held-out split):\n{prompt_text}[...]{text}")
    log.write(final)
    log.print(f"done: final loss {loss:.4f}, eval loss {final['final_eval_loss']:.4f} -> {recipe.run_dir}")
    log.close()
    return final
