"""Apply a mesh to the decoder and wrap it in a DeepSpeed engine: tp, pp, cp and dp x ZeRO together.

    module = parallelize(model_cfg, mesh, seq_len, seed)     # this rank's part only
    run = parallel_engine(module, train_cfg, parallel_cfg, mesh)
    loss = run.train_step(run.prepare(micro_batches))   # one optimizer step; the global mean loss

Each rank declares the model on the meta device and materialises only its part, drawn by parameter
name and slice so that it equals that part of the one-process model (trainer/model/init.py). The loss is the mean over all tokens of all ranks: each rank averages its own tokens (equal
counts everywhere) and DeepSpeed averages gradients over the dp x cp group. With pp > 1 the engine is
DeepSpeed's PipelineEngine (1F1B over parallel.micro_batches); otherwise the plain engine, given
the mesh as its `mpu` so that ZeRO partitions over dp x cp and the gradient norm sums over tp.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from longtrain.trainer.engine import build_optimizer, limit_engine_memory, deepspeed_config
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.faults import nonfinite_loss_poisons_gradients
from longtrain.trainer.model.decoder import Decoder
from longtrain.trainer.model.init import build_decoder, initialize
from longtrain.trainer.model.layers import Linears
from longtrain.trainer.parallel import collectives
from longtrain.trainer.parallel.context import apply_context_parallel, zigzag_split
from longtrain.trainer.parallel.mesh import Mesh
from longtrain.trainer.parallel.pipeline import build_pipeline
from longtrain.trainer.parallel.tensor import TensorParallelLinears, head_weight, parallel_linear_loss


class MeshMPU:
    """DeepSpeed's `mpu` interface over the mesh (pp == 1): model parallel = tp, data parallel = dp x cp."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def get_model_parallel_rank(self):
        return self.mesh.coordinates["tp"]

    def get_model_parallel_world_size(self):
        return self.mesh.tp

    def get_model_parallel_group(self):
        return self.mesh.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return dist.get_rank(self.mesh.dp_cp_group)

    def get_data_parallel_world_size(self):
        return self.mesh.dp * self.mesh.cp

    def get_data_parallel_group(self):
        return self.mesh.dp_cp_group

    def get_pipeline_model_parallel_rank(self):
        return 0

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_group(self):
        return self.mesh.pp_group


class ParallelLM(nn.Module):
    """(tokens, targets) -> mean loss over this rank's tokens; vocab-parallel when tp > 1, without the logits."""

    def __init__(self, decoder: Decoder, mesh: Mesh):
        super().__init__()
        self.decoder = decoder
        self.mesh = mesh

    def forward(self, tokens, targets, positions=None):
        """positions: optional (batch, seq) in-document positions of packed documents (this rank's slice)."""
        return parallel_linear_loss(self.decoder.hidden(tokens, positions), head_weight(self.decoder), targets,
                                    self.mesh)


class ParallelRun:
    def __init__(self, engine, optimizer, scheduler, mesh: Mesh, train, parallel):
        self.engine, self.optimizer, self.scheduler = engine, optimizer, scheduler
        self.mesh, self.train, self.parallel = mesh, train, parallel

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def ode_stats(self) -> dict:
        """`ode_stats` of this rank's O blocks, keyed by their index in the dense decoder's pattern."""
        from longtrain.trainer.model.ode import ODEBlock, ode_stats
        if self.mesh.pp == 1:
            return ode_stats(self.module.decoder)
        from longtrain.trainer.parallel.pipeline import BlockStage, local_layers
        stats = {}
        for index, layer in local_layers(self.module):
            if isinstance(layer, BlockStage) and isinstance(layer.block.mixer, ODEBlock):
                stats.update({f"ode/{index - 1}/{k}": v for k, v in layer.block.mixer.stats().items()})
        return stats

    def prepare(self, micro_batches: list[tuple]) -> list[tuple]:
        """This data-parallel rank's micro-batches of one step ((tokens, targets), each (batch, seq))
        -> what this rank feeds the engine: the pipeline's parallel.micro_batches equal pieces of the
        same sequences when pp > 1, each cut to this cp rank's zigzag slice of the sequence. A third tensor,
        the in-document positions of documents packing, is cut like the tokens."""
        if self.mesh.pp > 1 and any(len(batch) > 2 for batch in micro_batches):
            raise LongtrainError("data.packing=documents does not work with parallel.pp > 1 yet; use data.packing=concat")
        if self.mesh.pp > 1:
            tokens = torch.cat([t for t, _ in micro_batches])
            targets = torch.cat([t for _, t in micro_batches])
            micro_batches = list(zip(tokens.chunk(self.parallel.micro_batches), targets.chunk(self.parallel.micro_batches)))
        cp, cp_rank = self.mesh.cp, self.mesh.coordinates["cp"]
        return [tuple(zigzag_split(t, cp, cp_rank) for t in batch) for batch in micro_batches]

    def train_step(self, batches: list[tuple]) -> float:
        """One optimizer step over this rank's prepared micro-batches; the global mean loss (every rank)."""
        if self.mesh.pp > 1:
            return float(self.engine.train_batch(iter(batches)))
        losses = []
        for tokens, targets, *positions in batches:
            loss = self.engine(tokens, targets, *positions)
            self.engine.backward(nonfinite_loss_poisons_gradients(loss))
            self.engine.step()
            losses.append(loss.detach())
        return self._mean(torch.stack(losses).mean())

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Mean loss over the (tokens, targets, weight) batches of every data-parallel replica, each given whole
        to all ranks of its replica (this rank passes its replica's share; weight 0: run but not counted)."""
        self.module.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.engine.device)  # (sum of batch losses, batches)
        if self.mesh.pp > 1:
            # DeepSpeed's pipeline keeps its activation buffers sized by the first batch it passed between
            # stages: eval batches of micro_batch_size sequences and training micro-batches of another
            # size must each start over (a later stage otherwise read a 2-sequence buffer for 1 sequence).
            self.engine.reset_activation_shape()
        for tokens, targets, weight, *positions in batches:
            (tokens, targets, *positions), = self.prepare_eval(tokens, targets, *positions)
            if self.mesh.pp > 1:
                loss = self.engine.eval_batch(iter([(tokens, targets)]), num_micro_batches=1)
            else:
                loss = self.module(tokens, targets, *positions)
            total[0] += weight * loss.detach().double().reshape(())  # the pipeline returns shape (1,)
            total[1] += weight
        if self.mesh.pp > 1:
            self.engine.reset_activation_shape()
        self.module.train()
        # Each cp rank's loss is its share scaled by cp (parallel_linear_loss): summed over the dp x cp
        # group and divided by the batches counted there (each once per cp rank), the mean over all batches.
        collectives.all_reduce(total, group=self.mesh.dp_cp_group)
        return (total[0] / total[1]).item()

    def prepare_eval(self, tokens, targets, *positions):
        cp, cp_rank = self.mesh.cp, self.mesh.coordinates["cp"]
        return [tuple(zigzag_split(t, cp, cp_rank) for t in (tokens, targets, *positions))]

    def _mean(self, loss: torch.Tensor) -> float:
        """Average over dp x cp: equal token counts on every rank, so the mean over all tokens."""
        loss = loss.detach().clone()
        collectives.all_reduce(loss, group=self.mesh.dp_cp_group)
        return float(loss) / (self.mesh.dp * self.mesh.cp)

    def dense_named_parameters(self):
        """(dense Decoder name, this rank's tensor) for every parameter held here (a tp shard when split)."""
        if self.mesh.pp > 1:
            from longtrain.trainer.parallel.pipeline import dense_named_parameters
            yield from dense_named_parameters(self.module)
        else:
            yield from self.module.decoder.named_parameters()

    def gathered_parameters(self) -> dict:
        """Name -> a copy of this rank's tensor of each parameter (whole again under ZeRO-3)."""
        named = list(self.dense_named_parameters())
        if self.parallel.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters([p for _, p in named]):
                return {n: p.detach().clone() for n, p in named}
        return {n: p.detach().clone() for n, p in named}

    def load_into_dense(self, dense: nn.Module | None, shapes: dict) -> None:
        """Collective: rank 0's `dense` Decoder (None elsewhere) receives the trained weights of every stage
        and tp shard (for sampling and tools that want the whole model in one process). shapes: the dense
        parameter shapes (trainer/model/init.py dense_shapes)."""
        from longtrain.trainer.parallel.tensor import shard_dim

        tp_rank = self.mesh.coordinates["tp"]
        mine = {n: (t, shard_dim(t.shape, shapes[n], self.mesh.tp), tp_rank) for n, t in self.gathered_parameters().items()}
        pieces = collectives.gather_object(mine if self.mesh.coordinates["cp"] == self.mesh.coordinates["dp"] == 0 else {})
        if pieces is None:
            return
        params = dict(dense.named_parameters())
        with torch.no_grad():
            for piece in pieces:
                for name, (tensor, dim, rank) in piece.items():
                    target = params[name] if dim is None else params[name].narrow(dim, rank * tensor.shape[dim], tensor.shape[dim])
                    target.copy_(tensor)


class ZeroPartition:
    """ZeRO-3 from the start: each piece of the model is partitioned over the data-parallel group as soon
    as it holds its values (DeepSpeed's `zero.Init` given an existing module), so a rank never holds more
    than one piece whole; `deepspeed.initialize` then finds every parameter already partitioned."""

    def __init__(self, group, config: dict, mpu=None):
        self.group, self.config, self.mpu = group, config, mpu

    def __call__(self, piece: nn.Module) -> None:
        import deepspeed
        deepspeed.zero.Init(module=piece, data_parallel_group=self.group, config_dict_or_path=self.config, mpu=self.mpu,
                            mem_efficient_linear=False)  # leave torch.nn.functional.linear as it is


def zero_partition(train, parallel, mesh: Mesh) -> ZeroPartition | None:
    """The ZeRO-3 partitioning of `parallelize` (None below stage 3)."""
    if parallel.zero_stage != 3:
        return None
    return ZeroPartition(mesh.dp_cp_group, parallel_config(train, parallel, mesh), MeshMPU(mesh))


def parallelize(model_cfg, mesh: Mesh, seq_len: int, seed: int, device=None, attention_backend: str = "auto",
                scan_backend: str = "auto", activation_checkpointing: bool = False, dtype=torch.float32,
                partition: ZeroPartition | None = None, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """This rank's part of the model, and nothing else: its tp shards, its pipeline stage (pp > 1) and,
    with `partition`, its ZeRO-3 partition, each initialised to its slice of the one-process model
    (trainer/model/init.py). The dense model is never built. compute_dtype: what the blocks compute in
    (torch.bfloat16 under train.bf16's autocast; default dtype)."""
    device = device or torch.device("cpu")
    linears = TensorParallelLinears(mesh, dtype, model_cfg.init_std) if mesh.tp > 1 else Linears(model_cfg.init_std)
    tp_rank = mesh.coordinates["tp"]
    if mesh.pp > 1:  # DeepSpeed's PipelineModule builds only this stage's layers
        from longtrain.trainer.parallel.pipeline import dense_named_parameters
        module = build_pipeline(model_cfg, mesh, linears, functools.partial(_pipeline_loss, mesh=mesh), seq_len,
                                attention_backend, scan_backend)
        initialize(dense_named_parameters(module), seed, tp_rank, mesh.tp)
        module.to(device)
    else:
        decoder = build_decoder(model_cfg, device, seed, linears, tp_rank, partition, attention_backend=attention_backend,
                                scan_backend=scan_backend, activation_checkpointing=activation_checkpointing)
        module = ParallelLM(decoder, mesh)
    if dtype != torch.float32:
        module.to(dtype)
    if mesh.tp * mesh.cp > 1:
        set_lockstep(module, mesh.tp_cp_group)
    # cp's kernel check (no silent reference kernels) sees the precision the blocks compute in.
    apply_context_parallel(module, mesh.cp_group, device, compute_dtype or dtype)
    return module


def parallel_engine(module: nn.Module, train, parallel, mesh: Mesh) -> ParallelRun:
    """The optimizer, schedule and DeepSpeed engine (the pipeline engine when pp > 1) of a parallelized module."""
    import deepspeed

    optimizer, scheduler = build_optimizer(module, train, parallel.zero_stage)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=parallel_config(train, parallel, mesh),
        mpu=None if mesh.pp > 1 else MeshMPU(mesh))
    limit_engine_memory(engine, mesh.dp * mesh.cp)
    if mesh.pp > 1 and parallel.zero_stage == 0:
        engine.clip_fp32_gradients = functools.partial(_clip_pipeline_gradients, engine, mesh)
    return ParallelRun(engine, optimizer, scheduler, mesh, train, parallel)


def parallel_config(train, parallel, mesh: Mesh) -> dict:
    """DeepSpeed's configuration under the mesh: ZeRO over dp x cp; with pp > 1, the step's sequences of
    this rank cut into parallel.micro_batches pipeline micro-batches."""
    config = deepspeed_config(train, parallel, dp_size=mesh.dp * mesh.cp)
    if mesh.pp > 1:
        per_rank = train.micro_batch_size * train.grad_accum
        config["train_micro_batch_size_per_gpu"] = per_rank // parallel.micro_batches
        config["gradient_accumulation_steps"] = parallel.micro_batches
        config["train_batch_size"] = per_rank * mesh.dp * mesh.cp
    return config


@torch.no_grad()
def _clip_pipeline_gradients(engine, mesh: Mesh) -> None:
    """Clip by the norm over every stage and tp shard, each parameter counted once.

    Replaces PipelineEngine.clip_fp32_gradients (the ZeRO-0 path): DeepSpeed 0.19.8's
    runtime.utils.clip_grad_norm_ counts a parameter without a model-parallel mark only on the first
    rank of the pipe x model group, so later stages' parameters are left out of the norm and the
    clipped step differs from one process. ZeRO-1's own norm is right and is left alone."""
    total = torch.zeros((), dtype=torch.float64, device=engine.device)  # the compute device: NCCL takes no host tensor
    for p in engine.module.parameters():
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue  # a tied copy: its twin on the first stage holding it is counted
        if mesh.coordinates["tp"] == 0 or getattr(p, "tensor_model_parallel", False):
            total += p.grad.double().pow(2).sum()
    collectives.all_reduce(total, group=engine.grid.get_model_parallel_group())
    coefficient = engine.gradient_clipping() / (total.sqrt().item() + 1e-6)
    if coefficient < 1:
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.mul_(coefficient)


def _sum_over(moments: torch.Tensor, group) -> torch.Tensor:
    moments = moments.clone()
    collectives.all_reduce(moments, group=group)  # one ring all-reduce: the same bits on every rank
    return moments


def set_lockstep(module: nn.Module, group) -> None:
    """Adaptive O blocks accept a step by the error norm over the state of every rank in `group`
    (tp x cp: the ranks holding parts or replicas of one sequence), so they all take the same steps."""
    from longtrain.trainer.model.ode import ODEBlock

    for block in module.modules():
        if isinstance(block, ODEBlock):
            block.lockstep_sum = functools.partial(_sum_over, group=group)


def _pipeline_loss(outputs, targets, mesh):
    """The last stage's loss: outputs is (hidden, head weight shard) (trainer/parallel/pipeline.py)."""
    hidden, weight = outputs
    return nonfinite_loss_poisons_gradients(parallel_linear_loss(hidden, weight, targets, mesh))
