"""The mesh: this process's place in the tp x cp x dp x pp grid and the process groups of each axis.

Built on megatron-core's `parallel_state.initialize_model_parallel` (default order tp-cp-ep-dp-pp:
tp varies fastest), which also serves megatron's tensor-parallel layers and vocab-parallel loss.
The mesh is passed explicitly to whatever needs a group; nothing else here keeps global state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from longtrain.trainer.parallel.plan import Layout


@dataclass
class Mesh:
    layout: Layout
    rank: int
    tp_group: object
    pp_group: object
    cp_group: object
    dp_group: object  # data parallel only (same tp, cp, pp)
    dp_cp_group: object  # data x context parallel: where gradients are averaged and ZeRO partitions
    tp_cp_group: object  # tensor x context parallel: the ranks holding parts of one replica's activations

    @property
    def coordinates(self) -> dict:
        return self.layout.coordinates(self.rank)

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def cp(self) -> int:
        return self.layout.cp

    @property
    def dp(self) -> int:
        return self.layout.dp

    def destroy(self) -> None:
        from megatron.core import parallel_state
        parallel_state.destroy_model_parallel()


def build_mesh(tp: int = 1, pp: int = 1, cp: int = 1, timeout_s: float = 600.0) -> Mesh:
    """Create the groups of every axis over the default process group (every rank calls this).
    timeout_s: how long a collective on one of them waits for a peer (megatron-core's default is 30 min)."""
    from megatron.core import parallel_state as ps

    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by tp*pp*cp={tp * pp * cp}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp, create_gloo_process_groups=False,
                                 distributed_timeout_minutes=timeout_s / 60)
    layout = Layout(tp=tp, pp=pp, cp=cp, dp=world // (tp * pp * cp))
    mesh = Mesh(layout=layout, rank=dist.get_rank(),
                tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
                cp_group=ps.get_context_parallel_group(), dp_group=ps.get_data_parallel_group(),
                dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
                tp_cp_group=ps.get_tensor_and_context_parallel_group())
    expected = layout.coordinates(mesh.rank)
    seen = {"tp": ps.get_tensor_model_parallel_rank(), "cp": ps.get_context_parallel_rank(),
            "dp": ps.get_data_parallel_rank(), "pp": ps.get_pipeline_model_parallel_rank()}
    if seen != expected:  # our rank arithmetic (plan, DeepSpeed topology) must be megatron's
        raise RuntimeError(f"megatron-core placed rank {mesh.rank} at {seen}, the plan expects {expected}")
    return mesh
