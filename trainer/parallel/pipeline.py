"""Pipeline parallelism (Narayanan et al. 2021, 1F1B) with DeepSpeed's PipelineModule and engine.

The decoder's flat layer list becomes LayerSpecs: embedding, one per block of the pattern, final
norm, head. A tied head is a TiedLayerSpec of the embedding (DeepSpeed all-reduces the tied weight's
gradient between the first and last stage). Stages are cut by the per-block cost of the plan
(trainer/parallel/plan.py), embedding on the first stage and norm + head on the last.

The DeepSpeed topology is pipe x data x model with data = cp + cp * dp: the same rank numbering as
megatron-core's tp-cp-dp-pp order, so DeepSpeed's data-parallel groups are megatron's dp x cp groups
(where gradients are averaged) and its model axis is the tp group.
"""
from __future__ import annotations

import torch
from torch import nn

from longtrain.trainer.model.decoder import make_block
from longtrain.trainer.model.layers import RMSNorm
from longtrain.trainer.parallel.mesh import Mesh
from longtrain.trainer.parallel.plan import attention_span, block_cost, block_parameters, partition


class EmbeddingStage(nn.Module):
    """tokens (batch, seq) int64 -> (batch, seq, d_model). Also the tied head (see `tied_head`)."""

    def __init__(self, cfg, linears):
        super().__init__()
        self.embed = linears.embedding(cfg.vocab_size, cfg.d_model)
        self.shared_input = linears.shared_input

    def forward(self, tokens):
        return self.embed(tokens)


def tied_head(stage: EmbeddingStage, hidden):
    """(hidden, the embedding's own vocab-shard weight): the loss function forms the logits chunk by chunk
    (trainer/parallel/tensor.py parallel_linear_loss), so the last stage never holds them whole."""
    return hidden, stage.embed.weight


class BlockStage(nn.Module):
    def __init__(self, letter, cfg, linears, attention_backend, scan_backend, index=None):
        super().__init__()
        self.block = make_block(letter, cfg, linears, attention_backend, scan_backend, index)

    def forward(self, x):
        return self.block(x)


class NormStage(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x):
        return self.norm(x)


class HeadStage(nn.Module):
    def __init__(self, cfg, linears):
        super().__init__()
        self.head = linears.column(cfg.d_model, cfg.vocab_size)

    def forward(self, x):
        """(hidden, the head's vocab-shard weight), for the chunked loss, as `tied_head`."""
        return x, self.head.weight


def layer_specs(cfg, linears, attention_backend="auto", scan_backend="auto") -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", EmbeddingStage, cfg, linears, tied_weight_attr=["embed.weight"])
        last = TiedLayerSpec("embed", EmbeddingStage, cfg, linears, forward_fn=tied_head, tied_weight_attr=["embed.weight"])
    else:
        first, last = LayerSpec(EmbeddingStage, cfg, linears), LayerSpec(HeadStage, cfg, linears)
    blocks = [LayerSpec(BlockStage, c, cfg, linears, attention_backend, scan_backend, index)
              for index, c in enumerate(cfg.pattern)]
    return [first, *blocks, LayerSpec(NormStage, cfg), last]


def stage_bounds(cfg, stages: int, seq_len: int) -> list[int]:
    """DeepSpeed `parts` over the full layer list (embedding, blocks, norm, head) from per-block costs."""
    params = block_parameters(cfg)
    bounds = partition([block_cost(c, cfg, attention_span(cfg, seq_len, i), params[c])
                        for i, c in enumerate(cfg.pattern)], stages)
    n = len(cfg.pattern)
    return [0] + [b + 1 for b in bounds[1:-1]] + [n + 3]


def topology(mesh):
    """DeepSpeed's pipe x data x model topology with megatron's numbering (data = cp + cp * dp).
    `mesh`: a Mesh or a plan Layout (anything with tp, pp, cp, dp)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    return PipeModelDataParallelTopology(num_pp=mesh.pp, num_mp=mesh.tp, num_dp=mesh.dp * mesh.cp)


def build_pipeline(cfg, mesh: Mesh, linears, loss_fn, seq_len: int, attention_backend="auto", scan_backend="auto"):
    """A DeepSpeed PipelineModule of the decoder, cut by cost into mesh.pp stages."""
    from deepspeed.pipe import PipelineModule

    parts = stage_bounds(cfg, mesh.pp, seq_len)

    class CostPartitionedPipeline(PipelineModule):
        def _partition_layers(self, method="uniform"):
            self.parts = parts
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=parts[stage], stop=parts[stage + 1])

    module = CostPartitionedPipeline(layers=layer_specs(cfg, linears, attention_backend, scan_backend),
                                     topology=topology(mesh), loss_fn=loss_fn)
    module.cfg = cfg
    return module


def local_layers(module):
    """(layer index, stage module) for this stage's layers (tied modules included)."""
    from deepspeed.pipe import TiedLayerSpec

    for index in range(module._local_start, module._local_stop):
        spec = module._layer_specs[index]
        yield index, (module.tied_modules[spec.key] if isinstance(spec, TiedLayerSpec) else getattr(module, str(index)))


def _prefixes(layer, index: int) -> tuple[str, str]:
    """(name prefix inside the stage module, name prefix in the dense Decoder) of pipeline layer `index`."""
    if isinstance(layer, EmbeddingStage):
        return "embed.", "embed."
    if isinstance(layer, BlockStage):
        return "block.", f"blocks.{index - 1}."
    if isinstance(layer, NormStage):
        return "norm.", "norm."
    return "head.", "head."


def dense_named_parameters(module):
    """(dense Decoder name, parameter) for this stage's parameters; a tied embedding is named once."""
    seen = set()
    for index, layer in local_layers(module):
        local, dense = _prefixes(layer, index)
        for name, param in layer.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                yield dense + name[len(local):], param


@torch.no_grad()
def load_dense(module, dense_state: dict, tp_rank: int, tp: int) -> None:
    """Copy this stage's tensors (its tp shard of each) from a dense Decoder's state dict."""
    from longtrain.trainer.parallel.tensor import load_dense_shards

    for index, layer in local_layers(module):
        local, dense = _prefixes(layer, index)
        state = {local + k[len(dense):]: v for k, v in dense_state.items() if k.startswith(dense)}
        load_dense_shards(layer, state, tp_rank, tp)
