"""Tensor parallelism (Shoeybi et al. 2019, "Megatron-LM"): a `Linears` factory of megatron-core layers.

column(in, out) is ColumnParallelLinear(gather_output=False): input replicated, output this rank's
slice; row(in, out) is RowParallelLinear(input_is_parallel=True): input sliced, output all-reduced;
embedding is VocabParallelEmbedding and the loss vocab_parallel_cross_entropy. These run on CPU
untouched. Megatron's seeding (`model_parallel_cuda_manual_seed`) is CUDA-only, so weights are not
initialised here: every rank builds the same dense model from one seed and takes its shard of each
tensor (`load_dense_shards`), which also makes a tensor-parallel model equal to its dense twin.
"""
from __future__ import annotations

import torch
from torch import nn

from longtrain.trainer.parallel.mesh import Mesh


def _layers():
    from megatron.core import tensor_parallel
    return tensor_parallel


def _no_init(weight):
    """Weights are loaded from the dense model (load_dense_shards); nothing to draw here."""
    return weight


class TensorParallelLinears:
    """A `Linears` (trainer/model/layers.py) whose layers are split over the mesh's tp group."""

    def __init__(self, mesh: Mesh, params_dtype: torch.dtype = torch.float32):
        from megatron.core.model_parallel_config import ModelParallelConfig

        self.tp = mesh.tp
        self.group = mesh.tp_group
        self.config = ModelParallelConfig(tensor_model_parallel_size=mesh.tp, use_cpu_initialization=True,
                                          perform_initialization=False, params_dtype=params_dtype)

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return _column_class()(in_features, out_features, config=self.config, init_method=_no_init, bias=bias,
                               gather_output=False, tp_group=self.group)

    def row(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return _row_class()(in_features, out_features, config=self.config, init_method=_no_init, bias=bias,
                            input_is_parallel=True, skip_bias_add=False, tp_group=self.group)

    def shared_input(self, x: torch.Tensor) -> torch.Tensor:
        """Identity forward, gradient all-reduced over tp: x feeds channel-sharded work (Mamba's B, C)
        whose gradient on each rank covers its own channels only."""
        return copy_to_tensor_parallel(x, self.group)

    def embedding(self, vocab: int, dim: int) -> nn.Module:
        return _layers().VocabParallelEmbedding(vocab, dim, init_method=_no_init, config=self.config, tp_group=self.group)


_CLASSES: dict = {}


def _column_class():
    """ColumnParallelLinear returning a tensor (megatron's returns (output, bias)); parameter names stay
    `weight` / `bias`, as in nn.Linear, so dense and sharded state dicts line up."""
    if "column" not in _CLASSES:
        class Column(_layers().ColumnParallelLinear):
            def forward(self, x):
                out, bias = super().forward(x)
                return out if bias is None else out + bias
        _CLASSES["column"] = Column
    return _CLASSES["column"]


def _row_class():
    if "row" not in _CLASSES:
        class Row(_layers().RowParallelLinear):
            def forward(self, x):
                out, bias = super().forward(x)
                return out if bias is None else out + bias
        _CLASSES["row"] = Row
    return _CLASSES["row"]


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over the tp group.

    Not megatron-core's copy_to_tensor_model_parallel_region: its backward all-reduces
    `grad.contiguous()` and returns `grad`, so a non-contiguous gradient (Mamba's B, a split then
    transposed slice) comes back unreduced, silently (megatron-core 0.16.1, mappings._reduce)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTensorParallel.apply(x, group)


def _tensors(model: nn.Module):
    """Parameters by name (state dicts of megatron layers also hold an `_extra_state` entry; skipped)."""
    yield from model.named_parameters()


def shard_dim(local_shape, dense_shape, tp: int) -> int | None:
    """The dimension a tensor of `dense_shape` is split along to give `local_shape` (None: replicated)."""
    if tuple(local_shape) == tuple(dense_shape):
        return None
    differing = [d for d, (a, b) in enumerate(zip(local_shape, dense_shape)) if a != b]
    if len(local_shape) != len(dense_shape) or len(differing) != 1 or local_shape[differing[0]] * tp != dense_shape[differing[0]]:
        raise ValueError(f"shape {tuple(local_shape)} is not a 1/{tp} slice of {tuple(dense_shape)}")
    return differing[0]


@torch.no_grad()
def load_dense_shards(model: nn.Module, dense_state: dict, tp_rank: int, tp: int, strict: bool = True) -> None:
    """Copy into each parameter of the tensor-parallel `model` its tp_rank-th contiguous slice of the
    same-named dense tensor (or the whole tensor when it is replicated)."""
    for name, param in _tensors(model):
        if name not in dense_state:
            if strict:
                raise KeyError(f"{name} missing from the dense state dict")
            continue
        dense = dense_state[name]
        dim = shard_dim(param.shape, dense.shape, tp)
        size = param.shape[dim] if dim is not None else None
        param.copy_(dense if dim is None else dense.narrow(dim, tp_rank * size, size))
        if dim is not None:
            # DeepSpeed's gradient norm counts a parameter on every tp rank only when it carries this mark
            # (megatron's layers set it; Mamba's per-channel tensors are sharded too).
            param.tensor_model_parallel, param.partition_dim = True, dim


def gather_dense(model: nn.Module, dense_shapes: dict, group, tp: int) -> dict:
    """The full tensors of a tensor-parallel model (every rank gets all), keyed like the dense model."""
    import torch.distributed as dist

    out = {}
    for name, tensor in _tensors(model):
        dim = shard_dim(tensor.shape, dense_shapes[name], tp)
        if dim is None:
            out[name] = tensor.clone()
            continue
        parts = [torch.empty_like(tensor) for _ in range(tp)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        out[name] = torch.cat(parts, dim=dim)
    return out


def parallel_logits(decoder, hidden: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """This rank's vocab slice of the logits, (batch, seq, vocab / tp) float32.

    A tied head multiplies by the vocab-parallel embedding's own shard; its input must then pass
    megatron's copy-to-tensor-parallel region (identity forward, all-reduce of the gradient backward),
    which an untied ColumnParallelLinear head already does inside."""
    if mesh.tp > 1 and decoder.head is None:
        hidden = copy_to_tensor_parallel(hidden, mesh.tp_group)
    return decoder.logits(hidden)


IGNORE_INDEX = -100  # targets outside the loss (cross-entropy's default ignore_index)


def parallel_lm_loss(logits: torch.Tensor, targets: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """This rank's share of the micro-batch's mean next-token cross-entropy, scaled so that averaging
    over the cp ranks (as the dp x cp gradient average does) gives the mean over the whole sequences'
    scored tokens: cp * (sum over my scored tokens) / (scored tokens over the cp group). Targets equal
    to -100 are not scored. logits: (batch, seq, vocab / tp) float32, vocab-parallel when tp > 1."""
    scored = targets != IGNORE_INDEX
    safe = targets.masked_fill(~scored, 0)
    if mesh.tp == 1:
        per_token = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe.reshape(-1),
                                                reduction="none").view_as(targets)
    else:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        per_token = vocab_parallel_cross_entropy(logits, safe)
    count = scored.sum().to(torch.float64)
    if mesh.cp > 1:
        torch.distributed.all_reduce(count, group=mesh.cp_group)
    return (per_token * scored).sum() * (mesh.cp / count.clamp(min=1)).to(per_token.dtype)
