"""`longtrain plan`: layout checks (one line naming the fields), rank placement against megatron-core's
own rank generator, parameter counts against the real model, and the GPU-scale recipes' memory."""
from pathlib import Path

import pytest

from longtrain.launch.cli import main
from longtrain.trainer.config import load_recipe, recipe_from_dict
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.parallel.plan import Layout, block_parameters, build_plan, check_layout, partition

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
GPU_RECIPES = {"hybrid-1b-128k": 8, "hybrid-7b-32k": 64, "mamba-1b": 8, "attention-1b": 8}


def tiny(**parallel):
    return recipe_from_dict({
        "model": {"pattern": "AMOF", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64, "d_state": 4},
        "data": {"seq_len": 32, "tokenizer": {"vocab_size": 64}},
        "train": {"micro_batch_size": 2},
        "parallel": parallel})


@pytest.mark.parametrize("name", sorted(GPU_RECIPES))
def test_gpu_recipes_plan_at_their_world_size(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    plan = build_plan(recipe, GPU_RECIPES[name])
    assert plan.layout.world == GPU_RECIPES[name]
    assert plan.max_memory_bytes < 80e9
    assert 0.8e9 < plan.total_params < (8e9 if "7b" in name else 1.2e9)
    assert "".join(s.layers for s in plan.stages) == recipe.model.pattern


def test_every_recipe_loads_and_validates():
    paths = sorted(RECIPES.glob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        recipe = load_recipe(path)
        check_layout(recipe, None if recipe.parallel.dp is not None else 1)


@pytest.mark.parametrize("parallel, world, fields", [
    ({"tp": 2, "cp": 2}, 6, ["world size 6", "parallel.tp*pp*cp"]),
    ({"tp": 8}, 8, ["parallel.tp=8", "model.n_heads=4"]),
    ({"tp": 4}, 4, ["parallel.tp=4", "model.n_kv_heads=2"]),
    ({"pp": 5}, 5, ["parallel.pp=5", "model.pattern"]),
    ({"cp": 32}, 32, ["data.seq_len=32", "2*parallel.cp=64"]),
    ({"cp": 3}, 3, ["data.seq_len=32", "2*parallel.cp=6"]),
    ({"pp": 2, "zero_stage": 2}, 2, ["parallel.zero_stage=2", "parallel.pp=2"]),
    ({"pp": 2, "zero_stage": 3}, 2, ["parallel.zero_stage=3", "parallel.pp=2"]),
    ({"tp": 2, "dp": 3}, 4, ["parallel.dp=3", "world size 4"]),
    ({"pp": 1, "micro_batches": 4}, 1, ["parallel.micro_batches=4"]),
])
def test_invalid_layouts_name_the_fields(parallel, world, fields):
    with pytest.raises(LongtrainError) as error:
        check_layout(tiny(**parallel), world)
    message = str(error.value)
    assert "\n" not in message
    for field in fields:
        assert field in message


def test_mamba_inner_width_and_pipeline_accumulation_errors():
    recipe = recipe_from_dict({"model": {"pattern": "MF", "d_model": 36, "n_heads": 2, "n_kv_heads": 2, "expand": 1,
                                         "vocab_size": 64, "mlp_ratio": 4},
                               "data": {"tokenizer": {"vocab_size": 64}}})
    with pytest.raises(LongtrainError, match=r"parallel.tp=8 does not divide Mamba inner width model.expand\*model.d_model=36"):
        check_layout(recipe.model_copy(update={"parallel": recipe.parallel.model_copy(update={"tp": 8})}), 8)
    with pytest.raises(LongtrainError, match=r"parallel.micro_batches=4 does not divide train.micro_batch_size\*train.grad_accum=2\*3=6"):
        check_layout(tiny(pp=2, micro_batches=4).model_copy(update={"train": tiny().train.model_copy(update={"grad_accum": 3})}), 2)


def test_rank_placement_agrees_with_megatron_core():
    from megatron.core.parallel_state import RankGenerator

    for tp, cp, dp, pp in [(2, 2, 2, 2), (4, 2, 4, 2), (1, 8, 1, 1), (2, 1, 3, 2)]:
        layout = Layout(tp=tp, pp=pp, cp=cp, dp=dp)
        generator = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
        for dim in ("tp", "cp", "dp", "pp"):
            assert layout.groups(dim) == sorted(generator.get_ranks(dim)), (dim, tp, cp, dp, pp)
        for rank in range(layout.world):
            assert layout.rank(**layout.coordinates(rank)) == rank


def test_parameter_count_matches_the_model():
    import torch

    from longtrain.trainer.model.decoder import Decoder, count_parameters

    recipe = tiny()
    torch.manual_seed(0)
    model = Decoder(recipe.model)
    per_block = block_parameters(recipe.model)
    assert [per_block[c] for c in recipe.model.pattern] == [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    assert build_plan(recipe, 1).total_params == count_parameters(model)


def test_partition_minimises_the_largest_stage():
    assert partition([1, 1, 1, 1], 2) == [0, 2, 4]
    assert partition([8, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [0, 1, 9]
    assert partition([1, 2, 3], 3) == [0, 1, 2, 3]


def test_cli_plan(capsys):
    assert main(["plan", str(RECIPES / "hybrid-7b-32k.yaml"), "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "rank   63: tp 3 cp 1 dp 3 pp 1" in out and "stage 1" in out
    assert main(["plan", str(RECIPES / "hybrid-7b-32k.yaml"), "--world-size", "48"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "parallel.dp=4" in err
