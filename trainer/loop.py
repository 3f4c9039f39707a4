"""The training loop: recipe -> data -> model -> DeepSpeed engine -> steps, evals, checkpoints, logs.

Every check that can fail on user input runs before the process group, the tokenizer or the model
exist. The loop is resumable at any checkpointed step with results bitwise equal to a run that was
never interrupted (CPU), and SIGTERM / SIGUSR1 checkpoint the current step before exiting.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from longtrain.trainer import checkpoint as ckpt
from longtrain.trainer import reshard
from longtrain.trainer import run_dir as run_dirs
from longtrain.trainer.config import Recipe, save_recipe
from longtrain.trainer.data.corpus import resolve_sources
from longtrain.trainer.data.loader import DataLoader, PackedDataset, eval_batches
from longtrain.trainer.data.shards import TOKENIZER_PATH_FIX, prepare
from longtrain.trainer.data.tasks import (TaskDataset, TaskLoader, answer_accuracy, first_question, make_task,
                                        task_eval_batches)
from longtrain.trainer.data.tokenizer import Tokenizer
from longtrain.trainer.engine import build_engine, device_for, init_distributed
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.faults import (CollectiveWatch, named_failures, nonfinite_loss_poisons_gradients,
                                     watch_collectives)
from longtrain.trainer.generate import generate
from longtrain.trainer.metrics import (MetricsLog, flops_per_token, machine_memory, measured_matmul_flops,
                                       peak_memory_bytes, progress_line)
from longtrain.trainer.model.decoder import Decoder, count_parameters, lm_loss
from longtrain.trainer.model.ode import ode_stats
from longtrain.trainer.parallel import collectives
from longtrain.trainer.parallel.mesh import build_mesh
from longtrain.trainer.parallel.parallelize import parallelize
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
    return ckpt.resolve(resume, recipe.run_dir / "checkpoints")


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
    mine = [(x.to(device), y.to(device), 1.0) for x, y in every[dp_rank::dp_size]]
    # Every rank runs as many forwards (under ZeRO-3 a forward gathers parameters from every dp rank):
    # a rank with one batch fewer repeats one, counted with weight 0.
    mine += [(every[0][0].to(device), every[0][1].to(device), 0.0)] * (-(-len(every) // dp_size) - len(mine))
    if run is not None:  # tp / pp / cp: every rank of a replica takes its part of the same batches
        return run.evaluate(mine)
    model = engine.module
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (weighted sum of batch losses, batches)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=train_cfg.bf16):
        for inputs, targets, weight in mine:
            total[0] += weight * lm_loss(model(inputs), targets).double()
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
        train_set = TaskDataset(task, recipe.data.seq_len, "train", recipe.run.seed)
        eval_set = TaskDataset(task, recipe.data.seq_len, "eval", recipe.run.seed)
        loader = TaskLoader(train_set, recipe.train.micro_batch_size, recipe.train.grad_accum,
                            dp_rank=rank, dp_size=world, seed=recipe.run.seed)
        return train_set, eval_set, loader, None
    shards = prepare(recipe.data, recipe.run_dir / "data", seed=recipe.run.seed)
    if shards.tokenizer.vocab_size > recipe.model.vocab_size:
        raise LongtrainError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the tokenizer's "
                             f"{shards.tokenizer.vocab_size} pieces")
    train_set = PackedDataset(shards.splits["train"], recipe.data.seq_len)
    eval_set = PackedDataset(shards.splits["eval"], recipe.data.seq_len)
    loader = DataLoader(train_set, recipe.train.micro_batch_size, recipe.train.grad_accum,
                        dp_rank=rank, dp_size=world, seed=recipe.run.seed)
    if len(train_set) < loader.global_batch_size:
        raise LongtrainError(f"data.corpus {recipe.data.corpus} is smaller than one batch: {len(train_set)} sequences of "
                             f"data.seq_len={recipe.data.seq_len}, global batch {loader.global_batch_size}")
    return train_set, eval_set, loader, shards


def train_loss(engine, inputs, targets):
    """The loss of one training micro-batch: the decoder's lm_loss, computed without the full logits."""
    return engine(inputs, targets)


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
    """
    watch = watch_collectives(recipe.parallel.collective_timeout_s)  # before any group or engine exists
    with named_failures(watch):
        return _train(recipe, resume, on_step, watch, overwrite)


def _train(recipe: Recipe, resume: str | None, on_step, watch: CollectiveWatch, overwrite: bool = False) -> dict:
    resume_from = preflight(recipe, resume)
    run_dirs.claim(recipe, resume, resume_from, overwrite, rank=int(os.environ.get("RANK", 0)))
    run_dir = recipe.run_dir
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    if int(os.environ.get("RANK", 0)) == 0:
        # Before the process group: a bad corpus fails here in seconds; other ranks wait at the barrier.
        run_dir.mkdir(parents=True, exist_ok=True)
        if recipe.data.task == "text":
            prepared = prepare(recipe.data, run_dir / "data", seed=recipe.run.seed)
            if resume_from is not None:  # its token ids mean this tokenizer's pieces, and no other's
                ckpt.check_tokenizer(ckpt.read_manifest(resume_from), prepared.tokenizer.path, resume_from,
                                     fix="resume with the data/ and data.* settings it was trained on")
        save_recipe(recipe, run_dir / "recipe.yaml")  # after the checks: a refused run leaves the run dir as it was
    rank, world, local_rank = init_distributed(timeout_s=recipe.parallel.collective_timeout_s)
    device = device_for(local_rank)
    if world > 1:
        collectives.barrier()
    p = recipe.parallel
    mesh = build_mesh(p.tp, p.pp, p.cp, p.collective_timeout_s) if p.tp * p.pp * p.cp > 1 else None
    dp_rank, dp_size = (mesh.coordinates["dp"], mesh.dp) if mesh else (rank, world)
    train_set, eval_set, loader, shards = build_data(recipe, dp_rank, dp_size)

    torch.manual_seed(recipe.run.seed)
    model = Decoder(recipe.model, attention_backend=recipe.kernels.attention, scan_backend=recipe.kernels.scan,
                    activation_checkpointing=recipe.train.activation_checkpointing).to(device)
    run = None
    if mesh is None:
        engine, optimizer, scheduler = build_engine(model, recipe.train, recipe.parallel, dp_size=world)
    else:  # every rank starts from the same dense weights and keeps its shard (trainer/parallel/parallelize.py)
        run = parallelize(recipe.model, recipe.train, recipe.parallel, mesh, model.state_dict(), recipe.data.seq_len,
                          recipe.kernels.attention, recipe.kernels.scan)
        engine, optimizer, scheduler = run.engine, run.optimizer, run.scheduler
    trained = model if run is None else run.module
    tp, tp_rank = (mesh.tp, mesh.coordinates["tp"]) if mesh else (1, 0)
    dense_shapes = {n: getattr(p, "ds_shape", p.shape) for n, p in model.named_parameters()}  # ZeRO-3: real shape

    def named_parameters():  # (dense Decoder name, this rank's tensor), for the layout-free checkpoint section
        return run.dense_named_parameters() if run is not None else model.named_parameters()

    start_step, resharded = 0, None
    if resume_from is not None:
        manifest = ckpt.read_manifest(resume_from)
        ckpt.verify_file(resume_from, "recipe.yaml", manifest)  # each rank checks what it reads, and only that
        saved_layout = reshard.layout_key(manifest["layout"], manifest["world_size"])
        layout = reshard.layout_key(recipe.parallel.model_dump(), world)
        state = ckpt.load_rank_state(resume_from, rank) if saved_layout == layout else None
        # the same layout can still cut pipeline stages elsewhere (stage costs depend on data.seq_len)
        same = state is not None and set(state["model"]) == set(trained.state_dict())
        if saved_layout == layout:
            same = collectives.agree_all(same)  # every rank takes the same path
        if same:  # the rank's own engine state: a bitwise-exact resume
            if recipe.parallel.zero_stage < 3:  # ZeRO-3's optimizer restores the model's partitions from fp32
                trained.load_state_dict(state["model"])
            ckpt.load_optimizer_state(optimizer, state["optimizer"])
        else:  # another layout: every rank reads only its slices of the dense tensors (trainer/reshard.py)
            state = ckpt.load_common(resume_from)  # rank 0's scheduler, loader, counters and RNG, no weights
            reshard.load_universal(resume_from, manifest, named_parameters(), optimizer, recipe.parallel.zero_stage,
                                   tp, tp_rank)
            resharded = saved_layout
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # a resharded optimizer kept its initial param groups; the schedule's lr is the truth
        engine.global_steps, engine.global_samples = state["engine"]["global_steps"], state["engine"]["global_samples"]
        engine.micro_steps = (state["engine"]["micro_steps"] if resharded is None
                              else engine.global_steps * engine.gradient_accumulation_steps())
        loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])  # another layout: rank 0's (the model draws no random numbers in training)
        start_step = state["step"]
    # Torch's RNG after resume must equal the uninterrupted run's, so nothing below draws from it.
    log = MetricsLog(run_dir, enabled=rank == 0, resume_step=start_step if resume_from else None)
    log.print(f"longtrain: {recipe.name} | pattern {recipe.model.pattern} | {count_parameters(model):,} parameters | "
              f"world {world} | device {device.type} | run dir {run_dir}"
              + (f" | resumed from {resume_from} (step {start_step})" if resume_from else ""))
    if resharded is not None:
        names = ("tp", "pp", "cp", "dp", "zero_stage")
        log.print("resharded: checkpoint layout " + " ".join(f"{k}={v}" for k, v in zip(names, resharded)) +
                  " -> " + " ".join(f"{k}={v}" for k, v in zip(names, layout)) +
                  f" | next global sample {loader.consumed_samples}")
        saved_batch = manifest.get("global_batch_size")
        if saved_batch is not None and saved_batch != loader.global_batch_size:
            log.print(f"note: global batch {saved_batch} -> {loader.global_batch_size} sequences per step "
                      "(micro_batch_size * grad_accum * dp); the loss curve will not continue the old run's exactly")
    # MFU is against the matmul rate of the run's precision (bfloat16 under train.bf16), as on GPUs.
    peak_flops = measured_matmul_flops(device, torch.bfloat16 if recipe.train.bf16 else torch.float32)
    if recipe.train.bf16 and device.type == "cpu":
        fp32_flops = measured_matmul_flops(device)
        if peak_flops < fp32_flops:
            log.print(f"note: train.bf16 on this CPU: bfloat16 matmuls run at {peak_flops / 1e9:.1f} GFLOP/s, float32 at "
                      f"{fp32_flops / 1e9:.1f} (no AVX512-BF16 or AMX, so torch emulates them); train.bf16=false is faster here")
    tokens_per_step = loader.global_batch_size * recipe.data.seq_len
    stop = StopSignal()
    recipe_text = (run_dir / "recipe.yaml").read_text() if rank == 0 else ""

    first_replica = mesh is None and rank == 0 or mesh is not None and mesh.coordinates["dp"] == mesh.coordinates["cp"] == 0

    def save_checkpoint(step):
        # collective under ZeRO (gathers each slice from its partitions): every rank computes it
        universal = reshard.universal_state(named_parameters(), dense_shapes, optimizer, recipe.parallel.zero_stage,
                                            tp, tp_rank, keep=first_replica) if recipe.checkpoint.reshardable else None
        state = {"step": step, "model": trained.state_dict(), "optimizer": ckpt.plain_optimizer_state(optimizer.state_dict()),
                 "scheduler": scheduler.state_dict(), "loader": loader.state_dict(), "rng": ckpt.rng_state(),
                 "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                            "micro_steps": engine.micro_steps}}
        if universal is not None:
            state["universal"] = universal
        manifest = {"consumed_samples": loader.consumed_samples, "global_batch_size": loader.global_batch_size,
                    "world_size": world,
                    "layout": recipe.parallel.model_dump(), "recipe_sha256": ckpt.hashlib.sha256(recipe_text.encode()).hexdigest(),
                    "tokenizer_sha256": ckpt.sha256(shards.tokenizer.path) if shards else None}
        path = ckpt.save(run_dir / "checkpoints", step, state, manifest, recipe_text, rank=rank,
                         barrier=collectives.barrier if world > 1 else (lambda: None), keep_last=recipe.checkpoint.keep_last)
        log.print(f"checkpoint: {path}")
        return path

    watch.phase = f"eval at step {start_step}"
    if start_step == 0:
        eval_loss = evaluate(engine, eval_set, recipe.train, device, run, dp_rank, dp_size)
        log.write({"step": 0, "eval_loss": eval_loss})
        log.print(f"step {0:>6}/{recipe.train.steps} | eval loss {eval_loss:.4f}")
    window_start, window_tokens = time.perf_counter(), 0
    run_start = time.perf_counter()
    step = start_step
    last_saved = start_step if resume_from else None
    loss_value = float("nan")
    nonfinite_in_a_row = 0
    while step < recipe.train.steps:
        watch.phase = f"train step {step + 1}"
        losses = []
        reported, saved = {}, None
        if run is not None:  # already the mean over every rank's tokens
            micro_batches = [(x.to(device), y.to(device)) for x, y in loader.next_step()]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.train.bf16):
                losses.append(torch.tensor(run.train_step(run.prepare(micro_batches))))
        else:
            for inputs, targets in loader.next_step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.train.bf16):
                    loss = train_loss(engine, inputs.to(device), targets.to(device))
                engine.backward(nonfinite_loss_poisons_gradients(loss))
                engine.step()
                losses.append(loss.detach())
        step += 1
        loss_t = torch.stack(losses).mean()
        if world > 1 and run is None:
            collectives.all_reduce(loss_t, op=dist.ReduceOp.AVG)
        loss_value = float(loss_t)
        window_tokens += tokens_per_step
        # The same on every rank: ZeRO 0 reduces the finite flag over all ranks, ZeRO 1-3 the gradient norm.
        skipped = not engine.was_step_applied()
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
        skipped_steps = step - scheduler.last_epoch  # the schedule advances on applied steps only
        if skipped:
            log.print(f"step {step:>6}/{recipe.train.steps} | NaN or Inf gradients (loss {loss_value:.4g}): update "
                      f"skipped, {nonfinite_in_a_row} in a row (the run stops at train.max_nonfinite_steps="
                      f"{recipe.train.max_nonfinite_steps}), {skipped_steps} in all")
        if step % recipe.train.log_interval == 0 or step == recipe.train.steps or skipped:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed
            mfu = flops_per_token(model, recipe.data.seq_len) * tokens_per_s / (peak_flops * world)
            memory = peak_memory_bytes(device)
            every_rank = [int(m) for m in collectives.gather_values(memory)]  # the worst rank is the one that runs out
            record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s,
                      "mfu": mfu, "peak_memory_bytes": max(every_rank), "peak_memory_bytes_per_rank": every_rank,
                      "consumed_samples": loader.consumed_samples,
                      "skipped": skipped, "skipped_steps": skipped_steps,
                      **ode_stats(model if run is None else run.stats_module)}
            log.write(record)
            reported.update(record)
            eta = (time.perf_counter() - run_start) / (step - start_step) * (recipe.train.steps - step)
            log.print(progress_line(step, recipe.train.steps, loss_value, record["lr"], tokens_per_s, mfu, max(every_rank), eta))
            window_start, window_tokens = time.perf_counter(), 0
        if nonfinite_in_a_row == recipe.train.max_nonfinite_steps:
            watch.phase = f"checkpoint at step {step}"
            path = save_checkpoint(step)  # its loader position is past the bad batches
            log.close()
            raise LongtrainError(f"step {step}: {nonfinite_in_a_row} steps in a row had NaN or Inf gradients "
                                 f"(train.max_nonfinite_steps={recipe.train.max_nonfinite_steps}); checkpointed "
                                 f"{path}; --resume auto continues after these batches, or lower train.lr")
        pause = time.perf_counter()  # eval and checkpoint time is left out of the next tokens/s window
        watch.phase = f"eval at step {step}"
        if step % recipe.train.eval_interval == 0 or step == recipe.train.steps:
            eval_loss = evaluate(engine, eval_set, recipe.train, device, run, dp_rank, dp_size)
            log.write({"step": step, "eval_loss": eval_loss})
            reported["eval_loss"] = eval_loss
            log.print(f"step {step:>6}/{recipe.train.steps} | eval loss {eval_loss:.4f}")
            if shards is None and run is None:  # the answer check decodes with the whole model in one process
                with torch.no_grad():
                    accuracy = answer_accuracy(model, task_eval_batches(eval_set, recipe.train.micro_batch_size,
                                                                        recipe.train.eval_batches, answer_only=True))
                # The task's usual measure: whole passkeys; for MQAR, recalled values (Arora et al. 2023).
                headline = accuracy["sample_accuracy" if recipe.data.task == "passkey" else "token_accuracy"]
                log.write({"step": step, "eval_accuracy": headline, "eval_token_accuracy": accuracy["token_accuracy"],
                           "eval_sample_accuracy": accuracy["sample_accuracy"]})
                reported["eval_accuracy"] = headline
                log.print(f"step {step:>6}/{recipe.train.steps} | eval {recipe.data.task} accuracy {headline:.3f}")
        watch.phase = f"checkpoint at step {step}"
        if step % recipe.checkpoint.interval == 0 or step == recipe.train.steps:
            saved = save_checkpoint(step)
            last_saved = step
        window_start += time.perf_counter() - pause
        watch.phase = f"the end of train step {step}"
        if on_step is not None:
            on_step(step, reported, saved)
        if stop.agreed():
            if last_saved != step:
                save_checkpoint(step)
            log.print(f"received {stop.received or 'stop from another rank'}: checkpointed step {step}, exiting")
            log.close()
            return {"step": step, "stopped": True}
    watch.phase = "final eval"
    if run is not None and recipe.train.sample_tokens:
        run.load_into_dense(model)  # collective: rank 0's dense model gets the trained weights for the sample
    final = {"step": step, "final_loss": loss_value, "final_eval_loss": evaluate(engine, eval_set, recipe.train, device, run, dp_rank, dp_size)}
    if rank == 0 and recipe.train.sample_tokens and shards is None:
        prompt, answer = first_question(eval_set, 0)
        new = generate(model, prompt, len(answer))
        vocab = eval_set.task.vocab
        text = f"... {vocab.decode(prompt[-12:])} -> {vocab.decode(new)} (answer {vocab.decode(answer)})"
        (run_dir / "sample.txt").write_text(text + "\n")
        log.print("sample (greedy): " + text)
    elif rank == 0 and recipe.train.sample_tokens:
        # Prompt: the start of a held-out sequence; nucleus sampling with its own seeded generator, so the
        # sample is reproducible and the global RNG (part of the checkpointed state) is untouched.
        prompt = [int(t) for t in eval_set.get(0)[: min(32, recipe.data.seq_len // 2)]]
        new = generate(model, prompt, recipe.train.sample_tokens, temperature=0.8, top_p=0.9,
                       generator=torch.Generator().manual_seed(recipe.run.seed), max_context=recipe.data.seq_len)
        prompt_text, text = shards.tokenizer.decode(prompt), shards.tokenizer.decode(new)
        (run_dir / "sample.txt").write_text(prompt_text + text)
        log.print(f"sample (top-p 0.9, prompt from the held-out split):\n{prompt_text}[...]{text}")
    log.write(final)
    log.print(f"done: final loss {loss_value:.4f}, eval loss {final['final_eval_loss']:.4f} -> {run_dir}")
    log.close()
    return final
