"""`longtrain train` itself under tp / pp / cp: the training loop's logged losses on 2 gloo processes
equal the loop's own one-process run of the same recipe (passkey task, loss on the answer digits only,
so the scored-token count differs between cp ranks)."""
import json
from pathlib import Path

import pytest

from parallel_harness import run_ranks

STEPS = 4


def _recipe(run_dir, **parallel):
    from longtrain.trainer.config import recipe_from_dict

    return recipe_from_dict({
        "name": "loop-parallel", "run": {"dir": str(run_dir), "seed": 0},
        "model": {"pattern": "AMOF", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 32, "d_state": 4,
                  "ode": {"solver": "rk4", "steps": 1}},
        "data": {"task": "passkey", "seq_len": 32, "passkey": {"digits": 3, "loss": "answer"}},
        "train": {"steps": STEPS, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1,
                  "eval_interval": STEPS, "eval_batches": 1, "log_interval": 1, "sample_tokens": 3},
        "checkpoint": {"interval": 100, "keep_last": 1},
        "parallel": parallel})


def _train(rank, world, run_dir, parallel):
    from longtrain.trainer.loop import train

    return train(_recipe(run_dir, **parallel))


def _losses(run_dir):
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["eval_loss"] for r in records if "eval_loss" in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    run_ranks(_train, 1, args=(run_dir, {}), deepspeed=True)
    return _losses(run_dir)


@pytest.mark.parametrize("parallel", [pytest.param({"tp": 2}, marks=pytest.mark.slow), {"cp": 2},
                                      pytest.param({"pp": 2, "micro_batches": 2}, marks=pytest.mark.slow)],
                         ids=["tp2", "cp2", "pp2"])
def test_loop_under_model_parallelism_equals_one_process(parallel, one_process, tmp_path):
    run_ranks(_train, 2, args=(tmp_path, parallel), deepspeed=True)
    losses, eval_losses = _losses(tmp_path)
    assert len(losses) == STEPS
    for got, want in zip(losses + eval_losses, one_process[0] + one_process[1]):
        assert abs(got - want) <= 1e-5 * abs(want), (parallel, losses, one_process)
    assert (tmp_path / "sample.txt").exists()


def _train_resumed(rank, world, run_dir, parallel, steps, resume):
    from longtrain.trainer.loop import train

    recipe = _recipe(run_dir, **parallel)
    # warmup past the last step: the learning rate then does not depend on train.steps, which differs here
    train_cfg = recipe.train.model_copy(update={"steps": steps, "warmup_steps": 2 * STEPS})
    recipe = recipe.model_copy(update={"train": train_cfg,
                                       "checkpoint": recipe.checkpoint.model_copy(update={"interval": 2})})
    return train(recipe, resume=resume)


@pytest.mark.slow
def test_resume_under_tensor_parallelism_is_bitwise(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_ranks(_train_resumed, 2, args=(straight, {"tp": 2}, STEPS, None), deepspeed=True)
    run_ranks(_train_resumed, 2, args=(stopped, {"tp": 2}, STEPS // 2, None), deepspeed=True)
    run_ranks(_train_resumed, 2, args=(stopped, {"tp": 2}, STEPS, "auto"), deepspeed=True)
    assert _losses(stopped)[0][-STEPS // 2:] == _losses(straight)[0][-STEPS // 2:]
