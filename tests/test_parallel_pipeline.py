"""Pipeline layout without processes: DeepSpeed's pipe x data x model topology numbers ranks as
megatron-core's tp-cp-dp-pp order does, and stages are cut by per-block cost."""
import pytest

from longtrain.trainer.config import ModelConfig
from longtrain.trainer.parallel.plan import Layout


@pytest.mark.parametrize("tp, cp, dp, pp", [(2, 2, 2, 2), (4, 2, 4, 2), (1, 2, 1, 2), (2, 1, 3, 4)])
def test_deepspeed_topology_agrees_with_megatron(tp, cp, dp, pp):
    from megatron.core.parallel_state import RankGenerator

    from longtrain.trainer.parallel.pipeline import topology

    layout = Layout(tp=tp, pp=pp, cp=cp, dp=dp)
    topo = topology(layout)
    for rank in range(layout.world):
        c = layout.coordinates(rank)
        coord = topo.get_coord(rank)
        assert (coord.pipe, coord.data, coord.model) == (c["pp"], c["cp"] + cp * c["dp"], c["tp"])
    megatron = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    for axis, name in [("data", "dp-cp"), ("model", "tp"), ("pipe", "pp")]:
        assert sorted(topo.get_axis_comm_lists(axis)) == sorted(megatron.get_ranks(name)), axis


def test_stages_cut_by_cost():
    from longtrain.trainer.parallel.pipeline import stage_bounds

    cfg = ModelConfig(pattern="FFFFOF", d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64,
                      ode={"solver": "rk4", "steps": 1})
    # the O block costs four F blocks (rk4: 4 evaluations): stage 0 takes embedding + FFFF, stage 1 O F + norm, head
    assert stage_bounds(cfg, 2, 16) == [0, 5, 9]
