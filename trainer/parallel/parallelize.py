"""Apply a mesh to the decoder and wrap it in a DeepSpeed engine: tp, pp, cp and dp x ZeRO together.

    run = parallelize(model_cfg, train_cfg, parallel_cfg, mesh, dense_state, seq_len)
    loss = run.train_step(run.local_batches(tokens, targets))   # one optimizer step, global mean loss

Every rank starts from the same dense weights (`dense_state`, built from one seed) and keeps its
shard. The loss is the mean over all tokens of all ranks: each rank averages its own tokens (equal
counts everywhere) and DeepSpeed averages gradients over the dp x cp group. With pp > 1 the engine is
DeepSpeed's PipelineEngine (1F1B over parallel.micro_batches); otherwise the plain engine, given
the mesh as its `mpu` so that ZeRO partitions over dp x cp and the gradient norm sums over tp.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from longtrain.trainer.engine import deepspeed_config, lr_lambda
from longtrain.trainer.model.decoder import Decoder
from longtrain.trainer.model.layers import Linears
from longtrain.trainer.parallel.context import apply_context_parallel, zigzag_split
from longtrain.trainer.parallel.mesh import Mesh
from longtrain.trainer.parallel.pipeline import build_pipeline, load_dense
from longtrain.trainer.parallel.tensor import (TensorParallelLinears, load_dense_shards, parallel_lm_loss,
                                               parallel_logits)


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
    """(tokens, targets) -> mean loss over this rank's tokens; vocab-parallel when tp > 1."""

    def __init__(self, decoder: Decoder, mesh: Mesh):
        super().__init__()
        self.decoder = decoder
        self.mesh = mesh

    def forward(self, tokens, targets):
        logits = parallel_logits(self.decoder, self.decoder.hidden(tokens), self.mesh)
        return parallel_lm_loss(logits, targets, self.mesh)


def _optimizer(module: nn.Module, train):
    """AdamW with weight decay on matrices other than the embedding (as trainer/engine.py), warmup + cosine."""
    decay = [p for n, p in module.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in module.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr, betas=(train.beta1, train.beta2), eps=1e-8)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))


class ParallelRun:
    def __init__(self, engine, optimizer, scheduler, mesh: Mesh, train, parallel):
        self.engine, self.optimizer, self.scheduler = engine, optimizer, scheduler
        self.mesh, self.train, self.parallel = mesh, train, parallel

    @property
    def accumulation(self) -> int:
        return self.parallel.micro_batches if self.mesh.pp > 1 else self.train.grad_accum

    def local_batches(self, tokens: torch.Tensor, targets: torch.Tensor) -> list[tuple]:
        """This rank's micro-batches of one global batch. tokens, targets: (dp * accumulation *
        micro_batch_size, seq); micro-batch m of dp rank d is rows (m * dp + d) * micro_batch_size onward,
        cut to this cp rank's zigzag slice of the sequence."""
        size, dp, cp = self.train.micro_batch_size, self.mesh.dp, self.mesh.cp
        coords = self.mesh.coordinates
        out = []
        for m in range(self.accumulation):
            start = (m * dp + coords["dp"]) * size
            rows = slice(start, start + size)
            out.append((zigzag_split(tokens[rows], cp, coords["cp"]), zigzag_split(targets[rows], cp, coords["cp"])))
        return out

    def dense_named_parameters(self):
        """(dense Decoder name, this rank's tensor) for every parameter held here (a tp shard when split)."""
        module = self.engine.module
        if self.mesh.pp > 1:
            from longtrain.trainer.parallel.pipeline import dense_named_parameters
            yield from dense_named_parameters(module)
        else:
            for name, param in module.decoder.named_parameters():
                yield name, param

    def gathered_parameters(self) -> dict:
        """Name -> a copy of this rank's tensor of each parameter (whole again under ZeRO-3)."""
        named = list(self.dense_named_parameters())
        if self.parallel.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters([p for _, p in named]):
                return {n: p.detach().clone() for n, p in named}
        return {n: p.detach().clone() for n, p in named}

    def train_step(self, batches: list[tuple]) -> float:
        """One optimizer step over this rank's micro-batches; returns the global mean loss (every rank)."""
        if self.mesh.pp > 1:
            return float(self.engine.train_batch(iter(batches)))
        losses = []
        for tokens, targets in batches:
            loss = self.engine(tokens, targets)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        loss = torch.stack(losses).mean()
        dist.all_reduce(loss, group=self.mesh.dp_cp_group)
        return float(loss) / (self.mesh.dp * self.mesh.cp)


def parallelize(model_cfg, train, parallel, mesh: Mesh, dense_state: dict, seq_len: int,
                attention_backend: str = "auto", scan_backend: str = "auto", dtype=torch.float32) -> ParallelRun:
    import deepspeed

    linears = TensorParallelLinears(mesh, dtype) if mesh.tp > 1 else Linears(model_cfg.init_std)
    tp_rank = mesh.coordinates["tp"]
    if mesh.pp > 1:
        module = build_pipeline(model_cfg, mesh, linears, functools.partial(_pipeline_loss, mesh=mesh), seq_len,
                                attention_backend, scan_backend)
        load_dense(module, dense_state, tp_rank, mesh.tp)
    else:
        decoder = Decoder(model_cfg, linears, attention_backend, scan_backend, train.activation_checkpointing)
        load_dense_shards(decoder, dense_state, tp_rank, mesh.tp)
        module = ParallelLM(decoder, mesh)
    module.to(dtype)
    apply_context_parallel(module, mesh.cp_group)
    optimizer, scheduler = _optimizer(module, train)
    config = deepspeed_config(train, parallel, dp_size=mesh.dp * mesh.cp)
    if mesh.pp > 1:
        config["gradient_accumulation_steps"] = parallel.micro_batches
        config["train_batch_size"] = train.micro_batch_size * parallel.micro_batches * mesh.dp * mesh.cp
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config,
        mpu=None if mesh.pp > 1 else MeshMPU(mesh))
    if mesh.pp > 1 and parallel.zero_stage == 0:
        engine.clip_fp32_gradients = functools.partial(_clip_pipeline_gradients, engine, mesh)
    return ParallelRun(engine, optimizer, scheduler, mesh, train, parallel)


@torch.no_grad()
def _clip_pipeline_gradients(engine, mesh: Mesh) -> None:
    """Clip by the norm over every stage and tp shard, each parameter counted once.

    Replaces PipelineEngine.clip_fp32_gradients (the ZeRO-0 path): DeepSpeed 0.19.8's
    runtime.utils.clip_grad_norm_ counts a parameter without a model-parallel mark only on the first
    rank of the pipe x model group, so later stages' parameters are left out of the norm and the
    clipped step differs from one process. ZeRO-1's own norm is right and is left alone."""
    total = torch.zeros((), dtype=torch.float64)
    for p in engine.module.parameters():
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue  # a tied copy: its twin on the first stage holding it is counted
        if mesh.coordinates["tp"] == 0 or getattr(p, "tensor_model_parallel", False):
            total += p.grad.double().pow(2).sum()
    dist.all_reduce(total, group=engine.grid.get_model_parallel_group())
    coefficient = engine.gradient_clipping() / (total.sqrt().item() + 1e-6)
    if coefficient < 1:
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.mul_(coefficient)


def _pipeline_loss(logits, targets, mesh):
    return parallel_lm_loss(logits, targets, mesh)
