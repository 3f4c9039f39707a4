"""Tensor parallelism (Shoeybi et al. 2019, "Megatron-LM"): a `Linears` factory of megatron-core layers.

column(in, out) is ColumnParallelLinear(gather_output=False): input replicated, output this rank's
slice; row(in, out) is RowParallelLinear(input_is_parallel=True): input sliced, output all-reduced;
embedding is VocabParallelEmbedding. These run on CPU untouched. The loss (`parallel_linear_loss`) is
our own: megatron-core's vocab_parallel_cross_entropy takes the logits, which would exist for every
token at once (64 GB in float32 at a vocab of 128k and 128k tokens per rank). Megatron's seeding
(`model_parallel_cuda_manual_seed`) is CUDA-only and draws per rank, so megatron does not initialise
the weights here: each layer's parameters carry their init rule and shard marks, and
trainer/model/init.py draws every rank's slice of the dense tensor by name, which makes a
tensor-parallel model equal to its dense twin without the dense model existing anywhere.
"""
from __future__ import annotations

import torch
from torch import nn

from longtrain.trainer.model.init import mark_shard, set_rule
from longtrain.trainer.model.layers import Linears
from longtrain.trainer.parallel import collectives
from longtrain.trainer.parallel.mesh import Mesh


def _layers():
    from megatron.core import tensor_parallel
    return tensor_parallel


def _no_init(weight):
    """Megatron draws nothing: trainer/model/init.py fills each slice by its rule."""
    return weight


def _marked(layer: nn.Module, weight_dim: int, bias_dim: int | None, std: float) -> nn.Module:
    """Give a megatron layer's parameters their init rules and shard marks (megatron sets the marks only
    when it initialises the weights itself)."""
    set_rule(layer.weight, "normal", std)
    mark_shard(layer.weight, weight_dim)
    if getattr(layer, "bias", None) is not None:
        set_rule(layer.bias, "const", 0.0)
        if bias_dim is not None:
            mark_shard(layer.bias, bias_dim)
    return layer


class TensorParallelLinears(Linears):
    """A `Linears` (trainer/model/layers.py) whose layers are split over the mesh's tp group. Their
    weights are left uninitialised (trainer/model/init.py fills them by name)."""

    def __init__(self, mesh: Mesh, params_dtype: torch.dtype = torch.float32, init_std: float = 0.02):
        from megatron.core.model_parallel_config import ModelParallelConfig

        super().__init__(init_std)
        self.tp = mesh.tp
        self.group = mesh.tp_group
        self.config = ModelParallelConfig(tensor_model_parallel_size=mesh.tp, use_cpu_initialization=True,
                                          perform_initialization=False, params_dtype=params_dtype)

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        layer = _column_class()(in_features, out_features, config=self.config, init_method=_no_init, bias=bias,
                                gather_output=False, tp_group=self.group)
        return _marked(layer, 0, 0, self.init_std)

    def row(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        layer = _row_class()(in_features, out_features, config=self.config, init_method=_no_init, bias=bias,
                             input_is_parallel=True, skip_bias_add=False, tp_group=self.group)
        return _marked(layer, 1, None, self.init_std)

    def shared_input(self, x: torch.Tensor) -> torch.Tensor:
        """Identity forward, gradient all-reduced over tp: x feeds channel-sharded work (Mamba's B, C)
        whose gradient on each rank covers its own channels only."""
        return copy_to_tensor_parallel(x, self.group)

    def embedding(self, vocab: int, dim: int) -> nn.Module:
        layer = _layers().VocabParallelEmbedding(vocab, dim, init_method=_no_init, config=self.config, tp_group=self.group)
        return _marked(layer, 0, None, self.init_std)


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
        collectives.all_reduce(grad, group=ctx.group)
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
    out = {}
    for name, tensor in _tensors(model):
        dim = shard_dim(tensor.shape, dense_shapes[name], tp)
        if dim is None:
            out[name] = tensor.clone()
            continue
        parts = [torch.empty_like(tensor) for _ in range(tp)]
        collectives.all_gather(parts, tensor.contiguous(), group=group)
        out[name] = torch.cat(parts, dim=dim)
    return out


IGNORE_INDEX = -100  # targets outside the loss (cross-entropy's default ignore_index)


def _scale_by_scored(total: torch.Tensor, targets: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """cp * total / (scored tokens over the cp group): averaged over the cp ranks, the mean per scored token."""
    count = (targets != IGNORE_INDEX).sum().to(torch.float64)
    if mesh.cp > 1:
        collectives.all_reduce(count, group=mesh.cp_group)
    return total * (mesh.cp / count.clamp(min=1)).to(total.dtype)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight^T where `weight` is this rank's vocab shard (rows
    vocab_start .. vocab_start + shard of the dense head), with both input gradients formed in the
    forward, one chunk of tokens at a time: the decoder's fused linear cross-entropy
    (trainer/model/decoder.py) made vocab-parallel as megatron-core's vocab_parallel_cross_entropy is
    (max and sum of exponentials all-reduced over the tp group), so neither the full-vocab logits nor
    even this shard's (tokens, vocab / tp) logits exist at once. Softmax, loss and the weight
    gradient's sum in float32 (float64 for float64); products in hidden's dtype."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, group, chunk, with_grad):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        ctx.weight_dtype = weight.dtype
        w = weight.to(hidden.dtype)
        shard = w.shape[0]
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if with_grad else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ w.t()).to(acc)  # (chunk, shard)
            local = t - vocab_start
            mine = (local >= 0) & (local < shard)  # ignored targets (-100) are never this rank's
            row_max = logits.amax(dim=-1)
            if group is not None:
                collectives.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=group)
            logits.sub_(row_max[:, None])
            picked = logits.gather(1, local.clamp(0, shard - 1)[:, None]).squeeze(1)
            logits.exp_()
            stats = torch.stack([logits.sum(dim=-1), torch.where(mine, picked, 0.0)])  # one all-reduce for both
            if group is not None:
                collectives.all_reduce(stats, group=group)
            sum_exp, target_logit = stats
            scored = (t != IGNORE_INDEX).to(acc)
            total += ((sum_exp.log() - target_logit) * scored).sum()
            if with_grad:  # d loss / d logits = softmax - one_hot, zero on ignored rows
                logits.mul_((scored / sum_exp)[:, None])
                rows = torch.nonzero(mine).squeeze(1)
                logits[rows, local[rows]] -= 1.0
                g = logits.to(hidden.dtype)
                grad_hidden[start:start + chunk] = g @ w
                grad_weight += (g.t() @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad.to(grad_hidden.dtype), (grad_weight * grad).to(ctx.weight_dtype),
                None, None, None, None, None)


def head_weight(decoder) -> torch.Tensor:
    """The output projection's weight, (vocab / tp, d_model): the tied embedding's shard or the head's."""
    return decoder.embed.weight if decoder.head is None else decoder.head.weight


def parallel_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mesh: Mesh,
                         chunk: int | None = None) -> torch.Tensor:
    """This rank's share of the micro-batch's mean next-token cross-entropy of the logits hidden @ weight^T,
    without the logits, scaled so that averaging over the cp ranks (as the dp x cp gradient average does)
    gives the mean over the whole sequences' scored tokens: cp * (sum over my scored tokens) / (scored
    tokens over the cp group). hidden (batch, seq, d_model); weight this tp rank's vocab shard
    (vocab / tp, d_model); targets (batch, seq), -100 not scored.
    Under autocast the products run in its dtype, as F.linear's would. chunk: tokens per piece
    (default: about 4 Mi logits of the shard). Collective over the tp group (and the cp group)."""
    group = mesh.tp_group if mesh.tp > 1 else None
    if group is not None:  # each rank's product covers its vocab shard: hidden's gradient is summed over tp
        hidden = copy_to_tensor_parallel(hidden, group)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        hidden = hidden.to(torch.get_autocast_dtype(device))
    chunk = chunk or max(128, (4 << 20) // weight.shape[0])
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        total = _VocabParallelLinearCrossEntropy.apply(hidden.flatten(0, 1), weight, targets.flatten(),
                                                       mesh.coordinates["tp"] * weight.shape[0], group, chunk, with_grad)
    return _scale_by_scored(total, targets, mesh)
